"""No lost or half-written data (issue 8): concurrent label saves, atomic datastore JSON and checkpoints.

Runs against the app's datastore class (``apps/vlseg/lib/datastore.py``) and the checkpoint writer
(``vlseg.app_support.checkpoints.save_atomic``) directly, and kills writer subprocesses with SIGKILL mid-write.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
APP = REPO / "apps" / "vlseg"
sys.path.insert(0, str(APP))

pytest.importorskip("monailabel")
from lib.datastore import PromptCheckingDatastore  # noqa: E402

N_IMAGES = 20
N_SAVES = 200


def _datastore(studies: Path) -> PromptCheckingDatastore:
    return PromptCheckingDatastore(str(studies), extensions=("*.png",), auto_reload=False)


@pytest.fixture()
def studies(tmp_path) -> Path:
    folder = tmp_path / "studies"
    folder.mkdir()
    for i in range(N_IMAGES):
        Image.fromarray(np.full((32, 32), i, np.uint8)).save(folder / f"img_{i:02d}.png")
    return folder


def test_200_concurrent_label_saves_lose_nothing(studies, tmp_path):
    """200 saves from 16 threads, to different images and many to the same ones: each stored label is complete,
    readable, and its stored prompt is the one sent with that very label content."""
    ds = _datastore(studies)
    src = tmp_path / "labels_src"
    src.mkdir()
    files = []
    for k in range(N_SAVES):
        f = src / f"label_{k:03d}.png"
        Image.fromarray(np.full((32, 32), k % 250 + 1, np.uint8)).save(f)  # pixel value encodes k
        files.append(f)

    def save(k: int):
        image = f"img_{k % N_IMAGES:02d}" if k < 100 else f"img_{k % 3:02d}"  # the last 100 hit 3 images
        return ds.save_label(image, str(files[k]), "final", {"text": f"prompt {k}"})

    with ThreadPoolExecutor(max_workers=16) as pool:
        results = list(pool.map(save, range(N_SAVES)))
    assert len(results) == N_SAVES

    config = json.loads((studies / "datastore_v2.json").read_text())  # valid JSON
    reread = _datastore(studies)  # a fresh instance from the JSON on disk
    labelled = reread.get_labeled_images()
    assert sorted(labelled) == sorted(f"img_{i:02d}" for i in range(N_IMAGES))
    for image in labelled:
        info = reread.get_label_info(image, "final")
        k = int(info["text"].split()[1])
        with Image.open(reread.get_label_uri(image, "final")) as im:
            arr = np.asarray(im)
        assert arr.shape == (32, 32) and np.all(arr == k % 250 + 1), (image, info)
    assert config["objects"]
    assert not list(studies.rglob("*.tmp"))


WRITER = textwrap.dedent("""
    import sys
    sys.path.insert(0, {app!r})
    from lib.datastore import PromptCheckingDatastore
    ds = PromptCheckingDatastore({studies!r}, extensions=("*.png",), auto_reload=False)
    big = "x" * 200000
    n = 0
    print("ready", flush=True)
    while True:  # what a scoring run does: update every image's info, again and again
        for i in range({n_images}):
            ds.update_image_info(f"img_{{i:02d}}", {{"vlseg_uncertainty_top5": n / 1000.0, "pad": big}})
            n += 1
""")


def test_datastore_json_survives_a_killed_scoring_writer(studies):
    """A process updating image infos (as scoring does) is SIGKILLed at random moments, three times; the datastore
    JSON stays valid every time and a restarted writer carries on."""
    _datastore(studies)  # create the JSON
    code = WRITER.format(app=str(APP), studies=str(studies), n_images=N_IMAGES)
    rng = np.random.default_rng(0)
    for _ in range(3):  # unpatched MONAI Label (in-place JSON rewrite) leaves an empty or cut JSON here
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout.readline().strip() == "ready"
            time.sleep(0.3 + float(rng.random()))
        finally:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        data = json.loads((studies / "datastore_v2.json").read_text())
        assert len(data["objects"]) == N_IMAGES
        ds = _datastore(studies)
        assert len(ds.list_images()) == N_IMAGES


CKPT_WRITER = textwrap.dedent("""
    import torch
    from vlseg.app_support.checkpoints import save_atomic
    n = 0
    print("ready", flush=True)
    while True:
        n += 1
        save_atomic({{"w": torch.full((4_000_000,), float(n)), "n": torch.tensor(n)}}, {path!r})
""")


def test_checkpoint_write_killed_midway_leaves_a_complete_file(tmp_path):
    """SIGKILL during repeated ~16 MB checkpoint writes: ``model.pt`` is always a complete, loadable checkpoint."""
    import torch

    path = tmp_path / "models" / "model.pt"
    path.parent.mkdir()
    code = CKPT_WRITER.format(path=str(path))
    rng = np.random.default_rng(1)
    for _ in range(2):
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=str(REPO))
        try:
            assert proc.stdout.readline().strip() == "ready"
            time.sleep(1.0 + float(rng.random()))
        finally:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        if path.exists():
            state = torch.load(path, weights_only=True)
            assert torch.all(state["w"] == float(state["n"]))
    assert path.exists()


def test_bundle_checkpoints_use_atomic_writes():
    """The bundles' CheckpointSaver writes through ignite's DiskSaver with ``atomic=True`` (tmp file + move)."""
    import inspect

    from ignite.handlers import DiskSaver
    from monai.handlers import CheckpointSaver

    assert "atomic=True" in inspect.getsource(CheckpointSaver).replace(" ", "")
    assert inspect.signature(DiskSaver).parameters["atomic"].default is True
