"""Per-image segmentation metrics on binary masks (MONAI implementations).

Dice, IoU and normalised surface Dice (NSD) with a tolerance in pixels (2 px as in MedCLIPSeg/Simple-ViLMedSAM).
Convention: when both prediction and ground truth are empty every metric is 1 (nothing to find, nothing found).
"""

from __future__ import annotations

import numpy as np
import torch
from monai.metrics import compute_dice, compute_iou, compute_surface_dice

__all__ = ["segmentation_metrics", "summarize"]


def _bchw(x) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x).float()
    while t.ndim < 4:
        t = t[None]
    return (t > 0.5).float()


def segmentation_metrics(pred, label, nsd_tolerance: float = 2.0) -> dict[str, float]:
    """Dice / IoU / NSD for one binary prediction and label of the same 2D shape."""
    p, g = _bchw(pred), _bchw(label)
    if p.shape != g.shape:
        raise ValueError(f"prediction shape {tuple(p.shape)} != label shape {tuple(g.shape)}")
    if g.sum() == 0 and p.sum() == 0:
        return {"dice": 1.0, "iou": 1.0, "nsd": 1.0}
    dice = float(compute_dice(p, g, include_background=True, ignore_empty=False)[0, 0])
    iou = float(compute_iou(p, g, include_background=True, ignore_empty=False)[0, 0])
    if g.sum() == 0 or p.sum() == 0:
        nsd = 0.0
    else:
        nsd = float(compute_surface_dice(p, g, class_thresholds=[nsd_tolerance], include_background=True)[0, 0])
    return {"dice": dice, "iou": iou, "nsd": nsd}


def summarize(rows: list[dict[str, float]], keys=("dice", "iou", "nsd")) -> dict[str, float]:
    """Mean and standard deviation over images."""
    out: dict[str, float] = {"n": len(rows)}
    for k in keys:
        vals = np.array([r[k] for r in rows], dtype=float)
        out[k] = float(vals.mean()) if len(vals) else float("nan")
        out[f"{k}_std"] = float(vals.std()) if len(vals) else float("nan")
    return out
