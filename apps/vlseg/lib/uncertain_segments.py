"""Uncertainty drawn over the image in any labelmap viewer (OHIF, 3D Slicer), without plugin changes.

With ``--conf uncertain_segments true`` (or a threshold such as ``0.4``; per request ``uncertain_segments``), the
returned label carries extra segments where the uncertainty map is at or above the threshold:

* ``"<class> (uncertain)"`` (value ``128 + class value``): uncertain pixels the model gave to that class;
* ``"uncertain"`` (value ``255``): uncertain pixels the model left as background.

Viewers name and colour segments from the answer's ``label_names`` / the model's labels in ``/info``, so the
uncertain rim and the possibly missed areas appear as their own segments over the image. When the label comes back
(*Submit Label*), the extra segments are stripped **by name**: ``"<class> (uncertain)"`` pixels go back to
``<class>`` and ``"uncertain"`` pixels to background, so nothing the annotator kept is lost and no uncertainty is
trained as a class. A label without segment names (the HTTP API) is stripped by value only when it is saved with
``uncertain_segments: true`` in its params: an ordinary 0/255 mask must never lose its 255s.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping

import numpy as np

__all__ = ["strip_uncertain_label", "OFFSET", "BACKGROUND_VALUE", "BACKGROUND_NAME", "SUFFIX", "parse_threshold", "uncertain_labels",
           "add_uncertain_segments", "strip_uncertain_values", "strip_uncertain_segments", "is_uncertain_name"]

OFFSET = 128
BACKGROUND_VALUE = 255
BACKGROUND_NAME = "uncertain"
SUFFIX = " (uncertain)"
DEFAULT_THRESHOLD = 0.5


def parse_threshold(value) -> float | None:
    """``--conf uncertain_segments``: off (``""``, ``false``, ``0``, None) -> None; ``true`` -> 0.5; a number in
    (0, 1] -> that threshold; anything else raises ValueError with the reason."""
    if value is None or isinstance(value, bool):
        return DEFAULT_THRESHOLD if value else None
    word = str(value).strip().lower()
    if word in ("", "false", "no", "off", "0"):
        return None
    if word in ("true", "yes", "on"):
        return DEFAULT_THRESHOLD
    try:
        t = float(word)
    except ValueError:
        raise ValueError(f"uncertain_segments must be true, false or a threshold in (0, 1], got {value!r}") from None
    if not 0.0 < t <= 1.0:
        raise ValueError(f"uncertain_segments threshold must be in (0, 1], got {t}")
    return t


def uncertain_labels(label_names: Mapping[str, int]) -> dict[str, int]:
    """The extra segment names and values for the app's labels (values must stay below 127)."""
    out = {}
    for name, value in label_names.items():
        if not 0 < int(value) < BACKGROUND_VALUE - OFFSET:
            raise ValueError(f"label {name!r} has value {value}; uncertain segments need label values 1..126")
        out[f"{name}{SUFFIX}"] = OFFSET + int(value)
    out[BACKGROUND_NAME] = BACKGROUND_VALUE
    return out


def is_uncertain_name(name: str) -> bool:
    return str(name) == BACKGROUND_NAME or str(name).endswith(SUFFIX)


def add_uncertain_segments(mask: np.ndarray, uncertainty: np.ndarray, threshold: float) -> np.ndarray:
    """A copy of ``mask`` (uint8 class values) with the uncertain pixels moved to the extra segments' values."""
    if mask.shape != uncertainty.shape:
        raise ValueError(f"mask {mask.shape} and uncertainty {uncertainty.shape} differ in shape")
    if mask.max(initial=0) >= BACKGROUND_VALUE - OFFSET:
        raise ValueError("uncertain segments need class values 1..126")
    out = mask.astype(np.uint8, copy=True)
    hot = uncertainty >= threshold
    fg = hot & (mask > 0)
    out[fg] = mask[fg] + OFFSET
    out[hot & (mask == 0)] = BACKGROUND_VALUE
    return out


def strip_uncertain_values(label: np.ndarray) -> np.ndarray:
    """Values ``128 + v`` -> ``v``, ``255`` -> 0 (a label without segment names)."""
    out = np.asarray(label).copy()
    out[out == BACKGROUND_VALUE] = 0
    moved = (out > OFFSET) & (out < BACKGROUND_VALUE)
    out[moved] = out[moved] - OFFSET
    return out


def strip_uncertain_segments(label: np.ndarray, segments: list[dict]) -> tuple[np.ndarray, list[dict]]:
    """Strip the extra segments of a label BY NAME: ``[{"name", "idx"}]`` as 3D Slicer sends them.

    ``"<class> (uncertain)"`` pixels take the value of the segment named ``<class>`` when there is one; otherwise
    the segment keeps its value and is renamed ``<class>``. ``"uncertain"`` pixels become background."""
    out = np.asarray(label).copy()
    by_name = {str(s.get("name")): s for s in segments if isinstance(s, dict) and "idx" in s}
    kept: list[dict] = []
    renamed: dict[str, dict] = {}
    for seg in segments:
        if not isinstance(seg, dict) or "idx" not in seg:
            kept.append(seg)
            continue
        name, idx = str(seg.get("name")), int(seg["idx"])
        if name == BACKGROUND_NAME:
            out[out == idx] = 0
        elif name.endswith(SUFFIX):
            base = name[: -len(SUFFIX)]
            target = by_name.get(base) or renamed.get(base)
            if target is not None and not is_uncertain_name(target["name"]):
                out[out == idx] = int(target["idx"])
            else:
                renamed[base] = dict(seg, name=base)
        else:
            kept.append(seg)
    kept.extend(renamed.values())
    return out, kept


def _read_label(path: str):
    """``(array, writer)`` of a 2D PNG or NIfTI label; None for other formats or an unreadable file."""
    lower = path.lower()
    try:
        if lower.endswith(".png"):
            from PIL import Image

            with Image.open(path) as img:
                mode, array = img.mode, np.asarray(img)
            if array.ndim != 2:
                return None

            def write(a, out):
                Image.fromarray(a.astype(array.dtype), mode=mode).save(out, format="PNG")

            return array, write, ".png"
        if lower.endswith((".nii", ".nii.gz")):
            import nibabel as nib

            nii = nib.load(path)

            def write(a, out):
                nib.save(nib.Nifti1Image(a.astype(nii.get_data_dtype()), nii.affine, nii.header), out)

            return np.asarray(nii.dataobj), write, ".nii.gz" if lower.endswith(".gz") else ".nii"
    except Exception:  # noqa: BLE001 - an unreadable label is reported by the shape check that follows
        return None
    return None


def strip_uncertain_label(label_filename: str, info: dict | None) -> tuple[str, dict]:
    """``(file to store, info)`` for a final label that may carry the extra segments: stripped by name when its
    ``label_info`` names them, by value only when ``info["uncertain_segments"]`` is true; the stripped label goes
    to a NEW temporary file (the caller removes it), the caller's file is never changed. Otherwise the file and the
    info come back as they are."""
    info = dict(info or {})
    segments = info.get("label_info")
    if isinstance(segments, str):
        try:
            segments = json.loads(segments)
        except ValueError:
            return label_filename, info  # the prompt check reports it
    named = isinstance(segments, list) and any(isinstance(s, dict) and is_uncertain_name(s.get("name", ""))
                                               for s in segments)
    by_value = str(info.pop("uncertain_segments", "")).strip().lower() in ("true", "1", "yes")
    if not (named or by_value):
        return label_filename, info
    read = _read_label(label_filename)
    if read is None:
        return label_filename, info
    array, write, suffix = read
    if named:
        stripped, info["label_info"] = strip_uncertain_segments(array, segments)
    else:
        stripped = strip_uncertain_values(array)
    fd, out = tempfile.mkstemp(prefix="vlseg_label_", suffix=suffix)
    os.close(fd)
    write(stripped, out)
    return out, info
