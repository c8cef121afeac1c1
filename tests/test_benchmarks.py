"""The benchmark family (issue 7): every part's ``--quick`` mode through ``scripts/benchmark_all.py`` on a tiny demo
set, plus unit checks of the measuring helpers. The full benchmarks are not part of the test run."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PARTS = ("speed", "accuracy", "prompts", "uncertainty", "active_learning")


def _bundle_names() -> list[str]:
    from vlseg.bundles import find_bundles

    return [b.name for b in find_bundles(REPO / "bundles") if (b / "configs" / "tiny.json").is_file()
            and (b / "configs" / "train.json").is_file()]


# ------------------------------------------------------------------------------------------------- unit checks
def test_monai_unet_parameter_count_matches_hand_count():
    """The speed table's parameter column against a count from the architecture (convs + PReLUs, affine-free norms)."""
    from vlseg.bench.peers import build_peer
    from vlseg.nets.common import count_parameters

    def conv(i, o, k):
        return i * o * k * k + o

    n = 0
    for ci, co in [(3, 16), (16, 32), (32, 64), (64, 128)]:  # strided residual units: 2 convs + PReLUs + 3x3 residual
        n += conv(ci, co, 3) + 1 + conv(co, co, 3) + 1 + conv(ci, co, 3)
    n += conv(128, 256, 3) + 1 + conv(256, 256, 3) + 1 + conv(128, 256, 1)  # bottom: 1x1 residual
    for ci, co, last in [(384, 64, 0), (128, 32, 0), (64, 16, 0), (32, 1, 1)]:  # transposed conv + PReLU + conv (+ PReLU)
        n += ci * co * 9 + co + 1 + conv(co, co, 3) + (0 if last else 1)
    assert n == 1_625_420
    assert count_parameters(build_peer("monai_unet")) == {"total": n, "trainable": n, "frozen": 0}


def test_timing_helpers():
    from vlseg.bench.speed import matmul_gflops, peak_rss_mib, time_calls

    mm = matmul_gflops(256, repeats=2)
    assert mm["best_gflops"] > 0 and mm["best_gflops"] >= mm["median_gflops"] * 0.999
    r = time_calls(lambda: sum(range(1000)), repeats=5)
    assert r["n"] == 5 and 0 <= r["q1_s"] <= r["median_s"] <= r["q3_s"] and r["iqr_s"] >= 0
    import time

    skipped = time_calls(lambda: time.sleep(0.05), repeats=10, min_repeats=3, max_seconds=0.1)
    assert "skipped" in skipped and "guard" in skipped["skipped"]
    assert peak_rss_mib() > 10


def test_memory_guard_skips_what_would_not_fit():
    from vlseg.bench.speed import available_mib, memory_guard

    avail = available_mib()
    assert avail is not None and avail > 0
    assert memory_guard(None, 8) is None and memory_guard(1.0, 8) is None  # no estimate yet / tiny
    why = memory_guard(avail / 4, 8)  # 8 images at a quarter of the free memory each: twice what is free
    assert why and "predicted peak memory" in why and "8 x" in why
    assert memory_guard(avail / 40, 8) is None and memory_guard(avail / 40, 8, factor=5.0)  # training: x factor


def _script(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"_t_{name}", REPO / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_fraction_needed_interpolates():
    from vlseg.bench.al_report import labels_to_reach

    assert labels_to_reach([10, 20, 30], [0.5, 0.7, 0.9], 0.8) == pytest.approx(25.0)
    assert labels_to_reach([10, 20], [0.9, 0.95], 0.8) == 10
    assert labels_to_reach([10, 20], [0.5, 0.6], 0.8) is None


def test_summary_merges_runs_part_by_part(tmp_path):
    """A report assembled in several runs keeps every part; a run whose parts were all re-run drops out of the total."""
    ba = _script("benchmark_all")
    path = tmp_path / "summary.json"

    def run(rid, parts, wall, quick=False):
        summary = ba.merge_summary(path, {p: {"rc": 0, "error": None, "seconds": wall} for p in parts},
                                   {"id": rid, "command": f"cmd {rid}", "parts": parts, "wall_seconds": wall,
                                    "finished": rid}, quick, {})
        path.write_text(json.dumps(summary))
        return summary

    run("a", ["speed"], 100.0)
    s = run("b", ["accuracy", "prompts"], 50.0)
    assert set(s["parts"]) == {"speed", "accuracy", "prompts"} and s["total_seconds"] == 150.0
    s = run("c", ["speed"], 70.0)  # speed re-run: run a no longer backs any part
    assert [r["id"] for r in s["runs"]] == ["b", "c"] and s["parts"]["speed"]["run"] == "c" and s["total_seconds"] == 120.0
    s = run("d", ["speed"], 5.0, quick=True)  # a smoke test never mixes with evidence
    assert list(s["parts"]) == ["speed"] and s["total_seconds"] == 5.0
    ba.write_index(tmp_path, s)
    assert "--quick" in (tmp_path / "README.md").read_text()


def test_bundle_docs_take_their_numbers_from_the_reports(tmp_path):
    """vlseg.bench.docs rewrites only the marked block, with the numbers of results.json, and is idempotent."""
    from vlseg.bench.docs import END, START, update_bundle_docs

    rep = tmp_path / "reports"
    for part, res in {
        "speed": {"matmul_peak_gflops": 100.0, "cases": [
            {"label": "toy (small)", "input_size": [224, 224], "params": {"total": 1000, "trainable": 10}, "flops_b1": 2.5e9,
             "latency": {"1": {"median_s": 0.125}, "8": {"skipped": "guard", "warmup_s": 99.0}}, "train": {"images_per_s": 3.5}},
            {"label": "monai_unet", "params": {"total": 1, "trainable": 1}, "latency": {"1": {"median_s": 0.025}}}]},
        "accuracy": {"settings": {"budget_seconds": 450.0, "budget_clock": "process", "threads": 1, "variant": "small"},
                     "data": {"name": "Kvasir-SEG", "n_test": 100},
                     "models": [{"name": "toy", "fraction": 100, "n_train": 800, "epochs": 7,
                                 "test": {"dice": 0.8123, "iou": 0.7, "nsd": 0.6}},
                                {"name": "toy", "fraction": 10, "n_train": 80, "epochs": 30,
                                 "test": {"dice": 0.5012, "iou": 0.4, "nsd": 0.3}},
                                {"name": "monai_basicunet", "fraction": 100, "n_train": 800, "epochs": 3,
                                 "test": {"dice": 0.4567, "iou": 0.3, "nsd": 0.2}}]},
        "prompts": {"keys": ["p1", "p9"], "models": {"toy (small)": {"dice": {"p1": 0.7011, "p9": 0.8022}}}},
        "uncertainty": {"models": {"toy (small)": {"samples": 8, "ece": 0.01234, "auroc_error": 0.8766,
                                                   "region_mean": {"boundary": 0.2, "interior": 0.05, "background": 0.001},
                                                   "image_spearman_uncertainty_vs_error": 0.4321}}},
        "active_learning": {"settings": {"bundle": "toy", "budget_seconds": 150.0, "budget_clock": "process", "seeds": 3},
                            "full_data_dice": 0.75, "fraction_needed_uncertainty": 22.5, "fraction_needed_random": None,
                            "steps": [10.0, 20.0, 30.0]},
    }.items():
        (rep / part).mkdir(parents=True)
        (rep / part / "results.json").write_text(json.dumps(res))
    doc = tmp_path / "bundles" / "toy" / "docs" / "README.md"
    doc.parent.mkdir(parents=True)
    doc.write_text(f"# toy\n\nkept above\n\n{START}\nold 0.999\n{END}\n\nkept below\n")
    assert update_bundle_docs(rep, tmp_path / "bundles") == [doc]
    text = doc.read_text()
    assert text.startswith("# toy\n\nkept above\n") and text.endswith(f"{END}\n\nkept below\n") and "0.999" not in text
    for expected in ("| small | 224x224 | 1,000 | 10 | 2.50 | 125 | skipped (one pass 99 s) | 5.0x | 3.50 |",
                     "**450 CPU s (process clock)**", "| 100 % | 800 | 0.812 |", "| 10 % | 80 | 0.501 |",
                     "| MONAI BasicUNet, 100 % (text-blind) | 800 | 0.457 |", "| small | 0.701 | 0.802 |",
                     "| small | 8 | 0.0123 | 0.877 | 0.2000 | 0.0500 | 0.0010 | 0.432 |",
                     "reached at 22.5 % labelled", "at not reached by 30 % with random selection"):
        assert expected in text, expected
    assert update_bundle_docs(rep, tmp_path / "bundles") == []  # idempotent


def test_committed_report_and_bundle_docs_agree():
    """The committed reports/ is real evidence (not a --quick run), its index links every part it lists, and every
    bundle doc's benchmark block is exactly what vlseg.bench.docs builds from it (no stale or hand-typed numbers)."""
    from vlseg.bench.docs import END, START, bundle_block

    rep = REPO / "reports"
    if not (rep / "summary.json").is_file():
        pytest.skip("no committed benchmark report")
    summary = json.loads((rep / "summary.json").read_text())
    assert summary["quick"] is False and summary["runs"]
    index = (rep / "README.md").read_text()
    assert "](reports/README.md)" in (REPO / "README.md").read_text()  # the project README links the report
    for part, st in summary["parts"].items():
        assert (rep / part / "report.md").is_file() and f"]({part}/report.md)" in index, part
        assert any(r["id"] == st["run"] for r in summary["runs"]), part
    for doc in sorted((REPO / "bundles").glob("*/docs/README.md")):
        text = doc.read_text()
        assert START in text and END in text, f"{doc}: no benchmark-report block"
        block = text.split(START, 1)[1].split(END, 1)[0]
        assert block == "\n" + bundle_block(doc.parent.parent.name, rep), f"{doc}: run python -m vlseg.bench.docs"


def test_report_table_and_formatting(tmp_path):
    from vlseg.bench.report import Report, fmt

    assert fmt(1234567) == "1,234,567" and fmt(0.12345) == "0.123" and fmt(float("nan")) == "n/a" and fmt(None) == "-"
    rep = Report(tmp_path, "t")
    rep.table(["a", "b"], [["x|y", 0.5]])
    text = rep.write().read_text()
    assert "| x\\|y | 0.500 |" in text and json.loads((tmp_path / "results.json").read_text())["title"] == "t"


# ------------------------------------------------------------------------------------------------- quick runs
@pytest.fixture(scope="module")
def bench_demo(tmp_path_factory) -> Path:
    """A tiny demo set (no volumes: conftest's ``tiny_demo`` asks for 4-slice volumes the generator can refuse)."""
    from vlseg.data.demo import generate_demo_dataset

    root = tmp_path_factory.mktemp("bench_demo")
    generate_demo_dataset(root, seed=0, n_images=(6, 2, 2), image_size=64, n_volumes=0)
    return root / "datalist.json"


@pytest.fixture(scope="module")
def quick_reports(bench_demo, tmp_path_factory) -> Path:
    if not _bundle_names():
        pytest.skip("no bundle with configs/tiny.json and configs/train.json yet")
    out = tmp_path_factory.mktemp("reports")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", MPLBACKEND="Agg",
               VLSEG_BENCH_CACHE=str(tmp_path_factory.mktemp("bench_cache")))
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "benchmark_all.py"), "--quick", "--concurrent",
                           "--out", str(out), "--datalist", str(bench_demo)], cwd=REPO, env=env, capture_output=True, text=True, timeout=1500)
    (out / "pytest_log.txt").write_text(proc.stdout + "\n" + proc.stderr)
    assert proc.returncode == 0, f"benchmark_all --quick failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return out


def _results(out: Path, part: str) -> dict:
    d = out / part
    assert (d / "report.md").is_file(), f"{part}: no report.md"
    pngs = sorted(d.glob("*.png"))
    assert pngs, f"{part}: no PNG plot"
    for p in pngs:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 1000
    text = (d / "report.md").read_text()
    for p in pngs:
        assert f"]({p.name})" in text, f"{part}: {p.name} not linked from report.md"
    return json.loads((d / "results.json").read_text())


@pytest.mark.slow
def test_index_links_every_part(quick_reports):
    index = (quick_reports / "README.md").read_text()
    summary = json.loads((quick_reports / "summary.json").read_text())
    assert summary["total_seconds"] > 0 and "Wall time of those runs" in index
    for part in PARTS:
        assert f"]({part}/report.md)" in index
        assert summary["parts"][part]["rc"] == 0
    # --concurrent: the training parts ran in branches with one thread and CPU-second budgets
    for part in ("accuracy", "active_learning"):
        res = json.loads((quick_reports / part / "results.json").read_text())
        assert res["settings"]["budget_clock"] == "process" and res["settings"]["threads"] == 1
        text = (quick_reports / part / "report.md").read_text()
        assert "--concurrent" in text and "--status-file" not in text  # "Reproduce:" names the command the user ran


@pytest.mark.slow
def test_speed_quick_numbers_are_sane(quick_reports):
    res = _results(quick_reports, "speed")
    assert res["matmul_peak_gflops"] > 0
    cases = {c["label"]: c for c in res["cases"]}
    unet = cases["monai_unet"]
    assert unet["params"]["total"] == 1_625_420
    for name in _bundle_names():
        c = cases[f"{name} (tiny)"]
        assert "error" not in c, c.get("error")
        assert c["params"]["total"] >= c["params"]["trainable"] > 0
        assert c["flops_b1"] > 0
        assert c["latency"]["1"]["median_s"] > 0 and c["latency"]["1"]["iqr_s"] >= 0
        assert c["rss_model_mib"] > 0 and c["train"]["images_per_s"] > 0
    for s in res.get("sampling", []):  # MedCLIPSeg: naive and fast sampling give the same maps for the same seed
        assert s.get("same_output") is True, s


@pytest.mark.slow
def test_accuracy_quick_trains_every_bundle_and_the_baseline(quick_reports):
    res = _results(quick_reports, "accuracy")
    full = {m["name"]: m for m in res["models"] if m["fraction"] == 100}
    assert set(_bundle_names()) | {"monai_basicunet"} <= set(full)
    for name, m in full.items():
        assert "error" not in m, m.get("error")
        assert Path(m["checkpoint"]).is_file()
        if name != "monai_basicunet":
            assert m["overrides"]["max_train_clock"] == "process" and m["overrides"]["num_workers"] == 0
        for k in ("dice", "iou", "nsd"):
            assert 0.0 <= m["test"][k] <= 1.0
    assert any(m["fraction"] < 100 for m in res["models"])  # data efficiency


@pytest.mark.slow
def test_prompts_quick_covers_levels_and_variants(quick_reports):
    res = _results(quick_reports, "prompts")
    assert {"p1", "p9", "original", "contradictory"} <= set(res["keys"])
    assert res["models"]
    for lab, r in res["models"].items():
        assert all(0.0 <= v <= 1.0 for v in r["dice"].values())
    blind = next(r for lab, r in res["models"].items() if lab.startswith("monai_basicunet"))
    assert len({round(v, 9) for v in blind["dice"].values()}) == 1  # the text-blind baseline ignores the prompt


@pytest.mark.slow
def test_uncertainty_quick_metrics_in_range(quick_reports):
    res = _results(quick_reports, "uncertainty")
    assert set(_bundle_names()) == {lab.split(" ")[0] for lab in res["models"]}
    for r in res["models"].values():
        assert 0.0 <= r["ece"] <= 1.0
        assert math.isnan(r["auroc_error"]) or 0.0 <= r["auroc_error"] <= 1.0
        assert r["n_pixels"] > 0


@pytest.mark.slow
def test_active_learning_quick_uses_the_app_strategy(quick_reports):
    res = _results(quick_reports, "active_learning")
    assert res["failed_jobs"] == {}, res["failed_jobs"]
    arms = res["settings"]["arms"]
    assert set(arms) == {"random", "uncertainty", "diverse"} and res["settings"]["word"] == "polyp"
    assert res["gate"]["split"] == "validation" and res["gate"]["score"]
    for arm in arms:
        first = res["rounds"][f"{arm}:0"]["1"]
        assert first["warm_start"] is True and len(first["added"]) >= 1
        if arm != "random":
            assert first["scored"] > 0  # the app's scoring ran on the unlabelled pool
    assert res["full_data_dice"] is not None and "verdict" in res["regime"]
    assert set(res["comparison"]) == set(arms)


def test_subsets_and_item_keys(bench_demo):
    from vlseg.bench.active import item_key
    from vlseg.bench.data import resolve_data, subset_items

    data = resolve_data(bench_demo)
    train = data.items("training")
    half = subset_items(data, "training", 50)
    assert 0 < len(half) < len(train) and half == subset_items(data, "training", 50)  # seeded, by image
    assert {it["image_id"] for it in half} < {it["image_id"] for it in train}
    assert subset_items(data, "training", 100) == train
    keys = [item_key(it, i) for i, it in enumerate(train)]
    assert len(set(keys)) == len(keys) and all(k.replace("_", "").replace("-", "").isalnum() for k in keys)
    assert {"p1", "p9", "original", "contradictory"} <= set(data.prompt_keys("test"))
