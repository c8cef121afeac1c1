"""Helpers every bundle network uses: freezing, parameter/FLOP counting, optional pretrained weights."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from vlseg.nets.flops import forward_flops  # noqa: F401 - re-exported (the bundles import it from here)

__all__ = ["freeze", "trainable_parameters", "count_parameters", "forward_flops", "load_weights_or_warn", "as_token_tensor"]

logger = logging.getLogger("vlseg")


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


def load_weights_or_warn(module: nn.Module, path: str | None, what: str, fetch_hint: str, strict: bool = False,
                         key_map=None) -> bool:
    """Load a local state dict into ``module`` if ``path`` exists; otherwise log ONE warning and keep random weights.

    Returns True when weights were loaded. Never downloads anything.
    """
    if not path or not Path(path).is_file():
        logger.warning("%s: weights file %r not found -> RANDOM weights. %s", what, path, fetch_hint)
        return False
    state = torch.load(str(path), map_location="cpu", weights_only=False)
    for k in ("state_dict", "model", "network"):
        if isinstance(state, dict) and k in state and isinstance(state[k], dict):
            state = state[k]
    if key_map is not None:
        state = {key_map(k): v for k, v in state.items()}
    missing, unexpected = module.load_state_dict(state, strict=strict)
    logger.info("%s: loaded %s (%d missing, %d unexpected keys)", what, path, len(missing), len(unexpected))
    return True


def as_token_tensor(x, device=None) -> torch.Tensor | None:
    """Accept token ids/masks as tensors or nested lists (``verify_net_in_out --extra_forward_args``)."""
    if x is None:
        return None
    t = x if isinstance(x, torch.Tensor) else torch.as_tensor(x)
    if t.ndim == 1:
        t = t[None]
    return t.long().to(device) if device is not None else t.long()
