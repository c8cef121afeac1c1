"""Calibration and uncertainty-quality measures on pixel arrays.

* :func:`expected_calibration_error` -- ECE with equal-width confidence bins (15 by default, Guo et al. 2017).
  For a binary segmentation the confidence of a pixel is ``max(p, 1 - p)`` and it is correct when
  ``(p > 0.5) == label`` (``mode="top_label"``, the usual definition); ``mode="positive"`` instead bins ``p``
  itself and compares its mean with the fraction of foreground pixels (reliability of the foreground class).
* :func:`auroc` -- area under the ROC curve of a score for a binary target (here: the uncertainty map as a
  detector of wrong pixels). ``sklearn.metrics.roc_auc_score`` when scikit-learn is installed, otherwise the
  rank-based Mann-Whitney statistic (ties get average ranks, so both agree exactly).
* :func:`boundary_band` and :func:`region_means` -- the boundary of a mask is ``mask XOR eroded(mask)``; the
  interior is the eroded mask; the background is everything outside the mask.
* :class:`CalibrationAccumulator` -- streaming version over many images (bin sums only, so memory stays flat).
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "expected_calibration_error",
    "reliability_bins",
    "auroc",
    "auroc_ranks",
    "boundary_band",
    "region_means",
    "CalibrationAccumulator",
]


def _flat(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64).reshape(-1)


def _bin_index(values: np.ndarray, n_bins: int) -> np.ndarray:
    """Bins ``(k/n, (k+1)/n]``; 0 goes into the first bin."""
    idx = np.ceil(values * n_bins).astype(np.int64) - 1
    return np.clip(idx, 0, n_bins - 1)


def _confidence_and_outcome(prob: np.ndarray, label: np.ndarray, mode: str) -> tuple[np.ndarray, np.ndarray]:
    y = label > 0.5
    if mode == "top_label":
        pred = prob > 0.5
        return np.maximum(prob, 1.0 - prob), (pred == y).astype(np.float64)
    if mode == "positive":
        return prob, y.astype(np.float64)
    raise ValueError(f"mode must be 'top_label' or 'positive', got {mode!r}")


def reliability_bins(prob, label, n_bins: int = 15, mode: str = "top_label") -> dict[str, np.ndarray]:
    """Per-bin ``count``, mean ``confidence`` and mean ``accuracy`` (NaN in empty bins), and the bin ``edges``."""
    p, y = _flat(prob), _flat(label)
    if p.shape != y.shape:
        raise ValueError(f"probabilities ({p.size}) and labels ({y.size}) differ in size")
    if p.size and (p.min() < 0.0 or p.max() > 1.0):
        raise ValueError("probabilities must lie in [0, 1]")
    conf, outcome = _confidence_and_outcome(p, y, mode)
    idx = _bin_index(conf, n_bins)
    count = np.bincount(idx, minlength=n_bins).astype(np.float64)
    sum_conf = np.bincount(idx, weights=conf, minlength=n_bins)
    sum_acc = np.bincount(idx, weights=outcome, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        return {
            "count": count,
            "confidence": np.where(count > 0, sum_conf / count, np.nan),
            "accuracy": np.where(count > 0, sum_acc / count, np.nan),
            "edges": np.linspace(0.0, 1.0, n_bins + 1),
        }


def _ece_from_sums(count, sum_conf, sum_acc) -> float:
    n = float(np.sum(count))
    if n == 0:
        return float("nan")
    return float(np.sum(np.abs(sum_conf - sum_acc)) / n)


def expected_calibration_error(prob, label, n_bins: int = 15, mode: str = "top_label") -> float:
    """``sum_b |B_b|/N * |mean confidence(B_b) - accuracy(B_b)|`` over equal-width bins of [0, 1]."""
    bins = reliability_bins(prob, label, n_bins, mode)
    c = bins["count"]
    conf = np.nan_to_num(bins["confidence"]) * c
    acc = np.nan_to_num(bins["accuracy"]) * c
    return _ece_from_sums(c, conf, acc)


def auroc_ranks(score, target) -> float:
    """AUROC as the Mann-Whitney U statistic with average ranks for ties (no scikit-learn needed)."""
    s, t = _flat(score), _flat(target) > 0.5
    n_pos, n_neg = int(t.sum()), int((~t).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    sorted_s = s[order]
    ranks = np.empty(s.size, dtype=np.float64)
    # average rank (1-based) of each run of equal scores
    boundaries = np.flatnonzero(np.diff(sorted_s)) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [s.size]])
    avg = (starts + ends + 1) / 2.0  # mean of ranks start+1 .. end
    ranks[order] = np.repeat(avg, ends - starts)
    u = ranks[t].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def auroc(score, target) -> float:
    """AUROC of ``score`` for the binary ``target``; NaN when the target has only one class."""
    s, t = _flat(score), _flat(target) > 0.5
    if t.all() or not t.any():
        return float("nan")
    try:
        from sklearn.metrics import roc_auc_score
    except ImportError:  # pragma: no cover - scikit-learn is installed in the project environment
        return auroc_ranks(s, t)
    return float(roc_auc_score(t, s))


def boundary_band(mask, width: int = 2) -> np.ndarray:
    """``mask XOR binary_erosion(mask, width iterations)``: the ``width``-pixel inner rim of every object."""
    from scipy import ndimage

    m = np.asarray(mask) > 0.5
    if width < 1:
        raise ValueError("width must be >= 1")
    eroded = ndimage.binary_erosion(m, iterations=int(width), border_value=0)
    return m ^ eroded


def region_means(uncertainty, mask, width: int = 2) -> dict[str, float]:
    """Mean of ``uncertainty`` on the boundary band, the object interior (eroded mask) and the background."""
    from scipy import ndimage

    u = np.asarray(uncertainty, dtype=np.float64).squeeze()
    m = np.asarray(mask).squeeze() > 0.5
    if u.shape != m.shape:
        raise ValueError(f"uncertainty {u.shape} and mask {m.shape} differ")
    interior = ndimage.binary_erosion(m, iterations=int(width), border_value=0)
    boundary = m ^ interior
    out = {}
    for name, region in (("boundary", boundary), ("interior", interior), ("background", ~m)):
        out[name] = float(u[region].mean()) if region.any() else float("nan")
        out[f"n_{name}"] = int(region.sum())
    return out


class CalibrationAccumulator:
    """Streaming ECE over many images: add ``(prob, label)`` pairs, read :meth:`ece` at the end."""

    def __init__(self, n_bins: int = 15, mode: str = "top_label"):
        self.n_bins, self.mode = int(n_bins), mode
        self.count = np.zeros(self.n_bins)
        self.sum_conf = np.zeros(self.n_bins)
        self.sum_acc = np.zeros(self.n_bins)

    def add(self, prob, label) -> None:
        p, y = _flat(prob), _flat(label)
        conf, outcome = _confidence_and_outcome(p, y, self.mode)
        idx = _bin_index(conf, self.n_bins)
        self.count += np.bincount(idx, minlength=self.n_bins)
        self.sum_conf += np.bincount(idx, weights=conf, minlength=self.n_bins)
        self.sum_acc += np.bincount(idx, weights=outcome, minlength=self.n_bins)

    def ece(self) -> float:
        return _ece_from_sums(self.count, self.sum_conf, self.sum_acc)

    def bins(self) -> dict[str, np.ndarray]:
        with np.errstate(invalid="ignore", divide="ignore"):
            return {
                "count": self.count.copy(),
                "confidence": np.where(self.count > 0, self.sum_conf / self.count, np.nan),
                "accuracy": np.where(self.count > 0, self.sum_acc / self.count, np.nan),
                "edges": np.linspace(0.0, 1.0, self.n_bins + 1),
            }
