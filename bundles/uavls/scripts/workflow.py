"""Data lists and inference outputs for the UA-VLS configs (``train.json``, ``evaluate.json``, ``inference.json``)."""

from __future__ import annotations

import logging
import random
from collections.abc import Hashable, Mapping
from pathlib import Path

import numpy as np
from monai.config import KeysCollection
from monai.data import load_decathlon_datalist
from monai.transforms import MapTransform

__all__ = ["load_split", "inference_items", "sample_name_formatter", "SampleNamed", "SaveOverlayd"]

logger = logging.getLogger("vlseg")


def _sample_name(item: Mapping, index: int) -> str:
    """A file stem unique per sample: the label's stem when there is one (demo images hold several samples)."""
    for key in ("label", "image"):
        value = item.get(key)
        if isinstance(value, (str, Path)):
            stem = Path(str(value)).name
            for ext in (".nii.gz", ".png", ".jpg", ".jpeg", ".nii", ".tif", ".tiff", ".bmp"):
                if stem.lower().endswith(ext):
                    stem = stem[: -len(ext)]
                    break
            return stem if key == "label" else f"{stem}_{index:04d}"
    return f"sample_{index:04d}"


def load_split(datalist: str, split: str = "training", fraction: float = 1.0, seed: int = 0,
               max_items: int | None = None, image_ids: list | None = None) -> list[dict]:
    """Items of one split of a decathlon-style datalist, paths made absolute (relative to the datalist folder).

    ``fraction`` < 1 keeps a random subset of the IMAGES (all samples of a kept image stay together), drawn with
    ``seed``; ``image_ids`` keeps only those images; ``max_items`` truncates (tests). Every item gets ``name``.
    """
    items = load_decathlon_datalist(str(datalist), is_segmentation=True, data_list_key=split,
                                    base_dir=str(Path(datalist).parent))
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
    for i, it in enumerate(items):
        it.setdefault("name", _sample_name(it, i))
    if not items:
        raise ValueError(f"no items in split {split!r} of {datalist}")
    return items


def inference_items(image: str | None = None, text: str | None = None, datalist: str | None = None,
                    split: str = "test", max_items: int | None = None) -> list[dict]:
    """One item for ``--image PATH`` (with ``--text``), otherwise the items of a datalist split.

    A ``--text`` given together with a datalist is applied to every item by ``SelectPromptd(override=...)``.
    """
    if image:
        if not Path(image).is_file():
            raise FileNotFoundError(f"image {image!r} not found")
        return [{"image": str(image), "text": text, "name": _sample_name({"image": image}, 0)[: -len("_0000")]}]
    if not datalist:
        raise ValueError("give --image PATH (and --text) or a --datalist")
    return load_split(datalist, split, max_items=max_items)


def sample_name_formatter(metadict: dict, saver) -> dict:
    """``SaveImaged(output_name_formatter=...)``: name outputs by the sample (``SampleNamed``), not the image
    file, since several samples (prompts) share one demo image."""
    from monai.utils import ImageMetaKey

    name = metadict.get("sample_name") if metadict else None
    if not name:
        name = metadict.get(ImageMetaKey.FILENAME_OR_OBJ, getattr(saver, "_data_index", 0)) if metadict else 0
    if isinstance(name, (list, tuple)):
        name = name[0]
    return {"subject": str(name), "idx": None}


class SampleNamed(MapTransform):
    """Copy ``data[name_key]`` into the image's metadata (``sample_name``) so outputs can be named per sample."""

    def __init__(self, keys: KeysCollection = "image", name_key: str = "name", allow_missing_keys: bool = True):
        super().__init__(keys, allow_missing_keys)
        self.name_key = name_key

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        name = d.get(self.name_key)
        for key in self.key_iterator(d):
            if name is not None and hasattr(d[key], "meta"):
                d[key].meta["sample_name"] = str(name)
        return d


def _to_hw(a) -> np.ndarray:
    """Channel-first MONAI array ``[C, W, H]`` (PILReader's default axis order) -> ``[H, W]`` / ``[H, W, C]``."""
    a = np.asarray(a.detach().cpu() if hasattr(a, "detach") else a, dtype=np.float32)
    if a.ndim == 3:
        a = np.moveaxis(a, 0, -1)  # [W, H, C]
        a = np.swapaxes(a, 0, 1)  # [H, W, C]
        return a[..., 0] if a.shape[-1] == 1 else a
    return a.T


class SaveOverlayd(MapTransform):
    """Overlay PNG per sample: image | predicted mask outline | uncertainty map (``vlseg.viz.save_overlay``).

    The original image is re-read from its file when it has one (the network input is resized and z-scored);
    for array inputs the inverted network input is shown instead. Files: ``<output_dir>/<name>_overlay.png``.
    """

    def __init__(self, keys: KeysCollection = "pred", image_key: str = "image", uncertainty_key: str = "uncertainty",
                 text_key: str = "text", output_dir: str = "./eval", postfix: str = "overlay",
                 allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.image_key, self.uncertainty_key, self.text_key = image_key, uncertainty_key, text_key
        self.output_dir = Path(output_dir)
        self.postfix = postfix

    def __call__(self, data):
        from monai.utils import ImageMetaKey
        from PIL import Image

        from vlseg.viz import save_overlay

        d = dict(data)
        for key in self.key_iterator(d):
            pred = d[key]
            meta = getattr(pred, "meta", {}) or {}
            img_meta = getattr(d.get(self.image_key), "meta", {}) or {}
            name = meta.get("sample_name") or img_meta.get("sample_name") or "sample"
            fname = img_meta.get(ImageMetaKey.FILENAME_OR_OBJ) or meta.get(ImageMetaKey.FILENAME_OR_OBJ)
            mask = _to_hw(pred)
            image = None
            if isinstance(fname, str) and Path(fname).is_file():
                try:
                    image = np.asarray(Image.open(fname).convert("RGB"))
                except Exception:  # not a PIL-readable file: fall back to the network input
                    image = None
            if image is None or image.shape[:2] != mask.shape:
                image = _to_hw(d[self.image_key])
            unc = _to_hw(d[self.uncertainty_key]) if self.uncertainty_key in d else None
            out = self.output_dir / f"{name}_{self.postfix}.png"
            save_overlay(out, image, mask, unc, title=str(d.get(self.text_key, "")))
            d[f"{key}_overlay_path"] = str(out)
        return d
