"""Real viewers end to end: Orthanc (DICOMweb) + the vlseg MONAI Label app + OHIF v3 in headless Chromium.

Everything is started by this module, on loopback ports, in temporary folders:

1. the demo data (two 64x64 volumes, two 64x64 RGB images) is converted to DICOM and uploaded to a fresh Orthanc
   with its DICOMweb plugin by ``scripts/dicom_demo.py`` (a CT-like series per volume, cut to 4 slices, and one
   secondary-capture instance per image);
2. the three bundles (uavls, medclipseg, vilmedsam; ``tiny`` variants) are served by ``monailabel start_server
   --studies http://127.0.0.1:<port>/dicom-web``. medclipseg and vilmedsam keep untrained weights (serving only
   needs weights that fit; untrained medclipseg marks most voxels, which the OHIF check wants to see). uavls, the
   active-learning scoring model, is trained briefly (4 epochs at a constant learning rate of 0.01 on the demo
   training split, about 30 s, in parallel with Orthanc's start): untrained, every pixel's foreground probability
   is about 0.5, every image scores the maximal uncertainty 1.0 and "most uncertain" is a tie; trained this much,
   the image scores spread over about 0.7-0.8, so "next sample = the most uncertain study" is a real check;
3. OHIF v3 (MONAI Label's own build, served at ``/ohif/``) is driven by Selenium in the system Chromium: study list
   from Orthanc, the MONAI Label mode, the MONAI Label panel's model list, a class-prompt segmentation that must
   land in OHIF's labelmap voxel for voxel as the server computed it, and the panel's *Next Sample* action;
4. 3D Slicer's calls (``MONAILabelClient``: info, infer with params, save label, next sample, train) on the same
   DICOMweb datastore.

Skips (with the reason) only where Orthanc / its DICOMweb plugin, or Chromium / chromedriver / selenium, are not
installed (``bash scripts/install_viewer_deps.sh`` installs them on Debian). ``VLSEG_UPDATE_DOCS_SCREENSHOT=1``
also copies the viewer screenshot to ``docs/img/ohif_vlseg.png`` (the README's picture).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
APP = REPO / "apps" / "vlseg"
MODELS = ("medclipseg", "uavls", "vilmedsam")
SCORING_MODEL = "uavls"  # briefly trained (module docstring); the others stay untrained
OHIF_MODEL = "medclipseg"  # untrained: marks most voxels, so OHIF has a labelmap to draw
MIN_SCORE_SPREAD = 0.02  # max - min of the image scores (observed: about 0.05-0.08)
SLICES = 4
LABELS = {"polyp": 1, "cyst": 2, "lesion": 3}
# what OHIF's MONAI Label panel sends with every infer (extensions/monai-label MonaiLabelClient.infer)
OHIF_PARAMS = {"result_extension": ".nrrd", "result_dtype": "uint8", "result_compress": False,
               "restore_label_idx": False}
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1600,1000",
                 "--disable-dev-shm-usage",  # containers often have a small /dev/shm
                 # WebGL through SwiftShader: OHIF's MPR viewports need it; headless Chromium has no GPU here
                 "--use-angle=swiftshader", "--enable-unsafe-swiftshader"]

requests = pytest.importorskip("requests")

from vlseg.dicom.orthanc import orthanc_missing, start_orthanc, stop_orthanc  # noqa: E402

pytestmark = pytest.mark.timeout(900)


def _real_bundles() -> list[Path]:
    return [REPO / "bundles" / m for m in MODELS if (REPO / "bundles" / m / "configs" / "tiny.json").is_file()]


# ----------------------------------------------------------------------------------------------------------------
# conversions the viewer path relies on (no Orthanc, no browser)
# ----------------------------------------------------------------------------------------------------------------
def test_ct_series_layout_through_monai_label_conversion(tmp_path):
    """vol[:, :, k] -> DICOM rows x columns -> MONAI Label's SimpleITK NIfTI: array axes (column, row, slice), slices
    ascending along the normal. The app's NRRD writer and uncertainty series depend on exactly this."""
    import nibabel as nib
    from monailabel.datastore.utils.convert import dicom_to_nifti

    from vlseg.dicom.convert import save, volume_to_ct_series

    rng = np.random.default_rng(0)
    vol = rng.uniform(0, 1.5, size=(12, 9, 5)).astype(np.float32)  # rows != cols != slices
    series = volume_to_ct_series(vol, name="layout-test", patient_id="P1")
    assert volume_to_ct_series(vol, name="layout-test", patient_id="P1")[0].SOPInstanceUID == series[0].SOPInstanceUID
    files = save(series[::-1], tmp_path / "dcm")  # written in reverse: the reader must sort by position
    out = np.asarray(nib.load(dicom_to_nifti(str(files[0].parent))).dataobj)
    hu = np.rint(vol * 1000) - 1024
    assert out.shape == (9, 12, 5)
    np.testing.assert_allclose(out.transpose(1, 0, 2), hu)


def test_dicom_series_gives_the_model_the_demo_slices(tmp_path):
    """The DICOMweb datastore's conversion (MONAI Label's SimpleITK NIfTI, then ``swap_row_column_axes``) serves a
    volume whose slices ``vol[:, :, k]`` -- what the app's infer task cuts and hands to the 2D bundles -- are the
    demo volume's slices in the same orientation (rows = array axis 0), and voxels keep their place in space."""
    import nibabel as nib
    from monailabel.datastore.utils.convert import dicom_to_nifti

    from vlseg.data.demo import generate_demo_dataset
    from vlseg.dicom.convert import save, swap_row_column_axes, volume_to_ct_series

    sys.path.insert(0, str(APP))
    try:
        from lib.imageio import load_volume, window_to_uint8
    finally:
        sys.path.remove(str(APP))
    demo = tmp_path / "demo"
    generate_demo_dataset(demo, seed=1, n_images=(1, 0, 0), image_size=64, n_volumes=1, volume_shape=(80, 64, 8))
    src = demo / json.loads((demo / "datalist.json").read_text())["volumes"][0]["image"]
    ref, demo_vol = load_volume(str(src))
    assert demo_vol.shape == (80, 64, 8)  # rows != columns: a transposed slice could not pass
    files = save(volume_to_ct_series(demo_vol, name="orient-test", patient_id="P3"), tmp_path / "dcm")
    served = swap_row_column_axes(dicom_to_nifti(str(files[0].parent)), tmp_path / "served.nii.gz")
    img, vol = load_volume(served)
    hu = np.rint(demo_vol.astype(np.float64) * 1000) - 1024  # the CT series stores round(v * 1000) - 1024 HU
    assert vol.shape == demo_vol.shape
    for k in range(vol.shape[2]):
        np.testing.assert_allclose(vol[:, :, k], hu[:, :, k])
    # ... and the 8-bit slices the bundles get are the demo volume's 8-bit slices (same window, same orientation)
    assert np.array_equal(window_to_uint8(vol), window_to_uint8(hu))
    # same place in space: voxel (r, c, k) sits where SimpleITK's voxel (c, r, k) sits
    itk = nib.load(dicom_to_nifti(str(files[0].parent)))
    np.testing.assert_allclose(img.affine @ [5, 7, 2, 1], itk.affine @ [7, 5, 2, 1])
    np.testing.assert_allclose(np.asarray(itk.dataobj)[7, 5, 2], vol[5, 7, 2])
    # its own inverse
    back = nib.load(swap_row_column_axes(served, tmp_path / "back.nii.gz"))
    np.testing.assert_allclose(back.affine, itk.affine)
    assert np.array_equal(np.asarray(back.dataobj), np.asarray(itk.dataobj))


def test_nrrd_label_layout_and_uncertainty_series(tmp_path):
    sys.path.insert(0, str(APP))
    try:
        from lib.imageio import write_nrrd_uint8
    finally:
        sys.path.remove(str(APP))
    from vlseg.dicom.convert import sort_slices, uncertainty_series, volume_to_ct_series

    mask = np.zeros((12, 9, 5), np.uint8)  # the served grid (row, column, slice) of a 12-row, 9-column series
    mask[7, 2, 3] = 1
    mask[0, 8, 0] = 3
    # the served NIfTI's affine: SimpleITK's diag(-1, -1, 2.5) (LPS identity) with columns 0 and 1 exchanged
    affine = np.array([[0.0, -1, 0, 0], [-1, 0, 0, 0], [0, 0, 2.5, 0], [0, 0, 0, 1]])
    write_nrrd_uint8(mask, tmp_path / "m.nrrd", affine=affine)
    fields, data = _read_nrrd((tmp_path / "m.nrrd").read_bytes())
    assert fields["sizes"] == "9 12 5" and fields["space directions"] == "(1,0,0) (0,1,0) (0,0,2.5)"
    assert np.array_equal(data, mask.transpose(2, 0, 1))  # x (column) fastest: OHIF's labelmap order
    assert data[3, 7, 2] == 1 and data[0, 0, 8] == 3
    write_nrrd_uint8(mask[:, :, 0], tmp_path / "m2.nrrd", layout="2d")  # a [row, col] image
    fields, data = _read_nrrd((tmp_path / "m2.nrrd").read_bytes())
    assert fields["sizes"] == "9 12 1" and data[0, 0, 8] == 3

    src = volume_to_ct_series(np.zeros((12, 9, 5), np.float32), name="unc-test", patient_id="P2")
    u = np.linspace(0, 1, 12 * 9 * 5).reshape(12, 9, 5)
    ser = uncertainty_series(src[::-1], u, series_key="k", description="uavls 'polyp'")
    assert len({d.SeriesInstanceUID for d in ser}) == 1 and ser[0].StudyInstanceUID == src[0].StudyInstanceUID
    for k, (d, s) in enumerate(zip(ser, sort_slices(src))):
        assert d.ImagePositionPatient == s.ImagePositionPatient and d.FrameOfReferenceUID == s.FrameOfReferenceUID
        assert d.SourceImageSequence[0].ReferencedSOPInstanceUID == s.SOPInstanceUID
        assert np.array_equal(np.frombuffer(d.PixelData, "<u2").reshape(12, 9), np.rint(u[:, :, k] * 1000))
    assert ser[0].SeriesDescription == "vlseg uncertainty uavls 'polyp'" and ser[0].Modality == "OT"
    with pytest.raises(ValueError, match="slices"):
        uncertainty_series(src, u[:, :, :3], series_key="k", description="x")


# ----------------------------------------------------------------------------------------------------------------
# the stack: Orthanc + uploaded demo DICOM + the app over DICOMweb
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    why = orthanc_missing()
    if why:
        pytest.skip(f"viewer end-to-end: {why} (bash scripts/install_viewer_deps.sh)")
    if len(_real_bundles()) != len(MODELS):
        pytest.skip(f"viewer end-to-end: bundles {MODELS} with configs/tiny.json not all present")
    from vlseg.app_support.server import start_server, stop_server
    from vlseg.data.demo import generate_demo_dataset

    t0 = time.time()
    root = tmp_path_factory.mktemp("viewer_e2e")
    generate_demo_dataset(root / "demo", seed=0, n_images=(4, 1, 2), image_size=64, n_volumes=2,
                          volume_shape=(64, 64, 8))

    # tiny checkpoints in a copy of the bundles, while Orthanc starts and gets the data: untrained ones (one
    # subprocess) and the briefly trained scoring model (another; module docstring)
    bundles = root / "bundles"
    for src in _real_bundles():
        shutil.copytree(src, bundles / src.name, symlinks=True, ignore=shutil.ignore_patterns(
            "*.pt", "*.ts", "runs", "eval", "__pycache__", "vlseg_checkpoint.json", "monailabel_train.json"))
    ckpt_cmd = [sys.executable, "-m", "vlseg.app_support.checkpoints", "--variant", "tiny", "--random-init"]
    for b in MODELS:
        if b != SCORING_MODEL:
            ckpt_cmd += ["--bundle", str(bundles / b)]
    ckpt_log = open(root / "checkpoints.log", "w")
    ckpt = subprocess.Popen(ckpt_cmd, stdout=ckpt_log, stderr=subprocess.STDOUT, cwd=str(REPO))
    train_code = ("import sys; from vlseg.app_support.checkpoints import ensure_checkpoint; "
                  "ensure_checkpoint(sys.argv[1], 'tiny', sys.argv[2], max_epochs=4, force=True, log_path=sys.argv[3], "
                  "overrides={'learning_rate': 0.01, 'min_learning_rate': 0.01, 'val_interval': 100})")
    train_log = open(root / "scoring_model_train.log", "w")
    t_train = time.time()
    train = subprocess.Popen([sys.executable, "-c", train_code, str(bundles / SCORING_MODEL),
                              str(root / "demo" / "datalist.json"), str(root / "scoring_model_bundle_train.log")],
                             stdout=train_log, stderr=subprocess.STDOUT, cwd=str(REPO))

    orthanc = start_orthanc(root / "orthanc")
    server = None
    try:
        up = subprocess.run([sys.executable, str(REPO / "scripts" / "dicom_demo.py"),
                             "--datalist", str(root / "demo" / "datalist.json"), "--out", str(root / "dicom"),
                             "--images", "2", "--max-slices", str(SLICES), "--upload", orthanc.dicomweb],
                            capture_output=True, text=True, timeout=300, cwd=str(REPO))
        assert up.returncode == 0, up.stdout + up.stderr
        manifest = json.loads((root / "dicom" / "manifest.json").read_text())
        assert ckpt.wait(timeout=600) == 0, (root / "checkpoints.log").read_text()[-3000:]
        ckpt_log.close()
        assert train.wait(timeout=600) == 0, (root / "scoring_model_train.log").read_text()[-3000:]
        train_log.close()
        print(f"\n[viewer_e2e] {SCORING_MODEL} trained in {time.time() - t_train:.0f}s (wall, from its start)")

        app = root / "app"
        shutil.copytree(APP, app, ignore=shutil.ignore_patterns("model", "logs", "bin", "__pycache__"))
        # the demo series hold MR-like grey values stored as CT: the percentile window, not the CT soft-tissue one
        conf = {"bundles_dir": bundles, "variant": "tiny", "scoring_model": SCORING_MODEL, "scoring_samples": 2,
                "scoring_prompts": "default", "train_epochs": 1, "volume_window": "percentile"}
        t1 = time.time()
        server = start_server(app, orthanc.dicomweb, conf, log_path=root / "server.log", timeout=300, env={
            "MONAI_LABEL_AUTO_UPDATE_SCORING": "false", "MONAI_LABEL_SESSIONS": "false",
            "MONAI_LABEL_DICOMWEB_CACHE_PATH": str(root / "dicomweb_cache")})
        print(f"\n[viewer_e2e] set-up {time.time() - t0:.0f}s (server start {time.time() - t1:.0f}s); "
              f"Orthanc {orthanc.url}, server {server.url}")
        yield {"root": root, "orthanc": orthanc, "server": server, "url": server.url, "manifest": manifest,
               "demo": root / "demo"}
    finally:
        if server is not None:
            stop_server(server)
        stop_orthanc(orthanc)
        for proc, log in ((ckpt, ckpt_log), (train, train_log)):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            if not log.closed:
                log.close()


def _vol(stack, i=0) -> dict:
    return stack["manifest"]["volumes"][i]


def _img(stack, i=0) -> dict:
    return stack["manifest"]["images"][i]


def _qido(stack, path: str, **params) -> list[dict]:
    r = requests.get(f"{stack['orthanc'].dicomweb}/{path}", params=params, timeout=30)
    assert r.status_code in (200, 204), r.text
    return r.json() if r.content else []


def _v(item: dict, tag: str):
    v = item.get(tag, {}).get("Value")
    return v[0] if v else None


def _series_of_study(stack, study_uid: str) -> list[dict]:
    return _qido(stack, f"studies/{study_uid}/series", includefield=["SeriesDescription", "Modality",
                                                                       "NumberOfSeriesRelatedInstances"])


def _read_nrrd(data: bytes) -> tuple[dict, np.ndarray]:
    head, _, raw = data.partition(b"\n\n")
    fields = dict(line.split(": ", 1) for line in head.decode().splitlines()[1:] if ": " in line)
    sizes = [int(s) for s in fields["sizes"].split()]
    assert fields["type"] == "uint8" and fields["encoding"] == "raw", fields
    return fields, np.frombuffer(raw, np.uint8).reshape(sizes[::-1])  # [z, y, x], x fastest


def _ohif_infer(stack, model: str, series: str, params: dict) -> bytes:
    """POST /infer exactly as OHIF's MONAI Label panel does (multipart form field ``params``, output=image)."""
    r = requests.post(f"{stack['url']}/infer/{model}", params={"image": series, "output": "image"},
                      files={"params": (None, json.dumps({**params, **OHIF_PARAMS}))}, timeout=300)
    assert r.status_code == 200, (r.status_code, r.text[:500], stack["server"].log_tail())
    return r.content


def _click(driver, element) -> None:
    """Click a panel control as the page would, after scrolling it into view. The MONAI Label panel's accordion
    animates and its tooltips can lie over a control for a moment; WebDriver's pointer click then lands on that
    overlay ("element click intercepted") although a user's click a moment later would not."""
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'}); arguments[0].click()", element)


def _datastore(stack) -> dict:
    r = requests.get(f"{stack['url']}/datastore/", params={"output": "all"}, timeout=30)
    assert r.status_code == 200
    return r.json()["objects"]


def _retrieve_series(stack, study: str, series: str) -> list:
    """Every instance of a series, through WADO-RS (dicomweb-client, as MONAI Label fetches them)."""
    from dicomweb_client.api import DICOMwebClient

    from vlseg.dicom.convert import sort_slices

    return sort_slices(DICOMwebClient(url=stack["orthanc"].dicomweb).retrieve_series(study, series))


# ----------------------------------------------------------------------------------------------------------------
# DICOM in Orthanc
# ----------------------------------------------------------------------------------------------------------------
def test_demo_dicom_is_in_orthanc(stack):
    import nibabel as nib

    studies = _qido(stack, "studies")
    assert len(studies) == 4
    vol = _vol(stack)
    ct = _series_of_study(stack, vol["StudyInstanceUID"])
    assert [(_v(s, "00080060"), _v(s, "00201209")) for s in ct] == [("CT", SLICES)]
    # pixel round trip: WADO-RS instance k = demo volume slice vol[:, :, first + k] (stored = round(v * 1000))
    source = np.asarray(nib.load(vol["source"]).dataobj, dtype=np.float64)
    instances = _retrieve_series(stack, vol["StudyInstanceUID"], vol["SeriesInstanceUID"])
    assert len(instances) == SLICES
    for k, ds in enumerate(instances):
        expected = np.clip(np.rint(source[:, :, vol["first_slice"] + k] * 1000), 0, 65535)
        assert np.array_equal(ds.pixel_array, expected.astype(np.uint16))
    z = [float(ds.ImagePositionPatient[2]) for ds in instances]
    assert z == sorted(z) and len(set(z)) == SLICES
    # the 2D image: an RGB secondary capture with the PNG's pixels
    from PIL import Image

    img = _img(stack)
    (sc,) = _retrieve_series(stack, img["StudyInstanceUID"], img["SeriesInstanceUID"])
    assert sc.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7" and sc.SamplesPerPixel == 3
    assert np.array_equal(sc.pixel_array, np.asarray(Image.open(img["source"]).convert("RGB")))


def test_served_series_slices_are_the_demo_slices(stack, tmp_path):
    """The image the app's tasks read for a CT series (``GET /datastore/image``: the DICOMweb datastore's NIfTI)
    has the demo volume's slices in the demo orientation: ``vol[:, :, k]`` (what the infer task cuts and gives the
    2D bundles) = demo ``vol[:, :, first + k]`` in HU, rows on array axis 0 as in the DICOM frames and in OHIF."""
    import nibabel as nib

    sys.path.insert(0, str(APP))
    try:
        from lib.imageio import load_volume
    finally:
        sys.path.remove(str(APP))
    for vol in stack["manifest"]["volumes"]:
        r = requests.get(f"{stack['url']}/datastore/image", params={"image": vol["SeriesInstanceUID"]}, timeout=60)
        assert r.status_code == 200, r.text[:300]
        path = tmp_path / f"{vol['name']}.nii.gz"
        path.write_bytes(r.content)
        _, served = load_volume(str(path))
        source = np.asarray(nib.load(vol["source"]).dataobj, dtype=np.float64)
        first = vol["first_slice"]
        assert served.shape == (64, 64, SLICES)
        for k in range(SLICES):
            expected = np.rint(source[:, :, first + k] * 1000) - 1024
            assert np.array_equal(served[:, :, k], expected), (vol["name"], k)
            assert not np.array_equal(served[:, :, k], expected.T)  # not symmetric: the check has teeth
    info = _datastore(stack)[stack["manifest"]["volumes"][0]["SeriesInstanceUID"]]["image"]["info"]
    assert info["vlseg_array_axes"] == "row,column,slice"


def test_app_lists_the_dicomweb_series(stack):
    info = requests.get(f"{stack['url']}/info/", timeout=30).json()
    assert sorted(info["models"]) == sorted(MODELS) and not info["vlseg"]["skipped"]
    assert info["labels"] == ["polyp", "cyst", "lesion"]  # a list: OHIF's panel appends to it
    assert info["datastore"]["total"] == 4  # 2 CT series + 2 secondary captures (CT-only was MONAI's default)
    assert set(info["strategies"]) == {"uncertainty", "diverse", "random", "first", "monai_random"}
    assert info["strategies"]["random"]["description"].startswith("Most uncertain")


# ----------------------------------------------------------------------------------------------------------------
# OHIF-style inference on Orthanc studies, each bundle; uncertainty as a DICOM series
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model", MODELS)
def test_ohif_class_prompt_infer_returns_nrrd_and_an_uncertainty_series(stack, model):
    import nibabel as nib

    vol = _vol(stack)
    fields, mask = _read_nrrd(_ohif_infer(stack, model, vol["SeriesInstanceUID"], {"label_prompt": [2]}))
    assert mask.shape == (SLICES, 64, 64)
    assert set(np.unique(mask)) <= {0, 2}  # the class id of "cyst", as the panel maps it back
    assert fields["space"] == "left-posterior-superior"

    # the map stays in the datastore (tag "uncertainty") ...
    r = requests.get(f"{stack['url']}/datastore/label", params={"label": vol["SeriesInstanceUID"],
                                                                "tag": "uncertainty"}, timeout=30)
    assert r.status_code == 200
    path = Path(tempfile.mkdtemp()) / "u.nii.gz"
    path.write_bytes(r.content)
    u = np.asarray(nib.load(str(path)).dataobj, dtype=np.float32)
    assert u.shape == (64, 64, SLICES) and 0.0 <= u.min() and u.max() <= 1.0
    info = _datastore(stack)[vol["SeriesInstanceUID"]]["labels"]["uncertainty"]["info"]
    assert info["model"] == model and info["prompt"] == "cyst"

    # ... and is published to Orthanc as a derived series of the same study, one instance per slice
    series = {_v(s, "0020000E"): s for s in _series_of_study(stack, vol["StudyInstanceUID"])}
    unc_uid = info["SeriesInstanceUID"]
    assert unc_uid in series
    assert _v(series[unc_uid], "0008103E") == f"vlseg uncertainty {model} 'cyst'"
    assert _v(series[unc_uid], "00080060") == "OT" and _v(series[unc_uid], "00201209") == SLICES
    instances = _retrieve_series(stack, vol["StudyInstanceUID"], unc_uid)
    ct = _retrieve_series(stack, vol["StudyInstanceUID"], vol["SeriesInstanceUID"])
    for k, (ds, src) in enumerate(zip(instances, ct)):
        assert ds.FrameOfReferenceUID == src.FrameOfReferenceUID
        assert list(ds.ImagePositionPatient) == list(src.ImagePositionPatient)
        assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
        # the served grid (row, column, slice) = DICOM rows x columns, pixel value = u * 1000
        np.testing.assert_allclose(ds.pixel_array / 1000.0, u[:, :, k], atol=6e-4)


def test_secondary_capture_2d_with_free_text(stack):
    img = _img(stack)
    r = requests.post(f"{stack['url']}/infer/uavls", params={"image": img["SeriesInstanceUID"], "output": "json"},
                      files={"params": (None, json.dumps({"text": "bright round polyp", "num_samples": 2}))},
                      timeout=120)
    assert r.status_code == 200, r.text[:500]
    out = r.json()
    assert out["kind"] == "2d" and out["shape"] == [64, 64] and out["prompt"] == "bright round polyp"
    assert out["uncertainty"]["stored"] is True
    series = {_v(s, "0020000E"): s for s in _series_of_study(stack, img["StudyInstanceUID"])}
    assert out["uncertainty"]["dicom_series"] in series
    assert _v(series[out["uncertainty"]["dicom_series"]], "00201209") == 1
    # the uncertainty series are not images of the datastore (never segmented or scored themselves)
    info = requests.get(f"{stack['url']}/info/", timeout=30).json()
    assert info["datastore"]["total"] == 4


# ----------------------------------------------------------------------------------------------------------------
# active learning (scoring once for the module)
# ----------------------------------------------------------------------------------------------------------------
def _wait_task(stack, kind: str, timeout: float = 300) -> dict:
    t0 = time.time()
    while time.time() - t0 < timeout:
        st = requests.get(f"{stack['url']}/{kind}/", timeout=30).json()
        if st.get("status") not in ("RUNNING", "SUBMITTED"):
            return st
        time.sleep(1.0)
    raise AssertionError(f"{kind} still running after {timeout:.0f} s:\n{stack['server'].log_tail()}")


@pytest.fixture(scope="module")
def scored(stack):
    r = requests.post(f"{stack['url']}/scoring/uncertainty", timeout=30)
    assert r.status_code == 200, r.text
    st = _wait_task(stack, "scoring")
    assert st.get("status") == "DONE", st
    return True


def _expected_next(stack) -> str:
    """The unlabelled series with the highest ``vlseg_uncertainty_top5`` that the scoring task stored in the
    datastore's image info -- after checking that the scores really tell the images apart (distinct values, spread
    over at least ``MIN_SCORE_SPREAD``), so the answer is the argmax and not a tie rule."""
    objects = _datastore(stack)
    unlabelled = {k: v["image"]["info"] for k, v in objects.items() if "final" not in v["labels"]}
    scores = {k: i.get("vlseg_uncertainty_top5") for k, i in unlabelled.items()}
    assert len(scores) >= 3 and all(isinstance(s, float) for s in scores.values()), scores
    assert all(unlabelled[k].get("vlseg_uncertainty_model") == SCORING_MODEL for k in scores), unlabelled
    print(f"\n[viewer_e2e] uncertainty scores (top5): {sorted(scores.values(), reverse=True)}")
    assert len(set(scores.values())) == len(scores), scores
    assert max(scores.values()) - min(scores.values()) > MIN_SCORE_SPREAD, scores
    return max(scores, key=scores.get)


# ----------------------------------------------------------------------------------------------------------------
# OHIF v3 in headless Chromium
# ----------------------------------------------------------------------------------------------------------------
def _chromium():
    missing = [p for p in ("chromium", "chromedriver") if not shutil.which(p)]
    if missing:
        pytest.skip(f"viewer end-to-end (browser): {' and '.join(missing)} not installed "
                    "(apt-get install chromium chromium-driver; bash scripts/install_viewer_deps.sh)")
    try:
        import selenium  # noqa: F401
    except ImportError:
        pytest.skip("viewer end-to-end (browser): the selenium package is not installed (requirements.txt)")
    from annotation_page import start_chromium

    return start_chromium(CHROMIUM_ARGS)


_LABELMAP_JS = """
const seg = window.services.segmentationService;
const vol = seg.getLabelmapVolume('1');
if (!vol) { return null; }
const a = vol.voxelManager.getCompleteScalarDataArray();
const s = seg.getSegmentation('1');
return {dims: vol.dimensions, data: Array.from(a),
        segments: Object.values((s && s.segments) || {}).filter(Boolean).map(x => [x.segmentIndex, x.label])};
"""


def test_ohif_study_list_monai_label_panel_class_prompt_and_next_sample(stack, scored, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    driver = _chromium()
    url = stack["url"]
    vol = _vol(stack, 1)
    shot = tmp_path / "ohif_vlseg.png"
    try:
        wait = WebDriverWait(driver, 90)
        body = lambda: driver.find_element(By.TAG_NAME, "body").text  # noqa: E731

        # 1. the study list comes from Orthanc through MONAI Label's DICOMweb proxy
        driver.get(f"{url}/ohif/")
        wait.until(lambda d: "Demo, vol_001" in body())
        for name in ("Demo, vol_000", "Demo, vol_001", "Demo, test_0000", "Demo, test_0001"):
            assert name in body()
        # the panel reads the server address from this cookie (default: <host>:8000)
        driver.execute_script("document.cookie = 'MONAILABEL_SERVER_URL=' + escape(arguments[0]) + '; path=/';",
                              url + "/")

        # 2. open the study: its row lists the modes; MONAI Label's mode is valid for CT
        driver.find_element(By.XPATH, "//*[text()='Demo, vol_001']").click()
        wait.until(lambda d: d.find_elements(By.XPATH, "//button[normalize-space()='MONAI Label']"))
        driver.find_element(By.XPATH, "//button[normalize-space()='MONAI Label']").click()
        wait.until(lambda d: "/ohif/monai-label" in d.current_url)
        assert vol["StudyInstanceUID"] in driver.current_url
        wait.until(lambda d: d.find_elements(By.ID, "monailabelServerURL"))
        for b in driver.find_elements(By.XPATH, "//button[normalize-space()='Confirm and Hide']"):
            b.click()
        wait.until(lambda d: "vlseg-demo-vol_001" in body())

        # 3. connect: the panel lists the product's models
        assert driver.find_element(By.ID, "monailabelServerURL").get_attribute("value") == url + "/"
        connect = driver.find_element(By.XPATH, "//input[@id='monailabelServerURL']/ancestor::tr//button")
        driver.execute_script("arguments[0].click()", connect)
        wait.until(lambda d: d.find_elements(By.XPATH, "//label[normalize-space()='Class Prompts']"))
        assert "vlseg - text-prompted segmentation with uncertainty" in body()
        xp = "//label[normalize-space()='{}']/following-sibling::div[contains(@class,'tab-content')]"
        for tab in ("Auto-Segmentation", "Class Prompts"):
            sel = driver.find_element(By.XPATH, xp.format(tab)).find_element(By.CSS_SELECTOR, "select.selectBox")
            assert sorted(o.get_attribute("value") for o in Select(sel).options) == sorted(MODELS)

        # 4. class prompt "polyp" with medclipseg; the app maps the class id to the word and returns an NRRD
        _click(driver, driver.find_element(By.XPATH, "//label[normalize-space()='Class Prompts']"))
        tab = driver.find_element(By.XPATH, xp.format("Class Prompts"))
        Select(tab.find_element(By.CSS_SELECTOR, "select.selectBox")).select_by_value(OHIF_MODEL)
        boxes = {r.find_elements(By.TAG_NAME, "td")[-1].text: r for r in tab.find_elements(By.CSS_SELECTOR,
                                                                                          "table.optionsTable tr")}
        assert {"polyp", "cyst", "lesion"} <= set(boxes)
        box = boxes["polyp"].find_element(By.CSS_SELECTOR, "input[type=checkbox]")
        _click(driver, box)
        assert box.is_selected()
        t0 = time.time()
        _click(driver, tab.find_element(By.XPATH, ".//button[normalize-space()='Run']"))
        WebDriverWait(driver, 240).until(lambda d: "Run Class Based Inference - Successful" in body()
                                         or "Failed to Run Class Based Inference" in body())
        assert "Run Class Based Inference - Successful" in body()
        infer_s = time.time() - t0
        time.sleep(1.0)  # let the viewport render the labelmap

        # 5. page state: OHIF's labelmap holds the server's mask voxel for voxel, under the panel's "polyp" segment
        state = driver.execute_script(_LABELMAP_JS)
        assert state is not None, "OHIF has no labelmap volume after the inference"
        segments = {label: idx for idx, label in state["segments"]}
        assert {"polyp", "cyst", "lesion"} <= set(segments)
        labelmap = np.asarray(state["data"], np.uint8).reshape(state["dims"][::-1])
        _, expected = _read_nrrd(_ohif_infer(stack, OHIF_MODEL, vol["SeriesInstanceUID"], {"label_prompt": [1]}))
        assert expected.any(), "the model segmented nothing: nothing to show"
        assert labelmap.shape == expected.shape
        assert set(np.unique(labelmap)) <= {0, segments["polyp"]}
        assert np.array_equal(labelmap == segments["polyp"], expected == 1)
        driver.save_screenshot(str(shot))

        # 6. active learning: the panel's Next Sample gives the most uncertain series. (This panel build always
        # requests strategy "random" -- its strategy selector has no change handler -- so for DICOMweb studies
        # the app answers "random" with the most-uncertain strategy; README, --conf ohif_next_sample.)
        _click(driver, driver.find_element(By.XPATH, "//label[normalize-space()='Active Learning']"))
        al = driver.find_element(By.XPATH, xp.format("Active Learning"))
        Select(al.find_element(By.CSS_SELECTOR, "select.actionInput")).select_by_value("uncertainty")
        expected_next = _expected_next(stack)
        _click(driver, al.find_element(By.XPATH, ".//button[normalize-space()='Next Sample']"))
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".nextSampleForm"))
        form = driver.find_element(By.CSS_SELECTOR, ".nextSampleForm").text
        assert f"Series Instance UID {expected_next}" in form
        next_info = _datastore(stack)[expected_next]["image"]["info"]
        assert f"Study Instance UID {next_info['StudyInstanceUID']}" in form

        # 7. the uncertainty map is a series of the study: reopening the study lists it in OHIF's study browser
        viewer = driver.current_url
        driver.get(viewer)
        wait.until(lambda d: f"vlseg uncertainty {OHIF_MODEL} 'polyp'" in body())
        # ... and loads into the viewports on a double click (their overlays then name the series)
        before = body().count("vlseg uncertainty")
        from selenium.webdriver.common.action_chains import ActionChains

        thumb = driver.find_element(By.XPATH, "//*[@data-cy='study-browser-thumbnail']"
                                              f"[.//*[contains(text(), \"vlseg uncertainty {OHIF_MODEL} 'polyp'\")]]")
        ActionChains(driver).double_click(thumb).perform()
        wait.until(lambda d: body().count("vlseg uncertainty") > before)
        print(f"\n[viewer_e2e] OHIF class-prompt inference {infer_s:.1f}s; screenshot {shot}")
    except Exception:
        driver.save_screenshot(str(tmp_path / "failure.png"))
        logs = "\n".join(e["message"][:300] for e in driver.get_log("browser") if e["level"] in ("SEVERE",))
        print(f"[viewer_e2e] failure screenshot {tmp_path / 'failure.png'}\nbrowser errors:\n{logs}")
        raise
    finally:
        driver.quit()
    assert shot.stat().st_size > 10_000
    from PIL import Image

    with Image.open(shot) as im:
        a = np.asarray(im.convert("RGB"), dtype=np.int32)
    # the labelmap is drawn in the segment's colour (green for "polyp" in the panel's palette): many pixels where
    # green clearly dominates, which the grey CT alone never gives
    greenish = (a[:, :, 1] - np.maximum(a[:, :, 0], a[:, :, 2])) > 40
    assert greenish.sum() > 2000, greenish.sum()
    if os.environ.get("VLSEG_UPDATE_DOCS_SCREENSHOT") == "1":
        (REPO / "docs" / "img").mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, REPO / "docs" / "img" / "ohif_vlseg.png")


# ----------------------------------------------------------------------------------------------------------------
# 3D Slicer's path: the MONAILabel module's client calls, on the same DICOMweb datastore
# ----------------------------------------------------------------------------------------------------------------
def test_slicer_module_calls_on_dicomweb(stack, scored, tmp_path):
    import nibabel as nib
    from monailabel.client import MONAILabelClient

    c = MONAILabelClient(stack["url"], tmpdir=str(tmp_path))
    vol = _vol(stack, 0)
    series = vol["SeriesInstanceUID"]

    # info: models, their labels and the options table values (the text prompt lives there)
    info = c.info()
    assert set(MODELS) <= set(info["models"])
    assert info["models"]["uavls"]["labels"] == LABELS
    assert info["models"]["uavls"]["config"]["text"] == "polyp"

    # next sample (strategy "uncertainty") -> the most uncertain series, with its DICOM identifiers
    expected = _expected_next(stack)
    sample = c.next_sample("uncertainty", {})
    assert sample["id"] == expected and sample["StudyInstanceUID"] and sample["SeriesInstanceUID"] == expected
    assert sample["candidates"] == 1 and sample["score_key"] == "vlseg_uncertainty_top5"  # no tie to break
    assert sample["score"] == _datastore(stack)[expected]["image"]["info"]["vlseg_uncertainty_top5"]

    # infer with the options-table params (text prompt edited in the table)
    params = dict(info["models"]["uavls"]["config"], text="dark oval cyst", num_samples=2)
    result_file, out = c.infer("uavls", series, params)
    assert out["prompt"] == "dark oval cyst" and out["label_names"] == {"dark oval cyst": 1}
    seg = nib.load(result_file)
    assert seg.shape == (64, 64, SLICES)

    # save label: the module exports the (edited) segmentation as NIfTI with the segment names in label_info
    demo_label = sorted(Path(vol["source"]).parent.parent.glob(f"volume_labels/{vol['name']}_obj*.nii.gz"))[0]
    obj = np.asarray(nib.load(str(demo_label)).dataobj)[:, :, vol["first_slice"]:vol["first_slice"] + SLICES]
    label = (obj > 0).astype(np.uint8)  # demo [row, col, k] = the served image's grid (row, column, k)
    assert label.any()
    label_path = tmp_path / "label.nii.gz"
    nib.save(nib.Nifti1Image(label, seg.affine), str(label_path))
    saved = c.save_label(series, str(label_path), tag="final",
                         params={"label_info": [{"name": "polyp", "idx": 1}]})
    assert saved
    # -> a DICOM SEG in Orthanc, referencing the CT series
    segs = [s for s in _series_of_study(stack, vol["StudyInstanceUID"]) if _v(s, "00080060") == "SEG"]
    assert len(segs) == 1
    (seg_ds,) = _retrieve_series(stack, vol["StudyInstanceUID"], _v(segs[0], "0020000E"))
    assert seg_ds.ReferencedSeriesSequence[0].SeriesInstanceUID == series
    assert seg_ds.SegmentSequence[0].SegmentLabel == "polyp"
    assert seg_ds.SegmentSequence[0].SegmentDescription == "polyp"  # the prompt travels in the SEG itself
    assert int(np.count_nonzero(seg_ds.pixel_array)) == int(label.sum())
    # frame by frame in the CT's orientation: each SEG frame (rows x columns as in the CT frames) = the label slice
    ct_z = [float(d.ImagePositionPatient[2]) for d in _retrieve_series(stack, vol["StudyInstanceUID"], series)]
    frames = seg_ds.pixel_array.reshape(-1, 64, 64)
    seen = np.zeros(SLICES, bool)
    for f, fg in zip(frames, seg_ds.PerFrameFunctionalGroupsSequence):
        k = ct_z.index(float(fg.PlanePositionSequence[0].ImagePositionPatient[2]))
        assert np.array_equal(f > 0, label[:, :, k] > 0), k
        seen[k] = True
    assert all(seen[k] for k in range(SLICES) if label[:, :, k].any())
    assert _datastore(stack)[series]["labels"]["final"]["info"]["label_info"] == [{"name": "polyp", "idx": 1}]
    assert c.next_sample("uncertainty", {})["id"] != series  # labelled now

    # train: server-side training from the DICOMweb datastore (the SEG + the saved segment name as prompt)
    before = info["models"]["uavls"]["vlseg"]["checkpoint"]["sha256"]
    c.train_start("uavls", {"max_epochs": 1})
    st = _wait_task(stack, "train", timeout=400)
    assert st.get("status") == "DONE", (st, stack["server"].log_tail())
    after = c.info()["models"]["uavls"]["vlseg"]["checkpoint"]["sha256"]
    assert after != before
