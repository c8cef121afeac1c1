"""Object geometry and scene layout: where the 2-3 objects of an image (or volume) lie and what their masks are.

An object is an analytic shape (:class:`Geometry`) placed in one cell of a 3x3 grid; :func:`layout_scene` draws
2 or 3 of them with distinct categories and cells, non-overlapping, off the border, and names each by the grid
cell of its mask centroid (:func:`position_word`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from vlseg.data.demo.vocabulary import (
    BRIGHTNESS_WORDS,
    CATEGORIES,
    POSITION_GRID,
    SHAPE_WORDS,
    SIZE_RADIUS_FRACTION,
    SIZES,
)

# Layout constants (fractions of the in-plane side unless stated otherwise).
P_THREE_OBJECTS = 0.7  # share of images with 3 (not 2) objects; keeps the union predictor low
CENTER_MARGIN = 0.04  # sampled centres stay this far inside their grid cell ...
CENTROID_MARGIN = 0.02  # ... and accepted mask centroids at least this far
GAP_PIXELS = 4  # minimum empty gap between two objects' footprints
BORDER_PIXELS = 2  # objects never touch the image border
MAX_OBJECT_TRIES = 40
MAX_LAYOUT_TRIES = 50


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


def layout_scene(rng: np.random.Generator, shape: tuple[int, ...]) -> list[SceneObject]:
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
