#!/usr/bin/env python
"""Run every benchmark part and write ``reports/README.md`` linking the reports, with the time each part took.

Parts (each also runs alone): speed, accuracy, prompts, uncertainty, active_learning. Prompts and uncertainty
evaluate the checkpoints the accuracy part trained. A part that fails is reported and the others still run.

    python scripts/benchmark_all.py            # the whole evidence (hours on 2 CPU cores; see reports/README.md)
    python scripts/benchmark_all.py --quick    # smoke test of every part (minutes)
    python scripts/benchmark_all.py --concurrent   # speed alone, then the data chain and active learning side by
                                                   # side (1 thread each, CPU-second budgets): about half the time
    bash scripts/benchmark.sh [--quick]        # the same, with the environment set up first
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
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
    p.add_argument("--budget-clock", choices=("wall", "process"), default=None,
                   help="what training budgets count (accuracy, active learning): wall seconds (default) or CPU "
                        "seconds of the training process ('process'; the default with --concurrent)")
    p.add_argument("--al-budget-seconds", type=float, default=None, help="active-learning training budget per round")
    p.add_argument("--al-bundle", default=None)
    p.add_argument("--al-max-fraction", type=float, default=None, help="active learning: last labelled %% (default 100)")
    p.add_argument("--al-seeds", type=int, default=None, help="active learning: random-selection seeds (default 3)")
    p.add_argument("--al-scoring-samples", type=int, default=None,
                   help="active learning: passes per pool image in the app's scoring (default: the app's 8)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--concurrent", action="store_true",
                   help="run speed alone first, then (accuracy -> prompts -> uncertainty) and active_learning side "
                        "by side, one torch thread each, with process-clock (CPU-second) training budgets: about "
                        "half the wall time on 2 cores, budgets unaffected by the sharing")
    p.add_argument("--no-docs", action="store_true",
                   help="do not copy the numbers into the bundles' docs/README.md (done after every non-quick run "
                        "into the repository's reports/; vlseg.bench.docs)")
    p.add_argument("--status-file", type=Path, default=None, help=argparse.SUPPRESS)  # a --concurrent branch
    a = p.parse_args(argv)
    if a.concurrent:
        if a.budget_clock == "wall":
            p.error("--concurrent shares the cores between two branches: use --budget-clock process (the default there)")
        a.budget_clock = "process"
    return a


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
    if name in ("accuracy", "active_learning") and args.budget_clock:
        a += ["--budget-clock", args.budget_clock]
    if name == "active_learning":
        if args.al_bundle:
            a += ["--bundle", args.al_bundle]
        elif args.bundles:
            a += ["--bundle", args.bundles[0]]
        if args.al_budget_seconds:
            a += ["--budget-seconds", str(args.al_budget_seconds)]
        if args.al_max_fraction:
            a += ["--max-fraction", str(args.al_max_fraction)]
        if args.al_seeds:
            a += ["--seeds", str(args.al_seeds)]
        if args.al_scoring_samples:
            a += ["--scoring-samples", str(args.al_scoring_samples)]
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
            cmp_, reg = res.get("comparison") or {}, res.get("regime") or {}
            arms = ", ".join(f"{arm} AUC {c['auc']:.3f}" + (f" ({100 * c['saving']:.0f} % fewer labels)"
                                                             if c.get("saving") is not None and arm != "random" else "")
                             for arm, c in cmp_.items())
            seeds = max((len(c.get("seeds", [])) for c in cmp_.values()), default=0)
            return (f"{seeds} seeds; {arms or 'no finished curves'}; "
                    f"{'data-limited' if reg.get('data_limited') else 'NOT data-limited' if reg.get('data_limited') is False else 'regime unknown'}")
    except Exception as e:  # noqa: BLE001
        return f"(no headline: {e})"
    return ""


def run_parts(names, args) -> dict:
    """Run ``names`` one after the other in this process; a failing part is recorded and the next one runs."""
    status = {}
    for name in names:
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
        status[name]["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
        log(f"part {name}: rc {status[name]['rc']} in {status[name]['seconds']:.0f} s")
    return status


def branch_argv(parts, args, status_file: Path) -> list[str]:
    """The command line of one ``--concurrent`` branch: this script on ``parts``, one torch thread, CPU-second budgets."""
    a = [sys.executable, str(Path(__file__).resolve()), "--parts", *parts, "--out", str(args.out), "--threads", "1",
         "--budget-clock", "process", "--status-file", str(status_file)]
    for flag, v in (("--datalist", args.datalist), ("--bundles-dir", args.bundles_dir), ("--budget-seconds", args.budget_seconds),
                    ("--al-budget-seconds", args.al_budget_seconds), ("--al-bundle", args.al_bundle),
                    ("--al-max-fraction", args.al_max_fraction), ("--al-seeds", args.al_seeds),
                    ("--al-scoring-samples", args.al_scoring_samples)):
        if v is not None:
            a += [flag, str(v)]
    if args.bundles:
        a += ["--bundles", *args.bundles]
    if args.quick:
        a.append("--quick")
    return a


def run_concurrent(args) -> dict:
    """Speed alone (it times latency, so nothing else may run), then the data chain and active learning side by side."""
    status = run_parts([p for p in args.parts if p == "speed"], args)
    branches = [b for b in ([p for p in args.parts if p in ("accuracy", "prompts", "uncertainty")],
                            [p for p in args.parts if p == "active_learning"]) if b]
    if any(p != "speed" for p in args.parts):
        from vlseg.bench.data import resolve_data

        resolve_data(args.datalist, quick=args.quick)  # prepare the data cache once, before two branches read it
    env = dict(os.environ, VLSEG_BENCH_COMMAND=os.environ.get("VLSEG_BENCH_COMMAND") or command_line())
    procs = []
    for i, parts in enumerate(branches):
        sf = args.out / f".branch{i}_status.json"
        sf.unlink(missing_ok=True)
        logf = args.out / f"branch_{'_'.join(parts)}.log"
        log(f"branch {i}: {' -> '.join(parts)} (1 thread, process-clock budgets); log {logf}")
        with open(logf, "w") as f:
            procs.append((parts, sf, subprocess.Popen(branch_argv(parts, args, sf), stdout=f, stderr=subprocess.STDOUT,
                                                      env=env)))
    for parts, sf, proc in procs:
        rc = proc.wait()
        got = json.loads(sf.read_text()) if sf.is_file() else {}
        for name in parts:
            status[name] = got.get(name) or {"rc": rc or 1, "error": f"branch exited with {rc} before the part finished",
                                             "seconds": 0.0, "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
        sf.unlink(missing_ok=True)
    return status


def merge_summary(path: Path, status: dict, run: dict, quick: bool, info: dict) -> dict:
    """Merge this run into ``summary.json``: parts run now replace their earlier entries, the others are kept, so a
    report assembled part by part still lists every part and the runs (commands, wall times) that produced it."""
    old = {}
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except ValueError:
            old = {}
    if old.get("quick") != quick or "runs" not in old:  # a quick smoke test never mixes with evidence
        old = {}
    parts = {k: v for k, v in (old.get("parts") or {}).items() if k not in status}
    for name, st in status.items():
        parts[name] = dict(st, run=run["id"])
    runs = [r for r in old.get("runs", []) if any(p.get("run") == r["id"] for p in parts.values())] + [run]
    return {"quick": quick, "parts": parts, "runs": runs, "total_seconds": sum(r["wall_seconds"] for r in runs),
            "machine": info}


def write_index(out: Path, summary: dict) -> None:
    quick = summary["quick"]
    total = summary["total_seconds"]
    lines = ["# vlseg benchmark reports", "",
             f"Regenerate everything: `python scripts/benchmark_all.py{' --quick' if quick else ''}` (or "
             f"`bash scripts/benchmark.sh{' --quick' if quick else ''}`); the runs that produced these reports are listed below.",
             "" if not quick else "\n**These are `--quick` smoke-test numbers (tiny variants, a few images, seconds "
             "of training): they check that the pipeline works, they are not evidence.**\n",
             f"Wall time of those runs: **{total / 60:.1f} min** ({total:.0f} s) on this machine:", ""]
    lines += machine_lines(summary["machine"]) + ["", "| part | report | status | time | headline |", "|---|---|---|---|---|"]
    for name in PARTS:
        st = summary["parts"].get(name)
        if st is None:
            continue
        rj = out / name / "results.json"
        res = json.loads(rj.read_text()) if rj.is_file() else {}
        ok = "ok" if st["rc"] == 0 and not st["error"] else f"FAILED ({st['error'] or 'exit ' + str(st['rc'])})"
        link = f"[{TITLES[name]}]({name}/report.md)" if (out / name / "report.md").is_file() else TITLES[name]
        lines.append(f"| {name} | {link} | {ok} | {st['seconds'] / 60:.1f} min | {headline(name, res).replace('|', '/')} |")
    lines += ["", "## Runs", "", "| finished | command | parts | wall time |", "|---|---|---|---|"]
    for r in summary["runs"]:
        lines.append(f"| {r['finished']} | `{r['command']}` | {', '.join(r['parts'])} | {r['wall_seconds'] / 60:.1f} min |")
    lines += ["", "Each part alone: `python scripts/benchmark_<part>.py [--quick]` (see `--help`); raw numbers in each "
              "folder's `results.json`.", ""]
    (out / "README.md").write_text("\n".join(lines))


def main(argv=None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    info = machine_info()
    status = run_concurrent(args) if args.concurrent else run_parts(args.parts, args)
    total = time.perf_counter() - t_all
    rc = 0 if all(s["rc"] == 0 and not s["error"] for s in status.values()) else 1
    if args.status_file:  # a branch of --concurrent: the parent writes the index
        args.status_file.write_text(json.dumps(status, indent=2) + "\n")
        return rc
    run = {"id": time.strftime("%Y%m%d-%H%M%S"), "command": command_line(), "parts": list(status), "wall_seconds": total,
           "finished": time.strftime("%Y-%m-%d %H:%M:%S"), "concurrent": args.concurrent}
    summary = merge_summary(args.out / "summary.json", status, run, args.quick, info)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    write_index(args.out, summary)
    if not args.quick and not args.no_docs and args.out.resolve() == (repo_root() / "reports").resolve():
        from vlseg.bench.docs import update_bundle_docs

        for doc in update_bundle_docs(args.out, args.bundles_dir or repo_root() / "bundles"):
            log(f"numbers copied into {doc}")
    log(f"parts {', '.join(status)} done in {total:.0f} s: {args.out / 'README.md'}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
