"""Pixel-wise uncertainty shared by every bundle and the MONAI Label app (bundle contract, "Outputs").

All maps come from the same ``S`` stochastic passes ``p_s`` (foreground probabilities ``[S, ...]``: the method's
own sampler or Monte-Carlo dropout), so they cost nothing beyond the passes every bundle already makes:

* :func:`predictive_entropy` -- the contract's ``uncertainty`` map: ``H(mean_s p_s) / ln 2`` in [0, 1] (1 = a mean
  probability of 0.5). Total uncertainty: it is high on every object rim even when all passes agree (aleatoric).
* :func:`mutual_information` -- ``(H(mean_s p_s) - mean_s H(p_s)) / ln 2`` in [0, 1]: the mutual information between
  the prediction and the sampled weights / values (BALD; Houlsby et al. 2011, "Bayesian Active Learning for
  Classification and Preference Learning"; Gal, Islam & Ghahramani 2017, "Deep Bayesian Active Learning with Image
  Data"). It is 0 where all passes agree and large where they disagree, i.e. what the model does not know yet
  (epistemic). Always ``0 <= MI <= predictive entropy`` (Jensen: the entropy is concave).
* :func:`pass_std` -- the standard deviation of ``p_s`` over the passes (population form, so 0 for one pass; at most
  0.5).

None of these is an equation of the three re-implemented papers; they are the textbook decomposition.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "MAP_NAMES",
    "EXTRA_MAP_NAMES",
    "binary_entropy",
    "predictive_entropy",
    "expected_entropy",
    "mutual_information",
    "pass_std",
    "uncertainty_maps",
    "mean_and_uncertainty",
    "uncertainty_scores",
]

_EPS = 1e-6

#: channel order of :class:`vlseg.inferers.StochasticTextInferer` with ``decompose=True`` (and of the bundles' outputs)
MAP_NAMES = ("pred", "uncertainty", "mutual_information", "std")
#: the maps added to the contract's ``pred`` / ``uncertainty``
EXTRA_MAP_NAMES = MAP_NAMES[2:]


def binary_entropy(prob: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """H(p) = -p log p - (1 - p) log(1 - p), element-wise; divided by ln 2 when ``normalize`` (range [0, 1])."""
    p = prob.clamp(_EPS, 1.0 - _EPS)
    h = -(p * torch.log(p) + (1.0 - p) * torch.log1p(-p))
    if normalize:
        h = h / math.log(2.0)
    return h.clamp(0.0, 1.0) if normalize else h


def _check_samples(prob_samples: torch.Tensor, sample_dim: int) -> torch.Tensor:
    if not torch.is_tensor(prob_samples):
        prob_samples = torch.as_tensor(prob_samples, dtype=torch.float32)
    if prob_samples.ndim == 0 or prob_samples.shape[sample_dim] < 1:
        raise ValueError(f"expected stochastic passes along dim {sample_dim}, got shape {tuple(prob_samples.shape)}")
    return prob_samples


def predictive_entropy(prob_samples: torch.Tensor, sample_dim: int = 0) -> torch.Tensor:
    """Entropy of the mean probability over the passes, ``H(mean_s p_s) / ln 2`` (the contract's ``uncertainty``)."""
    return binary_entropy(_check_samples(prob_samples, sample_dim).mean(dim=sample_dim))


def expected_entropy(prob_samples: torch.Tensor, sample_dim: int = 0) -> torch.Tensor:
    """Mean entropy of the single passes, ``mean_s H(p_s) / ln 2`` (the aleatoric part)."""
    return binary_entropy(_check_samples(prob_samples, sample_dim)).mean(dim=sample_dim)


def mutual_information(prob_samples: torch.Tensor, sample_dim: int = 0) -> torch.Tensor:
    """BALD mutual information ``(H(mean_s p_s) - mean_s H(p_s)) / ln 2``, in [0, predictive entropy].

    Mathematically never negative (Jensen); the clamp only removes rounding (and the ``1e-6`` probability clamp of
    :func:`binary_entropy`) so that ``0 <= MI <= predictive_entropy`` holds exactly.
    """
    return _bald(predictive_entropy(prob_samples, sample_dim), expected_entropy(prob_samples, sample_dim))


def _bald(total: torch.Tensor, expected: torch.Tensor) -> torch.Tensor:
    return torch.minimum((total - expected).clamp(min=0.0), total)


def pass_std(prob_samples: torch.Tensor, sample_dim: int = 0) -> torch.Tensor:
    """Standard deviation of the foreground probability over the passes (population form: 0 for one pass)."""
    return _check_samples(prob_samples, sample_dim).std(dim=sample_dim, unbiased=False)


def uncertainty_maps(prob_samples: torch.Tensor, sample_dim: int = 0) -> dict[str, torch.Tensor]:
    """All maps of :data:`MAP_NAMES` from one set of passes: mean probability (``pred``), predictive entropy
    (``uncertainty``), mutual information and the per-pixel standard deviation."""
    p = _check_samples(prob_samples, sample_dim)
    mean = p.mean(dim=sample_dim)
    total = binary_entropy(mean)
    return {"pred": mean, "uncertainty": total, "mutual_information": _bald(total, expected_entropy(p, sample_dim)),
            "std": pass_std(p, sample_dim)}


def mean_and_uncertainty(prob_samples: torch.Tensor, sample_dim: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean foreground probability over ``sample_dim`` and its normalised binary entropy."""
    mean = prob_samples.mean(dim=sample_dim)
    return mean, binary_entropy(mean)


def uncertainty_scores(uncertainty: torch.Tensor, top_fraction: float = 0.05) -> dict[str, float]:
    """Image-level ``mean``, ``top5`` (mean of the ``top_fraction`` most uncertain pixels, so a small doubtful region
    is not washed out by a large confident background) and ``max`` of one map; see :mod:`vlseg.scores` for all
    scores."""
    from vlseg.scores import max_score, mean_score, top_fraction_score

    return {"mean": mean_score(uncertainty), "top5": top_fraction_score(uncertainty, top_fraction),
            "max": max_score(uncertainty)}
