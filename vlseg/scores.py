"""Image-level uncertainty scores: one number per image from its pixel maps, for active learning and its gate.

Every score reads one map of :data:`vlseg.uncertainty.MAP_NAMES` (``uncertainty`` = predictive entropy,
``mutual_information``, ``std``) and, for the boundary-discounted score, the predicted mask:

============== ======================= ===============================================================================
name           map                     value
============== ======================= ===============================================================================
``mean``       uncertainty             mean over all pixels
``top5``       uncertainty             mean of the 5 % most uncertain pixels (a small doubtful region is not washed
                                       out by a large confident background; the app's default)
``max``        uncertainty             maximum
``boundary``   uncertainty + mask      mean over the pixels *outside* a band around the predicted edge
                                       (:func:`edge_band`): the rim of every object is uncertain even when the model
                                       is right, so this keeps only doubt away from the outline
``mi_mean``    mutual_information      mean (epistemic part only)
``mi_top5``    mutual_information      mean of the 5 % highest pixels
``std_mean``   std                     mean of the per-pixel standard deviation over the passes
============== ======================= ===============================================================================

Maps may be numpy arrays or torch tensors of any shape (2D images, 3D volumes); a score is a plain ``float``.
:func:`compute_scores` evaluates many at once; :data:`SCORES` is the registry the app and the benchmarks share.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import partial

import numpy as np

__all__ = [
    "ImageScore",
    "SCORES",
    "DEFAULT_SCORE",
    "mean_score",
    "top_fraction_score",
    "max_score",
    "edge_band",
    "band_width",
    "boundary_discounted_score",
    "compute_scores",
    "score_names",
]

#: the score the app ranks by until a gate measurement says otherwise (its behaviour before the decomposed maps)
DEFAULT_SCORE = "top5"


def _array(x, what: str = "uncertainty map") -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    a = np.asarray(x)
    if not np.issubdtype(a.dtype, np.floating):
        a = a.astype(np.float32)
    if a.size == 0:
        raise ValueError(f"empty {what}")
    if not math.isfinite(float(a.sum(dtype=np.float64))):  # no temporary mask: volumes can be large
        raise ValueError(f"the {what} has NaN or infinite values; check the model output")
    return a


def mean_score(u) -> float:
    """Mean of the map over all pixels."""
    return float(_array(u).mean(dtype=np.float64))


def max_score(u) -> float:
    """Largest pixel value."""
    return float(_array(u).max())


def top_fraction_score(u, fraction: float = 0.05) -> float:
    """Mean of the ``fraction`` highest pixels (at least one pixel)."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    flat = _array(u).reshape(-1)
    k = max(1, int(round(fraction * flat.size)))
    return float(np.partition(flat, flat.size - k)[flat.size - k:].mean(dtype=np.float64))


def edge_band(mask, width: int) -> np.ndarray:
    """Pixels within ``width`` pixels of the predicted edge: ``dilate(mask) XOR erode(mask)`` (``width`` iterations of
    the cross-shaped element, in as many dimensions as the mask has). Empty when the mask is empty or full."""
    from scipy import ndimage

    if int(width) < 1:
        raise ValueError(f"band width must be >= 1 pixel, got {width}")
    m = np.asarray(mask) > 0.5
    if not m.any() or m.all():
        return np.zeros(m.shape, bool)
    outer = ndimage.binary_dilation(m, iterations=int(width))
    inner = ndimage.binary_erosion(m, iterations=int(width), border_value=1)
    return outer & ~inner


def band_width(shape, width_fraction: float = 0.02) -> int:
    """Band width in pixels for a map of ``shape``: ``width_fraction`` of its shortest side, at least 1 (4 px at 224)."""
    return max(1, int(round(width_fraction * min(int(s) for s in shape))))


def boundary_discounted_score(u, mask, width: int | None = None, width_fraction: float = 0.02) -> float:
    """Mean uncertainty outside the band of ``width`` pixels (default :func:`band_width`) around the predicted edge.

    The band is :func:`edge_band` of the predicted (thresholded) mask; with an empty prediction there is no edge and
    the score is the plain mean. When the band covers the whole image there is no doubt away from an edge: 0.
    """
    a = _array(u)
    m = np.asarray(mask.detach().cpu().numpy() if hasattr(mask, "detach") else mask)
    m = m.reshape(a.shape) if m.size == a.size else m
    if m.shape != a.shape:
        raise ValueError(f"mask {m.shape} and uncertainty map {a.shape} differ in shape")
    band = edge_band(m, band_width(a.shape, width_fraction) if width is None else width)
    outside = ~band
    return float(a[outside].mean(dtype=np.float64)) if outside.any() else 0.0


@dataclass(frozen=True)
class ImageScore:
    """A named image score: ``fn`` applied to the map ``map_name`` (and the predicted mask when ``needs_mask``)."""

    name: str
    map_name: str
    fn: Callable[..., float]
    description: str
    needs_mask: bool = False

    def __call__(self, maps: Mapping, mask=None) -> float:
        if self.map_name not in maps or maps[self.map_name] is None:
            raise KeyError(f"score {self.name!r} needs the {self.map_name!r} map; available: "
                           f"{sorted(k for k, v in maps.items() if v is not None)}")
        if self.needs_mask:
            if mask is None:
                raise ValueError(f"score {self.name!r} needs the predicted mask")
            return self.fn(maps[self.map_name], mask)
        return self.fn(maps[self.map_name])


SCORES: dict[str, ImageScore] = {s.name: s for s in (
    ImageScore("mean", "uncertainty", mean_score, "mean predictive entropy"),
    ImageScore("top5", "uncertainty", partial(top_fraction_score, fraction=0.05),
               "mean predictive entropy of the 5 % most uncertain pixels"),
    ImageScore("max", "uncertainty", max_score, "largest predictive entropy"),
    ImageScore("boundary", "uncertainty", boundary_discounted_score,
               "mean predictive entropy outside a band (2 % of the shorter side) around the predicted edge",
               needs_mask=True),
    ImageScore("mi_mean", "mutual_information", mean_score, "mean mutual information (epistemic)"),
    ImageScore("mi_top5", "mutual_information", partial(top_fraction_score, fraction=0.05),
               "mean mutual information of the 5 % highest pixels"),
    ImageScore("std_mean", "std", mean_score, "mean standard deviation over the passes"),
)}


def score_names() -> tuple[str, ...]:
    return tuple(SCORES)


def compute_scores(maps: Mapping, mask=None, names: Iterable[str] | None = None) -> dict[str, float]:
    """``{name: score}`` for ``names`` (default: every score whose map is in ``maps``).

    ``maps`` holds some of ``uncertainty``, ``mutual_information``, ``std`` and ``pred``; the mask for the
    boundary score is ``mask`` or else ``pred > 0.5``. Asking by name for a score whose map is missing is an error.
    """
    if mask is None and maps.get("pred") is not None:
        pred = maps["pred"]
        mask = (pred.detach().cpu().numpy() if hasattr(pred, "detach") else np.asarray(pred)) > 0.5
    if names is None:
        chosen = [s for s in SCORES.values() if maps.get(s.map_name) is not None and (mask is not None or not s.needs_mask)]
    else:
        unknown = [n for n in names if n not in SCORES]
        if unknown:
            raise ValueError(f"unknown score(s) {unknown}; choose from {list(SCORES)}")
        chosen = [SCORES[n] for n in names]
    return {s.name: s(maps, mask) for s in chosen}
