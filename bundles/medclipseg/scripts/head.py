"""Segmentation head: text query x up-scaled patch features (E5), with the up-scaling block of the public code.

* E5 :func:`text_conditioned_logits`  logits = MLP(t / |t|) . Upscale(P / |P|) at every pixel

:class:`ScaleBlock` uses timm's ``LayerNorm2d`` (eps 1e-6), as the public code (``trainers/scale_block.py``) does.
"""

from __future__ import annotations

import torch
from timm.layers import LayerNorm2d
from torch import nn

__all__ = ["text_conditioned_logits", "ScaleBlock", "LayerNorm2d", "mask_head_mlp"]


def text_conditioned_logits(text_query: torch.Tensor, pixel_features: torch.Tensor) -> torch.Tensor:
    """E5: per-pixel dot product of the text query [B,C] with the up-scaled patch features [B,C,h,w] -> [B,1,h,w]."""
    return torch.einsum("bc,bchw->bhw", text_query, pixel_features)[:, None]


def mask_head_mlp(dim: int) -> nn.Sequential:
    """Three Linear layers of width ``dim`` with GELU between them (applied to the L2-normalised text embedding)."""
    return nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim))


class ScaleBlock(nn.Module):
    """2x up-scaling: transposed conv 2x2 stride 2 -> GELU -> depthwise 3x3 (no bias) -> LayerNorm2d (eps 1e-6)."""

    def __init__(self, dim: int):
        super().__init__()
        self.conv1 = nn.ConvTranspose2d(dim, dim, kernel_size=2, stride=2)
        self.act = nn.GELU()
        self.conv2 = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim, bias=False)
        self.norm = LayerNorm2d(dim, eps=1e-6)

    def forward(self, x):
        return self.norm(self.conv2(self.act(self.conv1(x))))
