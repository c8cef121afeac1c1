#!/usr/bin/env python
"""Prompt robustness on the test split: Dice per prompt level (p1 "polyp" ... p9 full description) and per
MedCLIPSeg test variant (original, contradictory, missing_location, overdescriptive, underdescriptive), per bundle.

Weights: the checkpoints of the accuracy benchmark (``reports/accuracy/results.json``) when present, else each
bundle's ``models/model.pt``. The text-blind BasicUNet of the accuracy run is shown as a reference line (the prompt
cannot change its answer).

    python scripts/benchmark_prompts.py              # after scripts/benchmark_accuracy.py
    python scripts/benchmark_prompts.py --quick
"""

from __future__ import annotations

from pathlib import Path

from vlseg.bench.cli import base_parser, command_line, log
from vlseg.bench.data import EXTRA_VARIANTS, PROMPT_LEVELS, TEST_VARIANTS
from vlseg.bench.evaluate import evaluate_items
from vlseg.bench.report import Report, bar_plot, default_out_dir, line_plot
from vlseg.bench.runner import load_trained
from vlseg.bench.trained import start_trained_benchmark, trained_models


def parse_args(argv=None):
    p = base_parser("prompts", __doc__)
    p.add_argument("--datalist", type=Path, default=None)
    p.add_argument("--from-accuracy", type=Path, default=default_out_dir("accuracy") / "results.json",
                   help="results.json of the accuracy benchmark (its checkpoints are evaluated)")
    p.add_argument("--variant", default="small", help="variant of a bundle's own models/model.pt when not recorded")
    p.add_argument("--samples", type=int, default=1, help="stochastic passes per image (default 1: one pass)")
    p.add_argument("--max-test", type=int, default=None, help="only the first N test items (quick: 4)")
    p.add_argument("--keys", nargs="*", default=None, help="prompt keys (default: p1..p9 + the MedCLIPSeg variants)")
    a = p.parse_args(argv)
    a.max_test = a.max_test or (4 if a.quick else None)
    if a.quick and a.keys is None:
        a.keys = ["p1", "p5", "p9", "original", "contradictory", "other_object"]
    return a


def main(argv=None) -> int:
    args = parse_args(argv)
    out, data, acc = start_trained_benchmark(args)
    rep = Report(out, f"Prompt robustness ({data.name}, test split)", command_line())
    rep.machine()
    available = data.prompt_keys("test")
    keys = [k for k in args.keys if k in available] if args.keys else available
    levels = [k for k in keys if k in PROMPT_LEVELS]
    variants = [k for k in keys if k in TEST_VARIANTS + EXTRA_VARIANTS]
    test_items = data.items("test")
    models = trained_models(args.bundles_dir, args.bundles, args.from_accuracy, args.variant, include_baseline=True)
    log(f"{len(test_items)} test items, prompt keys {keys}")
    results, skipped = {}, []
    for tm in models:
        if tm.checkpoint is None:
            skipped.append(f"{tm.name}: {tm.note}")
            continue
        label = f"{tm.name} ({tm.variant})"
        log(f"{label}: {tm.checkpoint}")
        size = None
        if tm.name == "monai_basicunet":
            size = next((m.get("size") for m in acc.get("models", []) if m["name"] == "monai_basicunet"), None)
        try:
            bm = load_trained(tm, size)
        except Exception as e:  # noqa: BLE001 - report and go on with the others
            skipped.append(f"{tm.name}: cannot load ({type(e).__name__}: {e})")
            continue
        results[label] = {"source": tm.source, "checkpoint": str(tm.checkpoint), "dice": {}, "iou": {}, "nsd": {}, "dice_std": {}}
        for k in keys:
            ev = evaluate_items(bm, test_items, prompt_key=k, num_samples=args.samples)["summary"]
            for m in ("dice", "iou", "nsd", "dice_std"):
                results[label][m][k] = ev[m]
        log("  Dice per key: " + ", ".join(f"{k} {results[label]['dice'][k]:.3f}" for k in keys))

    example = {k: (test_items[0].get("prompts") or {}).get(k, "") for k in keys} if test_items else {}
    rep.results.update(models=results, keys=keys, example_prompts=example, skipped=skipped,
                       data={"name": data.name, "datalist": str(data.datalist), "n_test": len(test_items)},
                       settings={"samples": args.samples})
    rep.h2("Setup")
    rep.bullets([
        f"{len(test_items)} test items of {data.name}; each prompt key replaces the text of every test item.",
        f"{args.samples} stochastic pass(es) per image, threshold 0.5; Dice at the network input size.",
        "Weights: " + "; ".join(f"{lab}: {r['source']}" for lab, r in results.items()) if results else "no trained weights found",
    ])
    if skipped:
        rep.p("Skipped: " + "; ".join(skipped))
    labels = list(results)
    for title, ks in (("Prompt levels p1 (shortest) .. p9 (full description)", levels),
                      ("MedCLIPSeg test variants" + (" (+ demo: another object's description)" if
                                                     any(k in EXTRA_VARIANTS for k in variants) else ""), variants)):
        if not ks or not labels:
            continue
        rep.h2(title)
        rows = []
        for k in ks:
            ex = example.get(k, "")
            rows.append([f"`{k}`", (ex[:70] + "...") if len(ex) > 70 else ex] + [results[lab]["dice"][k] for lab in labels])
        rows.append(["**spread** (max - min)", ""] + [max(results[lab]["dice"][k] for k in ks) - min(results[lab]["dice"][k] for k in ks)
                                                      for lab in labels])
        rep.table(["key", "example (first test item)"] + [f"Dice {lab}" for lab in labels], rows)
    if labels and levels:
        line_plot(out / "prompt_levels.png", {lab: ([int(k[1:]) for k in levels], [results[lab]["dice"][k] for k in levels])
                                              for lab in labels}, "prompt level (p1 .. p9)", "test Dice",
                  "Dice per prompt level")
        rep.image(out / "prompt_levels.png", "Test Dice per prompt level")
    if labels and variants:
        bar_plot(out / "prompt_variants.png", variants, {lab: [results[lab]["dice"][k] for k in variants] for lab in labels},
                 "test Dice", "Dice per MedCLIPSeg prompt variant", ylim=(0, 1))
        rep.image(out / "prompt_variants.png", "Test Dice per MedCLIPSeg prompt variant")
    for wrong in ("contradictory", "other_object"):
        if labels and "original" in keys and wrong in keys:
            rep.p(f"Dice change from the original description to `{wrong}`: " + "; ".join(
                f"{lab} {results[lab]['dice'][wrong] - results[lab]['dice']['original']:+.3f}" for lab in labels) + ".")
    path = rep.write()
    log(f"report: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
