"""Spectral-Entropic Uncertainty (SEU) loss, UA-VLS paper section 3.5, equations 26-29.

    L_SEU = L_Dice(Y, G) + lambda_F * R_Spectral(Y, G) + lambda_E * R_Entropy(Y)        (eq. 26)

with lambda_F = 0.3 and lambda_E = 0.1. The network outputs one foreground logit per pixel; ``Y`` is its sigmoid.
One function per equation; :class:`SEULoss` combines them.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["dice_loss", "spectral_regularizer", "entropy_regularizer", "class_probabilities", "SEULoss"]


def dice_loss(prob: torch.Tensor, target: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Eq. 27: ``1 - (2 sum(Y G) + eps) / (sum Y + sum G + eps)`` on probabilities.

    Sums run over channels and pixels of each image; the result is the mean over the batch (as the public code,
    which averages per-image, per-channel Dice).
    """
    dims = tuple(range(1, prob.ndim))
    inter = (prob * target).sum(dims)
    denom = prob.sum(dims) + target.sum(dims)
    return (1.0 - (2.0 * inter + eps) / (denom + eps)).mean()


def spectral_regularizer(prob: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Eq. 28: squared difference of the 2D Fourier magnitudes, ``mean (|F(Y)| - |F(G)|)^2``.

    ``F`` is the orthonormal 2D FFT over the last two axes (``norm="ortho"``, as the public code), so by Parseval
    the term is bounded by the pixel-wise mean squared error and does not grow with the image size. The paper's
    squared L2 norm is taken as a mean over all elements (batch, channel, frequencies).
    """
    mag_p = torch.fft.fft2(prob.float(), norm="ortho").abs()
    mag_g = torch.fft.fft2(target.float(), norm="ortho").abs()
    return ((mag_p - mag_g) ** 2).mean()


def entropy_regularizer(class_prob: torch.Tensor, delta: float = 1e-8) -> torch.Tensor:
    """Eq. 29: ``-(1 / (B H W)) sum_{b,c,h,w} Y log(Y + delta)`` for class probabilities ``[B, C, H, W]``."""
    b, h, w = class_prob.shape[0], class_prob.shape[-2], class_prob.shape[-1]
    return -(class_prob * torch.log(class_prob + delta)).sum() / (b * h * w)


def class_probabilities(prob: torch.Tensor) -> torch.Tensor:
    """The paper's one-hot view of a binary output: ``[B, 1, H, W]`` foreground -> ``[B, 2, H, W]`` (bg, fg)."""
    return torch.cat([1.0 - prob, prob], dim=1)


class SEULoss(nn.Module):
    """Eq. 26 on foreground logits ``[B, 1, H, W]`` and binary targets of the same shape.

    Args:
        lambda_f: weight of the spectral term (0.3). lambda_e: weight of the entropy term (0.1).
        sigmoid: apply a sigmoid to the input (the network returns logits).
        two_class_entropy: evaluate eq. 29 on the two class probabilities (background, foreground) -- the paper's
            one-hot formulation, i.e. the binary entropy -- rather than on the single foreground channel as the
            public code does (``-p log p``, which is not symmetric in p and 1 - p).
        eps / delta: the stability constants of eq. 27 / eq. 29.

    After each call ``last_terms`` holds the detached values of the three terms (for logging).
    """

    def __init__(self, lambda_f: float = 0.3, lambda_e: float = 0.1, sigmoid: bool = True,
                 two_class_entropy: bool = True, eps: float = 1e-6, delta: float = 1e-8):
        super().__init__()
        self.lambda_f, self.lambda_e = float(lambda_f), float(lambda_e)
        self.sigmoid, self.two_class_entropy = bool(sigmoid), bool(two_class_entropy)
        self.eps, self.delta = float(eps), float(delta)
        self.last_terms: dict[str, float] = {}

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if isinstance(input, dict):
            input = input["logits"]
        prob = torch.sigmoid(input.float()) if self.sigmoid else input.float()
        target = target.float()
        if prob.shape != target.shape:
            raise ValueError(f"prediction {tuple(prob.shape)} and target {tuple(target.shape)} differ in shape")
        dice = dice_loss(prob, target, self.eps)
        spectral = spectral_regularizer(prob, target)
        entropy = entropy_regularizer(class_probabilities(prob) if self.two_class_entropy else prob, self.delta)
        self.last_terms = {"dice_loss": float(dice.detach()), "spectral": float(spectral.detach()),
                           "entropy": float(entropy.detach())}
        return dice + self.lambda_f * spectral + self.lambda_e * entropy
