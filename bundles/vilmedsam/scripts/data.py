"""Data helpers of the bundle: datalist items, random prompt variants, single-image inference items."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from monai.config import KeysCollection
from monai.data import load_decathlon_datalist
from monai.transforms import MapTransform, Randomizable

from vlseg.text.prompts import PromptError, validate_prompt

__all__ = ["load_items", "inference_items", "RandomPromptd", "text_blind_ceiling"]


def load_items(datalist, split: str = "training", data_fraction: float | None = None, seed: int = 0,
               max_items: int | None = None) -> list[dict]:
    """Items of ``split`` (paths resolved against the datalist's folder); ``data_fraction`` keeps a seeded random
    subset, ``max_items`` the first N (after the subset)."""
    path = Path(datalist)
    items = load_decathlon_datalist(str(path), is_segmentation=True, data_list_key=split, base_dir=str(path.parent))
    if data_fraction is not None and 0 < float(data_fraction) < 1:
        rng = np.random.default_rng(seed)
        n = max(1, int(round(len(items) * float(data_fraction))))
        keep = sorted(rng.choice(len(items), size=n, replace=False).tolist())
        items = [items[i] for i in keep]
    if max_items:
        items = items[: int(max_items)]
    for i, it in enumerate(items):
        stem = Path(str(it.get("label") or it["image"])).name.split(".")[0]
        it.setdefault("name", stem if it.get("label") else f"{stem}_{i}")
    return items


def inference_items(datalist=None, image: str | None = None, split: str = "test", max_items: int | None = None,
                    text: str | None = None) -> list[dict]:
    """One item for ``image`` (a single file; ``text`` must then be given), else the items of ``split``."""
    if image:
        if not text:
            raise PromptError("a single --image needs a --text prompt, e.g. --text polyp")
        validate_prompt(text)
        return [{"image": str(image), "text": text, "name": Path(str(image)).name.split(".")[0]}]
    items = load_items(datalist, split, max_items=max_items)
    for it in items:
        it.pop("label", None)
    return items


def text_blind_ceiling(datalist) -> dict | None:
    """The ``text_blind_ceiling`` record stored in a demo datalist (None for other datalists)."""
    try:
        return json.loads(Path(datalist).read_text()).get("text_blind_ceiling")
    except Exception:  # noqa: BLE001 - optional information
        return None


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
