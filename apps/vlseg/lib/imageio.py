"""File handling of the vlseg app: which inputs are 2D images or volumes, slicing volumes for the 2D bundles,
and writing the mask / uncertainty files the viewers load.

Array layout: 2D arrays here are row-major ``[row, col]`` like ``numpy.asarray(PIL.Image.open(png))``; a volume
slice ``np.take(vol, k, axis)`` is treated like such a PNG (for the default axis 2, ``vol[:, :, k]``: array
axis 0 = rows, axis 1 = columns, as the demo volumes are made).
"""

from __future__ import annotations

import base64
import io
import os
from pathlib import Path

import numpy as np
from PIL import Image

from vlseg.data.volume_slices import window_to_uint8  # noqa: F401 - one window for the app, training and the demo

__all__ = [
    "is_upload",
    "discard_upload",
    "IMAGE_2D_EXT",
    "VOLUME_EXT",
    "image_kind",
    "read_image_2d_shape",
    "ImageFileError",
    "check_image_2d",
    "load_volume",
    "window_to_uint8",
    "write_slice_png",
    "load_label_2d",
    "write_mask_png",
    "write_uncertainty_png16",
    "write_like_volume",
    "write_2d_nifti",
    "write_nrrd_uint8",
    "npy_base64",
    "UNCERTAINTY_PNG_SCALE",
]

IMAGE_2D_EXT = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
VOLUME_EXT = (".nii.gz", ".nii")
#: 2D uncertainty maps are written as 16-bit PNG holding round(u * 65535).
UNCERTAINTY_PNG_SCALE = 65535


def image_kind(path: str) -> str | None:
    """``"2d"``, ``"volume"`` or None (unsupported) from the file name."""
    name = str(path).lower()
    if name.endswith(VOLUME_EXT):
        return "volume"
    if name.endswith(IMAGE_2D_EXT):
        return "2d"
    return None


def read_image_2d_shape(path: str) -> tuple[int, int]:
    """(rows, cols) of a 2D image file without decoding all pixels."""
    with Image.open(path) as im:
        w, h = im.size
    return h, w


class ImageFileError(ValueError):
    """An input file that cannot be used; ``status`` is the HTTP status to answer with (413 or 422)."""

    def __init__(self, message: str, status: int = 422):
        super().__init__(message)
        self.status = int(status)


def check_image_2d(path: str, max_pixels: int) -> tuple[int, int]:
    """(rows, cols) of a 2D image after checking it fully decodes and has at most ``max_pixels`` pixels.

    The size is read from the header first, so a small file claiming a huge image (a decompression bomb) is
    refused before any pixel is decoded; then the pixels are decoded once so that a truncated or corrupt file is
    refused here with a message rather than deep inside the bundle's transforms.
    """
    name = os.path.basename(str(path))
    try:
        with Image.open(path) as im:
            w, h = im.size
            if w * h > max_pixels:
                raise ImageFileError(f"image {name} is {w}x{h} pixels; at most {max_pixels} pixels are accepted "
                                     f"(--conf max_image_pixels)", status=413)
            im.load()
    except ImageFileError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageFileError(f"image {name} is too large to decode: {e} (--conf max_image_pixels)",
                             status=413) from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageFileError(f"cannot read the image {name}: {type(e).__name__}: {e}") from None
    return h, w


def load_volume(path: str, max_voxels: int | None = None):
    """``(nibabel image, float32 array)``; a trailing singleton 4th axis is dropped, other 4D volumes refused.

    Unreadable files raise :class:`ImageFileError`; so does a header with more than ``max_voxels`` voxels (413,
    checked before the data is read).
    """
    import nibabel as nib

    try:
        img = nib.load(str(path))
        n = int(np.prod(img.shape, dtype=np.int64))
        if max_voxels is not None and n > max_voxels:
            raise ImageFileError(f"the volume has shape {tuple(img.shape)} ({n} voxels); at most {max_voxels} "
                                 f"voxels are accepted (--conf max_volume_voxels)", status=413)
        arr = np.asarray(img.dataobj, dtype=np.float32)
    except ImageFileError:
        raise
    except Exception as e:  # nibabel / gzip / numpy errors of a corrupt or truncated file
        raise ImageFileError(f"cannot read the volume {os.path.basename(str(path))}: {type(e).__name__}: {e}") from None
    if arr.ndim == 4 and arr.shape[3] == 1:
        arr = arr[..., 0]
    if arr.ndim != 3:
        raise ValueError(f"expected a 3D volume, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError("the volume has NaN or infinite voxels")
    return img, arr


def write_slice_png(slice_u8: np.ndarray, path) -> str:
    Image.fromarray(np.ascontiguousarray(slice_u8), mode="L").save(str(path), format="PNG")
    return str(path)


def load_label_2d(path: str, shape_hw: tuple[int, int]) -> np.ndarray:
    """A saved label for a 2D image as a row-major integer array of ``shape_hw``.

    PNG / JPEG labels are read as they are (channel maximum for colour files); NIfTI / NRRD labels (3D Slicer
    saves 2D segmentations as volumes with a singleton axis) are indexed ``[x=col, y=row]`` and transposed.
    """
    name = str(path).lower()
    if name.endswith(IMAGE_2D_EXT):
        with Image.open(path) as im:
            a = np.asarray(im)
        if a.ndim == 3:
            a = a.max(axis=2)
    else:
        if name.endswith(VOLUME_EXT):
            import nibabel as nib

            a = np.asarray(nib.load(str(path)).dataobj)
        else:
            import itk

            a = itk.array_from_image(itk.imread(str(path))).T  # itk arrays are [z, y, x]
        a = np.squeeze(a)
        if a.ndim != 2:
            raise ValueError(f"label {os.path.basename(path)} has shape {a.shape}; expected a 2D mask")
        a = a.T
    if tuple(a.shape) != tuple(shape_hw):
        raise ValueError(f"label {os.path.basename(path)} has shape {a.shape}, the image {tuple(shape_hw)}")
    return np.rint(a).astype(np.int64) if a.dtype.kind == "f" else a.astype(np.int64)


def write_mask_png(mask_hw: np.ndarray, path) -> str:
    Image.fromarray(np.ascontiguousarray(mask_hw.astype(np.uint8)), mode="L").save(str(path), format="PNG")
    return str(path)


def write_uncertainty_png16(unc_hw: np.ndarray, path) -> str:
    q = np.clip(np.rint(np.asarray(unc_hw, dtype=np.float64) * UNCERTAINTY_PNG_SCALE), 0, UNCERTAINTY_PNG_SCALE)
    Image.fromarray(np.ascontiguousarray(q.astype(np.uint16))).save(str(path), format="PNG")
    return str(path)


def write_like_volume(ref_img, array: np.ndarray, path, dtype) -> str:
    """Save ``array`` (same voxel grid as ``ref_img``) as NIfTI with the reference affine and header."""
    import nibabel as nib

    hdr = ref_img.header.copy()
    out = nib.Nifti1Image(np.asarray(array).astype(dtype), ref_img.affine, header=hdr)
    out.set_data_dtype(dtype)
    out.header["scl_slope"], out.header["scl_inter"] = 1.0, 0.0
    nib.save(out, str(path))
    return str(path)


def write_2d_nifti(array_hw: np.ndarray, path, dtype) -> str:
    """A 2D map as NIfTI indexed ``[x=col, y=row]`` (how 3D Slicer loads the PNG), identity affine."""
    import nibabel as nib

    nib.save(nib.Nifti1Image(np.ascontiguousarray(np.asarray(array_hw).T).astype(dtype), np.eye(4)), str(path))
    return str(path)


def write_nrrd_uint8(array: np.ndarray, path, affine=None, layout: str = "volume") -> str:
    """A label map as an uncompressed (``encoding: raw``) uint8 NRRD, the format MONAI Label's OHIF v3 plugin
    reads: it copies the raw voxels straight into its labelmap, x (column) fastest, then y (row), then slice.

    ``layout="volume"``: ``array`` is a volume in the app's layout ``[row, col, slice]`` (a demo NIfTI; a DICOM
    series as the DICOMweb datastore serves it: DICOM row, column, slice ascending along the normal) with the
    NIfTI ``affine`` (RAS, nibabel) of that array; the NRRD's x is array axis 1 (column), y axis 0 (row), z axis
    2, with the space directions (LPS) taken from the matching affine columns. ``layout="2d"``: ``array`` is a
    row-major ``[row, col]`` image, written as one slice.
    """
    a = np.asarray(array).astype(np.uint8)
    if layout == "2d":
        if a.ndim != 2:
            raise ValueError(f"expected a 2D mask, got shape {a.shape}")
        sizes = (a.shape[1], a.shape[0], 1)
        raw = np.ascontiguousarray(a).tobytes()  # column fastest
        directions, origin = np.eye(3), np.zeros(3)
    else:
        if a.ndim != 3:
            raise ValueError(f"expected a 3D mask, got shape {a.shape}")
        sizes = (a.shape[1], a.shape[0], a.shape[2])
        raw = np.ascontiguousarray(a.transpose(2, 0, 1)).tobytes()  # [slice, row, col] C order: column fastest
        aff = np.asarray(affine if affine is not None else np.eye(4), dtype=np.float64)
        ras_to_lps = np.diag([-1.0, -1.0, 1.0])
        directions = (ras_to_lps @ aff[:3, [1, 0, 2]]).T  # x = column axis (1), y = row axis (0), z = slice
        origin = ras_to_lps @ aff[:3, 3]
    vec = lambda v: "(" + ",".join(f"{float(x):.10g}" for x in v) + ")"  # noqa: E731
    header = ("NRRD0004\n# written by the vlseg MONAI Label app\ntype: uint8\ndimension: 3\n"
              "space: left-posterior-superior\n"
              f"sizes: {sizes[0]} {sizes[1]} {sizes[2]}\n"
              f"space directions: {' '.join(vec(d) for d in directions)}\n"
              "kinds: domain domain domain\nendian: little\nencoding: raw\n"
              f"space origin: {vec(origin)}\n\n")
    with open(path, "wb") as f:
        f.write(header.encode("ascii"))
        f.write(raw)
    return str(path)


def npy_base64(array: np.ndarray) -> str:
    """``base64(numpy.save(float32 array))``: decode with ``np.load(io.BytesIO(base64.b64decode(s)))``."""
    buf = io.BytesIO()
    np.save(buf, np.asarray(array, dtype=np.float32))
    return base64.b64encode(buf.getvalue()).decode("ascii")


def suffix_of(path) -> str:
    name = Path(path).name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else Path(name).suffix


def is_upload(path) -> bool:
    """A file MONAI Label wrote for an upload (``/infer`` file, ``/datastore/label`` label): an existing
    ``<tempdir>/tmpXXXXXXXX<suffix>``."""
    import tempfile

    return (isinstance(path, str) and os.path.isabs(path) and os.path.dirname(path) == tempfile.gettempdir()
            and os.path.basename(path).startswith("tmp") and os.path.isfile(path))


def discard_upload(path) -> None:
    """Delete the server's temporary copy of a refused upload. MONAI Label removes it only after a successful
    answer (a background task of the response), so a refused one would stay in the temp folder. Only such upload
    files are touched (:func:`is_upload`), never a datastore file or a caller's own file."""
    if is_upload(path):
        try:
            os.remove(path)
        except OSError:
            pass
