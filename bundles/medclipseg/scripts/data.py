"""Data selection and MedCLIPSeg-specific preprocessing.

* :func:`load_items`: a split of a datalist, optionally the 10/25/50 % data-efficiency subset (the datalist's fixed
  ``subsets`` lists when present, as MedCLIPSeg's ``Train_text_<pct>.xlsx``; otherwise a seeded random fraction).
* :func:`inference_items`: a single image (``--image``) or a datalist split for inference.
* :class:`ClipNormalized`: intensity normalisation for the CLIP image tower, with the upstream BGR + ImageNet-statistics
  behaviour behind ``bgr_imagenet_compat``.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

import numpy as np
import torch
from monai.transforms import MapTransform

from vlseg.bundle_support import datalist_split, name_items, single_image_item

__all__ = ["load_items", "inference_items", "ClipNormalized", "OPENAI_CLIP_MEAN", "OPENAI_CLIP_STD", "IMAGENET_MEAN",
           "IMAGENET_STD"]

logger = logging.getLogger("vlseg.medclipseg")

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _percent_key(fraction) -> str | None:
    """10, "10", 0.1 -> "10"; None / 100 / 1.0 -> None (the full split)."""
    if fraction in (None, "", "full", "all"):
        return None
    f = float(fraction)
    if f <= 0:
        raise ValueError(f"data_fraction must be > 0, got {fraction}")
    pct = f * 100.0 if f <= 1.0 else f
    if pct >= 100.0 - 1e-9:
        return None
    return str(int(round(pct))) if abs(pct - round(pct)) < 1e-9 else repr(pct)


def _resolve(items: list[dict], base: Path) -> list[dict]:
    out = []
    for it in items:
        it = dict(it)
        for key in ("image", "label"):
            v = it.get(key)
            if isinstance(v, str) and v and not os.path.isabs(v):
                it[key] = os.path.normpath(str(base / v))
        out.append(it)
    return out


def load_items(datalist, split: str = "training", data_fraction=None, seed: int = 0, max_items: int | None = None,
               base_dir: str | None = None) -> list[dict]:
    """Items of ``split`` with paths resolved against the datalist's folder (or ``base_dir``).

    ``data_fraction`` (10, 25, 50, 100 or 0.1 ... 1.0): the datalist's ``subsets[<pct>][split]`` list when present,
    otherwise a seeded random ``ceil(fraction * n)`` items (logged). ``max_items`` truncates (tests, quick runs).
    """
    path = Path(str(datalist)).expanduser()
    base = Path(base_dir) if base_dir else path.parent
    pct = _percent_key(data_fraction)
    if pct is None:
        items = datalist_split(path, split, base)
    else:
        raw = json.loads(path.read_text())
        subset = (raw.get("subsets") or {}).get(pct, {}).get(split)
        if subset is not None:
            items = _resolve(subset, base)
            logger.info("data_fraction %s%%: using the datalist's fixed '%s' subset (%d items)", pct, split, len(items))
        else:
            full = datalist_split(path, split, base)
            n = max(1, math.ceil(float(pct) / 100.0 * len(full)))
            idx = np.sort(np.random.default_rng(seed).permutation(len(full))[:n])
            items = [full[i] for i in idx]
            logger.info("data_fraction %s%%: no fixed subset in %s, seeded random %d of %d '%s' items", pct, path.name,
                        n, len(full), split)
    if max_items:
        items = items[: int(max_items)]
    return items


def inference_items(image=None, text=None, datalist=None, split: str = "test", max_items: int | None = None) -> list[dict]:
    """``[{"image": image, "text": text, "name": ...}]`` when an image is given, else the datalist split (the demo set
    by default), every item with a unique ``name`` (one output folder per sample: several prompts may share an image)."""
    if image:
        return [single_image_item(image, text)]
    if datalist is None:  # the demo set, generated on first use
        import vlseg.data.demo

        datalist = vlseg.data.demo.ensure_demo_dataset()
    return name_items(load_items(datalist, split, max_items=max_items))


class ClipNormalized(MapTransform):
    """Image in [0, 255] (RGB, channel first) -> CLIP input.

    ``bgr_imagenet_compat=False`` (default): RGB, /255, OpenAI-CLIP mean/std, the statistics the CLIP towers (OpenAI,
    UniMedCLIP, BiomedCLIP) were pretrained with. ``True``: the public MedCLIPSeg code's input, channels reversed to
    BGR (cv2.imread without conversion) and ImageNet mean/std; needed for the authors' released checkpoints.
    """

    def __init__(self, keys="image", bgr_imagenet_compat: bool = False, mean=None, std=None, allow_missing_keys=False):
        super().__init__(keys, allow_missing_keys)
        self.bgr = bool(bgr_imagenet_compat)
        mean = mean if mean is not None else (IMAGENET_MEAN if self.bgr else OPENAI_CLIP_MEAN)
        std = std if std is not None else (IMAGENET_STD if self.bgr else OPENAI_CLIP_STD)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            if img.shape[0] != 3:
                raise ValueError(f"'{key}' must have 3 channels (use EnsureRGBd first), got {img.shape[0]}")
            x = img.float() / 255.0
            if self.bgr:
                x = x.flip(0)  # RGB -> BGR; the upstream statistics are applied in that (mismatched) order too
            d[key] = (x - self.mean) / self.std
        return d
