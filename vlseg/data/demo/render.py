"""Rendering: the pixels of a 2D RGB image or a grey 3D volume showing a laid-out scene.

Each category has its own look (``_object_layer``); the background is textured tissue lit *after* the objects
are painted, so no single global threshold separates the objects.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from vlseg.data.demo.layout import SceneObject

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


def render_rgb(rng: np.random.Generator, objects: Sequence[SceneObject], size: int) -> np.ndarray:
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


def render_volume(rng: np.random.Generator, objects: Sequence[SceneObject], shape: tuple[int, int, int]):
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
