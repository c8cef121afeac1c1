"""Decomposed uncertainty maps, image scores, the gate, and the app's scoring and strategies built on them.

Maps: MI = 0 when the passes agree, 0 <= MI <= predictive entropy on random passes, the same maps from MedCLIPSeg's
batched and naive samplers, the inferer's 4-channel output and its split. Scores and gate: hand-made maps and
scores with known answers. App: ``UncertaintyScoring`` (random ``max_images`` sample, worker threads, images/s),
``MostUncertain`` by a chosen score, ``DiverseUncertain``, and the infer task delivering the new maps (a toy bundle
copy that decomposes, in process, with a real folder datastore).
"""

from __future__ import annotations

import base64
import importlib.util
import io
import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from vlseg.bench.gate import bootstrap_ci, gate, gate_columns, gate_rows, spearman, worst_in_top_share
from vlseg.data.transforms import SplitPredUncertaintyd
from vlseg.inferers import StochasticTextInferer, sample_probabilities
from vlseg.scores import SCORES, boundary_discounted_score, compute_scores, edge_band, top_fraction_score
from vlseg.selection import diverse_batch, kmeans, random_subset, thumbnail_embedding
from vlseg.uncertainty import (
    binary_entropy,
    expected_entropy,
    mutual_information,
    pass_std,
    predictive_entropy,
    uncertainty_maps,
)

REPO = Path(__file__).resolve().parents[1]
APP = REPO / "apps" / "vlseg"
sys.path.insert(0, str(APP))


# ------------------------------------------------------------------------------------------------ maps
def test_mi_is_zero_when_all_passes_agree_and_entropy_stays():
    p = torch.rand(2, 1, 8, 8)
    same = p[None].expand(6, -1, -1, -1, -1)
    assert torch.allclose(mutual_information(same), torch.zeros_like(p), atol=1e-6)
    assert torch.allclose(pass_std(same), torch.zeros_like(p), atol=1e-7)
    assert torch.allclose(predictive_entropy(same), binary_entropy(p), atol=1e-6)  # aleatoric part stays
    # passes 0 and 1: the mean is 0.5, each pass is certain -> all of the entropy is disagreement
    split = torch.tensor([[0.0], [1.0]])
    assert mutual_information(split).item() == pytest.approx(1.0, abs=1e-4)
    assert pass_std(split).item() == pytest.approx(0.5)
    # hand value: passes 0.2 and 0.6
    h = lambda q: -(q * math.log(q) + (1 - q) * math.log(1 - q)) / math.log(2)  # noqa: E731
    mi = mutual_information(torch.tensor([[0.2], [0.6]])).item()
    assert mi == pytest.approx(h(0.4) - (h(0.2) + h(0.6)) / 2, rel=1e-4)
    with pytest.raises(ValueError):
        mutual_information(torch.zeros(0, 3))


@pytest.mark.parametrize("seed", range(12))
def test_mi_between_zero_and_predictive_entropy_on_random_passes(seed):
    g = torch.Generator().manual_seed(seed)
    s = int(torch.randint(1, 12, (1,), generator=g))
    logits = torch.randn(s, 2, 1, 9, 7, generator=g) * float(torch.rand(1, generator=g) * 12)  # near 0 / 1 too
    p = torch.sigmoid(logits)
    maps = uncertainty_maps(p)
    mi, total = maps["mutual_information"], maps["uncertainty"]
    assert (mi >= 0).all() and (mi <= total).all() and (total <= 1).all()
    assert (maps["std"] >= 0).all() and (maps["std"] <= 0.5 + 1e-6).all()
    assert torch.allclose(mi, mutual_information(p)) and torch.allclose(total, predictive_entropy(p))
    assert torch.allclose(maps["pred"], p.mean(0))
    # the decomposition: predictive entropy = MI + expected entropy wherever no clamp was needed
    assert torch.allclose(total, mi + expected_entropy(p), atol=2e-5) or (mi == 0).any()


class _DropNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 1, 1)
        self.drop = torch.nn.Dropout(0.5)

    def forward(self, image, text_ids=None, text_mask=None):
        return self.drop(self.conv(image))


def test_inferer_decompose_channels_and_split():
    torch.manual_seed(0)
    net = _DropNet().eval()
    x = torch.randn(2, 3, 8, 8)
    four = StochasticTextInferer(num_samples=6, seed=5, decompose=True)(x, net)
    two = StochasticTextInferer(num_samples=6, seed=5)(x, net)
    assert four.shape == (2, 4, 8, 8) and two.shape == (2, 2, 8, 8)
    assert torch.equal(four[:, :2], two)  # the contract channels do not change
    with torch.random.fork_rng():
        torch.manual_seed(5)
        maps = uncertainty_maps(sample_probabilities(net, x, num_samples=6))
    assert torch.allclose(four[:, 2:3], maps["mutual_information"]) and torch.allclose(four[:, 3:], maps["std"])
    assert (four[:, 2] > 0).any()  # dropout passes disagree somewhere
    d = SplitPredUncertaintyd()({"pred": four[0]})
    assert {k: tuple(v.shape) for k, v in d.items()} == {k: (1, 8, 8) for k in ("pred", "uncertainty",
                                                                              "mutual_information", "std")}
    assert "mutual_information" not in SplitPredUncertaintyd()({"pred": two[0]})
    with pytest.raises(ValueError, match="4"):
        SplitPredUncertaintyd()({"pred": torch.rand(3, 4, 4)})


def test_medclipseg_batched_and_naive_samplers_give_the_same_maps():
    """MedCLIPSeg's tiny config: the fast (batched, chunks of 4 rows) and the naive sampler give the same MI / std
    maps, and the configured inferer returns all four maps."""
    from vlseg.bundles import bundle_context, load_parser
    from vlseg.text import build_tokenizer

    bundle = REPO / "bundles" / "medclipseg"
    with bundle_context(bundle):
        parser = load_parser(bundle, "tiny", overrides={"max_sample_batch": 4, "device": torch.device("cpu")})
        torch.manual_seed(0)
        net = parser.get_parsed_content("network_def").eval()
        inferer = parser.get_parsed_content("inferer")
        ids, mask = build_tokenizer(parser["tokenizer"], parser["context_length"])(["small polyp", "dark cyst in the top"])
        img = torch.randn(2, 3, 40, 40)
        naive = uncertainty_maps(net.sample_probabilities(img, ids, mask, num_samples=5, seed=3, fast=False))
        fast = uncertainty_maps(net.sample_probabilities(img, ids, mask, num_samples=5, seed=3, fast=True))
        out = inferer(img, net, ids, mask)
    for k in naive:
        assert torch.allclose(naive[k], fast[k], atol=1e-4, rtol=0), k
    assert naive["mutual_information"].max() > 1e-4  # variational passes disagree: a real comparison
    assert inferer.decompose and out.shape == (2, 4, 40, 40)
    assert (out[:, 2] <= out[:, 1] + 1e-6).all() and (out[:, 2] > 0).any()


# ------------------------------------------------------------------------------------------------ scores
def test_scores_hand_values_and_boundary_discount():
    u = np.zeros((40, 40), np.float32)
    mask = np.zeros((40, 40), bool)
    mask[10:30, 10:30] = True
    band = edge_band(mask, 2)  # 2 px outside and 2 px inside the edge
    assert band[8, 20] and band[9, 20] and band[10, 20] and band[11, 20]
    assert not band[7, 20] and not band[12, 20] and not band[20, 20] and not band[0, 0]
    assert not edge_band(np.ones((5, 5)), 1).any() and not edge_band(np.zeros((5, 5)), 1).any()
    u[band] = 1.0  # doubt only on the rim: a right answer with a soft outline
    s = compute_scores({"uncertainty": u}, mask=mask)
    assert s["mean"] == pytest.approx(band.mean()) and s["max"] == 1.0
    assert boundary_discounted_score(u, mask, width=2) == 0.0
    # the registered score uses a band of 2 % of the shorter side: 1 px here, so part of the 2 px rim stays
    assert s["boundary"] == pytest.approx(boundary_discounted_score(u, mask, width=1)) and 0 < s["boundary"] < s["mean"] * 2
    u2 = u.copy()
    u2[0:4, 0:4] = 1.0  # plus doubt far from the object
    assert boundary_discounted_score(u2, mask, width=2) == pytest.approx(16 / (~band).sum())
    assert boundary_discounted_score(u2, np.zeros_like(mask)) == pytest.approx(u2.mean())  # no edge: plain mean
    flat = np.zeros(100)
    flat[:5] = 1.0
    assert top_fraction_score(flat, 0.05) == 1.0 and top_fraction_score(flat, 0.1) == 0.5
    # MI scores read the MI map; every registered score is computed when its map is there; pred gives the mask
    maps = {"uncertainty": u2, "mutual_information": u * 0.5, "std": u * 0.25, "pred": mask.astype(np.float32)}
    allv = compute_scores(maps)
    assert set(allv) == set(SCORES) and allv["mi_mean"] == pytest.approx(0.5 * band.mean())
    assert allv["std_mean"] == pytest.approx(0.25 * band.mean()) and allv["boundary"] > 0
    assert set(compute_scores({"uncertainty": u})) == {"mean", "top5", "max"}  # no mask, no MI: those only
    with pytest.raises(KeyError, match="mutual_information"):
        compute_scores({"uncertainty": u}, names=["mi_mean"])
    with pytest.raises(ValueError, match="unknown score"):
        compute_scores({"uncertainty": u}, names=["nope"])
    with pytest.raises(ValueError, match="NaN"):
        compute_scores({"uncertainty": np.full((4, 4), np.nan)})
    with pytest.raises(ValueError, match="shape"):
        boundary_discounted_score(u, mask[:10])


# ------------------------------------------------------------------------------------------------ gate
def test_gate_on_synthetic_scores():
    rng = np.random.default_rng(0)
    dice = rng.uniform(0.2, 0.95, 60)
    err = 1 - dice
    scores = {"oracle": err, "inverse": -err, "noise": rng.uniform(size=60), "noisy": err + rng.normal(0, 0.05, 60)}
    g = gate(scores, dice, n_boot=300, seed=1)
    assert g["oracle"]["spearman"] == pytest.approx(1.0) and g["oracle"]["worst_in_top"] == 1.0
    assert g["inverse"]["spearman"] == pytest.approx(-1.0) and g["inverse"]["worst_in_top"] == 0.0
    assert abs(g["noise"]["spearman"]) < 0.4 and g["noisy"]["spearman"] > 0.7
    lo, hi = g["noisy"]["spearman_ci"]
    assert lo <= g["noisy"]["spearman"] <= hi and hi - lo < 0.5
    assert g["noise"]["spearman_ci"][0] < 0 < g["noise"]["spearman_ci"][1]
    assert gate(scores, dice, n_boot=300, seed=1) == g  # seeded
    assert g["oracle"]["n"] == 60 and g["oracle"]["chance"] == 0.1
    # hand example: 10 images, the worst (index 9) is the top by score -> 1; then it is not -> 0
    e = np.arange(10) / 10.0
    assert worst_in_top_share(np.eye(10)[9], e, 0.1) == 1.0
    assert worst_in_top_share(np.eye(10)[0], e, 0.1) == 0.0
    assert worst_in_top_share(e, e, 0.2) == 1.0
    assert math.isnan(spearman([1, 2], [2, 1])) and math.isnan(spearman([1, 1, 1], [1, 2, 3]))
    assert all(math.isnan(v) for v in bootstrap_ci(spearman, [], []))
    rows = gate_rows("toy (small)", g)
    assert len(rows) == 4 and rows[0][:3] == ["toy (small)", "oracle", 60] and "[" in rows[0][3]
    assert len(gate_columns(0.1)) == len(rows[0]) and "10 %" in gate_columns(0.1)[-1]
    with pytest.raises(ValueError):
        gate({"x": [0.1, 0.2]}, [0.5, 0.6, 0.7])


def test_uncertainty_benchmark_measure_reports_a_gate(monkeypatch, tmp_path):
    """scripts/benchmark_uncertainty.py's measure() on synthetic predictions (no model): gate per score."""
    spec = importlib.util.spec_from_file_location("_t_benchmark_uncertainty", REPO / "scripts" / "benchmark_uncertainty.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    from vlseg.bench.evaluate import Prediction

    rng = np.random.default_rng(0)

    def fake_predict(bm, items, num_samples=None):
        for i, it in enumerate(items):
            label = np.zeros((32, 32), bool)
            label[8:24, 8:24] = True
            prob = np.clip(label * 0.9 + rng.normal(0, 0.1 + 0.05 * i, label.shape), 0, 1)  # later: worse
            unc = binary_entropy(torch.from_numpy(prob)).numpy()
            yield Prediction(it, "polyp", prob, unc, label, {"mutual_information": unc * 0.3, "std": unc * 0.2})

    monkeypatch.setattr(mod, "predict_items", fake_predict)
    items = [{"id": f"img{i}", "image": "x.png"} for i in range(8)]
    r = mod.measure(None, items, 4, 15, 2, gate_boot=50)
    assert set(r["gate"]) == set(SCORES) and r["per_image"]["id"][0] == "img0"
    assert len(r["per_image"]["scores"]["mi_mean"]) == 8 == len(r["per_image"]["dice"])
    assert r["gate"]["mean"]["spearman"] > 0.5  # noisier images are both worse and more uncertain
    json.dumps(r)  # results.json-ready
    from vlseg.bench.report import Report

    rep = Report(tmp_path, "gate")
    rep.table(gate_columns(), gate_rows("toy (small)", r["gate"]))
    text = rep.write().read_text()
    assert "| toy (small) | mi_top5 | 8 |" in text and "worst 10 % in top 10 %" in text


# ------------------------------------------------------------------------------------------------ selection
def test_random_subset_kmeans_and_diverse_batch():
    ids = [f"img{i:02d}" for i in range(20)]
    a = random_subset(ids, 5, seed=0)
    assert a == random_subset(list(reversed(ids)), 5, seed=0) and len(set(a)) == 5
    assert a != ids[:5] and random_subset(ids, 5, seed=1) != a and random_subset(ids, 0) == ids
    x = np.concatenate([np.zeros((10, 3)), np.ones((10, 3)) * 5]) + np.random.default_rng(0).normal(0, 0.1, (20, 3))
    c = kmeans(x, 2, seed=0)
    assert len(set(c[:10])) == 1 and len(set(c[10:])) == 1 and c[0] != c[10]
    emb = {i: list(x[n]) for n, i in enumerate(ids)}
    scores = {i: n / 100 for n, i in enumerate(ids)}  # group 2 holds all of the 10 highest scores
    assert diverse_batch(scores, emb, 2) == ["img19", "img09"]  # top-2 by score would be img19, img18
    e = thumbnail_embedding(np.random.default_rng(0).uniform(0, 255, (30, 20, 3)))
    assert len(e) == 108 and 0.0 <= min(e) <= max(e) <= 1.0
    assert thumbnail_embedding(np.zeros((4, 4))) == [0.0] * 108
    with pytest.raises(ValueError):
        diverse_batch({"a": 1.0, "b": 1.0}, {"a": [0.0], "b": [0.0, 1.0]}, 2)


# ------------------------------------------------------------------------------------------------ app
class _Datastore:
    def __init__(self, folder: Path, n: int):
        from PIL import Image

        self.infos, self.labelled, self.uris = {}, set(), {}
        rng = np.random.default_rng(0)
        for i in range(n):
            image_id = f"img{i:02d}"
            path = folder / f"{image_id}.png"
            Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(path)
            self.infos[image_id], self.uris[image_id] = {}, str(path)

    def get_unlabeled_images(self, *a):
        return [i for i in self.infos if i not in self.labelled]

    def get_image_info(self, image_id):
        return dict(self.infos[image_id])

    def get_image_uri(self, image_id):
        return self.uris[image_id]

    def update_image_info(self, image_id, info):
        self.infos[image_id].update(info)


class _Task:
    """Stands in for TextBundleInferTask: uncertainty = image id number / 100, MI = its square."""

    max_samples, default_prompt, volume_axis = 64, "polyp", 2

    def __init__(self):
        self.calls = []

    def checkpoint(self):
        return {"sha256": "0" * 64}

    def predict(self, path, prompts, ns, seed=None, extra=None):
        from lib.infers.text_bundle import Prediction

        self.calls.append(Path(path).stem)
        v = int(Path(path).stem[3:]) / 100
        m = np.zeros((16, 16), np.uint8)
        m[4:12, 4:12] = 1
        return Prediction("2d", m, np.full((16, 16), v, np.float32),
                          maps={"mutual_information": np.full((16, 16), v * v, np.float32),
                                "std": np.full((16, 16), v / 4, np.float32)})


def test_scoring_samples_at_random_in_threads_and_strategies_use_the_chosen_score(tmp_path):
    from lib.activelearning.diverse import DiverseUncertain
    from lib.activelearning.uncertainty import MostUncertain
    from lib.scoring.uncertainty import EMBEDDING_KEY, UncertaintyScoring

    ds, task = _Datastore(tmp_path, 12), _Task()
    scoring = UncertaintyScoring({"m": task}, "m", num_samples=2, prompts="default", max_images=4, max_workers=2,
                                 score="mi_mean", seed=3)
    r1 = scoring({}, ds)
    first = sorted(r1["scored"])
    assert first == random_subset([f"img{i:02d}" for i in range(12)], 4, seed=3) and first != sorted(ds.infos)[:4]
    assert r1["images_per_s"] > 0 and r1["max_workers"] == 2 and r1["score"] == "mi_mean"
    assert len(r1["not_sampled"]) == 8 and not r1["failed"]
    info = ds.infos[first[0]]
    v = int(first[0][3:]) / 100
    assert info["vlseg_uncertainty_mi_mean"] == pytest.approx(v * v) and info["vlseg_uncertainty_top5"] == pytest.approx(v)
    assert len(info[EMBEDDING_KEY]) == 108 and r1["scored"][first[0]] == pytest.approx(v * v)
    r2 = scoring({}, ds)  # the next run samples among the images not scored yet
    assert not set(r2["scored"]) & set(first) and len(r2["scored"]) == 4 and len(r2["skipped"]) == 4
    scoring({"max_images": 0}, ds)
    assert all("vlseg_uncertainty_mean" in i for i in ds.infos.values())
    with pytest.raises(RuntimeError, match="score"):
        scoring({"score": "nope"}, ds)
    with pytest.raises(ValueError):
        UncertaintyScoring({"m": task}, "m", score="nope")

    top = MostUncertain(score="mi_mean")
    assert top({"strategy": "uncertainty"}, ds)["id"] == "img11"
    assert top({"strategy": "uncertainty", "score": "boundary"}, ds)["score_key"] == "vlseg_uncertainty_boundary"
    with pytest.raises(ValueError, match="unknown score"):
        top({"score": "nope"}, ds)

    # two clearly different image groups: the diverse batch takes the most uncertain image of each
    for n, i in enumerate(sorted(ds.infos)):
        ds.infos[i][EMBEDDING_KEY] = [0.0] * 107 + [0.0 if n % 2 else 1.0]
    div = DiverseUncertain(score="mean", batch_size=2)
    ans = div({"strategy": "diverse"}, ds)
    assert ans["batch"] == ["img11", "img10"] and ans["id"] == "img11"
    ds.infos["img11"]["strategy"] = {"diverse": {"ts": 100}}  # served: the next request serves the other one
    assert div({"strategy": "diverse"}, ds)["id"] == "img10"
    ds.labelled.update({"img11", "img10"})
    assert div({"strategy": "diverse"}, ds)["batch"] == ["img09", "img08"]
    (tmp_path / "e").mkdir()
    empty = _Datastore(tmp_path / "e", 2)
    assert "note" in div({"strategy": "diverse"}, empty)


def _decomposing_toy_bundle(dst: Path) -> Path:
    """The app-test toy bundle with the decomposed outputs switched on (config keys only) and a random checkpoint."""
    shutil.copytree(REPO / "tests" / "data" / "toy_bundle", dst, ignore=shutil.ignore_patterns("*.pt", "__pycache__"))
    inf = json.loads((dst / "configs" / "inference.json").read_text())
    inf["inferer"]["decompose"] = True
    inf["postprocessing"]["transforms"][1]["keys"] = ["pred", "uncertainty", "mutual_information", "std"]
    (dst / "configs" / "inference.json").write_text(json.dumps(inf))
    meta = json.loads((dst / "configs" / "metadata.json").read_text())
    out = meta["network_data_format"]["outputs"]
    out["mutual_information"] = dict(out["uncertainty"], format="mutual information")
    out["std"] = dict(out["uncertainty"], format="standard deviation", value_range=[0, 0.5])
    (dst / "configs" / "metadata.json").write_text(json.dumps(meta))
    from vlseg.bundles import bundle_context

    with bundle_context(dst):
        import scripts.net

        torch.manual_seed(0)
        (dst / "models").mkdir(exist_ok=True)
        torch.save({"model": scripts.net.ToyTextSegNet(channels=8, text_buckets=256, embed_dim=8, dropout=0.2)
                    .state_dict()}, dst / "models" / "model.pt")
    return dst


def _npy(b64: str) -> np.ndarray:
    return np.load(io.BytesIO(base64.b64decode(b64)))


def test_infer_task_stores_and_returns_the_decomposed_maps(tmp_path):
    from PIL import Image

    from lib.datastore import PromptCheckingDatastore
    from lib.infers.text_bundle import TextBundleInferTask

    bundle = _decomposing_toy_bundle(tmp_path / "toy")
    studies = tmp_path / "studies"
    studies.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(studies / "a.png")
    ds = PromptCheckingDatastore(str(studies), extensions=["*.png"], auto_reload=False)
    task = TextBundleInferTask(str(bundle), {}, datastore=ds, label_names={"polyp": 1})
    assert task.map_keys == ("mutual_information", "std")
    req = {"image": str(studies / "a.png"), "vlseg_image_id": "a", "text": "polyp", "num_samples": 4, "seed": 1,
           "uncertainty_inline": True, "device": "cpu"}
    _, info = task(dict(req))
    assert set(info["maps"]) == {"mutual_information", "std"} and set(info["scores"]) == set(SCORES)
    for name, block in info["maps"].items():
        assert block["stored"] and block["tag"] == f"uncertainty_{name}"
        stored = np.asarray(Image.open(ds.get_label_uri("a", block["tag"]))).astype(np.float64) / block["scale"]
        inline = _npy(block["npy_base64"])
        assert stored.shape == inline.shape == (40, 48) and np.abs(stored - inline).max() < 1e-4
    u, mi = _npy(info["uncertainty"]["npy_base64"]), _npy(info["maps"]["mutual_information"]["npy_base64"])
    assert (mi <= u + 1e-4).all() and mi.max() > 0  # dropout passes disagree; MI never above the entropy
    _, only = task(dict(req, uncertainty_maps="std", vlseg_image_id=None))
    assert set(only["maps"]) == {"std"} and not only["maps"]["std"]["stored"]
    with pytest.raises(Exception, match="unknown map"):
        task(dict(req, uncertainty_maps=["entropy"]))
