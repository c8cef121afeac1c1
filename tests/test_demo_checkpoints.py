"""The main job's pieces: shipped checkpoints (export / install / fit), training progress lines, the studies
folder of held-out test items, Dice."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from vlseg.app_support.demo_eval import Progress, dice_score
from vlseg.app_support.train_progress import last_progress, wait_with_progress

REPO = Path(__file__).resolve().parents[1]


def _bundle_copy(tmp_path, name):
    dst = tmp_path / name
    shutil.copytree(REPO / "bundles" / name, dst, ignore=shutil.ignore_patterns("*.pt", "runs", "eval"))
    return dst


def test_export_install_round_trip(tmp_path):
    torch = pytest.importorskip("torch")
    from vlseg.app_support.checkpoints import build_network, write_initial_checkpoint
    from vlseg.app_support.shipped import export_trainable, install_shipped, shipped_is_installed
    from vlseg.bundles import BundleError, checkpoint_path

    bundle = _bundle_copy(tmp_path, "uavls")
    ckpt = write_initial_checkpoint(bundle, "tiny", seed=7)  # stands in for a trained network (seed != 0)
    trained = torch.load(ckpt, weights_only=True)
    info = export_trainable(bundle, "tiny", ckpt, tmp_path / "ship" / "uavls_tiny.pt", {"train_command": "x"})
    net = build_network(bundle, "tiny", seed=0)
    frozen = {n for n, p in net.named_parameters() if not p.requires_grad}
    data = torch.load(tmp_path / "ship" / "uavls_tiny.pt", weights_only=True)
    assert set(data["skipped"]) <= frozen and data["skipped"], "only frozen, seed-independent tensors are left out"
    assert all(v.dtype != torch.float32 for v in data["tensors"].values())
    assert json.loads((tmp_path / "ship" / "uavls_tiny.json").read_text())["train_command"] == "x"

    ckpt.unlink()
    assert install_shipped(bundle, "tiny", folder=tmp_path / "ship") == checkpoint_path(bundle)
    installed = torch.load(checkpoint_path(bundle), weights_only=True)
    assert installed.keys() == trained.keys()
    for k, v in trained.items():
        assert installed[k].dtype == v.dtype
        torch.testing.assert_close(installed[k].float(), v.float(), rtol=1e-3, atol=1e-3)  # float16 storage
    assert shipped_is_installed(bundle, "tiny", folder=tmp_path / "ship")
    torch.save({**installed, next(iter(installed)): installed[next(iter(installed))] + 1}, checkpoint_path(bundle))
    assert not shipped_is_installed(bundle, "tiny", folder=tmp_path / "ship")  # e.g. after a training from the app

    # a shipped file that no longer fits the network is refused with a clear message
    data["tensors"]["not_a_tensor_of_the_network"] = torch.zeros(1)
    torch.save(data, tmp_path / "ship" / "uavls_tiny.pt")
    with pytest.raises(BundleError, match="does not fit the current 'tiny' network"):
        install_shipped(bundle, "tiny", folder=tmp_path / "ship")
    assert install_shipped(bundle, "small", folder=tmp_path / "ship") is None  # none shipped for that variant


@pytest.mark.parametrize("name", ["medclipseg", "uavls", "vilmedsam"])
def test_shipped_checkpoints_fit_the_current_networks(tmp_path, name):
    pytest.importorskip("torch")
    from vlseg.app_support.shipped import install_shipped, shipped_dir, shipped_path

    src = shipped_path(name, "small")
    if not src.is_file():
        pytest.skip(f"no shipped checkpoint {src.name}")
    total = sum(p.stat().st_size for p in shipped_dir().glob("*.pt"))
    assert total <= 20_000_000, f"shipped checkpoints are {total / 1e6:.1f} MB (at most 20 MB)"
    record = json.loads(src.with_suffix(".json").read_text())
    assert "monai.bundle run" in record["train_command"] and record["sha256"]
    assert install_shipped(_bundle_copy(tmp_path, name), "small") is not None


def test_training_progress_lines(tmp_path):
    text = ("Epoch: 1/30, Iter: 1/76 -- train_loss: 1.1\n"
            "Epoch [2/30]: [11/76]  14%|##  [00:43<04:24]Epoch [2/30]: [12/76]  16%")
    assert last_progress(text) == (2, 30, 12, 76)
    assert last_progress("no progress yet") is None

    log = tmp_path / "train.log"
    script = ("import sys, time\n"
              "for i in range(1, 5):\n"
              "    print(f'Epoch: 1/1, Iter: {i}/4 -- train_loss: 0.5', flush=True); time.sleep(0.4)\n")
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-c", script], stdout=out, stderr=subprocess.STDOUT)
        lines = []
        assert wait_with_progress(proc, log, "toy", max_seconds=60, log=lines.append, every=0.3) == 0
    assert lines and all(line.startswith("[train toy] ") for line in lines)
    assert any("step" in line and "left" in line for line in lines), lines


def test_progress_and_dice():
    lines = []
    p = Progress("round-trip 3/10: m Dice", 4, log=lines.append, every=0.0)
    for k in range(1, 5):
        p.step(k, "x")
    assert lines[-1].startswith("[round-trip 3/10: m Dice] 4/4 x, 0:00 left")
    a = np.zeros((4, 4), bool)
    b = a.copy()
    a[:2], b[1:3] = True, True
    assert dice_score(a, b) == pytest.approx(0.5) and dice_score(a & False, b & False) == 1.0


def test_studies_hold_the_held_out_test_items(tmp_path):
    pytest.importorskip("nibabel")
    from vlseg.app_support.roundtrip import make_studies
    from vlseg.data.demo import generate_demo_dataset

    generate_demo_dataset(tmp_path / "demo", n_images=(1, 1, 2), image_size=64, n_volumes=(1, 0, 2),
                          volume_shape=(32, 32, 6))
    items = make_studies(tmp_path / "demo", tmp_path / "studies")
    assert sorted(p.name for p in (tmp_path / "studies").iterdir()) == [
        "test_0000.png", "test_0001.png", "vol_000.nii.gz", "vol_001.nii.gz"]
    assert {k: {it["_section"] for it in v} for k, v in items.items()} == {
        "test_0000": {"test"}, "test_0001": {"test"}, "vol_000": {"volumes"}, "vol_001": {"volumes"}}
    assert all(Path(it["_label_path"]).is_file() and len(v) >= 2 for v in items.values() for it in v)
    assert list(make_studies(tmp_path / "demo", tmp_path / "studies", n_images=1, n_volumes=0)) == ["test_0000"]
