"""2D training items cut from volumes, the way the MONAI Label app feeds volumes to the 2D bundles.

The app segments a volume slice by slice: it reads the NIfTI as float32, maps the *whole* volume to 0..255 with
one window (:func:`window_to_uint8`), takes ``np.take(vol8, k, axis)`` (default axis 2, ``vol[:, :, k]``) and
writes it as a grey PNG. :func:`volume_slice_items` makes training items from the same grey slices, so a bundle
trained on them sees at training time exactly the pixels it is given at inference time.

Every slice of a volume gets one item per object of the volume, also where the object does not cross that slice
(``"empty": true``, an all-zero mask): a prompt naming an object the slice does not show must give an empty mask,
or a volume's Dice is lost on the slices outside the object.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["SLICE_AXIS", "slice_fields", "window_to_uint8", "volume_slice_items"]

#: The slicing axis of the app's default (``--conf volume_axis 2``) and of the demo volumes' position words.
SLICE_AXIS = 2


def window_to_uint8(volume: np.ndarray, bounds: tuple[float, float] | None = None) -> np.ndarray:
    """Map a volume to 0..255 for the 2D bundles, the same way for inference, training and the demo's slice items.

    With ``bounds = (lo, hi)`` (a fixed window, e.g. CT Hounsfield units) ``lo`` maps to 0 and ``hi`` to 255,
    linearly, clipped. Without: integer volumes already within 0..255 are kept as they are; anything else is
    linearly mapped from its 0.5th..99.5th percentile to 0..255 (clipped), one window for the whole volume so slices
    stay comparable. (The app decides which a volume gets: ``apps/vlseg/lib/window.py``.)
    """
    v = np.asarray(volume, dtype=np.float32)
    if bounds is not None:
        lo, hi = float(bounds[0]), float(bounds[1])
    elif v.size and v.min() >= 0 and v.max() <= 255 and np.all(np.mod(v, 1) == 0):
        return v.astype(np.uint8)
    else:
        lo, hi = np.percentile(v, [0.5, 99.5]) if v.size else (0.0, 1.0)
    if hi <= lo:
        hi = lo + 1.0
    return np.clip((v - lo) * (255.0 / (hi - lo)), 0, 255).round().astype(np.uint8)


def _load(path: Path) -> np.ndarray:
    import nibabel as nib

    return np.asarray(nib.load(str(path)).dataobj, dtype=np.float32)


def _save_png(array: np.ndarray, path: Path, mode: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(array), mode=mode).save(path, format="PNG")


def slice_fields(volume_id: str = "", slice_index: int = -1, empty: bool = False) -> dict:
    """The fields every 2D demo item carries (the same keys on all of them, so MONAI's ``list_data_collate`` can
    batch images and slices together): ``source`` (``"image"`` or ``"volume_slice"``), ``volume_id`` and
    ``slice_index`` (``""`` and -1 for an image) and ``empty`` (the mask is all zero)."""
    return {"source": "volume_slice" if volume_id else "image", "volume_id": volume_id, "slice_index": int(slice_index),
            "empty": bool(empty)}


def volume_slice_items(root, volume_items: Sequence[Mapping], folder: str, axis: int = SLICE_AXIS) -> list[dict]:
    """Write the slices of the volumes of ``volume_items`` (3D datalist items, paths relative to ``root``) and
    return their 2D items.

    Files: ``slices/<folder>/<vol>_s<k>.png`` (grey, windowed as the app does) and
    ``slice_labels/<folder>/<vol>_s<k>_obj<j>.png`` (0/255). Each 2D item copies its volume item's prompts and
    words and adds :func:`slice_fields` (slices are cut along ``axis``, 2 by default); its
    ``image_id`` is ``<vol>_s<k>`` and ``other_label`` points at the other object's mask on the same slice.
    """
    root = Path(root)
    by_volume: dict[str, list[Mapping]] = {}
    for item in volume_items:
        by_volume.setdefault(item["image_id"], []).append(item)
    out: list[dict] = []
    for vol_id, items in by_volume.items():
        items = sorted(items, key=lambda it: it["object_index"])
        vol8 = window_to_uint8(_load(root / items[0]["image"]))
        masks = [_load(root / it["label"]) > 0 for it in items]
        for k in range(vol8.shape[axis]):
            slice_id = f"{vol_id}_s{k:02d}"
            image_rel = f"slices/{folder}/{slice_id}.png"
            _save_png(np.take(vol8, k, axis=axis), root / image_rel, "L")
            label_rels = [f"slice_labels/{folder}/{slice_id}_obj{j}.png" for j in range(len(items))]
            for mask, rel in zip(masks, label_rels):
                _save_png(np.take(mask, k, axis=axis).astype(np.uint8) * 255, root / rel, "L")
            for item, mask, rel in zip(items, masks, label_rels):
                record = {key: value for key, value in item.items() if key not in ("spacing", "split")}
                record.update(image=image_rel, label=rel, image_id=slice_id, other_label=label_rels[item["other_object_index"]],
                              **slice_fields(vol_id, k, empty=not bool(np.take(mask, k, axis=axis).any())))
                out.append(record)
    return out
