"""Pool scoring as a torchrun job (``scripts/score_pool.py``, issue 15 item 5a): 2 processes on CPU (gloo).

One demo studies folder (8 images of 64x64, one of them labelled) and the toy bundle (tiny variant, an untrained
checkpoint); the same job runs once with ``torch.distributed.run --nproc_per_node=2`` and once as a single process
on a copy of the folder. Both use OMP_NUM_THREADS=1 so that the CPU kernels are the same.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
APP = REPO / "apps" / "vlseg"
TOY = REPO / "tests" / "data" / "toy_bundle"
SCRIPT = REPO / "scripts" / "score_pool.py"
sys.path.insert(0, str(APP))

PROMPTS = "polyp,cyst"
NUM_SAMPLES = 4
LABELLED = "train_0000"
BROKEN = "zz_broken"  # not an image: fails on its rank, the others go on; reported, exit code 1


def _env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")


def _single_process_run(args: list[str]) -> None:
    """The job as a plain single process, in this process (saves an interpreter start), on one thread as torchrun's
    workers are."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert _score_pool_module().main(args) == 1  # 1: an image failed
    finally:
        torch.set_num_threads(threads)


def _job_args(studies: Path, bundle: Path, report: Path) -> list[str]:
    return [str(SCRIPT), "--studies", str(studies), "--bundle", str(bundle), "--variant", "tiny", "--prompts", PROMPTS,
            "--num-samples", str(NUM_SAMPLES), "--batch-images", "2", "--masks", "--device", "cpu", "--no-progress",
            "--report", str(report)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from vlseg.app_support.checkpoints import write_initial_checkpoint
    from vlseg.data.demo import generate_demo_dataset

    root = tmp_path_factory.mktemp("pool_ddp")
    generate_demo_dataset(root / "demo", seed=0, n_images=(4, 2, 2), image_size=64, n_volumes=0)
    studies = root / "studies_ddp"
    (studies / "labels" / "final").mkdir(parents=True)
    for png in sorted((root / "demo" / "images").rglob("*.png")):
        shutil.copy(png, studies / png.name)
    label = sorted((root / "demo" / "labels").rglob(f"{LABELLED}*.png"))[0]
    shutil.copy(label, studies / "labels" / "final" / f"{LABELLED}.png")  # one labelled image: not in the pool
    (studies / f"{BROKEN}.png").write_text("not a png")
    single = root / "studies_single"
    shutil.copytree(studies, single)
    bundle = root / "bundles" / "toy"
    shutil.copytree(TOY, bundle, ignore=shutil.ignore_patterns("*.pt", "__pycache__", "eval"))
    write_initial_checkpoint(bundle, "tiny", seed=0)

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           *_job_args(studies, bundle, root / "ddp.json")]
    with open(root / "ddp.log", "w") as log:  # 2 processes (gloo), while the single-process run goes on here
        proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=log, stderr=subprocess.STDOUT, text=True)
        try:
            _single_process_run(_job_args(single, bundle, root / "single.json")[1:])
            rc = proc.wait(timeout=300)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert rc == 1, f"{' '.join(cmd)} failed ({rc}):\n{(root / 'ddp.log').read_text()[-3000:]}"
    return {"root": root, "studies": studies, "single": single, "bundle": bundle,
            "ddp": json.loads((root / "ddp.json").read_text()), "single_report": json.loads((root / "single.json").read_text())}


def _objects(studies: Path) -> dict:
    return json.loads((studies / "datastore_v2.json").read_text())["objects"]


def test_every_unlabelled_image_scored_once_by_the_two_ranks(runs):
    ddp = runs["ddp"]
    images = sorted(p.stem for p in runs["studies"].glob("*.png"))
    unlabelled = [i for i in images if i != LABELLED]
    assert ddp["world_size"] == 2 and ddp["backend"] == "gloo"
    assert list(ddp["failed"]) == [BROKEN] and "LoadImage" in ddp["failed"][BROKEN]
    assert sorted(ddp["scored"]) == [i for i in unlabelled if i != BROKEN]  # a dict: each image once
    assert sorted(ddp["ranks"]) == unlabelled and set(ddp["ranks"].values()) == {0, 1}
    # chunks of 2 images, chunk k on rank k % 2
    assert [ddp["ranks"][i] for i in unlabelled] == [(k // 2) % 2 for k in range(len(unlabelled))]
    assert ddp["images_per_s"] > 0


def test_rank0_wrote_records_and_labels_in_the_app_layout(runs):
    from vlseg.app_support.bundles import checkpoint_identity, checkpoint_path
    from vlseg.app_support.score_records import SCORE_KEYS, scoring_signature

    objects = _objects(runs["studies"])
    sha = checkpoint_identity(checkpoint_path(runs["bundle"]))["sha256"]
    signature = scoring_signature("toy", sha, NUM_SAMPLES, PROMPTS.split(","))
    assert runs["ddp"]["signature"] == signature
    for image_id in runs["ddp"]["scored"]:  # images of rank 1 too: rank 0 wrote them all
        info = objects[image_id]["image"]["info"]
        assert info["vlseg_uncertainty_checkpoint"] == sha and info["vlseg_uncertainty_signature"] == signature
        assert info["vlseg_uncertainty_model"] == "toy" and info["vlseg_uncertainty_num_samples"] == NUM_SAMPLES
        assert info["vlseg_uncertainty_prompts"] == PROMPTS.split(",")
        assert len(info["vlseg_uncertainty_embedding"]) == 108
        assert {"vlseg_uncertainty_mean", "vlseg_uncertainty_top5"} <= set(info) <= set(info) | set(SCORE_KEYS)
        assert 0.0 <= info["vlseg_uncertainty_mean"] <= info["vlseg_uncertainty_top5"] <= 1.0
        labels = objects[image_id]["labels"]
        assert labels["uncertainty"]["info"]["format"] == "png16" and "original" in labels
        assert (runs["studies"] / "labels" / "uncertainty" / f"{image_id}.png").is_file()
        mask = np.asarray(Image.open(runs["studies"] / "labels" / "original" / f"{image_id}.png"))
        assert mask.shape == (64, 64) and set(np.unique(mask)) <= {0, 1, 2}
    for image_id in (LABELLED, BROKEN):
        assert "vlseg_uncertainty_top5" not in objects[image_id]["image"]["info"]
    assert not (runs["studies"] / ".vlseg_pool").exists()  # staging removed


def test_scores_equal_the_single_process_run(runs):
    a, b = _objects(runs["studies"]), _objects(runs["single"])
    assert runs["single_report"]["world_size"] == 1 and sorted(runs["single_report"]["scored"]) == sorted(runs["ddp"]["scored"])
    for image_id in runs["ddp"]["scored"]:
        ia, ib = a[image_id]["image"]["info"], b[image_id]["image"]["info"]
        keys = [k for k in ia if k.startswith("vlseg_uncertainty_") and isinstance(ia[k], float)]
        assert keys
        for k in keys:
            assert abs(ia[k] - ib[k]) <= 1e-6, (image_id, k, ia[k], ib[k])
        ua = np.asarray(Image.open(runs["studies"] / "labels" / "uncertainty" / f"{image_id}.png"))
        ub = np.asarray(Image.open(runs["single"] / "labels" / "uncertainty" / f"{image_id}.png"))
        assert np.array_equal(ua, ub)


def test_app_strategy_serves_the_argmax_of_the_stored_scores(runs):
    from lib.activelearning.uncertainty import MostUncertain
    from lib.scoring.pool import open_datastore

    datastore = open_datastore(str(runs["studies"]))
    scores = {i: datastore.get_image_info(i)["vlseg_uncertainty_top5"] for i in runs["ddp"]["scored"]}
    chosen = MostUncertain(score="top5")({}, datastore)
    assert chosen["id"] == max(scores, key=scores.get) and chosen["score"] == max(scores.values())
    mean = {i: datastore.get_image_info(i)["vlseg_uncertainty_mean"] for i in scores}
    assert MostUncertain(score="mean")({}, datastore)["id"] == max(mean, key=mean.get)


def _score_pool_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("score_pool_cli", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_a_second_run_skips_what_is_scored_and_bad_input_is_explained(runs, tmp_path):
    cli = _score_pool_module()
    args = cli.parse_args(_job_args(runs["studies"], runs["bundle"], tmp_path / "r.json")[1:])
    plan = cli._plan(args)  # what rank 0 would broadcast: nothing left to score (same signature as the app's)
    assert "error" not in plan, plan
    assert [it.image_id for it in plan["work"]["items"]] == [BROKEN]  # only the failed image is left
    assert sorted(plan["work"]["skipped"]) == sorted(runs["ddp"]["scored"])
    args.force = True
    assert len(cli._plan(args)["work"]["items"]) == len(runs["ddp"]["scored"]) + 1

    no_ckpt = tmp_path / "toy_no_checkpoint"
    shutil.copytree(TOY, no_ckpt, ignore=shutil.ignore_patterns("*.pt", "__pycache__", "eval"))
    err = cli._plan(cli.parse_args(_job_args(runs["studies"], no_ckpt, tmp_path / "r.json")[1:]))["error"]
    assert "no checkpoint" in err and "vlseg.app_support.checkpoints" in err

    stranger = tmp_path / "elsewhere.png"
    shutil.copy(runs["studies"] / "test_0000.png", stranger)
    (tmp_path / "datalist.json").write_text(json.dumps({"test": [{"image": str(stranger)}]}))
    args = cli.parse_args(_job_args(runs["studies"], runs["bundle"], tmp_path / "r.json")[1:]
                          + ["--datalist", str(tmp_path / "datalist.json")])
    assert "not in the studies folder" in cli._plan(args)["error"]
    (tmp_path / "datalist.json").write_text(json.dumps([{"image": str(runs["studies"] / "test_0001.png")}]))
    args.force = True
    assert [it.image_id for it in cli._plan(args)["work"]["items"]] == ["test_0001"]
