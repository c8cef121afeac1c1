"""PNG figures a person would rather look at than read: overlays with uncertainty, learning curves."""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["save_overlay", "save_learning_curve", "pyplot", "save_figure"]


def pyplot():
    """``matplotlib.pyplot`` on the non-interactive Agg backend (files only, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path, dpi: int = 90) -> Path:
    """``tight_layout``, save ``fig`` as ``path`` (folders created) and close it; returns the path."""
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
    return path


def _to_hwc_uint8(image) -> np.ndarray:
    a = np.asarray(image, dtype=np.float32)
    if a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[-1] not in (1, 3):
        a = np.moveaxis(a, 0, -1)
    if a.ndim == 2:
        a = a[..., None]
    if a.shape[-1] == 1:
        a = np.repeat(a, 3, axis=-1)
    lo, hi = float(a.min()), float(a.max())
    if hi > 1.0 or lo < 0.0:
        a = (a - lo) / max(hi - lo, 1e-8)
    return (a * 255).clip(0, 255).astype(np.uint8)


def save_overlay(path, image, mask, uncertainty=None, title: str = "", label=None) -> Path:
    """Image | image + predicted mask outline (and ground-truth outline, dashed cyan) | uncertainty heat map."""
    plt = pyplot()
    img = _to_hwc_uint8(image)
    m = np.asarray(mask, dtype=np.float32).squeeze()
    ncols = 3 if uncertainty is not None else 2
    fig, axes = plt.subplots(1, ncols, figsize=(4 * ncols, 4.3))
    axes[0].imshow(img)
    axes[0].set_title("image")
    axes[1].imshow(img)
    if m.any():
        axes[1].contour(m > 0.5, levels=[0.5], colors="yellow", linewidths=1.5)
    if label is not None:
        g = np.asarray(label, dtype=np.float32).squeeze()
        if g.any():
            axes[1].contour(g > 0.5, levels=[0.5], colors="cyan", linewidths=1.0, linestyles="dashed")
    axes[1].set_title("mask (yellow)" + (" / truth (cyan)" if label is not None else ""))
    if uncertainty is not None:
        u = np.asarray(uncertainty, dtype=np.float32).squeeze()
        im = axes[2].imshow(u, cmap="inferno", vmin=0.0, vmax=1.0)
        axes[2].set_title(f"uncertainty (mean {u.mean():.3f}, max {u.max():.2f})")
        fig.colorbar(im, ax=axes[2], fraction=0.046, pad=0.04)
    for a in axes:
        a.axis("off")
    if title:
        fig.suptitle(title[:120], fontsize=10)
    return save_figure(fig, path)


def save_learning_curve(path, history: dict[str, list[float]], title: str = "learning curve") -> Path:
    """One line per series (e.g. ``{"train_loss": [...], "val_dice": [...]}``) against epoch."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, values in history.items():
        ax.plot(range(1, len(values) + 1), values, marker="o", ms=3, label=name)
    ax.set_xlabel("epoch")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return save_figure(fig, path)
