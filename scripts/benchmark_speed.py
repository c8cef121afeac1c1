#!/usr/bin/env python
"""Speed and cost of every bundle (paper configuration and `small` variant) next to peer models, in one run.

Per model: total / trainable parameters, forward GFLOPs (torch.utils.flop_counter), CPU latency at batch 1 and 8
(median and IQR of repeated passes after a warm-up), the peak resident memory of a process that only builds and
runs that model (resource.getrusage maxrss; one subprocess per model), training images/second (a few AdamW steps)
and the achieved FLOP rate as a fraction of the machine's measured matmul peak (best of several large torch.mm).
Peers on the same inputs: HF transformers CLIPSeg (random weights), MONAI UNet / BasicUNet / SwinUNETR in 2D and the
segment_anything ViT-B image encoder. MedCLIPSeg's 30-pass uncertainty sampling: naive loop vs the fast path.

    python scripts/benchmark_speed.py                 # full run -> reports/speed/report.md + PNGs
    python scripts/benchmark_speed.py --quick         # smoke test: tiny variants, small inputs, few repeats
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from vlseg.bundles import find_bundles, variant_label
from vlseg.bench.cli import apply_threads, base_parser, command_line, log, out_dir
from vlseg.bench.report import Report, bar_plot
from vlseg.bench.speed import matmul_gflops

DEFAULT_PEERS = ["clipseg", "monai_unet", "monai_basicunet", "monai_swinunetr", "sam_vit_b_encoder_224", "sam_vit_b_encoder"]
QUICK_PEERS = ["monai_unet"]


def parse_args(argv=None):
    p = base_parser("speed", __doc__)
    p.add_argument("--variants", nargs="*", default=None, help="bundle variants (default: paper small; quick: tiny)")
    p.add_argument("--peers", nargs="*", default=None, help=f"peer models (default: {' '.join(DEFAULT_PEERS)})")
    p.add_argument("--batches", nargs="*", type=int, default=None, help="inference batch sizes (default 1 8)")
    p.add_argument("--repeats", type=int, default=None, help="timed passes per batch size (default 10)")
    p.add_argument("--max-seconds-per-case", type=float, default=None,
                   help="time guard per measurement (a batch size whose passes would not fit is skipped; default 120)")
    p.add_argument("--train-steps", type=int, default=None, help="timed optimizer steps (default 3)")
    p.add_argument("--train-batch", type=int, default=None, help="training batch size (default 8)")
    p.add_argument("--image-size", type=int, default=None, help="force one input size for every model (quick: 64)")
    p.add_argument("--sampling-passes", type=int, default=30, help="MedCLIPSeg passes for naive vs fast sampling")
    p.add_argument("--case-timeout", type=float, default=1800, help="kill a model's subprocess after this many seconds")
    p.add_argument("--in-process", action="store_true",
                   help="measure every model in this process (faster start; peak memory then includes earlier cases; "
                        "default with --quick)")
    a = p.parse_args(argv)
    q = a.quick
    a.variants = a.variants if a.variants is not None else (["tiny"] if q else ["paper", "small"])
    a.peers = a.peers if a.peers is not None else (QUICK_PEERS if q else DEFAULT_PEERS)
    a.batches = a.batches or ([1, 2] if q else [1, 8])
    a.repeats = a.repeats or (2 if q else 10)
    a.max_seconds_per_case = a.max_seconds_per_case or (20.0 if q else 120.0)
    a.train_steps = a.train_steps if a.train_steps is not None else (1 if q else 3)
    a.train_batch = a.train_batch or (2 if q else 8)
    a.image_size = a.image_size or (64 if q else None)
    a.sampling_passes = 3 if q and a.sampling_passes == 30 else a.sampling_passes
    a.in_process = a.in_process or q
    return a


def run_case_subprocess(spec: dict, timeout: float) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONWARNINGS="ignore")
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-m", "vlseg.bench.speed", json.dumps(spec)], capture_output=True, text=True,
                              timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"spec": spec, "error": f"timed out after {timeout:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT "):
            res = json.loads(line[len("RESULT "):])
            res["process_s"] = time.perf_counter() - t0
            return res
    tail = (proc.stderr or proc.stdout)[-1500:]
    return {"spec": spec, "error": f"no result (exit code {proc.returncode}): {tail}"}


def run_case_inprocess(spec: dict) -> dict:
    from vlseg.bench.speed import run_case

    t0 = time.perf_counter()
    try:
        res = run_case(spec)
    except Exception as e:  # noqa: BLE001 - reported in the table
        res = {"spec": spec, "error": f"{type(e).__name__}: {e}"}
    res["process_s"] = time.perf_counter() - t0
    return res


def sampling_comparison(bundle_root: Path, variant: str, passes: int, image_size: int | None, max_seconds: float) -> dict:
    """MedCLIPSeg: ``sample_probabilities(fast=False)`` (naive loop of full passes) vs ``fast=True``, same seed."""
    import torch

    from vlseg.bench.bundles import load_bundle_model
    from vlseg.bench.speed import PROMPT, time_calls

    bm = load_bundle_model(bundle_root, variant)
    net = bm.network.eval()
    if not hasattr(net, "sample_probabilities"):
        return {"skipped": f"{bundle_root.name} has no sample_probabilities"}
    size = (image_size,) * 2 if image_size else bm.input_size
    img = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(0))
    ids, mask = bm.tokenize([PROMPT])
    import inspect

    has_fast = "fast" in inspect.signature(net.sample_probabilities).parameters

    def naive():
        if has_fast:
            return net.sample_probabilities(img, ids, mask, num_samples=passes, seed=0, fast=False)
        from vlseg.inferers import logits_of

        with torch.no_grad():
            torch.manual_seed(0)
            return torch.stack([torch.sigmoid(logits_of(net(img, ids, mask))) for _ in range(passes)])

    def fast():
        return net.sample_probabilities(img, ids, mask, num_samples=passes, seed=0) if has_fast else \
            net.sample_probabilities(img, ids, mask, num_samples=passes)

    res = {"variant": variant_label(variant), "passes": passes, "input_size": list(size)}
    with torch.no_grad():
        a, b = naive(), fast()
        res["max_abs_diff_samples"] = float((a - b).abs().max())
        res["max_abs_diff_mean_prob"] = float((a.mean(0) - b.mean(0)).abs().max())
        res["same_output"] = bool(torch.allclose(a, b, atol=1e-4, rtol=1e-4))
        res["naive"] = time_calls(naive, repeats=3, min_repeats=1, max_seconds=max_seconds)
        res["fast"] = time_calls(fast, repeats=3, min_repeats=1, max_seconds=max_seconds)
    if "median_s" in res["naive"] and "median_s" in res["fast"]:
        res["speedup"] = res["naive"]["median_s"] / res["fast"]["median_s"]
    return res


def _lat(res: dict, b: int) -> dict:
    return (res.get("latency") or {}).get(str(b)) or {}


def _gflops(res: dict) -> float | None:
    f = res.get("flops_b1")
    return f / 1e9 if f else None


def _ms(r: dict) -> str:
    if not r:
        return "-"
    if "skipped" in r:
        return "skipped"
    return f"{1e3 * r['median_s']:.1f} ({1e3 * r['iqr_s']:.1f})"


def main(argv=None) -> int:
    args = parse_args(argv)
    apply_threads(args.threads)
    out = out_dir(args)
    rep = Report(out, "Speed and cost on CPU", command_line())
    rep.machine()
    log("measuring the matmul peak")
    mm_n = 1024 if args.quick else 2048
    peak_start = matmul_gflops(mm_n, repeats=3 if args.quick else 7)
    cases = []
    bundles = find_bundles(args.bundles_dir, args.bundles)
    for b in bundles:
        for v in args.variants:
            if variant_label(v) != "paper" and not (b / "configs" / f"{v}.json").is_file():
                cases.append({"label": f"{b.name} ({v})", "error": f"no configs/{v}.json", "spec": {}})
                continue
            cases.append({"label": f"{b.name} ({variant_label(v)})", "group": "bundle",
                          "spec": {"kind": "bundle", "root": str(b), "variant": None if variant_label(v) == "paper" else v}})
    for name in args.peers:
        cases.append({"label": name, "group": "peer", "spec": {"kind": "peer", "name": name}})
    results = []
    for c in cases:
        if "error" in c:
            results.append(c)
            continue
        spec = dict(c["spec"], batches=args.batches, repeats=args.repeats, max_seconds=args.max_seconds_per_case,
                    min_repeats=1 if args.quick else 3,
                    train_steps=args.train_steps, train_batch=args.train_batch, threads=args.threads)
        if args.image_size:
            spec["force_size"] = args.image_size
        log(f"case {c['label']} ...")
        r = run_case_inprocess(spec) if args.in_process else run_case_subprocess(spec, args.case_timeout)
        r["label"], r["group"] = c["label"], c["group"]
        results.append(r)
        (out / "partial_results.json").write_text(json.dumps({"matmul_start": peak_start, "cases": results}, default=str))
        log(f"  done in {r.get('process_s', 0):.0f} s" + (f": ERROR {r['error'][:200]}" if "error" in r else ""))
    peak_end = matmul_gflops(mm_n, repeats=3 if args.quick else 7)
    peak = max(peak_start["best_gflops"], peak_end["best_gflops"])

    # MedCLIPSeg sampling
    sampling = []
    for b in bundles:
        if b.name != "medclipseg":
            continue
        for v in args.variants:
            try:
                log(f"sampling comparison {b.name} ({variant_label(v)}) ...")
                sampling.append(sampling_comparison(b, None if variant_label(v) == "paper" else v, args.sampling_passes,
                                                    args.image_size, args.max_seconds_per_case * 3))
            except Exception as e:  # noqa: BLE001
                sampling.append({"variant": variant_label(v), "error": f"{type(e).__name__}: {e}"})

    # ---------------------------------------------------------------------------- report
    rep.results.update(matmul_start=peak_start, matmul_end=peak_end, matmul_peak_gflops=peak, cases=results,
                       sampling=sampling, settings={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()})
    rep.p(f"Achievable matmul rate (float32 `torch.mm` {mm_n}x{mm_n}, best of several): **{peak:.1f} GFLOP/s** "
          f"(start of run {peak_start['best_gflops']:.1f}, end {peak_end['best_gflops']:.1f}; "
          f"{peak_start['threads']} threads). Achieved rates below are model FLOPs / median latency, as a fraction of it.")
    rep.p(f"Settings: batch sizes {args.batches}, {args.repeats} timed passes after 1 warm-up, guard "
          f"{args.max_seconds_per_case:.0f} s per measurement, training {args.train_steps} AdamW steps at batch "
          f"{args.train_batch}" + (f", every input forced to {args.image_size}x{args.image_size}" if args.image_size else
                                   ", inputs at each model's own size (bundles: their preprocessing; SAM: 1024)") + ". "
          "Random weights; trainable parameters (and what the training steps update) as each config sets them, i.e. "
          "the paper's frozen encoders stay frozen unless the variant's `train_encoders` says otherwise. "
          "Every cache of a network is off while it is measured (frozen text states, image features, Simple-ViLMedSAM's "
          "M2IB maps: `vlseg.nets.feature_cache.caches_off`), so each timed pass costs what a first prompt on a new "
          "image costs and computes exactly the FLOPs counted; the app's second-prompt savings are in its README. "
          "A larger batch or a training step is skipped when its memory, predicted from the batch-1 peak, would not "
          "fit.")
    ok = [r for r in results if "error" not in r]
    ref = next((r for r in ok if r["label"] == "monai_unet"), None)
    ref_lat = _lat(ref, 1).get("median_s") if ref else None
    ref_fl = _gflops(ref) if ref else None

    rep.h2("Size and cost")
    rows = []
    for r in results:
        if "error" in r:
            rows.append([r["label"], "-", "-", "-", "-", "-", f"error: {r['error'][:120]}"])
            continue
        g = _gflops(r)
        rows.append([r["label"], "x".join(str(s) for s in r["input_size"]), r["params"]["total"], r["params"]["trainable"],
                     g, (g / ref_fl) if (g and ref_fl) else None, r.get("description") or r.get("flops_error") or ""])
    rep.table(["model", "input", "params", "trainable", "GFLOPs (batch 1)", "x MONAI UNet FLOPs", "notes"], rows, digits=2)

    rep.h2("Latency, FLOP rate and memory (inference, `torch.no_grad`)")
    headers = ["model"]
    for b in args.batches:
        headers += [f"batch {b}: median (IQR) ms", f"b{b} img/s", f"b{b} GFLOP/s", f"b{b} % of matmul peak"]
    headers += ["x MONAI UNet latency (b1)", "RSS model loaded MiB"] + [f"b{b} peak RSS increment MiB" for b in args.batches]
    rows, skipped = [], []
    for r in ok:
        row = [r["label"]]
        for b in args.batches:
            lr = _lat(r, b)
            row.append(_ms(lr))
            if lr.get("median_s"):
                rate = (r["flops_b1"] * b / lr["median_s"] / 1e9) if r.get("flops_b1") else None
                row += [b / lr["median_s"], rate, (100 * rate / peak) if rate else None]
            else:
                row += [None, None, None]
                if "skipped" in lr:
                    skipped.append(f"{r['label']} batch {b}: {lr['skipped']}")
        l1 = _lat(r, 1).get("median_s")
        row.append((l1 / ref_lat) if (l1 and ref_lat) else None)
        row.append(r.get("rss_model_mib"))
        row += [_lat(r, b).get("rss_increment_mib") for b in args.batches]
        rows.append(row)
    rep.table(headers, rows, digits=1)
    for r in ok:
        for what, d in (("training", r.get("train") or {}), ("stochastic inference", r.get("stochastic_b1") or {})):
            if "skipped" in d:
                skipped.append(f"{r['label']} {what}: {d['skipped']}")
    if skipped:
        rep.p("Skipped by the time guard:")
        rep.bullets(skipped)
    resets = all(r.get("peak_reset") for r in ok)
    rep.p("Memory: *RSS model loaded* = resident set size of the process once the model is built (python, torch and the "
          "imported libraries included); *peak RSS increment* = the kernel's peak resident set size during that phase "
          "minus the RSS before it (activations, workspace, outputs)"
          + ("; the peak mark is reset before every phase (`/proc/self/clear_refs`)." if resets else
             "; **the peak could not be reset on this system, so increments are lifetime peaks (upper bounds)**.")
          + (" Measured in one process for all models (`--in-process`/`--quick`): the loaded-RSS column includes "
             "earlier models' leftovers." if args.in_process else " One process per model."))
    stoch = [r for r in ok if r.get("stochastic_b1")]
    if stoch:
        rep.h3("Stochastic inference of the bundles (mean + uncertainty map, batch 1)")
        rep.table(["model", "passes", "median (IQR) ms", "x one deterministic pass"],
                  [[r["label"], r["stochastic_b1"].get("num_samples"), _ms(r["stochastic_b1"]),
                    (r["stochastic_b1"]["median_s"] / _lat(r, 1)["median_s"]) if r["stochastic_b1"].get("median_s") and _lat(r, 1).get("median_s") else None]
                   for r in stoch], digits=2)

    rep.h2("Training throughput")
    rows = []
    for r in ok:
        t = r.get("train") or {}
        rows.append([r["label"], t.get("batch"), _ms(t) if t else "-", t.get("images_per_s"),
                     t.get("rss_increment_mib"), t.get("rss_peak_mib"), t.get("skipped", "")])
    rep.table(["model", "batch", "step median (IQR) ms", "images/s", "peak RSS increment MiB", "peak RSS MiB", "note"],
              rows, digits=2)

    if sampling:
        rep.h2("MedCLIPSeg uncertainty sampling: naive passes vs the fast path")
        rows = []
        for s in sampling:
            if "error" in s or "skipped" in s:
                rows.append([s.get("variant"), "-", "-", "-", "-", s.get("error") or s.get("skipped")])
                continue
            rows.append([s["variant"], s["passes"], _ms(s["naive"]), _ms(s["fast"]), s.get("speedup"),
                         f"{'identical' if s['same_output'] else 'DIFFERENT'} (max |diff| {s['max_abs_diff_samples']:.1e})"])
        rep.table(["variant", "passes", "naive median (IQR) ms", "fast median (IQR) ms", "speed-up", "same maps (same seed)"], rows, digits=2)
        rep.p("Naive = `sample_probabilities(fast=False)`: every pass runs the whole network. Fast = the bundle's "
              "default: the sample-independent prefix runs once and the passes go through the rest as one batch. "
              "Both draw each pass's noise from that pass's own generator, so the maps must be identical.")

    # ---------------------------------------------------------------------------- plots
    labels = [r["label"] for r in ok]
    if labels:
        series = {f"batch {b}": [(_lat(r, b).get("median_s") or float("nan")) * 1e3 / b for r in ok] for b in args.batches}
        bar_plot(out / "latency_per_image.png", labels, series, "ms per image (median)", "CPU latency per image", log=True)
        rep.image(out / "latency_per_image.png", "Inference latency per image (log scale)")
        series = {f"batch {b}": [((r["flops_b1"] * b / _lat(r, b)["median_s"] / 1e9) / peak * 100)
                                 if r.get("flops_b1") and _lat(r, b).get("median_s") else float("nan") for r in ok]
                  for b in args.batches}
        bar_plot(out / "flop_utilisation.png", labels, series, "% of measured matmul GFLOP/s", "Achieved FLOP rate")
        rep.image(out / "flop_utilisation.png", "Achieved FLOP rate as a fraction of the matmul peak")
        bar_plot(out / "training_throughput.png", labels,
                 {"train images/s": [(r.get("train") or {}).get("images_per_s") or float("nan") for r in ok]},
                 "images / s", "Training throughput (AdamW steps)", log=True)
        rep.image(out / "training_throughput.png", "Training throughput")
    path = rep.write()
    (out / "partial_results.json").unlink(missing_ok=True)
    log(f"report: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
