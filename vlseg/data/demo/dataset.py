"""The whole demo set: :func:`generate_demo_dataset` writes it (files, ``datalist.json``, README) and
:func:`ensure_demo_dataset` reuses a complete set made with the same parameters."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vlseg.data.demo.ceiling import text_blind_ceiling
from vlseg.data.demo.readme import write_readme
from vlseg.data.demo.splits import (
    DEFAULT_N_IMAGES,
    DEFAULT_N_VOLUMES,
    SPLITS,
    VOLUME_SPLITS,
    generate_image_split,
    generate_volumes,
)
from vlseg.data.demo.vocabulary import CATEGORIES, GENERATOR_VERSION, PROMPT_KEYS
from vlseg.data.volume_slices import volume_slice_items

_OUTPUT_DIRS = ("images", "labels", "volumes", "volume_labels", "slices", "slice_labels")
_OUTPUT_FILES = ("datalist.json", "README.md")


def _clear_outputs(root: Path) -> None:
    """Remove what a previous generation wrote (and nothing else under ``root``)."""
    for name in _OUTPUT_DIRS:
        shutil.rmtree(root / name, ignore_errors=True)
    for name in _OUTPUT_FILES:
        (root / name).unlink(missing_ok=True)


def _params(seed, n_images, image_size, n_volumes: Sequence[int], volume_shape) -> dict[str, Any]:
    return {
        "generator_version": GENERATOR_VERSION,
        "seed": int(seed),
        "n_images": [int(n) for n in n_images],
        "image_size": int(image_size),
        "n_volumes": [int(n) for n in n_volumes],
        "volume_shape": [int(n) for n in volume_shape],
    }


def _load_if_current(root: Path, params: Mapping[str, Any]) -> dict | None:
    """The existing datalist if it was made with ``params`` and all its files exist."""
    path = root / "datalist.json"
    if not path.is_file():
        return None
    try:
        datalist = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if datalist.get("params") != dict(params):
        return None
    keys = [key for key, _, _ in SPLITS] + ["volumes"]
    for item in (item for key in keys for item in datalist.get(key, [])):
        if not ((root / item["image"]).is_file() and (root / item["label"]).is_file()):
            return None
    return datalist


def _write_json_atomic(data: Mapping, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def generate_demo_dataset(
    root,
    seed: int = 0,
    n_images: Sequence[int] = DEFAULT_N_IMAGES,
    image_size: int = 192,
    n_volumes: int | Sequence[int] = DEFAULT_N_VOLUMES,
    volume_shape: Sequence[int] = (96, 96, 12),
    overwrite: bool = False,
) -> dict:
    """Generate the demo set under ``root`` and return its datalist dict.

    Args:
        root: output folder (created if needed; only the generator's own
            sub-folders and files are ever removed from it).
        seed: master seed; the same seed gives byte-identical files.
        n_images: number of *images* in (training, validation, test); each
            image yields 2-3 samples.
        image_size: side of the square 2D images, in pixels.
        n_volumes: number of 3D NIfTI volumes in (training, validation, test), or one number: that many
            test volumes. All are in the datalist section ``volumes`` (each item with its ``split``); the
            slices of the training and validation volumes are also 2D items of ``training`` / ``validation``
            (:func:`vlseg.data.volume_slices.volume_slice_items`); test volumes are held out whole.
        volume_shape: (rows, cols, slices) of every volume.
        overwrite: regenerate even if ``root/datalist.json`` already matches
            these parameters (otherwise that datalist is returned as is).
    """
    root = Path(root)
    if len(n_images) != 3:
        raise ValueError(f"n_images must be (train, validation, test), got {n_images!r}")
    if len(volume_shape) != 3:
        raise ValueError(f"volume_shape must have 3 entries, got {volume_shape!r}")
    n_volumes = _volume_counts(n_volumes)
    params = _params(seed, n_images, image_size, n_volumes, volume_shape)
    if not overwrite:
        existing = _load_if_current(root, params)
        if existing is not None:
            return existing
    root.mkdir(parents=True, exist_ok=True)
    _clear_outputs(root)

    datalist: dict[str, Any] = {
        "name": "vlseg-demo",
        "description": "Synthetic referring-segmentation demo set: 2-3 objects (polyp, cyst, lesion) per image; "
        "each sample segments the one object its text prompt names.",
        "version": f"{GENERATOR_VERSION}.0",
        "seed": int(seed),
        "params": params,
        "categories": list(CATEGORIES),
        "prompt_keys": list(PROMPT_KEYS),
        "labels": {"0": "background", "1": "referred object"},
    }
    for (key, folder, stream), n in zip(SPLITS, n_images):
        datalist[key] = generate_image_split(root, folder, stream, int(n), int(seed), int(image_size))
    shape = tuple(int(v) for v in volume_shape)
    datalist["volumes"] = []
    for (key, folder, stream), n in zip(VOLUME_SPLITS, n_volumes):
        volumes = generate_volumes(root, key, folder, stream, n, int(seed), shape)
        datalist["volumes"].extend(volumes)
        if key != "test":  # the slices of training / validation volumes train the 2D bundles; test ones are held out
            datalist[key].extend(volume_slice_items(root, volumes, folder))
    datalist["text_blind_ceiling"] = text_blind_ceiling(datalist, root, split="test")
    write_readme(root, datalist)
    _write_json_atomic(datalist, root / "datalist.json")  # written last: marks a complete set
    return datalist


def _volume_counts(n_volumes) -> tuple[int, int, int]:
    """(training, validation, test) volume counts from a 3-sequence or one number (test volumes only)."""
    if isinstance(n_volumes, (int, np.integer)):
        counts = (0, 0, int(n_volumes))
    else:
        counts = tuple(int(n) for n in n_volumes)
    if len(counts) != 3 or min(counts) < 0:
        raise ValueError(f"n_volumes must be a count of test volumes or (train, validation, test), got {n_volumes!r}")
    return counts  # type: ignore[return-value]


def default_demo_root() -> Path:
    """``$VLSEG_DEMO_DIR`` if set, else ``~/.cache/vlseg/demo``."""
    env = os.environ.get("VLSEG_DEMO_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "vlseg" / "demo"


def ensure_demo_dataset(root=None, **kw) -> Path:
    """Make sure the demo set exists (generating it once) and return its ``datalist.json`` path.

    ``root`` defaults to :func:`default_demo_root`; ``kw`` are passed to
    :func:`generate_demo_dataset`.
    """
    root = Path(root).expanduser() if root is not None else default_demo_root()
    generate_demo_dataset(root, **kw)
    return root / "datalist.json"
