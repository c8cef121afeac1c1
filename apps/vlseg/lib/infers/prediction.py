"""What an infer task computed for one request: :class:`Prediction`, and the per-image helpers that fill it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from lib.params import PromptSpec
from vlseg.uncertainty import uncertainty_scores

__all__ = ["Prediction", "to_numpy_2d", "prompt_stats"]


@dataclass
class Prediction:
    """Mask (label values of the prompts), uncertainty map in [0, 1], the bundle's other maps and per-prompt
    statistics; for volumes also the window that made the 8-bit slices (:func:`lib.window.window_volume`)."""

    kind: str  # "2d" | "volume"
    mask: np.ndarray  # uint8, row-major 2D [H, W] or the volume's voxel grid
    uncertainty: np.ndarray  # float32, same shape
    prompts: list[dict] = field(default_factory=list)
    ref: Any = None  # nibabel image of a volume input
    axis: int | None = None
    maps: dict[str, np.ndarray] = field(default_factory=dict)  # "mutual_information", "std" (float32, same shape)
    window: dict | None = None  # volumes: {"mode", "modality", "lo", "hi"}

    def all_maps(self) -> dict[str, np.ndarray]:
        return {"uncertainty": self.uncertainty, **self.maps}


def to_numpy_2d(x) -> np.ndarray:
    a = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    a = np.squeeze(a)
    if a.ndim != 2:
        raise RuntimeError(f"bundle output has shape {a.shape}; expected a single 2D map")
    return a


def prompt_stats(p: PromptSpec, fg: np.ndarray, u: np.ndarray) -> dict:
    s = uncertainty_scores(torch.from_numpy(np.ascontiguousarray(u)))
    return {**p.as_dict(), "foreground_pixels": int(fg.sum()), "uncertainty_mean": round(s["mean"], 6),
            "uncertainty_top5": round(s["top5"], 6), "uncertainty_max": round(s["max"], 6)}
