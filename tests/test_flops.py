"""FLOP counting sees attention: the fused MultiheadAttention fast path and the CPU SDPA kernel (issue: the speed
report under-counted attention, e.g. 35.2 instead of ~47.9 GFLOPs for MedCLIPSeg's paper config)."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from vlseg.nets.common import forward_flops

B, L, D, H, FF = 2, 10, 64, 4, 128
MHA = 2 * B * L * D * 3 * D + 2 * 2 * B * L * L * D + 2 * B * L * D * D  # in-projection, QK^T and AV, out-projection


class SelfAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(D, H, batch_first=True)

    def forward(self, x):
        return self.attn(x, x, x, need_weights=False)[0]


def test_plain_counter_misses_attention_in_eval_mode():
    """The defect being fixed: the library counter alone sees no attention FLOPs at all in eval mode."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        SelfAttention().eval()(torch.randn(B, L, D))
    assert counter.get_total_flops() < MHA // 2


def test_multihead_attention_matches_analytic_count():
    assert forward_flops(SelfAttention(), torch.randn(B, L, D)) == MHA


def test_transformer_layer_matches_analytic_count_and_fast_path_is_restored():
    before = torch.backends.mha.get_fastpath_enabled()
    layer = nn.TransformerEncoderLayer(D, H, FF, batch_first=True)
    assert forward_flops(layer, torch.randn(B, L, D)) == MHA + 2 * 2 * B * L * D * FF
    assert torch.backends.mha.get_fastpath_enabled() == before
    assert layer.training  # the model's mode is restored too


def test_scaled_dot_product_attention_is_counted():
    class Sdpa(nn.Module):
        def forward(self, q, k, v):
            return nn.functional.scaled_dot_product_attention(q, k, v)

    q, k, v = (torch.randn(B, H, L, D // H) for _ in range(3))
    assert forward_flops(Sdpa(), q, k, v) == 2 * 2 * B * H * L * L * (D // H)
