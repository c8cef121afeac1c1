"""Quality/time curve of MedCLIPSeg's cheaper samplers against the exact N-pass run (issue 15, item 4).

For each image: one pass (the x-axis unit), the exact ``--reference``-pass run (the maps every method is compared
with), the plain first-n passes of that run, ``control_variate`` with a few real passes
(:func:`scripts.sampler.sample_control_variate`) and ``adaptive`` (:func:`scripts.sampler.sample_adaptive`). Every
map of :data:`vlseg.uncertainty.MAP_NAMES` gets max |delta| and mean |delta| against the reference; the bound of the
issue (max <= 0.05, mean <= 0.005) is checked on ``pred`` and ``uncertainty``.

Times are CPU seconds of this process (``time.process_time``) with ONE torch thread, so other jobs on a shared machine
do not inflate them; the plain-n times are measured once on the first image (they do not depend on the content).

Usage (from the bundle folder)::

    python -m scripts.benchmark_sampling_quality --variant default --images 4 --out_dir ../../reports/sampling
    python -m scripts.benchmark_sampling_quality --variant small --checkpoint models/model.pt --tag small_trained

Images: the ``test`` split of ``--datalist`` (the demo set by default), through the bundle's preprocessing.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

BUNDLE = Path(__file__).resolve().parents[1]
BOUND = {"max": 0.05, "mean": 0.005}
BOUND_MAPS = ("pred", "uncertainty")


def cpu_time(fn):
    c0 = time.process_time()
    out = fn()
    return time.process_time() - c0, out


def load_inputs(parser, datalist, n: int):
    from monai.data import Dataset

    from scripts.data import inference_items

    items = inference_items(None, None, datalist, "test", n)
    data = Dataset(items, transform=parser.get_parsed_content("preprocessing"))
    return [(d["image"].as_tensor()[None].float() if hasattr(d["image"], "as_tensor") else d["image"][None].float(),
             d["text_ids"][None], d["text_mask"][None], d.get("name", str(i))) for i, d in enumerate(data)]


def deltas(maps: dict, ref: dict) -> dict:
    return {k: {"max": float((maps[k] - ref[k]).abs().max()), "mean": float((maps[k] - ref[k]).abs().mean())}
            for k in ref}


def aggregate(rows: list[dict]) -> dict:
    """Worst max and average mean |delta| over the images."""
    return {k: {"max": max(r[k]["max"] for r in rows), "mean": sum(r[k]["mean"] for r in rows) / len(rows)}
            for k in rows[0]}


def within(agg: dict) -> bool:
    return all(agg[k]["max"] <= BOUND["max"] and agg[k]["mean"] <= BOUND["mean"] for k in BOUND_MAPS)


def plot(results: dict, path: Path) -> None:
    from vlseg.viz import pyplot, save_figure

    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    styles = {"plain": ("o", "C0"), "control_variate": ("s", "C1"), "adaptive": ("D", "C2")}
    for ax, stat in zip(axes, ("max", "mean")):
        for method, (marker, color) in styles.items():
            pts = sorted((r["x_one_pass"], r["maps"]) for r in results["methods"] if r["method"] == method)
            for m, ls in (("pred", "-"), ("uncertainty", ":")):
                if pts:
                    ax.plot([p[0] for p in pts], [max(p[1][m][stat], 1e-6) for p in pts], marker=marker, color=color,
                            linestyle=ls if len(pts) > 1 else "none", label=f"{method} {m}")
        ax.axhline(BOUND[stat], color="k", lw=0.8, ls="--", label=f"bound {BOUND[stat]}")
        for r in results["methods"]:
            if r["method"] == "exact_other_seed":  # another exact run (other seeds), off the x range
                ax.axhline(max(r["maps"]["pred"][stat], 1e-6), color="C4", lw=0.8, ls="-",
                           label=f"exact {r['budget']}-pass run, other seed, pred ({r['x_one_pass']}x)")
        ax.axvline(5.0, color="grey", lw=0.8, ls="-.", label="5x one pass")
        ax.set_xlabel("CPU time / one pass (1 thread)")
        ax.set_ylabel(f"{stat} |delta| vs {results['reference']}-pass run")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"MedCLIPSeg {results['variant']} ({results['weights']}): {results['images']} images", fontsize=10)
    save_figure(fig, path)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", default="default", choices=["default", "small", "tiny"])
    ap.add_argument("--checkpoint", default=None, help="trained weights (random weights without)")
    ap.add_argument("--datalist", default=None, help="images of its test split (default: the demo set)")
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--reference", type=int, default=30, help="passes of the exact reference run")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--plain", default="1,2,3,4,6,8,12", help="first-n passes of the reference")
    ap.add_argument("--cv", default="1,2,3", help="real passes of the control-variate sampler")
    ap.add_argument("--truth", type=int, default=0,
                    help="passes of an independent long run: every method's |delta| to it too (0: off)")
    ap.add_argument("--bf16", action="store_true", help="also time 4 passes with the network cast to bfloat16")
    ap.add_argument("--out_dir", default=str(BUNDLE.parents[1] / "reports" / "sampling"))
    ap.add_argument("--tag", default=None, help="file name stem (default: the variant)")
    args = ap.parse_args(argv)

    torch.set_num_threads(1)
    from scripts.benchmark_sampling import build_with_parser
    from scripts.sampler import sample_adaptive, sample_control_variate
    from vlseg.uncertainty import uncertainty_maps

    net, parser = build_with_parser(args.variant, args.checkpoint)
    inputs = load_inputs(parser, args.datalist, args.images)
    n_ref, seed = args.reference, args.seed
    plain_n = [int(v) for v in args.plain.split(",") if 0 < int(v) < n_ref]
    cv_n = [int(v) for v in args.cv.split(",") if int(v) > 0]
    load_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    truth = None
    rows = {}  # (method, budget) -> list of per-image deltas / times
    one_pass, plain_time = [], {}

    def add(method, budget, maps, seconds, passes, ref):
        r = rows.setdefault((method, budget), {"deltas": [], "seconds": [], "passes": [], "truth": []})
        r["deltas"].append(deltas(maps, ref))
        if truth is not None:
            r["truth"].append(deltas(maps, truth))
        r["seconds"].append(seconds)
        r["passes"].append(passes)

    with torch.inference_mode():
        img0, ids0, mask0, _ = inputs[0]
        net(img0, ids0, mask0)  # warm-up
        net.sample_probabilities(img0, ids0, mask0, num_samples=2, seed=seed)
    for i, (img, ids, mask, name) in enumerate(inputs):
        with torch.inference_mode():
            one_pass.append(min(cpu_time(lambda: net(img, ids, mask))[0] for _ in range(2)))
        t_ref, ref_p = cpu_time(lambda: net.sample_probabilities(img, ids, mask, num_samples=n_ref, seed=seed))
        ref = uncertainty_maps(ref_p)
        truth = None
        if args.truth:
            truth = uncertainty_maps(net.sample_probabilities(img, ids, mask, num_samples=args.truth, seed=seed + 2))
        add("exact", n_ref, ref, t_ref, n_ref, ref)
        # the same exact run with other seeds: how far two 30-pass runs are apart (the Monte-Carlo floor)
        other = uncertainty_maps(net.sample_probabilities(img, ids, mask, num_samples=n_ref, seed=seed + 1))
        add("exact_other_seed", n_ref, other, t_ref, n_ref, ref)
        for n in plain_n:
            if i == 0:
                plain_time[n] = cpu_time(lambda: net.sample_probabilities(img, ids, mask, num_samples=n, seed=seed))[0]
            add("plain", n, uncertainty_maps(ref_p[:n]), plain_time[n], n, ref)
        for n in cv_n:
            t, (p, info) = cpu_time(lambda: sample_control_variate(net, img, ids, mask, n_ref, seed, cv_samples=n))
            add("control_variate", n, uncertainty_maps(p), t, info["passes"], ref)
        t, (p, info) = cpu_time(lambda: sample_adaptive(net, img, ids, mask, n_ref, seed))
        add("adaptive", "default", uncertainty_maps(p), t, info["passes"], ref)
        if args.bf16 and i == 0:
            nb = copy.deepcopy(net).to(torch.bfloat16)
            nb.sample_probabilities(img.bfloat16(), ids, mask, num_samples=1, seed=seed)  # warm-up
            t, p = cpu_time(lambda: nb.sample_probabilities(img.bfloat16(), ids, mask, num_samples=4, seed=seed))
            t32 = plain_time.get(4) or cpu_time(lambda: net.sample_probabilities(img, ids, mask, 4, seed=seed))[0]
            bf16_note = {"passes": 4, "bf16_cpu_seconds": round(t, 3), "fp32_cpu_seconds": round(t32, 3),
                         "speedup": round(t32 / t, 2),
                         "delta_vs_fp32_same_passes": deltas(uncertainty_maps(p.float()), uncertainty_maps(ref_p[:4]))}
            del nb
        print(f"[{i + 1}/{len(inputs)}] {name}: one pass {one_pass[-1]:.3f} s, reference {t_ref:.1f} s, "
              f"adaptive {info['passes']} passes", flush=True)

    unit = sum(one_pass) / len(one_pass)
    methods = []
    for (method, budget), r in rows.items():
        agg = aggregate(r["deltas"])
        secs = sum(r["seconds"]) / len(r["seconds"])
        methods.append({"method": method, "budget": budget, "passes_mean": sum(r["passes"]) / len(r["passes"]),
                        "passes_per_image": r["passes"], "cpu_seconds": round(secs, 3),
                        "x_one_pass": round(secs / unit, 2), "maps": agg, "within_bound": within(agg),
                        "within_bound_at_5x": within(agg) and secs / unit <= 5.0})
        if r["truth"]:
            methods[-1]["maps_vs_truth"] = aggregate(r["truth"])
    results = {
        "variant": args.variant, "weights": args.checkpoint or "random", "images": len(inputs),
        "reference": n_ref, "seed": seed, "truth_passes": args.truth, "one_pass_cpu_seconds": round(unit, 3),
        "bound": BOUND,
        "bound_maps": list(BOUND_MAPS), "methods": methods,
        "clock": "time.process_time (CPU seconds of this process), torch threads 1",
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "load_average_start": load_start,
        "load_average_end": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "torch": torch.__version__, "machine": platform.machine(), "processor": platform.processor(),
        "command": "python -m scripts.benchmark_sampling_quality "
                   + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    if args.bf16:
        results["bf16"] = bf16_note
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = args.tag or args.variant
    (out / f"{stem}.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(results, out / f"{stem}.png")
    for m in sorted(methods, key=lambda m: m["x_one_pass"]):
        print(f"{m['method']:>16} {str(m['budget']):>8}: {m['x_one_pass']:6.2f}x  "
              f"pred max {m['maps']['pred']['max']:.4f} "
              f"mean {m['maps']['pred']['mean']:.5f}  unc max {m['maps']['uncertainty']['max']:.4f} "
              f"mean {m['maps']['uncertainty']['mean']:.5f}  {'OK' if m['within_bound'] else '--'}")
    return results


if __name__ == "__main__":
    sys.path.insert(0, str(BUNDLE))
    main()
