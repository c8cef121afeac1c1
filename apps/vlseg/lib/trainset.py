"""Image / label / text triples for training a bundle from the MONAI Label datastore.

For every image with a ``final`` label the prompt is taken from, in order:

1. the label info's ``text`` (or ``prompt``): the prompt sent with the saved label, e.g.
   ``client.save_label(image_id, mask_file, params={"text": "small polyp"})``; the whole mask (> 0) is its target;
2. the label info's ``label_info`` list (3D Slicer sends ``[{"name": segment name, "idx": value}, ...]``; a DICOM
   SEG's SegmentDescription / SegmentLabel arrive the same way): one sample per segment, target = pixels equal to
   ``idx``, prompt = the segment name, unless it is a viewer's default name (``Segment_1``: skipped with a warning);
3. the image's caption: the datastore image info ``caption`` / ``text``, or a sidecar text file next to the image
   (``<image id>.txt`` or ``<image file>.txt``); the whole mask (> 0) is its target.

Labels without any prompt are skipped with a warning. Targets are written as binary PNG masks (0/255) in a cache
folder so every bundle's ``BinarizeLabeld`` reads them the same way, whatever the viewer saved (class values,
NIfTI from 3D Slicer). NIfTI volumes are cut into the 2D slices holding foreground, windowed exactly as for
inference: the same function (:func:`lib.window.window_volume`), setting (``--conf volume_window`` /
``ct_window``, passed as ``window``) and modality lookup (DICOMweb series: CT gets the fixed CT window).
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import numpy as np

from lib import imageio
from lib.params import RequestError, check_prompt
from lib.window import VolumeWindow, image_modality, window_volume
from vlseg.text.prompts import PromptError, validate_segment_prompt

logger = logging.getLogger(__name__)

__all__ = ["build_text_datalist", "caption_of", "prompts_of_label"]

FINAL = "final"


def caption_of(image_path: str, image_info: dict | None = None) -> str | None:
    """The per-image caption: image info ``caption`` / ``text``, else ``<id>.txt`` / ``<file>.txt`` beside it."""
    info = image_info or {}
    for key in ("caption", "text"):
        if isinstance(info.get(key), str) and info[key].strip():
            return info[key]
    p = Path(image_path)
    stem = p.name[: -len(imageio.suffix_of(p))] if imageio.suffix_of(p) else p.stem
    for side in (p.with_name(stem + ".txt"), p.with_name(p.name + ".txt")):
        if side.is_file():
            text = side.read_text(encoding="utf-8", errors="replace").strip()
            if text:
                return text
    return None


def prompts_of_label(label_info: dict | None, caption: str | None) -> list[tuple[str, int | None, str]]:
    """``[(prompt, label value or None for "any non-zero", source)]`` for one saved label (see module doc)."""
    info = label_info or {}
    for key in ("text", "prompt"):
        if isinstance(info.get(key), str) and info[key].strip():
            return [(info[key], None, "label_text")]
    segments = info.get("label_info")
    if isinstance(segments, list) and segments:
        out = []
        for s in segments:
            if isinstance(s, dict) and isinstance(s.get("name"), str) and s.get("idx") is not None:
                try:
                    out.append((s["name"], int(s["idx"]), "segment_name"))
                except (TypeError, ValueError):
                    continue
        if out:
            return out
    if caption:
        return [(caption, None, "caption")]
    return []


def _tag(*parts) -> str:
    return hashlib.sha1("|".join(map(str, parts)).encode()).hexdigest()[:10]


def build_text_datalist(datastore, cache_dir, axis: int = 2,
                        window: VolumeWindow | None = None) -> tuple[list[dict], list[str]]:
    """``([{"image", "label", "text", "source", "image_id"}], warnings)`` for every labelled image; volume slices
    are windowed with ``window`` (default: the app's default, ``auto``), as the infer tasks do."""
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    items: list[dict] = []
    warnings: list[str] = []
    for image_id in sorted(datastore.get_labeled_images()):
        image_path = datastore.get_image_uri(image_id)
        label_path = datastore.get_label_uri(image_id, FINAL)
        label_info = datastore.get_label_info(image_id, FINAL) or {}
        prompts = prompts_of_label(label_info, caption_of(image_path, datastore.get_image_info(image_id)))
        if not prompts:
            warnings.append(f"{image_id}: label has no prompt (save it with params {{'text': ...}}, or add a "
                            f"caption); skipped")
            continue
        checked = []
        for text, value, source in prompts:
            try:
                if source == "segment_name":
                    text = validate_segment_prompt(text)
                checked.append((check_prompt(text), value, source))
            except (RequestError, PromptError) as e:
                warnings.append(f"{image_id}: {e}; skipped")
        kind = imageio.image_kind(image_path)
        try:
            if kind == "2d":
                shape = imageio.read_image_2d_shape(image_path)
                label = imageio.load_label_2d(label_path, shape)
                for text, value, source in checked:
                    target = (label > 0) if value is None else (label == value)
                    if not target.any():
                        warnings.append(f"{image_id}: empty mask for {text!r}; skipped")
                        continue
                    out = cache / f"{image_id}__{_tag(label_path, os.path.getmtime(label_path), text, value)}.png"
                    imageio.write_mask_png(target.astype(np.uint8) * 255, out)
                    items.append({"image": image_path, "label": str(out), "text": text, "source": source,
                                  "image_id": image_id})
            elif kind == "volume":
                items.extend(_volume_items(image_id, image_path, label_path, checked, cache, axis, warnings,
                                           window, image_modality(datastore, image_id)))
            else:
                warnings.append(f"{image_id}: unsupported image type; skipped")
        except (OSError, ValueError) as e:
            warnings.append(f"{image_id}: {e}; skipped")
    for w in warnings:
        logger.warning("training data: %s", w)
    return items, warnings


def _volume_items(image_id, image_path, label_path, prompts, cache: Path, axis: int, warnings,
                  window: VolumeWindow | None = None, modality: str | None = None) -> list[dict]:
    import nibabel as nib

    _, vol = imageio.load_volume(image_path)
    lab = np.squeeze(np.asarray(nib.load(label_path).dataobj))
    if lab.shape != vol.shape:
        raise ValueError(f"label shape {lab.shape} differs from the volume's {vol.shape}")
    vol8, _ = window_volume(vol, window, modality)
    lab = np.rint(lab).astype(np.int64)
    items = []
    stamp = _tag(label_path, os.path.getmtime(label_path))
    for text, value, source in prompts:
        target = (lab > 0) if value is None else (lab == value)
        slices = [k for k in range(vol.shape[axis]) if np.take(target, k, axis=axis).any()]
        if not slices:
            warnings.append(f"{image_id}: empty mask for {text!r}; skipped")
            continue
        for k in slices:
            base = cache / f"{image_id}__{stamp}_{_tag(text, value)}_a{axis}s{k:04d}"
            img_png = imageio.write_slice_png(np.take(vol8, k, axis=axis), f"{base}_image.png")
            lab_png = imageio.write_mask_png(np.take(target, k, axis=axis).astype(np.uint8) * 255, f"{base}_label.png")
            items.append({"image": img_png, "label": lab_png, "text": text, "source": source, "image_id": image_id})
    return items
