"""Training loss of Simple-ViLMedSAM.

Paper Eq. (10)-(12): ``L = L_ce + lambda L_dice`` with ``lambda = 1``,
``L_ce = -1/N sum_i (y_i log x_i + (1 - y_i) log(1 - x_i))`` (binary cross-entropy on the sigmoid of the logits)
and ``L_dice = 1 - 2 sum x_i y_i / (sum x_i^2 + sum y_i^2)`` (squared-denominator soft Dice, per image, averaged
over the batch), as MONAI's ``DiceLoss(sigmoid=True, squared_pred=True)`` + ``BCEWithLogitsLoss`` in the public code.

This project adds ``align_weight * align_loss`` when the network returns one (only while CLIP trains from
scratch in the small / tiny variants; see :mod:`scripts.alignment`).
"""

from __future__ import annotations

import torch
from monai.losses import DiceLoss
from torch import nn

from vlseg.inferers import logits_of

__all__ = ["ViLMedSAMLoss", "bce_loss"]


def bce_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Paper Eq. (11): mean binary cross-entropy of ``sigmoid(logits)`` against ``target``."""
    return nn.functional.binary_cross_entropy_with_logits(logits, target)


class ViLMedSAMLoss(nn.Module):
    """Paper Eq. (10): ``bce_weight * L_ce + dice_weight * L_dice (+ align_weight * align_loss)``; ``self.dice`` is
    Eq. (12) (MONAI ``DiceLoss(sigmoid=True, squared_pred=True)``, smooth 1e-5, per image then averaged)."""

    def __init__(self, dice_weight: float = 1.0, bce_weight: float = 1.0, align_weight: float = 0.0):
        super().__init__()
        self.dice_weight = float(dice_weight)
        self.bce_weight = float(bce_weight)
        self.align_weight = float(align_weight)
        self.dice = DiceLoss(sigmoid=True, squared_pred=True)
        self.last_terms: dict[str, float] = {}

    def forward(self, output, target: torch.Tensor) -> torch.Tensor:
        logits = logits_of(output)
        target = target.float()
        dice = self.dice(logits, target)
        bce = bce_loss(logits, target)
        total = self.dice_weight * dice + self.bce_weight * bce
        terms = {"dice": float(dice.detach()), "bce": float(bce.detach())}
        if isinstance(output, dict) and "align_loss" in output and self.align_weight > 0:
            total = total + self.align_weight * output["align_loss"]
            terms["align"] = float(output["align_loss"].detach())
        self.last_terms = terms
        return total
