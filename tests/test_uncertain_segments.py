"""Uncertainty drawn in labelmap viewers: extra segments in the returned label, stripped by name (or value) when the
label comes back, so nothing the annotator kept is lost and no uncertainty is trained as a class."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

APP = Path(__file__).resolve().parents[1] / "apps" / "vlseg"
sys.path.insert(0, str(APP))

from lib.uncertain_segments import (  # noqa: E402
    add_uncertain_segments,
    parse_threshold,
    strip_uncertain_label,
    strip_uncertain_segments,
    strip_uncertain_values,
    uncertain_labels,
)

LABELS = {"polyp": 1, "cyst": 2, "lesion": 3}


def _scene():
    mask = np.zeros((8, 10), np.uint8)
    mask[2:6, 2:5] = 1
    mask[2:6, 6:9] = 2
    unc = np.zeros(mask.shape, np.float32)
    unc[2, 2:9] = 0.9  # the top rim of both objects
    unc[7, 0:3] = 0.7  # a possibly missed area in the background
    unc[4, 3] = 0.3  # below the threshold
    return mask, unc


def test_segments_added_where_uncertain_and_names_given():
    mask, unc = _scene()
    out = add_uncertain_segments(mask, unc, 0.5)
    names = uncertain_labels(LABELS)
    assert names == {"polyp (uncertain)": 129, "cyst (uncertain)": 130, "lesion (uncertain)": 131, "uncertain": 255}
    assert set(np.unique(out[2, 2:5])) == {129} and set(np.unique(out[2, 6:9])) == {130}
    assert (out[7, 0:3] == 255).all() and out[4, 3] == 1
    assert np.array_equal(out[unc < 0.5], mask[unc < 0.5])  # nothing else moves


def test_strip_by_value_restores_the_mask():
    mask, unc = _scene()
    assert np.array_equal(strip_uncertain_values(add_uncertain_segments(mask, unc, 0.5)), mask)


def test_strip_by_name_follows_the_viewers_own_values():
    """Slicer renumbers segments on export: the names decide, not the values."""
    mask, unc = _scene()
    sent = add_uncertain_segments(mask, unc, 0.5)
    relabel = {1: 1, 2: 2, 129: 3, 130: 4, 255: 5}  # what a viewer might export
    exported = np.vectorize(lambda v: relabel.get(int(v), 0))(sent).astype(np.uint8)
    segments = [{"name": "polyp", "idx": 1}, {"name": "cyst", "idx": 2}, {"name": "polyp (uncertain)", "idx": 3},
                {"name": "cyst (uncertain)", "idx": 4}, {"name": "uncertain", "idx": 5}]
    label, kept = strip_uncertain_segments(exported, segments)
    assert kept == segments[:2]
    assert np.array_equal(label, mask)
    # an uncertain segment whose class segment is absent keeps its pixels under the class name
    only = np.where(exported == 3, 3, 0).astype(np.uint8)
    label, kept = strip_uncertain_segments(only, [{"name": "polyp (uncertain)", "idx": 3}])
    assert kept == [{"name": "polyp", "idx": 3}] and np.array_equal(label, only)


def test_saved_label_is_stripped_into_a_copy_png_and_nifti(tmp_path):
    import nibabel as nib
    from PIL import Image

    mask, unc = _scene()
    sent = add_uncertain_segments(mask, unc, 0.5)
    png = tmp_path / "label.png"
    Image.fromarray(sent).save(png)
    original = png.read_bytes()
    # no segment names and no flag: nothing is stripped (an ordinary 0/255 mask must keep its 255s)
    assert strip_uncertain_label(str(png), {"text": "polyp"}) == (str(png), {"text": "polyp"})
    # by value only on request
    out, info = strip_uncertain_label(str(png), {"text": "polyp", "uncertain_segments": True})
    assert out != str(png) and info == {"text": "polyp"} and png.read_bytes() == original  # caller's file untouched
    assert np.array_equal(np.asarray(Image.open(out)), mask)
    # by name (3D Slicer), NIfTI
    nii = tmp_path / "label.nii.gz"
    nib.save(nib.Nifti1Image(sent[:, :, None], np.eye(4)), str(nii))
    segs = json.dumps([{"name": "polyp", "idx": 1}, {"name": "cyst", "idx": 2}, {"name": "polyp (uncertain)", "idx": 129},
                       {"name": "cyst (uncertain)", "idx": 130}, {"name": "uncertain", "idx": 255}])
    out, info = strip_uncertain_label(str(nii), {"label_info": segs})
    assert out.endswith(".nii.gz") and np.array_equal(np.asarray(nib.load(out).dataobj)[:, :, 0], mask)
    assert [s["name"] for s in info["label_info"]] == ["polyp", "cyst"]
    assert np.array_equal(np.asarray(nib.load(str(nii)).dataobj)[:, :, 0], sent)


def test_binary_255_mask_is_never_emptied(tmp_path):
    from PIL import Image

    mask = np.zeros((6, 6), np.uint8)
    mask[1:4, 1:4] = 255
    png = tmp_path / "mask.png"
    Image.fromarray(mask).save(png)
    out, _ = strip_uncertain_label(str(png), {"text": "polyp"})
    assert out == str(png) and np.array_equal(np.asarray(Image.open(out)), mask)


@pytest.mark.parametrize("value,expected", [(None, None), ("", None), ("false", None), ("true", 0.5), ("0.3", 0.3),
                                            (True, 0.5)])
def test_threshold_parsing(value, expected):
    assert parse_threshold(value) == expected


@pytest.mark.parametrize("value", ["1.5", "-0.1", "maybe"])
def test_bad_threshold_is_refused_with_the_reason(value):
    with pytest.raises(ValueError, match="uncertain_segments"):
        parse_threshold(value)
