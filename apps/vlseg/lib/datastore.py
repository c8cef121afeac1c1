"""Local datastore that checks the prompt saved with a label.

``PUT /datastore/label?image=<id>&tag=final`` with the form field ``params={"text": "small polyp"}`` stores the
prompt in the label info (MONAI Label keeps ``params`` as the label info); this subclass validates it first with
the same rules as an infer prompt and answers 422 with the reason instead of storing an unusable prompt.
"""

from __future__ import annotations

from monailabel.datastore.local import LocalDatastore

from lib.params import RequestError, check_prompt, http_error

__all__ = ["PromptCheckingDatastore"]


class PromptCheckingDatastore(LocalDatastore):
    def save_label(self, image_id, label_filename, label_tag, label_info):
        info = dict(label_info or {})
        for key in ("text", "prompt"):
            if key in info and info[key] is not None:
                try:
                    info[key] = check_prompt(info[key])
                except RequestError as e:
                    raise http_error(e) from None
        return super().save_label(image_id, label_filename, label_tag, info)
