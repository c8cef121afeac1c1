"""The MONAI Label app (apps/vlseg) driven through a real ``monailabel start_server`` process.

One server is started for the module on a free 127.0.0.1 port with the ``tiny`` variants: the toy bundle of
``tests/data/toy_bundle`` (always) and every real bundle under ``bundles/`` that has a ``configs/tiny.json``
(copied to a temporary folder and given a 1-epoch checkpoint first). Tests talk to it with
``monailabel.client.MONAILabelClient`` (what 3D Slicer uses) and plain HTTP (``requests``, as OHIF does).
The server is stopped by its own process id, children first.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
APP = REPO / "apps" / "vlseg"
TOY = REPO / "tests" / "data" / "toy_bundle"
sys.path.insert(0, str(APP))

from lib.activelearning.uncertainty import MostUncertain  # noqa: E402
from lib.params import RequestError, parse_int, parse_label_names, resolve_prompts  # noqa: E402
from lib.trainset import prompts_of_label  # noqa: E402

requests = pytest.importorskip("requests")
from monailabel.client import MONAILabelClient  # noqa: E402
from monailabel.client.client import MONAILabelClientException  # noqa: E402

from vlseg.app_support.server import start_server, stop_server  # noqa: E402

SERVER_START_TIMEOUT = 240


# ----------------------------------------------------------------------------------------------------------------
# unit tests (no server)
# ----------------------------------------------------------------------------------------------------------------
LABELS = parse_label_names("polyp,cyst,lesion")


def test_prompt_resolution_order():
    assert resolve_prompts({"text": "  small   polyp "}, LABELS, "lesion")[0].prompt == "small polyp"
    assert resolve_prompts({"text": "cyst"}, LABELS, "lesion")[0].value == 2  # a label word keeps its id
    lp = resolve_prompts({"label_prompt": [3, 1]}, LABELS, "lesion")
    assert [(p.prompt, p.value, p.source) for p in lp] == [("lesion", 3, "label_prompt"), ("polyp", 1, "label_prompt")]
    assert resolve_prompts({"label_prompt": "[2]"}, LABELS, None)[0].prompt == "cyst"
    assert resolve_prompts({"label_prompt": ["Cyst"]}, LABELS, None)[0].value == 2
    d = resolve_prompts({}, LABELS, "lesion")[0]
    assert (d.prompt, d.value, d.source) == ("lesion", 3, "default")
    # a non-empty label_prompt wins over a text left in the config (OHIF sends both); an empty one does not
    both = resolve_prompts({"text": "a dark oval cyst", "label_prompt": [2]}, LABELS, None)
    assert [(p.prompt, p.value, p.source) for p in both] == [("cyst", 2, "label_prompt")]
    assert resolve_prompts({"text": "a dark oval cyst", "label_prompt": []}, LABELS, None)[0].source == "text"
    assert resolve_prompts({"text": "polyp", "label_prompt": ""}, LABELS, None)[0].value == 1


@pytest.mark.parametrize("request_, fragment", [
    ({"text": ""}, "empty"),
    ({"text": "x" * 10000}, "10000 characters"),
    ({"text": "$__import__('os')"}, "may not start"),
    ({"text": "polyp\x00"}, "control"),
    ({"label_prompt": [7]}, "unknown label"),
    ({"label_prompt": [True]}, "label ids or names"),
])
def test_prompt_errors_are_explained(request_, fragment):
    with pytest.raises(RequestError, match=fragment):
        resolve_prompts(request_, LABELS, "polyp")


def test_int_params():
    assert parse_int({"n": "5"}, "n", 1, 1, 8) == 5
    assert parse_int({}, "n", 4, 1, 8) == 4
    for bad in (0, 9, "x", 2.5, True):
        with pytest.raises(RequestError):
            parse_int({"n": bad}, "n", 1, 1, 8)


def test_training_prompts_from_label_info():
    assert prompts_of_label({"text": "small polyp"}, "caption") == [("small polyp", None, "label_text")]
    segs = {"label_info": [{"name": "polyp", "idx": 1}, {"name": "cyst", "idx": 2}]}
    assert prompts_of_label(segs, None) == [("polyp", 1, "segment_name"), ("cyst", 2, "segment_name")]
    assert prompts_of_label({}, "a caption") == [("a caption", None, "caption")]
    assert prompts_of_label({}, None) == []


class _FakeDatastore:
    def __init__(self, infos: dict, labelled=()):
        self.infos, self.labelled = infos, set(labelled)

    def get_unlabeled_images(self, *a):
        return [i for i in self.infos if i not in self.labelled]

    def get_image_info(self, image_id):
        return dict(self.infos[image_id])


def test_strategy_serves_most_uncertain_and_breaks_ties_by_least_recently_served():
    def info(score, ts=0):
        d = {} if score is None else {"vlseg_uncertainty_top5": score, "vlseg_uncertainty_mean": 1 - score}
        if ts:
            d["strategy"] = {"uncertainty": {"ts": ts}}
        return d

    s = MostUncertain()
    ds = _FakeDatastore({"a": info(0.2), "b": info(0.9), "c": info(0.5), "d": info(None)})
    assert s({"strategy": "uncertainty"}, ds)["id"] == "b"
    assert s({"strategy": "uncertainty", "key": "vlseg_uncertainty_mean"}, ds)["id"] == "a"
    ds.labelled.add("b")
    assert s({"strategy": "uncertainty"}, ds)["id"] == "c"
    # a tie: the one served longer ago (or never) wins
    tie = _FakeDatastore({"x": info(0.7, ts=200), "y": info(0.7, ts=100), "z": info(0.1)})
    assert s({"strategy": "uncertainty"}, tie)["id"] == "y"
    tie.infos["y"] = info(0.7, ts=300)
    assert s({"strategy": "uncertainty"}, tie)["id"] == "x"
    # nothing scored: least recently served, with a note
    none = _FakeDatastore({"p": info(None, ts=5), "q": info(None)})
    out = s({"strategy": "uncertainty"}, none)
    assert out["id"] == "q" and "scoring" in out["note"]
    assert s({"strategy": "uncertainty"}, _FakeDatastore({})) is None


def test_checkpoint_helpers_fit_variant_and_fall_back_to_final_weights(tmp_path):
    import torch

    from vlseg.app_support.bundles import BundleError, config_files, discover_bundles, read_checkpoint_record
    from vlseg.app_support.checkpoints import _weights_from_final_state, checkpoint_mismatch, write_initial_checkpoint

    toy = shutil.copytree(TOY, tmp_path / "bundles" / "toy")
    assert list(discover_bundles(tmp_path / "bundles")) == ["toy"]
    with pytest.raises(BundleError, match="not found"):
        discover_bundles(tmp_path / "bundles", "toy,nope")
    with pytest.raises(BundleError, match="configs/huge.json does not exist"):
        config_files(toy, "inference", "huge")
    with pytest.raises(BundleError, match="invalid variant"):
        config_files(toy, "inference", "../x")
    ckpt = write_initial_checkpoint(toy, "tiny")
    assert read_checkpoint_record(toy)["variant"] == "tiny"
    assert checkpoint_mismatch(toy, "tiny") is None
    assert "wrongly shaped" in checkpoint_mismatch(toy, "small")  # 4 vs 8 channels
    # a time budget that ended before validation: the weights of the final training state are used
    state = torch.load(ckpt, weights_only=True)
    ckpt.unlink()
    torch.save({"model": state, "optimizer": {"state": {}, "param_groups": []}}, ckpt.parent / "full_state_final.pt")
    assert _weights_from_final_state(toy, 0, ckpt) == "full_state_final.pt"
    assert sorted(torch.load(ckpt, weights_only=True)) == sorted(state)


# ----------------------------------------------------------------------------------------------------------------
# the real server
# ----------------------------------------------------------------------------------------------------------------
def _copy_bundle(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.pt", "*.ts", "runs", "eval", "__pycache__",
                                                            "vlseg_checkpoint.json", "monailabel_train.json"),
                    symlinks=True)
    return dst


def _real_tiny_bundles() -> list[Path]:
    """Bundles under bundles/ with a tiny variant; ``VLSEG_TEST_APP_BUNDLES=a,b`` (or ``none``) narrows them."""
    root = REPO / "bundles"
    if not root.is_dir():
        return []
    found = sorted(d for d in root.iterdir() if (d / "configs" / "tiny.json").is_file()
                   and (d / "configs" / "inference.json").is_file() and (d / "configs" / "train.json").is_file())
    wanted = os.environ.get("VLSEG_TEST_APP_BUNDLES", "").strip()
    if wanted:
        names = {n.strip() for n in wanted.split(",")}
        found = [d for d in found if d.name in names]
    return found


@pytest.fixture(scope="module")
def app_demo(tmp_path_factory) -> Path:
    """Tiny demo set (10 images of 64x64, one 48x48x8 volume); returns its datalist.json.

    (Own fixture rather than conftest's ``tiny_demo``: that one asks for 4-slice volumes, which the generator
    currently refuses.)
    """
    from vlseg.data.demo import generate_demo_dataset

    root = tmp_path_factory.mktemp("app_demo")
    generate_demo_dataset(root, seed=0, n_images=(6, 2, 2), image_size=64, n_volumes=1, volume_shape=(48, 48, 8))
    return root / "datalist.json"


@pytest.fixture(scope="module")
def server(tmp_path_factory, app_demo):
    from vlseg.app_support.checkpoints import ensure_checkpoint

    root = tmp_path_factory.mktemp("app")
    tiny_demo = app_demo
    demo = Path(app_demo).parent
    studies = root / "studies"
    studies.mkdir()
    for png in sorted((demo / "images").rglob("*.png")):
        shutil.copy(png, studies / png.name)
    import nibabel as nib

    # one volume, cut to the 3 slices around its first object (each slice is one 2D inference per bundle)
    vol = sorted((demo / "volumes").glob("*.nii.gz"))[0]
    obj = np.asarray(nib.load(str(sorted((demo / "volume_labels").glob(vol.name.replace(".nii.gz", "_obj*")))[0])).dataobj)
    k = int(np.argmax(obj.sum(axis=(0, 1))))
    k0 = max(0, min(k - 1, obj.shape[2] - 3))
    nib.save(nib.load(str(vol)).slicer[:, :, k0:k0 + 3], str(studies / vol.name))
    (studies / "validation_0000.txt").write_text("polyp\n")  # a caption sidecar

    bundles = root / "bundles"
    bundles.mkdir()
    toy = _copy_bundle(TOY, bundles / "toy")
    real = [_copy_bundle(src, bundles / src.name) for src in _real_tiny_bundles()]
    logs = root / "logs"
    logs.mkdir()

    # the toy goes through ensure_checkpoint (a real 1-epoch training run); the real bundles get untrained tiny
    # networks as checkpoints (serving only needs weights that fit), all in one subprocess, in parallel
    def train_toy():
        try:
            ensure_checkpoint(toy, "tiny", datalist=tiny_demo, max_epochs=1, timeout=300, log_path=logs / "toy.log")
            return {"toy": None}
        except Exception as e:  # reported by test_every_tiny_bundle_loads
            return {"toy": str(e)}

    def init_real():
        if not real:
            return {}
        cmd = [sys.executable, "-m", "vlseg.app_support.checkpoints", "--variant", "tiny", "--random-init"]
        for b in real:
            cmd += ["--bundle", str(b)]
        with open(logs / "real_init.log", "w") as log:
            subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, timeout=600)
        text = (logs / "real_init.log").read_text()
        return {b.name: (None if (b / "models" / "model.pt").is_file() else text[-2000:]) for b in real}

    t0 = time.time()
    with ThreadPoolExecutor(max_workers=2) as pool:
        jobs = [pool.submit(train_toy), pool.submit(init_real)]
        made = {k: v for j in jobs for k, v in j.result().items()}
    checkpoint_seconds = time.time() - t0

    # two bundles that must be skipped with a reason while the others load
    no_ckpt = _copy_bundle(TOY, bundles / "toy_no_checkpoint")
    wrong = _copy_bundle(TOY, bundles / "toy_wrong_variant")
    if (toy / "models" / "model.pt").is_file():
        (wrong / "models").mkdir(exist_ok=True)
        shutil.copy(toy / "models" / "model.pt", wrong / "models" / "model.pt")
        (wrong / "models" / "vlseg_checkpoint.json").write_text(json.dumps({"variant": "small"}))
    expected_skips = {no_ckpt.name: "no checkpoint", wrong.name: "made for variant 'small'"}

    app = root / "app"
    shutil.copytree(APP, app, ignore=shutil.ignore_patterns("model", "logs", "bin", "__pycache__"))
    conf = {"bundles_dir": bundles, "variant": "tiny", "scoring_samples": 2, "train_epochs": 1, "scoring_model": "toy"}
    t1 = time.time()
    handle = start_server(app, studies, conf, log_path=root / "server.log", timeout=SERVER_START_TIMEOUT,
                          env={"MONAI_LABEL_AUTO_UPDATE_SCORING": "false", "MONAI_LABEL_SESSIONS": "false"})
    print(f"\n[test_app] checkpoints {checkpoint_seconds:.0f}s, server start {time.time() - t1:.0f}s")
    try:
        yield {"url": handle.url, "studies": studies, "bundles": bundles, "made": made, "root": root,
               "expected_skips": expected_skips,
               "handle": handle, "client": MONAILabelClient(handle.url, tmpdir=str(root / "client"))}
    finally:
        stop_server(handle)
        assert handle.proc.poll() is not None


def _info(server) -> dict:
    return requests.get(f"{server['url']}/info/", timeout=30).json()


def _models(server) -> list[str]:
    return sorted(_info(server)["models"])


def _png(path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im)


def test_every_tiny_bundle_loads(server):
    """Every bundle with a fitting checkpoint loads; the two broken copies are skipped with their reason."""
    info = _info(server)
    expected = sorted(server["made"])
    problems = {k: v for k, v in server["made"].items() if v}
    skipped = dict(info["vlseg"]["skipped"])
    for name, reason in server["expected_skips"].items():
        assert reason in skipped.pop(name, ""), info["vlseg"]["skipped"]
    problems.update(skipped)
    assert not problems, f"bundles that did not load: {problems}"
    assert sorted(info["models"]) == expected
    assert set(info["strategies"]) == {"uncertainty", "random", "first", "diverse"}
    assert "uncertainty" in info["scoring"]
    assert sorted(info["trainers"]) == expected
    for name, m in info["models"].items():
        assert m["labels"] == {"polyp": 1, "cyst": 2, "lesion": 3}
        assert isinstance(m["config"]["text"], str) and m["config"]["text"]  # editable prompt (Slicer options)
        assert isinstance(m["config"]["num_samples"], int)
        assert m["vlseg"]["variant"] == "tiny" and m["vlseg"]["checkpoint"]["sha256"]


def test_infer_text_prompt_2d_with_client(server):
    client = server["client"]
    image = _png(server["studies"] / "train_0000.png")
    for model in _models(server):
        label_file, params = client.infer(model, "train_0000", {"text": "small round polyp", "num_samples": 3})
        mask = _png(label_file)
        assert mask.shape == image.shape[:2] and mask.dtype == np.uint8
        assert set(np.unique(mask)) <= {0, 1}
        assert params["model"] == model and params["prompt"] == "small round polyp"
        assert params["prompt_source"] == "text" and params["num_samples"] == 3
        assert 0.0 <= params["uncertainty_mean"] <= params["uncertainty_max"] <= 1.0
        assert params["latency_s"] > 0 and params["checkpoint"]["sha256"]
        unc = params["uncertainty"]
        assert unc["stored"] and unc["url"] == "/datastore/label?label=train_0000&tag=uncertainty"
        u = _png(client.download_label("train_0000", "uncertainty")).astype(np.float64) / unc["scale"]
        assert u.shape == image.shape[:2]
        assert abs(u.mean() - params["uncertainty_mean"]) < 1e-3


def test_infer_label_prompt_as_ohif_sends_it(server):
    """OHIF v3 class prompts: integer label ids in ``label_prompt``; the mask carries the ids."""
    for model in _models(server):
        r = requests.post(f"{server['url']}/infer/{model}", params={"image": "test_0000", "output": "json"},
                          files={"params": (None, json.dumps({"label_prompt": [2]}))}, timeout=120)
        assert r.status_code == 200, r.text
        p = r.json()
        assert p["prompt"] == "cyst" and p["prompt_source"] == "label_prompt" and p["label_names"] == {"cyst": 2}
    label_file, p2 = server["client"].infer("toy", "test_0000", {"label_prompt": [1, 3]})
    assert set(np.unique(_png(label_file))) <= {0, 1, 3}
    assert [q["prompt"] for q in p2["prompts"]] == ["polyp", "lesion"]


def test_ohif_options_free_text_and_class_prompts_win_over_it(server):
    """OHIF's panel sends the model's whole ``config`` (from /info, edited in its Options dialog) with every request:
    free text typed into Options -> ``text`` is used by *Auto-Segmentation* (no classes), and ticked classes
    (``label_prompt``) win over a ``text`` left there."""
    config = dict(_info(server)["models"]["toy"]["config"], text="dark oval cyst")

    def ohif(extra):
        r = requests.post(f"{server['url']}/infer/toy", params={"image": "test_0000", "output": "json"},
                          files={"params": (None, json.dumps({**config, **extra}))}, timeout=120)
        assert r.status_code == 200, r.text
        return r.json()

    auto = ohif({})
    assert auto["prompt"] == "dark oval cyst" and auto["prompt_source"] == "text"
    classes = ohif({"label_prompt": [2]})
    assert classes["prompt"] == "cyst" and classes["prompt_source"] == "label_prompt"


def test_uncertain_segments_drawn_and_stripped_on_save(server):
    """``uncertain_segments``: extra label values where the uncertainty is high (named in ``label_names`` so viewers
    draw them), stripped again when the label is saved, so the stored label holds only the class."""
    client = server["client"]
    label_file, p = client.infer("toy", "train_0002", {"text": "polyp", "uncertain_segments": "0.001"})
    sent = _png(label_file)
    assert p["uncertain_segments"]["threshold"] == 0.001 and p["uncertain_segments"]["pixels"] > 0
    assert set(np.unique(sent)) <= {0, 1, 129, 255} and set(np.unique(sent)) & {129, 255}
    assert {n: v for n, v in p["label_names"].items() if v > 128} == p["uncertain_segments"]["segments"]
    try:
        client.save_label("train_0002", label_file, tag="final", params={"text": "polyp", "uncertain_segments": True})
        stored = _png(client.download_label("train_0002", "final"))
        assert set(np.unique(stored)) <= {0, 1}
        assert np.array_equal(stored == 1, (sent == 1) | (sent == 129))
    finally:
        requests.delete(f"{server['url']}/datastore/label", params={"id": "train_0002", "tag": "final"}, timeout=30)
    r = requests.post(f"{server['url']}/infer/toy", params={"image": "train_0002", "output": "json"},
                      files={"params": (None, json.dumps({"text": "polyp", "uncertain_segments": "2"}))}, timeout=60)
    assert r.status_code == 422 and "uncertain_segments" in r.text


def test_infer_without_prompt_uses_configured_default(server):
    info = _info(server)
    for model in _models(server):
        _, p = server["client"].infer(model, "test_0001", {})
        assert p["prompt_source"] == "default" and p["prompt"] == info["models"][model]["config"]["text"]


def test_prompt_changes_the_toy_output(server):
    client = server["client"]
    _, a = client.infer("toy", "train_0001", {"text": "polyp"})
    _, b = client.infer("toy", "train_0001", {"text": "irregular lesion in the top left"})
    _, a2 = client.infer("toy", "train_0001", {"text": "polyp"})
    assert a["uncertainty_mean"] == a2["uncertainty_mean"]  # same prompt, same seed: same map
    assert a["uncertainty_mean"] != b["uncertainty_mean"]


def test_infer_nifti_volume_slice_by_slice(server):
    import nibabel as nib

    vol_id = "vol_000"
    ref = nib.load(str(server["studies"] / f"{vol_id}.nii.gz"))
    for model in _models(server):
        label_file, p = server["client"].infer(model, vol_id, {"text": "cyst", "num_samples": 1})
        lab = nib.load(label_file)
        assert lab.shape == ref.shape and np.allclose(lab.affine, ref.affine)
        assert p["kind"] == "volume" and p["shape"] == list(ref.shape) and p["axis"] == 2
        unc = nib.load(server["client"].download_label(vol_id, "uncertainty"))
        assert unc.shape == ref.shape and np.allclose(unc.affine, ref.affine)
        assert unc.get_data_dtype() == np.float32
        u = np.asarray(unc.dataobj)
        assert 0.0 <= u.min() and u.max() <= 1.0 and abs(float(u.mean()) - p["uncertainty_mean"]) < 1e-4


def test_upload_with_inline_uncertainty(server):
    import base64

    src = server["studies"] / "test_0001.png"
    with open(src, "rb") as f:
        r = requests.post(f"{server['url']}/infer/toy", params={"output": "json"},
                          files={"file": ("upload.png", f, "image/png"),
                                 "params": (None, json.dumps({"text": "polyp", "uncertainty_inline": True}))},
                          timeout=120)
    assert r.status_code == 200, r.text
    p = r.json()
    assert p["uncertainty"]["stored"] is False
    u = np.load(io.BytesIO(base64.b64decode(p["uncertainty"]["npy_base64"])))
    assert u.shape == _png(src).shape[:2] and u.dtype == np.float32


@pytest.mark.parametrize("params, status, fragment", [
    ({"text": ""}, 422, "prompt is empty"),
    ({"text": "x" * 10000}, 422, "10000 characters"),
    ({"num_samples": "many"}, 422, "num_samples must be an integer"),
    ({"num_samples": 10000}, 422, "num_samples must be between"),
    ({"label_prompt": [42]}, 422, "unknown label"),
    ({"device": "$print('x')"}, 422, "unknown device"),
])
def test_bad_requests_get_4xx_and_server_keeps_answering(server, params, status, fragment):
    r = requests.post(f"{server['url']}/infer/toy", params={"image": "train_0002", "output": "json"},
                      files={"params": (None, json.dumps(params))}, timeout=60)
    assert r.status_code == status, r.text
    assert fragment in r.json()["detail"]
    assert requests.get(f"{server['url']}/info/", timeout=30).status_code == 200


def test_unknown_model_and_image_are_404(server):
    r = requests.post(f"{server['url']}/infer/nope", params={"image": "train_0000"}, timeout=30)
    assert r.status_code == 404 and "available" in r.json()["detail"]
    r = requests.post(f"{server['url']}/infer/toy", params={"image": "missing_id"}, timeout=30)
    assert r.status_code == 404


LABELLED = (("train_0000", "small pale irregular lesion"), ("train_0003", "polyp"))


def _save_labels(server, app_demo) -> None:
    """Final labels with prompts for two images (the scoring and training tests need some)."""
    demo = Path(app_demo).parent
    for image_id, text in LABELLED:
        label = sorted((demo / "labels" / "train").glob(f"{image_id}_obj*.png"))[0]
        server["client"].save_label(image_id, str(label), tag="final", params={"text": f"  {text} "})


def test_save_label_stores_prompt(server, app_demo):
    client = server["client"]
    demo = Path(app_demo).parent
    _save_labels(server, app_demo)
    ds = client.datastore()
    assert ds["objects"]["train_0000"]["labels"]["final"]["info"]["text"] == "small pale irregular lesion"
    assert ds["objects"]["train_0003"]["labels"]["final"]["info"]["text"] == "polyp"
    label = sorted((demo / "labels" / "train").glob("train_0004_obj*.png"))[0]
    with pytest.raises(MONAILabelClientException) as err:
        client.save_label("train_0004", str(label), tag="final", params={"text": "$os.system('x')"})
    assert "422" in err.value.msg
    assert "final" not in client.datastore()["objects"]["train_0004"]["labels"]


def _wait_task(server, kind: str, timeout: float = 240) -> dict:
    t0 = time.time()
    while time.time() - t0 < timeout:
        r = requests.get(f"{server['url']}/{kind}/", timeout=30)
        if r.status_code == 200 and r.json().get("status") in ("DONE", "ERROR", "STOPPED"):
            return r.json()
        time.sleep(2)
    raise TimeoutError(f"{kind} task not finished after {timeout}s")


def test_scoring_writes_scores_and_strategy_serves_the_most_uncertain(server, app_demo):
    _save_labels(server, app_demo)
    r = requests.post(f"{server['url']}/scoring/uncertainty", timeout=30)
    assert r.status_code == 200, r.text
    task = _wait_task(server, "scoring")
    assert task["status"] == "DONE", "\n".join(task.get("details", []))
    key = "vlseg_uncertainty_top5"
    for _ in range(20):  # the server re-reads the datastore file the scoring subprocess wrote
        objects = server["client"].datastore()["objects"]
        unlabelled = {k: v for k, v in objects.items() if "final" not in v["labels"]}
        if all(key in v["image"]["info"] for v in unlabelled.values()):
            break
        time.sleep(0.5)
    scores = {k: v["image"]["info"].get(key) for k, v in unlabelled.items()}
    assert all(isinstance(s, float) and 0.0 <= s <= 1.0 for s in scores.values()), scores
    for v in unlabelled.values():
        info = v["image"]["info"]
        assert 0.0 <= info["vlseg_uncertainty_mean"] <= info["vlseg_uncertainty_top5"] <= 1.0
        assert info["vlseg_uncertainty_num_samples"] == 2
    labelled = [k for k, v in objects.items() if "final" in v["labels"]]
    assert labelled and all(key not in objects[k]["image"]["info"] for k in labelled)

    nxt = server["client"].next_sample("uncertainty", {})
    assert nxt["id"] in unlabelled
    assert scores[nxt["id"]] == max(scores.values())
    for strategy in ("random", "first"):
        assert server["client"].next_sample(strategy, {})["id"] in unlabelled


def test_train_task_then_infer_uses_new_checkpoint(server, app_demo):
    _save_labels(server, app_demo)
    client = server["client"]
    _, before = client.infer("toy", "test_0000", {"text": "polyp"})
    client.train_start("toy", {"max_epochs": 1})
    task = _wait_task(server, "train")
    assert task["status"] == "DONE", "\n".join(task.get("details", []))
    stats = _info(server)["train_stats"]["toy"]
    assert stats["train_items"] + stats["val_items"] >= 2 and stats["checkpoint"]["sha256"]
    _, after = client.infer("toy", "test_0000", {"text": "polyp"})
    assert after["checkpoint"]["sha256"] != before["checkpoint"]["sha256"]
    assert after["checkpoint"]["sha256"] == stats["checkpoint"]["sha256"]
    assert after["checkpoint"]["mtime"] > before["checkpoint"]["mtime"]


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("VLSEG_TEST_TORCHRUN", "") != "1",
                    reason="three more Python processes (~40-80 s on 2 cores); set VLSEG_TEST_TORCHRUN=1 to run")
def test_multi_process_training_through_torchrun(server, app_demo):
    """``num_processes`` 2: MONAI Label's torchrun path with the bundle's multi_gpu_train.json (gloo on CPU)."""
    _save_labels(server, app_demo)
    client = server["client"]
    _, before = client.infer("toy", "test_0000", {"text": "polyp"})
    before = before["checkpoint"]["sha256"]
    client.train_start("toy", {"max_epochs": 1, "num_processes": 2})
    task = _wait_task(server, "train")
    assert task["status"] == "DONE", "\n".join(task.get("details", []))
    stats = _info(server)["train_stats"]["toy"]
    assert stats["processes"] == 2 and stats["checkpoint"]["sha256"] != before
    _, after = client.infer("toy", "test_0000", {"text": "polyp"})
    assert after["checkpoint"]["sha256"] == stats["checkpoint"]["sha256"]
