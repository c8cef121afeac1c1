"""A deliberately tiny text-conditioned segmenter that keeps the bundle calling convention.

``logits = ToyTextSegNet(...)(image [B,3,H,W], text_ids [B,L], text_mask [B,L]) -> [B,1,H,W]``

The prompt really matters: token ids are hashed into a small embedding table, mean-pooled over the mask and
turned into a per-channel scale and shift (FiLM) of the image features, so two prompts give two masks. A
``Dropout2d`` layer gives Monte-Carlo samples to :class:`vlseg.inferers.StochasticTextInferer`.
"""

from __future__ import annotations

import torch
from torch import nn

from vlseg.nets.common import as_token_tensor


class ToyTextSegNet(nn.Module):
    def __init__(self, channels: int = 8, text_buckets: int = 256, embed_dim: int = 8, dropout: float = 0.2):
        super().__init__()
        self.text_buckets = int(text_buckets)
        self.embed = nn.Embedding(self.text_buckets, embed_dim)
        self.film = nn.Linear(embed_dim, 2 * channels)
        self.enc = nn.Sequential(nn.Conv2d(3, channels, 3, padding=1), nn.ReLU())
        self.drop = nn.Dropout2d(dropout)
        self.dec = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(), nn.Conv2d(channels, 1, 1))

    def forward(self, image: torch.Tensor, text_ids, text_mask=None) -> torch.Tensor:
        ids = as_token_tensor(text_ids, image.device)
        mask = torch.ones_like(ids) if text_mask is None else as_token_tensor(text_mask, image.device)
        emb = self.embed(ids % self.text_buckets)
        m = mask.float()[..., None]
        text = (emb * m).sum(1) / m.sum(1).clamp(min=1.0)
        gamma, beta = self.film(text).chunk(2, dim=1)
        h = self.enc(image)
        h = h * (1.0 + gamma[..., None, None]) + beta[..., None, None]
        return self.dec(self.drop(h))
