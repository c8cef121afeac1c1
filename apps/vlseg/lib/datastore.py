"""Local datastore that checks a label before storing it.

``PUT /datastore/label?image=<id>&tag=final`` with the form field ``params={"text": "small polyp"}`` stores the
prompt in the label info (MONAI Label keeps ``params`` as the label info); this subclass validates it first with
the same rules as an infer prompt and answers 422 with the reason instead of storing an unusable prompt. It also
answers 404 for an image id the datastore does not hold, 422 for a tag that is not a plain name (a tag is a folder
name: ``../x`` would write outside the datastore) and 422 for a label whose shape does not match its image.
A ``final`` label without a ``text`` prompt takes its prompts from its segment names (3D Slicer's ``label_info``);
a viewer's default name (``Segment_1``) is refused with 422 and the reason, as is a label with no prompt at all
(:func:`check_label_info`, which the DICOMweb datastore uses too).
The datastore JSON is written atomically (see :meth:`PromptCheckingDatastore._update_datastore_file`).
"""

from __future__ import annotations

import json
import os
import re
import tempfile

import numpy as np
from monailabel.datastore.local import LocalDatastore

from lib import imageio
from lib.params import RequestError, check_prompt, http_error
from lib.uncertain_segments import strip_uncertain_label
from vlseg.text.prompts import PromptError, validate_segment_prompt

__all__ = ["PromptCheckingDatastore", "check_label_shape", "check_label_info"]

_TAG_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")


def check_label_shape(image_path: str, label_path: str) -> None:
    """Raise :class:`RequestError` when the label cannot be read or its shape is not the image's."""
    image_kind, label_kind = imageio.image_kind(image_path), imageio.image_kind(label_path)
    if image_kind is None or label_kind is None or not os.path.isfile(image_path):
        return  # other formats (DICOM SEG, NRRD of volumes, ...) are MONAI Label's business
    try:
        if image_kind == "2d":
            imageio.load_label_2d(label_path, imageio.read_image_2d_shape(image_path))
            return
        import nibabel as nib

        shape = tuple(nib.load(image_path).shape[:3])
        lshape = tuple(np.squeeze(np.asarray(nib.load(label_path).dataobj)).shape) if label_kind == "volume" else None
    except ValueError as e:
        raise RequestError(f"label does not fit the image: {e}") from None
    except Exception as e:
        raise RequestError(f"cannot read the label: {type(e).__name__}: {e}") from None
    if lshape != tuple(s for s in shape if s != 1) and lshape != shape:
        raise RequestError(f"label does not fit the image: label shape {lshape}, image shape {shape}")


def check_label_info(info: dict | None, label_tag: str = "final") -> dict:
    """The label info with its prompt cleaned; raises :class:`RequestError` (422) for an unusable prompt, and, for a
    ``final`` label without ``text``, for segment names that are a viewer's defaults or missing altogether."""
    info = dict(info or {})
    segments = info.get("label_info")
    if isinstance(segments, str):
        try:
            segments = info["label_info"] = json.loads(segments)
        except ValueError:
            raise RequestError("label_info is not valid JSON (a list of {'name', 'idx'} segments)") from None
    for key in ("text", "prompt"):
        if key in info and info[key] is not None:
            info[key] = check_prompt(info[key])
    if label_tag != "final" or info.get("text") or info.get("prompt") or not isinstance(segments, list):
        return info
    for seg in segments:
        if isinstance(seg, dict) and "name" in seg:
            try:
                seg["name"] = validate_segment_prompt(seg["name"])
            except PromptError as e:
                raise RequestError(f"invalid label prompt: {e}") from None
    return info


class PromptCheckingDatastore(LocalDatastore):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        handler = getattr(self, "_handler", None)
        if handler is not None:  # auto reload: the JSON now arrives by a rename (see _update_datastore_file)
            handler.on_moved = self._on_moved_event

    def _on_moved_event(self, event):
        if getattr(event, "dest_path", None) == self._datastore_config_path:
            self._on_modify_event(type("Moved", (), {"src_path": event.dest_path})())

    def save_label(self, image_id, label_filename, label_tag, label_info):
        stored = label_filename
        try:
            if not isinstance(label_tag, str) or not _TAG_RE.match(label_tag):
                raise RequestError(f"invalid label tag {label_tag!r}: letters, digits, '_' and '-' only")
            if not isinstance(image_id, str) or not self._datastore.objects.get(image_id):
                raise RequestError(f"image {image_id!r} is not in the datastore", status=404)
            if label_tag == "final":  # a stripped copy: the caller's file is never changed
                stored, label_info = strip_uncertain_label(label_filename, label_info)
            info = check_label_info(label_info, label_tag)
            check_label_shape(self.get_image_uri(image_id), stored)
        except RequestError as e:
            imageio.discard_upload(label_filename)
            if stored != label_filename:
                os.remove(stored)
            raise http_error(e) from None
        try:
            return super().save_label(image_id, stored, label_tag, info)
        finally:
            if stored != label_filename:
                os.remove(stored)

    def _update_datastore_file(self, lock=True):
        """MONAI Label rewrites ``datastore_v2.json`` in place; a process killed mid-write (a scoring run, the
        server) would leave it truncated. Here it is written to a temporary file in the same folder and moved
        over the old one with ``os.replace`` (atomic), under the datastore's file lock as before."""
        from filelock import FileLock

        def write():
            self._ignore_event_config = True
            text = json.dumps(self._datastore.model_dump(exclude={"base_path"}), indent=2, default=str)
            folder = os.path.dirname(self._datastore_config_path)
            fd, tmp = tempfile.mkstemp(prefix=".datastore_", suffix=".json.tmp", dir=folder)
            try:
                with os.fdopen(fd, "w") as f:
                    f.write(text)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, self._datastore_config_path)
            finally:
                if os.path.exists(tmp):
                    os.remove(tmp)
            self._config_ts = os.stat(self._datastore_config_path).st_mtime

        if lock:
            with FileLock(self._lock_file):
                write()
        else:
            write()
