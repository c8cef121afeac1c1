"""Noise of the stochastic passes: one seeded generator per pass, so a pass draws the same values alone or batched.

The fast sampler (:meth:`scripts.network.MedCLIPSeg.sample_probabilities`) stacks the passes sample-major (rows
``s*B .. s*B+B-1`` belong to pass ``s``). Each value-sampling call (E3) draws ``[B, ...]`` from every pass's own
generator, so the naive loop of full passes and the batched fast path give the same maps for the same seed.

The draws of a pass are made for the WHOLE batch of B images at once: the noise an image gets depends on B and on its
position in the batch, so the same seed gives different (equally distributed) maps at batch 1 and batch 8.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["SampleNoise", "eps_like", "pass_seeds"]


class SampleNoise:
    """Noise for the value sampling (E3) with one generator per stochastic pass (see the module docstring)."""

    def __init__(self, seeds: Sequence[int], device: torch.device | str = "cpu", text_len: int | None = None):
        self.seeds = [int(s) for s in seeds]
        device = torch.device(device)
        self.generators = [torch.Generator(device=device).manual_seed(s) for s in self.seeds]
        #: full (padded) text length: text-shaped draws are made at this length and cut to the tokens used
        self.text_len = text_len

    def randn_like(self, ref: torch.Tensor, full_len: int | None = None) -> torch.Tensor:
        n = len(self.generators)
        if ref.shape[0] % n:
            raise ValueError(f"batch {ref.shape[0]} is not a multiple of the {n} passes")
        tail = tuple(ref.shape[1:])
        if full_len is not None and ref.ndim >= 2 and full_len > ref.shape[1]:
            tail = (int(full_len),) + tail[1:]
        shape = (ref.shape[0] // n,) + tail
        draws = [torch.randn(shape, generator=g, device=ref.device, dtype=ref.dtype) for g in self.generators]
        out = draws[0] if n == 1 else torch.cat(draws, dim=0)
        return out[:, : ref.shape[1]] if out.shape[1] != ref.shape[1] else out


def eps_like(ref: torch.Tensor, noise: SampleNoise | None, full_len: int | None = None) -> torch.Tensor:
    """Standard normal noise shaped like ``ref``: torch's global RNG without ``noise`` (training), else per pass."""
    return torch.randn_like(ref) if noise is None else noise.randn_like(ref, full_len)


def pass_seeds(num_samples: int, seed: int | None = None) -> list[int]:
    """One seed per stochastic pass; without ``seed`` a base seed is drawn from torch's global RNG (so the
    inferer's ``seed`` fixes it)."""
    base = int(torch.randint(0, 2**31 - 1, (1,)).item()) if seed is None else int(seed)
    return [(base * 1_000_003 + s) % (2**63 - 1) for s in range(int(num_samples))]
