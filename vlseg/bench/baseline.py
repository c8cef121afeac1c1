"""The text-blind baseline of the accuracy benchmark: MONAI ``BasicUNet`` (2D) trained on the same time budget.

Same data, same input size (224 x 224 by default) and the same budget rule as the bundles
(:class:`vlseg.engine_handlers.StopAfterSeconds`: stop when the next epoch would not fit, or at once when the budget
is exceeded mid-epoch); DiceCE loss, Adam (lr 1e-3), flips and 90-degree rotations, validation Dice after every
epoch, the best-validation weights kept. It never sees the prompt.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vlseg.bench.bundles import BundleModel
from vlseg.engine_handlers import budget_clock

__all__ = ["train_basicunet", "basicunet_model", "BlindTokenizer"]


class _TextBlindNet(torch.nn.Module):
    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net

    def forward(self, image, text_ids=None, text_mask=None):
        return self.net(image)


class BlindTokenizer:
    """Stands in for a tokenizer: the baseline ignores text."""

    def __call__(self, texts):
        n = len(list(texts))
        return torch.zeros(n, 1, dtype=torch.long), torch.ones(n, 1, dtype=torch.long)


def _transforms(size: Sequence[int], train: bool, with_label: bool = True):
    from monai.transforms import (
        Compose,
        EnsureChannelFirstd,
        LoadImaged,
        NormalizeIntensityd,
        RandFlipd,
        RandRotate90d,
        Resized,
        ScaleIntensityRanged,
    )

    from vlseg.data.transforms import BinarizeLabeld, EnsureRGBd

    keys = ["image", "label"] if with_label else ["image"]
    t = [LoadImaged(keys, reader="PILReader", image_only=True), EnsureChannelFirstd(keys), EnsureRGBd("image")]
    if with_label:
        t.append(BinarizeLabeld("label"))
    t += [Resized(keys, spatial_size=tuple(size), mode=["bilinear", "nearest"][: len(keys)]),
          ScaleIntensityRanged("image", 0.0, 255.0, 0.0, 1.0, clip=True), NormalizeIntensityd("image", channel_wise=True)]
    if train:
        t += [RandFlipd(keys, prob=0.5, spatial_axis=0), RandFlipd(keys, prob=0.5, spatial_axis=1),
              RandRotate90d(keys, prob=0.5)]
    return Compose(t)


def _build_net():
    from monai.networks.nets import BasicUNet

    return BasicUNet(spatial_dims=2, in_channels=3, out_channels=1)


def basicunet_model(checkpoint: Path | None = None, size: Sequence[int] = (224, 224)) -> BundleModel:
    """The baseline wrapped like a bundle (preprocessing without text, single deterministic pass)."""
    from vlseg.inferers import StochasticTextInferer

    net = _TextBlindNet(_build_net())
    bm = BundleModel("monai_basicunet", Path("."), "default", net, None, _transforms(size, False, with_label=False),
                     StochasticTextInferer(num_samples=1, seed=0), BlindTokenizer(), tuple(size), 1)
    if checkpoint is not None:
        bm.load_checkpoint(Path(checkpoint))
    net.eval()
    return bm


def _dice(pred: torch.Tensor, label: torch.Tensor) -> list[float]:
    p, g = pred.flatten(1).float(), label.flatten(1).float()
    inter = (p * g).sum(1)
    tot = p.sum(1) + g.sum(1)
    return torch.where(tot > 0, 2 * inter / tot.clamp(min=1e-8), torch.ones_like(tot)).tolist()


def train_basicunet(train_items: list[dict], val_items: list[dict], max_seconds: float, work_dir: Path,
                    size: Sequence[int] = (224, 224), batch_size: int = 8, lr: float = 1e-3, max_epochs: int = 1000,
                    seed: int = 0, epoch_length: int | None = None, clock: str = "wall") -> dict[str, Any]:
    """Train within ``max_seconds`` of the training loop (validation included); save the best weights.

    ``clock``: ``"wall"`` seconds or ``"process"`` CPU seconds of this process, as the bundles' ``max_train_clock``
    (:func:`vlseg.engine_handlers.budget_clock`).

    An "epoch" is ``epoch_length`` iterations (default: one pass over the data), followed by validation, as in the
    bundles' runs with the same setting.
    """
    from monai.data import CacheDataset, DataLoader
    from monai.losses import DiceCELoss
    from monai.utils import set_determinism

    set_determinism(seed=seed)
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    t_setup = time.perf_counter()
    train_ds = CacheDataset(train_items, _transforms(size, True), progress=False, num_workers=0)
    val_ds = CacheDataset(val_items, _transforms(size, False), progress=False, num_workers=0)
    train_dl = DataLoader(train_ds, batch_size=batch_size, shuffle=True, num_workers=0, drop_last=len(train_ds) > batch_size)
    val_dl = DataLoader(val_ds, batch_size=batch_size, shuffle=False, num_workers=0)
    per_epoch = int(epoch_length) if epoch_length else len(train_dl)
    net = _build_net()
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    loss_fn = DiceCELoss(sigmoid=True)
    setup_s = time.perf_counter() - t_setup

    def batches():
        while True:
            yield from train_dl

    def validate() -> float:
        net.eval()
        dices = []
        with torch.no_grad():
            for batch in val_dl:
                dices += _dice(torch.sigmoid(net(batch["image"])) > 0.5, batch["label"] > 0.5)
        return float(np.mean(dices)) if dices else float("nan")

    now = budget_clock(clock)
    t0, t0_wall = now(), time.perf_counter()
    best, best_state, history, steps = -1.0, None, [], 0
    stream = batches()
    for epoch in range(1, max_epochs + 1):
        te = now()
        net.train()
        losses, stopped = [], False
        for _ in range(per_epoch):
            batch = next(stream)
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(net(batch["image"]), batch["label"])
            loss.backward()
            opt.step()
            steps += 1
            losses.append(float(loss))
            if now() - t0 > max_seconds:  # hard stop, as StopAfterSeconds after an iteration
                stopped = True
                break
        if stopped and best_state is not None:
            break
        val = validate()
        history.append({"epoch": epoch, "train_loss": float(np.mean(losses)) if losses else None, "val_dice": val,
                        "elapsed_s": now() - t0})
        if val > best or best_state is None:
            best, best_state = val, copy.deepcopy(net.state_dict())
        if stopped or now() - t0 + (now() - te) > max_seconds:
            break
    ckpt = work_dir / "model.pt"
    torch.save({"model": {f"net.{k}": v for k, v in best_state.items()}}, ckpt)
    return {"checkpoint": ckpt, "epochs": len(history), "steps": steps, "best_val_dice": best, "history": history,
            "train_s": now() - t0, "train_wall_s": time.perf_counter() - t0_wall, "clock": clock, "setup_s": setup_s, "n_train": len(train_items),
            "epoch_length": per_epoch}
