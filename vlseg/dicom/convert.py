"""Arrays -> DICOM with pydicom (2.x API), deterministic UIDs.

* :func:`volume_to_ct_series`: a float volume ``[rows, cols, slices]`` (the demo convention: slice ``vol[:, :, k]``
  is an image with array axis 0 = rows) -> one CT Image Storage instance per slice, 16-bit with a rescale to
  Hounsfield-like units, ``ImagePositionPatient`` ``(0, 0, k * spacing)`` and axial orientation, so that viewers
  (OHIF, Slicer) and ITK stack the slices in the order ``k`` ascending.
* :func:`image_to_sc_instance`: a 2D RGB or grey uint8 image -> one Secondary Capture Image Storage instance.
* :func:`uncertainty_series`: a float map in [0, 1] on the grid of a source series -> a derived series in the
  same study and frame of reference (Secondary Capture storage, 16-bit, pixel value = uncertainty x 1000, window
  0..1000), which the MONAI Label app uploads next to the image so OHIF lists it.
* :func:`sort_slices`: datasets of one series in the order ITK / SimpleITK (GDCM) and OHIF stack them.
* :func:`swap_row_column_axes`: a NIfTI made from a DICOM series by SimpleITK (MONAI Label's conversion; array
  axes column, row, slice) rewritten with array axes row, column, slice -- the app's convention, in which slice
  ``vol[:, :, k]`` is an image with array axis 0 = rows, exactly like the DICOM frame (and the demo volume it was
  made from). The affine's first two columns are swapped too, so every voxel keeps its position in space; the
  operation is its own inverse (the app uses it again to hand labels back to SimpleITK / pydicom-seg).

Every UID is derived from names given by the caller (``pydicom.uid.generate_uid(entropy_srcs=...)``), so
converting the same input twice gives the same UIDs and uploading twice does not duplicate studies.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

__all__ = [
    "CT_IMAGE_STORAGE",
    "SECONDARY_CAPTURE_STORAGE",
    "UNCERTAINTY_SERIES_PREFIX",
    "uid",
    "volume_to_ct_series",
    "image_to_sc_instance",
    "uncertainty_series",
    "sort_slices",
    "swap_row_column_axes",
    "APP_ARRAY_AXES",
    "save",
]

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
SECONDARY_CAPTURE_STORAGE = "1.2.840.10008.5.1.4.1.1.7"
#: SeriesDescription prefix of the uncertainty series the app publishes (the app's datastore leaves them out of
#: its image list, so they are never segmented or scored themselves).
UNCERTAINTY_SERIES_PREFIX = "vlseg uncertainty"
_UID_ROOT = "1.2.826.0.1.3680043.8.498."  # pydicom's root (generate_uid default)
_HU_OFFSET = 1024  # stored value 0 = -1024 HU


def uid(*parts) -> str:
    """A deterministic DICOM UID from ``parts`` (same parts -> same UID)."""
    return generate_uid(prefix=_UID_ROOT, entropy_srcs=["vlseg"] + [str(p) for p in parts])


def _base(sop_class: str, sop_uid: str) -> FileDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = _UID_ROOT + "1"
    ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
    ds.is_little_endian, ds.is_implicit_VR = True, False
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, sop_uid
    ds.SpecificCharacterSet = "ISO_IR 100"
    return ds


def _patient_study(ds: Dataset, patient_id: str, patient_name: str, study_uid: str, study_id: str,
                   study_description: str, date: str) -> None:
    ds.PatientID, ds.PatientName = patient_id, patient_name
    ds.PatientBirthDate, ds.PatientSex = "", "O"
    ds.StudyInstanceUID, ds.StudyID = study_uid, study_id[:16]
    ds.StudyDescription = study_description
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = date
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
    ds.AccessionNumber, ds.ReferringPhysicianName = "", ""


def _mono16(ds: Dataset, pixels: np.ndarray) -> None:
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = int(pixels.shape[0]), int(pixels.shape[1])
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = np.ascontiguousarray(pixels.astype("<u2")).tobytes()


def volume_to_ct_series(volume: np.ndarray, *, name: str, patient_id: str, patient_name: str | None = None,
                        spacing: Sequence[float] = (1.0, 1.0, 2.5), scale: float = 1000.0,
                        study_description: str = "vlseg demo", series_description: str | None = None,
                        date: str = "20250101") -> list[FileDataset]:
    """One CT instance per slice ``volume[:, :, k]`` (rows = array axis 0); stored = round(v * scale), HU =
    stored - 1024. ``spacing`` = (row spacing, column spacing, slice spacing) in mm. UIDs derive from ``name``."""
    v = np.asarray(volume, dtype=np.float64)
    if v.ndim != 3:
        raise ValueError(f"expected a 3D volume [rows, cols, slices], got shape {v.shape}")
    stored = np.clip(np.rint(v * scale), 0, 65535).astype(np.uint16)
    hu = stored.astype(np.float64) - _HU_OFFSET
    lo, hi = np.percentile(hu, [0.5, 99.5])
    study_uid, series_uid, frame_uid = uid(name, "study"), uid(name, "series"), uid(name, "frame")
    out = []
    for k in range(v.shape[2]):
        ds = _base(CT_IMAGE_STORAGE, uid(name, "slice", k))
        _patient_study(ds, patient_id, patient_name or patient_id, study_uid, name, study_description, date)
        ds.Modality, ds.Manufacturer = "CT", "vlseg demo (synthetic)"
        ds.SeriesInstanceUID, ds.SeriesNumber = series_uid, 1
        ds.SeriesDescription = series_description or f"{name} (CT-like demo volume)"
        ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = frame_uid, ""
        ds.InstanceNumber = k + 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [0.0, 0.0, round(float(k * spacing[2]), 4)]
        ds.SliceLocation = round(float(k * spacing[2]), 4)
        ds.PixelSpacing = [float(spacing[0]), float(spacing[1])]
        ds.SliceThickness = float(spacing[2])
        ds.KVP = ""
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -_HU_OFFSET, 1, "HU"
        ds.WindowCenter, ds.WindowWidth = round((lo + hi) / 2, 1), max(1.0, round(hi - lo, 1))
        _mono16(ds, stored[:, :, k])
        out.append(ds)
    return out


def image_to_sc_instance(image: np.ndarray, *, name: str, patient_id: str, patient_name: str | None = None,
                         modality: str = "ES", study_description: str = "vlseg demo",
                         series_description: str | None = None, date: str = "20250101") -> FileDataset:
    """A 2D uint8 image (``[H, W, 3]`` RGB or ``[H, W]`` grey) as one Secondary Capture instance in its own
    study (modality ``ES``, endoscopy, by default: the demo images are endoscopy-like)."""
    a = np.asarray(image)
    if a.dtype != np.uint8 or a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (3, 4)):
        raise ValueError(f"expected a uint8 [H, W] or [H, W, 3] image, got {a.dtype} {a.shape}")
    ds = _base(SECONDARY_CAPTURE_STORAGE, uid(name, "instance"))
    _patient_study(ds, patient_id, patient_name or patient_id, uid(name, "study"), name, study_description, date)
    ds.Modality, ds.ConversionType, ds.Manufacturer = modality, "WSD", "vlseg demo (synthetic)"
    ds.SeriesInstanceUID, ds.SeriesNumber, ds.InstanceNumber = uid(name, "series"), 1, 1
    ds.SeriesDescription = series_description or f"{name} (2D demo image)"
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.Rows, ds.Columns = int(a.shape[0]), int(a.shape[1])
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    if a.ndim == 3:
        ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
        a = a[:, :, :3]
    else:
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    data = np.ascontiguousarray(a).tobytes()
    ds.PixelData = data + (b"\0" if len(data) % 2 else b"")
    return ds


def _normal(ds: Dataset) -> np.ndarray:
    iop = [float(x) for x in getattr(ds, "ImageOrientationPatient", [1, 0, 0, 0, 1, 0])]
    return np.cross(iop[:3], iop[3:])


def sort_slices(datasets: Sequence[Dataset]) -> list[Dataset]:
    """Slices ordered by their position along the slice normal, ascending (GDCM / ITK order; OHIF stacks a
    volume the same way); instances without a position by ``InstanceNumber``."""
    items = list(datasets)
    if items and all(hasattr(d, "ImagePositionPatient") for d in items):
        n = _normal(items[0])
        return sorted(items, key=lambda d: (float(np.dot(n, [float(x) for x in d.ImagePositionPatient])),
                                            int(getattr(d, "InstanceNumber", 0) or 0)))
    return sorted(items, key=lambda d: int(getattr(d, "InstanceNumber", 0) or 0))


_COPY_TAGS = ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyID",
              "StudyDate", "StudyTime", "StudyDescription", "AccessionNumber", "ReferringPhysicianName",
              "FrameOfReferenceUID", "PositionReferenceIndicator", "ImageOrientationPatient", "ImagePositionPatient",
              "PixelSpacing", "SliceThickness", "SliceLocation", "InstanceNumber")


def uncertainty_series(sources: Sequence[Dataset], uncertainty: np.ndarray, *, series_key: str,
                       description: str) -> list[FileDataset]:
    """The uncertainty map as a derived series of the source series ``sources`` (same study, same frame of
    reference and slice geometry, one instance per source instance).

    ``uncertainty`` is ``[rows, cols, n]`` with slice ``k`` belonging to ``sort_slices(sources)[k]`` (or
    ``[rows, cols]`` for a single instance). Values in [0, 1] are stored as round(u * 1000) (no rescale: OHIF
    shows fractional-slope secondary captures blank), window 0..1000. ``series_key`` makes the UIDs.
    """
    srcs = sort_slices(sources)
    u = np.asarray(uncertainty, dtype=np.float64)
    if u.ndim == 2:
        u = u[:, :, None]
    if u.shape[2] != len(srcs):
        raise ValueError(f"uncertainty has {u.shape[2]} slices, the source series {len(srcs)} instances")
    stored = np.clip(np.rint(u * 1000.0), 0, 1000).astype(np.uint16)
    series_uid = uid(series_key, "series")
    now = datetime.datetime.now()
    out = []
    for k, src in enumerate(srcs):
        if (int(src.Rows), int(src.Columns)) != stored.shape[:2]:
            raise ValueError(f"uncertainty slice {stored.shape[:2]} does not match the source {src.Rows}x{src.Columns}")
        ds = _base(SECONDARY_CAPTURE_STORAGE, uid(series_key, "instance", k))
        for tag in _COPY_TAGS:
            if tag in src:
                setattr(ds, tag, src.data_element(tag).value)
        ds.Modality, ds.ConversionType, ds.Manufacturer = "OT", "WSD", "vlseg"
        ds.SeriesInstanceUID, ds.SeriesNumber = series_uid, 900
        ds.SeriesDescription = f"{UNCERTAINTY_SERIES_PREFIX} {description}"[:64]
        ds.SeriesDate, ds.SeriesTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
        ds.ContentDate, ds.ContentTime = ds.SeriesDate, ds.SeriesTime
        ds.ImageType = ["DERIVED", "SECONDARY", "UNCERTAINTY"]
        ds.DerivationDescription = "pixel-wise uncertainty (normalised binary entropy of the mean foreground " \
                                   "probability); pixel value = uncertainty x 1000 (0 certain .. 1000 maximal)"
        ref = Dataset()
        ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID = src.SOPClassUID, src.SOPInstanceUID
        ds.SourceImageSequence = [ref]
        # plain per-mille integers and a 0..1000 window: OHIF v3 (cornerstone3D) shows a secondary capture with a
        # fractional RescaleSlope as a blank image, so the scale is stated in DerivationDescription instead
        ds.WindowCenter, ds.WindowWidth = 500, 1000
        _mono16(ds, stored[:, :, k])
        out.append(ds)
    return out


#: How the app's DICOM-derived NIfTI files order their array axes (recorded in the datastore image info).
APP_ARRAY_AXES = "row,column,slice"


def swap_row_column_axes(src, dst=None) -> str:
    """Rewrite the NIfTI ``src`` (to ``dst``, default in place) with array axes 0 and 1 exchanged and the affine's
    columns 0 and 1 exchanged with them: the same image in space, indexed the other way round.

    SimpleITK writes a DICOM series as NIfTI with array axes (column, row, slice); after this call the array is
    (row, column, slice), so ``vol[:, :, k]`` equals DICOM frame ``k``'s ``pixel_array`` (rows first) -- the layout
    of the app's 2D slicing. Applying it twice gives the original file back (up to compression)."""
    import nibabel as nib

    img = nib.load(str(src))
    data = np.asanyarray(img.dataobj)
    if data.ndim < 2:
        raise ValueError(f"expected a 2D or 3D NIfTI, got shape {data.shape}")
    if np.issubdtype(img.get_data_dtype(), np.integer) and np.all(np.mod(data, 1) == 0):
        data = data.astype(img.get_data_dtype())
    data = np.ascontiguousarray(np.swapaxes(data, 0, 1))
    affine = img.affine.copy()
    affine[:, [0, 1]] = affine[:, [1, 0]]
    out = nib.Nifti1Image(data, affine)
    out.set_qform(affine, code=1)
    out.set_sform(affine, code=1)
    dst = str(dst or src)
    nib.save(out, dst)
    return dst


def save(datasets: Sequence[FileDataset], folder) -> list[Path]:
    """Write each dataset to ``folder/<SOPInstanceUID>.dcm``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for ds in datasets:
        p = folder / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(str(p), write_like_original=False)
        paths.append(p)
    return paths
