"""Prompts travel with labels: refused viewer default names, prompts written into a real DICOM SEG (pydicom-seg, as
the app's DICOMweb datastore writes it) and read back, and SEGs made elsewhere."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from vlseg.dicom.seg_prompts import LABEL_MAX_CHARS, prompts_from_seg, seg_label_info, segment_prompts
from vlseg.text.prompts import PromptError, is_generic_segment_name, validate_segment_prompt

APP = Path(__file__).resolve().parents[1] / "apps" / "vlseg"
sys.path.insert(0, str(APP))

from lib.datastore import check_label_info  # noqa: E402
from lib.params import RequestError  # noqa: E402

LONG = "one small round polyp in the top left of the image, bright, smooth, about a tenth of the frame wide, " * 2


@pytest.mark.parametrize("name", ["Segment_1", "segment 12", "Label 2", "Unknown", "3", "", "New Segment", "ROI-2"])
def test_generic_segment_names_are_refused(name):
    assert is_generic_segment_name(name)
    with pytest.raises(PromptError, match="default name|empty"):
        validate_segment_prompt(name)


@pytest.mark.parametrize("name", ["polyp", "small polyp", "Segment of the polyp", "cyst_1", "lesion 2"])
def test_descriptive_names_pass(name):
    assert not is_generic_segment_name(name)
    assert validate_segment_prompt(name) == name


def test_segment_prompts_text_wins_names_per_value_and_errors():
    assert segment_prompts({"text": "polyp", "label_info": [{"name": "Segment_1", "idx": 1}]}, [0, 1]) == {1: "polyp"}
    named = {"label_info": [{"name": "polyp", "idx": 1}, {"name": "dark oval cyst", "idx": 2}]}
    assert segment_prompts(named, [0, 1, 2]) == {1: "polyp", 2: "dark oval cyst"}
    with pytest.raises(PromptError, match="default name"):
        segment_prompts({"label_info": [{"name": "Segment_1", "idx": 1}]}, [0, 1])
    with pytest.raises(PromptError, match="no prompt"):
        segment_prompts({}, [0, 1])


def test_app_label_info_check_refuses_default_names_with_422():
    with pytest.raises(RequestError) as err:
        check_label_info({"label_info": [{"name": "Segment_1", "idx": 1}]}, "final")
    assert err.value.status == 422 and "rename the segment" in str(err.value)
    ok = check_label_info({"label_info": '[{"name": " small  polyp ", "idx": 1}]'}, "final")
    assert ok["label_info"] == [{"name": "small polyp", "idx": 1}]
    assert check_label_info({"text": "polyp", "label_info": [{"name": "Segment_1", "idx": 1}]}, "final")["text"] == "polyp"
    assert check_label_info({"model": "uavls"}, "uncertainty") == {"model": "uavls"}  # other tags: no prompt needed


def _ct_series_and_label(tmp_path, values):
    """A 4-slice CT series on disk and a label NIfTI on its SimpleITK grid with one box per label value."""
    import SimpleITK as sitk

    from vlseg.dicom.convert import save, volume_to_ct_series

    vol = np.random.default_rng(0).uniform(0, 1, (24, 20, 4)).astype(np.float32)
    series_dir = tmp_path / "series"
    save(volume_to_ct_series(vol, name="segtest", patient_id="P1"), series_dir)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(series_dir)))
    ref = reader.Execute()
    lab = np.zeros(sitk.GetArrayFromImage(ref).shape, np.uint8)  # [slices, rows, cols]
    for i, v in enumerate(values):
        lab[1 + i % 2, 2 + 6 * i: 6 + 6 * i, 3:9] = v
    img = sitk.GetImageFromArray(lab)
    img.CopyInformation(ref)
    label = tmp_path / "label.nii.gz"
    sitk.WriteImage(img, str(label))
    return series_dir, label


def test_prompts_round_trip_through_a_real_dicom_seg(tmp_path):
    import pydicom
    from monailabel.datastore.utils.convert import nifti_to_dicom_seg

    series_dir, label = _ct_series_and_label(tmp_path, [1, 2])
    prompts = segment_prompts({"label_info": [{"name": LONG, "idx": 1}, {"name": "dark oval cyst", "idx": 2}]},
                              [0, 1, 2])
    seg_file = nifti_to_dicom_seg(str(series_dir), str(label), seg_label_info(prompts), use_itk=False)
    ds = pydicom.dcmread(seg_file)
    labels = {int(s.SegmentNumber): str(s.SegmentLabel) for s in ds.SegmentSequence}
    assert labels[1] == " ".join(LONG.split())[:LABEL_MAX_CHARS] and labels[2] == "dark oval cyst"
    segments, refusals = prompts_from_seg(ds)
    assert refusals == []
    assert segments == [{"name": " ".join(LONG.split()), "idx": 1}, {"name": "dark oval cyst", "idx": 2}]


def test_seg_made_elsewhere_label_used_and_default_names_refused(tmp_path):
    from pydicom.dataset import Dataset

    def seg(*items):
        ds = Dataset()
        ds.SegmentSequence = []
        for number, label, description in items:
            item = Dataset()
            item.SegmentNumber, item.SegmentLabel = number, label
            if description is not None:
                item.SegmentDescription = description
            ds.SegmentSequence.append(item)
        return ds

    segments, refusals = prompts_from_seg(seg((1, "polyp", "Unknown"), (2, "Segment_2", None), (3, "cyst", "")))
    assert segments == [{"name": "polyp", "idx": 1}, {"name": "cyst", "idx": 3}]
    assert len(refusals) == 1 and refusals[0].startswith("segment 2:")
