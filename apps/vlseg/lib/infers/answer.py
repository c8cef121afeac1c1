"""The answer of an infer task: the label file, the stored / inline maps and the JSON block (model, prompts,
samples, window, statistics, scores, checkpoint, latencies) for one :class:`~lib.infers.prediction.Prediction`."""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import torch

from lib import imageio
from lib.infers.outputs import deliver_map, map_tag, write_label, write_map
from lib.infers.prediction import Prediction
from lib.uncertain_segments import OFFSET, add_uncertain_segments, uncertain_labels
from vlseg.scores import compute_scores
from vlseg.uncertainty import uncertainty_scores

logger = logging.getLogger(__name__)

__all__ = ["answer", "deliver"]


def answer(task, request: dict, params: dict, pred: Prediction, start: float) -> tuple[str, dict]:
    """``(label file, info)`` of ``task`` for ``pred``; ``start``: the request's ``time.perf_counter()``."""
    infer_s = time.perf_counter() - start
    scores = uncertainty_scores(torch.from_numpy(pred.uncertainty))
    info: dict[str, Any] = {
        "model": task.bundle_name,
        "variant": task.variant,
        "prompt": " | ".join(p.prompt for p in params["prompts"]),
        "prompt_source": params["prompts"][0].source,
        "prompts": pred.prompts,
        "num_samples": params["num_samples"],
        "seed": params["seed"],
        "kind": pred.kind,
        "shape": list(pred.mask.shape),
        "axis": pred.axis,
        "window": pred.window,
        "foreground_pixels": int((pred.mask > 0).sum()),
        "uncertainty_mean": round(scores["mean"], 6),
        "uncertainty_top5": round(scores["top5"], 6),
        "uncertainty_max": round(scores["max"], 6),
        "scores": {k: round(v, 6) for k, v in compute_scores(pred.all_maps(), mask=pred.mask > 0).items()},
        "checkpoint": task.checkpoint(),
        "label_names": {p.prompt: p.value for p in params["prompts"]},
    }
    if params["uncertain_threshold"] is not None:  # drawn in any labelmap viewer (lib.uncertain_segments)
        pred.mask = add_uncertain_segments(pred.mask, pred.uncertainty, params["uncertain_threshold"])
        extra = {n: v for n, v in uncertain_labels(info["label_names"]).items() if (pred.mask == v).any()}
        info["label_names"].update(extra)
        info["uncertain_segments"] = {"threshold": params["uncertain_threshold"], "segments": extra,
                                      "pixels": int((pred.mask > OFFSET).sum())}
    label_file = write_label(pred, params)
    info["uncertainty"] = deliver(task, request, "uncertainty", pred.uncertainty, pred, params, info)
    info["maps"] = {name: deliver(task, request, name, pred.maps[name], pred, params, info)
                    for name in params["maps"] if name in pred.maps}
    total = time.perf_counter() - start
    info["latency_s"] = round(total, 4)
    info["latencies"] = {"infer": round(infer_s, 4), "write": round(total - infer_s, 4), "total": round(total, 4)}
    logger.info("%s: prompt=%r samples=%d %s mask=%s fg=%d unc_mean=%.4f unc_max=%.4f in %.2fs", task.bundle_name,
                info["prompt"], params["num_samples"], pred.kind, info["shape"], info["foreground_pixels"],
                info["uncertainty_mean"], info["uncertainty_max"], total)
    return label_file, info


def deliver(task, request: dict, name: str, array: np.ndarray, pred: Prediction, params: dict, info: dict) -> dict:
    """Write the map ``name``, store it under its tag (:func:`lib.infers.outputs.map_tag`), inline on request."""
    path, meta = write_map(pred, array)
    label_info = {k: info[k] for k in ("model", "variant", "prompt", "num_samples", "kind")}
    if name == "uncertainty":
        label_info.update({k: info[k] for k in ("uncertainty_mean", "uncertainty_max", "uncertainty_top5")})
    else:
        label_info.update(map=name, mean=round(float(np.mean(array, dtype=np.float64)), 6))
    out = deliver_map(task, request, map_tag(task.uncertainty_tag, name), path, meta, label_info)
    if params["inline"]:
        out["npy_base64"] = imageio.npy_base64(array)
    return out
