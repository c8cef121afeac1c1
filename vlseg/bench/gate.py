"""The gate an image-level uncertainty score has to pass before active learning may rank by it.

A score is useful for choosing images to annotate when it tracks the model's error on them. Given per-image scores
and per-image Dice, :func:`gate` measures, with seeded bootstrap 95 % confidence intervals (images resampled with
replacement, percentile intervals):

* ``spearman`` -- Spearman rank correlation of the score with the error ``1 - Dice`` (:func:`spearman`);
* ``worst_in_top`` -- the share of the worst ``fraction`` (10 %) of images by error that are also in the top
  ``fraction`` by score (:func:`worst_in_top_share`); a score that knows nothing gets ``fraction`` on average
  (reported as ``chance``), a perfect one 1.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np

__all__ = ["spearman", "worst_in_top_share", "bootstrap_ci", "gate", "gate_columns", "gate_rows"]


def _ranks(x: np.ndarray) -> np.ndarray:
    from scipy.stats import rankdata

    return rankdata(x, method="average")


def spearman(x, y) -> float:
    """Spearman rank correlation (Pearson correlation of average ranks); NaN with fewer than 3 values or when
    either side is constant."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.shape != y.shape:
        raise ValueError(f"scores ({x.size}) and errors ({y.size}) differ in length")
    if x.size < 3:
        return float("nan")
    rx, ry = _ranks(x), _ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    den = math.sqrt(float((rx * rx).sum() * (ry * ry).sum()))
    return float((rx * ry).sum() / den) if den > 0 else float("nan")


def _top(values: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` largest values; ties broken by position (stable), so the answer is deterministic."""
    order = np.argsort(-values, kind="stable")
    return order[:k]


def worst_in_top_share(score, error, fraction: float = 0.1) -> float:
    """Share of the ``ceil(fraction * n)`` images with the largest ``error`` that are among the same number of
    images with the largest ``score``."""
    s, e = np.asarray(score, np.float64), np.asarray(error, np.float64)
    if s.shape != e.shape:
        raise ValueError(f"scores ({s.size}) and errors ({e.size}) differ in length")
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if s.size == 0:
        return float("nan")
    k = max(1, math.ceil(fraction * s.size))
    return len(set(_top(e, k).tolist()) & set(_top(s, k).tolist())) / k


def bootstrap_ci(stat: Callable[[np.ndarray, np.ndarray], float], x, y, n_boot: int = 1000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of ``stat(x, y)``, resampling the pairs with replacement (``seed``ed); resamples
    where the statistic is undefined (NaN) are left out; NaNs when none is defined."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    vals = np.array([stat(x[i], y[i]) for i in rng.integers(0, x.size, size=(int(n_boot), x.size))])
    vals = vals[np.isfinite(vals)]
    if vals.size == 0:
        return float("nan"), float("nan")
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(vals, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def gate(scores: Mapping[str, Sequence[float]], dice: Sequence[float], fraction: float = 0.1, n_boot: int = 1000,
         seed: int = 0) -> dict[str, dict]:
    """Per score name: ``spearman`` (score vs 1 - Dice) and ``worst_in_top`` with their bootstrap 95 % CIs
    (``*_ci``), ``n`` images and the ``chance`` level of ``worst_in_top``. Each score gets the same resamples."""
    err = 1.0 - np.asarray(dice, np.float64)
    if not np.isfinite(err).all():
        raise ValueError("Dice values must be finite numbers")
    out = {}
    for name, values in scores.items():
        s = np.asarray(values, np.float64)
        if s.shape != err.shape:
            raise ValueError(f"score {name!r} has {s.size} values for {err.size} images")
        share = lambda a, b: worst_in_top_share(a, b, fraction)  # noqa: E731
        out[name] = {
            "n": int(s.size),
            "spearman": spearman(s, err),
            "spearman_ci": list(bootstrap_ci(spearman, s, err, n_boot, seed)),
            "worst_in_top": worst_in_top_share(s, err, fraction),
            "worst_in_top_ci": list(bootstrap_ci(share, s, err, n_boot, seed)),
            "chance": fraction,
        }
    return out


def gate_columns(fraction: float = 0.1) -> list[str]:
    """Header of the report's gate table (:func:`gate_rows`)."""
    pct = f"{100 * fraction:g} %"
    return ["model", "score", "images", "Spearman(score, 1 - Dice) [95 % CI]",
            f"worst {pct} in top {pct} by score [95 % CI] (chance {fraction:.2f})"]


def _fmt(v: float, ci) -> str:
    if not math.isfinite(v):
        return "n/a"
    lo, hi = ci
    return f"{v:.3f} [{lo:.3f}, {hi:.3f}]" if math.isfinite(lo) else f"{v:.3f}"


def gate_rows(model: str, result: Mapping[str, Mapping]) -> list[list]:
    """Rows of the report's gate table (:func:`gate_columns`) for one model's :func:`gate` result."""
    return [[model, name, r["n"], _fmt(r["spearman"], r["spearman_ci"]), _fmt(r["worst_in_top"], r["worst_in_top_ci"])]
            for name, r in result.items()]
