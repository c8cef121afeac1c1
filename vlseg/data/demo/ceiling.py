"""The text-blind ceiling: how well a predictor that sees the image but not the prompt can do on the demo set."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage


def _load_array(path: Path) -> np.ndarray:
    if path.name.endswith((".nii", ".nii.gz")):
        import nibabel as nib

        return np.asanyarray(nib.load(str(path)).dataobj)
    return np.asarray(Image.open(path))


def _intensity(image: np.ndarray, spatial_ndim: int) -> np.ndarray:
    """Luminance of an RGB image, or the image itself when single channel."""
    if image.ndim == spatial_ndim + 1 and image.shape[-1] == 3:
        return image.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    return image.astype(np.float64)


def _dice(prediction: np.ndarray, target: np.ndarray) -> float:
    total = prediction.sum() + target.sum()
    return 1.0 if total == 0 else float(2.0 * (prediction & target).sum() / total)


def _blind_choices(masks: Sequence[np.ndarray], intensity: np.ndarray) -> dict[str, int]:
    """Object index picked by each single-object text-blind rule."""
    areas = [m.sum() for m in masks]
    means = [intensity[m].mean() for m in masks]
    contrasts = []
    for m, mean in zip(masks, means):
        ring = ndimage.binary_dilation(m, iterations=5) & ~m
        contrasts.append(abs(mean - intensity[ring].mean()))
    return {
        "largest": int(np.argmax(areas)),
        "brightest": int(np.argmax(means)),
        "most_salient": int(np.argmax(contrasts)),
    }


def text_blind_ceiling(datalist, root, split: str = "test") -> dict[str, Any]:
    """Mean Dice on ``split`` of predictors that see the image but not the text.

    They are given the ground-truth masks of all objects of the image (a perfect
    instance segmenter) and must pick without reading the prompt:

    * ``union``         -- all objects of the image;
    * ``random_object`` -- one object uniformly at random (expected Dice);
    * ``largest``       -- the object with the largest area;
    * ``brightest``     -- the object with the highest mean intensity (luminance);
    * ``most_salient``  -- the object with the largest contrast to a ring around it;
    * ``max``           -- the best of the above: what ignoring the text can reach.

    ``datalist`` is the datalist dict or a path to ``datalist.json``; item paths
    are taken relative to ``root``.
    """
    if not isinstance(datalist, Mapping):
        datalist = json.loads(Path(datalist).read_text())
    root = Path(root)
    groups: dict[str, list[Mapping]] = {}
    for item in datalist.get(split, []):
        groups.setdefault(item["image_id"], []).append(item)
    names = ("union", "random_object", "largest", "brightest", "most_salient")
    scores: dict[str, list[float]] = {name: [] for name in names}
    for items in groups.values():
        items = sorted(items, key=lambda it: it["object_index"])
        masks = [_load_array(root / it["label"]) > 0 for it in items]
        intensity = _intensity(_load_array(root / items[0]["image"]), masks[0].ndim)
        union = np.logical_or.reduce(masks)
        picks = _blind_choices(masks, intensity)
        for target in masks:
            scores["union"].append(_dice(union, target))
            scores["random_object"].append(float(np.mean([_dice(m, target) for m in masks])))
            for name, index in picks.items():
                scores[name].append(_dice(masks[index], target))
    result: dict[str, Any] = {"split": split, "n_images": len(groups), "n_samples": len(scores["union"])}
    if not groups:
        return {**result, **{name: None for name in names}, "max": None}
    means = {name: round(float(np.mean(values)), 4) for name, values in scores.items()}
    return {**result, **means, "max": max(means.values())}
