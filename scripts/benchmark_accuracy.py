#!/usr/bin/env python
"""Accuracy under an equal CPU budget: the three bundles and MONAI BasicUNet trained from random initialisation.

Every model gets the same training budget (``--budget-seconds``, measured by the training loop, validation included;
data caching and process start-up excluded and reported separately), in wall-clock seconds or, with
``--budget-clock process``, in CPU seconds of the training process (fair when other work shares the machine). Bundles train with their
own ``configs/train.json`` (+ the variant file) through ``python -m monai.bundle run`` with overrides for the
datalist, the output folders, the budget and ``train_encoders`` (no pretrained weights can be fetched here);
the best-validation checkpoint is evaluated on the test split with the bundle's own inference preprocessing and
stochastic inferer: Dice, IoU and NSD (2 px) per image, averaged. Data efficiency: one bundle also trained on the
10/25/50 % subsets (Kvasir: MedCLIPSeg's fixed subset tables) with the same budget.

    python scripts/benchmark_accuracy.py                       # Kvasir-SEG when ../shared/data exists, else demo
    python scripts/benchmark_accuracy.py --quick               # smoke test: tiny variants, seconds of training
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from vlseg.bench.bundles import load_bundle_model
from vlseg.bench.cli import add_budget_clock, apply_threads, base_parser, budget_unit, budget_words, command_line, log, out_dir
from vlseg.bench.data import BenchData, cache_dir, resolve_data, subset_items, write_datalist
from vlseg.bench.evaluate import evaluate_items
from vlseg.bench.report import Report, bar_plot, line_plot
from vlseg.bundles import find_bundles, variant_label


def parse_args(argv=None):
    p = base_parser("accuracy", __doc__)
    p.add_argument("--datalist", type=Path, default=None, help="canonical datalist (default: Kvasir-SEG or the demo set)")
    p.add_argument("--variant", default=None, help="bundle variant to train (default small; quick: tiny)")
    p.add_argument("--budget-seconds", type=float, default=None, help="training budget per model (default 900; quick 8)")
    add_budget_clock(p)
    p.add_argument("--fractions", nargs="*", type=int, default=None, help="data-efficiency subsets in %% (default 10 25 50 100)")
    p.add_argument("--efficiency-bundles", nargs="*", default=None,
                   help="bundles trained on every subset (default: the first bundle)")
    p.add_argument("--eval-samples", type=int, default=None,
                   help="stochastic passes at test time (default: the bundle's inference num_samples)")
    p.add_argument("--max-train", type=int, default=None, help="use only the first N training items (quick: 8)")
    p.add_argument("--max-val", type=int, default=None, help="use only the first N validation items (quick: 4)")
    p.add_argument("--max-test", type=int, default=None, help="evaluate only the first N test items (quick: 4)")
    p.add_argument("--no-baseline", action="store_true", help="skip MONAI BasicUNet")
    p.add_argument("--work-dir", type=Path, default=None, help="checkpoints and logs (default: ~/.cache/vlseg/bench/work/accuracy)")
    p.add_argument("--epoch-length", type=int, default=None,
                   help="iterations per training epoch, i.e. between validations / best-checkpoint saves (default 50; "
                        "quick: the bundle's own). Without it a budget shorter than one pass over the data leaves no checkpoint")
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                   help="extra train-config override for every bundle (JSON value), e.g. num_workers=0")
    p.add_argument("--timeout", type=float, default=None, help="kill a training process after this many seconds")
    p.add_argument("--in-process", action="store_true",
                   help="run monai.bundle's `run` in this process instead of `python -m monai.bundle run` (default with --quick)")
    a = p.parse_args(argv)
    q = a.quick
    a.variant = a.variant or ("tiny" if q else "small")
    a.budget_seconds = a.budget_seconds or (8.0 if q else 900.0)
    a.fractions = a.fractions or ([50, 100] if q else [10, 25, 50, 100])
    a.max_train = a.max_train or (8 if q else None)
    a.max_val = a.max_val or (4 if q else None)
    a.max_test = a.max_test or (4 if q else None)
    a.timeout = a.timeout or (a.budget_seconds * 3 + 600)
    a.in_process = a.in_process or q
    if a.epoch_length is None and not q:
        a.epoch_length = 50
    return a


def parse_overrides(pairs) -> dict:
    out = {}
    for s in pairs:
        k, _, v = s.partition("=")
        try:
            out[k] = json.loads(v)
        except ValueError:
            out[k] = v
    return out


def epochs_from_log(log: Path) -> int | None:
    import re

    try:
        text = log.read_text(errors="replace")
    except OSError:
        return None
    found = [int(m) for m in re.findall(r"SupervisedTrainer - INFO - Epoch\[(\d+)\] Complete", text)]
    found += [int(m) for m in re.findall(r"Epoch: (\d+)/\d+, Iter", text)]  # StatsHandler iteration lines
    found += [int(m) for m in re.findall(r"Epoch \[(\d+)/\d+\]", text)]  # ignite ProgressBar
    found += [int(m) for m in re.findall(r"Epoch\[(\d+)\] Metrics -- train_", text)]  # trainer metrics
    return max(found) if found else None


def stopped_by_budget(log: Path) -> bool:
    try:
        return "StopAfterSeconds" in log.read_text(errors="replace")
    except OSError:
        return False


def make_datalist(data: BenchData, path: Path, train_items, val_items, test_items) -> Path:
    return write_datalist({"name": data.name, "description": f"benchmark cut of {data.datalist}",
                           "training": train_items, "validation": val_items, "test": test_items}, path)


def main(argv=None) -> int:
    args = parse_args(argv)
    apply_threads(args.threads)
    out = out_dir(args)
    work = Path(args.work_dir) if args.work_dir else cache_dir() / "work" / ("accuracy_quick" if args.quick else "accuracy")
    work.mkdir(parents=True, exist_ok=True)
    data = resolve_data(args.datalist, quick=args.quick,
                        limits={k: v for k, v in (("training", args.max_train), ("validation", args.max_val), ("test", args.max_test)) if v})
    rep = Report(out, f"Accuracy under an equal CPU training budget ({data.name})", command_line())
    rep.machine()
    extra = parse_overrides(args.override)
    if args.quick or args.budget_clock == "process":
        extra.setdefault("num_workers", 0)  # process clock: data loading must run inside the budgeted process
    bundles = find_bundles(args.bundles_dir, args.bundles)
    eff = args.efficiency_bundles if args.efficiency_bundles is not None else [b.name for b in bundles[:1]]
    train_all, val_all, test_items = data.items("training"), data.items("validation"), data.items("test")
    log(f"data: {data.name} ({len(train_all)} train / {len(val_all)} val / {len(test_items)} test items), "
        f"budget {args.budget_seconds:.0f} {budget_words(args.budget_clock)} per model, variant {args.variant}")

    models = []

    def evaluate(bm, name, variant, fraction, train_info):
        t = time.perf_counter()
        ev = evaluate_items(bm, test_items, num_samples=args.eval_samples or bm.num_samples)
        m = dict(name=name, variant=variant, fraction=fraction, **train_info, test=ev["summary"],
                 eval_s=time.perf_counter() - t, eval_samples=args.eval_samples or bm.num_samples)
        models.append(m)
        s = ev["summary"]
        log(f"  {name} ({variant}, {fraction}%): Dice {s['dice']:.3f} IoU {s['iou']:.3f} NSD {s['nsd']:.3f}")
        (out / "per_image").mkdir(exist_ok=True)
        (out / "per_image" / f"{name}_{variant}_{fraction}.json").write_text(json.dumps(ev["rows"], indent=0))

    for b in bundles:
        fracs = args.fractions if b.name in eff else [100]
        for frac in sorted(set(fracs), reverse=True):
            train_items = subset_items(data, "training", frac)
            val_items = val_all if frac >= 100 or not (data.raw().get("subsets") or {}).get(str(frac)) or data.limits \
                else subset_items(data, "validation", frac)
            wd = work / f"{b.name}_{args.variant}_{frac}"
            dl = make_datalist(data, wd / "datalist.json", train_items, val_items, test_items)
            log(f"training {b.name} ({args.variant}) on {frac}% ({len(train_items)} items) for {args.budget_seconds:.0f} s ...")
            from vlseg.bench.train import train_bundle

            variant = None if variant_label(args.variant) == "paper" else args.variant
            try:
                r = train_bundle(b, variant, dl, wd, args.budget_seconds, extra=extra, timeout=args.timeout,
                                 in_process=args.in_process, epoch_length=args.epoch_length, clock=args.budget_clock)
            except Exception as e:  # noqa: BLE001 - e.g. a bundle without the variant file: report, go on
                log(f"  FAILED: {type(e).__name__}: {e}")
                models.append(dict(name=b.name, variant=variant_label(args.variant), fraction=frac, n_train=len(train_items),
                                   error=f"{type(e).__name__}: {e}"))
                continue
            info = {"checkpoint": str(r.checkpoint) if r.checkpoint else None, "train_wall_s": r.wall_s,
                    "epochs": epochs_from_log(r.log), "stopped_by_budget": stopped_by_budget(r.log), "log": str(r.log),
                    "n_train": len(train_items), "overrides": r.overrides}
            if not r.ok:
                log(f"  FAILED: {r.error}")
                models.append(dict(name=b.name, variant=variant_label(args.variant), fraction=frac, error=r.error, **info))
                continue
            bm = load_bundle_model(b, variant, checkpoint=r.checkpoint)
            evaluate(bm, b.name, variant_label(args.variant), frac, info)

    if not args.no_baseline:
        from vlseg.bench.baseline import basicunet_model, train_basicunet

        log(f"training MONAI BasicUNet for {args.budget_seconds:.0f} s ...")
        size = (64, 64) if args.quick else (224, 224)
        t = time.perf_counter()
        r = train_basicunet(train_all, val_all, args.budget_seconds, work / "monai_basicunet", size=size,
                            epoch_length=args.epoch_length, clock=args.budget_clock)
        bm = basicunet_model(r["checkpoint"], size=size)
        evaluate(bm, "monai_basicunet", "default", 100,
                 {"checkpoint": str(r["checkpoint"]), "train_wall_s": time.perf_counter() - t, "epochs": r["epochs"],
                  "stopped_by_budget": True, "n_train": r["n_train"], "train_loop_s": r["train_s"],
                  "train_loop_wall_s": r["train_wall_s"], "size": list(size)})

    # ------------------------------------------------------------------------------------------------ report
    rep.results.update(models=models, data={"name": data.name, "datalist": str(data.datalist), "kind": data.kind,
                                            "n_train": len(train_all), "n_val": len(val_all), "n_test": len(test_items)},
                       settings={"budget_seconds": args.budget_seconds, "budget_clock": args.budget_clock,
                                 "threads": args.threads, "variant": args.variant,
                                 "fractions": args.fractions, "efficiency_bundles": eff, "overrides": extra})
    rep.h2("Setup")
    rep.bullets([
        f"Data: {data.description or data.name}; {len(train_all)} training / {len(val_all)} validation / "
        f"{len(test_items)} test items; datalist `{data.datalist}`.",
        f"Budget: **{args.budget_seconds:.0f} {budget_words(args.budget_clock)} per model** (validation included; the bundles stop "
        "with `StopAfterSeconds` when the next epoch would not fit), random initialisation, encoders trainable "
        "(`train_encoders: true` where the bundle has the switch).",
        f"Bundles: variant `{args.variant}`, their own `train.json` run by "
        f"`{'monai.bundle create_workflow/run in-process' if args.in_process else 'python -m monai.bundle run'}`; overrides: "
        "datalist, ckpt_dir, output_dir, max_train_seconds, train_encoders"
        + (f", epoch_length {args.epoch_length} (validation + best checkpoint every {args.epoch_length} iterations)"
           if args.epoch_length else "") + (f", {sorted(extra)}" if extra else "") + ".",
        "Test metrics at the label size (224x224 for the prepared Kvasir-SEG; outputs resized back), threshold 0.5 on the "
        "mean probability of the bundle's inference passes; NSD tolerance 2 px. MONAI BasicUNet (text-blind) trains "
        "with DiceCE + Adam 1e-3 on the same images at the same size and budget.",
    ])
    ceiling = data.raw().get("text_blind_ceiling")
    if ceiling and data.kind != "kvasir":
        rep.p(f"Demo data text-blind ceiling (a perfect instance segmenter that ignores the prompt): "
              f"max Dice {ceiling.get('max')} ({ceiling.get('split')} split).")
    full = [m for m in models if m.get("fraction") == 100]
    rep.h2("Test accuracy (100 % of the training data)")
    rows = []
    for m in full:
        if "error" in m:
            rows.append([m["name"], m["variant"], "-", "-", "-", m.get("epochs"), "-", f"FAILED: {m['error'][:150]}"])
            continue
        s = m["test"]
        rows.append([m["name"], m["variant"], f"{s['dice']:.3f} ± {s['dice_std']:.3f}", f"{s['iou']:.3f} ± {s['iou_std']:.3f}",
                     f"{s['nsd']:.3f} ± {s['nsd_std']:.3f}", m.get("epochs"), m.get("train_wall_s"),
                     f"{m.get('eval_samples')} pass(es) at test"])
    rep.table(["model", "variant", "Dice", "IoU", "NSD (2 px)", "epochs (started) in budget", "process wall s", "note"], rows, digits=1)
    good = [m for m in full if "test" in m]
    if good:
        bar_plot(out / "accuracy.png", [m["name"] for m in good],
                 {k: [m["test"][k] for m in good] for k in ("dice", "iou", "nsd")},
                 "score", f"Test accuracy after {args.budget_seconds:.0f} {budget_unit(args.budget_clock)} of training", ylim=(0, 1),
                 errors={k: [m["test"][f"{k}_std"] for m in good] for k in ("dice", "iou", "nsd")})
        rep.image(out / "accuracy.png", "Dice / IoU / NSD on the test split (error bars: std over images)")
    effm = [m for m in models if m["name"] in eff]
    if effm:
        rep.h2("Data efficiency")
        rows = []
        for m in sorted(effm, key=lambda m: (m["name"], m["fraction"])):
            s = m.get("test") or {}
            rows.append([m["name"], f"{m['fraction']}%", m.get("n_train"), s.get("dice"), s.get("iou"), s.get("nsd"),
                         m.get("epochs"), m.get("error", "")[:100] if m.get("error") else ""])
        rep.table(["bundle", "training subset", "items", "Dice", "IoU", "NSD", "epochs in budget", "note"], rows)
        series = {}
        for name in eff:
            pts = sorted((m["fraction"], m["test"]["dice"]) for m in effm if m["name"] == name and "test" in m)
            if pts:
                series[name] = ([p[0] for p in pts], [p[1] for p in pts])
        if series:
            line_plot(out / "data_efficiency.png", series, "training data used (%)", "test Dice",
                      f"Data efficiency (same {args.budget_seconds:.0f} {budget_unit(args.budget_clock)} budget)")
            rep.image(out / "data_efficiency.png", "Test Dice against the fraction of training data")
        rep.p("Every subset gets the same time budget, so smaller subsets see each image more often.")
    path = rep.write()
    log(f"report: {path}")
    return 0 if all("error" not in m for m in models) else 1


if __name__ == "__main__":
    raise SystemExit(main())
