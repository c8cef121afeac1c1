"""Timing, FLOP-rate and memory measurements for one model ("case"), run in its own process.

``python -m vlseg.bench.speed '<json spec>'`` builds one model (a bundle variant or a peer), then measures

* parameters (total / trainable) and forward FLOPs (``torch.utils.flop_counter`` at batch 1; the count is linear
  in the batch for every model here, so batch-``B`` FLOPs are ``B`` times it);
* forward latency per batch size: median and inter-quartile range over repeated timed passes after one warm-up
  pass, under ``torch.no_grad()`` in eval mode; a batch size whose warm-up pass shows that the minimum number of
  passes would exceed ``max_seconds`` is skipped, with the reason;
* memory: the resident set size once the model is built, and the peak resident set size of each phase (Linux:
  the kernel's high-water mark ``VmHWM``, reset before every phase through ``/proc/self/clear_refs``; elsewhere
  ``getrusage`` maxrss, a lifetime peak). Allocator-level tools (tracemalloc) do not see torch's memory; the kernel
  does. One process per model keeps models from sharing a peak;
* training throughput: a few AdamW steps on random images with a BCE loss (after one warm-up step).

The result is printed as one line ``RESULT {json}``.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["matmul_gflops", "time_calls", "peak_rss_mib", "current_rss_mib", "reset_peak_rss", "run_case", "main"]


def _status_mib(field: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def peak_rss_mib() -> float:
    """Peak resident set size since the last :func:`reset_peak_rss` (else since the process started)."""
    hwm = _status_mib("VmHWM")
    if hwm is not None:
        return hwm
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 2**20 if sys.platform == "darwin" else r / 1024.0


def available_mib() -> float | None:
    """Memory the kernel could still give this process (``MemAvailable``), or None where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def memory_guard(per_image_mib: float | None, images: int, factor: float = 1.0, share: float = 0.8) -> str | None:
    """Why a phase of ``images`` images must be skipped (None: it fits): its peak memory, predicted linearly from
    ``per_image_mib`` (the batch-1 peak RSS increment) times ``factor`` (e.g. 3 for a training step), exceeds
    ``share`` of the memory available now. Without this a batch of 8 SAM ViT-H images at 1024 x 1024 (global
    attention maps of 8 x 16 x 4096 x 4096) gets the whole benchmark process killed by the kernel's OOM killer."""
    avail = available_mib()
    if not per_image_mib or avail is None:
        return None
    need = per_image_mib * images * factor
    if need <= share * avail:
        return None
    return (f"predicted peak memory {need / 1024:.1f} GiB ({images} x {per_image_mib / 1024:.2f} GiB per image"
            f"{f' x {factor:g}' if factor != 1 else ''}) exceeds {share:.0%} of the {avail / 1024:.1f} GiB available")


def current_rss_mib() -> float:
    rss = _status_mib("VmRSS")
    if rss is not None:
        return rss
    try:
        import psutil

        return psutil.Process().memory_info().rss / 2**20
    except ImportError:  # pragma: no cover
        return peak_rss_mib()


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark to the current RSS (Linux ``clear_refs`` 5); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def matmul_gflops(n: int = 2048, repeats: int = 5, dtype=torch.float32) -> dict[str, float]:
    """Best-of-``repeats`` rate of one ``n x n @ n x n`` product (2 n^3 FLOPs): the achievable matmul peak."""
    a = torch.randn(n, n, dtype=dtype)
    b = torch.randn(n, n, dtype=dtype)
    torch.mm(a, b)  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - t0)
    flops = 2.0 * n**3
    return {"n": n, "repeats": repeats, "best_gflops": flops / min(times) / 1e9,
            "median_gflops": flops / statistics.median(times) / 1e9, "threads": torch.get_num_threads()}


def _quartiles(xs: list[float]) -> tuple[float, float, float]:
    xs = sorted(xs)
    if len(xs) == 1:
        return xs[0], xs[0], xs[0]
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], statistics.median(xs), q[2]


def time_calls(fn: Callable[[], Any], repeats: int = 10, min_repeats: int = 3, max_seconds: float | None = None,
               warmup: int = 1) -> dict[str, Any]:
    """Time ``fn`` after ``warmup`` calls. Returns median / q1 / q3 / iqr (seconds) and ``n``.

    With ``max_seconds``: the warm-up pass estimates the cost; ``repeats`` is cut so the timed passes fit, and
    when even ``min_repeats`` would not fit the result is ``{"skipped": reason}``.
    """
    t0 = time.perf_counter()
    for _ in range(max(1, warmup)):
        fn()
    t_warm = (time.perf_counter() - t0) / max(1, warmup)
    n = int(repeats)
    if max_seconds is not None:
        fit = int(max(0.0, max_seconds - t_warm * max(1, warmup)) // max(t_warm, 1e-9))
        if fit < min_repeats:
            return {"skipped": f"one pass takes {t_warm:.1f} s, so {min_repeats} timed passes would exceed the "
                               f"{max_seconds:.0f} s guard (--max-seconds-per-case)", "warmup_s": t_warm}
        n = min(n, fit)
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    q1, med, q3 = _quartiles(times)
    return {"median_s": med, "q1_s": q1, "q3_s": q3, "iqr_s": q3 - q1, "n": n, "warmup_s": t_warm}


# ----------------------------------------------------------------------------------------------------------------
# one case
# ----------------------------------------------------------------------------------------------------------------
PROMPT = "one small pink round polyp which is a projecting growth of tissue located in the center of the image"


def _build(spec: dict) -> tuple[torch.nn.Module, Callable, dict]:
    """Model, tokenizer and facts for ``spec`` (``{"kind": "bundle", "root", "variant"}`` or ``{"kind": "peer", "name"}``)."""
    from vlseg.text.tokenizers import build_tokenizer

    if spec["kind"] == "bundle":
        from vlseg.bench.bundles import load_bundle_model

        bm = load_bundle_model(spec["root"], spec.get("variant"), with_preprocessing=True)
        facts = {"input_size": list(bm.input_size), "num_samples": bm.num_samples,
                 "has_fast_sampler": hasattr(bm.network, "sample_probabilities")}
        return bm.network, bm.tokenizer, facts
    from vlseg.bench.peers import PEERS, build_peer, peer_tokenizer_spec

    net = build_peer(spec["name"])
    native = PEERS[spec["name"]][1]
    tok = build_tokenizer(peer_tokenizer_spec(spec["name"]) or "minilm", int(spec.get("text_len", 24)))
    facts = {"description": getattr(net, "description", spec["name"])}
    if native:
        facts["input_size"] = [native, native]
    return net, tok, facts


def _loss(out, target: torch.Tensor) -> torch.Tensor:
    from vlseg.inferers import logits_of

    logits = logits_of(out)
    if logits.shape == target.shape:
        return torch.nn.functional.binary_cross_entropy_with_logits(logits, target)
    return logits.float().pow(2).mean()  # encoders without a mask head (SAM image encoder)


def run_case(spec: dict) -> dict[str, Any]:
    """Measure one model. Every cache the network holds (:func:`vlseg.nets.feature_cache.caches_off`: frozen text
    states, image features, M2IB maps) is off, so each timed pass computes what its FLOPs count, as a first prompt
    on a new image does; the repeated identical inputs of the timing loop would otherwise be served from them."""
    from vlseg.nets.feature_cache import caches_off

    threads = spec.get("threads")
    if threads:
        torch.set_num_threads(int(threads))
    torch.manual_seed(0)
    res: dict[str, Any] = {"spec": spec, "rss_start_mib": current_rss_mib(), "peak_reset": reset_peak_rss()}
    t0 = time.perf_counter()
    net, tok, facts = _build(spec)
    res.update(facts)
    res["build_s"] = time.perf_counter() - t0
    with caches_off(net) as caches:
        res["caches_off"] = sorted(c.name for c in caches)
        _measure(spec, net, tok, facts, res)
    res["total_s"] = time.perf_counter() - t0
    return res


def _measure(spec: dict, net, tok, facts: dict, res: dict) -> None:
    from vlseg.nets.common import count_parameters, forward_flops
    from vlseg.inferers import sample_probabilities

    res["params"] = count_parameters(net)
    res["rss_model_mib"] = current_rss_mib()
    res["rss_build_peak_mib"] = peak_rss_mib()
    # force_size (quick runs) > the model's own input size (bundle preprocessing, SAM's 1024) > image_size
    if spec.get("force_size"):
        size = (int(spec["force_size"]),) * 2
    else:
        size = tuple(int(s) for s in (facts.get("input_size") or [spec.get("image_size", 224)] * 2))
    res["input_size"] = list(size)
    max_s = spec.get("max_seconds")

    def inputs(b: int):
        g = torch.Generator().manual_seed(b)
        img = torch.randn(b, 3, *size, generator=g)
        ids, mask = tok([PROMPT] * b)
        return img, ids, mask

    net.eval()
    img1, ids1, m1 = inputs(1)
    try:
        res["flops_b1"] = forward_flops(net, img1, ids1, m1)
    except Exception as e:  # noqa: BLE001 - report, do not die
        res["flops_b1"] = None
        res["flops_error"] = f"{type(e).__name__}: {e}"
    res["latency"] = {}
    per_image = None  # seconds per image of the first measured batch size: predicts the cost of the next ones
    min_rep = int(spec.get("min_repeats", 3))
    mem_per_image = None  # peak RSS increment per image of the first measured batch size
    for b in spec.get("batches", [1, 8]):
        why = memory_guard(mem_per_image, b)
        if why:
            res["latency"][str(b)] = {"skipped": why}
            continue
        if max_s is not None and per_image is not None and per_image * b * (1 + min_rep) > max_s:
            res["latency"][str(b)] = {"skipped": f"predicted {per_image * b:.1f} s per pass (from the smaller batch), so "
                                                 f"{min_rep} timed passes + warm-up would exceed the {max_s:.0f} s guard "
                                                 "(--max-seconds-per-case)"}
            continue
        img, ids, mask = inputs(b)
        before = current_rss_mib()
        reset_peak_rss()
        with torch.no_grad():
            r = time_calls(lambda: net(img, ids, mask), repeats=int(spec.get("repeats", 10)),
                           min_repeats=int(spec.get("min_repeats", 3)), max_seconds=max_s)
        r["rss_peak_mib"] = peak_rss_mib()
        r["rss_increment_mib"] = r["rss_peak_mib"] - before
        res["latency"][str(b)] = r
        if per_image is None:
            per_image = (r.get("median_s") or r.get("warmup_s") or 0.0) / b
            mem_per_image = max(r["rss_increment_mib"], 1.0) / b
    # the bundle's stochastic inference (num_samples passes, its own sampler or MC dropout), batch 1
    ns = int(facts.get("num_samples") or 1)
    if spec["kind"] == "bundle" and ns > 1 and spec.get("stochastic", True) and max_s is not None and per_image \
            and per_image * ns * 2 > max_s and not facts.get("has_fast_sampler"):
        res["stochastic_b1"] = {"num_samples": ns, "skipped": f"predicted {per_image * ns:.1f} s per call ({ns} passes) "
                                                             f"exceeds the {max_s:.0f} s guard"}
    elif spec["kind"] == "bundle" and ns > 1 and spec.get("stochastic", True):
        with torch.no_grad():
            r = time_calls(lambda: sample_probabilities(net, img1, ids1, m1, num_samples=ns),
                           repeats=max(3, int(spec.get("repeats", 10)) // 2), min_repeats=1, max_seconds=max_s)
        r["num_samples"] = ns
        res["stochastic_b1"] = r
    # training throughput
    tb, steps = int(spec.get("train_batch", 8)), int(spec.get("train_steps", 3))
    why = memory_guard(mem_per_image, tb, factor=3.0) if steps > 0 else None
    if why:
        res["train"] = {"batch": tb, "skipped": why}
    elif steps > 0 and max_s is not None and per_image and 3.0 * per_image * tb * 2 > max_s:
        res["train"] = {"batch": tb, "skipped": f"predicted {3.0 * per_image * tb:.1f} s per step (3x the forward pass) "
                                                f"exceeds half the {max_s:.0f} s guard"}
    elif steps > 0:
        before = current_rss_mib()
        reset_peak_rss()
        res["train"] = _train_throughput(net, inputs, tb, steps, max_s)
        res["train"]["rss_peak_mib"] = peak_rss_mib()
        res["train"]["rss_increment_mib"] = res["train"]["rss_peak_mib"] - before


def _train_throughput(net, inputs, batch: int, steps: int, max_seconds) -> dict[str, Any]:
    from vlseg.nets.common import trainable_parameters

    params = trainable_parameters(net)
    if not params:
        return {"skipped": "no trainable parameters"}
    net.train()
    opt = torch.optim.AdamW(params, lr=1e-4)
    img, ids, mask = inputs(batch)
    target = (torch.rand(batch, 1, *img.shape[-2:]) > 0.5).float()

    def step():
        opt.zero_grad(set_to_none=True)
        loss = _loss(net(img, ids, mask), target)
        loss.backward()
        opt.step()

    r = time_calls(step, repeats=steps, min_repeats=1, max_seconds=max_seconds)
    net.eval()
    r["batch"] = batch
    if "median_s" in r:
        r["images_per_s"] = batch / r["median_s"]
    return r


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    spec = json.loads(argv[0])
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        res = run_case(spec)
    except Exception as e:  # noqa: BLE001 - the parent reports the failure in the table
        import traceback

        traceback.print_exc()
        res = {"spec": spec, "error": f"{type(e).__name__}: {e}"}
    print("RESULT " + json.dumps(res, default=str), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
