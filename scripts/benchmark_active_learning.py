#!/usr/bin/env python
"""Active-learning simulation with the MONAI Label app's own scoring, strategies and train task (issue 14).

One command runs it all, in this order, and can be stopped and re-run at any time (finished work is kept per job
and per round under --work-dir; nothing is committed, the report goes to --out):

1. plan: pool = the training images whose object is the label word (Kvasir-SEG: all 800), rounds = --initial % of
   the pool, then +--step % (<= 5 %) per round up to --max-fraction %; per seed one random initial set, shared
   by every arm (paired seeds). A budget estimate from per-step times measured here; with --budget-minutes the run
   is refused when the estimate does not fit.
2. regime check: the app's train task on 100 % of the pool and on every seed's initial set (round 0 of all arms);
   the initial point must be <= 0.9 x the full-data Dice, else the report says the regime is not data-limited.
3. score choice: the gate of scripts/benchmark_uncertainty.py (its measure(), on the VALIDATION split, seed 0's
   round-0 model) picks the image score with the largest Spearman(score, 1 - Dice); never the test split.
4. curves: per arm (random, uncertainty, diverse) and seed, each round selects with the app's code, fine-tunes
   from the previous round's checkpoint with the app's train task, and measures test Dice; --workers jobs run side
   by side (one thread each).
5. report: area under the learning curve and labels to reach 95 % of the full-data Dice with paired bootstrap 95 %
   CIs over seeds, learning-curve PNG with bands, regime verdict, target check (>= 30 % fewer labels and an AUC-
   difference CI above 0).

    python scripts/benchmark_active_learning.py --budget-minutes 150      # Kvasir-SEG (or the demo set)
    python scripts/benchmark_active_learning.py --plan-only                # only the estimate
    python scripts/benchmark_active_learning.py --quick                    # seconds-scale smoke run on demo data
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from vlseg.bench.al_protocol import (ARMS, VARIANT, curve_records, job_done, jobs_of, load_plan, make_plan,
                                     prepare_bundle, read_json, run_job)
from vlseg.bench.al_report import compare_arms, learning_curve_plot, regime_check, target_check, write_report
from vlseg.bench.cli import add_budget_clock, apply_threads, base_parser, command_line, log, out_dir
from vlseg.bench.data import cache_dir, resolve_data, write_datalist
from vlseg.bench.report import Report, repo_root
from vlseg.bundles import find_bundles
from vlseg.scores import DEFAULT_SCORE, SCORES

#: a narrow random text tower: every prompt is the one label word, so the text only supplies a constant
NARROW_TEXT = {"text_encoder": "cxr-bert", "text_weights": None,
               "text_encoder_overrides": {"num_hidden_layers": 1, "hidden_size": 32, "num_attention_heads": 2,
                                          "intermediate_size": 64}}


def parse_args(argv=None):
    p = base_parser("active_learning", __doc__)
    p.add_argument("--datalist", type=Path, default=None)
    p.add_argument("--bundle", default="uavls", help="bundle to simulate with (default uavls)")
    p.add_argument("--variant", default=None, help="size variant the protocol's overrides extend (default small; quick tiny)")
    p.add_argument("--word", default="polyp", help="the app's label word: every prompt, and the pool's object category")
    p.add_argument("--image-size", type=int, default=None, help="training / inference size (default 96; quick: the variant's)")
    p.add_argument("--text-tower", choices=("narrow", "bundle"), default="narrow",
                   help="narrow: a 1-layer random text encoder (one constant prompt needs no language model; 4x smaller "
                        "checkpoints); bundle: the variant's own")
    p.add_argument("--patience", type=int, default=5, help="early stopping: validations without improvement")
    p.add_argument("--min-epochs", type=int, default=None, help="no early stop before this epoch (default 5; quick 1)")
    p.add_argument("--epochs-init", type=int, default=None, help="epoch cap of a training from scratch (default 60; quick 2)")
    p.add_argument("--epochs-round", type=int, default=None, help="epoch cap of a warm-started round (default 10; quick 1)")
    p.add_argument("--epochs-full", type=int, default=None, help="epoch cap of the full-data training (default 40; quick 2)")
    p.add_argument("--budget-seconds", type=float, default=None,
                   help="time cap of one round's training, on --budget-clock (default 240; quick 60)")
    p.add_argument("--full-seconds", type=float, default=None, help="time cap of the full-data training (default 1500)")
    add_budget_clock(p)
    p.set_defaults(budget_clock="process")
    p.add_argument("--initial", type=float, default=None, help="initially labelled %% of the pool (default 10; quick 20)")
    p.add_argument("--step", type=float, default=5.0, help="%% of the pool added per round (at most 5)")
    p.add_argument("--max-fraction", type=float, default=None, help="last round's labelled %% (default 50; quick 25)")
    p.add_argument("--seeds", type=int, default=None, help="seeds per arm (default 5; quick 2)")
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    p.add_argument("--score", default=None, choices=sorted(SCORES), help="skip the gate and rank by this score")
    p.add_argument("--scoring-samples", type=int, default=None, help="stochastic passes when scoring (default 4; quick 2)")
    p.add_argument("--scoring-max-images", type=int, default=None,
                   help="unlabelled images scored per round, drawn at random (the app's scoring_max_images; default 150, "
                        "0 = all; quick 0)")
    p.add_argument("--eval-samples", type=int, default=1, help="passes per test image")
    p.add_argument("--gate-boot", type=int, default=1000)
    p.add_argument("--n-boot", type=int, default=2000, help="bootstrap resamples of the report's CIs")
    p.add_argument("--max-train", type=int, default=None, help="pool size limit (quick 20)")
    p.add_argument("--max-val", type=int, default=None, help="(quick 4)")
    p.add_argument("--max-test", type=int, default=None, help="(quick 4)")
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE", help="more variant-file overrides")
    p.add_argument("--work-dir", type=Path, default=None, help="resumable state (default ~/.cache/vlseg/bench/work/al)")
    p.add_argument("--restart", action="store_true", help="discard the work folder first")
    p.add_argument("--workers", type=int, default=None, help="jobs side by side, one thread each (default 2; quick 0 = "
                                                             "in this process)")
    p.add_argument("--budget-minutes", type=float, default=None, help="refuse to start when the estimate exceeds it")
    p.add_argument("--plan-only", action="store_true", help="print the plan and the estimate, run nothing")
    p.add_argument("--job", default=None, help=argparse_hidden())
    a = p.parse_args(argv)
    q = a.quick
    a.variant = a.variant or ("tiny" if q else "small")
    a.image_size = a.image_size or (None if q else 96)
    a.min_epochs = a.min_epochs or (1 if q else 5)
    a.epochs_init = a.epochs_init or (2 if q else 60)
    a.epochs_round = a.epochs_round or (1 if q else 10)
    a.epochs_full = a.epochs_full or (2 if q else 40)
    a.budget_seconds = a.budget_seconds or (60.0 if q else 240.0)
    a.full_seconds = a.full_seconds or (60.0 if q else 1500.0)
    a.initial = a.initial or (20.0 if q else 10.0)
    a.max_fraction = a.max_fraction or (25.0 if q else 50.0)
    a.seeds = a.seeds or (2 if q else 5)
    a.scoring_samples = a.scoring_samples or (2 if q else 4)
    a.scoring_max_images = a.scoring_max_images if a.scoring_max_images is not None else (0 if q else 150)
    a.max_train = a.max_train or (20 if q else None)
    a.max_val = a.max_val or (4 if q else None)
    a.max_test = a.max_test or (4 if q else None)
    a.workers = a.workers if a.workers is not None else (0 if q else 2)
    if q and a.text_tower == "narrow":
        a.text_tower = "bundle"  # tiny already is narrow
    return a


def argparse_hidden():
    import argparse

    return argparse.SUPPRESS


def _overrides(args, cap: float) -> dict:
    o = {"patience": args.patience, "min_epochs": args.min_epochs, "max_train_seconds": float(cap),
         "max_train_clock": args.budget_clock, "progress_bar": False, "num_workers": 0}
    if args.image_size:
        o["image_size"] = args.image_size
    if args.text_tower == "narrow":
        o.update(NARROW_TEXT)
    for s in args.override:
        k, _, v = s.partition("=")
        try:
            o[k] = json.loads(v)
        except ValueError:
            o[k] = v
    return o


def _worded(items: list[dict], word: str) -> list[dict]:
    """Items of ``word`` whose mask is not empty (data sets with several object categories per image, like the demo
    set: the object of the label word is the pool unit; an object hidden by the others has nothing to annotate)."""
    import numpy as np
    from PIL import Image

    out = []
    for it in items:
        if it.get("category") not in (None, word):
            continue
        with Image.open(it["label"]) as m:
            if np.asarray(m).any():
                out.append(it)
    return out


def build_plan(args) -> dict:
    data = resolve_data(args.datalist, quick=args.quick)
    pool = _worded(data.items("training"), args.word)[:args.max_train or None]
    val = _worded(data.items("validation"), args.word)[:args.max_val or None]
    test = _worded(data.items("test"), args.word)[:args.max_test or None]
    if not pool or not test or not val:
        raise SystemExit(f"{data.name}: no training / validation / test items of {args.word!r} (use --word)")
    bundles = find_bundles(args.bundles_dir, [args.bundle])
    settings = {
        "bundle_path": str(bundles[0].resolve()), "bundle": bundles[0].name, "bundle_name": bundles[0].name,
        "base_variant": args.variant,
        "overrides": _overrides(args, args.budget_seconds), "full_overrides": _overrides(args, args.full_seconds),
        "word": args.word, "initial": args.initial, "step": args.step, "max_fraction": args.max_fraction,
        "seeds": args.seeds, "arms": list(dict.fromkeys(["random"] + list(args.arms))), "epochs_init": args.epochs_init,
        "epochs_round": args.epochs_round, "epochs_full": args.epochs_full, "scoring_samples": args.scoring_samples,
        "scoring_max_images": args.scoring_max_images, "eval_samples": args.eval_samples,
        "datalist": str(data.datalist), "data_name": data.name, "budget_clock": args.budget_clock,
        "budget_seconds": args.budget_seconds, "threads": args.threads or 1, "n_boot": args.n_boot,
        "reference": "random", "workers": args.workers,
    }
    return make_plan(settings, pool, val, test)


# ------------------------------------------------------------------------------------------------------ phases
def run_phase(work: Path, plan: dict, jobs: list[str], workers: int, score: str | None, threads: int) -> dict[str, str]:
    """Run the unfinished ``jobs``: in this process (``workers`` 0) or as ``workers`` child processes at a time
    (one thread each; logs under work/logs). Returns ``{job: error}`` of failed jobs."""
    todo = [j for j in jobs if not job_done(work, plan, j)]
    failed: dict[str, str] = {}
    if workers <= 0:
        for j in todo:
            try:
                run_job(work, j, score, log)
            except Exception as e:  # noqa: BLE001 - the others go on; the report lists it
                failed[j] = f"{type(e).__name__}: {e}"
                log(f"{j} failed: {failed[j]}")
        return failed
    (work / "logs").mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", MPLBACKEND="Agg", PYTHONUNBUFFERED="1")
    running: dict[str, tuple[subprocess.Popen, float, Path]] = {}
    n, done = len(todo), 0
    while todo or running:
        while todo and len(running) < workers:
            j = todo.pop(0)
            lf = work / "logs" / f"{j.replace(':', '_')}.log"
            cmd = [sys.executable, str(Path(__file__).resolve()), "--work-dir", str(work), "--job", j,
                   "--threads", str(threads)] + (["--score", score] if score else [])
            with open(lf, "a") as f:
                running[j] = (subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env), time.time(), lf)
            log(f"started {j} (log {lf})")
        time.sleep(2.0)
        for j, (proc, t0, lf) in list(running.items()):
            if proc.poll() is None:
                continue
            del running[j]
            done += 1
            if proc.returncode != 0:
                failed[j] = f"exit code {proc.returncode}; log {lf}: " + lf.read_text(errors="replace")[-600:]
                log(f"{j} FAILED ({failed[j][:200]})")
            else:
                log(f"[{done}/{n}] {j} finished in {time.time() - t0:.0f} s")
    return failed


def run_gate(args, work: Path, plan: dict) -> dict:
    """Choose the score on the validation split with scripts/benchmark_uncertainty.py's measurement."""
    path = work / "gate.json"
    if args.score:
        return {"score": args.score, "forced": True}
    old = read_json(path)
    if old is not None:
        return old
    import importlib.util

    from vlseg.bench.bundles import load_bundle_model

    spec = importlib.util.spec_from_file_location("_vlseg_benchmark_uncertainty",
                                                  repo_root() / "scripts" / "benchmark_uncertainty.py")
    unc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(unc)
    bundle = work / "init" / "0" / "bundle"
    bm = load_bundle_model(bundle, VARIANT, checkpoint=bundle / "models" / "model.pt")
    if hasattr(bm.inferer, "decompose"):
        bm.inferer.decompose = True
    items = [{**{k: v for k, v in it.items() if k != "prompts"}, "text": plan["settings"]["word"]}
             for it in plan["validation"]]
    n = plan["settings"]["scoring_samples"]
    log(f"gate: {len(items)} validation images, {n} passes, seed 0's round-0 model")
    r = unc.measure(bm, items, n, 15, 2, 0.1, args.gate_boot, 0)
    finite = {k: g for k, g in r["gate"].items() if g["spearman"] == g["spearman"]}
    best = max(finite, key=lambda k: finite[k]["spearman"]) if finite else DEFAULT_SCORE
    gate = {"score": best, "split": "validation", "model": "init:0", "samples": n, "n_images": r["n_images"],
            "dice": r["dice"], "table": r["gate"],
            "note": None if finite else f"no score has a defined Spearman; fell back to the app default {DEFAULT_SCORE}"}
    write_datalist(gate, path)
    log(f"gate: chose {best!r}")
    return gate


# ------------------------------------------------------------------------------------------------------ report
def assemble(args, work: Path, plan: dict, gate: dict, failed: dict, est: dict | None) -> dict:
    st, counts = plan["settings"], plan["counts"]
    full = read_json(work / "full" / "record.json")
    inits = {s: read_json(work / "init" / str(s) / "record.json") for s in range(st["seeds"])}
    full_dice = full["dice"] if full else None
    regime = regime_check([r["dice"] for r in inits.values() if r], full_dice if full_dice is not None else float("nan"))
    target = 0.95 * full_dice if full_dice is not None else None
    curves: dict[str, dict[int, list[float]]] = {a: {} for a in st["arms"]}
    rounds: dict[str, dict] = {}
    for a in st["arms"]:
        for s in range(st["seeds"]):
            recs = curve_records(work, f"curve:{a}:{s}")
            if inits[s] and all(k in recs for k in range(1, len(counts))):
                curves[a][s] = [inits[s]["dice"]] + [recs[k]["dice"] for k in range(1, len(counts))]
            rounds[f"{a}:{s}"] = {k: {x: v for x, v in r.items() if x != "labeled"} for k, r in recs.items()}
    comparison = {}
    if all(curves[a] for a in st["arms"]) and set.intersection(*[set(curves[a]) for a in st["arms"]]):
        comparison = compare_arms(counts, curves, target, "random", st["n_boot"], 0)
    n_pool = len(plan["pool"])
    res = {
        "settings": st, "counts": counts, "steps": [100.0 * c / n_pool for c in counts],
        "data": {"name": st["data_name"], "datalist": st["datalist"], "n_pool": n_pool,
                 "n_val": len(plan["validation"]), "n_test": len(plan["test"])},
        "regime": regime, "gate": gate, "full_data_dice": full_dice, "target_dice": target, "comparison": comparison,
        "curves": {a: {str(s): v for s, v in c.items()} for a, c in curves.items()}, "rounds": rounds,
        "failed_jobs": failed, "estimate": est,
        "target": target_check(comparison, [a for a in st["arms"] if a != "random"]) if comparison else
        {"met": False, "arms_meeting": [], "min_saving": 0.3, "best_arm": None},
    }
    for a, key in (("uncertainty", "fraction_needed_uncertainty"), ("random", "fraction_needed_random")):
        need = comparison.get(a, {}).get("labels_needed")
        res[key] = 100.0 * need / n_pool if need is not None else None  # the bundle docs' summary line reads these
    return res


def main(argv=None) -> int:
    args = parse_args(argv)
    work = Path(args.work_dir) if args.work_dir else cache_dir() / "work" / ("al_quick" if args.quick else "al")
    if args.job:  # a child process: one job of an existing plan
        apply_threads(args.threads or 1)
        run_job(work, args.job, args.score, log)
        return 0
    t_start = time.time()
    apply_threads(args.threads)
    if args.restart and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    plan = load_plan(work, build_plan(args))
    st = plan["settings"]
    log(f"pool {len(plan['pool'])} ({st['data_name']}), rounds {plan['counts']}, {st['seeds']} seeds x {st['arms']}, "
        f"work {work}")
    from vlseg.bench.al_budget import calibrate, estimate

    import torch

    threads_before = torch.get_num_threads()
    torch.set_num_threads(args.threads or 1)
    cal_bundle = prepare_bundle(Path(st["bundle_path"]), work / "calibration" / "bundle", st["base_variant"],
                                st["overrides"])
    batch = json.loads((cal_bundle / "configs" / f"{VARIANT}.json").read_text()).get("batch_size", 8)
    cal = calibrate(cal_bundle, int(batch))
    torch.set_num_threads(threads_before)
    est = estimate(plan, work, cal, args.workers)
    log(f"measured: {cal['step_s']:.3f} s per training step (batch {cal['batch_size']}; {cal['step_cpu_s']:.3f} CPU s), "
        f"{1e3 * cal['pass_s']:.1f} ms per "
        f"inference pass, {cal['threads']} thread; estimate for the {est['jobs_left']} jobs left with "
        f"{est['workers']} worker(s): {est['total_s'] / 60:.0f} min (first phase {est['first_s'] / 60:.0f}, gate "
        f"{est['gate_s'] / 60:.1f}, curves {est['curves_s'] / 60:.0f}; {est['cpu_s'] / 3600:.1f} CPU h)")
    if args.budget_minutes is not None and est["total_s"] / 60 > args.budget_minutes:
        log(f"REFUSED: the estimate ({est['total_s'] / 60:.0f} min) exceeds --budget-minutes {args.budget_minutes:g}; "
            "lower --seeds, --max-fraction, --epochs-round, --budget-seconds or --scoring-max-images, raise --workers, "
            "or run it in parts (finished jobs are kept)")
        return 3
    if args.plan_only:
        return 0
    failed = run_phase(work, plan, jobs_of(plan)["first"], args.workers, None, args.threads or 1)
    gate = run_gate(args, work, plan) if job_done(work, plan, "init:0") else {}
    if gate:
        failed.update(run_phase(work, plan, jobs_of(plan)["curves"], args.workers, gate["score"], args.threads or 1))
    res = assemble(args, work, plan, gate, failed, est)
    out = out_dir(args)
    title = f"Active learning with the app's strategies ({st['bundle_name']}, {st['data_name']})"
    rep = Report(out, title, command_line())
    rep.machine()
    if res["comparison"]:
        res["plot"] = learning_curve_plot(out / "active_learning.png", plan["counts"], res["comparison"],
                                          len(plan["pool"]), title, res["target_dice"], res["full_data_dice"]).name
    res["run_wall_s"] = round(time.time() - t_start, 1)
    rep.results.update(res)
    write_report(rep, res)
    if failed:
        rep.p("**Failed jobs** (re-run the command to retry them): "
              + "; ".join(f"{j}: {e[:300]}" for j, e in failed.items()))
    log(f"report: {rep.write()}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
