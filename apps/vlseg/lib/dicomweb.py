"""The vlseg app's DICOMweb datastore (``--studies http://<pacs>/dicom-web``): MONAI Label's
``DICOMWebDatastore`` with what the vlseg tasks and the viewers need on top.

* **Images listed**: every series the QIDO search filter finds, minus non-image series (SEG, RTSTRUCT, SR, PR,
  KO, ...) and the uncertainty series this app publishes (``SeriesDescription`` starting with
  ``vlseg uncertainty``), so those are never segmented or scored. The QIDO filter is ``--conf
  dicomweb_search_filter`` (JSON), default ``{}``: all series (MONAI Label's own default is CT only).
* **Images served**: multi-slice series as NIfTI (MONAI Label's SimpleITK conversion, then array axes 0 and 1
  exchanged, affine with them: ``vol[:, :, k]`` is DICOM frame ``k`` with rows first, the app's convention, so the
  2D bundles see each slice the way OHIF shows it and a position word like "top left" means the viewer's top
  left); a single 2D instance (secondary capture, RGB or grey) as a PNG, so the 2D bundles see its colours
  (SimpleITK would turn an RGB instance into a vector volume).
* **Final labels** (Slicer *Submit Label*, ``PUT /datastore/label?tag=final``; on the served NIfTI's voxel grid,
  or OHIF's raw ``.bin`` in DICOM order) become a DICOM SEG written with pydicom-seg and uploaded (MONAI Label's own path needs dcmqi's ``itkimage2segimage``, which it downloads from
  GitHub at start-up). The prompts travel IN the SEG (:mod:`vlseg.dicom.seg_prompts`: SegmentLabel = the prompt cut
  to 64 characters, SegmentDescription = the whole prompt); a viewer's default segment name (``Segment_1``) is
  refused with 422. The label and its info are also kept in the local cache; a SEG found in the store without
  that cache entry (the cache was lost, or the SEG was made elsewhere) gets its prompts from its segments.
* **Uncertainty maps** (label tag ``uncertainty``, written by every inference on a datastore image) are kept in
  the local cache as for a folder datastore *and* published to the DICOMweb store as a derived series in the
  image's study (``vlseg uncertainty <model> '<prompt>'``), which OHIF lists next to the image series.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from typing import Any

import numpy as np
from monailabel.datastore.dicom import DICOMWebDatastore
from monailabel.datastore.local import LocalDatastore
from monailabel.datastore.utils.dicom import dicom_web_download_series
from monailabel.interfaces.datastore import DefaultLabelTag

from lib.datastore import check_label_info
from lib.uncertain_segments import strip_uncertain_label
from lib.imageio import discard_upload
from lib.params import RequestError, http_error
from vlseg.dicom.seg_prompts import prompts_from_seg, seg_label_info, segment_prompts
from vlseg.text.prompts import PromptError
from vlseg.dicom.convert import (
    APP_ARRAY_AXES,
    UNCERTAINTY_SERIES_PREFIX,
    sort_slices,
    swap_row_column_axes,
    uncertainty_series,
)

logger = logging.getLogger(__name__)

__all__ = ["VlsegDICOMWebDatastore", "NON_IMAGE_MODALITIES", "search_filter_from"]

NON_IMAGE_MODALITIES = {"SEG", "RTSTRUCT", "RTPLAN", "RTDOSE", "SR", "PR", "KO", "DOC", "REG", "FID", "RWV"}
_SERIES_FIELDS = ["SeriesDescription", "Modality", "NumberOfSeriesRelatedInstances"]


def search_filter_from(conf_value: str | None) -> dict:
    """The QIDO series filter: ``--conf dicomweb_search_filter`` (JSON object), default ``{}`` (every series).

    MONAI Label's ``MONAI_LABEL_DICOMWEB_SEARCH_FILTER`` is not used: ``monailabel start_server`` exports every
    setting to the environment, so its default (CT only, which would hide 2D secondary captures) cannot be told
    apart from a user's choice.
    """
    if not conf_value:
        return {}
    value = json.loads(conf_value)
    if not isinstance(value, dict):
        raise ValueError(f"dicomweb_search_filter must be a JSON object, got {conf_value!r}")
    return value


def _value(ds_json: dict, tag: str, default=None):
    v = ds_json.get(tag, {}).get("Value")
    return v[0] if v else default


class VlsegDICOMWebDatastore(DICOMWebDatastore):
    def __init__(self, client, search_filter: dict, cache_path=None, fetch_by_frame=False, convert_to_nifti=True,
                 uncertainty_tag: str = "uncertainty", publish_uncertainty: bool = True, list_ttl: float = 15.0):
        super().__init__(client=client, search_filter=search_filter, cache_path=cache_path,
                         fetch_by_frame=fetch_by_frame, convert_to_nifti=convert_to_nifti)
        self.uncertainty_tag = uncertainty_tag
        self.publish_uncertainty = bool(publish_uncertainty)
        self._list_ttl = float(list_ttl)
        self._listed: tuple[float, list[str]] | None = None
        self._labeled_cache: dict = {}

    # ------------------------------------------------------------------ listing
    def list_images(self) -> list[str]:
        if self._listed and time.time() - self._listed[0] < self._list_ttl:
            return list(self._listed[1])
        series = self._client.search_for_series(search_filters=self._search_filter, fields=_SERIES_FIELDS)
        out = []
        for s in series:
            uid = _value(s, "0020000E")
            modality = str(_value(s, "00080060", "") or "").upper()
            desc = str(_value(s, "0008103E", "") or "")
            if not uid or modality in NON_IMAGE_MODALITIES or desc.startswith(UNCERTAINTY_SERIES_PREFIX):
                continue
            out.append(str(uid))
        self._listed = (time.time(), out)
        return list(out)

    def get_labeled_images(self, label_tag=None, labels=None) -> list[str]:
        """Series with a DICOM SEG in the store (MONAI Label's lookup, cached for ``list_ttl`` seconds instead of
        two hours, so a label saved a moment ago counts at once)."""
        key = "labeled"
        hit = self._labeled_cache.get(key)
        if hit and time.time() - hit[0] < self._list_ttl:
            return list(hit[1])
        found = DICOMWebDatastore.get_labeled_images.__wrapped__(self, label_tag, labels)
        self._labeled_cache[key] = (time.time(), list(found))
        return list(found)

    def _forget_lists(self) -> None:
        self._listed = None
        self._labeled_cache.clear()

    # ------------------------------------------------------------------ images
    def _series_dir(self, image_id: str) -> str:
        return os.path.realpath(os.path.join(self._datastore.image_path(), image_id))

    def _download(self, image_id: str) -> str:
        image_dir = self._series_dir(image_id)
        if not os.path.exists(image_dir) or not os.listdir(image_dir):
            dicom_web_download_series(None, image_id, image_dir, self._client, self._fetch_by_frame)
        return image_dir

    def get_image_uri(self, image_id: str) -> str:
        png = os.path.realpath(os.path.join(self._datastore.image_path(), f"{image_id}.png"))
        if os.path.exists(png):
            return png
        image_dir = self._download(image_id)
        files = sorted(f for f in os.listdir(image_dir) if not f.startswith("."))
        if len(files) == 1:
            import pydicom

            ds = pydicom.dcmread(os.path.join(image_dir, files[0]))
            frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
            if frames == 1 and (int(getattr(ds, "SamplesPerPixel", 1)) == 3 or "ImagePositionPatient" not in ds):
                return self._as_png(image_id, ds)
        if not self._convert_to_nifti:
            return image_dir
        return self._as_nifti(image_id, image_dir)

    def _as_nifti(self, image_id: str, image_dir: str) -> str:
        """A series -> ``<cache>/<series uid>.nii.gz`` with array axes (row, column, slice), registered in the cache.

        MONAI Label's ``dicom_to_nifti`` (SimpleITK) gives (column, row, slice): ``vol[:, :, k]`` would be the
        transpose of the frame. :func:`vlseg.dicom.convert.swap_row_column_axes` turns it into the app's layout
        (same voxels in space); the image info records it (``vlseg_array_axes``), so a cache written before is
        converted again."""
        from monailabel.datastore.utils.convert import dicom_to_nifti

        nii = os.path.realpath(os.path.join(self._datastore.image_path(), f"{image_id}.nii.gz"))
        if os.path.exists(nii) and self.get_image_info(image_id).get("vlseg_array_axes") == APP_ARRAY_AXES:
            return nii
        tmp = dicom_to_nifti(image_dir)
        try:
            swap_row_column_axes(tmp)
            LocalDatastore.add_image(self, image_id, tmp, dict(self._dicom_info(image_id),
                                                                vlseg_array_axes=APP_ARRAY_AXES))
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return nii

    def _as_png(self, image_id: str, ds) -> str:
        """A single 2D instance -> ``<cache>/<series uid>.png`` (RGB or grey, 8 bit), registered in the cache."""
        from PIL import Image

        a = ds.pixel_array
        if getattr(ds, "PhotometricInterpretation", "") in ("YBR_FULL", "YBR_FULL_422"):
            from pydicom.pixel_data_handlers.util import convert_color_space

            a = convert_color_space(a, ds.PhotometricInterpretation, "RGB")
        if a.dtype != np.uint8:  # windowless 16-bit grey: stretch to 8 bit
            a = a.astype(np.float32)
            lo, hi = float(a.min()), float(a.max())
            a = np.clip((a - lo) * (255.0 / max(hi - lo, 1e-6)), 0, 255).astype(np.uint8)
        if getattr(ds, "PhotometricInterpretation", "") == "MONOCHROME1":
            a = 255 - a
        tmp = tempfile.NamedTemporaryFile(suffix=".png", delete=False).name
        try:
            Image.fromarray(np.ascontiguousarray(a)).save(tmp, format="PNG")
            LocalDatastore.add_image(self, image_id, tmp, self._dicom_info(image_id))
        finally:
            os.remove(tmp)
        return os.path.realpath(os.path.join(self._datastore.image_path(), f"{image_id}.png"))

    # ------------------------------------------------------------------ labels
    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict[str, Any],
                   label_id: str = "") -> str:
        if label_tag == DefaultLabelTag.FINAL:
            stored, label_info = strip_uncertain_label(label_filename, label_info)  # a copy when stripped
            try:
                label_info = check_label_info(label_info, label_tag)
                return self._save_final(image_id, stored, label_info)
            except RequestError as e:
                discard_upload(label_filename)
                raise http_error(e) from None
            finally:
                if stored != label_filename and os.path.exists(stored):
                    os.remove(stored)
        label_id = LocalDatastore.save_label(self, image_id, label_filename, label_tag, label_info)
        if label_tag == self.uncertainty_tag and self.publish_uncertainty:
            try:
                series_uid = self.publish_uncertainty_series(image_id, label_filename, label_info)
                label_info = dict(label_info, SeriesInstanceUID=series_uid)
                LocalDatastore.update_label_info(self, image_id, label_tag, label_info)
            except Exception:  # the map stays available from the datastore endpoint
                logger.exception("vlseg: publishing the uncertainty series of %s failed", image_id)
        return label_id

    def get_label_uri(self, label_id: str, label_tag: str, image_id: str = "") -> str:
        """Final labels: the copy in the local cache when there is one (saved through this server, with its info),
        else the image's DICOM SEG from the store. ``label_id`` may be the image id (how the vlseg trainer and a
        folder datastore ask) or the SEG series UID (how MONAI Label's DICOMweb datastore asks)."""
        if label_tag != DefaultLabelTag.FINAL:
            return super().get_label_uri(label_id, label_tag, image_id)
        local = LocalDatastore.get_label_uri(self, image_id or label_id, label_tag)
        if local and os.path.exists(local):
            return local
        if not image_id and label_id in self.list_images():
            seg = self._seg_series_of(label_id)
            return self._seg_label(seg, label_tag, label_id) if seg else ""
        return self._seg_label(label_id, label_tag, image_id)

    def _seg_label(self, seg_uid: str, label_tag: str, image_id: str) -> str:
        """MONAI Label's SEG -> NIfTI conversion (SimpleITK: column, row, slice), then the cached copy rewritten
        in the served images' (row, column, slice) layout."""
        path = super().get_label_uri(seg_uid, label_tag, image_id)
        if not path or not image_id:
            return path
        local = LocalDatastore.get_label_uri(self, image_id, label_tag)
        if local and os.path.exists(local):
            info = LocalDatastore.get_label_info(self, image_id, label_tag) or {}
            update = {}
            if info.get("vlseg_array_axes") != APP_ARRAY_AXES:
                swap_row_column_axes(local)
                update["vlseg_array_axes"] = APP_ARRAY_AXES
            if not (info.get("text") or info.get("prompt") or info.get("label_info")):
                update.update(self._prompts_of_seg(seg_uid))
            if update:
                LocalDatastore.update_label_info(self, image_id, label_tag, dict(info, **update))
            return local
        return path

    def _prompts_of_seg(self, seg_uid: str) -> dict:
        """The prompts a DICOM SEG carries (SegmentDescription / SegmentLabel; made here or elsewhere), as label
        info ``{"label_info": [{"name", "idx"}], "vlseg_prompt_source": "dicom_seg"}``; {} when it has none."""
        from pydicom.dataset import Dataset

        try:
            series = self._client.search_for_series(search_filters={"SeriesInstanceUID": seg_uid})
            meta = self._client.retrieve_series_metadata(_value(series[0], "0020000D"), seg_uid)
            segments, refusals = prompts_from_seg(Dataset.from_json(meta[0]))
        except Exception:  # noqa: BLE001 - a SEG without readable segments trains without prompts (skipped)
            logger.exception("vlseg: reading the segments of DICOM SEG %s failed", seg_uid)
            return {}
        for r in refusals:
            logger.warning("vlseg: DICOM SEG %s: %s", seg_uid, r)
        return {"label_info": segments, "vlseg_prompt_source": "dicom_seg"} if segments else {}

    def _seg_series_of(self, image_id: str) -> str | None:
        """The newest DICOM SEG series in the store that references series ``image_id``."""
        from pydicom.dataset import Dataset

        for s in reversed(self._client.search_for_series(search_filters={"Modality": "SEG"})):
            meta = Dataset.from_json(self._client.retrieve_series_metadata(_value(s, "0020000D"),
                                                                           _value(s, "0020000E"))[0])
            refs = meta.get("ReferencedSeriesSequence")
            if refs and str(refs[0].SeriesInstanceUID) == image_id:
                return str(_value(s, "0020000E"))
        return None

    def _save_final(self, image_id: str, label_filename: str, label_info: dict) -> str:
        """A final label -> DICOM SEG (pydicom-seg) uploaded to the store; label + info kept in the cache."""
        from monailabel.datastore.utils.convert import binary_to_image, nifti_to_dicom_seg
        from monailabel.datastore.utils.dicom import dicom_web_upload_dcm

        image_uri = self.get_image_uri(image_id)
        temps = []

        def _temp() -> str:
            temps.append(tempfile.NamedTemporaryFile(suffix=".nii.gz", delete=False).name)
            return temps[-1]

        try:
            if "".join(os.path.basename(label_filename).split(".")[1:]) == "bin":
                # OHIF's raw labelmap is in DICOM order (column fastest): SimpleITK's layout of the series
                itk_ref = swap_row_column_axes(image_uri, _temp())
                itk_label = binary_to_image(itk_ref, label_filename)
                temps.append(itk_label)
                label_filename = swap_row_column_axes(itk_label, _temp())
            else:  # a label on the served NIfTI's grid (row, column, slice) -> SimpleITK's layout for pydicom-seg
                itk_label = swap_row_column_axes(label_filename, _temp())
            import nibabel as nib

            values = np.unique(np.rint(np.asarray(nib.load(itk_label).dataobj))).astype(np.int64)
            try:  # the prompts go INTO the SEG (SegmentLabel / SegmentDescription), not only the local cache
                segments = seg_label_info(segment_prompts(label_info, values))
            except PromptError as e:
                raise http_error(RequestError(f"invalid label prompt: {e}")) from None
            image_dir = self._download(image_id)
            seg_file = nifti_to_dicom_seg(image_dir, itk_label, segments, use_itk=False)
            if seg_file:
                series_uid = dicom_web_upload_dcm(seg_file, self._client)
                os.unlink(seg_file)
                label_info = dict(label_info, SeriesInstanceUID=series_uid)
                self._forget_lists()
            else:
                logger.warning("vlseg: final label of %s is empty; no DICOM SEG uploaded", image_id)
            label_info = dict(label_info, vlseg_array_axes=APP_ARRAY_AXES)
            return LocalDatastore.save_label(self, image_id, label_filename, DefaultLabelTag.FINAL, label_info)
        finally:
            for t in temps:
                if t and os.path.exists(t):
                    os.unlink(t)

    def _read_map(self, path: str) -> np.ndarray:
        """An uncertainty file of the infer task as float ``[rows, cols, slices]`` in [0, 1]."""
        name = path.lower()
        if name.endswith((".nii", ".nii.gz")):
            import nibabel as nib

            a = np.asarray(nib.load(path).dataobj, dtype=np.float32)
            # on the served image's grid: array axes (row, column, slice), like the DICOM frames
            return a.reshape(a.shape[0], a.shape[1], -1)
        from PIL import Image

        from lib.imageio import UNCERTAINTY_PNG_SCALE

        return np.asarray(Image.open(path), dtype=np.float32)[:, :, None] / UNCERTAINTY_PNG_SCALE

    def publish_uncertainty_series(self, image_id: str, unc_file: str, info: dict) -> str:
        """Upload the uncertainty map of ``image_id`` as a derived series of its study; returns its UID."""
        import pydicom

        image_dir = self._download(image_id)
        sources = [pydicom.dcmread(os.path.join(image_dir, f), stop_before_pixels=True)
                   for f in sorted(os.listdir(image_dir)) if not f.startswith(".")]
        model, prompt = info.get("model", "?"), info.get("prompt", "")
        series = uncertainty_series(sort_slices(sources), self._read_map(unc_file),
                                    series_key=f"{image_id}/{model}/{prompt}/{time.time_ns()}", description=f"{model} '{prompt}'")
        self._client.store_instances(series)
        logger.info("vlseg: uncertainty of %s (%s, %r) published as series %s (%d instances)", image_id, model,
                    prompt, series[0].SeriesInstanceUID, len(series))
        return str(series[0].SeriesInstanceUID)
