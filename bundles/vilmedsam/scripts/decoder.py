"""Affinity-based refinement (second half of the Implicit Position Prompter) and the Bidirectional Interaction
Decoder (BID) of Simple-ViLMedSAM.

Equation numbers follow the order in which the equations appear in the paper summary used by this project
(``shared/papers/simple_vilmedsam_summary.md``); the paper's own numbering is not available to us.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from segment_anything.modeling.common import LayerNorm2d
from segment_anything.modeling.transformer import Attention
from torch import nn

__all__ = ["affinity_refine", "MapEncoder", "BidirectionalInteractionDecoder"]


def affinity_refine(sam_feats: torch.Tensor, init_map: torch.Tensor, scale: float = 3.0,
                    mean_factor: float = 1.2) -> torch.Tensor:
    """Paper Eq. (4)-(5): refined map ``A_f = C A_init`` with the affinity ``C = Softmax(S + M)``.

    ``S`` is the cosine self-similarity of the SAM pixel features (Eq. 4, ``[B, hw, hw]``); as in the public code
    it is rescaled to ``scale * (S - mean_factor * mean(S))`` and entries below 0 (the threshold ``epsilon``) are
    masked with ``-inf`` (Eq. 5) before a row softmax. Deviations: ``mean(S)`` is taken per image (the public code
    averages over the whole batch) and the diagonal is never masked, so a row cannot become all ``-inf`` (NaN).

    Args:
        sam_feats: ``[B, C, h, w]`` SAM image features.
        init_map: ``[B, 1, h, w]`` initial attribution map (same grid).
    Returns:
        ``[B, 1, h, w]`` refined map.
    """
    b, c, h, w = sam_feats.shape
    f = F.normalize(sam_feats.flatten(2).float(), dim=1)  # [B, C, hw]
    s = torch.einsum("bci,bcj->bij", f, f)  # Eq. (4)
    s = scale * (s - mean_factor * s.mean(dim=(1, 2), keepdim=True))
    eye = torch.eye(h * w, dtype=torch.bool, device=s.device)[None]
    s = s.masked_fill((s < 0) & ~eye, float("-inf"))  # Eq. (5): M_ij = -inf where S_ij < epsilon
    affinity = torch.softmax(s, dim=-1)
    refined = torch.bmm(affinity, init_map.flatten(2).transpose(1, 2).float())  # [B, hw, 1]
    return refined.transpose(1, 2).reshape(b, 1, h, w).to(init_map.dtype)


class _MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, act: type[nn.Module], dropout: float):
        super().__init__()
        self.lin1 = nn.Linear(dim, hidden)
        self.act = act()
        self.drop = nn.Dropout(dropout)
        self.lin2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.lin2(self.drop(self.act(self.lin1(x))))


class MapEncoder(nn.Module):
    """``[A_init, A_f]`` (2 x h x w) -> position-prior tokens ``F_A`` ``[B, hw, dim]``.

    LayerNorm over (2, h, w), convs 2 -> dim/4 -> dim/2 (3x3, ReLU, BatchNorm) -> dim (1x1, ReLU), tokens,
    LayerNorm, residual MLP (dim -> mlp_dim -> dim), LayerNorm (public code; dim 256 gives 2 -> 64 -> 128 -> 256).
    """

    def __init__(self, dim: int, mlp_dim: int, grid: tuple[int, int], act: type[nn.Module], dropout: float):
        super().__init__()
        self.norm_in = nn.LayerNorm([2, int(grid[0]), int(grid[1])])
        c1, c2 = max(dim // 4, 1), max(dim // 2, 1)
        self.proj = nn.Sequential(
            nn.Conv2d(2, c1, 3, padding=1), nn.ReLU(inplace=True), nn.BatchNorm2d(c1),
            nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(inplace=True), nn.BatchNorm2d(c2),
            nn.Conv2d(c2, dim, 1), nn.ReLU(inplace=True),
        )
        self.norm1 = nn.LayerNorm(dim)
        self.mlp = _MLP(dim, mlp_dim, act, dropout)
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        t = self.proj(self.norm_in(maps)).flatten(2).transpose(1, 2)
        t = self.norm1(t)
        return self.norm2(t + self.mlp(t))


def _upsampling_head(dim: int, act: type[nn.Module], dropout: float) -> nn.Sequential:
    """x4 up-sampling head (public code), with a spatial dropout before the last 1x1 conv (MC dropout)."""
    return nn.Sequential(
        nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
        nn.Conv2d(dim, dim // 2, 3, padding=1), act(),
        nn.Conv2d(dim // 2, dim // 4, 3, padding=1), act(),
        LayerNorm2d(dim // 4), act(),
        nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
        nn.Conv2d(dim // 4, dim // 8, 3, padding=1), act(),
        nn.Dropout2d(dropout),
        nn.Conv2d(dim // 8, 1, 1),
    )


class BidirectionalInteractionDecoder(nn.Module):
    """Paper Eq. (6)-(9): bidirectional cross-attention between SAM pixel features ``F_IS`` and the position prior.

    * Eq. (6): ``Q1 = LN(CrossAttn(q=F_IS, k=F_A, v=F_A) + F_IS)``
    * Eq. (7): ``M = LN(U + MLP(U))`` with ``U = Q1 + F_A`` (``mode="paper"``; ``mode="code"``: ``U = Q1``)
    * Eq. (8): ``Q2 = LN(CrossAttn(q=F_A, k=F_IS, v=M + F_IS) + M)`` (``mode="paper"``; ``mode="code"`` follows
      the public code: ``q=M, k=v=F_IS``)
    * Eq. (9): ``Y = Up_1(Q1) + Up_2(Q2)`` (two x4 up-sampling heads, summed)

    Attention is segment_anything's ``Attention`` (``num_heads`` heads, internal dim ``dim / downsample``).
    Dropout (not in the paper) after both attentions, inside the MLPs and before the heads' last conv makes
    Monte-Carlo dropout possible for the uncertainty map.
    """

    def __init__(self, dim: int = 256, num_heads: int = 8, mlp_dim: int = 2048, grid: tuple[int, int] = (64, 64),
                 attention_downsample: int = 2, dropout: float = 0.1, mode: str = "paper",
                 act: type[nn.Module] = nn.LeakyReLU):
        super().__init__()
        if mode not in ("paper", "code"):
            raise ValueError(f"mode must be 'paper' or 'code', got {mode!r}")
        self.mode = mode
        self.grid = (int(grid[0]), int(grid[1]))
        self.map_encoder = MapEncoder(dim, mlp_dim, self.grid, act, dropout)
        self.cross_attn1 = Attention(dim, num_heads, downsample_rate=attention_downsample)
        self.norm1 = nn.LayerNorm(dim)
        self.mlp = _MLP(dim, mlp_dim, act, dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.cross_attn2 = Attention(dim, num_heads, downsample_rate=attention_downsample)
        self.norm3 = nn.LayerNorm(dim)
        self.drop = nn.Dropout(dropout)
        self.head1 = _upsampling_head(dim, act, dropout)
        self.head2 = _upsampling_head(dim, act, dropout)

    def forward(self, sam_feats: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
        """``sam_feats [B, dim, h, w]``, ``maps [B, 2, h, w]`` -> logits ``[B, 1, 4h, 4w]``."""
        b, c, h, w = sam_feats.shape
        f_a = self.map_encoder(maps)  # [B, hw, dim]
        f_is = sam_feats.flatten(2).transpose(1, 2)  # [B, hw, dim]
        q1 = self.norm1(f_is + self.drop(self.cross_attn1(q=f_is, k=f_a, v=f_a)))  # Eq. (6)
        u = q1 + f_a if self.mode == "paper" else q1
        m = self.norm2(u + self.mlp(u))  # Eq. (7)
        if self.mode == "paper":
            q2 = self.norm3(m + self.drop(self.cross_attn2(q=f_a, k=f_is, v=m + f_is)))  # Eq. (8)
        else:
            q2 = self.norm3(m + self.drop(self.cross_attn2(q=m, k=f_is, v=f_is)))
        q1 = q1.transpose(1, 2).reshape(b, c, h, w)
        q2 = q2.transpose(1, 2).reshape(b, c, h, w)
        return self.head1(q1) + self.head2(q2)  # Eq. (9)
