"""The active-learning simulation protocol (issue 14, parts 4-6): scripts/benchmark_active_learning.py with
vlseg.bench.al_protocol / al_report / al_budget / active.

Unit checks on synthetic curves (AUC, labels to the target, paired bootstrap CIs, regime and target checks), then one
tiny end-to-end run (20 synthetic one-object images, the tiny UA-VLS variant, the app's own classes, in this
process) read by several tests: paired initial sets, rounds <= 5 % of the pool, warm starts, label-word prompts,
and a resumed run that recomputes only what was unfinished."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("_t_benchmark_active_learning",
                                                  REPO / "scripts" / "benchmark_active_learning.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# --------------------------------------------------------------------------------------------- plan and numbers
def test_rounds_add_at_most_5_percent_and_initial_sets_are_paired():
    from vlseg.bench.al_protocol import make_plan, round_counts

    counts = round_counts(800, 10, 5, 50)
    assert counts == list(range(80, 401, 40))
    assert max(np.diff(counts)) <= 0.05 * 800
    with pytest.raises(ValueError, match="at most 5"):
        round_counts(800, 10, 6, 50)
    pool = [{"id": f"im{i:03d}", "image": f"{i}.png", "label": f"{i}_m.png"} for i in range(40)]
    st = {"initial": 10, "step": 5, "max_fraction": 20, "seeds": 3}
    plan = make_plan(st, pool, [], [])
    assert plan["counts"] == [4, 6, 8]
    inits = plan["initial"]
    assert set(inits) == {"0", "1", "2"} and all(len(v) == 4 for v in inits.values())
    assert len({tuple(v) for v in inits.values()}) == 3  # seeds differ ...
    assert make_plan(st, pool, [], [])["initial"] == inits  # ... and are reproducible (one set per seed, every arm)


def test_auc_and_labels_to_reach():
    from vlseg.bench.al_report import curve_auc, labels_to_reach

    assert curve_auc([10, 20, 30], [0.5, 0.5, 0.5]) == pytest.approx(0.5)
    assert curve_auc([0, 10], [0.0, 1.0]) == pytest.approx(0.5)
    assert curve_auc([0, 10, 30], [0.0, 1.0, 1.0]) == pytest.approx((5 + 20) / 30)
    assert labels_to_reach([10, 20, 30], [0.5, 0.7, 0.9], 0.8) == pytest.approx(25.0)
    assert labels_to_reach([10, 20], [0.9, 0.95], 0.8) == 10
    assert labels_to_reach([10, 20], [0.5, 0.6], 0.8) is None  # never reached
    with pytest.raises(ValueError):
        curve_auc([10, 10], [0.1, 0.2])


def test_compare_arms_paired_bootstrap_on_synthetic_curves():
    from vlseg.bench.al_report import compare_arms, target_check

    labels = [80, 120, 160, 200]
    rng = np.random.default_rng(0)
    base = np.array([0.50, 0.60, 0.66, 0.70])
    random_c, unc_c, flat_c = {}, {}, {}
    for s in range(5):
        shift = rng.normal(0, 0.03)  # seed effect shared by the arms of a seed (paired)
        random_c[s] = (base + shift).tolist()
        unc_c[s] = (base + shift + np.array([0.0, 0.06, 0.05, 0.03])).tolist()
        flat_c[s] = (base + shift - np.array([0.0, 0.05, 0.08, 0.12])).tolist()
    target = 0.68
    cmp_ = compare_arms(labels, {"random": random_c, "uncertainty": unc_c, "diverse": flat_c}, target, n_boot=500)
    r, u, d = cmp_["random"], cmp_["uncertainty"], cmp_["diverse"]
    assert u["auc_diff"] > 0 and u["auc_diff_ci"][0] > 0  # the paired difference is exact per seed
    assert d["auc_diff"] < 0 and d["auc_diff_ci"][1] < 0
    assert r["auc_ci"][0] <= r["auc"] <= r["auc_ci"][1]
    mean_r = np.mean(list(random_c.values()), axis=0)
    assert r["labels_needed"] == pytest.approx(160 + 40 * (target - mean_r[2]) / (mean_r[3] - mean_r[2]))
    assert u["labels_needed"] < r["labels_needed"]
    assert u["saving"] == pytest.approx(1 - u["labels_needed"] / r["labels_needed"])
    assert u["saving_ci"][0] <= u["saving"] <= u["saving_ci"][1]
    assert d["labels_needed"] is None and d["saving"] is None  # never reaches the target
    assert d["reached_share"] == 0.0 and r["reached_share"] > 0.5
    check = target_check(cmp_, ["uncertainty", "diverse"], 0.3)
    assert check["best_arm"] == "uncertainty"
    assert check["met"] is (u["saving"] >= 0.3)
    # the target is never reached by the reference: no saving can be stated
    never = compare_arms(labels, {"random": random_c, "uncertainty": unc_c}, 0.99, n_boot=100)
    assert never["random"]["labels_needed"] is None and never["uncertainty"]["saving"] is None
    assert target_check(never, ["uncertainty"])["met"] is False


def test_regime_check_verdict():
    from vlseg.bench.al_report import regime_check

    ok = regime_check([0.40, 0.44], 0.60)
    assert ok["data_limited"] is True and "data-limited" in ok["verdict"]
    bad = regime_check([0.58, 0.56], 0.60)
    assert bad["data_limited"] is False and "NOT data-limited" in bad["verdict"] and "not meaningful" in bad["verdict"]
    assert regime_check([0.3], float("nan"))["data_limited"] is None
    assert regime_check([0.0], 0.0)["data_limited"] is None


def test_report_words_on_synthetic_curves(tmp_path):
    """The report writes "N seeds" and "X % fewer labels", the regime verdict first, and the target check."""
    from vlseg.bench.al_report import compare_arms, regime_check, target_check, write_report
    from vlseg.bench.report import Report

    labels = [80, 120, 160]
    curves = {"random": {s: [0.40, 0.45, 0.60] for s in range(5)},
              "uncertainty": {s: [0.40, 0.75, 0.75 + 0.001 * s] for s in range(5)}}
    cmp_ = compare_arms(labels, curves, 0.95 * 0.62, n_boot=100)
    st = {"word": "polyp", "bundle_name": "uavls", "base_variant": "small", "overrides": {"patience": 5},
          "step": 5.0, "epochs_round": 15, "arms": ["random", "uncertainty"], "scoring_samples": 4,
          "scoring_max_images": 200, "n_boot": 100, "reference": "random"}
    res = {"settings": st, "regime": regime_check([0.40] * 5, 0.62), "gate": {"score": "mi_mean", "samples": 4,
           "table": {}}, "comparison": cmp_, "counts": labels, "target_dice": 0.95 * 0.62, "run_wall_s": 60.0,
           "data": {"name": "toy", "n_pool": 800, "n_val": 100, "n_test": 100},
           "target": target_check(cmp_, ["uncertainty"])}
    rep = Report(tmp_path, "t")
    write_report(rep, res)
    text = rep.write().read_text()
    assert "**5 seeds**" in text and "5 seeds, paired bootstrap" in text
    saving = round(100 * cmp_["uncertainty"]["saving"])
    assert saving >= 30 and f"{saving} % fewer labels than random" in text
    assert text.index("Regime check") < text.index("## Results") and "data-limited" in text
    assert "**Target met** by uncertainty" in text and "`diverse`" not in text


# --------------------------------------------------------------------------------------------- end to end (tiny)
@pytest.fixture(scope="module")
def tiny_pool(tmp_path_factory) -> Path:
    """20 / 3 / 3 one-object images (a bright disc on a dark noisy background, 48 px): every item a "polyp"."""
    from PIL import Image

    root = tmp_path_factory.mktemp("al_pool")
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:48, :48]
    dl = {"name": "tiny AL pool"}
    for split, n in (("training", 20), ("validation", 3), ("test", 3)):
        items = []
        for i in range(n):
            cy, cx, r = rng.integers(12, 36), rng.integers(12, 36), rng.integers(5, 11)
            mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
            img = rng.normal(60, 15, (48, 48, 3)) + mask[..., None] * 120
            ip, mp = root / f"{split}_{i:02d}.png", root / f"{split}_{i:02d}_mask.png"
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(ip)
            Image.fromarray(mask.astype(np.uint8) * 255).save(mp)
            items.append({"id": f"{split[:2]}{i:02d}", "image": str(ip), "label": str(mp),
                          "text": "a polyp described by a caption that must not be used"})
        dl[split] = items
    (root / "datalist.json").write_text(json.dumps(dl))
    return root / "datalist.json"


def _argv(pool: Path, work: Path, out: Path, *extra) -> list[str]:
    return ["--quick", "--datalist", str(pool), "--work-dir", str(work), "--out", str(out), "--arms", "random",
            "uncertainty", "--seeds", "2", "--max-fraction", "30", "--max-test", "3", "--max-val", "3",
            "--n-boot", "200", "--gate-boot", "50", "--scoring-max-images", "8", *extra]


@pytest.fixture(scope="module")
def al_run(tiny_pool, tmp_path_factory):
    work, out = tmp_path_factory.mktemp("al_work"), tmp_path_factory.mktemp("al_out")
    assert _script().main(_argv(tiny_pool, work, out)) == 0
    return work, out


@pytest.mark.slow
def test_protocol_end_to_end(al_run):
    from vlseg.bench.al_protocol import curve_records, read_json

    work, out = al_run
    plan = read_json(work / "plan.json")
    assert plan["counts"] == [4, 5, 6] and len(plan["pool"]) == 20
    assert max(np.diff(plan["counts"])) <= 0.05 * 20  # rounds add <= 5 % of the pool
    res = json.loads((out / "results.json").read_text())
    assert res["failed_jobs"] == {}
    assert res["gate"]["split"] == "validation" and res["gate"]["score"] in res["gate"]["table"]
    assert res["regime"]["data_limited"] in (True, False, None) and "verdict" in res["regime"]
    for seed in (0, 1):
        init = read_json(work / "init" / str(seed) / "record.json")
        assert init["labeled"] == plan["initial"][str(seed)] and init["warm_start"] is False
        for arm in ("random", "uncertainty"):
            recs = curve_records(work, f"curve:{arm}:{seed}")
            # paired: round 1 of every arm starts from the seed's initial set and its round-0 checkpoint
            assert set(plan["initial"][str(seed)]) < set(recs[1]["labeled"])
            assert recs[1]["start_sha256"] == init["checkpoint_sha256"]
            # warm start: each round fine-tunes the previous round's checkpoint, and writes a new one
            assert recs[2]["start_sha256"] == recs[1]["checkpoint_sha256"]
            assert all(recs[k]["warm_start"] and recs[k]["checkpoint_sha256"] != recs[k]["start_sha256"] for k in (1, 2))
            assert [len(recs[k]["added"]) for k in (1, 2)] == [1, 1]
        assert curve_records(work, f"curve:uncertainty:{seed}")[1]["scored"] == 8  # the app scored 8 of the pool
    report = (out / "report.md").read_text()
    assert "2 seeds" in report and "Regime check" in report and "fewer labels" in report
    assert (out / "active_learning.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_prompts_are_the_label_word(al_run):
    work, _ = al_run
    store = json.loads((work / "curve" / "uncertainty" / "0" / "studies" / "datastore_v2.json").read_text())
    labels = [o["labels"]["final"]["info"]["text"] for o in store["objects"].values() if "final" in o.get("labels", {})]
    scored = [o["image"]["info"]["vlseg_uncertainty_prompts"] for o in store["objects"].values()
              if "vlseg_uncertainty_prompts" in o["image"]["info"]]
    assert len(labels) == 6 and set(labels) == {"polyp"}
    assert scored and all(p == ["polyp"] for p in scored)
    # round 2 ranked only scores of round 1's checkpoint: earlier rounds' scores were dropped before scoring
    r1 = json.loads((work / "curve" / "uncertainty" / "0" / "r1.json").read_text())
    ckpts = {o["image"]["info"].get("vlseg_uncertainty_checkpoint") for o in store["objects"].values()
             if "vlseg_uncertainty_checkpoint" in o["image"]["info"]}
    assert ckpts == {r1["checkpoint_sha256"]} and len(scored) == 8


def test_warm_start_loads_the_previous_checkpoint(tiny_pool, tmp_path):
    """The app's train task fine-tunes the bundle's models/model.pt: with the learning rate then set to 0, the next
    training's weights are exactly the previous checkpoint's (a fresh initialisation would differ from them)."""
    import torch

    from vlseg.bench.active import AppPool
    from vlseg.bench.al_protocol import VARIANT, prepare_bundle

    items = {f"tr{i:02d}": it for i, it in enumerate(json.loads(tiny_pool.read_text())["training"][:6])}
    over = {"patience": 1, "min_epochs": 1, "progress_bar": False, "num_workers": 0, "learning_rate": 0.01}
    bundle = prepare_bundle(REPO / "bundles" / "uavls", tmp_path / "bundle", "tiny", over)
    pool = AppPool(items, list(items)[:4], tmp_path / "studies", bundle, VARIANT, "polyp")
    first = pool.train(1, tmp_path / "train")
    assert first["warm_start"] is False and first["checkpoint_sha256"]

    def params():
        sd = torch.load(str(pool.checkpoint), map_location="cpu", weights_only=False)
        sd = sd.get("model", sd) if isinstance(sd, dict) else sd
        return {k: v.clone() for k, v in sd.items() if v.dtype.is_floating_point and "running_" not in k}

    trained = params()
    conf = bundle / "configs" / f"{VARIANT}.json"
    conf.write_text(json.dumps({**json.loads(conf.read_text()), "learning_rate": 0.0}))
    second = pool.train(1, tmp_path / "train")
    assert second["warm_start"] is True and second["start_sha256"] == first["checkpoint_sha256"]
    assert second["checkpoint_sha256"] != first["checkpoint_sha256"]  # a new file was written ...
    again = params()
    assert again.keys() == trained.keys()
    assert all(torch.equal(again[k], trained[k]) for k in trained)  # ... holding the loaded weights


@pytest.mark.slow
def test_killed_run_continues_without_recomputing(tiny_pool, tmp_path, capsys, monkeypatch):
    from vlseg.bench import active
    from vlseg.bench.al_protocol import curve_records

    work, out = tmp_path / "work", tmp_path / "out"
    argv = ["--quick", "--datalist", str(tiny_pool), "--work-dir", str(work), "--out", str(out), "--arms", "random",
            "--seeds", "1", "--max-fraction", "30", "--max-test", "2", "--max-val", "2", "--n-boot", "50",
            "--score", "top5"]
    real_train = active.AppPool.train

    def killed_in_round_2(self, *a, **k):
        if "curve" in str(self.bundle) and len(self.labeled()) == 6:
            self.checkpoint.write_bytes(b"half-written")  # the training died while saving
            raise KeyboardInterrupt("killed")
        return real_train(self, *a, **k)

    monkeypatch.setattr(active.AppPool, "train", killed_in_round_2)
    with pytest.raises(KeyboardInterrupt):
        _script().main(argv)
    d = work / "curve" / "random" / "0"
    assert (d / "r1.json").is_file() and not (d / "r2.json").exists()
    stamps = {p: p.stat().st_mtime_ns for p in (d / "r1.json", work / "full" / "record.json",
                                                 work / "init" / "0" / "record.json")}
    monkeypatch.setattr(active.AppPool, "train", real_train)
    capsys.readouterr()
    assert _script().main(argv) == 0
    logged = capsys.readouterr().out
    assert "resuming after round 1" in logged and "curve:random:0 round 2" in logged
    assert "curve:random:0 round 1:" not in logged and "full:" not in logged and "init:0:" not in logged
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())  # finished work was not redone
    recs = curve_records(work, "curve:random:0")
    assert recs[2]["start_sha256"] == recs[1]["checkpoint_sha256"] and len(recs[2]["labeled"]) == 6


def test_budget_refuses_a_plan_that_does_not_fit(tiny_pool, tmp_path, capsys):
    argv = ["--quick", "--datalist", str(tiny_pool), "--work-dir", str(tmp_path / "w"), "--out", str(tmp_path / "o"),
            "--budget-minutes", "0.01"]
    assert _script().main(argv) == 3
    text = capsys.readouterr().out
    assert "REFUSED" in text and "estimate" in text and "per training step" in text
    assert not (tmp_path / "w" / "full").exists()  # nothing ran
    assert _script().main(argv[:-2] + ["--plan-only"]) == 0
