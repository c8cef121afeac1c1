"""MedCLIPSeg training loss: 0.5 * Dice + 0.5 * BCE + 0.1 * soft patch-level contrastive loss.

Equation labels (this bundle's, see ``docs/README.md``):

* E6 :func:`per_image_dice_loss`          soft Dice per image on [B,1,H,W], averaged over the batch
* E7 :func:`bce_loss`                     binary cross-entropy with logits, mean over pixels
* E8 :func:`soft_targets`                 Y = softmax(row_normalise(T T^T / tau)), no gradient
* E9 :func:`soft_patch_contrastive_loss`  L = (CE(p_bar T^T / tau, Y) + CE(T p_bar^T / tau, Y^T)) / 2
* E10 :class:`MedCLIPSegLoss`             total = w_dice * E6 + w_bce * E7 + w_clip * E9

Deviation (documented): the public code applies MONAI's DiceLoss to the squeezed [B,H,W] logits, so MONAI reads the
224 image ROWS as channels and drops row 0 as "background" (a mean of per-row Dice scores). Here Dice is computed per
image on [B,1,H,W] (all pixels of an image together), which is what the paper describes.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss
from torch import nn

__all__ = ["per_image_dice_loss", "bce_loss", "soft_targets", "soft_patch_contrastive_loss", "MedCLIPSegLoss"]

_DICE = DiceLoss(include_background=True, sigmoid=True, reduction="mean", smooth_nr=1e-5, smooth_dr=1e-5)


def _b1hw(x: torch.Tensor) -> torch.Tensor:
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4 or x.shape[1] != 1:
        raise ValueError(f"expected [B,1,H,W] (or [B,H,W]), got {tuple(x.shape)}")
    return x


def per_image_dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """E6: ``1 - (2 sum(p g) + 1e-5) / (sum p + sum g + 1e-5)`` per image (p = sigmoid(logits)), mean over the batch.

    MONAI's DiceLoss on [B,1,H,W] with ``include_background=True`` (the single channel is the foreground).
    """
    return _DICE(_b1hw(logits), _b1hw(target).to(logits.dtype))


def bce_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """E7: mean binary cross-entropy with logits."""
    return F.binary_cross_entropy_with_logits(_b1hw(logits), _b1hw(target).to(logits.dtype))


@torch.no_grad()
def soft_targets(text_embed: torch.Tensor, temperature: float = 0.2) -> torch.Tensor:
    """E8: ``S = T T^T / tau``; each row divided by its L2 norm; ``Y = softmax(S, dim=-1)`` (no gradient).

    ``T`` is the projected text embedding, NOT L2-normalised (as in the public code).
    """
    sim = text_embed @ text_embed.t() / temperature
    sim = sim / sim.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return sim.softmax(dim=-1)


def _soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return -(targets * logits.log_softmax(dim=-1)).sum(dim=-1).mean()


def soft_patch_contrastive_loss(patch_mean: torch.Tensor, text_embed: torch.Tensor, temperature: float = 0.2) -> torch.Tensor:
    """E9: symmetric soft cross-entropy between image and text.

    ``patch_mean`` [B,D]: mean of the L2-normalised patch embeddings (not re-normalised); ``text_embed`` [B,D]: the
    projected text feature. ``logits_i2t = p_bar T^T / tau``, ``logits_t2i = T p_bar^T / tau``; the i2t direction uses
    the soft targets Y (E8), the t2i direction Y^T; the loss is the mean of the two.
    """
    y = soft_targets(text_embed, temperature)
    logits_i2t = patch_mean @ text_embed.t() / temperature
    logits_t2i = text_embed @ patch_mean.t() / temperature
    return 0.5 * (_soft_cross_entropy(logits_i2t, y) + _soft_cross_entropy(logits_t2i, y.t()))


class MedCLIPSegLoss(nn.Module):
    """E10: ``dice_weight * Dice + bce_weight * BCE + contrastive_weight * soft contrastive``.

    Takes the network's training output (a dict with ``logits``, ``patch_mean``, ``text_embed``) or plain logits
    (then the contrastive term is skipped: validation / evaluation). The last terms are kept in ``self.last_terms``.
    """

    def __init__(self, dice_weight: float = 0.5, bce_weight: float = 0.5, contrastive_weight: float = 0.1,
                 temperature: float = 0.2):
        super().__init__()
        self.dice_weight, self.bce_weight = float(dice_weight), float(bce_weight)
        self.contrastive_weight, self.temperature = float(contrastive_weight), float(temperature)
        self.last_terms: dict[str, float] = {}

    def forward(self, output, target: torch.Tensor) -> torch.Tensor:
        logits = output["logits"] if isinstance(output, Mapping) else output
        dice = per_image_dice_loss(logits, target)
        bce = bce_loss(logits, target)
        total = self.dice_weight * dice + self.bce_weight * bce
        terms = {"dice": float(dice.detach()), "bce": float(bce.detach())}
        if isinstance(output, Mapping) and self.contrastive_weight and "patch_mean" in output:
            con = soft_patch_contrastive_loss(output["patch_mean"], output["text_embed"], self.temperature)
            total = total + self.contrastive_weight * con
            terms["contrastive"] = float(con.detach())
        self.last_terms = terms
        return total
