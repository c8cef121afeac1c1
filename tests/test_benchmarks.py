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


def test_fraction_needed_interpolates():
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import importlib

        al = importlib.import_module("benchmark_active_learning")
    finally:
        sys.path.remove(str(REPO / "scripts"))
    assert al.fraction_needed([10, 20, 30], [0.5, 0.7, 0.9], 0.8) == pytest.approx(25.0)
    assert al.fraction_needed([10, 20], [0.9, 0.95], 0.8) == 10
    assert al.fraction_needed([10, 20], [0.5, 0.6], 0.8) is None


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
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "benchmark_all.py"), "--quick", "--out", str(out),
                           "--datalist", str(bench_demo)], cwd=REPO, env=env, capture_output=True, text=True, timeout=1500)
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
    assert summary["total_seconds"] > 0 and "Total wall time" in index
    for part in PARTS:
        assert f"]({part}/report.md)" in index
        assert summary["parts"][part]["rc"] == 0


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
    assert res["app_error"] is None, res["app_error"]
    unc = res["curves"]["uncertainty (app strategy)"]
    assert [p["n_labeled"] for p in unc] == res["counts"]
    assert unc[0]["scored"] > 0  # the app's scoring ran on the unlabelled pool
    assert any(k.startswith("random") for k in res["curves"])
    assert res["full_data_dice"] is not None


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
