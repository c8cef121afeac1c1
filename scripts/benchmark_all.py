#!/usr/bin/env python
"""Run every benchmark part and write ``reports/README.md`` linking the reports, with the time each part took.

Parts (each also runs alone): speed, accuracy, prompts, uncertainty, active_learning. Prompts and uncertainty
evaluate the checkpoints the accuracy part trained. A part that fails is reported and the others still run.

    python scripts/benchmark_all.py            # the whole evidence (hours on 2 CPU cores; see reports/README.md)
    python scripts/benchmark_all.py --quick    # smoke test of every part (minutes)
    bash scripts/benchmark.sh [--quick]        # the same, with the environment set up first
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
import traceback
from pathlib import Path

from vlseg.bench.cli import command_line, log
from vlseg.bench.report import fmt, machine_info, machine_lines, repo_root

PARTS = ("speed", "accuracy", "prompts", "uncertainty", "active_learning")
TITLES = {
    "speed": "Speed and cost (parameters, FLOPs, latency, memory, training throughput, peers, matmul peak)",
    "accuracy": "Accuracy under an equal CPU budget + data efficiency",
    "prompts": "Prompt robustness (p1..p9, MedCLIPSeg variants)",
    "uncertainty": "Uncertainty quality (ECE, AUROC of errors, boundary vs interior)",
    "active_learning": "Active learning with the app's strategy vs random",
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", type=Path, default=repo_root() / "reports", help="reports root (default: reports/)")
    p.add_argument("--parts", nargs="*", default=list(PARTS), choices=PARTS)
    p.add_argument("--datalist", type=Path, default=None, help="passed to the data-driven parts")
    p.add_argument("--bundles-dir", type=Path, default=None)
    p.add_argument("--bundles", nargs="*", default=None)
    p.add_argument("--budget-seconds", type=float, default=None, help="accuracy training budget per model")
    p.add_argument("--al-budget-seconds", type=float, default=None, help="active-learning training budget per round")
    p.add_argument("--al-bundle", default=None)
    p.add_argument("--threads", type=int, default=None)
    return p.parse_args(argv)


def load_script(name: str):
    path = repo_root() / "scripts" / f"benchmark_{name}.py"
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def part_argv(name: str, args) -> list[str]:
    a = ["--out", str(args.out / name)]
    if args.quick:
        a.append("--quick")
    if args.bundles_dir:
        a += ["--bundles-dir", str(args.bundles_dir)]
    if args.threads:
        a += ["--threads", str(args.threads)]
    if name == "active_learning":
        if args.al_bundle:
            a += ["--bundle", args.al_bundle]
        elif args.bundles:
            a += ["--bundle", args.bundles[0]]
        if args.al_budget_seconds:
            a += ["--budget-seconds", str(args.al_budget_seconds)]
    elif args.bundles:
        a += ["--bundles", *args.bundles]
    if name != "speed" and args.datalist:
        a += ["--datalist", str(args.datalist)]
    if name == "accuracy" and args.budget_seconds:
        a += ["--budget-seconds", str(args.budget_seconds)]
    if name in ("prompts", "uncertainty"):
        a += ["--from-accuracy", str(args.out / "accuracy" / "results.json")]
    return a


def headline(name: str, res: dict) -> str:
    try:
        if name == "speed":
            cases = [c for c in res.get("cases", []) if "error" not in c and c.get("group") == "bundle"]
            lat = ", ".join(f"{c['label']} {1e3 * c['latency']['1']['median_s']:.0f} ms" for c in cases
                            if c.get("latency", {}).get("1", {}).get("median_s"))
            return f"matmul peak {res['matmul_peak_gflops']:.1f} GFLOP/s; batch-1 latency: {lat or 'n/a'}"
        if name == "accuracy":
            ms = [m for m in res.get("models", []) if m.get("fraction") == 100]
            return "test Dice: " + ", ".join(f"{m['name']} {m['test']['dice']:.3f}" if "test" in m else f"{m['name']} failed"
                                              for m in ms)
        if name == "prompts":
            keys = res.get("keys", [])
            return "Dice range over prompts: " + ", ".join(
                f"{lab} {min(r['dice'][k] for k in keys):.3f}-{max(r['dice'][k] for k in keys):.3f}"
                for lab, r in res.get("models", {}).items())
        if name == "uncertainty":
            return ", ".join(f"{lab}: ECE {r['ece']:.3f}, AUROC {r['auroc_error']:.3f}" for lab, r in res.get("models", {}).items())
        if name == "active_learning":
            u, r = res.get("fraction_needed_uncertainty"), res.get("fraction_needed_random")
            def pct(v):
                return f"{v:.1f} %" if v is not None else "not reached"

            return (f"95 % of full-data Dice ({fmt(res.get('target_dice'))}) reached at {pct(u)} labelled "
                    f"(uncertainty) vs {pct(r)} (random)")
    except Exception as e:  # noqa: BLE001
        return f"(no headline: {e})"
    return ""


def main(argv=None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    info = machine_info()
    status = {}
    for name in args.parts:
        log(f"===== part {name} =====")
        t = time.perf_counter()
        try:
            rc = load_script(name).main(part_argv(name, args))
            status[name] = {"rc": rc, "error": None}
        except SystemExit as e:
            status[name] = {"rc": e.code if isinstance(e.code, int) else 1, "error": None if not e.code else str(e.code)}
        except Exception as e:  # noqa: BLE001 - one failing part must not stop the others
            traceback.print_exc()
            status[name] = {"rc": 1, "error": f"{type(e).__name__}: {e}"}
        status[name]["seconds"] = time.perf_counter() - t
        log(f"part {name}: rc {status[name]['rc']} in {status[name]['seconds']:.0f} s")
    total = time.perf_counter() - t_all

    lines = ["# vlseg benchmark reports", "",
             f"Regenerate everything: `{command_line()}` (or `bash scripts/benchmark.sh{' --quick' if args.quick else ''}`).",
             "" if not args.quick else "\n**These are `--quick` smoke-test numbers (tiny variants, a few images, seconds "
             "of training): they check that the pipeline works, they are not evidence.**\n",
             f"Total wall time: **{total / 60:.1f} min** ({total:.0f} s) on this machine:", ""]
    lines += machine_lines(info) + ["", "| part | report | status | time | headline |", "|---|---|---|---|---|"]
    for name in args.parts:
        st = status[name]
        rj = args.out / name / "results.json"
        res = json.loads(rj.read_text()) if rj.is_file() else {}
        ok = "ok" if st["rc"] == 0 and not st["error"] else f"FAILED ({st['error'] or 'exit ' + str(st['rc'])})"
        link = f"[{TITLES[name]}]({name}/report.md)" if (args.out / name / "report.md").is_file() else TITLES[name]
        lines.append(f"| {name} | {link} | {ok} | {st['seconds'] / 60:.1f} min | {headline(name, res).replace('|', '/')} |")
    lines += ["", "Each part alone: `python scripts/benchmark_<part>.py [--quick]` (see `--help`); raw numbers in each "
              "folder's `results.json`.", ""]
    (args.out / "README.md").write_text("\n".join(lines))
    (args.out / "summary.json").write_text(json.dumps({"total_seconds": total, "quick": args.quick, "parts": status,
                                                       "machine": info}, indent=2) + "\n")
    log(f"all parts done in {total:.0f} s: {args.out / 'README.md'}")
    return 0 if all(s["rc"] == 0 and not s["error"] for s in status.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
