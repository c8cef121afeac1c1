"""Writing and delivering the infer task's answer: the label file and the uncertainty maps.

MONAI Label's infer answer carries one file (the mask), so every map of an image of the datastore is stored as a
label of that image, one tag per map (the latest inference on the image wins):

* ``uncertainty`` (tag ``<uncertainty_tag>``, default ``uncertainty``): predictive entropy / ln 2, the bundle
  contract's map;
* ``mutual_information`` (tag ``<uncertainty_tag>_mutual_information``): BALD mutual information / ln 2, the
  epistemic part;
* ``std`` (tag ``<uncertainty_tag>_std``): standard deviation of the probability over the passes.

2D maps are 16-bit PNGs (value = map x 65535), volumes float32 NIfTI on the input's grid. With
``uncertainty_inline`` the float32 arrays also come back in the JSON (``npy_base64``).
"""

from __future__ import annotations

import logging
import os
import tempfile

import numpy as np

from lib import imageio

logger = logging.getLogger(__name__)

__all__ = ["map_tag", "write_label", "write_map", "deliver_map"]


def map_tag(uncertainty_tag: str, name: str) -> str:
    """Datastore tag of the map ``name`` (``uncertainty`` keeps the app's ``uncertainty_tag``)."""
    return uncertainty_tag if name == "uncertainty" else f"{uncertainty_tag}_{name}"


def write_label(pred, params: dict) -> str:
    """The mask as the answer's label file (PNG / NIfTI / NRRD as asked)."""
    if pred.kind == "volume":
        nrrd = params.get("result_extension") == ".nrrd"  # MONAI Label's OHIF v3 plugin asks for .nrrd
        label = tempfile.NamedTemporaryFile(suffix=".nrrd" if nrrd else ".nii.gz", delete=False).name
        if nrrd:
            imageio.write_nrrd_uint8(pred.mask, label, affine=pred.ref.affine)
        else:
            imageio.write_like_volume(pred.ref, pred.mask, label, np.uint8)
        return label
    ext = params.get("result_extension") or ".png"
    label = tempfile.NamedTemporaryFile(suffix=ext, delete=False).name
    if ext == ".png":
        imageio.write_mask_png(pred.mask, label)
    elif ext == ".nrrd":
        imageio.write_nrrd_uint8(pred.mask, label, layout="2d")
    else:
        imageio.write_2d_nifti(pred.mask, label, np.uint8)
    return label


def write_map(pred, array: np.ndarray) -> tuple[str, dict]:
    """One map as a temporary file: float32 NIfTI for volumes, 16-bit PNG for 2D; returns (path, format info)."""
    if pred.kind == "volume":
        path = tempfile.NamedTemporaryFile(suffix=".nii.gz", delete=False).name
        imageio.write_like_volume(pred.ref, array, path, np.float32)
        return path, {"format": "nifti", "dtype": "float32", "scale": 1.0}
    path = tempfile.NamedTemporaryFile(suffix=".png", delete=False).name
    imageio.write_uncertainty_png16(array, path)
    return path, {"format": "png16", "dtype": "uint16", "scale": imageio.UNCERTAINTY_PNG_SCALE}


def deliver_map(task, request: dict, tag: str, path: str, meta: dict, label_info: dict) -> dict:
    """Store the map file as datastore label ``<image id>`` / ``tag`` when possible; the answer's block for it.

    The temporary file is removed afterwards; when nothing is stored the block says why and how to get the map
    inline instead.
    """
    out = dict(meta, tag=tag)
    image_id = request.get("vlseg_image_id")
    store = task.store_uncertainty and image_id and task.datastore is not None
    if store:
        try:
            task.datastore.save_label(image_id, path, tag, dict(label_info, format=meta["format"], scale=meta["scale"]))
            out.update(stored=True, label=image_id, url=f"/datastore/label?label={image_id}&tag={tag}")
            # a DICOMweb datastore also publishes the uncertainty map as a DICOM series of the image's study (OHIF)
            series = (task.datastore.get_label_info(image_id, tag) or {}).get("SeriesInstanceUID")
            if series:
                out["dicom_series"] = series
        except Exception as e:  # a remote datastore may refuse extra tags: the caller can still ask inline
            logger.warning("%s: could not store the %s map for %s: %s", task.bundle_name, tag, image_id, e)
            out.update(stored=False, reason=str(e))
    else:
        out.update(stored=False, reason="uploaded image (no datastore id)" if not image_id else "storing disabled")
    try:
        os.remove(path)
    except OSError:
        pass
    if not out.get("stored"):
        out["hint"] = "send params {\"uncertainty_inline\": true} to receive the map as base64 .npy in this JSON"
    return out
