#!/usr/bin/env python
"""Active-learning simulation with the MONAI Label app's own scoring and strategy code.

Start with ``--initial`` % of the training set labelled (a seeded random choice), then per round add ``--step`` % of
the training set chosen by
  (a) the app's uncertainty strategy: ``lib.scoring.uncertainty.UncertaintyScoring`` runs the app's infer task on
      the round's checkpoint over the unlabelled pool (prompt = each image's caption) and
      ``lib.activelearning.uncertainty.MostUncertain`` serves the most uncertain image, one at a time, each one
      "annotated" (its ground-truth mask saved as the final label with its prompt) before the next ask;
  (b) random selection, with ``--seeds`` seeds.
After every round the bundle is retrained from random initialisation with the same budget (its own train config
through ``python -m monai.bundle run``) and the test Dice is measured. The report plots test Dice against the
labelled fraction and states how much labelling the uncertainty strategy saves to reach 95 % of the full-data Dice.

    python scripts/benchmark_active_learning.py                    # Kvasir-SEG or demo, 10 % + 10 %/round
    python scripts/benchmark_active_learning.py --quick
"""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path

import numpy as np

from vlseg.bench.active import AppActiveLearner, AppUnavailable, item_key
from vlseg.bench.bundles import load_bundle_model
from vlseg.bench.cli import add_budget_clock, apply_threads, base_parser, budget_unit, budget_words, command_line, log, out_dir
from vlseg.bench.data import cache_dir, resolve_data, write_datalist
from vlseg.bench.evaluate import evaluate_items
from vlseg.bench.report import Report, line_plot
from vlseg.bench.train import train_bundle
from vlseg.bundles import find_bundles, variant_label


def parse_args(argv=None):
    p = base_parser("active_learning", __doc__)
    p.add_argument("--datalist", type=Path, default=None)
    p.add_argument("--bundle", default=None, help="bundle to simulate with (default: uavls if present, else the first)")
    p.add_argument("--variant", default=None, help="default small; quick: tiny")
    p.add_argument("--budget-seconds", type=float, default=None, help="training budget per round (default 300; quick 6)")
    add_budget_clock(p)
    p.add_argument("--initial", type=float, default=10.0, help="initially labelled %% of the training set")
    p.add_argument("--step", type=float, default=10.0, help="%% of the training set added per round")
    p.add_argument("--max-fraction", type=float, default=None, help="stop after this labelled %% (default 100; quick 50)")
    p.add_argument("--seeds", type=int, default=None, help="random-selection seeds (default 3; quick 1)")
    p.add_argument("--scoring-samples", type=int, default=None, help="stochastic passes per image when scoring (app default 8; quick 2)")
    p.add_argument("--eval-samples", type=int, default=1, help="passes per test image (default 1)")
    p.add_argument("--max-train", type=int, default=None)
    p.add_argument("--max-val", type=int, default=None)
    p.add_argument("--max-test", type=int, default=None)
    p.add_argument("--work-dir", type=Path, default=None)
    p.add_argument("--epoch-length", type=int, default=None,
                   help="iterations per training epoch, i.e. between validations / best-checkpoint saves (default 50; "
                        "quick: the bundle's own). Without it a budget shorter than one pass over the data leaves no checkpoint")
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--in-process", action="store_true", help="train in this process (default with --quick)")
    a = p.parse_args(argv)
    q = a.quick
    a.variant = a.variant or ("tiny" if q else "small")
    a.budget_seconds = a.budget_seconds or (6.0 if q else 300.0)
    a.max_fraction = a.max_fraction or 100.0
    if q and a.initial == 10.0 and a.step == 10.0:
        a.initial, a.step = 50.0, 50.0  # two rounds; the 100 % round is also the full-data reference
    a.seeds = a.seeds or (1 if q else 3)
    a.scoring_samples = a.scoring_samples or (2 if q else 8)
    a.max_train = a.max_train or (8 if q else None)
    a.max_val = a.max_val or (4 if q else None)
    a.max_test = a.max_test or (4 if q else None)
    a.in_process = a.in_process or q
    if a.epoch_length is None and not q:
        a.epoch_length = 50
    return a


def fraction_needed(fracs, dices, target) -> float | None:
    """Smallest labelled fraction at which the curve reaches ``target`` (linear interpolation between rounds)."""
    prev = None
    for f, d in zip(fracs, dices):
        if d is not None and not math.isnan(d) and d >= target:
            if prev is None:
                return f
            pf, pd = prev
            return pf + (f - pf) * (target - pd) / (d - pd) if d != pd else f
        prev = (f, d)
    return None


def main(argv=None) -> int:
    args = parse_args(argv)
    apply_threads(args.threads)
    out = out_dir(args)
    work = Path(args.work_dir) if args.work_dir else cache_dir() / "work" / ("al_quick" if args.quick else "al")
    data = resolve_data(args.datalist, quick=args.quick,
                        limits={k: v for k, v in (("training", args.max_train), ("validation", args.max_val), ("test", args.max_test)) if v})
    bundles = find_bundles(args.bundles_dir, [args.bundle] if args.bundle else args.bundles)
    if not bundles:
        raise SystemExit(f"no bundle found in {args.bundles_dir}")
    bundle = next((b for b in bundles if b.name == "uavls"), bundles[0]) if not args.bundle else bundles[0]
    variant = None if variant_label(args.variant) == "paper" else args.variant
    rep = Report(out, f"Active learning with the app's uncertainty strategy ({bundle.name}, {data.name})", command_line())
    rep.machine()
    pool, val_items, test_items = data.items("training"), data.items("validation"), data.items("test")
    keys = [item_key(it, i) for i, it in enumerate(pool)]
    by_key = dict(zip(keys, pool))
    n = len(pool)
    steps = [args.initial]
    while steps[-1] + args.step <= args.max_fraction + 1e-9:
        steps.append(steps[-1] + args.step)
    counts = [max(1, min(n, int(round(n * f / 100.0)))) for f in steps]
    extra = {}
    for s in args.override:
        k, _, v = s.partition("=")
        try:
            extra[k] = json.loads(v)
        except ValueError:
            extra[k] = v
    if args.quick or args.budget_clock == "process":
        extra.setdefault("num_workers", 0)  # process clock: data loading must run inside the budgeted process
    log(f"{bundle.name} ({args.variant}); pool {n}, rounds at {steps} % -> {counts} items; "
        f"budget {args.budget_seconds:.0f} {budget_words(args.budget_clock)}")

    cache: dict[tuple, dict] = {}  # identical labelled sets are trained once

    def train_eval(tag: str, labeled: list[str]) -> dict:
        sig = tuple(sorted(labeled))
        if sig in cache:
            return dict(cache[sig], reused=True)
        wd = work / tag
        dl = write_datalist({"name": data.name, "training": [by_key[k] for k in labeled], "validation": val_items,
                             "test": test_items}, wd / "datalist.json")
        r = train_bundle(bundle, variant, dl, wd, args.budget_seconds, extra=extra, in_process=args.in_process,
                         timeout=args.budget_seconds * 3 + 600, epoch_length=args.epoch_length, clock=args.budget_clock)
        if not r.ok:
            res = {"dice": float("nan"), "error": r.error, "copy": None}
        else:
            bm = load_bundle_model(bundle, variant, checkpoint=r.checkpoint)
            s = evaluate_items(bm, test_items, num_samples=args.eval_samples)["summary"]
            res = {"dice": s["dice"], "iou": s["iou"], "nsd": s["nsd"], "copy": str(r.checkpoint.parent.parent),
                   "checkpoint": str(r.checkpoint), "train_wall_s": r.wall_s}
        cache[sig] = res
        return res

    curves: dict[str, list[dict]] = {}
    app_error = None
    t_scoring = 0.0
    # (a) uncertainty strategy (seed 0's initial set) -------------------------------------------------------------
    def random_order(seed: int) -> list[str]:
        """The order in which random selection with ``seed`` labels the pool (its rounds are prefixes of it)."""
        return random.Random(seed).sample(keys, n)

    init = random_order(0)[:counts[0]]  # the uncertainty run starts from random seed 0's first round
    try:
        learner = AppActiveLearner(pool, set(init), work / "studies_uncertainty", num_samples=args.scoring_samples)
    except AppUnavailable as e:
        learner, app_error = None, str(e)
        log(f"uncertainty strategy unavailable: {e}")
    if learner is not None:
        curve = []
        for r_i, c in enumerate(counts):
            labeled = learner.labeled()
            res = train_eval(f"uncertainty_r{r_i}", labeled)
            curve.append({"fraction": steps[r_i], "n_labeled": len(labeled), **res})
            log(f"uncertainty round {r_i}: {len(labeled)} labelled -> Dice {res['dice']:.3f}")
            if r_i + 1 < len(counts):
                if res.get("copy") is None:
                    app_error = f"round {r_i} training failed: {res.get('error')}"
                    break
                t = time.perf_counter()
                sc = learner.score(Path(res["copy"]), variant, Path(res["checkpoint"]))
                t_scoring += time.perf_counter() - t
                chosen = learner.select(counts[r_i + 1] - len(labeled))
                curve[-1]["scored"] = len(sc.get("scored", {}))
                curve[-1]["scoring_s"] = time.perf_counter() - t
                curve[-1]["chosen_first"] = chosen[:3]
        curves["uncertainty (app strategy)"] = curve
    # (b) random, several seeds ------------------------------------------------------------------------------------
    for seed in range(args.seeds):
        order = random_order(seed)  # seed 0 starts from the same initial set as (a)
        curve = []
        for r_i, c in enumerate(counts):
            labeled = order[:c]
            res = train_eval(f"random_s{seed}_r{r_i}", labeled)
            curve.append({"fraction": steps[r_i], "n_labeled": len(labeled), **res})
            log(f"random seed {seed} round {r_i}: {len(labeled)} labelled -> Dice {res['dice']:.3f}")
        curves[f"random (seed {seed})"] = curve

    # full-data reference: the 100 % point of the curves, or one extra training
    full = next((pt["dice"] for cv in curves.values() for pt in cv if pt["n_labeled"] == n), None)
    if full is None:
        res = train_eval("full", keys)
        full = res["dice"]
    target = 0.95 * full if full is not None and not math.isnan(full) else None

    # ----------------------------------------------------------------------------------------------------- report
    rand = [cv for name, cv in curves.items() if name.startswith("random")]
    fr = steps
    rand_mean = [float(np.nanmean([cv[i]["dice"] for cv in rand])) for i in range(len(fr))] if rand else []
    rand_std = [float(np.nanstd([cv[i]["dice"] for cv in rand])) for i in range(len(fr))] if rand else []
    unc = curves.get("uncertainty (app strategy)")
    need_u = fraction_needed([p["fraction"] for p in unc], [p["dice"] for p in unc], target) if unc and target else None
    need_r = fraction_needed(fr, rand_mean, target) if rand and target else None
    rep.results.update(curves=curves, full_data_dice=full, target_dice=target, fraction_needed_uncertainty=need_u,
                       fraction_needed_random=need_r, random_mean=rand_mean, random_std=rand_std, steps=steps,
                       counts=counts, app_error=app_error, scoring_seconds=t_scoring,
                       settings={"bundle": bundle.name, "variant": args.variant, "budget_seconds": args.budget_seconds,
                                 "budget_clock": args.budget_clock, "threads": args.threads,
                                 "seeds": args.seeds, "scoring_samples": args.scoring_samples, "overrides": extra},
                       data={"name": data.name, "datalist": str(data.datalist), "n_pool": n, "n_test": len(test_items)})
    rep.h2("Setup")
    rep.bullets([
        f"Bundle `{bundle.name}` variant `{args.variant}`; pool = {n} training items of {data.name}; {len(val_items)} "
        f"validation items (checkpoint choice) and {len(test_items)} test items (reported Dice, {args.eval_samples} pass).",
        f"Rounds: {', '.join(f'{f:g}%' for f in steps)} labelled ({', '.join(map(str, counts))} items); every round "
        f"retrains from random initialisation for **{args.budget_seconds:.0f} {budget_words(args.budget_clock)}** (the bundle's "
        "train config via monai.bundle).",
        f"Uncertainty: the app's `UncertaintyScoring` ({args.scoring_samples} passes, prompt = caption) + `MostUncertain` "
        f"(score `vlseg_uncertainty_top5`), one pick at a time. Random: {args.seeds} seed(s); seed 0 shares the "
        "initial labelled set with the uncertainty run.",
    ])
    if app_error:
        rep.p(f"**Uncertainty strategy not run:** {app_error}")
    headers = ["labelled %", "items"] + list(curves) + (["random mean ± std"] if rand else [])
    rows = []
    for i, f in enumerate(fr):
        row = [f"{f:g}", counts[i]]
        for cv in curves.values():
            row.append(cv[i]["dice"] if i < len(cv) else None)
        if rand:
            row.append(f"{rand_mean[i]:.3f} ± {rand_std[i]:.3f}")
        rows.append(row)
    rep.h2("Test Dice per round")
    rep.table(headers, rows)
    series, bands = {}, {}
    if unc:
        series["uncertainty (app strategy)"] = ([p["fraction"] for p in unc], [p["dice"] for p in unc])
    if rand:
        series[f"random (mean of {len(rand)})"] = (fr, rand_mean)
        bands[f"random (mean of {len(rand)})"] = rand_std
    if series:
        line_plot(out / "active_learning.png", series, "labelled fraction of the training set (%)", "test Dice",
                  f"Active learning ({bundle.name}, {args.budget_seconds:.0f} {budget_unit(args.budget_clock)} per round)", bands=bands,
                  hlines={"95% of full-data Dice": target} if target else None)
        rep.image(out / "active_learning.png", "Test Dice against the labelled fraction (band: ± std over random seeds)")
    rep.h2("Labelling saved")
    if target is None:
        rep.p("No full-data Dice (the run stopped before 100 % and no full training succeeded).")
    else:
        def say(v):
            return f"{v:.1f} %" if v is not None else f"not reached by {fr[-1]:g} %"

        txt = (f"Full-data Dice {full:.3f} -> target 95 % = {target:.3f}. Uncertainty strategy reaches it at "
               f"{say(need_u)} labelled, random (mean) at {say(need_r)}.")
        if need_u is not None and need_r is not None:
            txt += f" **Saving: {need_r - need_u:.1f} percentage points of the training set " \
                   f"({(need_r - need_u) / 100 * n:.0f} images, {100 * (need_r - need_u) / need_r:.0f} % fewer labels).**"
        rep.p(txt)
    rep.p(f"Time in the app's scoring: {t_scoring:.0f} s in total.")
    path = rep.write()
    log(f"report: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
