"""Modality Decoding Attention Block (MoDAB), UA-VLS paper section 3.2, equations 3-12.

Layout of one block (visual tokens ``X`` of a decoder stage, ``[B, Y_i = H_i*W_i, C_i]``, text token states
``T'`` ``[B, N, D]``)::

    T_SSMix = GELU(SSMix(LeakyReLU(Linear(T'))))                  eq. 3   (TextPath)
    X_SA    = X + LN(SelfAttn(SPE(LN(X))))                         eq. 4-8 (VisualSelfAttention)
    X_CA    = CrossAttn(Q=SPE(LN(X_SA)), K=SPE(T_SSMix), V=T_SSMix)  eq. 9-11 (TextCrossAttention)
    F       = X_SA + alpha * LN(X_CA)                              eq. 12

The residual of eq. 8 and the "X" of eq. 12 follow the public code (the block input and the self-attended
tokens respectively); see docs/README.md, "Deviations".

Every attention dropout is an ``nn.Dropout`` module so that ``vlseg.inferers.mc_dropout`` can switch exactly
these layers on for Monte-Carlo sampling. The self-attention dropouts act in training too (public code); the
cross-attention dropout acts only in Monte-Carlo sampling (:class:`TextCrossAttention`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from scripts.ssmix import SSMix

__all__ = ["SinusoidalPositionalEncoding", "TextPath", "VisualSelfAttention", "TextCrossAttention", "MoDAB"]


class SinusoidalPositionalEncoding(nn.Module):
    """SPE of eq. 4, 9 and 10: adds the fixed sin/cos table of Vaswani et al. to a ``[B, L, C]`` sequence."""

    def __init__(self, dim: int, max_len: int = 5000):
        super().__init__()
        pos = torch.arange(max_len, dtype=torch.float32)[:, None]
        freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
        table = torch.zeros(max_len, dim)
        table[:, 0::2] = torch.sin(pos * freq)
        table[:, 1::2] = torch.cos(pos * freq[: dim // 2])
        self.register_buffer("table", table, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] > self.table.shape[0]:
            raise ValueError(f"sequence of {x.shape[1]} tokens exceeds the positional table ({self.table.shape[0]})")
        return x + self.table[: x.shape[1]].to(x.dtype)


def _dropout_p(dropout: nn.Dropout) -> float:
    """The drop probability of an ``nn.Dropout`` module while it is switched on (training or ``mc_dropout``)."""
    return dropout.p if dropout.training else 0.0


def _attend(q, k, v, num_heads: int, dropout_p: float, q_norm: nn.Module, k_norm: nn.Module):
    """Scaled dot-product attention over heads (eq. 6 / 11), attention weights dropped with ``dropout_p``."""
    b, lq, c = q.shape
    lk = k.shape[1]
    hd = c // num_heads
    q = q_norm(q.view(b, lq, num_heads, hd).transpose(1, 2))
    k = k_norm(k.view(b, lk, num_heads, hd).transpose(1, 2))
    v = v.view(b, lk, num_heads, hd).transpose(1, 2)
    out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
    return out.transpose(1, 2).reshape(b, lq, c)  # Concat(head_1..head_h)


class TextPath(nn.Module):
    """Eq. 3: ``GELU(SSMix(LeakyReLU(Linear(T'))))`` -- text states ``[B, N, D]`` -> ``[B, N_out, C_i]``.

    ``text_dim`` is configurable (768 for CXR-BERT, 384 for MiniLM): the input Linear maps it to the stage's
    channel count directly, so no extra projection is needed for a narrower text encoder.
    """

    def __init__(self, text_dim: int, dim: int, in_tokens: int = 24, out_tokens: int = 24, **ssmix_kwargs):
        super().__init__()
        self.proj = nn.Linear(text_dim, dim)
        self.act = nn.LeakyReLU()
        self.ssmix = SSMix(dim, in_tokens=in_tokens, out_tokens=out_tokens, **ssmix_kwargs)
        self.out_act = nn.GELU()

    def forward(self, text: torch.Tensor) -> torch.Tensor:
        return self.out_act(self.ssmix(self.act(self.proj(text))))


class VisualSelfAttention(nn.Module):
    """Eq. 4-8: multi-head self-attention over the visual tokens of one stage.

    ``X' = SPE(LN(X))`` (eq. 4); per-head Q/K/V projections (eq. 5; with the public code's per-head LayerNorm on
    Q and K, ``qk_norm``); scaled dot-product attention (eq. 6); concatenation and output projection W^O (eq. 7);
    ``X + LN(SelfAttn(X'))`` (eq. 8, residual on the block input as in the public code).
    """

    def __init__(self, dim: int, num_heads: int = 4, attn_drop: float = 0.1, proj_drop: float = 0.1,
                 qk_norm: bool = True, max_len: int = 5000):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.norm_in = nn.LayerNorm(dim)
        self.pos = SinusoidalPositionalEncoding(dim, max_len)
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        hd = dim // num_heads
        self.q_norm = nn.LayerNorm(hd) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(hd) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.norm_out = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xp = self.pos(self.norm_in(x))  # eq. 4
        q, k, v = self.qkv(xp).chunk(3, dim=-1)  # eq. 5
        heads = _attend(q, k, v, self.num_heads, _dropout_p(self.attn_drop), self.q_norm, self.k_norm)  # eq. 6
        sa = self.proj_drop(self.proj(heads))  # eq. 7
        return x + self.norm_out(sa)  # eq. 8


class TextCrossAttention(nn.Module):
    """Eq. 9-11: visual queries ``SPE(LN(X_SA))``, text keys ``SPE(T_SSMix)`` and values ``T_SSMix``.

    Same parameters, initialisation and arithmetic as the public code's ``nn.MultiheadAttention`` (joint
    in-projection with bias, output projection; Xavier-uniform in-projection and zero biases as
    ``nn.MultiheadAttention._reset_parameters``), written out so that the attention weights can be dropped for
    Monte-Carlo sampling: ``attn_drop`` acts ONLY when this block is in eval mode and its dropout module is
    switched on by ``vlseg.inferers.mc_dropout``. In training it is off, as in the public code, whose
    ``nn.MultiheadAttention`` has no dropout.
    """

    def __init__(self, dim: int, num_heads: int = 4, attn_drop: float = 0.1, max_len: int = 5000):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.norm_q = nn.LayerNorm(dim)
        self.pos = SinusoidalPositionalEncoding(dim, max_len)
        self.in_proj = nn.Linear(dim, 3 * dim, bias=True)
        self.attn_drop = nn.Dropout(attn_drop)
        self.out_proj = nn.Linear(dim, dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``nn.MultiheadAttention``'s initialisation (the output projection keeps ``nn.Linear``'s weight init)."""
        nn.init.xavier_uniform_(self.in_proj.weight)
        nn.init.zeros_(self.in_proj.bias)
        nn.init.zeros_(self.out_proj.bias)

    def mc_dropout_p(self) -> float:
        """Attention-weight dropout: only while the block is in eval mode with its dropout switched on."""
        return 0.0 if self.training else _dropout_p(self.attn_drop)

    def forward(self, x_sa: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        wq, wk, wv = self.in_proj.weight.chunk(3, dim=0)
        bq, bk, bv = self.in_proj.bias.chunk(3, dim=0)
        q = F.linear(self.pos(self.norm_q(x_sa)), wq, bq)  # eq. 9
        k = F.linear(self.pos(text), wk, bk)  # eq. 10 (keys carry the token positions)
        v = F.linear(text, wv, bv)  # eq. 10 (values do not)
        heads = _attend(q, k, v, self.num_heads, self.mc_dropout_p(), nn.Identity(), nn.Identity())
        return self.out_proj(heads)  # eq. 11


class MoDAB(nn.Module):
    """Modality Decoding Attention Block (eq. 3-12) on one decoder stage.

    ``forward(x [B, C, H, W], text [B, N, D]) -> F [B, C, H, W]`` (fused tokens reshaped back to the map, the
    ``F'`` the decoder of section 3.4 starts from).

    Args:
        dim: channels C_i of the visual stage. text_dim: width D of the text token states.
        in_tokens / out_tokens: text length before / after SSMix (24 -> 24, 12 or 9 upstream).
        num_heads: attention heads (4). attn_drop / proj_drop: self-attention dropouts (0.1 / 0.1, public code).
        cross_attn_drop: cross-attention weight dropout for Monte-Carlo sampling ONLY (0.1; off in training, as the
            public code, which has none; it exists so that the Monte-Carlo mode also samples the text-dependent
            path; see docs/README.md).
        alpha_init: initial value of the learnable alpha of eq. 12 (1.421 in the public code).
        ssmix: keyword arguments of :class:`scripts.ssmix.SSMix`.
    """

    def __init__(self, dim: int, text_dim: int = 768, in_tokens: int = 24, out_tokens: int = 24, num_heads: int = 4,
                 attn_drop: float = 0.1, proj_drop: float = 0.1, cross_attn_drop: float = 0.1,
                 alpha_init: float = 1.421, qk_norm: bool = True, ssmix: dict | None = None):
        super().__init__()
        self.text_path = TextPath(text_dim, dim, in_tokens, out_tokens, **(ssmix or {}))
        self.self_attn = VisualSelfAttention(dim, num_heads, attn_drop, proj_drop, qk_norm)
        self.cross_attn = TextCrossAttention(dim, num_heads, cross_attn_drop)
        self.norm_ca = nn.LayerNorm(dim)
        self.alpha = nn.Parameter(torch.tensor(float(alpha_init)))

    def forward(self, x: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = x.flatten(2).transpose(1, 2)  # [B, Y_i, C_i]
        t = self.text_path(text)  # eq. 3
        x_sa = self.self_attn(tokens)  # eq. 4-8
        x_ca = self.cross_attn(x_sa, t)  # eq. 9-11
        fused = x_sa + self.alpha * self.norm_ca(x_ca)  # eq. 12
        return fused.transpose(1, 2).reshape(b, c, h, w)
