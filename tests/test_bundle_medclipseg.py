"""Tests of the MedCLIPSeg bundle (``bundles/medclipseg``) on the ``tiny`` variant and the tiny demo set.

Training runs the real command line (``python -m monai.bundle run``) and the multi-process config runs under
``torchrun`` (2 processes, gloo, CPU); evaluation, inference and ``verify_net_in_out`` run in-process to keep the file
fast. Loss terms are checked against values computed by hand (plain Python floats) and their gradients.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from bundle_cli import SCHEMA, BundleCLI
from vlseg.bundles import bundle_context

CLI = BundleCLI("medclipseg")
BUNDLE, CONFIGS = CLI.root, CLI.configs

TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "head_width": 16},
    "text_cfg": {"context_length": 16, "width": 32, "heads": 2, "layers": 2},
}


@pytest.fixture(scope="module")
def mcs():
    """The bundle's ``scripts`` package (other bundles have their own ``scripts``: isolated)."""
    with bundle_context(BUNDLE):
        import scripts.adapters
        import scripts.data
        import scripts.handlers
        import scripts.head
        import scripts.losses
        import scripts.network

        yield SimpleNamespace(network=scripts.network, losses=scripts.losses, data=scripts.data,
                              handlers=scripts.handlers, adapters=scripts.adapters, head=scripts.head)


def tiny_net(mcs, **kw):
    args = dict(clip_cfg=TINY_CLIP, adapter_layers=[1], adapter_dim=16, train_encoders=True)
    args.update(kw)
    return mcs.network.MedCLIPSeg(**args)


def tokens(texts, n=16):
    from vlseg.text import build_tokenizer

    return build_tokenizer("open_clip:ViT-B-16", n)(texts)


# ------------------------------------------------------------------------------------------------ loss terms


def _sig(z):
    return 1.0 / (1.0 + math.exp(-z))


def test_dice_per_image_matches_hand_value_and_gradient(mcs):
    # image 0: 2x2, logits z, target g; image 1: all background with p = 0.5
    z0 = [[0.0, 2.0], [-1.0, 0.5]]
    g0 = [[1.0, 1.0], [0.0, 0.0]]
    logits = torch.tensor([[z0], [[[0.0, 0.0], [0.0, 0.0]]]], dtype=torch.float64, requires_grad=True)
    target = torch.tensor([[g0], [[[0.0, 0.0], [0.0, 0.0]]]], dtype=torch.float64)
    loss = mcs.losses.per_image_dice_loss(logits, target)
    s = 1e-5

    def dice_loss(z, g):
        p = [_sig(v) for row in z for v in row]
        gg = [v for row in g for v in row]
        inter = sum(a * b for a, b in zip(p, gg))
        return 1.0 - (2.0 * inter + s) / (sum(p) + sum(gg) + s), p, gg, inter

    l0, p0, gg0, i0 = dice_loss(z0, g0)
    l1, *_ = dice_loss([[0.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]])
    assert abs(l1 - (1.0 - s / (2.0 + s))) < 1e-12
    assert loss.item() == pytest.approx((l0 + l1) / 2.0, abs=1e-9)
    loss.backward()
    den = sum(p0) + sum(gg0) + s
    for j in range(4):  # dL/dz_j = -(2 g_j den - (2 I + s)) / den^2 * p_j (1 - p_j), halved by the batch mean
        dldp = -(2.0 * gg0[j] * den - (2.0 * i0 + s)) / den**2
        expect = 0.5 * dldp * p0[j] * (1.0 - p0[j])
        assert logits.grad[0, 0].reshape(-1)[j].item() == pytest.approx(expect, abs=1e-9)


def test_dice_is_per_image_not_rows_as_channels(mcs):
    from monai.losses import DiceLoss

    torch.manual_seed(0)
    logits = torch.randn(2, 1, 8, 8)
    target = (torch.rand(2, 1, 8, 8) > 0.6).float()
    ours = mcs.losses.per_image_dice_loss(logits, target)
    quirk = DiceLoss(include_background=False, sigmoid=True)(logits[:, 0], target[:, 0])  # the public code's call
    assert abs(ours.item() - quirk.item()) > 1e-3  # the quirk really is a different quantity
    assert mcs.losses.per_image_dice_loss(logits[:, 0], target[:, 0]).item() == pytest.approx(ours.item())  # [B,H,W] ok


def test_bce_matches_hand_value_and_gradient(mcs):
    z = [1.5, -0.5, 0.0, 3.0]
    g = [1.0, 0.0, 1.0, 0.0]
    logits = torch.tensor(z, dtype=torch.float64).reshape(1, 1, 2, 2).requires_grad_(True)
    target = torch.tensor(g, dtype=torch.float64).reshape(1, 1, 2, 2)
    loss = mcs.losses.bce_loss(logits, target)
    hand = -sum(gi * math.log(_sig(zi)) + (1 - gi) * math.log(1 - _sig(zi)) for zi, gi in zip(z, g)) / 4
    assert loss.item() == pytest.approx(hand, abs=1e-12)
    loss.backward()
    for j in range(4):
        assert logits.grad.reshape(-1)[j].item() == pytest.approx((_sig(z[j]) - g[j]) / 4, abs=1e-12)


def _softmax(row):
    m = max(row)
    e = [math.exp(v - m) for v in row]
    return [v / sum(e) for v in e]


def test_soft_contrastive_matches_hand_value(mcs):
    tau = 0.2
    P = [[0.6, 0.1], [-0.2, 0.5]]  # mean patch embeddings (B=2, D=2)
    T = [[1.0, 0.5], [0.3, -1.2]]  # projected text embeddings, NOT normalised
    dot = lambda a, b: sum(x * y for x, y in zip(a, b))  # noqa: E731
    S = [[dot(T[i], T[j]) / tau for j in range(2)] for i in range(2)]
    S = [[v / math.sqrt(sum(w * w for w in row)) for v in row] for row in S]
    Y = [_softmax(row) for row in S]
    li2t = [[dot(P[i], T[j]) / tau for j in range(2)] for i in range(2)]
    lt2i = [[dot(T[i], P[j]) / tau for j in range(2)] for i in range(2)]

    def ce(logits, targets):
        out = 0.0
        for lrow, trow in zip(logits, targets):
            m = max(lrow)
            lse = m + math.log(sum(math.exp(v - m) for v in lrow))
            out += -sum(t * (v - lse) for t, v in zip(trow, lrow))
        return out / len(logits)

    YT = [[Y[j][i] for j in range(2)] for i in range(2)]
    hand = 0.5 * (ce(li2t, Y) + ce(lt2i, YT))
    p = torch.tensor(P, dtype=torch.float64, requires_grad=True)
    t = torch.tensor(T, dtype=torch.float64, requires_grad=True)
    got = mcs.losses.soft_patch_contrastive_loss(p, t, tau)
    assert got.item() == pytest.approx(hand, abs=1e-12)
    assert torch.allclose(mcs.losses.soft_targets(t, tau), torch.tensor(Y, dtype=torch.float64))
    # gradients: analytic (autograd) vs central finite differences (soft targets carry no gradient)
    got.backward()
    h = 1e-6
    for which, base in (("p", P), ("t", T)):
        for i in range(2):
            for j in range(2):
                def f(delta):
                    a = [row[:] for row in P]
                    b = [row[:] for row in T]
                    (a if which == "p" else b)[i][j] += delta
                    ta, tb = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
                    y = mcs.losses.soft_targets(torch.tensor(T, dtype=torch.float64), tau)  # targets held fixed
                    l1 = ta @ tb.t() / tau
                    l2 = tb @ ta.t() / tau
                    return float(0.5 * (-(y * l1.log_softmax(-1)).sum(-1).mean() - (y.t() * l2.log_softmax(-1)).sum(-1).mean()))
                fd = (f(h) - f(-h)) / (2 * h)
                grad = (p.grad if which == "p" else t.grad)[i, j].item()
                assert grad == pytest.approx(fd, abs=1e-6)


def test_total_loss_weights(mcs):
    torch.manual_seed(1)
    out = {"logits": torch.randn(3, 1, 4, 4), "patch_mean": torch.randn(3, 8), "text_embed": torch.randn(3, 8)}
    y = (torch.rand(3, 1, 4, 4) > 0.5).float()
    L = mcs.losses
    total = L.MedCLIPSegLoss()(out, y)
    expect = (0.5 * L.per_image_dice_loss(out["logits"], y) + 0.5 * L.bce_loss(out["logits"], y)
              + 0.1 * L.soft_patch_contrastive_loss(out["patch_mean"], out["text_embed"], 0.2))
    assert total.item() == pytest.approx(expect.item(), abs=1e-6)
    plain = L.MedCLIPSegLoss()(out["logits"], y)  # validation: no contrastive term
    assert plain.item() == pytest.approx((0.5 * L.per_image_dice_loss(out["logits"], y) + 0.5 * L.bce_loss(out["logits"], y)).item())


# ------------------------------------------------------------------------------------------------ PVL adapter


def test_probabilistic_attention_equations(mcs):
    N = mcs.adapters
    torch.manual_seed(0)
    q, k_mu, k_var = torch.randn(1, 2, 3), torch.randn(1, 4, 3), torch.rand(1, 4, 3) + 0.1
    s = N.probabilistic_attention_scores(q, k_mu, k_var, beta=2.35)
    for i in range(2):
        for j in range(4):
            mean = sum(q[0, i, c] * k_mu[0, j, c] for c in range(3)) / math.sqrt(3)
            var = sum(q[0, i, c] ** 2 * k_var[0, j, c] for c in range(3)) / 3
            assert s[0, i, j].item() == pytest.approx(float(mean - 2.35 * math.sqrt(var)), abs=1e-5)
    # variance head: softplus + 1e-6 > 0; mean head LayerNorm-ed
    att = N.ProbCrossAttention(8)
    mu, var = N.key_value_distribution(att.k_proj, att.norm_k, torch.randn(2, 5, 8))
    assert (var > 0).all() and torch.allclose(mu.mean(-1), torch.zeros(2, 5), atol=1e-5)
    # gate initialised at 0 -> an even mix; values are re-sampled on every pass
    assert att.gate.item() == 0.0
    x, ctx = torch.randn(1, 3, 8), torch.randn(1, 5, 8)
    assert not torch.allclose(att(x, ctx), att(x, ctx))
    out, query = torch.randn(4), torch.randn(4)
    assert torch.allclose(N.gated_residual(out, query, torch.tensor(0.0)), 0.5 * out + 0.5 * query)


def test_adapter_and_head_parameter_counts(mcs):
    N, H = mcs.adapters, mcs.head
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    # UniMedCLIP layout (768-wide image and BERT text streams): the public code's 1,577,986 per adapter
    assert n(N.PVLAdapter(768, 768, 256)) == 1_577_986
    assert n(N.ProbCrossAttention(256)) == 395_777
    # OpenAI-style ViT-B/16 text tower is 512 wide: projections 512 -> 256 -> 512
    assert n(N.PVLAdapter(768, 512, 256)) == 2 * 768 * 256 + 2 * 512 * 256 + 2 * 395_777
    assert n(H.ScaleBlock(512)) == 1_054_720
    assert H.ScaleBlock(8).norm.eps == 1e-6  # timm's LayerNorm2d, as upstream (trainers/scale_block.py)


def test_fast_sampling_equals_naive_loop_and_seeds_differ(mcs):
    torch.manual_seed(0)
    net = tiny_net(mcs, adapter_layers=[1], max_sample_batch=4).eval()
    ids, mask = tokens(["small polyp", "dark cyst in the top"])
    img = torch.randn(2, 3, 48, 40)
    naive = net.sample_probabilities(img, ids, mask, num_samples=5, seed=7, fast=False)
    fast = net.sample_probabilities(img, ids, mask, num_samples=5, seed=7, fast=True)  # chunks of 2 passes
    assert naive.shape == (5, 2, 1, 48, 40)
    assert torch.allclose(naive, fast, atol=1e-5, rtol=0)
    other = net.sample_probabilities(img, ids, mask, num_samples=5, seed=8, fast=True)
    assert (other - fast).abs().max() > 1e-4
    assert (fast.std(dim=0) > 0).any()  # passes differ from each other
    # documented (docs "Fast stochastic sampling"): a pass draws noise for the whole batch, so image 0 alone gets
    # other draws than image 0 of a batch of 2 with the same seed
    alone = net.sample_probabilities(img[:1], ids[:1], mask[:1], num_samples=5, seed=7, fast=True)
    assert (alone[:, 0] - fast[:, 0]).abs().max() > 1e-4
    # with mask_text_padding the fast path also drops the padded text positions: still the naive loop's maps
    net.mask_text_padding = True
    assert net._drop_padding(ids, mask)[0].shape[1] < ids.shape[1]
    naive = net.sample_probabilities(img, ids, mask, num_samples=3, seed=7, fast=False)
    fast = net.sample_probabilities(img, ids, mask, num_samples=3, seed=7, fast=True)
    assert torch.allclose(naive, fast, atol=1e-5, rtol=0)


def test_inferer_same_seed_identical_maps(mcs):
    from vlseg.inferers import StochasticTextInferer

    torch.manual_seed(0)
    net = tiny_net(mcs).eval()
    ids, mask = tokens(["small polyp"])
    img = torch.randn(1, 3, 32, 32)
    a = StochasticTextInferer(num_samples=4, seed=3)(img, net, ids, mask)
    b = StochasticTextInferer(num_samples=4, seed=3)(img, net, ids, mask)
    c = StochasticTextInferer(num_samples=4, seed=4)(img, net, ids, mask)
    assert a.shape == (1, 2, 32, 32) and torch.equal(a, b)
    assert (a - c).abs().max() > 1e-5
    assert 0 <= a.min() and a.max() <= 1


def test_hf_bert_tower_lockstep(mcs, tmp_path):
    """An HF BERT text tower (UniMedCLIP / BiomedCLIP style) built offline from a local config folder."""
    cfg = json.loads((BUNDLE / "assets" / "biomedbert_base" / "config.json").read_text())
    cfg.update(hidden_size=24, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    clip = {"embed_dim": 32, "vision_cfg": TINY_CLIP["vision_cfg"],
            "text_cfg": {"hf_model_name": str(tmp_path), "hf_proj_type": "mlp",
                         "hf_pooler_type": "cls_last_hidden_state_pooler", "context_length": 16}}
    torch.manual_seed(0)
    net = mcs.network.MedCLIPSeg(clip_cfg=clip, adapter_layers=[1], adapter_dim=16).eval()
    assert net.text_kind == "hf" and net.pvl_adapters[0].proj_txt_down.in_features == 24
    from vlseg.text import build_tokenizer

    ids, mask = build_tokenizer("cxr-bert", 16)(["a small polyp", "lesion"])
    img = torch.randn(2, 3, 32, 32)
    a = net.sample_probabilities(img, ids, mask, num_samples=3, seed=1, fast=False)
    b = net.sample_probabilities(img, ids, mask, num_samples=3, seed=1, fast=True)
    assert torch.allclose(a, b, atol=1e-5, rtol=0)
    # padded tokens: upstream (mask_text_padding=False) the adapters attend to them, so their content matters; with
    # mask_text_padding=True neither the BERT layers nor the adapters look at them
    ids2 = ids.clone()
    ids2[1, -1] = 5
    assert (net.sample_probabilities(img, ids2, mask, num_samples=3, seed=1) - b).abs().max() > 1e-6
    net.mask_text_padding = True
    d = net.sample_probabilities(img, ids, mask, num_samples=3, seed=1)
    e = net.sample_probabilities(img, ids2, mask, num_samples=3, seed=1)
    assert torch.allclose(d, e, atol=1e-6)


def test_pretrained_minilm_text_tower_stays_frozen(mcs):
    """The small variant's layout: a REAL pretrained BERT-style text tower (all-MiniLM-L6-v2, shipped offline by
    vlseg) next to a random image tower. Loaded text weights stay frozen even with train_encoders; the random parts
    (image tower, the CLIP projection of the text tower) train."""
    from transformers import AutoModel

    from vlseg.text.tokenizers import minilm_dir

    clip = {"embed_dim": 32, "vision_cfg": TINY_CLIP["vision_cfg"],
            "text_cfg": {"hf_model_name": "minilm", "hf_model_pretrained": True, "hf_num_layers": 2,
                         "hf_proj_type": "mlp", "hf_pooler_type": "mean_pooler", "context_length": 16}}
    net = mcs.network.MedCLIPSeg(clip_cfg=clip, adapter_layers=[1], adapter_dim=16, train_encoders=True)
    assert net.text_pretrained and not net.text_trainable and net.vision_trainable
    assert len(net.clip.text.transformer.encoder.layer) == 2
    ref = AutoModel.from_pretrained(str(minilm_dir()), local_files_only=True)
    assert torch.equal(net.clip.text.transformer.encoder.layer[1].output.dense.weight,
                       ref.encoder.layer[1].output.dense.weight)
    assert not any(p.requires_grad for p in net.clip.text.transformer.parameters())
    assert all(p.requires_grad for p in net.clip.text.proj.parameters())
    assert all(p.requires_grad for p in net.clip.visual.parameters())
    from vlseg.text import build_tokenizer

    ids, mask = build_tokenizer("minilm", 16)(["small polyp", "dark cyst"])
    out = net.train()(torch.randn(2, 3, 32, 32), ids, mask)
    mcs.losses.MedCLIPSegLoss()(out, torch.zeros(2, 1, 32, 32)).backward()
    assert all(p.grad is None for p in net.clip.text.transformer.parameters())


# ------------------------------------------------------------------------------------------------ freezing


def test_frozen_encoders_no_grad_not_in_optimizer(mcs, tmp_path):
    torch.manual_seed(0)
    net = tiny_net(mcs, train_encoders=False).train()
    assert not net.encoders_trainable
    from vlseg.nets.common import trainable_parameters

    params = trainable_parameters(net)
    clip_ids = {id(p) for p in net.clip.parameters()}
    assert params and not (clip_ids & {id(p) for p in params})
    expected = {id(p) for m in (net.pvl_adapters, net.mask_head, net.upscale) for p in m.parameters()}
    assert {id(p) for p in params} == expected
    ids, mask = tokens(["small polyp", "cyst"])
    out = net(torch.randn(2, 3, 32, 32), ids, mask)
    mcs.losses.MedCLIPSegLoss()(out, (torch.rand(2, 1, 32, 32) > 0.5).float()).backward()
    assert all(p.grad is None for p in net.clip.parameters())
    assert all(p.grad is not None for p in net.pvl_adapters.parameters())
    # the switch: random encoders train when asked ...
    net2 = tiny_net(mcs, train_encoders=True)
    assert net2.encoders_trainable and all(p.requires_grad for n, p in net2.clip.named_parameters() if n != "logit_scale")
    # ... but never once pretrained weights were loaded
    path = tmp_path / "clip.pt"
    torch.save(net2.clip.state_dict(), path)
    net3 = tiny_net(mcs, train_encoders=True, clip_pretrained=str(path))
    assert net3.encoders_pretrained and not net3.encoders_trainable
    assert not any(p.requires_grad for p in net3.clip.parameters())
    assert torch.equal(net3.clip.visual.conv1.weight, net2.clip.visual.conv1.weight)


def test_config_optimizer_holds_only_trainable(mcs, demo):
    from monai.bundle import ConfigParser

    with bundle_context(BUNDLE):
        parser = ConfigParser()
        parser.read_config([str(CONFIGS / "train.json"), str(CONFIGS / "tiny.json")])
        parser["bundle_root"] = str(BUNDLE)
        parser["datalist"] = str(demo)
        parser["train_encoders"] = False
        opt = parser.get_parsed_content("optimizer")
        net = parser.get_parsed_content("network")
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert in_opt == {id(p) for p in net.parameters() if p.requires_grad}
    assert not (in_opt & {id(p) for p in net.clip.parameters()})


# ------------------------------------------------------------------------------------------------ data


def test_data_fraction_subsets_and_random_fraction(mcs, demo, tmp_path):
    raw = json.loads(Path(demo).read_text())
    raw["subsets"] = {"10": {"training": raw["training"][:2], "validation": raw["validation"][:1]}}
    dl = tmp_path / "datalist.json"
    dl.write_text(json.dumps(raw))
    # paths stay relative to the ORIGINAL folder: point base_dir there
    base = str(Path(demo).parent)
    sub = mcs.data.load_items(dl, "training", data_fraction=10, base_dir=base)
    assert [Path(i["label"]).name for i in sub] == [Path(i["label"]).name for i in raw["training"][:2]]
    assert Path(sub[0]["image"]).is_file()
    assert len(mcs.data.load_items(dl, "training", data_fraction=0.1, base_dir=base)) == 2  # 0.1 == 10 %
    n = len(raw["training"])
    r1 = mcs.data.load_items(dl, "training", data_fraction=50, seed=1, base_dir=base)  # no fixed 50 % list
    r2 = mcs.data.load_items(dl, "training", data_fraction=50, seed=1, base_dir=base)
    assert len(r1) == math.ceil(0.5 * n) and [i["label"] for i in r1] == [i["label"] for i in r2]
    assert len(mcs.data.load_items(dl, "training", data_fraction=100, base_dir=base)) == n


def test_bgr_imagenet_compat_normalisation(mcs):
    img = torch.zeros(3, 2, 2)
    img[0] = 255.0  # pure red
    rgb = mcs.data.ClipNormalized("image")({"image": img})["image"]
    bgr = mcs.data.ClipNormalized("image", bgr_imagenet_compat=True)({"image": img})["image"]
    D = mcs.data
    assert rgb[0, 0, 0].item() == pytest.approx((1.0 - D.OPENAI_CLIP_MEAN[0]) / D.OPENAI_CLIP_STD[0], abs=1e-5)
    assert bgr[2, 0, 0].item() == pytest.approx((1.0 - D.IMAGENET_MEAN[2]) / D.IMAGENET_STD[2], abs=1e-5)  # red is last
    assert bgr[0, 0, 0].item() == pytest.approx((0.0 - D.IMAGENET_MEAN[0]) / D.IMAGENET_STD[0], abs=1e-5)


def test_boundary_interior_uncertainty(mcs):
    lab = np.zeros((20, 20), np.float32)
    lab[5:15, 5:15] = 1
    unc = np.zeros_like(lab)
    unc[4:16, 4:16] = 1.0
    unc[7:13, 7:13] = 0.0  # exactly the interior (erosion by 2)
    r = mcs.handlers.boundary_interior_uncertainty(unc, lab, band=2)
    assert r["unc_interior"] == 0.0 and r["unc_background"] == 0.0
    assert 0.5 < r["unc_boundary"] < 1.0


def test_stop_after_seconds_handler():
    import time

    from ignite.engine import Engine

    from vlseg.engine_handlers import StopAfterSeconds

    eng = Engine(lambda e, b: time.sleep(0.02))
    StopAfterSeconds(0.15).attach(eng)
    eng.run(range(100), max_epochs=5)
    assert eng.state.stopped_by_time and eng.state.iteration < 50


# ------------------------------------------------------------------------------------------------ bundle


def test_verify_metadata():
    from monai.bundle import verify_metadata

    verify_metadata(meta_file=str(CONFIGS / "metadata.json"), filepath=str(SCHEMA))
    meta = json.loads((CONFIGS / "metadata.json").read_text())
    fmt = meta["network_data_format"]
    assert len(fmt["inputs"]["image"]["spatial_shape"]) == 2 and fmt["inputs"]["text"]["type"] == "string"
    for name, out in fmt["outputs"].items():  # one entry per channel
        assert len(out["channel_def"]) == out["num_channels"], name
    assert fmt["outputs"]["pred"]["channel_def"]["0"].startswith("foreground") and "uncertainty" in fmt["outputs"]
    # the input range is what ClipNormalized (OpenAI-CLIP statistics) makes of 0..255
    lo, hi = fmt["inputs"]["image"]["value_range"]
    assert lo == pytest.approx((0 - 0.48145466) / 0.26862954, abs=0.01)
    assert hi == pytest.approx((1 - 0.40821073) / 0.27577711, abs=0.01)
    assert "vlseg" not in meta["required_packages_version"] and not (
        set(meta["required_packages_version"]) & set(meta.get("optional_packages_version", {})))


def test_verify_net_in_out(mcs):
    from monai.bundle import verify_net_in_out

    ids, _ = tokens(["small polyp"])
    with bundle_context(BUNDLE):
        verify_net_in_out(net_id="network_def", meta_file=str(CONFIGS / "metadata.json"),
                          config_file=[str(CONFIGS / "inference.json"), str(CONFIGS / "tiny.json")], device="cpu",
                          extra_forward_args={"text_ids": ids.tolist()}, bundle_root=str(BUNDLE))


@pytest.fixture(scope="module")
def trained(demo, tmp_path_factory) -> Path:
    """Train the tiny variant for one epoch with the real CLI; returns the run folder (models/model.pt inside)."""
    out = tmp_path_factory.mktemp("mcs_train")
    CLI.run(CLI.bundle_run("train.json", "tiny.json", bundle_root=BUNDLE, datalist=demo, output_dir=out,
                           ckpt_dir=out / "models", max_epochs=1))
    return out


def test_train_cli(trained):
    assert (trained / "models" / "model.pt").is_file()
    assert list((trained / "models").glob("checkpoint_*.pt")), "resumable full-state checkpoint missing"
    full = torch.load(next((trained / "models").glob("checkpoint_*.pt")), map_location="cpu", weights_only=False)
    assert {"model", "optimizer", "lr_scheduler", "trainer"} <= set(full)
    rep = json.loads((trained / "train_metrics.json").read_text())
    assert rep["epochs_completed"] == 1 and len(rep["history"]["train_loss"]) == 1
    assert rep["encoders"]["pretrained"] is False and rep["encoders"]["trainable"] is True
    assert rep["encoders"]["image"]["trainable"] and rep["encoders"]["text"]["trainable"]
    assert (trained / "learning_curve.png").stat().st_size > 1000


def _workflow(files, **override):
    from monai.bundle import ConfigWorkflow

    with bundle_context(BUNDLE):
        wf = ConfigWorkflow(config_file=[str(CONFIGS / f) for f in files], meta_file=str(CONFIGS / "metadata.json"),
                            logging_file=str(CONFIGS / "logging.conf"), workflow_type="infer",
                            bundle_root=str(BUNDLE), **override)
        wf.initialize()
        wf.run()
        wf.finalize()


def test_evaluate_with_prompt_variant(trained, demo):
    out = trained / "eval"
    _workflow(["train.json", "evaluate.json", "tiny.json"], datalist=str(demo), ckpt_dir=str(trained / "models"),
              eval_output_dir=str(out), prompt_key="underdescriptive")
    summary = json.loads((out / "metrics_test_underdescriptive.json").read_text())
    rows = (out / "metrics_test_underdescriptive.csv").read_text().splitlines()
    n_test = len(json.loads(Path(demo).read_text())["test"])
    assert summary["n"] == n_test and len(rows) == n_test + 1
    assert 0.0 <= summary["dice"] <= 1.0 and 0.0 <= summary["nsd"] <= 1.0
    assert all(r.split(",")[1].endswith("visible.") for r in rows[1:])  # the underdescriptive prompts were used
    assert 0.0 <= summary["unc_boundary"] <= 1.0


def test_inference_outputs_and_seed(trained, demo):
    from PIL import Image

    out1, out2 = trained / "infer1", trained / "infer2"
    common = dict(datalist=str(demo), ckpt_dir=str(trained / "models"), num_samples=3, max_items=2)
    _workflow(["inference.json", "tiny.json"], output_dir=str(out1), seed=5, **common)
    _workflow(["inference.json", "tiny.json"], output_dir=str(out2), seed=5, **common)
    items = json.loads(Path(demo).read_text())["test"][:2]
    for it in items:
        name = Path(it["label"]).stem
        d = out1 / name
        orig = Image.open(Path(demo).parent / it["image"])
        mask = np.asarray(Image.open(d / f"{name}_mask.png"))
        unc = np.load(d / f"{name}_uncertainty.npy")
        prob = np.load(d / f"{name}_prob.npy")
        assert mask.shape == unc.shape == prob.shape == (orig.height, orig.width)
        assert set(np.unique(mask)) <= {0, 255}
        assert np.array_equal(mask > 127, prob >= 0.5)  # PNG and array in the same orientation
        assert 0.0 <= prob.min() and prob.max() <= 1.0 and 0.0 <= unc.min() and unc.max() <= 1.0
        assert (d / f"{name}_overlay.png").is_file() and (d / f"{name}_uncertainty.png").is_file()
        # same seed -> identical mean and uncertainty maps
        assert np.array_equal(unc, np.load(out2 / name / f"{name}_uncertainty.npy"))
        assert np.array_equal(prob, np.load(out2 / name / f"{name}_prob.npy"))
    # a different seed gives different samples
    out3 = trained / "infer3"
    _workflow(["inference.json", "tiny.json"], output_dir=str(out3), seed=6, **common)
    name = Path(items[0]["label"]).stem
    assert not np.array_equal(np.load(out3 / name / f"{name}_prob.npy"), np.load(out1 / name / f"{name}_prob.npy"))


def test_inference_single_image_with_text(trained, demo):
    out = trained / "single"
    image = Path(demo).parent / json.loads(Path(demo).read_text())["test"][0]["image"]
    _workflow(["inference.json", "tiny.json"], image=str(image), text="small polyp", output_dir=str(out),
              ckpt_dir=str(trained / "models"), num_samples=2)
    stem = image.stem
    assert (out / stem / f"{stem}_mask.png").is_file() and (out / stem / f"{stem}_uncertainty.npy").is_file()


def test_multi_gpu_train_torchrun_cpu(demo, tmp_path):
    CLI.run(CLI.bundle_run("train.json", "multi_gpu_train.json", "tiny.json", nproc=2, bundle_root=BUNDLE,
                           datalist=demo, output_dir=tmp_path, ckpt_dir=tmp_path / "models", max_epochs=1), timeout=400)
    assert (tmp_path / "models" / "model.pt").is_file()
    state = torch.load(tmp_path / "models" / "model.pt", map_location="cpu", weights_only=False)
    assert not any(k.startswith("module.") for k in state)  # saved unwrapped from DDP
    assert json.loads((tmp_path / "train_metrics.json").read_text())["epochs_completed"] == 1
