"""Data lists for the UA-VLS configs (``train.json``, ``evaluate.json``, ``inference.json``).

Output naming and the inference output writers are shared: ``vlseg.bundle_support`` (``OutputNamed``,
``SaveOverlayd``).
"""

from __future__ import annotations

import logging
import random
from pathlib import Path

from vlseg.bundle_support import datalist_split, name_items, single_image_item

__all__ = ["load_split", "inference_items"]

logger = logging.getLogger("vlseg")


def load_split(datalist: str, split: str = "training", fraction: float = 1.0, seed: int = 0,
               max_items: int | None = None, image_ids: list | None = None) -> list[dict]:
    """Items of one split of a decathlon-style datalist, paths made absolute (relative to the datalist folder).

    ``fraction`` < 1 keeps a random subset of the IMAGES (all samples of a kept image stay together), drawn with
    ``seed``; ``image_ids`` keeps only those images; ``max_items`` truncates (tests). Every item gets ``name``
    (``vlseg.bundle_support.name_items``).
    """
    items = datalist_split(datalist, split)
    if image_ids is not None:
        keep = {str(i) for i in image_ids}
        items = [it for it in items if str(it.get("image_id", Path(str(it["image"])).stem)) in keep]
    if fraction is not None and float(fraction) < 1.0:
        groups = sorted({str(it.get("image_id", it["image"])) for it in items})
        n = max(1, int(round(float(fraction) * len(groups))))
        keep = set(random.Random(seed).sample(groups, n))
        items = [it for it in items if str(it.get("image_id", it["image"])) in keep]
    if max_items is not None:
        items = items[: int(max_items)]
    if not items:
        raise ValueError(f"no items in split {split!r} of {datalist}")
    return name_items(items)


def inference_items(image: str | None = None, text: str | None = None, datalist: str | None = None,
                    split: str = "test", max_items: int | None = None) -> list[dict]:
    """One item for ``--image PATH`` (with ``--text``), otherwise the items of a datalist split.

    A ``--text`` given together with a datalist is applied to every item by ``SelectPromptd(override=...)``.
    """
    if image:
        return [single_image_item(image, text)]
    if not datalist:
        raise ValueError("give --image PATH (and --text) or a --datalist")
    return load_split(datalist, split, max_items=max_items)
