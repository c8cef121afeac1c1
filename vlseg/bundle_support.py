"""Data lists and inference outputs shared by the bundles' configs.

* :func:`file_stem`, :func:`output_name`: one naming rule for every output file (``<name>_<postfix>.<ext>``);
* :func:`datalist_split`, :func:`name_items`, :func:`single_image_item`, :func:`stored_text_blind_ceiling`: datalist items;
* :class:`OutputNamed`: outputs named after the item's ``name`` (several prompts of one image get separate files);
* :class:`SaveArrayd`: float ``.npy`` maps (not quantised) in image orientation;
* :class:`SaveOverlayd`: overlay PNG (image | mask outline | uncertainty) via :func:`vlseg.viz.save_overlay`.

The engine handlers (training / evaluation reports) are in :mod:`vlseg.engine_handlers`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform

__all__ = ["IMAGE_EXTENSIONS", "file_stem", "output_name", "to_hw", "datalist_split", "name_items",
           "single_image_item", "stored_text_blind_ceiling", "OutputNamed", "SaveArrayd", "SaveOverlayd"]

logger = logging.getLogger("vlseg")

IMAGE_EXTENSIONS = (".nii.gz", ".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp", ".nii", ".npy", ".dcm")


def file_stem(path) -> str:
    """File name without folder and without a known image extension (``a/b.nii.gz`` -> ``b``)."""
    name = Path(str(path)).name
    for ext in IMAGE_EXTENSIONS:
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return name


def output_name(data: Mapping, key=None, name_key: str = "name", default: str = "item") -> str:
    """The name of an item's output files: ``data[name_key]`` (set by the data-list helpers), else the sample or file
    name in the metadata of ``data[key]`` / ``data["image"]``, else ``default``."""
    name = data.get(name_key)
    if name:
        return str(name)
    for k in (key, "image"):
        meta = (getattr(data.get(k), "meta", None) or {}) if k is not None else {}
        name = meta.get("sample_name") or meta.get("filename_or_obj")
        if isinstance(name, (list, tuple)):
            name = name[0] if name else None
        if name:
            return file_stem(name)
    return default


def to_hw(x, reverse_indexing: bool = True) -> np.ndarray:
    """Channel-first MONAI array -> ``[H, W]`` (one channel) or ``[H, W, C]``, float32.

    ``reverse_indexing``: MONAI's PILReader gives ``[C, W, H]`` (its default), so rows and columns are swapped back.
    """
    a = np.asarray(x.detach().cpu().float() if isinstance(x, torch.Tensor) else x, dtype=np.float32)
    if a.ndim == 3 and a.shape[0] in (1, 3, 4):
        a = np.moveaxis(a, 0, -1)
    if reverse_indexing and a.ndim >= 2:
        a = np.swapaxes(a, 0, 1)
    return a[..., 0] if a.ndim == 3 and a.shape[-1] == 1 else a


# --------------------------------------------------------------------------------------------- data lists


def datalist_split(datalist, split: str, base_dir=None) -> list[dict]:
    """Items of one split of a decathlon-style datalist, ``image`` / ``label`` paths made absolute (relative to the
    datalist's folder, or ``base_dir``)."""
    from monai.data import load_decathlon_datalist

    path = Path(str(datalist)).expanduser()
    base = Path(str(base_dir)) if base_dir else path.parent
    return load_decathlon_datalist(str(path), is_segmentation=True, data_list_key=split, base_dir=str(base))


def name_items(items: list[dict]) -> list[dict]:
    """Give every item a unique ``name`` (unless it has one): the label's stem when there is a label (the demo set's
    images hold several samples, one per label), otherwise the image's stem, suffixed ``_1``, ``_2`` ... on repeats."""
    seen: dict[str, int] = {}
    for it in items:
        if it.get("name"):
            continue
        stem = file_stem(it["label"]) if isinstance(it.get("label"), (str, Path)) and it.get("label") else file_stem(it["image"])
        seen[stem] = seen.get(stem, 0) + 1
        it["name"] = stem if seen[stem] == 1 else f"{stem}_{seen[stem] - 1}"
    return items


def single_image_item(image, text=None, require_text: bool = False) -> dict:
    """The one inference item of ``--image PATH`` (``--text``): ``{"image", "text", "name"}``.

    Raises FileNotFoundError for a missing file and, with ``require_text``, a ``PromptError`` without a valid text."""
    if require_text:
        from vlseg.text.prompts import PromptError, validate_prompt

        if not text:
            raise PromptError("a single --image needs a --text prompt, e.g. --text polyp")
        validate_prompt(text)
    if not Path(str(image)).is_file():
        raise FileNotFoundError(f"image {image} not found")
    return {"image": str(image), "text": text, "name": file_stem(image)}


def stored_text_blind_ceiling(datalist) -> dict | None:
    """The ``text_blind_ceiling`` record stored in a demo datalist (None for other datalists)."""
    try:
        return json.loads(Path(str(datalist)).read_text()).get("text_blind_ceiling")
    except Exception:  # noqa: BLE001 - optional information
        return None


# --------------------------------------------------------------------------------------------- outputs


def _output_path(output_dir: Path, name: str, postfix: str, ext: str, separate_folder: bool) -> Path:
    folder = output_dir / name if separate_folder else output_dir
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{name}_{postfix}{ext}"


class OutputNamed(MapTransform):
    """Name the outputs of an item after ``data[name_key]``: ``meta['filename_or_obj']`` (what ``SaveImaged`` names
    its files by) becomes ``<name>.png`` and the source image path is kept as ``meta['source_image']``. Several
    samples of one image (different prompts) thus get separate files. Items without a name are left as they are."""

    def __init__(self, keys: KeysCollection, name_key: str = "name", allow_missing_keys: bool = True):
        super().__init__(keys, allow_missing_keys)
        self.name_key = name_key

    def __call__(self, data):
        d = dict(data)
        name = d.get(self.name_key)
        if not name:
            return d
        for key in self.key_iterator(d):
            meta = getattr(d[key], "meta", None)
            if meta is not None:
                meta.setdefault("source_image", meta.get("filename_or_obj"))
                meta["filename_or_obj"] = f"{name}.png"
        return d


class SaveArrayd(MapTransform):
    """Save ``data[key]`` as float32 ``<output_dir>[/<name>]/<name>_<postfix>.npy`` in image orientation (rows = image
    rows), unquantised. ``postfix`` defaults to the key; ``separate_folder`` puts each item in its own folder."""

    def __init__(self, keys: KeysCollection, output_dir, postfix: str | None = None, separate_folder: bool = False,
                 reverse_indexing: bool = True, name_key: str = "name", allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.output_dir = Path(output_dir)
        self.postfix, self.separate_folder = postfix, bool(separate_folder)
        self.reverse_indexing, self.name_key = reverse_indexing, name_key

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            name = output_name(d, key, self.name_key)
            path = _output_path(self.output_dir, name, self.postfix or str(key), ".npy", self.separate_folder)
            np.save(path, to_hw(d[key], self.reverse_indexing))
        return d


class SaveOverlayd(MapTransform):
    """Overlay PNG per item, ``<output_dir>[/<name>]/<name>_overlay.png``: image | outline of ``data[key] >=
    threshold`` | uncertainty map (:func:`vlseg.viz.save_overlay`), titled with the prompt.

    The image is re-read from its file (``source_image`` / ``filename_or_obj`` metadata) when that is a PIL-readable
    file of the mask's size (the network input is resized and normalised); otherwise ``data[image_key]`` is shown
    (e.g. inverted to the original size), or the prediction itself. ``label_key`` adds the ground-truth outline.
    The path is stored in ``data["<key>_overlay_path"]``.
    """

    def __init__(self, keys: KeysCollection = "pred", output_dir=".", image_key: str = "image",
                 uncertainty_key: str = "uncertainty", text_key: str = "text", label_key: str | None = None,
                 threshold: float = 0.5, postfix: str = "overlay", separate_folder: bool = False,
                 reverse_indexing: bool = True, name_key: str = "name", allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.output_dir = Path(output_dir)
        self.image_key, self.uncertainty_key, self.text_key, self.label_key = image_key, uncertainty_key, text_key, label_key
        self.threshold, self.postfix, self.separate_folder = float(threshold), postfix, bool(separate_folder)
        self.reverse_indexing, self.name_key = reverse_indexing, name_key

    def _source_image(self, d, key, shape):
        from PIL import Image

        for k in (key, self.image_key):
            meta = getattr(d.get(k), "meta", None) or {}
            src = meta.get("source_image") or meta.get("filename_or_obj")
            if isinstance(src, (list, tuple)):
                src = src[0] if src else None
            if isinstance(src, (str, Path)) and Path(str(src)).is_file():
                try:
                    image = np.asarray(Image.open(src).convert("RGB"))
                except Exception:  # noqa: BLE001 - not a PIL-readable file: fall back to the arrays
                    continue
                if image.shape[:2] == tuple(shape):
                    return image
        return None

    def __call__(self, data):
        from vlseg.viz import save_overlay

        d = dict(data)
        for key in self.key_iterator(d):
            pred = to_hw(d[key], self.reverse_indexing)
            image = self._source_image(d, key, pred.shape[:2])
            if image is None and hasattr(d.get(self.image_key), "shape"):
                image = to_hw(d[self.image_key], self.reverse_indexing)
                image = image if image.shape[:2] == pred.shape[:2] else None
            if image is None:
                image = pred
            unc = to_hw(d[self.uncertainty_key], self.reverse_indexing) if self.uncertainty_key in d else None
            label = None
            if self.label_key and hasattr(d.get(self.label_key), "shape"):
                label = to_hw(d[self.label_key], self.reverse_indexing)
            path = _output_path(self.output_dir, output_name(d, key, self.name_key), self.postfix, ".png", self.separate_folder)
            save_overlay(path, image, pred >= self.threshold, unc, title=str(d.get(self.text_key, "")), label=label)
            d[f"{key}_overlay_path"] = str(path)
        return d
