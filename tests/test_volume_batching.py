"""Batched volume inference of the app (apps/vlseg/lib/infers/volume.py) and the volume window (lib/window.py).

The three bundles' tiny variants are served from temporary copies with random-initialisation checkpoints; a
6-slice volume of 40 x 48 slices (rows != columns, so a transposed slice could not pass) is segmented by the
batched path and by the older per-slice path (one MONAI Label bundle run per slice and prompt from a PNG).
"""

from __future__ import annotations

import logging
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "apps" / "vlseg"))

from lib import imageio  # noqa: E402
from lib.infers import volume as V  # noqa: E402
from lib.params import RequestError, resolve_prompts  # noqa: E402
from lib.window import VolumeWindow, WindowError, parse_window, window_from_conf, window_volume  # noqa: E402

LABELS = {"polyp": 1, "cyst": 2, "lesion": 3}
SHAPE = (40, 48, 6)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    import nibabel as nib

    root = tmp_path_factory.mktemp("volume_batching")
    rng = np.random.default_rng(0)
    vol = rng.normal(0.45, 0.05, SHAPE).astype(np.float32)
    vol[10:25, 12:30, 1:5] += 0.3  # a bright blob over several slices
    nib.save(nib.Nifti1Image(vol, np.diag([0.8, 0.8, 2.5, 1.0])), str(root / "vol.nii.gz"))
    hu = np.linspace(-400, 400, int(np.prod(SHAPE)), dtype=np.float32).reshape(SHAPE)
    nib.save(nib.Nifti1Image(hu, np.eye(4)), str(root / "ct.nii.gz"))
    return root


_TASKS: dict = {}


def task_for(name: str, work: Path):
    """The app's infer task for the tiny variant of bundles/<name> or of the test toy bundle (temporary copy,
    random-init checkpoint)."""
    if name not in _TASKS:
        from lib.infers.text_bundle import TextBundleInferTask
        from vlseg.app_support.checkpoints import write_initial_checkpoint

        dst = work / "bundles" / name
        src = REPO / "tests" / "data" / "toy_bundle" if name == "toy" else REPO / "bundles" / name
        shutil.copytree(src, dst, symlinks=True, ignore=shutil.ignore_patterns(
            "*.pt", "*.ts", "runs", "eval", "__pycache__", "vlseg_checkpoint.json"))
        write_initial_checkpoint(dst, "tiny")
        _TASKS[name] = TextBundleInferTask(str(dst), {}, variant="tiny", label_names=LABELS)
    return _TASKS[name]


def run(task, path, prompts, ns, batch, seed=0, **kw):
    task.volume_batch = batch
    return task.predict(str(path), prompts, ns, seed, 2, extra={"device": "cpu", **kw.pop("extra", {})}, **kw)


def assert_same(a, b, atol=1e-5):
    assert a.mask.shape == b.mask.shape == SHAPE
    np.testing.assert_array_equal(a.mask, b.mask)
    np.testing.assert_allclose(a.uncertainty, b.uncertainty, atol=atol)
    assert set(a.maps) == set(b.maps)
    for k in a.maps:
        np.testing.assert_allclose(a.maps[k], b.maps[k], atol=atol)
    for pa, pb in zip(a.prompts, b.prompts):
        assert pa["foreground_pixels"] == pb["foreground_pixels"]


@pytest.mark.parametrize("name", ["uavls", "vilmedsam", "toy"])
def test_batched_equals_per_slice_and_writes_no_png(work, name, monkeypatch):
    """One pass (dropout off): batched slices give the per-slice path's mask and maps; no image file is written."""
    task = task_for(name, work)
    prompts = resolve_prompts({"label_prompt": [1, 2]}, LABELS, "lesion")
    old = run(task, work / "vol.nii.gz", prompts, 1, 0)
    saved = []
    monkeypatch.setattr("PIL.Image.Image.save", lambda self, *a, **k: saved.append(a))
    new = run(task, work / "vol.nii.gz", prompts, 1, 4)  # 6 slices: a batch of 4 and one of 2
    assert saved == []
    assert_same(old, new)
    assert new.window == {"mode": "percentile", "modality": None}
    # the per-slice postprocessing (stacking switched off) gives the same again
    monkeypatch.setattr(V, "channel_stackable", lambda post: False)
    assert_same(new, run(task, work / "vol.nii.gz", prompts, 1, 4), atol=1e-6)


def test_stochastic_passes_are_reproducible_and_match_per_slice_at_batch_1(work):
    """MedCLIPSeg samples noise in every pass: at batch 1 the batched path draws what the per-slice path draws;
    at batch 4 the draws depend on the batch, and the same seed gives the same maps again."""
    task = task_for("medclipseg", work)
    prompts = resolve_prompts({"text": "polyp"}, LABELS, "lesion")
    assert_same(run(task, work / "vol.nii.gz", prompts, 2, 0, seed=3), run(task, work / "vol.nii.gz", prompts, 2, 1,
                                                                         seed=3))
    a, b = (run(task, work / "vol.nii.gz", prompts, 2, 4, seed=3) for _ in range(2))
    assert_same(a, b, atol=0)
    assert float(a.maps["std"].max()) > 0  # the passes do differ


def test_folded_dropout_passes(work):
    """UA-VLS (MC dropout): FoldedPasses one pass per forward draws exactly what the inferer's loop draws; folded
    passes are reproducible with a seed, differ from each other and keep the [S, B, 1, H, W] layout."""
    from vlseg.inferers import sample_probabilities

    task = task_for("uavls", work)
    net = task._get_network("cpu", task.request_data({"device": "cpu"})[0])
    assert not hasattr(net, "sample_probabilities")
    x = torch.rand(2, 3, 64, 64)
    ids, mask = torch.randint(5, 100, (2, 24)), torch.ones(2, 24, dtype=torch.long)
    with torch.no_grad():
        torch.manual_seed(5)
        loop = sample_probabilities(net, x, ids, mask, num_samples=3)
        torch.manual_seed(5)
        one = V.FoldedPasses(net, max_rows=1).sample_probabilities(x, ids, mask, num_samples=3)
        torch.manual_seed(5)
        folded = V.FoldedPasses(net).sample_probabilities(x, ids, mask, num_samples=3)
        torch.manual_seed(5)
        again = V.FoldedPasses(net).sample_probabilities(x, ids, mask, num_samples=3)
    assert loop.shape == folded.shape == (3, 2, 1, 64, 64)
    torch.testing.assert_close(one, loop, atol=1e-6, rtol=0)
    torch.testing.assert_close(folded, again, atol=0, rtol=0)
    assert (folded[1] - folded[2]).abs().max() > 0
    # through the task: 3 passes batched, reproducible
    prompts = resolve_prompts({"text": "cyst"}, LABELS, "lesion")
    assert_same(run(task, work / "vol.nii.gz", prompts, 3, 4), run(task, work / "vol.nii.gz", prompts, 3, 4), atol=0)


class _CTDatastore:
    """Stands in for the DICOMweb datastore: image ``ct`` is a CT series with a saved label."""

    def __init__(self, image: Path, label: Path):
        self.image, self.label = image, label

    def get_image_info(self, image_id):
        return {"Modality": "CT"} if image_id == "ct" else {}

    def get_labeled_images(self):
        return ["ct"]

    def get_image_uri(self, image_id):
        return str(self.image)

    def get_label_uri(self, image_id, tag):
        return str(self.label)

    def get_label_info(self, image_id, tag):
        return {"text": "liver lesion"}


def test_ct_gets_the_fixed_hu_window_in_inference_and_training(work, monkeypatch, tmp_path):
    import nibabel as nib
    from PIL import Image

    from lib.trainset import build_text_datalist

    hu = np.asarray(nib.load(str(work / "ct.nii.gz")).dataobj, dtype=np.float32)
    ct8 = imageio.window_to_uint8(hu, (-160.0, 240.0))
    assert ct8[hu <= -160].max() == 0 and ct8[hu >= 240].min() == 255
    assert abs(int(ct8[np.abs(hu - 40) < 1].mean()) - 128) <= 1  # level 40 HU -> mid grey
    assert VolumeWindow().bounds("CT") == (-160.0, 240.0) and VolumeWindow().bounds("MR") is None
    label = tmp_path / "ct_label.nii.gz"
    lab = np.zeros(SHAPE, np.uint8)
    lab[5:20, 5:20, 2] = 1
    nib.save(nib.Nifti1Image(lab, np.eye(4)), str(label))
    ds = _CTDatastore(work / "ct.nii.gz", label)

    task = task_for("uavls", work)
    monkeypatch.setattr(task, "datastore", ds)
    seen = []
    real = V.slice_item
    monkeypatch.setattr(V, "slice_item", lambda loader, sl, name: seen.append(sl.copy()) or real(loader, sl, name))
    prompts = resolve_prompts({"text": "lesion"}, LABELS, "lesion")
    pred = run(task, work / "ct.nii.gz", prompts, 1, 4, extra={"vlseg_image_id": "ct"})
    assert pred.window == {"mode": "ct", "modality": "CT", "lo": -160.0, "hi": 240.0}
    assert len(seen) == SHAPE[2] and all(np.array_equal(s, ct8[:, :, k]) for k, s in enumerate(seen))
    # a NIfTI without modality: the percentile window, unless the request asks for ct or a fixed window
    assert run(task, work / "ct.nii.gz", prompts, 1, 4).window["mode"] == "percentile"
    w = task.parse_request({"text": "lesion", "window": "-100,100"})["window"]
    assert run(task, work / "ct.nii.gz", prompts, 1, 4, window=w).window == {
        "mode": "fixed", "modality": None, "lo": -100.0, "hi": 100.0}
    # training cuts the saved label's slices with the same window
    items, warnings = build_text_datalist(ds, tmp_path / "masks", axis=2)
    assert [it["text"] for it in items] == ["liver lesion"] and not warnings
    np.testing.assert_array_equal(np.asarray(Image.open(items[0]["image"])), ct8[:, :, 2])
    items, _ = build_text_datalist(ds, tmp_path / "masks2", axis=2, window=parse_window("percentile"))
    np.testing.assert_array_equal(np.asarray(Image.open(items[0]["image"])), window_volume(hu)[0][:, :, 2])


@pytest.mark.parametrize("conf, fragment", [
    ({"volume_window": "soft"}, "volume_window must be one of auto, percentile, ct or two numbers"),
    ({"ct_window": "240,-160"}, "ct_window needs finite lo < hi"),
    ({"ct_window": "wide"}, "ct_window must be two numbers 'lo,hi'"),
    ({"volume_window": "1,2,3"}, "volume_window must be two numbers"),
])
def test_bad_window_config_is_a_clear_error(conf, fragment):
    with pytest.raises(WindowError, match=fragment):
        window_from_conf(conf)


def test_bad_request_window_and_volume_batch(work):
    task = task_for("uavls", work)
    with pytest.raises(RequestError, match="window must be one of") as e:
        task.parse_request({"text": "lesion", "window": "bone"})
    assert e.value.status == 422
    assert window_from_conf({"volume_window": " CT ", "ct_window": "-1000, 400"}).bounds(None) == (-1000.0, 400.0)
    for bad in ("-1", "eight"):
        with pytest.raises(ValueError, match="volume_batch must be an integer >= 0"):
            V.volume_batch_from_conf({"volume_batch": bad})
    assert V.volume_batch_from_conf({}) == 8 and V.volume_batch_from_conf({"volume_batch": "0"}) == 0


def test_progress_is_logged_for_long_volumes(work, caplog):
    task = task_for("uavls", work)
    prompts = resolve_prompts({"label_prompt": [1, 2]}, LABELS, "lesion")
    calls = []
    task.volume_log_every, task.volume_batch = 4, 2
    try:
        with caplog.at_level(logging.INFO, logger="lib.infers.volume"):
            V.predict_volume(task, str(work / "vol.nii.gz"), prompts, 1, 0, 2, {"device": "cpu"}, VolumeWindow(),
                             progress=lambda done, total: calls.append((done, total)))
    finally:
        task.volume_log_every = 25
    lines = [r.getMessage() for r in caplog.records if "slices x prompts" in r.getMessage()]
    assert calls[-1] == (12, 12) and len(calls) >= 3 and [c[0] for c in calls] == sorted(c[0] for c in calls)
    assert len(lines) == len(calls) and "12/12 slices x prompts" in lines[-1]


def test_preprocessing_that_cannot_be_split_is_refused_with_the_fix():
    from monai.transforms import ConcatItemsd, EnsureChannelFirstd, LoadImaged

    load = LoadImaged(keys="image", reader="PILReader")
    loader, image_ts, text_ts = V.split_preprocessing([load, EnsureChannelFirstd(keys="image")], "image")
    assert loader is load and len(image_ts) == 1 and text_ts == []
    with pytest.raises(V.VolumeBatchError, match="volume_batch 0"):
        V.split_preprocessing([load, ConcatItemsd(keys=["image", "text"], name="both")], "image")
    with pytest.raises(V.VolumeBatchError, match="PILReader"):
        V.split_preprocessing([LoadImaged(keys="image", reader="NibabelReader")], "image")
