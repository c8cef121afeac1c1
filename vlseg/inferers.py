"""Inference shared by the three bundles: stochastic passes -> mean probability + uncertainty maps.

Every bundle network follows one calling convention (see ``docs/ARCHITECTURE.md``)::

    logits = network(image, text_ids, text_mask)          # [B, 1, H, W] foreground logits

and may expose a faster sampler::

    probs = network.sample_probabilities(image, text_ids, text_mask, num_samples=S)   # [S, B, 1, H, W]

(MedCLIPSeg uses it to batch its 30 variational passes and reuse everything that does not depend on the
sampled values). Networks without their own sampler are sampled with Monte-Carlo dropout: their dropout
layers are switched to train mode for the passes (batch-norm stays in eval mode).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager

import torch
from monai.inferers import Inferer

from vlseg.uncertainty import MAP_NAMES, binary_entropy, uncertainty_maps

__all__ = ["StochasticTextInferer", "mc_dropout", "sample_probabilities", "logits_of"]

_DROPOUT_TYPES = (torch.nn.Dropout, torch.nn.Dropout1d, torch.nn.Dropout2d, torch.nn.Dropout3d, torch.nn.AlphaDropout)


def logits_of(output) -> torch.Tensor:
    """Networks may return a dict during training (extra terms for the loss); inference wants the logits."""
    if isinstance(output, Mapping):
        return output["logits"]
    return output


@contextmanager
def mc_dropout(network: torch.nn.Module):
    """Temporarily put only the dropout layers (and modules flagged ``mc_dropout_layer``) in train mode."""
    switched = []
    for m in network.modules():
        if isinstance(m, _DROPOUT_TYPES) or getattr(m, "mc_dropout_layer", False):
            switched.append((m, m.training))
            m.train(True)
    try:
        yield
    finally:
        for m, was_training in switched:
            m.train(was_training)


def sample_probabilities(network, image, *args, num_samples: int = 1, **kwargs) -> torch.Tensor:
    """Return ``[S, B, 1, H, W]`` foreground probabilities from ``num_samples`` stochastic passes.

    ``num_samples == 1`` is a single deterministic pass (dropout off).
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if hasattr(network, "sample_probabilities"):
        return network.sample_probabilities(image, *args, num_samples=num_samples, **kwargs)
    if num_samples == 1:
        return torch.sigmoid(logits_of(network(image, *args, **kwargs)))[None]
    with mc_dropout(network):
        return torch.stack([torch.sigmoid(logits_of(network(image, *args, **kwargs))) for _ in range(num_samples)])


class StochasticTextInferer(Inferer):
    """MONAI inferer returning ``[B, 2, H, W]``: channel 0 = mean foreground probability, channel 1 = uncertainty
    (predictive entropy); with ``decompose=True`` ``[B, 4, H, W]``: also channel 2 = mutual information and
    channel 3 = standard deviation over the passes (:data:`vlseg.uncertainty.MAP_NAMES`, from the same passes).

    Args:
        num_samples: stochastic passes (the method's own sampling or MC dropout).
        seed: when not None, the passes draw from a private RNG seeded with it, so the same input and seed
            give identical maps, and the caller's global RNG is left untouched.
        extra_keys: unused by the inferer itself; documents the batch keys the bundles pass
            (``PrepareBatchExtraInput(extra_keys=["text_ids", "text_mask"])``).
        decompose: add the mutual-information and standard-deviation channels (the bundles' inference configs set
            it; training-time validation keeps the two contract channels).
        sampler: optional callable ``sampler(network, image, *args, num_samples=S, **kwargs) -> [S', B, 1, H, W]``
            used instead of :func:`sample_probabilities` (e.g. MedCLIPSeg's ``scripts.sampler.MapSampler`` with an
            adaptive or control-variate sampling); None (default): :func:`sample_probabilities`.
    """

    def __init__(self, num_samples: int = 1, seed: int | None = 0, extra_keys: Sequence[str] = ("text_ids", "text_mask"),
                 decompose: bool = False, sampler: Callable | None = None):
        super().__init__()
        if sampler is not None and not callable(sampler):
            raise TypeError(f"sampler must be callable (network, image, *args, num_samples=...), got {type(sampler)}")
        self.sampler = sampler
        self.decompose = bool(decompose)
        if int(num_samples) < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        self.num_samples = int(num_samples)
        self.seed = seed
        self.extra_keys = tuple(extra_keys)

    def __call__(self, inputs: torch.Tensor, network, *args, num_samples: int | None = None, **kwargs) -> torch.Tensor:
        n = self.num_samples if num_samples is None else int(num_samples)
        devices = [inputs.device] if inputs.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices, enabled=self.seed is not None):
            if self.seed is not None:
                torch.manual_seed(self.seed)
            probs = (self.sampler or sample_probabilities)(network, inputs, *args, num_samples=n, **kwargs)
        if self.decompose:
            maps = uncertainty_maps(probs)
            return torch.cat([maps[k] for k in MAP_NAMES], dim=1)
        mean = probs.mean(dim=0)
        return torch.cat([mean, binary_entropy(mean)], dim=1)
