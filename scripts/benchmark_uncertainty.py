#!/usr/bin/env python
"""Uncertainty quality per bundle on the test split: calibration (expected calibration error, 15 bins), how well the
uncertainty map finds the wrong pixels (AUROC), and where the doubt lies (boundary band vs object interior vs
background).

* ECE (top-label): pixel confidence max(p, 1-p) against pixel correctness of the 0.5-thresholded mask, 15 equal bins;
  also the foreground-reliability variant (bins of p against the foreground rate).
* AUROC: the uncertainty map as a score for "this pixel is wrong" (prediction != label), pooled over all test pixels.
* Regions: boundary = label XOR eroded(label) (``--boundary-width`` px), interior = eroded label, background = rest;
  pooled mean uncertainty per region.
* Image level: Spearman correlation of the image's mean uncertainty with its error (1 - Dice): what active learning
  relies on.
* Gate (``vlseg.bench.gate``), per bundle and per image score of ``vlseg.scores`` (mean, top-5 %, max, boundary-
  discounted, mutual-information mean / top-5 %, standard-deviation mean; the maps come from the same passes):
  Spearman(score, 1 - Dice) and the share of the worst 10 % of images (by Dice) that are in the top 10 % by score,
  each with a seeded bootstrap 95 % CI (``--gate-boot`` resamples). Per-image scores and Dice are kept in
  results.json (``per_image``), so the gate can be recomputed. Choose a score on ``--split validation``, not on test.

Inference is the bundle's own stochastic inference (``num_samples`` of its inference config unless ``--samples``).

    python scripts/benchmark_uncertainty.py            # after scripts/benchmark_accuracy.py
    python scripts/benchmark_uncertainty.py --quick
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vlseg.bench.calibration import CalibrationAccumulator, auroc, region_means
from vlseg.bench.cli import base_parser, command_line, log
from vlseg.bench.evaluate import predict_items
from vlseg.bench.gate import gate, gate_columns, gate_rows, spearman
from vlseg.bench.report import Report, bar_plot, default_out_dir, line_plot
from vlseg.bench.runner import load_trained
from vlseg.bench.trained import start_trained_benchmark, trained_models
from vlseg.metrics import segmentation_metrics
from vlseg.scores import SCORES, compute_scores


def parse_args(argv=None):
    p = base_parser("uncertainty", __doc__)
    p.add_argument("--datalist", type=Path, default=None)
    p.add_argument("--from-accuracy", type=Path, default=default_out_dir("accuracy") / "results.json")
    p.add_argument("--variant", default="small", help="variant of a bundle's own models/model.pt when not recorded")
    p.add_argument("--samples", type=int, default=None, help="stochastic passes (default: the bundle's num_samples)")
    p.add_argument("--bins", type=int, default=15)
    p.add_argument("--boundary-width", type=int, default=2, help="boundary band width in pixels")
    p.add_argument("--max-test", type=int, default=None, help="only the first N test items (quick: 4)")
    p.add_argument("--split", default="test", help="data split to measure (test; validation to choose a score)")
    p.add_argument("--gate-fraction", type=float, default=0.1, help="worst / top fraction of the gate (0.1 = 10 %%)")
    p.add_argument("--gate-boot", type=int, default=1000, help="bootstrap resamples of the gate's 95 %% CIs")
    p.add_argument("--gate-seed", type=int, default=0)
    a = p.parse_args(argv)
    a.max_test = a.max_test or (4 if a.quick else None)
    return a


def measure(bm, items, samples, bins, width, gate_fraction: float = 0.1, gate_boot: int = 1000, gate_seed: int = 0) -> dict:
    top = CalibrationAccumulator(bins, "top_label")
    pos = CalibrationAccumulator(bins, "positive")
    unc_all, err_all = [], []
    sums = {"boundary": [0.0, 0], "interior": [0.0, 0], "background": [0.0, 0]}
    img_unc, img_err, dices, ids = [], [], [], []
    img_scores = {name: [] for name in SCORES}
    for p in predict_items(bm, items, num_samples=samples):
        lab = p.label
        top.add(p.prob, lab)
        pos.add(p.prob, lab)
        err = p.mask != lab
        unc_all.append(p.uncertainty.astype(np.float32).ravel())
        err_all.append(err.ravel())
        reg = region_means(p.uncertainty, lab, width)  # boundary = label XOR eroded label; interior; background
        for k in sums:
            if reg[f"n_{k}"]:
                sums[k][0] += reg[k] * reg[f"n_{k}"]
                sums[k][1] += reg[f"n_{k}"]
        d = segmentation_metrics(p.mask, lab)["dice"]
        dices.append(d)
        img_unc.append(float(p.uncertainty.mean()))
        img_err.append(1.0 - d)
        ids.append(str(p.item.get("id") or p.item.get("image")))
        for name, v in compute_scores({"uncertainty": p.uncertainty, **p.maps}, mask=p.mask).items():
            img_scores[name].append(v)
    u, e = np.concatenate(unc_all), np.concatenate(err_all)
    region = {k: (s / n if n else float("nan")) for k, (s, n) in sums.items()}
    return {
        "n_images": len(dices), "n_pixels": int(u.size), "dice": float(np.mean(dices)), "pixel_error_rate": float(e.mean()),
        "ece": top.ece(), "ece_foreground": pos.ece(), "auroc_error": auroc(u, e), "mean_uncertainty": float(u.mean()),
        "mean_uncertainty_on_errors": float(u[e].mean()) if e.any() else float("nan"),
        "mean_uncertainty_on_correct": float(u[~e].mean()) if (~e).any() else float("nan"),
        "region_mean": region,
        "boundary_over_interior": region["boundary"] / region["interior"] if region["interior"] else float("nan"),
        "image_spearman_uncertainty_vs_error": spearman(img_unc, img_err),
        "gate": gate({k: v for k, v in img_scores.items() if len(v) == len(dices)}, dices, gate_fraction, gate_boot,
                     gate_seed),
        "per_image": {"id": ids, "dice": dices, "scores": {k: v for k, v in img_scores.items() if v}},
        "reliability": {k: np.asarray(v).tolist() for k, v in top.bins().items()},
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    out, data, _ = start_trained_benchmark(args)
    rep = Report(out, f"Uncertainty quality ({data.name}, {args.split} split)", command_line())
    rep.machine()
    items = data.items(args.split, limit=args.max_test)
    results, skipped = {}, []
    for tm in trained_models(args.bundles_dir, args.bundles, args.from_accuracy, args.variant):
        if tm.checkpoint is None:
            skipped.append(f"{tm.name}: {tm.note}")
            continue
        try:
            bm = load_trained(tm)
        except Exception as e:  # noqa: BLE001 - report and go on with the others
            skipped.append(f"{tm.name}: cannot load ({type(e).__name__}: {e})")
            continue
        n = args.samples or bm.num_samples
        label = f"{tm.name} ({tm.variant})"
        if hasattr(bm.inferer, "decompose"):
            bm.inferer.decompose = True  # the gate also scores the mutual-information and standard-deviation maps
        log(f"{label}: {n} passes on {len(items)} {args.split} images")
        r = measure(bm, items, n, args.bins, args.boundary_width, args.gate_fraction, args.gate_boot, args.gate_seed)
        r.update(samples=n, source=tm.source, checkpoint=str(tm.checkpoint),
                 sampler="own sampler (sample_probabilities)" if hasattr(bm.network, "sample_probabilities") else "MC dropout")
        results[label] = r
        log(f"  ECE {r['ece']:.4f} AUROC {r['auroc_error']:.3f} boundary/interior {r['boundary_over_interior']:.2f}")

    rep.results.update(models=results, skipped=skipped,
                       settings={"bins": args.bins, "boundary_width": args.boundary_width, "split": args.split,
                                 "gate_fraction": args.gate_fraction, "gate_boot": args.gate_boot,
                                 "gate_seed": args.gate_seed},
                       data={"name": data.name, "datalist": str(data.datalist), "n_test": len(items)})
    rep.h2("Setup")
    rep.bullets([
        f"{len(items)} {args.split} items of {data.name}, default prompt of each item; the bundles' own stochastic "
        "inference.",
        f"ECE with {args.bins} equal-width bins; boundary band {args.boundary_width} px inside the label outline.",
        f"Gate: per image score, Spearman(score, 1 - Dice) and the share of the worst {100 * args.gate_fraction:g} % "
        f"of images in the top {100 * args.gate_fraction:g} % by score, bootstrap 95 % CIs ({args.gate_boot} "
        f"resamples, seed {args.gate_seed}). Scores: " + "; ".join(f"`{s.name}` = {s.description}"
                                                                  for s in SCORES.values()) + ".",
    ])
    if skipped:
        rep.p("Skipped: " + "; ".join(skipped))
    labels = list(results)
    if labels:
        rep.h2("Calibration and error detection")
        rep.table(["model", "passes (sampler)", "Dice", "pixel error rate", "ECE (top-label)", "ECE (foreground)",
                   "AUROC uncertainty -> error", "mean unc. on errors", "mean unc. on correct",
                   "image-level Spearman (unc. vs 1-Dice)"],
                  [[lab, f"{r['samples']} ({r['sampler']})", r["dice"], r["pixel_error_rate"], r["ece"], r["ece_foreground"],
                    r["auroc_error"], r["mean_uncertainty_on_errors"], r["mean_uncertainty_on_correct"],
                    r["image_spearman_uncertainty_vs_error"]] for lab, r in results.items()])
        rep.h2("Gate: does an image score find the images the model gets wrong?")
        rep.table(gate_columns(args.gate_fraction),
                  [row for lab, r in results.items() for row in gate_rows(lab, r["gate"])])
        rep.h2("Where the uncertainty lies")
        rep.table(["model", "boundary band", "object interior", "background", "boundary / interior"],
                  [[lab, r["region_mean"]["boundary"], r["region_mean"]["interior"], r["region_mean"]["background"],
                    r["boundary_over_interior"]] for lab, r in results.items()])
        series = {}
        for lab, r in results.items():
            rel = r["reliability"]
            conf, accu = np.array(rel["confidence"], float), np.array(rel["accuracy"], float)
            ok = ~np.isnan(conf)
            series[lab] = (conf[ok], accu[ok])
        line_plot(out / "reliability.png", series, "confidence max(p, 1-p)", "pixel accuracy",
                  f"Reliability diagram ({args.bins} bins)", diagonal=True)
        rep.image(out / "reliability.png", "Reliability diagram: accuracy per confidence bin (diagonal = calibrated)")
        bar_plot(out / "uncertainty_regions.png", ["boundary", "interior", "background"],
                 {lab: [r["region_mean"][k] for k in ("boundary", "interior", "background")] for lab, r in results.items()},
                 "mean uncertainty", "Mean uncertainty per region")
        rep.image(out / "uncertainty_regions.png", "Mean uncertainty on the boundary band, the object interior and the background")
    path = rep.write()
    log(f"report: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
