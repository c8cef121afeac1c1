"""Which intensity window turns a volume into the 8-bit slices the 2D bundles see, for inference and training.

Settings (``--conf volume_window``, ``--conf ct_window``; request ``window``):

* ``auto`` (default): CT images get the fixed CT window (``ct_window``, default -160..240 HU: soft tissue, level 40,
  width 400); other images the percentile window of :func:`lib.imageio.window_to_uint8`. The modality is known for
  DICOMweb series (the datastore's image info ``Modality``); NIfTI files carry none, so they get the percentile
  window unless ``ct`` or ``lo,hi`` is asked for.
* ``percentile``: always the percentile window (the app's behaviour before fixed windows existed).
* ``ct``: always the CT window.
* ``lo,hi``: always this fixed window, in the volume's own units.

The training set (:mod:`lib.trainset`) cuts saved volume labels into slices with the same function and setting.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lib.imageio import window_to_uint8

__all__ = ["DEFAULT_CT_WINDOW", "WINDOW_MODES", "WindowError", "VolumeWindow", "parse_hu_range", "parse_window",
           "window_from_conf", "image_modality", "window_volume"]


#: Default CT window: soft tissue, level 40 HU / width 400 HU (``--conf ct_window``).
DEFAULT_CT_WINDOW = (-160.0, 240.0)
#: ``window`` values besides an explicit ``lo,hi``.
WINDOW_MODES = ("auto", "percentile", "ct")


class WindowError(ValueError):
    """A window setting that cannot be used (bad ``--conf volume_window`` / ``ct_window`` or request ``window``)."""


def parse_hu_range(value, what: str = "ct_window") -> tuple[float, float]:
    """``"lo,hi"`` (or a 2-sequence) -> ``(lo, hi)`` with finite ``lo < hi``; anything else is a :class:`WindowError`
    naming ``what``."""
    parts = value.replace(";", ",").split(",") if isinstance(value, str) else value
    try:
        lo, hi = (float(x) for x in parts)
    except (TypeError, ValueError):
        raise WindowError(f"{what} must be two numbers 'lo,hi' (e.g. -160,240 for a soft-tissue CT window), "
                          f"got {value!r}") from None
    if not (np.isfinite(lo) and np.isfinite(hi)) or lo >= hi:
        raise WindowError(f"{what} needs finite lo < hi, got {value!r}")
    return lo, hi


@dataclass(frozen=True)
class VolumeWindow:
    """How a volume becomes the 8-bit slices the 2D bundles see, for inference and training alike.

    ``mode``: ``auto`` (the fixed ``ct`` window when the image's modality is CT, known for DICOMweb series; the
    percentile window otherwise, e.g. for NIfTI files, which carry no modality), ``percentile`` (always the
    percentile window of :func:`window_to_uint8`), ``ct`` (always ``ct``), ``fixed`` (always ``fixed``).
    """

    mode: str = "auto"
    ct: tuple[float, float] = DEFAULT_CT_WINDOW
    fixed: tuple[float, float] | None = None

    def bounds(self, modality: str | None = None) -> tuple[float, float] | None:
        """``(lo, hi)`` of the fixed window for an image of ``modality``, or None for the percentile window."""
        if self.mode == "fixed":
            return self.fixed
        if self.mode == "ct" or (self.mode == "auto" and str(modality or "").strip().upper() == "CT"):
            return self.ct
        return None

    def with_request(self, value) -> "VolumeWindow":
        """This window with a request's ``window`` value applied (None / empty: unchanged)."""
        return self if value in (None, "") else parse_window(value, self.ct, what="window")


def parse_window(value, ct_window=DEFAULT_CT_WINDOW, what: str = "volume_window") -> VolumeWindow:
    """``auto`` | ``percentile`` | ``ct`` | ``lo,hi`` -> :class:`VolumeWindow` (``ct_window``: the CT window)."""
    ct = parse_hu_range(ct_window, "ct_window")
    text = str("" if value is None else value).strip().lower() or "auto"
    if text in WINDOW_MODES:
        return VolumeWindow(text, ct)
    if "," in text or ";" in text:
        return VolumeWindow("fixed", ct, parse_hu_range(text, what))
    raise WindowError(f"{what} must be one of {', '.join(WINDOW_MODES)} or two numbers 'lo,hi', got {value!r}")


def window_volume(volume: np.ndarray, window: VolumeWindow | None = None,
                  modality: str | None = None) -> tuple[np.ndarray, dict]:
    """``(uint8 volume, description)``: ``volume`` windowed as ``window`` says for an image of ``modality``; the
    description (``mode``, ``lo``/``hi`` of a fixed window, ``modality``) goes into the answer's JSON."""
    window = window or VolumeWindow()
    bounds = window.bounds(modality)
    mode = "percentile" if bounds is None else ("fixed" if window.mode == "fixed" else "ct")
    info = {"mode": mode, "modality": modality or None}
    if bounds is not None:
        info.update(lo=bounds[0], hi=bounds[1])
    return window_to_uint8(volume, bounds), info


def window_from_conf(conf: dict | None) -> VolumeWindow:
    """The app's window from ``--conf volume_window`` (default ``auto``) and ``--conf ct_window`` (default
    -160,240); a bad value raises :class:`WindowError` naming the key and what to write instead."""
    conf = conf or {}
    ct = conf.get("ct_window") or DEFAULT_CT_WINDOW
    return parse_window(conf.get("volume_window") or "auto", ct, what="volume_window")


def image_modality(datastore, image_id: str | None) -> str | None:
    """The DICOM modality the datastore records for ``image_id`` (DICOMweb series: image info ``Modality``), or
    None (folder datastores, uploads, unknown ids)."""
    if datastore is None or not image_id or not hasattr(datastore, "get_image_info"):
        return None
    try:
        info = datastore.get_image_info(image_id) or {}
    except (KeyError, OSError, ValueError):  # an id the datastore does not know: no modality
        return None
    value = str(info.get("Modality") or "").strip().upper()
    return value if value and value != "UNK" else None
