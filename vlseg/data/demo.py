"""Deterministic synthetic demo data for text-prompted ("referring") segmentation.

Why this data set exists
------------------------
Real medical referring-segmentation data sets are large, licensed and slow to
download.  The demo set lets every bundle, the MONAI Label app and the test
suite run end to end on a laptop CPU in seconds, *and* it is built so that the
text prompt genuinely decides the answer: every image holds 2 or 3 objects and
each sample asks for exactly one of them.  A model that ignores the prompt can
at best guess; the guessing ceiling is measured by :func:`text_blind_ceiling`
and stored with the data.

Design
------
* **Objects.**  Three categories, each with a look that alone identifies it:

  - ``polyp``  -- bright, round, dome-shaded (smooth radial falloff) pinkish blob;
  - ``cyst``   -- dark, elongated oval with a smooth soft edge and flat content;
  - ``lesion`` -- irregular outline (radius modulated by a few random angular
    harmonics) filled with high-frequency speckle texture.

  Each object also has a *size* word (``small``/``medium``/``large``: disjoint
  ranges of the area-equivalent radius), a *brightness* word (a variant of the
  category's look, e.g. ``bright``/``pale`` polyps, ``dark``/``faint`` cysts)
  and a *position* word: the cell of a 3x3 grid holding the mask centroid.
  Within one image categories and position words are all distinct, so several
  prompt levels (category alone, position alone, ...) pick a unique object.

* **Background.**  Endoscopy-like tissue albedo with a smooth random
  low-frequency texture, lit by a random gain, a low-frequency illumination
  field and a vignette, plus Gaussian noise.  Lighting is applied *after* the
  objects are painted, so an object's absolute intensity depends on where it
  lies: no single global threshold separates the objects.

* **Samples.**  One sample per (image, object): the mask is that object only
  and the prompts (see :data:`PROMPT_KEYS` and :func:`build_prompts`) describe
  it at nine levels of detail plus robustness variants (missing location,
  under/over-description, contradictory size+position, and the description of
  another object of the same image).  Splits are by *image*.

* **Volumes.**  A few NIfTI volumes follow the same recipe in 3D (ellipsoid-ish
  blobs spanning several slices, one label volume per object, grey MR-like
  levels).  Position words refer to the in-plane slice ``vol[:, :, k]`` read
  like the PNGs: array axis 0 is top -> bottom and axis 1 is left -> right.
  Volumes have their own training / validation / test split.  The slices of the
  training and validation volumes, windowed to uint8 exactly as the MONAI Label
  app does before it runs a 2D bundle on a volume, are added to the 2D
  ``training`` / ``validation`` items (:mod:`vlseg.data.volume_slices`), so the
  bundles learn the grey slices; test volumes are held out whole.

* **Determinism.**  Every image / volume draws from its own
  ``numpy.random.Generator`` seeded by ``(seed, stream, index)``, so the same
  seed always gives byte-identical files (PNG and gzip headers carry no time
  stamps) and changing the number of images of one split leaves the others
  untouched.

Output layout (``root`` chosen by the caller)::

    root/images/{train,validation,test}/<image_id>.png       RGB uint8
    root/labels/{train,validation,test}/<image_id>_obj<k>.png  L, 0/255
    root/volumes/<vol_id>.nii.gz                              float32
    root/volume_labels/<vol_id>_obj<k>.nii.gz                 uint8, 0/1
    root/slices/{train,validation}/<vol_id>_s<k>.png          L uint8 (windowed slice)
    root/slice_labels/{train,validation}/<vol_id>_s<k>_obj<j>.png  L, 0/255
    root/datalist.json                                        MONAI datalist
    root/README.md

``datalist.json`` paths are relative to ``root``, so
``monai.data.load_decathlon_datalist(root / "datalist.json", data_list_key="training", base_dir=root)``
resolves them.

Command line::

    python -m vlseg.data.demo --out DIR [--seed 0] [--small] [--overwrite]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage

from vlseg.data.volume_slices import slice_fields, volume_slice_items

__all__ = [
    "CATEGORIES",
    "PROMPT_KEYS",
    "POSITIONS",
    "SIZES",
    "build_prompts",
    "ensure_demo_dataset",
    "generate_demo_dataset",
    "position_word",
    "text_blind_ceiling",
    "volume_items",
]

# --------------------------------------------------------------------------- #
# Vocabulary
# --------------------------------------------------------------------------- #

#: Bump when the generated content changes; cached sets are then regenerated.
GENERATOR_VERSION = 3

CATEGORIES = ("polyp", "cyst", "lesion")
SHAPE_WORDS = {"polyp": "round", "cyst": "oval", "lesion": "irregular"}
#: Brightness variants per category; every variant keeps the category's look.
BRIGHTNESS_WORDS = {"polyp": ("bright", "pale"), "cyst": ("dark", "faint"), "lesion": ("dark", "pale")}
SIZES = ("small", "medium", "large")
#: Area-equivalent radius ranges as fractions of the (in-plane) image side.
#: The gaps between ranges keep the size words unambiguous.
SIZE_RADIUS_FRACTION = {"small": (0.040, 0.055), "medium": (0.068, 0.085), "large": (0.100, 0.120)}
POSITION_GRID = (
    ("top left", "top", "top right"),
    ("left", "center", "right"),
    ("bottom left", "bottom", "bottom right"),
)
POSITIONS = tuple(word for row in POSITION_GRID for word in row)

PROMPT_KEYS = (
    "p1", "p2", "p3", "p4", "p5", "p6", "p7", "p8", "p9",
    "original", "missing_location", "underdescriptive", "overdescriptive", "contradictory", "other_object",
)  # fmt: skip

#: Extra plausible clauses for the ``overdescriptive`` prompt, per category.
OVERDESCRIPTIVE_CLAUSES = {
    "polyp": (
        "with a smooth well-defined border, clearly visible against the surrounding tissue",
        "with a glistening dome-shaped surface, clearly raised above the surrounding mucosa",
    ),
    "cyst": (
        "with a thin smooth wall and homogeneous dark content, clearly separated from the surrounding tissue",
        "with a sharp smooth outline and no internal structure, clearly visible against the surrounding tissue",
    ),
    "lesion": (
        "with an ill-defined jagged border and a speckled heterogeneous texture, clearly visible against the surrounding tissue",
        "with an uneven mottled surface and irregular margins, clearly standing out from the surrounding tissue",
    ),
}

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

# Layout constants (fractions of the in-plane side unless stated otherwise).
P_THREE_OBJECTS = 0.7  # share of images with 3 (not 2) objects; keeps the union predictor low
CENTER_MARGIN = 0.04  # sampled centres stay this far inside their grid cell ...
CENTROID_MARGIN = 0.02  # ... and accepted mask centroids at least this far
GAP_PIXELS = 4  # minimum empty gap between two objects' footprints
BORDER_PIXELS = 2  # objects never touch the image border
MAX_OBJECT_TRIES = 40
MAX_LAYOUT_TRIES = 50

# Looks: RGB albedo of each (category, brightness) variant for the 2D images and
# a grey level for the volumes (background albedo is about 0.45 there).
_OBJECT_RGB = {
    ("polyp", "bright"): (1.30, 0.78, 0.80),
    ("polyp", "pale"): (1.00, 0.86, 0.84),
    ("cyst", "dark"): (0.26, 0.14, 0.20),
    ("cyst", "faint"): (0.48, 0.30, 0.34),
    ("lesion", "dark"): (0.50, 0.23, 0.17),
    ("lesion", "pale"): (0.95, 0.84, 0.62),
}
_OBJECT_GREY = {
    ("polyp", "bright"): 0.92,
    ("polyp", "pale"): 0.74,
    ("cyst", "dark"): 0.10,
    ("cyst", "faint"): 0.26,
    ("lesion", "dark"): 0.27,
    ("lesion", "pale"): 0.70,
}
#: Width (pixels) of the soft edge: smooth for cysts, crisp for lesions.
_EDGE_WIDTH = {"polyp": 1.5, "cyst": 2.5, "lesion": 0.8}
_TISSUE_RGB = (0.80, 0.47, 0.42)


# --------------------------------------------------------------------------- #
# Object geometry and layout
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class Geometry:
    """Analytic shape of one object, in pixel (row, col[, slice]) coordinates.

    The shape is the set ``rho < 1`` of :meth:`normalized_radius`; ``radius`` is
    the area-equivalent in-plane radius, so the same size word gives about the
    same area for every category.
    """

    center: tuple[float, float]
    radius: float
    aspect: float = 1.0  # major/minor axis ratio (cysts)
    angle: float = 0.0  # orientation of the major axis, radians
    harmonics: tuple[tuple[int, float, float], ...] = ()  # (order, amplitude, phase) of the outline
    z_center: float | None = None  # 3D only: centre and semi-axis along axis 2, in slices
    z_radius: float | None = None

    def normalized_radius(self, shape: Sequence[int]) -> np.ndarray:
        """``rho`` over a grid of ``shape`` (2D or 3D): 0 at the centre, 1 on the boundary."""
        rows = np.arange(shape[0], dtype=np.float64)[:, None] - self.center[0]
        cols = np.arange(shape[1], dtype=np.float64)[None, :] - self.center[1]
        if self.harmonics:
            theta = np.arctan2(rows, cols)
            outline = np.ones_like(theta)
            for order, amplitude, phase in self.harmonics:
                outline = outline + amplitude * np.cos(order * theta + phase)
            # mean of outline**2 over angle is 1 + sum(a^2)/2: rescale to keep the area.
            scale = self.radius / np.sqrt(1.0 + sum(a * a for _, a, _ in self.harmonics) / 2.0)
            rho = np.hypot(rows, cols) / (scale * outline)
        elif self.aspect != 1.0:
            cos, sin = np.cos(self.angle), np.sin(self.angle)
            along, across = cols * cos + rows * sin, rows * cos - cols * sin
            major, minor = self.radius * np.sqrt(self.aspect), self.radius / np.sqrt(self.aspect)
            rho = np.hypot(along / major, across / minor)
        else:
            rho = np.hypot(rows, cols) / self.radius
        if len(shape) == 3:
            dz = (np.arange(shape[2], dtype=np.float64) - self.z_center) / self.z_radius
            rho = np.sqrt(rho[..., None] ** 2 + dz[None, None, :] ** 2)
        return rho


@dataclass(frozen=True)
class SceneObject:
    """One placed object: its words, its geometry and its binary mask."""

    category: str
    size: str
    brightness: str
    position: str
    geometry: Geometry
    mask: np.ndarray

    @property
    def shape_word(self) -> str:
        return SHAPE_WORDS[self.category]

    def attributes(self) -> dict[str, str]:
        return {
            "category": self.category,
            "size": self.size,
            "brightness": self.brightness,
            "shape": self.shape_word,
            "position": self.position,
        }


def position_word(row: float, col: float, height: int, width: int) -> str:
    """Name of the 3x3 grid cell that holds the point ``(row, col)``."""
    i = min(int(3.0 * row / height), 2)
    j = min(int(3.0 * col / width), 2)
    return POSITION_GRID[i][j]


def _sample_geometry(
    rng: np.random.Generator, category: str, size: str, cell: int, plane: tuple[int, int], depth: int | None
) -> Geometry:
    """Random geometry of a ``category`` object of ``size`` centred in grid ``cell``."""
    height, width = plane
    side = min(height, width)
    radius = rng.uniform(*SIZE_RADIUS_FRACTION[size]) * side
    aspect, angle, harmonics = 1.0, 0.0, ()
    if category == "cyst":
        aspect, angle = rng.uniform(1.7, 2.3), rng.uniform(0.0, np.pi)
    elif category == "lesion":
        orders = rng.choice(np.arange(2, 7), size=3, replace=False)
        # amplitudes sum to < 0.4, so the outline stays star-shaped (hence connected)
        harmonics = tuple(
            (int(k), float(rng.uniform(0.07, 0.13)), float(rng.uniform(0.0, 2 * np.pi))) for k in orders
        )
    cell_row, cell_col = divmod(cell, 3)
    margin = CENTER_MARGIN * side
    center = (
        rng.uniform(cell_row * height / 3 + margin, (cell_row + 1) * height / 3 - margin),
        rng.uniform(cell_col * width / 3 + margin, (cell_col + 1) * width / 3 - margin),
    )
    z_center = z_radius = None
    if depth is not None:
        z_radius = rng.uniform(0.18, 0.30) * depth
        z_center = rng.uniform(z_radius + 0.5, depth - 1.5 - z_radius)
    return Geometry(center, float(radius), float(aspect), float(angle), harmonics, z_center, z_radius)


def _footprint_is_valid(footprint: np.ndarray, occupied: np.ndarray) -> bool:
    """Inside the image (with a border), a single component, and a gap to ``occupied``."""
    b = BORDER_PIXELS
    if not footprint.any() or footprint[:b].any() or footprint[-b:].any():
        return False
    if footprint[:, :b].any() or footprint[:, -b:].any():
        return False
    if ndimage.label(footprint)[1] != 1:
        return False
    return not (ndimage.binary_dilation(footprint, iterations=GAP_PIXELS) & occupied).any()


def _centroid_position(footprint: np.ndarray, cell: int) -> str | None:
    """Position word of the footprint centroid, or None if it is not safely inside ``cell``."""
    height, width = footprint.shape
    rows, cols = np.nonzero(footprint)
    row, col = rows.mean(), cols.mean()
    cell_row, cell_col = divmod(cell, 3)
    margin = CENTROID_MARGIN * min(height, width)
    row_ok = cell_row * height / 3 + margin <= row <= (cell_row + 1) * height / 3 - margin
    col_ok = cell_col * width / 3 + margin <= col <= (cell_col + 1) * width / 3 - margin
    return position_word(row, col, height, width) if row_ok and col_ok else None


def _try_place(
    rng: np.random.Generator,
    category: str,
    cell: int,
    shape: tuple[int, ...],
    occupied: np.ndarray,
) -> SceneObject | None:
    """Sample one object in ``cell``; None when it breaks a layout rule."""
    size = SIZES[rng.integers(len(SIZES))]
    brightness = BRIGHTNESS_WORDS[category][rng.integers(len(BRIGHTNESS_WORDS[category]))]
    depth = shape[2] if len(shape) == 3 else None
    geometry = _sample_geometry(rng, category, size, cell, shape[:2], depth)
    mask = geometry.normalized_radius(shape) < 1.0
    if depth is not None and ndimage.label(mask)[1] != 1:
        return None
    footprint = mask.any(axis=2) if depth is not None else mask
    if not _footprint_is_valid(footprint, occupied):
        return None
    position = _centroid_position(footprint, cell)
    if position is None:
        return None
    return SceneObject(category, size, brightness, position, geometry, mask)


def _layout_scene(rng: np.random.Generator, shape: tuple[int, ...]) -> list[SceneObject]:
    """2 or 3 non-overlapping objects of distinct categories in distinct grid cells."""
    n_objects = 3 if rng.random() < P_THREE_OBJECTS else 2
    for _ in range(MAX_LAYOUT_TRIES):
        categories = [str(c) for c in rng.permutation(CATEGORIES)[:n_objects]]
        cells = [int(c) for c in rng.choice(9, size=n_objects, replace=False)]
        occupied = np.zeros(shape[:2], dtype=bool)
        objects: list[SceneObject] = []
        for category, cell in zip(categories, cells):
            for _ in range(MAX_OBJECT_TRIES):
                obj = _try_place(rng, category, cell, shape, occupied)
                if obj is not None:
                    break
            else:
                break  # this cell does not fit: draw a new layout
            objects.append(obj)
            occupied |= obj.mask.any(axis=2) if obj.mask.ndim == 3 else obj.mask
        if len(objects) == n_objects:
            return objects
    raise RuntimeError(f"could not lay out {n_objects} objects in an image of shape {shape}")


# --------------------------------------------------------------------------- #
# Rendering
# --------------------------------------------------------------------------- #


def _lowfreq_field(rng: np.random.Generator, shape: Sequence[int], max_freq: Sequence[float], n_modes: int = 6):
    """Smooth random field in [-1, 1]: a sum of a few random plane waves."""
    axes = [np.linspace(0.0, 1.0, n) for n in shape]
    field = np.zeros(tuple(shape))
    for _ in range(n_modes):
        freqs = [rng.uniform(-f, f) for f in max_freq]
        phase, amplitude = rng.uniform(0.0, 2 * np.pi), rng.uniform(0.5, 1.0)
        arg = sum(
            (2 * np.pi * f * ax).reshape([-1 if d == i else 1 for d in range(len(shape))])
            for i, (f, ax) in enumerate(zip(freqs, axes))
        )
        field += amplitude * np.cos(arg + phase)
    return field / max(float(np.abs(field).max()), 1e-6)


def _speckle(rng: np.random.Generator, shape: Sequence[int], sigma: float | Sequence[float]) -> np.ndarray:
    """Band-limited noise with unit standard deviation."""
    noise = ndimage.gaussian_filter(rng.standard_normal(tuple(shape)), sigma)
    return noise / max(float(noise.std()), 1e-6)


def _object_layer(rng: np.random.Generator, obj: SceneObject, shape: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """(shading, alpha) of an object over the full grid; the look of its category.

    ``alpha`` crosses 0.5 exactly on the mask boundary, so what is seen is what
    is labelled.  ``shading`` multiplies the object's base colour: a dome for
    polyps, nearly flat for cysts, speckle plus blotches for lesions.
    """
    rho = obj.geometry.normalized_radius(shape)
    edge = _EDGE_WIDTH[obj.category]
    alpha = np.clip(0.5 + (1.0 - rho) * obj.geometry.radius / edge, 0.0, 1.0)
    inside = np.clip(rho, 0.0, 1.0)
    if obj.category == "polyp":
        shading = 0.72 + 0.42 * np.sqrt(1.0 - inside**2)
        alpha = alpha * (0.95 if obj.brightness == "bright" else 0.80)
    elif obj.category == "cyst":
        shading = 0.95 + 0.15 * inside**2
        alpha = alpha * 0.95
    else:
        fine_sigma = 0.8 if len(shape) == 2 else (0.8, 0.8, 0.4)
        blotch_sigma = 2.5 if len(shape) == 2 else (2.5, 2.5, 0.8)
        shading = 1.0 + 0.24 * _speckle(rng, shape, fine_sigma) + 0.12 * _speckle(rng, shape, blotch_sigma)
        alpha = alpha * 0.97
    return shading, alpha


def _render_rgb(rng: np.random.Generator, objects: Sequence[SceneObject], size: int) -> np.ndarray:
    """Endoscopy-like RGB image (uint8) showing ``objects``."""
    shape = (size, size)
    tissue = np.asarray(_TISSUE_RGB) + rng.uniform(-0.04, 0.04, size=3)
    texture = 1.0 + 0.10 * _lowfreq_field(rng, shape, (4.0, 4.0)) + 0.03 * _speckle(rng, shape, 3.0)
    albedo = texture[..., None] * tissue
    for obj in objects:
        shading, alpha = _object_layer(rng, obj, shape)
        colour = shading[..., None] * np.asarray(_OBJECT_RGB[obj.category, obj.brightness])
        albedo = albedo * (1.0 - alpha[..., None]) + colour * alpha[..., None]
    lighting = _illumination(rng, shape)
    image = albedo * lighting[..., None] + rng.normal(0.0, rng.uniform(0.012, 0.03), size=(*shape, 3))
    return np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)


def _illumination(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """Random gain x smooth light field x off-centre vignette."""
    height, width = shape
    gain = rng.uniform(0.60, 1.05)
    field = 1.0 + 0.22 * _lowfreq_field(rng, shape, (2.0, 2.0), n_modes=4)
    light_row = height * (0.5 + rng.uniform(-0.15, 0.15))
    light_col = width * (0.5 + rng.uniform(-0.15, 0.15))
    rows, cols = np.mgrid[:height, :width]
    dist = np.hypot((rows - light_row) / height, (cols - light_col) / width) / np.sqrt(0.5)
    vignette = 1.0 - rng.uniform(0.25, 0.50) * dist**2
    return gain * field * vignette


def _render_volume(rng: np.random.Generator, objects: Sequence[SceneObject], shape: tuple[int, int, int]):
    """Single-channel float32 volume (MR-like grey levels) showing ``objects``."""
    freq = (3.0, 3.0, 1.0)
    volume = 0.45 * (1.0 + 0.12 * _lowfreq_field(rng, shape, freq)) + 0.01 * _speckle(rng, shape, (2, 2, 1))
    for obj in objects:
        shading, alpha = _object_layer(rng, obj, shape)
        value = shading * _OBJECT_GREY[obj.category, obj.brightness]
        volume = volume * (1.0 - alpha) + value * alpha
    lighting = rng.uniform(0.8, 1.15) * (1.0 + 0.15 * _lowfreq_field(rng, shape, freq, n_modes=4))
    volume = volume * lighting + rng.normal(0.0, rng.uniform(0.015, 0.03), size=shape)
    return np.clip(volume, 0.0, None).astype(np.float32)


# --------------------------------------------------------------------------- #
# Prompts
# --------------------------------------------------------------------------- #


def _full_description(attrs: Mapping[str, str], location: bool = True) -> str:
    text = f"one {attrs['size']} {attrs['brightness']} {attrs['shape']} {attrs['category']}"
    return f"{text} in the {attrs['position']} of the image" if location else text


def build_prompts(
    attrs: Mapping[str, str],
    other_attrs: Mapping[str, str],
    rng: np.random.Generator,
    occupied_positions: Sequence[str] = (),
) -> dict[str, str]:
    """All prompt variants (:data:`PROMPT_KEYS`) for the object described by ``attrs``.

    ``attrs`` / ``other_attrs`` hold ``category``, ``size``, ``brightness``,
    ``shape`` and ``position`` of the target and of another object of the same
    image.  The contradictory prompt keeps the category but takes a wrong size
    and a position where *no* object lies (``occupied_positions``), so it
    contradicts the image instead of silently naming a different object.
    """
    c, s, b, sh, pos = (attrs[k] for k in ("category", "size", "brightness", "shape", "position"))
    full = _full_description(attrs)
    free = [p for p in POSITIONS if p != pos and p not in occupied_positions]
    wrong = dict(attrs)
    wrong["position"] = free[rng.integers(len(free))]
    wrong_sizes = [x for x in SIZES if x != s]
    wrong["size"] = wrong_sizes[rng.integers(len(wrong_sizes))]
    clauses = OVERDESCRIPTIVE_CLAUSES[c]
    return {
        "p1": c,
        "p2": f"{s} {c}",
        "p3": f"{b} {c}",
        "p4": f"{sh} {c}",
        "p5": f"{s} {b} {c}",
        "p6": f"{c} in the {pos}",
        "p7": f"{s} {sh} {c} in the {pos}",
        "p8": f"{s} {b} {sh} {c} in the {pos}",
        "p9": full,
        "original": full,
        "missing_location": _full_description(attrs, location=False),
        "underdescriptive": f"{c.capitalize()} visible.",
        "overdescriptive": f"{full}, {clauses[rng.integers(len(clauses))]}",
        "contradictory": _full_description(wrong),
        "other_object": _full_description(other_attrs),
    }


def _sample_records(
    rng: np.random.Generator, image_id: str, image_rel: str, label_rels: Sequence[str], objects: Sequence[SceneObject]
) -> list[dict[str, Any]]:
    """Datalist items, one per object of an image (or volume)."""
    positions = [o.position for o in objects]
    items = []
    for k, obj in enumerate(objects):
        other = (k + 1) % len(objects)
        prompts = build_prompts(obj.attributes(), objects[other].attributes(), rng, positions)
        items.append(
            {
                "image": image_rel,
                "label": label_rels[k],
                "text": prompts["p9"],
                "prompts": prompts,
                **obj.attributes(),
                "object_index": k,
                "image_id": image_id,
                "n_objects": len(objects),
                "other_object_index": other,
                "other_label": label_rels[other],
            }
        )
    return items


# --------------------------------------------------------------------------- #
# Writing the data set
# --------------------------------------------------------------------------- #


def _save_png(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format="PNG")


def _save_nifti(array: np.ndarray, path: Path) -> None:
    import nibabel as nib  # imported lazily: only the volumes need it

    path.parent.mkdir(parents=True, exist_ok=True)
    image = nib.Nifti1Image(array, np.diag([*VOLUME_SPACING, 1.0]))
    image.header.set_xyzt_units("mm")
    nib.save(image, str(path))  # nibabel writes gzip with mtime 0: deterministic bytes


def _generate_image_split(root: Path, folder: str, stream: int, n: int, seed: int, size: int) -> list[dict]:
    items: list[dict] = []
    for index in range(n):
        rng = np.random.default_rng([seed, stream, index])
        image_id = f"{folder}_{index:04d}"
        objects = _layout_scene(rng, (size, size))
        image_rel = f"images/{folder}/{image_id}.png"
        label_rels = [f"labels/{folder}/{image_id}_obj{k}.png" for k in range(len(objects))]
        _save_png(_render_rgb(rng, objects, size), root / image_rel)
        for obj, rel in zip(objects, label_rels):
            _save_png(obj.mask.astype(np.uint8) * 255, root / rel)
        items.extend(dict(item, **slice_fields()) for item in _sample_records(rng, image_id, image_rel, label_rels, objects))
    return items


def _generate_volumes(root: Path, split: str, folder: str, stream: int, n: int, seed: int,
                      shape: tuple[int, int, int]) -> list[dict]:
    items: list[dict] = []
    for index in range(n):
        rng = np.random.default_rng([seed, stream, index])
        vol_id = f"vol_{index:03d}" if split == "test" else f"vol_{folder}_{index:03d}"
        objects = _layout_scene(rng, shape)
        image_rel = f"volumes/{vol_id}.nii.gz"
        label_rels = [f"volume_labels/{vol_id}_obj{k}.nii.gz" for k in range(len(objects))]
        _save_nifti(_render_volume(rng, objects, shape), root / image_rel)
        for obj, rel in zip(objects, label_rels):
            _save_nifti(obj.mask.astype(np.uint8), root / rel)
        for item in _sample_records(rng, vol_id, image_rel, label_rels, objects):
            item["spacing"] = list(VOLUME_SPACING)
            item["split"] = split
            items.append(item)
    return items


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
        datalist[key] = _generate_image_split(root, folder, stream, int(n), int(seed), int(image_size))
    shape = tuple(int(v) for v in volume_shape)
    datalist["volumes"] = []
    for (key, folder, stream), n in zip(VOLUME_SPLITS, n_volumes):
        volumes = _generate_volumes(root, key, folder, stream, n, int(seed), shape)
        datalist["volumes"].extend(volumes)
        if key != "test":  # the slices of training / validation volumes train the 2D bundles; test ones are held out
            datalist[key].extend(volume_slice_items(root, volumes, folder))
    datalist["text_blind_ceiling"] = text_blind_ceiling(datalist, root, split="test")
    _write_readme(root, datalist)
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


def volume_items(datalist: Mapping, split: str) -> list[dict]:
    """The 3D items of the ``split`` volumes (``"training"``, ``"validation"`` or ``"test"``)."""
    return [item for item in datalist.get("volumes", []) if item.get("split", "test") == split]


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


# --------------------------------------------------------------------------- #
# Text-blind ceiling
# --------------------------------------------------------------------------- #


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


# --------------------------------------------------------------------------- #
# README and command line
# --------------------------------------------------------------------------- #


def _count_images(items: Sequence[Mapping]) -> int:
    return len({item["image_id"] for item in items})


def _summary_lines(datalist: Mapping) -> list[str]:
    lines = [f"{'split':<11} {'images':>6} {'samples':>7} {'of them volume slices':>22} {'volumes':>7} {'samples':>7}"]
    for key, _, _ in SPLITS:
        items = datalist.get(key, [])
        slices = [item for item in items if item.get("source") == "volume_slice"]
        volumes = volume_items(datalist, key)
        lines.append(f"{key:<11} {_count_images(items):>6} {len(items):>7} {len(slices):>22} "
                     f"{_count_images(volumes):>7} {len(volumes):>7}")
    return lines


def _ceiling_lines(ceiling: Mapping) -> list[str]:
    keys = ("union", "random_object", "largest", "brightest", "most_salient", "max")
    return [f"{k:<14} {ceiling.get(k)}" for k in keys]


def _write_readme(root: Path, datalist: Mapping) -> None:
    ceiling = datalist["text_blind_ceiling"]
    params = datalist["params"]
    text = "\n".join(
        [
            "# vlseg synthetic demo data",
            "",
            "Generated by `python -m vlseg.data.demo` (module `vlseg.data.demo`); do not edit by hand.",
            "",
            "Each 2D image (RGB PNG) holds 2-3 non-overlapping objects of different categories:",
            "`polyp` (bright round dome-shaded blob), `cyst` (dark smooth oval), `lesion`",
            "(irregular outline, speckled texture). Each sample is (image, one object): the",
            "mask is that object only and the prompts name exactly that object by category,",
            "size, brightness, shape and position (3x3 grid cell of the mask centroid).",
            "Splits are by image. The `volumes` section holds 3D NIfTI volumes built the same way",
            f"(spacing {list(VOLUME_SPACING)} mm; positions refer to `vol[:, :, k]`, axis 0 = top->bottom),",
            "each item with its `split`. Every slice `vol[:, :, k]` of a training / validation volume, windowed",
            "to uint8 as the MONAI Label app does, is also a grey 2D item of `training` / `validation`",
            "(`source: volume_slice`, one per object, `empty: true` where the object misses that slice).",
            "Test volumes are held out whole.",
            "",
            f"Parameters: `{json.dumps(params)}`",
            "",
            "```",
            *_summary_lines(datalist),
            "```",
            "",
            "Prompt keys: " + ", ".join(f"`{k}`" for k in datalist["prompt_keys"]) + "; `text` = `p9`.",
            "",
            f"## Text-blind ceiling ({ceiling['split']} split, mean Dice)",
            "",
            "Predictors that see the ground-truth masks of all objects of the image but not the text.",
            "A text-prompted model has to beat `max` to show that it uses the prompt.",
            "",
            "```",
            *_ceiling_lines(ceiling),
            "```",
            "",
        ]
    )
    (root / "README.md").write_text(text)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vlseg.data.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--small", action="store_true",
                        help=f"tiny set: {SMALL_N_IMAGES} images, {SMALL_N_VOLUMES} volumes (train, validation, test)")
    parser.add_argument("--image-size", type=int, default=192)
    parser.add_argument("--overwrite", action="store_true", help="regenerate even if an identical set exists")
    args = parser.parse_args(argv)
    kwargs: dict[str, Any] = {"seed": args.seed, "image_size": args.image_size, "overwrite": args.overwrite}
    if args.small:
        kwargs.update(n_images=SMALL_N_IMAGES, n_volumes=SMALL_N_VOLUMES)
    start = time.perf_counter()
    datalist = generate_demo_dataset(args.out, **kwargs)
    elapsed = time.perf_counter() - start
    print(f"demo data set in {Path(args.out).resolve()} ({elapsed:.1f} s)")
    print("\n".join(_summary_lines(datalist)))
    print(f"text-blind ceiling ({datalist['text_blind_ceiling']['split']} split, mean Dice):")
    print("\n".join("  " + line for line in _ceiling_lines(datalist["text_blind_ceiling"])))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
