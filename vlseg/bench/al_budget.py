"""How long the rest of an active-learning simulation will take, from per-step times measured on this machine.

:func:`calibrate` times a few training steps (one batch, the protocol's image size) and a few inference passes of the
bundle copy's network, single-threaded. :func:`estimate` adds up what is left of the plan -- every unfinished
training (``epochs`` x (steps + validation passes), never more than its time cap), the pool scoring of the
uncertainty-driven arms (``min(unlabelled, max_images)`` x passes), the test evaluations, plus fixed per-call
overheads -- and turns it into wall time with ``workers`` jobs side by side (the first phase, full data + initial
sets, before the curves). It is a plan, an upper bound when trainings run to their epoch caps.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

from vlseg.bench.al_protocol import VARIANT, curve_records, jobs_of, job_done

__all__ = ["calibrate", "estimate", "TRAIN_OVERHEAD_S", "SCORE_OVERHEAD_S", "APP_PER_IMAGE_S"]

TRAIN_OVERHEAD_S = 20.0  # app train task: datastore -> datalist, config parse, caching the images, saving
SCORE_OVERHEAD_S = 10.0  # infer task construction and the scoring's bookkeeping
#: per-image work of the app's scoring besides the passes (MONAI Label's bundle task re-parses its config on every
#: call, reading, embedding, datastore): measured 0.38 s with a tiny model on a busy 2-core machine; finished rounds
#: of the run replace it by their own measured images/s
APP_PER_IMAGE_S = 0.38


def calibrate(bundle: Path, batch_size: int, steps: int = 3) -> dict:
    """Seconds per training step (``batch_size`` images) and per single-image inference pass of ``bundle``'s
    ``configs/<VARIANT>.json`` network, in this process (run it with one thread, as the jobs do)."""
    import torch

    from vlseg.bench.bundles import load_bundle_model
    from vlseg.inferers import logits_of

    bm = load_bundle_model(Path(bundle), VARIANT)
    net = bm.network
    h, w = bm.input_size
    ids, mask = bm.tokenize(["polyp"] * batch_size)
    args = (torch.randn(batch_size, 3, h, w), ids, mask)
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=1e-6)
    net.train()
    times, cpu = [], []
    for i in range(steps + 1):
        t, c = time.perf_counter(), time.process_time()
        opt.zero_grad()
        logits_of(net(*args)).float().mean().backward()
        opt.step()
        if i:
            times.append(time.perf_counter() - t)
            cpu.append(time.process_time() - c)
    net.eval()
    with torch.no_grad():
        t = time.perf_counter()
        for _ in range(steps):
            net(*args)
        pass_s = (time.perf_counter() - t) / (steps * batch_size)
    return {"step_s": sorted(times)[len(times) // 2], "step_cpu_s": sorted(cpu)[len(cpu) // 2],
            "wall_per_cpu": max(1.0, sum(times) / max(sum(cpu), 1e-9)), "pass_s": pass_s, "batch_size": batch_size,
            "image_size": [h, w], "threads": torch.get_num_threads()}


def _train_s(n: int, epochs: int, cap: float | None, c: dict, clock: str, val_split: float = 0.2) -> float:
    """Wall seconds of one training: ``epochs`` epochs or the time cap, whichever is first (a cap on the process
    clock counts CPU seconds: converted with the wall/CPU ratio measured by :func:`calibrate`)."""
    n_train = max(1, int(round(n * (1 - val_split))))
    per_epoch = math.ceil(n_train / c["batch_size"]) * c["step_s"] + (n - n_train) * c["pass_s"]
    t = epochs * per_epoch
    if cap:
        t = min(t, cap * (c.get("wall_per_cpu", 1.0) if clock == "process" else 1.0))
    return TRAIN_OVERHEAD_S + t


def estimate(plan: dict, work: Path, c: dict, workers: int) -> dict:
    """Remaining seconds per phase and in all (wall time with ``workers`` side by side) for the plan in ``work``."""
    st = plan["settings"]
    counts, pool, n_test = plan["counts"], len(plan["pool"]), len(plan["test"])
    cap, cap_full = st["overrides"].get("max_train_seconds"), st["full_overrides"].get("max_train_seconds")
    clock = st["overrides"].get("max_train_clock", "wall")
    evaluate = 5.0 + n_test * c["pass_s"] * st["eval_samples"]
    jobs = jobs_of(plan)
    first = []
    for job in jobs["first"]:
        if not job_done(work, plan, job):
            first.append(_train_s(pool, st["epochs_full"], cap_full, c, clock) + evaluate if job == "full"
                         else _train_s(counts[0], st["epochs_init"], cap, c, clock) + evaluate)
    rates = [r["images_per_s"] for job in jobs["curves"] for r in curve_records(work, job).values()
             if r.get("images_per_s")]
    per_image = 1.0 / min(rates) if rates else APP_PER_IMAGE_S + st["scoring_samples"] * c["pass_s"]
    curves = []
    for job in jobs["curves"]:
        arm = job.split(":")[1]
        done = curve_records(work, job)
        t = 0.0
        for k in range(1, len(counts)):
            if k in done:
                continue
            if arm != "random":
                m = pool - counts[k - 1]
                m = min(m, st["scoring_max_images"]) if st["scoring_max_images"] else m
                t += SCORE_OVERHEAD_S + m * per_image
            t += _train_s(counts[k], st["epochs_round"], cap, c, clock) + evaluate
        if t:
            curves.append(t)
    w = max(1, int(workers))
    first_wall = max(max(first, default=0.0), sum(first) / w)
    curves_wall = max(max(curves, default=0.0), sum(curves) / w)
    gate = 0.0 if (Path(work) / "gate.json").is_file() else 30.0 + len(plan["validation"]) * c["pass_s"] * 8
    return {"first_s": first_wall, "gate_s": gate, "curves_s": curves_wall, "total_s": first_wall + gate + curves_wall,
            "cpu_s": sum(first) + sum(curves) + gate, "jobs_left": len(first) + len(curves), "workers": w,
            "scoring_s_per_image": per_image, "calibration": c}
