"""Auxiliary region-text alignment of a RANDOMLY initialised CLIP (small / tiny variants only; NOT in the paper).

A random CLIP has no image-text alignment, so its M2IB map is meaningless and the prompt could not reach the output
(in this architecture the text acts only through the M2IB map). :func:`alignment_loss` gives the CLIP the property
M2IB relies on -- the image embedding matches the prompt when the named object is kept -- using the training masks
(area-pooled to the CLIP patch grid); prompts see no mask at inference. :class:`AlignmentHead` holds its two
parameters; the network creates one only when the loss is used (never in the paper configuration).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["AlignmentHead", "alignment_loss"]


class AlignmentHead(nn.Module):
    """Scale and bias of the per-patch text logits of the dense term (``align_scale * cos + align_bias``)."""

    def __init__(self, scale: float = 10.0, bias: float = -2.0):
        super().__init__()
        self.align_scale = nn.Parameter(torch.tensor(float(scale)))
        self.align_bias = nn.Parameter(torch.tensor(float(bias)))


def _balanced(bce: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Class-balanced mean of a per-patch loss ``[B, g]``: half positives, half negatives."""
    n_pos = pos.sum(dim=1).clamp_min(1.0)
    n_neg = (1 - pos).sum(dim=1).clamp_min(1.0)
    return 0.5 * ((bce * pos).sum(dim=1) / n_pos + (bce * (1 - pos)).sum(dim=1) / n_neg)


def alignment_loss(net, tokens: torch.Tensor, text_emb: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Three terms on the CLIP of ``net`` (a ``SimpleViLMedSAM`` with an ``align_head``), averaged over the items
    whose mask is not empty; ``tokens`` are the vision token states after the M2IB layer, ``target`` the masks.

    * dense: every patch embedding (tower output, projected) is classified against the item's own prompt, target
      patches positive and all others (background AND the other objects) negative; class-balanced binary
      cross-entropy on ``align_scale * cos + align_bias``.
    * bottleneck: at the M2IB layer, keeping only the target tokens (others replaced by the bottleneck's noise,
      lambda = 0) must match the prompt better than keeping only the complement:
      ``softplus(10 (cos(t, z_complement) - cos(t, z_target)))``.
    * attribution: at the M2IB layer, the gradient x input attribution of ``cos(t, image embedding)`` per token (what
      M2IB's first Adam steps see) must be positive on the target and negative elsewhere (class-balanced BCE on the
      attribution divided by its mean magnitude; double back-propagation).

    Only the item's own prompt is used, so several prompts of one category in a batch are no false negatives.
    Sets ``net.last_alignment_accuracy``: share of items whose most text-similar patch lies on the target.
    """
    clip, layer, head = net.clip, net.prompter.layer, net.align_head
    b = tokens.shape[0]
    gh, gw = clip.grid
    m = F.adaptive_avg_pool2d(target.float(), (gh, gw)).flatten(1).to(tokens.dtype)  # [B, g]
    valid = m.sum(dim=1) > 0
    if not bool(valid.any()):
        return tokens.sum() * 0.0
    t = F.normalize(text_emb.float(), dim=-1)
    pos = (m > 0.5).float()
    # dense term
    patches = F.normalize(clip.patch_embeddings(tokens, layer).float(), dim=-1)  # [B, g, D]
    cos = torch.einsum("bgd,bd->bg", patches, t)
    bce = F.binary_cross_entropy_with_logits(head.align_scale * cos + head.align_bias, pos, reduction="none")
    dense = _balanced(bce, pos)
    # bottleneck term (noise of the bottleneck at lambda = 0: sigma * eps)
    pre = torch.zeros(b, clip.num_prefix, device=tokens.device, dtype=tokens.dtype)
    w_pos = torch.cat([pre, m], dim=1)[..., None]
    w_neg = torch.cat([pre, 1.0 - m], dim=1)[..., None]
    noise_var = net.prompter.settings["noise_var"]
    eps = torch.randn_like(tokens) * (1.0 if noise_var is None else noise_var ** 0.5)
    z = torch.cat([w_pos * tokens + (1 - w_pos) * eps, w_neg * tokens + (1 - w_neg) * eps])
    r = F.normalize(clip.embed_from(z, layer).float(), dim=-1)
    margin = F.softplus(10.0 * ((r[b:] * t).sum(-1) - (r[:b] * t).sum(-1)))
    # attribution term (double backprop through the upper CLIP blocks)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    x = tokens if tokens.requires_grad else tokens.detach().requires_grad_(True)
    with sdpa_kernel(SDPBackend.MATH):  # the fused CPU attention kernels have no double backward
        fit = (F.normalize(clip.embed_from(x, layer).float(), dim=-1) * t).sum()
        (grad,) = torch.autograd.grad(fit, [x], create_graph=True)
    attr = (grad * x).sum(dim=-1)[:, clip.num_prefix:].float()  # [B, g]
    attr = attr / attr.abs().mean(dim=1, keepdim=True).clamp_min(1e-8)
    attribution = _balanced(F.binary_cross_entropy_with_logits(attr, pos, reduction="none"), pos)
    with torch.no_grad():
        best = cos.argmax(dim=1)
        net.last_alignment_accuracy = float((m[torch.arange(b), best] > 0)[valid].float().mean())
    return (dense + margin + attribution)[valid].mean()
