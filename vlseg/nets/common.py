"""Helpers every bundle network uses: freezing, parameter/FLOP counting, token tensors (pretrained weights: :mod:`vlseg.weights`)."""

from __future__ import annotations

import torch
from torch import nn

from vlseg.nets.flops import forward_flops  # noqa: F401 - re-exported (the bundles import it from here)

__all__ = ["freeze", "trainable_parameters", "count_parameters", "forward_flops", "as_token_tensor"]


def freeze(module: nn.Module, frozen: bool = True) -> nn.Module:
    """Set ``requires_grad = not frozen`` on every parameter of ``module``; returns it."""
    for p in module.parameters():
        p.requires_grad_(not frozen)
    return module


def trainable_parameters(model: nn.Module):
    """Parameters that require grad: what goes into the optimizer (frozen parts never do)."""
    return [p for p in model.parameters() if p.requires_grad]


def count_parameters(model: nn.Module) -> dict[str, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"total": int(total), "trainable": int(trainable), "frozen": int(total - trainable)}


def as_token_tensor(x, device=None) -> torch.Tensor | None:
    """Accept token ids/masks as tensors or nested lists (``verify_net_in_out --extra_forward_args``)."""
    if x is None:
        return None
    t = x if isinstance(x, torch.Tensor) else torch.as_tensor(x)
    if t.ndim == 1:
        t = t[None]
    return t.long().to(device) if device is not None else t.long()
