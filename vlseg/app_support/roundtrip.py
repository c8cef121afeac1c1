"""The main job's server part: a MONAI Label round trip on the demo data with the real client.

:func:`run_server_round_trip` starts ``monailabel start_server --app apps/vlseg`` on 127.0.0.1 with a studies
folder made from the demo set and, through ``monailabel.client.MONAILabelClient`` (the class the 3D Slicer module
uses), fetches ``/info``, runs a text-prompted infer for each bundle (2D images and one NIfTI volume), fetches the
uncertainty maps, saves labels with their prompts, runs the uncertainty scoring, asks active learning for the next
sample, trains one bundle briefly and infers again with the new checkpoint, then stops the server. It writes
overlay PNGs (image | mask outline | uncertainty heat map) and a ``round_trip.json`` report.

:func:`ensure_bundle_checkpoints` makes each bundle's variant checkpoint when it is absent.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
from PIL import Image

from vlseg.app_support.bundles import BundleError, discover_bundles, repo_bundles_dir
from vlseg.app_support.checkpoints import ensure_checkpoint
from vlseg.app_support.server import repo_app_dir, start_server, stop_server

__all__ = ["ensure_bundle_checkpoints", "make_studies", "run_server_round_trip"]


def _log(msg: str) -> None:
    print(f"[round-trip] {msg}", flush=True)


def ensure_bundle_checkpoints(bundles_dir=None, variant: str = "small", max_seconds: float | None = None,
                              datalist=None, log_dir=None, models=None, max_epochs: int | None = None,
                              shipped: bool = False, overrides: dict | None = None, progress=None) -> dict:
    """``{bundle: checkpoint path}`` for every bundle (the shipped checkpoint with ``shipped``, else training the
    ``variant`` where ``models/model.pt`` is absent, within ``max_seconds``, with ``overrides`` and ``progress``
    lines, see :func:`~vlseg.app_support.checkpoints.ensure_checkpoint`); a bundle that fails maps to
    ``"FAILED: <reason>"`` (the others still run)."""
    bundles = discover_bundles(bundles_dir or repo_bundles_dir(), models)
    out: dict[str, str] = {}
    for i, (name, path) in enumerate(bundles.items(), 1):
        _log(f"checkpoint {i}/{len(bundles)}: {name} ({variant}) ...")
        t0 = time.time()
        log_path = Path(log_dir) / f"train_{name}.log" if log_dir else None
        if log_path:
            log_path.parent.mkdir(parents=True, exist_ok=True)
        timeout = None if not max_seconds else 3 * float(max_seconds) + 600
        try:
            out[name] = str(ensure_checkpoint(path, variant, datalist=datalist, max_epochs=max_epochs,
                                              max_seconds=max_seconds, timeout=timeout, log_path=log_path,
                                              overrides=overrides, shipped=shipped, progress=progress))
            _log(f"checkpoint {name} ({variant}): {out[name]} ({time.time() - t0:.0f} s)")
        except BundleError as e:
            out[name] = f"FAILED: {e}"
            _log(f"checkpoint {name} ({variant}) FAILED: {e}")
    return out


def make_studies(data_dir, studies_dir, n_images: int | None = None, split: str = "test",
                 n_volumes: int | None = None) -> dict:
    """A fresh MONAI Label studies folder (flat: the local datastore lists files at its top level) holding the
    first ``n_images`` images of ``split`` and ``n_volumes`` volumes of the same split (None: all of them; test
    volumes are the held-out ones); returns ``{image id: [datalist items of that image]}`` (each with its prompt,
    ground-truth label path ``_label_path``, ``_path`` and ``_section``: ``split`` or ``"volumes"``)."""
    from vlseg.data.demo import volume_items

    data_dir, studies = Path(data_dir), Path(studies_dir)
    datalist = json.loads((data_dir / "datalist.json").read_text())
    if studies.exists():
        shutil.rmtree(studies)
    studies.mkdir(parents=True)
    chosen: dict[str, list[dict]] = {}
    sections = ((split, [it for it in datalist.get(split, []) if it.get("source", "image") == "image"], n_images),
                ("volumes", volume_items(datalist, split), n_volumes))
    for section, section_items, limit in sections:
        count = 0
        for item in section_items:
            src = data_dir / item["image"]
            name = src.name
            image_id = name[: -len(".nii.gz")] if name.endswith(".nii.gz") else src.stem
            if image_id not in chosen:
                if limit is not None and count >= limit:
                    break
                shutil.copy(src, studies / name)
                chosen[image_id] = []
                count += 1
            chosen[image_id].append(dict(item, _section=section, _path=str(studies / name),
                                         _label_path=str(data_dir / item["label"])))
    return chosen


class _Steps:
    """``[round-trip k/N] what`` lines for the steps of the round trip."""

    def __init__(self, total: int):
        self.total, self.k = total, 0

    def __call__(self, what: str) -> str:
        self.k += 1
        tag = f"round-trip {self.k}/{self.total}"
        print(f"[{tag}] {what}", flush=True)
        return tag


def _wait(client_url: str, kind: str, timeout: float) -> dict:
    import requests

    t0, last = time.time(), ""
    while time.time() - t0 < timeout:
        r = requests.get(f"{client_url}/{kind}/", timeout=30)
        if r.status_code == 200:
            task = r.json()
            details = task.get("details") or []
            if details and details[-1] != last:
                last = details[-1]
                _log(f"  {kind}: {last[:160]}")
            if task.get("status") in ("DONE", "ERROR", "STOPPED"):
                return task
        time.sleep(2)
    raise TimeoutError(f"{kind} did not finish within {timeout:.0f} s")


def _load_2d(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im)


def _arrays_2d(client, image_id: str, item: dict, label_file, res) -> dict:
    """Image, mask, uncertainty (fetched now: the next infer of the image replaces it) and truth of a 2D answer."""
    unc = _load_2d(client.download_label(image_id, "uncertainty")).astype(np.float32) / res["uncertainty"]["scale"]
    return {"image": _load_2d(item["_path"]), "mask": _load_2d(label_file) > 0, "uncertainty": unc,
            "label": _load_2d(item["_label_path"]) > 127, "name": image_id}


def _arrays_volume(client, vol_id: str, item: dict, label_file) -> dict:
    """The same for a volume answer, on the slice where the truth is largest."""
    import nibabel as nib

    vmask = np.asarray(nib.load(label_file).dataobj)
    vunc = np.asarray(nib.load(client.download_label(vol_id, "uncertainty")).dataobj)
    vimg = np.asarray(nib.load(item["_path"]).dataobj)
    vgt = np.asarray(nib.load(item["_label_path"]).dataobj) > 0
    k = int(np.argmax(vgt.sum(axis=(0, 1)))) if vgt.any() else vimg.shape[2] // 2
    return {"image": vimg[:, :, k], "mask": vmask[:, :, k] > 0, "uncertainty": vunc[:, :, k], "label": vgt[:, :, k],
            "name": f"{vol_id}_slice{k}", "slice": k}


def _fmt(summary: dict) -> str:
    return "n/a (no items)" if summary["mean"] is None else f"{summary['mean']:.3f} ({summary['n']} items)"


def run_server_round_trip(root=None, data_dir=None, out_dir=None, variant: str = "small", bundles_dir=None,
                          models=None, n_images: int | None = None, n_volumes: int | None = None,
                          train_epochs: int = 1, train_model: str | None = None, scoring_samples: int = 4,
                          scoring_prompts: str = "default", scoring_images: int = 8, num_samples: int | None = None,
                          port: int | None = None, timeout: float = 900.0) -> dict:
    """Run the round trip (see module doc); returns the report (also written to ``out_dir/round_trip.json``).

    Every model is evaluated on the first ``n_images`` 2D test images and ``n_volumes`` test volumes (None: all;
    :mod:`vlseg.app_support.demo_eval`), ``num_samples`` passes per request (None: each model's default).
    Scoring covers ``scoring_images`` images drawn at random and uses ``scoring_prompts="default"`` (one prompt
    per image) to keep the demo short; the app's own default is ``labels`` (one map per label word).
    """
    from monailabel.client import MONAILabelClient
    from monailabel.client.client import MONAILabelUtils

    from vlseg.app_support.demo_eval import evaluate_model

    t_start = time.time()
    root = Path(root) if root else repo_app_dir().parents[1]
    if data_dir is None:
        from vlseg.data.demo import ensure_demo_dataset

        data_dir = ensure_demo_dataset().parent
    out = Path(out_dir or root / "outputs" / "round_trip")
    out.mkdir(parents=True, exist_ok=True)
    overlays = out / "overlays"
    overlays.mkdir(exist_ok=True)
    for old in overlays.glob("*.png"):
        old.unlink()
    report: dict = {"variant": variant, "steps": {}, "overlays": [], "infer": {}, "dice": {}}
    steps = report["steps"]
    n_models = len(discover_bundles(bundles_dir or repo_bundles_dir(), models))
    step = _Steps(7 + n_models)

    items = make_studies(data_dir, out / "studies", n_images=n_images, n_volumes=n_volumes)
    conf = {"variant": variant, "scoring_samples": scoring_samples, "scoring_prompts": scoring_prompts,
            "scoring_max_images": scoring_images, "train_epochs": train_epochs, "cache_dir": str(out / "app_cache")}
    if bundles_dir:
        conf["bundles_dir"] = str(bundles_dir)
    if models:
        conf["models"] = models if isinstance(models, str) else ",".join(models)
    t0 = time.time()
    step(f"starting the monailabel server (variant {variant!r}, studies {out / 'studies'}: "
         f"{len(items)} images and volumes) ...")
    server = start_server(repo_app_dir(), out / "studies", conf, port=port, log_path=out / "server.log",
                          env={"MONAI_LABEL_AUTO_UPDATE_SCORING": "false", "MONAI_LABEL_SESSIONS": "false"},
                          timeout=timeout)
    steps["server_start_s"] = round(time.time() - t0, 1)
    _log(f"server up at {server.url} after {steps['server_start_s']} s (log: {server.log_path})")
    try:
        client = MONAILabelClient(server.url, tmpdir=str(out / "client"))
        step("/info")
        info = client.info()
        models_loaded = sorted(info["models"])
        report["models"] = models_loaded
        step.total = 7 + len(models_loaded)  # a bundle the server skipped has no step
        report["skipped"] = info.get("vlseg", {}).get("skipped", {})
        _log(f"/info: models {models_loaded}; strategies {sorted(info['strategies'])}; scoring {sorted(info['scoring'])}")
        for name, why in report["skipped"].items():
            _log(f"  skipped {name}: {why}")
        if not models_loaded:
            raise RuntimeError("no bundle could be served; see the skipped reasons above")

        images_2d = [k for k, v in items.items() if v[0]["_section"] != "volumes"]
        volumes = [k for k, v in items.items() if v[0]["_section"] == "volumes"]
        n_2d, n_vol = sum(len(items[k]) for k in images_2d), sum(len(items[k]) for k in volumes)

        # every model on every held-out test item (text prompt = the item's full description); overlays of the
        # first 2D item and the first volume item, titled with their Dice and the model's mean
        from vlseg.viz import save_overlay

        t0 = time.time()
        for model in models_loaded:
            tag = step(f"{model}: Dice on {n_2d} prompts of {len(images_2d)} 2D test images and {n_vol} prompts of "
                       f"{len(volumes)} test volumes")
            firsts: dict = {}

            def keep(image_id, item, label_file, res, dice, _firsts=firsts):
                kind = "volume" if item["_section"] == "volumes" else "2d"
                if kind not in _firsts:
                    arrays = (_arrays_volume(client, image_id, item, label_file) if kind == "volume"
                              else _arrays_2d(client, image_id, item, label_file, res))
                    _firsts[kind] = dict(arrays, item=item, res=res, dice=dice)

            result = evaluate_model(client, model, items, log=print, tag=tag, num_samples=num_samples, on_result=keep)
            report["dice"][model] = {k: v for k, v in result.items()}
            for kind, first in sorted(firsts.items()):
                item, res, mean = first["item"], first["res"], result[kind]["mean"]
                # viz.save_overlay keeps 120 characters of a title: the figures first, then the prompt
                where = "2D test items" if kind == "2d" else f"test volume items; slice {first['slice']}"
                title = (f"{model}: {'3D ' if kind == 'volume' else ''}Dice {first['dice']:.3f} (mean {mean:.3f} over "
                         f"{result[kind]['n']} {where})\n{item['text']}")
                path = save_overlay(overlays / f"{model}_{first['name']}.png", first["image"], first["mask"],
                                    first["uncertainty"], title=title, label=first["label"])
                report["overlays"].append(str(path))
                report["infer"][f"{model}/{first['name']}"] = {
                    "prompt": res["prompt"], "num_samples": res["num_samples"], "latency_s": res["latency_s"],
                    "uncertainty_mean": res["uncertainty_mean"], "uncertainty_max": res.get("uncertainty_max"),
                    "dice_vs_truth": round(first["dice"], 4), "checkpoint_sha256": res["checkpoint"]["sha256"][:12]}
            _log(f"{model}: mean Dice {_fmt(result['2d'])} on the 2D test items, {_fmt(result['volume'])} on the "
                 f"test volume items")
        steps["infer_s"] = round(time.time() - t0, 1)

        # labels with their prompts
        step("save 2 labels with their prompts")
        t0 = time.time()
        saved = []
        (out / "labels").mkdir(exist_ok=True)
        for image_id in images_2d[:2]:
            item = items[image_id][0]
            label01 = out / "labels" / f"{image_id}.png"  # label value 1 = the app's label "referred object"
            Image.fromarray((_load_2d(item["_label_path"]) > 127).astype(np.uint8)).save(label01)
            client.save_label(image_id, str(label01), tag="final", params={"text": item["text"]})
            saved.append({"image": image_id, "text": item["text"]})
        stored = client.datastore()["objects"]
        report["saved_labels"] = [{**s, "stored_text": stored[s["image"]]["labels"]["final"]["info"].get("text")}
                                  for s in saved]
        _log(f"saved {len(saved)} labels with prompts: {[s['text'] for s in saved]}")
        steps["save_labels_s"] = round(time.time() - t0, 1)

        # scoring (background task) and active learning
        step(f"uncertainty scoring of {scoring_images} unlabelled images (background task, {scoring_samples} passes)")
        t0 = time.time()
        status, body, _, _ = MONAILabelUtils.http_method("POST", server.url, "/scoring/uncertainty")
        if status != 200:
            raise RuntimeError(f"scoring request failed: {status} {body!r}")
        task = _wait(server.url, "scoring", timeout)
        steps["scoring_s"] = round(time.time() - t0, 1)
        if task["status"] != "DONE":
            raise RuntimeError("scoring failed:\n" + "\n".join(task.get("details", [])[-10:]))
        for _ in range(20):  # the server re-reads the datastore file written by the scoring subprocess
            objects = client.datastore()["objects"]
            unl = {k: v["image"]["info"] for k, v in objects.items() if "final" not in v["labels"]}
            if sum("vlseg_uncertainty_top5" in i for i in unl.values()) >= min(scoring_images or len(unl), len(unl)):
                break
            time.sleep(0.5)
        report["scores"] = {k: i.get("vlseg_uncertainty_top5") for k, i in sorted(unl.items())
                            if i.get("vlseg_uncertainty_top5") is not None}
        step("active learning: next sample")
        nxt = client.next_sample("uncertainty", {})
        report["next_sample"] = {"uncertainty": {"id": nxt.get("id"), "score": nxt.get("score")},
                                 "random": client.next_sample("random", {}).get("id"),
                                 "first": client.next_sample("first", {}).get("id")}
        _log(f"scoring done in {steps['scoring_s']} s; next sample (most uncertain): {nxt.get('id')} "
             f"(top-5% uncertainty {nxt.get('score')}); random: {report['next_sample']['random']}")

        # training from the server, then inference with the new checkpoint
        model = train_model or models_loaded[0]
        step(f"training {model} from the server ({train_epochs} epoch(s)), then infer with the new checkpoint")
        t0 = time.time()
        before = report["infer"][f"{model}/{images_2d[0]}"]["checkpoint_sha256"]
        client.train_start(model, {"max_epochs": train_epochs})
        task = _wait(server.url, "train", timeout)
        steps["train_s"] = round(time.time() - t0, 1)
        if task["status"] != "DONE":
            raise RuntimeError("training failed:\n" + "\n".join(task.get("details", [])[-15:]))
        stats = client.info()["train_stats"].get(model, {})
        item = items[images_2d[0]][0]
        label_file, res = client.infer(model, images_2d[0], {"text": item["text"]})
        unc = _load_2d(client.download_label(images_2d[0], "uncertainty")).astype(np.float32) / res["uncertainty"]["scale"]
        path = save_overlay(overlays / f"{model}_{images_2d[0]}_after_training.png", _load_2d(item["_path"]),
                            _load_2d(label_file) > 0, unc, title=f"{model} after server training: {item['text']}",
                            label=_load_2d(item["_label_path"]) > 127)
        report["overlays"].append(str(path))
        report["training"] = {"model": model, "seconds": steps["train_s"], "stats": stats,
                              "checkpoint_before": before, "checkpoint_after": res["checkpoint"]["sha256"][:12]}
        _log(f"trained {model} for {train_epochs} epoch(s) in {steps['train_s']} s; checkpoint {before} -> "
             f"{res['checkpoint']['sha256'][:12]}; infer after training -> {path}")
    finally:
        step("stopping the server")
        t0 = time.time()
        stop_server(server)
        steps["server_stop_s"] = round(time.time() - t0, 1)
    report["wall_s"] = round(time.time() - t_start, 1)
    (out / "round_trip.json").write_text(json.dumps(report, indent=1, default=str))
    _log(f"overlays: {overlays}")
    _log(f"report: {out / 'round_trip.json'}; wall time {report['wall_s']} s")
    return report
