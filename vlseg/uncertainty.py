"""Pixel-wise uncertainty shared by every bundle and the MONAI Label app (bundle contract, "Outputs").

The contract defines the uncertainty map as the binary entropy of the mean foreground probability over the
stochastic passes, divided by ln 2 so that it lies in [0, 1] (1 = p of 0.5, maximal doubt).
"""

from __future__ import annotations

import math

import torch

__all__ = ["binary_entropy", "mean_and_uncertainty", "uncertainty_scores"]

_EPS = 1e-6


def binary_entropy(prob: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """H(p) = -p log p - (1 - p) log(1 - p), element-wise; divided by ln 2 when ``normalize`` (range [0, 1])."""
    p = prob.clamp(_EPS, 1.0 - _EPS)
    h = -(p * torch.log(p) + (1.0 - p) * torch.log1p(-p))
    if normalize:
        h = h / math.log(2.0)
    return h.clamp(0.0, 1.0) if normalize else h


def mean_and_uncertainty(prob_samples: torch.Tensor, sample_dim: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean foreground probability over ``sample_dim`` and its normalised binary entropy."""
    mean = prob_samples.mean(dim=sample_dim)
    return mean, binary_entropy(mean)


def uncertainty_scores(uncertainty: torch.Tensor, top_fraction: float = 0.05) -> dict[str, float]:
    """Image-level scores of an uncertainty map, used by active learning.

    ``mean``: mean over all pixels; ``top5``: mean of the ``top_fraction`` most uncertain pixels (so a small
    doubtful region is not washed out by a large confident background); ``max``.
    """
    flat = uncertainty.detach().float().reshape(-1)
    if flat.numel() == 0:
        raise ValueError("empty uncertainty map")
    k = max(1, int(round(top_fraction * flat.numel())))
    top = torch.topk(flat, k).values
    return {"mean": float(flat.mean()), "top5": float(top.mean()), "max": float(flat.max())}
