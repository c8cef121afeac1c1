"""Unit tests of the shared core: prompts, tokenizers, transforms, uncertainty, inferer, metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from vlseg.data.transforms import BinarizeLabeld, EnsureRGBd, ImageInputError, SelectPromptd, SplitPredUncertaintyd, TokenizeTextd
from vlseg.inferers import StochasticTextInferer, mc_dropout, sample_probabilities
from vlseg.metrics import segmentation_metrics, summarize
from vlseg.text import PromptError, build_tokenizer, validate_prompt
from vlseg.uncertainty import binary_entropy, mean_and_uncertainty, uncertainty_scores


# ---------------------------------------------------------------- prompts
@pytest.mark.parametrize("bad", ["", "   \n\t", "a" * 10_000, "polyp\x00", "po\x07lyp", b"\xff\xfe", None, 42])
def test_validate_prompt_rejects(bad):
    with pytest.raises(PromptError):
        validate_prompt(bad)


def test_validate_prompt_cleans_and_limits():
    assert validate_prompt("  one  small\tpolyp \n") == "one small polyp"
    assert validate_prompt("polyp".encode()) == "polyp"
    assert validate_prompt("x" * 50, max_chars=50) == "x" * 50
    with pytest.raises(PromptError, match="limit is 49"):
        validate_prompt("x" * 50, max_chars=49)
    assert validate_prompt("", allow_empty=True) == ""


# ---------------------------------------------------------------- tokenizers
def test_cxr_bert_vocabulary_is_really_loaded():
    tok = build_tokenizer("cxr-bert", 24)
    ids, mask = tok(["polyp lesion in the image"])
    unk = tok._hf.unk_token_id
    words = ids[0][mask[0].bool()][1:-1]  # drop [CLS]/[SEP]
    assert len(words) >= 5 and (words != unk).all(), ids
    assert tok.vocab_size == 30522


def test_minilm_tokenizer_and_real_encoder_semantics():
    from vlseg.text.encoders import build_text_encoder

    tok = build_tokenizer("minilm", 24)
    ids, mask = tok(["polyp", "a polyp", "kidney stone in the bladder"])
    assert ids.shape == (3, 24) and 3 <= mask[0].sum() <= 4  # [CLS] pol ##yp [SEP]
    enc = build_text_encoder("minilm")
    assert enc.pretrained and enc.hidden_size == 384
    with torch.no_grad():
        states = enc(ids, mask)
    pooled = (states * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    pooled = torch.nn.functional.normalize(pooled, dim=-1)
    sim = pooled @ pooled.T
    # real pretrained weights: "polyp" is closer to "a polyp" than to an unrelated sentence
    assert sim[0, 1] > sim[0, 2] + 0.1, sim


def test_open_clip_tokenizer_is_real_bpe():
    tok = build_tokenizer("open_clip:ViT-B-16", 16)
    ids, mask = tok(["polyp", "cyst"])
    assert ids.shape == (2, 16)
    assert ids[0, 0] == 49406 and ids[0, 1] != ids[1, 1]  # start token, then different words
    assert mask.sum(1).tolist() == [ids[0].ne(0).sum().item(), ids[1].ne(0).sum().item()]


def test_tokenize_transform_and_select_prompt():
    item = {"text": "polyp", "prompts": {"p1": "cyst", "p9": "one small dark oval cyst in the top left of the image"}}
    d = SelectPromptd(prompt_key="p9")(item)
    assert d["text"].startswith("one small dark")
    d = SelectPromptd(override="lesion", prompt_key="p9")(item)
    assert d["text"] == "lesion"
    with pytest.raises(PromptError, match="not in this item"):
        SelectPromptd(prompt_key="p5")(item)
    with pytest.raises(PromptError):
        SelectPromptd()({"text": "   "})
    d = TokenizeTextd(tokenizer="minilm", max_length=12)({"text": "polyp"})
    assert d["text_ids"].shape == (12,) and 3 <= d["text_mask"].sum() <= 4


# ---------------------------------------------------------------- image / label transforms
def test_ensure_rgb_variants():
    grey = np.full((1, 8, 9), 100, np.uint8)
    out = EnsureRGBd()({"image": grey})["image"]
    assert out.shape == (3, 8, 9) and float(out.max()) == 100
    rgba = np.zeros((4, 5, 5), np.float32)
    assert EnsureRGBd()({"image": rgba})["image"].shape == (3, 5, 5)
    u16 = np.full((1, 4, 4), 65535, np.int32)
    assert float(EnsureRGBd()({"image": u16})["image"].max()) == pytest.approx(255.0)
    for bad, msg in [(np.zeros((5, 4, 4)), "channels"), (np.zeros((3, 1, 1)), "too small"),
                     (np.full((3, 4, 4), np.nan), "NaN"), (np.zeros((4, 4)), "channels first")]:
        with pytest.raises(ImageInputError, match=msg):
            EnsureRGBd()({"image": bad})


def test_binarize_label_jpeg_like():
    rng = np.random.default_rng(0)
    mask = np.zeros((3, 10, 10), np.float32)
    mask[:, 2:6, 2:6] = 255
    noisy = np.clip(mask + rng.normal(0, 20, mask.shape), 0, 255)  # JPEG-like ringing
    out = BinarizeLabeld()({"label": noisy})["label"]
    assert out.shape == (1, 10, 10)
    assert out.sum() == 16 and set(np.unique(np.asarray(out))) <= {0.0, 1.0}
    assert BinarizeLabeld()({"label": mask[0] / 255.0})["label"].sum() == 16


# ---------------------------------------------------------------- uncertainty
def test_binary_entropy_values():
    p = torch.tensor([0.5, 0.0, 1.0, 0.1])
    h = binary_entropy(p)
    assert h[0] == pytest.approx(1.0, abs=1e-5)
    assert h[1] < 1e-4 and h[2] < 1e-4
    expected = -(0.1 * math.log(0.1) + 0.9 * math.log(0.9)) / math.log(2)
    assert h[3] == pytest.approx(expected, rel=1e-4)
    mean, unc = mean_and_uncertainty(torch.tensor([[0.0], [1.0]]))
    assert mean.item() == 0.5 and unc.item() == pytest.approx(1.0, abs=1e-5)


def test_uncertainty_scores_top_fraction():
    u = torch.zeros(100)
    u[:5] = 1.0
    s = uncertainty_scores(u, top_fraction=0.05)
    assert s["mean"] == pytest.approx(0.05) and s["top5"] == pytest.approx(1.0) and s["max"] == 1.0
    with pytest.raises(ValueError):
        uncertainty_scores(torch.zeros(0))


# ---------------------------------------------------------------- inferer
class _DropNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 1, 1)
        self.drop = torch.nn.Dropout(0.5)
        self.bn = torch.nn.BatchNorm2d(1)

    def forward(self, image, text_ids=None, text_mask=None):
        return self.bn(self.drop(self.conv(image)))


def test_stochastic_inferer_seeded_and_mc_dropout():
    torch.manual_seed(0)
    net = _DropNet().eval()
    x = torch.randn(2, 3, 8, 8)
    state = torch.get_rng_state()
    inf = StochasticTextInferer(num_samples=8, seed=3)
    a, b = inf(x, net), inf(x, net)
    assert torch.equal(a, b)  # same seed, same maps
    assert torch.equal(state, torch.get_rng_state())  # caller's RNG untouched
    c = StochasticTextInferer(num_samples=8, seed=4)(x, net)
    assert not torch.equal(a, c)
    assert a.shape == (2, 2, 8, 8) and 0 <= a.min() and a.max() <= 1
    # one pass = deterministic eval; uncertainty equals the entropy of that probability
    single = StochasticTextInferer(num_samples=1)(x, net)
    assert torch.allclose(single[:, 1:], binary_entropy(torch.sigmoid(net(x))))
    # MC dropout switches only dropout layers and restores them
    with mc_dropout(net):
        assert net.drop.training and not net.bn.training
    assert not net.drop.training
    with pytest.raises(ValueError):
        sample_probabilities(net, x, num_samples=0)


def test_split_pred_uncertainty():
    d = SplitPredUncertaintyd()({"pred": torch.rand(2, 4, 4)})
    assert d["pred"].shape == (1, 4, 4) and d["uncertainty"].shape == (1, 4, 4)


# ---------------------------------------------------------------- metrics
def test_metrics_hand_computed():
    g = torch.zeros(10, 10)
    g[2:6, 2:6] = 1  # 16 px
    p = torch.zeros(10, 10)
    p[2:6, 2:4] = 1  # 8 px inside
    m = segmentation_metrics(p, g)
    assert m["dice"] == pytest.approx(2 * 8 / 24) and m["iou"] == pytest.approx(0.5)
    assert 0.0 < m["nsd"] <= 1.0
    assert segmentation_metrics(torch.zeros(4, 4), torch.zeros(4, 4)) == {"dice": 1.0, "iou": 1.0, "nsd": 1.0}
    assert segmentation_metrics(torch.zeros(4, 4), torch.ones(4, 4))["dice"] == 0.0
    s = summarize([m, {"dice": 1.0, "iou": 1.0, "nsd": 1.0}])
    assert s["n"] == 2 and s["dice"] == pytest.approx((2 / 3 + 1) / 2)
    with pytest.raises(ValueError):
        segmentation_metrics(torch.zeros(4, 4), torch.zeros(5, 5))


def test_stop_after_seconds_process_clock_counts_cpu_not_waiting():
    """``clock="process"`` budgets CPU seconds: waiting (a shared machine, sleep) does not use the budget, work does."""
    import time

    from ignite.engine import Engine

    from vlseg.engine_handlers import StopAfterSeconds

    sleeper = Engine(lambda e, b: time.sleep(0.02))
    StopAfterSeconds(0.15, clock="process").attach(sleeper)
    sleeper.run(range(10), max_epochs=3)  # 0.6 s of wall clock, almost no CPU
    assert not sleeper.state.stopped_by_time and sleeper.state.iteration == 30

    def spin(e, b):
        t = time.process_time()
        while time.process_time() - t < 0.02:
            pass

    worker = Engine(spin)
    StopAfterSeconds(0.15, clock="process").attach(worker)
    worker.run(range(10), max_epochs=3)
    assert worker.state.stopped_by_time and worker.state.iteration < 30 and worker.state.budget_clock == "process"
    with pytest.raises(ValueError, match="clock"):
        StopAfterSeconds(1.0, clock="gpu")
