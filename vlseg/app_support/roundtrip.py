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

from vlseg.app_support.bundles import BundleError, discover_bundles, repo_bundles_dir
from vlseg.app_support.checkpoints import ensure_checkpoint
from vlseg.app_support.server import repo_app_dir, start_server, stop_server

__all__ = ["ensure_bundle_checkpoints", "make_studies", "run_server_round_trip"]


def _log(msg: str) -> None:
    print(f"[round-trip] {msg}", flush=True)


def ensure_bundle_checkpoints(bundles_dir=None, variant: str = "small", max_seconds: float | None = None,
                              datalist=None, log_dir=None, models=None, max_epochs: int | None = None) -> dict:
    """``{bundle: checkpoint path}`` for every bundle (training the ``variant`` where ``models/model.pt`` is absent,
    within ``max_seconds``); a bundle that fails maps to ``"FAILED: <reason>"`` (the others still run)."""
    bundles = discover_bundles(bundles_dir or repo_bundles_dir(), models)
    out: dict[str, str] = {}
    for name, path in bundles.items():
        t0 = time.time()
        log_path = Path(log_dir) / f"train_{name}.log" if log_dir else None
        if log_path:
            log_path.parent.mkdir(parents=True, exist_ok=True)
        timeout = None if not max_seconds else 3 * float(max_seconds) + 600
        try:
            out[name] = str(ensure_checkpoint(path, variant, datalist=datalist, max_epochs=max_epochs,
                                              max_seconds=max_seconds, timeout=timeout, log_path=log_path))
            _log(f"checkpoint {name} ({variant}): {out[name]} ({time.time() - t0:.0f} s)")
        except BundleError as e:
            out[name] = f"FAILED: {e}"
            _log(f"checkpoint {name} ({variant}) FAILED: {e}")
    return out


def make_studies(data_dir, studies_dir, n_images: int = 8, split: str = "test", n_volumes: int = 1) -> dict:
    """A fresh MONAI Label studies folder (flat: the local datastore lists files at its top level) holding the
    first ``n_images`` images of ``split`` and ``n_volumes`` volumes of the demo set; returns ``{image id: item}``
    (the first datalist item of each image, with its prompt and ground-truth label path)."""
    data_dir, studies = Path(data_dir), Path(studies_dir)
    datalist = json.loads((data_dir / "datalist.json").read_text())
    if studies.exists():
        shutil.rmtree(studies)
    studies.mkdir(parents=True)
    chosen: dict[str, dict] = {}
    for section, limit in ((split, n_images), ("volumes", n_volumes)):
        for item in datalist.get(section, []):
            src = data_dir / item["image"]
            name = src.name
            image_id = name[: -len(".nii.gz")] if name.endswith(".nii.gz") else src.stem
            if image_id in chosen:
                continue
            if sum(1 for v in chosen.values() if v["_section"] == section) >= limit:
                break
            shutil.copy(src, studies / name)
            chosen[image_id] = dict(item, _section=section, _path=str(studies / name), _label_path=str(data_dir / item["label"]))
    return chosen


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
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im)


def run_server_round_trip(root=None, data_dir=None, out_dir=None, variant: str = "small", bundles_dir=None,
                          models=None, n_images: int = 8, train_epochs: int = 1, train_model: str | None = None,
                          scoring_samples: int = 4, scoring_prompts: str = "default", num_samples: int | None = None,
                          port: int | None = None, timeout: float = 900.0) -> dict:
    """Run the round trip (see module doc); returns the report (also written to ``out_dir/round_trip.json``).

    Scoring uses ``scoring_prompts="default"`` (one prompt per image) to keep the demo short; the app's own default
    is ``labels`` (one map per label word, three times the work).
    """
    from monailabel.client import MONAILabelClient
    from monailabel.client.client import MONAILabelUtils

    from vlseg.viz import save_overlay

    t_start = time.time()
    root = Path(root) if root else repo_app_dir().parents[1]
    if data_dir is None:
        from vlseg.data.demo import ensure_demo_dataset

        data_dir = ensure_demo_dataset().parent
    out = Path(out_dir or root / "outputs" / "round_trip")
    out.mkdir(parents=True, exist_ok=True)
    overlays = out / "overlays"
    overlays.mkdir(exist_ok=True)
    report: dict = {"variant": variant, "steps": {}, "overlays": [], "infer": {}}
    steps = report["steps"]

    items = make_studies(data_dir, out / "studies", n_images=n_images)
    conf = {"variant": variant, "scoring_samples": scoring_samples, "scoring_prompts": scoring_prompts,
            "train_epochs": train_epochs,
            "cache_dir": str(out / "app_cache")}
    if bundles_dir:
        conf["bundles_dir"] = str(bundles_dir)
    if models:
        conf["models"] = models if isinstance(models, str) else ",".join(models)
    t0 = time.time()
    _log(f"starting monailabel server (variant {variant!r}, studies {out / 'studies'}) ...")
    server = start_server(repo_app_dir(), out / "studies", conf, port=port, log_path=out / "server.log",
                          env={"MONAI_LABEL_AUTO_UPDATE_SCORING": "false", "MONAI_LABEL_SESSIONS": "false"})
    steps["server_start_s"] = round(time.time() - t0, 1)
    _log(f"server up at {server.url} after {steps['server_start_s']} s (log: {server.log_path})")
    try:
        client = MONAILabelClient(server.url, tmpdir=str(out / "client"))
        info = client.info()
        models_loaded = sorted(info["models"])
        report["models"] = models_loaded
        report["skipped"] = info.get("vlseg", {}).get("skipped", {})
        _log(f"/info: models {models_loaded}; strategies {sorted(info['strategies'])}; scoring {sorted(info['scoring'])}")
        for name, why in report["skipped"].items():
            _log(f"  skipped {name}: {why}")
        if not models_loaded:
            raise RuntimeError("no bundle could be served; see the skipped reasons above")

        images_2d = [k for k, v in items.items() if v["_section"] != "volumes"]
        volumes = [k for k, v in items.items() if v["_section"] == "volumes"]

        # text-prompted inference for each bundle: one 2D image, and one volume for the first bundle
        t0 = time.time()
        for mi, model in enumerate(models_loaded):
            image_id = images_2d[0]
            item = items[image_id]
            params = {"text": item["text"]}
            if num_samples:
                params["num_samples"] = num_samples
            label_file, res = client.infer(model, image_id, params)
            unc = _load_2d(client.download_label(image_id, "uncertainty")).astype(np.float32) / res["uncertainty"]["scale"]
            mask = _load_2d(label_file)
            gt = _load_2d(item["_label_path"]) > 127
            path = save_overlay(overlays / f"{model}_{image_id}.png", _load_2d(item["_path"]), mask > 0, unc,
                                title=f"{model}: {item['text']}", label=gt)
            report["overlays"].append(str(path))
            inter = float(np.logical_and(mask > 0, gt).sum())
            dice = 2 * inter / max(1.0, float((mask > 0).sum() + gt.sum()))
            report["infer"][f"{model}/{image_id}"] = {
                "prompt": res["prompt"], "num_samples": res["num_samples"], "latency_s": res["latency_s"],
                "uncertainty_mean": res["uncertainty_mean"], "uncertainty_max": res["uncertainty_max"],
                "dice_vs_truth": round(dice, 4), "checkpoint_sha256": res["checkpoint"]["sha256"][:12]}
            _log(f"infer {model} on {image_id} ({item['text']!r}): {res['latency_s']:.2f} s, dice {dice:.3f}, "
                 f"uncertainty mean {res['uncertainty_mean']:.3f} max {res['uncertainty_max']:.3f} -> {path}")
            if mi == 0 and volumes:
                import nibabel as nib

                vol_id = volumes[0]
                vitem = items[vol_id]
                label_file, vres = client.infer(model, vol_id, {"text": vitem["text"]})
                vmask = np.asarray(nib.load(label_file).dataobj)
                vunc = np.asarray(nib.load(client.download_label(vol_id, "uncertainty")).dataobj)
                vimg = np.asarray(nib.load(vitem["_path"]).dataobj)
                vgt = np.asarray(nib.load(vitem["_label_path"]).dataobj) > 0
                k = int(np.argmax(vgt.sum(axis=(0, 1)))) if vgt.any() else vimg.shape[2] // 2
                path = save_overlay(overlays / f"{model}_{vol_id}_slice{k}.png", vimg[:, :, k], vmask[:, :, k] > 0,
                                    vunc[:, :, k], title=f"{model} (volume, slice {k}): {vitem['text']}",
                                    label=vgt[:, :, k])
                report["overlays"].append(str(path))
                report["infer"][f"{model}/{vol_id}"] = {"prompt": vres["prompt"], "shape": vres["shape"],
                                                        "latency_s": vres["latency_s"],
                                                        "uncertainty_mean": vres["uncertainty_mean"]}
                _log(f"infer {model} on volume {vol_id} {vres['shape']}: {vres['latency_s']:.2f} s -> {path}")
        steps["infer_s"] = round(time.time() - t0, 1)

        # labels with their prompts
        t0 = time.time()
        saved = []
        for image_id in images_2d[:2]:
            item = items[image_id]
            client.save_label(image_id, item["_label_path"], tag="final", params={"text": item["text"]})
            saved.append({"image": image_id, "text": item["text"]})
        stored = client.datastore()["objects"]
        report["saved_labels"] = [{**s, "stored_text": stored[s["image"]]["labels"]["final"]["info"].get("text")}
                                  for s in saved]
        _log(f"saved {len(saved)} labels with prompts: {[s['text'] for s in saved]}")
        steps["save_labels_s"] = round(time.time() - t0, 1)

        # scoring (background task) and active learning
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
            if all("vlseg_uncertainty_top5" in i for i in unl.values()):
                break
            time.sleep(0.5)
        report["scores"] = {k: i.get("vlseg_uncertainty_top5") for k, i in sorted(unl.items())}
        nxt = client.next_sample("uncertainty", {})
        report["next_sample"] = {"uncertainty": {"id": nxt.get("id"), "score": nxt.get("score")},
                                 "random": client.next_sample("random", {}).get("id"),
                                 "first": client.next_sample("first", {}).get("id")}
        _log(f"scoring done in {steps['scoring_s']} s; next sample (most uncertain): {nxt.get('id')} "
             f"(top-5% uncertainty {nxt.get('score')}); random: {report['next_sample']['random']}")

        # training from the server, then inference with the new checkpoint
        t0 = time.time()
        model = train_model or models_loaded[0]
        before = report["infer"][f"{model}/{images_2d[0]}"]["checkpoint_sha256"]
        client.train_start(model, {"max_epochs": train_epochs})
        task = _wait(server.url, "train", timeout)
        steps["train_s"] = round(time.time() - t0, 1)
        if task["status"] != "DONE":
            raise RuntimeError("training failed:\n" + "\n".join(task.get("details", [])[-15:]))
        stats = client.info()["train_stats"].get(model, {})
        item = items[images_2d[0]]
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
        t0 = time.time()
        stop_server(server)
        steps["server_stop_s"] = round(time.time() - t0, 1)
    report["wall_s"] = round(time.time() - t_start, 1)
    (out / "round_trip.json").write_text(json.dumps(report, indent=1, default=str))
    _log(f"overlays: {overlays}")
    _log(f"report: {out / 'round_trip.json'}; wall time {report['wall_s']} s")
    return report
