"""The 2D annotation page (``/vlseg/``, apps/vlseg/web/annotate) in headless Chromium against a real app server.

One ``monailabel start_server`` serves the page: the ``tiny`` uavls twice (``uavls`` trained for 4 epochs while
the server starts, ``uavls_untrained`` with random weights; see :func:`make_bundles`), a studies folder of four
64x64 demo images and one 3-slice demo volume. Selenium drives the page as an annotator would:

* scoring from the page's *Score* button, then the work list must follow the stored scores (most uncertain first,
  all distinct) and *Next sample* (key N) must open their argmax;
* a free-text prompt (Enter) with each model, then the mask and the uncertainty heat map on the page's canvases
  must be the server's arrays pixel for pixel (mask: the infer answer for the same model, prompt and seed; map: the
  stored ``uncertainty`` label, through the page's colour table); for a volume also on the next slice (key Down);
  the other kind of image (2D / volume) is segmented and checked too;
* a brush stroke, then *Submit* (Ctrl+S): the datastore holds the label with its prompt, equal to the edited mask
  and outside the stroke to the server's mask; the next sample is then the argmax of the remaining scores;
* bad input: an empty prompt, a 2,000-character prompt (the server's 422) and a stopped server each show a clear
  message, and the edit stays on the canvas and in the page's draft (localStorage).

Skips (with the reason) only where Chromium / chromedriver / selenium are not installed
(``bash scripts/install_viewer_deps.sh``). ``VLSEG_UPDATE_DOCS_SCREENSHOT=1`` copies the page's screenshot (the
first model's segmentation of the first 2D image) to ``docs/img/annotate_page.png``. For that picture with trained weights:
``VLSEG_ANNOTATE_BUNDLES_DIR`` (a folder of bundles with their ``models/model.pt``, served as they are),
``VLSEG_ANNOTATE_MODELS`` (comma-separated subset, default all), ``VLSEG_ANNOTATE_VARIANT`` (default ``tiny``) and
``VLSEG_ANNOTATE_IMAGE_SIZE`` (demo image side, default 64).
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

import annotation_page as ui  # the page-side helpers (tests/annotation_page.py)

REPO = Path(__file__).resolve().parents[1]
APP = REPO / "apps" / "vlseg"
MODEL = "uavls"  # the tiny bundle served twice (make_bundles)
VARIANT = os.environ.get("VLSEG_ANNOTATE_VARIANT", "tiny")
PROMPT = "bright round polyp"

requests = pytest.importorskip("requests")
pytestmark = pytest.mark.timeout(600)


def make_studies(root: Path) -> Path:
    """Four demo images (validation and test split; 64x64, or VLSEG_ANNOTATE_IMAGE_SIZE) and one demo volume cut to
    3 slices, in a flat studies folder; the demo's training split (4 images) stays out, for the brief training."""
    import nibabel as nib

    from vlseg.data.demo import generate_demo_dataset

    size = int(os.environ.get("VLSEG_ANNOTATE_IMAGE_SIZE", "64"))
    generate_demo_dataset(root / "demo", seed=0, n_images=(4, 1, 3), image_size=size, n_volumes=1,
                          volume_shape=(48, 40, 6))
    studies = root / "studies"
    studies.mkdir()
    for split in ("validation", "test"):
        for png in sorted((root / "demo" / "images" / split).glob("*.png")):
            shutil.copy(png, studies / png.name)
    vol = sorted((root / "demo" / "volumes").glob("*.nii.gz"))[0]
    nib.save(nib.load(str(vol)).slicer[:, :, 2:5], str(studies / vol.name))
    return studies


def make_bundles(root: Path):
    """``(bundles folder, models to serve, training process or None)``.

    VLSEG_ANNOTATE_BUNDLES_DIR is served as it is (models: VLSEG_ANNOTATE_MODELS, default all). Otherwise two copies
    of the tiny bundle: ``MODEL`` and ``MODEL_untrained``, both given untrained weights so that the server can start
    at once, and ``MODEL`` trained briefly in a subprocess while the server starts (4 epochs at a constant learning
    rate of 0.01 on the demo training split, as tests/test_viewer_e2e.py does). The trained one scores the images
    (untrained, every image scores the maximal uncertainty 1.0 and "next sample = most uncertain" would be a tie
    rule) and its maps vary; the untrained one marks about half of the pixels, so its mask has both values. The
    server uses the new weights once written (MONAI Label reloads a checkpoint whose file time changed; scoring
    loads it afresh)."""
    given = os.environ.get("VLSEG_ANNOTATE_BUNDLES_DIR")
    if given:
        return Path(given).resolve(), os.environ.get("VLSEG_ANNOTATE_MODELS", ""), None
    from vlseg.app_support.checkpoints import write_initial_checkpoint
    from vlseg.bundles import CHECKPOINT_RECORD

    bundles = root / "bundles"
    for name in (MODEL, f"{MODEL}_untrained"):
        shutil.copytree(REPO / "bundles" / MODEL, bundles / name, symlinks=True, ignore=shutil.ignore_patterns(
            "*.pt", "*.ts", "runs", "eval", "__pycache__", "vlseg_checkpoint.json", "monailabel_train.json"))
    ckpt = write_initial_checkpoint(bundles / MODEL, VARIANT)
    for f in (ckpt, ckpt.parent / CHECKPOINT_RECORD):  # the same weights (seed 0): built once
        shutil.copy2(f, bundles / f"{MODEL}_untrained" / "models" / f.name)
    code = ("import sys; from vlseg.app_support.checkpoints import ensure_checkpoint; "
            "ensure_checkpoint(sys.argv[1], sys.argv[2], sys.argv[3], max_epochs=4, force=True, log_path=sys.argv[4], "
            "overrides={'learning_rate': 0.01, 'min_learning_rate': 0.01, 'val_interval': 100})")
    log = open(root / "train.log", "w")
    proc = subprocess.Popen([sys.executable, "-c", code, str(bundles / MODEL), VARIANT,
                             str(root / "demo" / "datalist.json"), str(root / "bundle_train.log")],
                            stdout=log, stderr=subprocess.STDOUT, cwd=str(REPO))
    proc.log = log
    return bundles, f"{MODEL},{MODEL}_untrained", proc


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    why = ui.chromium_missing()
    if why:
        pytest.skip(f"annotation page (browser): {why}")
    if not (REPO / "bundles" / MODEL / "configs" / f"{VARIANT}.json").is_file() and \
            not os.environ.get("VLSEG_ANNOTATE_BUNDLES_DIR"):
        pytest.skip(f"annotation page: bundles/{MODEL}/configs/{VARIANT}.json not present")
    from vlseg.app_support.server import start_server, stop_server

    t0 = time.time()
    root = tmp_path_factory.mktemp("annotate")
    studies = make_studies(root)
    bundles, models, train = make_bundles(root)
    handle = None
    try:
        app = root / "app"
        shutil.copytree(APP, app, ignore=shutil.ignore_patterns("model", "logs", "bin", "__pycache__"))
        conf = {"bundles_dir": bundles, "variant": VARIANT, "scoring_samples": 2, "scoring_prompts": "default",
                "train_epochs": 1, **({"models": models} if models else {}),
                **({"scoring_model": MODEL} if train is not None else {})}
        handle = start_server(app, studies, conf, log_path=root / "server.log", timeout=240,
                              env={"MONAI_LABEL_AUTO_UPDATE_SCORING": "false", "MONAI_LABEL_SESSIONS": "false"})
        t_up = time.time() - t0
        if train is not None:
            assert train.wait(timeout=300) == 0, (root / "train.log").read_text()[-3000:]
        print(f"\n[annotate] set-up {time.time() - t0:.0f}s (server up after {t_up:.0f}s) at {handle.url}")
        yield {"url": handle.url, "handle": handle, "root": root, "stop": lambda: stop_server(handle)}
    finally:
        if handle is not None:
            stop_server(handle)
        if train is not None:
            if train.poll() is None:
                train.kill()
                train.wait()
            train.log.close()


@pytest.fixture(scope="module")
def driver(server):
    d = ui.start_chromium()
    try:
        yield d
    finally:
        logs = [e["message"][:300] for e in d.get_log("browser") if e["level"] == "SEVERE"]
        if logs:
            print("[annotate] browser errors (the refused requests are expected):\n" + "\n".join(logs))
        d.quit()


# ------------------------------------------------------------------------------------------------ helpers
def _datastore(server) -> dict:
    r = requests.get(f"{server['url']}/datastore/", params={"output": "all"}, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()["objects"]


def _expected_order(server) -> list[str]:
    """Unlabelled images by the stored score the strategies rank by (``/info`` -> scoring; default ``top5``),
    highest first -- after checking that the scores tell the images apart."""
    info = requests.get(f"{server['url']}/info/", timeout=30).json()
    key = f"vlseg_uncertainty_{info['scoring']['uncertainty'].get('score', 'top5')}"
    scores = {k: v["image"]["info"].get(key) for k, v in _datastore(server).items() if "final" not in v["labels"]}
    assert all(isinstance(s, float) for s in scores.values()), scores
    assert len(set(scores.values())) == len(scores), f"tied scores: the order would be a tie rule: {scores}"
    return sorted(scores, key=scores.get, reverse=True)


def _server_arrays(server, model: str, image_id: str, prompt: str, seed: int, samples: int):
    """The server's mask (the infer answer for the page's model, prompt and seed) and the stored uncertainty map of
    that inference: [rows, cols] arrays for a 2D image, [rows, cols, slices] for a volume."""
    import nibabel as nib
    from PIL import Image

    r = requests.post(f"{server['url']}/infer/{model}", params={"image": image_id, "output": "image"},
                      files={"params": (None, json.dumps({"text": prompt, "seed": seed, "num_samples": samples}))},
                      timeout=120)
    assert r.status_code == 200, r.text[:300]
    u = requests.get(f"{server['url']}/datastore/label", params={"label": image_id, "tag": "uncertainty"}, timeout=30)
    assert u.status_code == 200
    if r.content[:4] == b"\x89PNG":
        return (np.asarray(Image.open(io.BytesIO(r.content))),
                np.asarray(Image.open(io.BytesIO(u.content)), dtype=np.float64) / 65535.0)
    tmp = Path(tempfile.mkdtemp())
    (tmp / "m.nii.gz").write_bytes(r.content)
    (tmp / "u.nii.gz").write_bytes(u.content)
    return (np.asarray(nib.load(str(tmp / "m.nii.gz")).dataobj),
            np.asarray(nib.load(str(tmp / "u.nii.gz")).dataobj, dtype=np.float64))


def _open(driver, image_id: str):
    from selenium.webdriver.common.by import By

    driver.find_element(By.CSS_SELECTOR, f"#worklist li[data-id='{image_id}']").click()
    ui.wait(driver, lambda: ui.stage(driver) == image_id and ui.idle(driver), 60, f"image {image_id}")


def _segment(driver, server, model: str, prompt: str) -> dict:
    """Choose `model`, type `prompt` + Enter; check both overlays against the server's arrays. Returns the page's
    layers with the server's arrays (``server_mask``, ``server_unc``)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select

    Select(driver.find_element(By.ID, "model")).select_by_value(model)
    stamp = driver.execute_script("return document.getElementById('stage').dataset.resultTs || ''")
    box = driver.find_element(By.ID, "prompt")
    box.clear()
    box.send_keys(prompt, Keys.ENTER)
    ui.wait(driver, lambda: "Segmented" in ui.message(driver) and ui.idle(driver) and driver.execute_script(
        "return document.getElementById('stage').dataset.resultTs") != stamp, 120, f"the segmentation with {model}")
    result = driver.execute_script("return window.vlsegAnnotate.result")
    assert result["prompt"] == prompt and result["model"] == model
    page = ui.layers(driver)
    page["server_mask"], page["server_unc"] = _server_arrays(server, model, page["id"], prompt, result["seed"],
                                                             result["num_samples"])
    ui.check_overlays(page, page["server_mask"], page["server_unc"])
    return page


# ------------------------------------------------------------------------------------------------ the loop
def test_annotation_loop(server, driver, tmp_path):
    from PIL import Image
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    t0 = time.time()
    body = lambda: driver.find_element(By.TAG_NAME, "body")  # noqa: E731  (keys typed outside the fields)
    driver.get(f"{server['url']}/vlseg/")
    ui.wait(driver, lambda: driver.execute_script("return document.body.dataset.ready === '1'"), 60, "the page")
    assert "server unreachable" not in driver.find_element(By.ID, "server-status").text
    models = [o.get_attribute("value") for o in driver.find_elements(By.CSS_SELECTOR, "#model option")]
    info = requests.get(f"{server['url']}/info/", timeout=30).json()
    assert models == list(info["models"]) and models and not info["vlseg"]["skipped"]
    words = [b.text for b in driver.find_elements(By.CSS_SELECTOR, "#label-words button")]
    assert words == ["polyp", "cyst", "lesion"]
    help_text = driver.execute_script("return document.getElementById('help').textContent")
    assert "Ctrl+S" in help_text and "brush" in help_text
    objects = _datastore(server)
    kinds = {k: "volume" if v["image"]["ext"] == ".nii.gz" else "2d" for k, v in objects.items()}

    # 1. scoring from the page; the work list then follows the stored scores and N opens their argmax
    driver.find_element(By.ID, "score").click()
    ui.wait(driver, lambda: "Scoring finished" in ui.message(driver), 240, "the scoring")
    order = _expected_order(server)
    assert ui.worklist(driver) == order
    t_scored = time.time()
    body().send_keys("n")
    ui.wait(driver, lambda: ui.stage(driver) == order[0] and ui.idle(driver), 60, "the next sample")

    # 2. a free-text prompt with each model; the overlays are the server's arrays (the first model's map varies,
    # the second's mask -- untrained -- has foreground and background: between them both checks have teeth)
    pages = []
    shot = tmp_path / "annotate_page.png"  # the README's picture: the first model on the first 2D image
    for i, model in enumerate(models[:2]):
        pages.append(_segment(driver, server, model, PROMPT))
        if i == 0 and kinds[order[0]] == "2d":
            driver.save_screenshot(str(shot))
    assert any(0 < (p["server_mask"] > 0).mean() < 1 for p in pages), "every mask is empty or full"
    shown = "return ['mask-layer', 'heat-layer'].map(i => getComputedStyle(document.getElementById(i)).visibility)"
    body().send_keys("m")  # toggles: M hides the mask, U the heat map; again shows them
    assert driver.execute_script(shown) == ["hidden", "visible"]
    body().send_keys("u", "m")
    assert driver.execute_script(shown) == ["visible", "hidden"]
    body().send_keys("u")
    assert driver.execute_script(shown) == ["visible", "visible"]
    assert any(p["server_unc"].std() > 0.01 for p in pages), "every uncertainty map is flat"
    page = pages[-1]
    if kinds[order[0]] == "volume":  # another slice (key Down): the overlays follow
        body().send_keys(Keys.ARROW_DOWN)
        ui.wait(driver, lambda: ui.layers(driver)["slice"] == page["slice"] + 1, 10, "the next slice")
        ui.check_overlays({**ui.layers(driver), "slice": page["slice"] + 1}, page["server_mask"], page["server_unc"])
        body().send_keys(Keys.ARROW_UP)
        ui.wait(driver, lambda: ui.layers(driver)["slice"] == page["slice"], 10, "the slice back")
    mask = page["server_mask"] if page["server_mask"].ndim == 2 else page["server_mask"][:, :, page["slice"]]

    # 3. fill (key F) a background pixel: exactly its 4-connected background region is set; undo (Z) restores
    from scipy import ndimage

    background = page["mask"][:, :, 3] == 0
    regions, _ = ndimage.label(background)  # 4-connected (the default structure)
    seed_rc = tuple(int(x) for x in np.argwhere(background)[len(np.argwhere(background)) // 2])
    body().send_keys("f")
    ui.stroke(driver, [seed_rc])
    filled = ui.layers(driver)["mask"][:, :, 3] > 0
    assert np.array_equal(filled & ~(page["mask"][:, :, 3] > 0), regions == regions[seed_rc])
    body().send_keys("z")
    assert np.array_equal(ui.layers(driver)["mask"][:, :, 3], page["mask"][:, :, 3])

    # 4. a brush stroke through background (eraser through foreground when the mask covers that row)
    row = page["h"] // 4
    cols = [page["w"] // 8, page["w"] // 2, page["w"] - page["w"] // 8]
    tool = "b" if (mask[row, cols[0]:cols[-1]] == 0).mean() >= 0.5 else "e"
    body().send_keys(tool)
    before = page["mask"][:, :, 3] > 0
    ui.stroke(driver, [(row, c) for c in cols])
    after = ui.layers(driver)["mask"][:, :, 3] > 0
    changed = after != before
    assert changed.sum() >= (cols[-1] - cols[0]) // 2, changed.sum()
    rr = np.nonzero(changed)[0]
    assert abs(rr.min() - row) <= 3 and abs(rr.max() - row) <= 3  # inside the stroke's band (brush 4 px)
    assert np.all(after[changed]) if tool == "b" else not np.any(after[changed])

    # 5. submit (Ctrl+S): the datastore holds the edited mask with its prompt
    body().send_keys(Keys.CONTROL, "s")
    ui.wait(driver, lambda: "saved with the prompt" in ui.message(driver) and ui.idle(driver), 60, "the submit")
    assert _datastore(server)[order[0]]["labels"]["final"]["info"]["text"] == PROMPT
    r = requests.get(f"{server['url']}/datastore/label", params={"label": order[0], "tag": "final"}, timeout=30)
    assert r.status_code == 200
    if kinds[order[0]] == "2d":
        saved = np.asarray(Image.open(io.BytesIO(r.content)))
    else:
        import nibabel as nib

        (tmp_path / "final.nii.gz").write_bytes(r.content)
        volume = np.asarray(nib.load(str(tmp_path / "final.nii.gz")).dataobj)
        assert volume.shape == page["server_mask"].shape
        others = [k for k in range(volume.shape[2]) if k != page["slice"]]
        assert np.array_equal(volume[:, :, others], page["server_mask"][:, :, others])
        saved = volume[:, :, page["slice"]]
    assert np.array_equal(saved > 0, after)
    assert np.array_equal(saved[~changed], mask[~changed])  # outside the stroke: the server's label values

    # 6. the next sample follows the remaining scores; labelled images go last
    assert ui.worklist(driver) == order[1:] + order[:1]
    body().send_keys("n")
    ui.wait(driver, lambda: ui.stage(driver) == order[1] and ui.idle(driver), 60, "the second sample")

    # 7. the other kind of image (2D / volume slices) through the same page
    other = next(k for k in order[1:] if kinds[k] != kinds[order[0]])
    _open(driver, other)
    for model in dict.fromkeys([models[0], models[-1]] if kinds[other] == "2d" else [models[-1]]):
        _segment(driver, server, model, PROMPT)
        if not shot.exists():
            driver.save_screenshot(str(shot))
    _open(driver, order[1])  # the bad-input test goes on with the next sample
    print(f"\n[annotate] loop {time.time() - t0:.0f}s (scoring {t_scored - t0:.0f}s)")

    with Image.open(shot) as im:
        assert im.size[0] >= 1000
    if os.environ.get("VLSEG_UPDATE_DOCS_SCREENSHOT") == "1":
        (REPO / "docs" / "img").mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, REPO / "docs" / "img" / "annotate_page.png")


# ------------------------------------------------------------------------------------------------ bad input
def test_bad_input_shows_a_message_and_keeps_the_edit(server, driver):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    if driver.execute_script("return !(window.vlsegAnnotate && window.vlsegAnnotate.image)"):
        pytest.fail("no image open: test_annotation_loop must run first")
    h, w = driver.execute_script("const s = window.vlsegAnnotate; return [s.image.height, s.image.width]")
    driver.find_element(By.TAG_NAME, "body").send_keys("b")
    ui.stroke(driver, [(h // 2, w // 4), (h // 2, w // 2)])
    edited = ui.layers(driver)["mask"][:, :, 3] > 0
    assert edited.sum() > 0
    slice_k = driver.execute_script("return window.vlsegAnnotate.slice")

    def still_there(what):
        assert np.array_equal(ui.layers(driver)["mask"][:, :, 3] > 0, edited), f"edit lost after {what}"
        draft = ui.draft(driver)
        assert draft is not None, f"no draft stored after {what}"
        assert np.array_equal(draft.reshape(-1, h, w)[slice_k] > 0, edited), f"draft differs after {what}"

    box = driver.find_element(By.ID, "prompt")
    # an empty prompt: refused in the page
    box.clear()
    box.send_keys(Keys.ENTER)
    ui.wait(driver, lambda: "prompt is empty" in ui.message(driver), 10, "the empty-prompt message")
    assert ui.message(driver).startswith("error")
    still_there("an empty prompt")

    # a 2,000-character prompt: the server's 422 and its reason
    driver.execute_script("document.getElementById('prompt').value = arguments[0]", "polyp " * 333 + "xx")
    driver.find_element(By.ID, "run").click()
    ui.wait(driver, lambda: "HTTP 422" in ui.message(driver) and ui.idle(driver), 60, "the long-prompt message")
    msg = ui.message(driver)
    assert msg.startswith("error") and "2000 characters" in msg and "1000" in msg, msg
    still_there("a 2,000-character prompt")

    # the server stopped: segmenting and submitting say so; the edit and its draft stay
    server["stop"]()
    box.clear()
    box.send_keys(PROMPT, Keys.ENTER)
    ui.wait(driver, lambda: "Cannot reach the server" in ui.message(driver) and ui.idle(driver), 60, "the stopped-server message")
    assert "edit stays" in ui.message(driver)
    still_there("a segmentation with the server stopped")
    driver.find_element(By.TAG_NAME, "body").send_keys(Keys.CONTROL, "s")
    ui.wait(driver, lambda: "Cannot reach the server" in ui.message(driver) and "Submitting the label" in ui.message(driver)
          and ui.idle(driver), 60, "the failed submit's message")
    assert "unreachable" in driver.find_element(By.ID, "server-status").text
    still_there("a submit with the server stopped")
