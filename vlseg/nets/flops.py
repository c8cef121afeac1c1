"""FLOPs of one forward pass, attention included.

``torch.utils.flop_counter.FlopCounterMode`` misses attention in two places that every CLIP / SAM tower hits:

* in eval mode under ``no_grad``, ``nn.MultiheadAttention`` (and ``nn.TransformerEncoderLayer``) take PyTorch's
  fused "fast path" (``aten._native_multi_head_attention``), which the counter has no formula for, so the whole
  attention block, projections included, counts as 0;
* on CPU, ``F.scaled_dot_product_attention`` dispatches to ``aten._scaled_dot_product_flash_attention_for_cpu``,
  which has no formula either, so ``QK^T`` and ``AV`` count as 0.

:func:`forward_flops` therefore counts with the fast path switched off for the duration of the count (the slow
path computes the same numbers through ``linear`` + SDPA, which are counted) and with a formula for the CPU SDPA
kernel. A multiply-add counts as 2 FLOPs, as in the counter's own formulas.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

__all__ = ["forward_flops", "attention_flop_formulas"]


def _sdpa_cpu_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """``softmax(Q K^T) V`` for ``[B, H, Lq, E]`` queries, ``[B, H, Lk, E]`` keys, ``[B, H, Lk, Ev]`` values."""
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query_shape, key_shape, value_shape)


def attention_flop_formulas() -> dict:
    """``custom_mapping`` for ``FlopCounterMode``: the attention kernels it has no formula for."""
    aten = torch.ops.aten
    formulas = {}
    op = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is not None:
        formulas[op] = _sdpa_cpu_flops
    return formulas


@contextlib.contextmanager
def _mha_fast_path(enabled: bool):
    mha = getattr(torch.backends, "mha", None)
    if mha is None:
        yield
        return
    before = mha.get_fastpath_enabled()
    mha.set_fastpath_enabled(enabled)
    try:
        yield
    finally:
        mha.set_fastpath_enabled(before)


def forward_flops(model: nn.Module, *args, **kwargs) -> int:
    """FLOPs of one eval-mode forward pass of ``model(*args, **kwargs)``, attention included (module docstring)."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), _mha_fast_path(False), \
                FlopCounterMode(display=False, custom_mapping=attention_flop_formulas()) as counter:
            model(*args, **kwargs)
    finally:
        model.train(was_training)
    return int(counter.get_total_flops())
