"""Probabilistic vision-language (PVL) adapters: the probabilistic cross-attention and its equations.

The paper's full text could not be read here (only its abstract and README), so the labels E1..E4 are this bundle's
own; ``docs/README.md`` maps each to the public-code location it follows (HealthX-Lab/MedCLIPSeg ``trainers/layers.py``).

* E1 :func:`key_value_distribution`          keys / values as Gaussians: mean = LayerNorm(W x), var = softplus(W' x) + 1e-6
* E2 :func:`probabilistic_attention_scores`  S = Q K_mu^T / sqrt(C) - beta * sqrt((Q*Q) K_var^T / C)
* E3 :func:`sample_values`                   V = V_mu + sqrt(V_var) * eps,  eps ~ N(0, I), drawn on every pass
* E4 :func:`gated_residual`                  out = sigmoid(g) * attn_out + (1 - sigmoid(g)) * query

Submodule names follow the public code (``q_proj``, ``k_proj``, ``v_proj``, ``out_proj``, ``norm_k``, ``norm_v``,
``gate``, ``two_way.cross_attn_img_to_txt`` ...), so the authors' checkpoints map one to one
(:mod:`scripts.upstream`); the only layout difference is ``proj_vis_down``, an ``nn.Sequential`` holding one Linear
upstream and the Linear itself here.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .sampler import SampleNoise, eps_like

__all__ = ["key_value_distribution", "probabilistic_attention_scores", "sample_values", "gated_residual",
           "ProbCrossAttention", "TwoWayLayer", "PVLAdapter"]


def key_value_distribution(proj: nn.Linear, norm: nn.LayerNorm, context: torch.Tensor, eps: float = 1e-6):
    """E1: one linear map gives ``[mean | raw variance]``; mean = LayerNorm(mean part), var = softplus(raw) + eps.

    (Upstream calls the raw half ``logvar`` but applies softplus, not exp; we follow the computation.)
    """
    mu, raw = proj(context).chunk(2, dim=-1)
    return norm(mu), F.softplus(raw) + eps


def probabilistic_attention_scores(q: torch.Tensor, k_mu: torch.Tensor, k_var: torch.Tensor, beta: float) -> torch.Tensor:
    """E2: ``S = Q K_mu^T / sqrt(C) - beta * sqrt((Q*Q) K_var^T / C)`` (uncertain keys are penalised).

    ``q`` [N,Tq,C], ``k_mu``/``k_var`` [N,Tk,C] -> scores [N,Tq,Tk]. The variance term is clamped at 1e-12 before the
    square root, which changes nothing unless Q is exactly 0 (where the gradient of sqrt would be infinite).
    """
    c = q.shape[-1]
    mean_term = torch.matmul(q, k_mu.transpose(-1, -2)) / math.sqrt(c)
    var_term = torch.matmul(q * q, k_var.transpose(-1, -2)) / c
    return mean_term - beta * torch.sqrt(var_term.clamp_min(1e-12))


def sample_values(v_mu: torch.Tensor, v_var: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """E3: reparameterised value sample ``V = V_mu + sqrt(V_var) * eps`` (a fresh eps on every pass)."""
    return v_mu + torch.sqrt(v_var) * eps


def gated_residual(out: torch.Tensor, query: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """E4: ``sigmoid(g) * out + (1 - sigmoid(g)) * query`` with a learnable scalar ``g`` (initialised to 0)."""
    g = torch.sigmoid(gate)
    return g * out + (1.0 - g) * query


class ProbCrossAttention(nn.Module):
    """Single-head probabilistic cross-attention (E1-E4) on ``dim``-wide tokens."""

    def __init__(self, dim: int = 256, beta: float = 2.35, gate_init: float = 0.0, var_eps: float = 1e-6):
        super().__init__()
        self.dim, self.beta, self.var_eps = int(dim), float(beta), float(var_eps)
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, 2 * dim)
        self.v_proj = nn.Linear(dim, 2 * dim)
        self.out_proj = nn.Linear(dim, dim)
        self.norm_k = nn.LayerNorm(dim)
        self.norm_v = nn.LayerNorm(dim)
        self.gate = nn.Parameter(torch.tensor(float(gate_init)))

    def forward(self, query: torch.Tensor, context: torch.Tensor, key_padding_mask: torch.Tensor | None = None,
                noise: SampleNoise | None = None, noise_len: int | None = None) -> torch.Tensor:
        q = self.q_proj(query)
        k_mu, k_var = key_value_distribution(self.k_proj, self.norm_k, context, self.var_eps)
        v_mu, v_var = key_value_distribution(self.v_proj, self.norm_v, context, self.var_eps)
        scores = probabilistic_attention_scores(q, k_mu, k_var, self.beta)
        if key_padding_mask is not None:  # optional (not upstream): ignore padded text tokens as keys
            scores = scores.masked_fill(~key_padding_mask.bool()[:, None, :], float("-inf"))
        attn = scores.softmax(dim=-1)
        v = sample_values(v_mu, v_var, eps_like(v_mu, noise, noise_len))
        return gated_residual(self.out_proj(torch.matmul(attn, v)), query, self.gate)


class TwoWayLayer(nn.Module):
    """Image tokens attend to text tokens, then text tokens attend to the UPDATED image tokens."""

    def __init__(self, dim: int = 256, beta: float = 2.35, gate_init: float = 0.0):
        super().__init__()
        self.cross_attn_img_to_txt = ProbCrossAttention(dim, beta, gate_init)
        self.cross_attn_txt_to_img = ProbCrossAttention(dim, beta, gate_init)

    def forward(self, img, txt, txt_key_mask=None, noise=None):
        img = self.cross_attn_img_to_txt(img, txt, key_padding_mask=txt_key_mask, noise=noise,
                                         noise_len=getattr(noise, "text_len", None))
        txt = self.cross_attn_txt_to_img(txt, img, noise=noise)
        return img, txt


class PVLAdapter(nn.Module):
    """Probabilistic vision-language adapter: bias-free down projections (vis/txt width -> ``adapter_dim``), the
    two-way layer, bias-free up projections back. Returns the residual updates for both streams."""

    def __init__(self, vis_dim: int, txt_dim: int, adapter_dim: int = 256, beta: float = 2.35, gate_init: float = 0.0):
        super().__init__()
        self.proj_vis_down = nn.Linear(vis_dim, adapter_dim, bias=False)
        self.proj_txt_down = nn.Linear(txt_dim, adapter_dim, bias=False)
        self.two_way = TwoWayLayer(adapter_dim, beta, gate_init)
        self.proj_vis_up = nn.Linear(adapter_dim, vis_dim, bias=False)
        self.proj_txt_up = nn.Linear(adapter_dim, txt_dim, bias=False)

    def forward(self, vis, txt, txt_key_mask=None, noise=None):
        v, t = self.two_way(self.proj_vis_down(vis), self.proj_txt_down(txt), txt_key_mask, noise)
        return self.proj_vis_up(v), self.proj_txt_up(t)
