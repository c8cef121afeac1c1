"""Benchmark: fast batched sampling vs the naive loop of full stochastic passes, at equal output.

Both paths give each pass its own seeded noise (``SampleNoise``), so for the same seed they must return the same
probability maps; the script checks that (max abs difference, ``allclose``) and times them.

Usage (from the bundle folder)::

    python -m scripts.benchmark_sampling --variant default --num_samples 30 --out runs/bench_sampling_default.json
    python -m scripts.benchmark_sampling --variant small --num_samples 30

``--variant``: ``default`` (train.json: ViT-B/16, 224 px), ``small`` / ``tiny`` (override files). The networks have
random weights unless ``--checkpoint`` is given (speed and equality do not depend on the weights).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

BUNDLE = Path(__file__).resolve().parents[1]


def build(variant: str, checkpoint: str | None = None):
    """``(network in eval mode, (tokenizer spec, context length), image size)`` of a variant, random weights unless
    ``checkpoint``."""
    net, parser = build_with_parser(variant, checkpoint)
    tok = (parser.get_parsed_content("tokenizer"), parser.get_parsed_content("context_length"))
    return net, tok, int(parser.get_parsed_content("image_size"))


def build_with_parser(variant: str, checkpoint: str | None = None):
    """The network (eval mode) and the parsed inference config of a variant (``inference.json`` + override)."""
    from monai.bundle import ConfigParser

    files = [str(BUNDLE / "configs" / "inference.json")]
    if variant != "default":
        files.append(str(BUNDLE / "configs" / f"{variant}.json"))
    parser = ConfigParser()
    parser.read_config(files)
    parser["bundle_root"] = str(BUNDLE)
    # random weights on purpose (speed and equality do not depend on them; --checkpoint loads a trained model)
    parser["require_pretrained"] = False
    parser["clip_pretrained"] = None
    net = parser.get_parsed_content("network_def")
    if checkpoint:
        state = torch.load(checkpoint, map_location="cpu", weights_only=False)
        net.load_state_dict(state.get("model", state) if isinstance(state, dict) else state)
    return net.eval(), parser


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", default="default", choices=["default", "small", "tiny"])
    ap.add_argument("--num_samples", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=1, help="images per call")
    ap.add_argument("--repeats", type=int, default=1, help="timed runs of each path (the minimum is reported)")
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--text", default="one small bright round polyp in the center of the image")
    ap.add_argument("--out", default=None, help="JSON file for the results")
    ap.add_argument("--flops", action="store_true", help="also count the FLOPs of one pass (torch.utils.flop_counter)")
    ap.add_argument("--num_threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--max_sample_batch", type=int, default=None, help="rows per batched forward of the fast path")
    args = ap.parse_args(argv)

    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    from vlseg.nets.common import forward_flops
    from vlseg.text import build_tokenizer

    net, (tok_spec, ctx), size = build(args.variant, args.checkpoint)
    if args.max_sample_batch:
        net.max_sample_batch = args.max_sample_batch
    ids, mask = build_tokenizer(tok_spec, ctx)([args.text] * args.batch)
    g = torch.Generator().manual_seed(123)
    image = torch.randn(args.batch, 3, size, size, generator=g)

    # warm-up (allocator, lazy init) with 2 passes each
    net.sample_probabilities(image, ids, mask, num_samples=2, seed=args.seed, fast=False)
    net.sample_probabilities(image, ids, mask, num_samples=2, seed=args.seed, fast=True)

    def timed(fast: bool):
        # best of the repeats, in wall-clock seconds and in CPU seconds of this process (the CPU time does not
        # grow when other jobs share the cores; with one torch thread it is the wall time on a free core)
        best, best_cpu, out = float("inf"), float("inf"), None
        for _ in range(args.repeats):
            t0, c0 = time.perf_counter(), time.process_time()
            out = net.sample_probabilities(image, ids, mask, num_samples=args.num_samples, seed=args.seed, fast=fast)
            best = min(best, time.perf_counter() - t0)
            best_cpu = min(best_cpu, time.process_time() - c0)
        return best, best_cpu, out

    t_naive, c_naive, p_naive = timed(False)
    t_fast, c_fast, p_fast = timed(True)
    diff = float((p_naive - p_fast).abs().max())
    other = net.sample_probabilities(image, ids, mask, num_samples=args.num_samples, seed=args.seed + 1, fast=True)
    result = {
        "variant": args.variant,
        "num_samples": args.num_samples,
        "batch": args.batch,
        "image_size": size,
        "naive_seconds": round(t_naive, 3),
        "fast_seconds": round(t_fast, 3),
        "speedup": round(t_naive / t_fast, 2),
        "naive_cpu_seconds": round(c_naive, 3),
        "fast_cpu_seconds": round(c_fast, 3),
        "speedup_cpu": round(c_naive / c_fast, 2),
        "max_abs_diff": diff,
        "allclose_atol_1e-5": bool(torch.allclose(p_naive, p_fast, atol=1e-5, rtol=0)),
        "other_seed_max_abs_diff": float((other - p_fast).abs().max()),
        "first_adapter_block": net.adapter_layers[0] if net.adapter_layers else None,
        "max_sample_batch": net.max_sample_batch,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "parameters": net.adapter_parameters(),
    }
    if args.flops:
        result["flops_one_pass"] = forward_flops(net, image, ids, mask)
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    sys.path.insert(0, str(BUNDLE))
    main()
