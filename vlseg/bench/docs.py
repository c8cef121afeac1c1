"""Copy the benchmark report's numbers into each bundle's ``docs/README.md``.

Every bundle doc has a block between ``<!-- benchmark-report:start -->`` and ``<!-- benchmark-report:end -->``;
this module rewrites it from ``reports/<part>/results.json`` (speed, accuracy, prompts, uncertainty, active
learning), so the numbers a bundle's docs state are the numbers of the last report run, never typed by hand.
``scripts/benchmark_all.py`` calls it after every non-quick run; by hand::

    python -m vlseg.bench.docs [--reports reports] [--bundles-dir bundles]
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path
from typing import Any

from vlseg.bench.cli import budget_unit
from vlseg.bench.report import fmt, repo_root

__all__ = ["START", "END", "bundle_block", "update_bundle_docs"]

START = "<!-- benchmark-report:start -->"
END = "<!-- benchmark-report:end -->"


def _load(reports: Path, part: str) -> dict:
    path = reports / part / "results.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _ms(lat: dict | None) -> str:
    if not lat:
        return "-"
    if "median_s" in lat:
        return f"{1e3 * lat['median_s']:.0f}"
    if "warmup_s" in lat:
        return f"skipped (one pass {lat['warmup_s']:.0f} s)"
    return "skipped"


def _num(x: Any, digits: int = 3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else fmt(x, digits)


def _table(headers: list[str], rows: list[list[Any]]) -> list[str]:
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(str(c).replace("|", "\\|") for c in r) + " |" for r in rows]
    return out


def _speed_lines(name: str, speed: dict) -> list[str]:
    cases = [c for c in speed.get("cases", []) if c.get("label", "").startswith(f"{name} (") and "error" not in c]
    if not cases:
        return []
    ref = next((c for c in speed.get("cases", []) if c.get("label") == "monai_unet" and "error" not in c), None)
    ref_lat = ((ref or {}).get("latency") or {}).get("1", {}).get("median_s")
    rows = []
    for c in cases:
        lat = c.get("latency") or {}
        b1 = lat.get("1", {}).get("median_s")
        tr = c.get("train") or {}
        rows.append([c["label"].split("(")[-1].rstrip(")"), "x".join(map(str, c.get("input_size", []))),
                     fmt(c["params"]["total"]), fmt(c["params"]["trainable"]),
                     _num(c["flops_b1"] / 1e9, 2) if c.get("flops_b1") else "-", _ms(lat.get("1")), _ms(lat.get("8")),
                     _num(b1 / ref_lat, 1) + "x" if b1 and ref_lat else "-",
                     _num(tr.get("images_per_s"), 2) if "images_per_s" in tr else "skipped"])
    lines = ["**Speed and size** (CPU, random weights; "
             f"matmul peak of the machine {speed.get('matmul_peak_gflops', 0):.0f} GFLOP/s; [speed report](../../../reports/speed/report.md)):", ""]
    lines += _table(["variant", "input", "params", "trainable", "GFLOPs (batch 1)", "latency b1 ms (median)",
                     "latency b8 ms", "x MONAI UNet (b1)", "training img/s (b8)"], rows)
    samp = [s for s in speed.get("sampling", []) if name == "medclipseg" and "speedup" in s]
    lines += [""] if samp else []
    for s in samp:
        lines += [f"- {s['passes']}-pass sampling, `{s['variant']}`: naive {1e3 * s['naive']['median_s']:.0f} ms, fast "
                      f"{1e3 * s['fast']['median_s']:.0f} ms -> **{s['speedup']:.2f}x**, "
                  f"{'same maps' if s.get('same_output') else 'maps DIFFER'} "
                      f"(max abs difference {s['max_abs_diff_samples']:.1e})."]
    return lines + [""]


def _accuracy_lines(name: str, acc: dict) -> list[str]:
    models = acc.get("models", [])
    mine = [m for m in models if m.get("name") == name]
    if not mine:
        return []
    st = acc.get("settings", {})
    clock = "CPU s (process clock)" if st.get("budget_clock") == "process" else "s of wall clock"
    data = acc.get("data", {})
    base = next((m for m in models if m.get("name") == "monai_basicunet" and "test" in m), None)
    rows = []
    for m in sorted(mine, key=lambda m: -m.get("fraction", 100)):
        if "test" not in m:
            rows.append([f"{m.get('fraction')} %", m.get("n_train", "-"), "failed", "-", "-", "-"])
            continue
        t = m["test"]
        rows.append([f"{m['fraction']} %", m.get("n_train", "-"), f"{t['dice']:.3f}", f"{t['iou']:.3f}", f"{t['nsd']:.3f}",
                     m.get("epochs", "-")])
    if base:
        t = base["test"]
        rows.append(["MONAI BasicUNet, 100 % (text-blind)", base.get("n_train", "-"), f"{t['dice']:.3f}", f"{t['iou']:.3f}",
                     f"{t['nsd']:.3f}", base.get("epochs", "-")])
    lines = [f"**Accuracy** on {data.get('name', '?')} ({data.get('n_test', '?')} test images, 224x224), variant "
             f"`{st.get('variant')}` trained from random initialisation for **{_num(st.get('budget_seconds'), 0)} {clock}** "
             f"per model ({st.get('threads') or 'default'} thread(s)); [accuracy report](../../../reports/accuracy/report.md):", ""]
    return lines + _table(["training data", "items", "Dice", "IoU", "NSD (2 px)", "epochs"], rows) + [""]


def _prompt_lines(name: str, prompts: dict) -> list[str]:
    res = {lab: r for lab, r in (prompts.get("models") or {}).items() if lab.startswith(f"{name} (")}
    keys = prompts.get("keys", [])
    if not res or not keys:
        return []
    lines = ["**Prompt robustness** (test Dice per prompt; [prompts report](../../../reports/prompts/report.md)):", ""]
    rows = [[lab.split("(")[-1].rstrip(")")] + [_num(r["dice"].get(k)) for k in keys] for lab, r in res.items()]
    return lines + _table(["variant"] + keys, rows) + [""]


def _uncertainty_lines(name: str, unc: dict) -> list[str]:
    res = {lab: r for lab, r in (unc.get("models") or {}).items() if lab.startswith(f"{name} (")}
    if not res:
        return []
    rows = []
    for lab, r in res.items():
        reg = r.get("region_mean", {})
        rows.append([lab.split("(")[-1].rstrip(")"), r.get("samples"), _num(r.get("ece"), 4), _num(r.get("auroc_error")),
                     _num(reg.get("boundary"), 4), _num(reg.get("interior"), 4), _num(reg.get("background"), 4),
                     _num(r.get("image_spearman_uncertainty_vs_error"))])
    lines = ["**Uncertainty** (test split; [uncertainty report](../../../reports/uncertainty/report.md)):", ""]
    return lines + _table(["variant", "passes", "ECE", "AUROC (uncertainty -> pixel error)", "mean unc. boundary",
                           "interior", "background", "Spearman (image unc. vs 1 - Dice)"], rows) + [""]


def _al_lines(name: str, al: dict) -> list[str]:
    st = al.get("settings", {})
    if st.get("bundle") != name:
        return []
    u, r = al.get("fraction_needed_uncertainty"), al.get("fraction_needed_random")

    def pct(v):
        return f"{v:.1f} %" if v is not None else f"not reached by {al.get('steps', [0])[-1]:g} %"

    clock = budget_unit(st.get("budget_clock", "wall"))
    return [f"**Active learning** with the app's uncertainty strategy ({_num(st.get('budget_seconds'), 0)} {clock} per "
            f"round; [active-learning report](../../../reports/active_learning/report.md)): 95 % of the full-data Dice "
            f"({_num(al.get('full_data_dice'))}) is reached at {pct(u)} labelled with the uncertainty strategy and at "
            f"{pct(r)} with random selection (mean of {st.get('seeds')} seeds).", ""]


def bundle_block(name: str, reports: Path) -> str:
    """The Markdown block of bundle ``name`` built from the reports under ``reports`` ('' when none mentions it)."""
    reports = Path(reports)
    body: list[str] = []
    body += _speed_lines(name, _load(reports, "speed"))
    body += _accuracy_lines(name, _load(reports, "accuracy"))
    body += _prompt_lines(name, _load(reports, "prompts"))
    body += _uncertainty_lines(name, _load(reports, "uncertainty"))
    body += _al_lines(name, _load(reports, "active_learning"))
    if not body:
        return ""
    summary = {}
    try:
        summary = json.loads((reports / "summary.json").read_text())
    except (OSError, ValueError):
        pass
    runs = "; ".join(f"`{r['command']}` ({r['finished']}, {r['wall_seconds'] / 60:.0f} min)" for r in summary.get("runs", []))
    head = ["Written by `python -m vlseg.bench.docs` from the benchmark report ([reports/README.md](../../../reports/README.md)"
            + (f"; runs: {runs}" if runs else "") + "). Do not edit by hand: re-run the benchmark.", ""]
    return "\n".join(head + body).rstrip() + "\n"


def update_bundle_docs(reports: Path, bundles_dir: Path) -> list[Path]:
    """Rewrite the marked block of every ``<bundle>/docs/README.md`` under ``bundles_dir``; returns the files changed."""
    changed = []
    for doc in sorted(Path(bundles_dir).glob("*/docs/README.md")):
        name = doc.parent.parent.name
        text = doc.read_text()
        if START not in text or END not in text:
            continue
        block = bundle_block(name, reports) or "(no benchmark report yet: run `bash scripts/benchmark.sh`)\n"
        pre, rest = text.split(START, 1)
        _, post = rest.split(END, 1)
        new = f"{pre}{START}\n{block}{END}{post}"
        if new != text:
            tmp = doc.with_suffix(".md.tmp")
            tmp.write_text(new)
            os.replace(tmp, doc)
            changed.append(doc)
    return changed


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reports", type=Path, default=repo_root() / "reports")
    p.add_argument("--bundles-dir", type=Path, default=repo_root() / "bundles")
    a = p.parse_args(argv)
    for doc in update_bundle_docs(a.reports, a.bundles_dir):
        print(f"updated {doc}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
