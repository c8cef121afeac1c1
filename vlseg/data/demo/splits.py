"""The splits of the demo set and the files of one split: 2D images (PNG) and 3D volumes (NIfTI) with their masks.

Every image / volume draws from its own ``numpy.random.Generator`` seeded by ``(seed, stream, index)``, so changing
the number of images of one split leaves the others untouched.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
from PIL import Image

from vlseg.data.demo.layout import layout_scene
from vlseg.data.demo.prompts import sample_records
from vlseg.data.demo.render import render_rgb, render_volume
from vlseg.data.volume_slices import slice_fields

#: (datalist key, folder name, random stream id) of the 2D splits.
SPLITS = (("training", "train", 0), ("validation", "validation", 1), ("test", "test", 2))
VOLUME_STREAM = 3
#: (split, folder / volume-id part, random stream id) of the volumes; test volumes keep the old ids ``vol_000``
#: and stream, so a set made with ``n_volumes=N`` (N test volumes) is unchanged.
VOLUME_SPLITS = (("training", "train", 4), ("validation", "validation", 5), ("test", "test", VOLUME_STREAM))
DEFAULT_N_IMAGES = (160, 24, 40)
DEFAULT_N_VOLUMES = (6, 2, 4)
SMALL_N_IMAGES = (6, 2, 2)
SMALL_N_VOLUMES = (1, 1, 1)
VOLUME_SPACING = (1.0, 1.0, 2.5)


def _save_png(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format="PNG")


def _save_nifti(array: np.ndarray, path: Path) -> None:
    import nibabel as nib  # imported lazily: only the volumes need it

    path.parent.mkdir(parents=True, exist_ok=True)
    image = nib.Nifti1Image(array, np.diag([*VOLUME_SPACING, 1.0]))
    image.header.set_xyzt_units("mm")
    nib.save(image, str(path))  # nibabel writes gzip with mtime 0: deterministic bytes


def generate_image_split(root: Path, folder: str, stream: int, n: int, seed: int, size: int) -> list[dict]:
    """Write ``n`` RGB images of one split (``images/<folder>/``, ``labels/<folder>/``) and return their items."""
    items: list[dict] = []
    for index in range(n):
        rng = np.random.default_rng([seed, stream, index])
        image_id = f"{folder}_{index:04d}"
        objects = layout_scene(rng, (size, size))
        image_rel = f"images/{folder}/{image_id}.png"
        label_rels = [f"labels/{folder}/{image_id}_obj{k}.png" for k in range(len(objects))]
        _save_png(render_rgb(rng, objects, size), root / image_rel)
        for obj, rel in zip(objects, label_rels):
            _save_png(obj.mask.astype(np.uint8) * 255, root / rel)
        items.extend(dict(item, **slice_fields()) for item in sample_records(rng, image_id, image_rel, label_rels, objects))
    return items


def generate_volumes(root: Path, split: str, folder: str, stream: int, n: int, seed: int,
                     shape: tuple[int, int, int]) -> list[dict]:
    """Write ``n`` volumes of ``split`` (``volumes/``, ``volume_labels/``) and return their 3D datalist items."""
    items: list[dict] = []
    for index in range(n):
        rng = np.random.default_rng([seed, stream, index])
        vol_id = f"vol_{index:03d}" if split == "test" else f"vol_{folder}_{index:03d}"
        objects = layout_scene(rng, shape)
        image_rel = f"volumes/{vol_id}.nii.gz"
        label_rels = [f"volume_labels/{vol_id}_obj{k}.nii.gz" for k in range(len(objects))]
        _save_nifti(render_volume(rng, objects, shape), root / image_rel)
        for obj, rel in zip(objects, label_rels):
            _save_nifti(obj.mask.astype(np.uint8), root / rel)
        for item in sample_records(rng, vol_id, image_rel, label_rels, objects):
            item["spacing"] = list(VOLUME_SPACING)
            item["split"] = split
            items.append(item)
    return items


def volume_items(datalist: Mapping, split: str) -> list[dict]:
    """The 3D items of the ``split`` volumes (``"training"``, ``"validation"`` or ``"test"``)."""
    return [item for item in datalist.get("volumes", []) if item.get("split", "test") == split]
