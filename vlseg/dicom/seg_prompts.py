"""Prompts travel with labels in DICOM SEG: written into each segment, read back when the training set is built.

A label saved on a DICOMweb store lives there as a DICOM SEG; the prompt it was made with must live in the same
object, or it is lost with the app's local cache and SEGs made elsewhere cannot be used for training.

* :func:`segment_prompts` decides the prompt of every label value from a saved label's info (the request's
  ``text`` / ``prompt``, or 3D Slicer's ``label_info`` segments ``[{"name", "idx"}]``);
* :func:`seg_label_info` turns them into the ``label_info`` list that MONAI Label's ``nifti_to_dicom_seg`` writes:
  one segment per label value, its number = the value, **SegmentLabel** = the prompt cut to 64 characters (VR LO)
  and **SegmentDescription** = the whole prompt (VR ST, up to 1024 characters);
* :func:`prompts_from_seg` reads them back from a SEG dataset (SegmentDescription first, then SegmentLabel), and
  refuses viewers' default names (``Segment_1``) with the reason.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from vlseg.text.prompts import PromptError, validate_segment_prompt

__all__ = ["LABEL_MAX_CHARS", "DESCRIPTION_MAX_CHARS", "segment_prompts", "seg_label_info", "prompts_from_seg"]

LABEL_MAX_CHARS = 64  # SegmentLabel, VR LO
DESCRIPTION_MAX_CHARS = 1024  # SegmentDescription, VR ST
_PLACEHOLDERS = {"", "unknown"}  # what MONAI Label's SEG writer puts in SegmentDescription when it has nothing


def segment_prompts(info: Mapping | None, values: Iterable[int]) -> dict[int, str]:
    """``{label value: prompt}`` for the non-zero ``values`` of a saved label; raises :class:`PromptError` for a
    value that has no usable prompt (a generic segment name, or no prompt at all)."""
    info = dict(info or {})
    values = sorted({int(v) for v in values if int(v) != 0})
    text = next((info[k] for k in ("text", "prompt") if isinstance(info.get(k), str) and info[k].strip()), None)
    named = {}
    for seg in info.get("label_info") or []:
        if isinstance(seg, Mapping) and seg.get("name") is not None and seg.get("idx") is not None:
            named[int(seg["idx"])] = str(seg["name"])
    out = {}
    for v in values:
        if text is not None:  # one prompt for the whole mask, as the trainer reads it
            out[v] = validate_segment_prompt(text)
        elif v in named:
            out[v] = validate_segment_prompt(named[v])
        else:
            raise PromptError(f"label value {v} has no prompt: send the label with params {{'text': ...}} or name "
                              f"its segment after what it shows")
    return out


def seg_label_info(prompts: Mapping[int, str], model_name: str = "vlseg") -> list[dict]:
    """MONAI Label ``nifti_to_dicom_seg`` ``label_info``: one entry per label value in ascending order (the order in
    which it walks the values), each with an explicit ``segmentAttribute`` so that the segment number is the value."""
    out = []
    for value in sorted(prompts):
        prompt = prompts[value]
        out.append({
            "name": prompt[:LABEL_MAX_CHARS],
            "model_name": model_name,
            "segmentAttribute": {
                "labelID": int(value),
                "SegmentLabel": prompt[:LABEL_MAX_CHARS],
                "SegmentDescription": prompt[:DESCRIPTION_MAX_CHARS],
                "SegmentAlgorithmType": "SEMIAUTOMATIC",
                "SegmentAlgorithmName": "vlseg",
                "SegmentedPropertyCategoryCodeSequence": {
                    "CodeValue": "49755003", "CodingSchemeDesignator": "SCT", "CodeMeaning": "Morphologically Altered Structure"},
                "SegmentedPropertyTypeCodeSequence": {
                    "CodeValue": "49755003", "CodingSchemeDesignator": "SCT", "CodeMeaning": prompt[:LABEL_MAX_CHARS]},
                "recommendedDisplayRGBValue": [255, 0, 0],
            },
        })
    return out


def prompts_from_seg(ds) -> tuple[list[dict], list[str]]:
    """``([{"name": prompt, "idx": segment number}], refusals)`` from a DICOM SEG dataset's SegmentSequence.

    The prompt is the SegmentDescription unless it is empty or MONAI Label's placeholder, else the SegmentLabel;
    a segment whose prompt is a viewer's default name is refused (listed in ``refusals`` with the reason)."""
    segments, refusals = [], []
    for item in getattr(ds, "SegmentSequence", None) or []:
        number = int(getattr(item, "SegmentNumber", 0) or 0)
        description = str(getattr(item, "SegmentDescription", "") or "").strip()
        label = str(getattr(item, "SegmentLabel", "") or "").strip()
        candidate = description if description.lower() not in _PLACEHOLDERS else label
        try:
            segments.append({"name": validate_segment_prompt(candidate), "idx": number})
        except PromptError as e:
            refusals.append(f"segment {number}: {e}")
    return segments, refusals
