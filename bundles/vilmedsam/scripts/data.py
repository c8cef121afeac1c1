"""Data helpers of the bundle: datalist items, random prompt variants, single-image inference items (the shared
pieces are in :mod:`vlseg.bundle_support`)."""

from __future__ import annotations

import numpy as np
from monai.config import KeysCollection
from monai.transforms import MapTransform, Randomizable

from vlseg.bundle_support import datalist_split, name_items, single_image_item
from vlseg.text.prompts import validate_prompt

__all__ = ["load_items", "inference_items", "RandomPromptd"]


def load_items(datalist, split: str = "training", data_fraction: float | None = None, seed: int = 0,
               max_items: int | None = None) -> list[dict]:
    """Items of ``split`` (paths resolved against the datalist's folder); ``data_fraction`` keeps a seeded random
    subset, ``max_items`` the first N (after the subset). Every item gets a unique ``name``."""
    items = datalist_split(datalist, split)
    if data_fraction is not None and 0 < float(data_fraction) < 1:
        rng = np.random.default_rng(seed)
        n = max(1, int(round(len(items) * float(data_fraction))))
        keep = sorted(rng.choice(len(items), size=n, replace=False).tolist())
        items = [items[i] for i in keep]
    if max_items:
        items = items[: int(max_items)]
    return name_items(items)


def inference_items(datalist=None, image: str | None = None, split: str = "test", max_items: int | None = None,
                    text: str | None = None) -> list[dict]:
    """One item for ``image`` (a single file; ``text`` must then be given), else the items of ``split``."""
    if image:
        return [single_image_item(image, text, require_text=True)]
    items = load_items(datalist, split, max_items=max_items)
    for it in items:
        it.pop("label", None)
    return items


class RandomPromptd(Randomizable, MapTransform):
    """Training-time prompt augmentation: pick one of ``prompt_keys`` from ``data["prompts"]`` at random (keys the
    item lacks are skipped; with none available the item's own ``text`` is kept). The result is validated."""

    def __init__(self, keys: KeysCollection = "text", prompt_keys=None, max_chars: int | None = None):
        MapTransform.__init__(self, keys)
        self.prompt_keys = list(prompt_keys or [])
        self.max_chars = max_chars
        self._choice = 0.0

    def randomize(self, data=None) -> None:
        self._choice = self.R.random_sample()

    def __call__(self, data):
        d = dict(data)
        self.randomize()
        prompts = d.get("prompts") or {}
        avail = [k for k in self.prompt_keys if k in prompts]
        for key in self.keys:
            text = prompts[avail[int(self._choice * len(avail)) % len(avail)]] if avail else d.get(key)
            d[key] = validate_prompt(text, max_chars=self.max_chars)
        return d
