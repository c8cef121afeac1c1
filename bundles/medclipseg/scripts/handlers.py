"""Engine handlers and output writers of the MedCLIPSeg bundle.

* :class:`TrainingReport` (trainer): per-epoch mean loss (and loss terms) + validation Dice -> learning-curve PNG and
  ``train_metrics.json`` at the end (also when a time budget stopped the run).
* :class:`SegmentationReport` (evaluator): per-image Dice / IoU / NSD(2 px) from :mod:`vlseg.metrics`, mean
  uncertainty on boundary / interior / background pixels, CSV + JSON summary.
* :class:`SaveOverlayd`, :class:`SaveArrayd`: inference outputs (overlay PNG via :mod:`vlseg.viz`, float ``.npy``).
"""

from __future__ import annotations

import csv
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
from monai.transforms import MapTransform
from scipy import ndimage

from vlseg.metrics import segmentation_metrics, summarize
from vlseg.viz import save_learning_curve, save_overlay

__all__ = ["TrainingReport", "SegmentationReport", "SaveOverlayd", "SaveArrayd", "OutputNamed", "attach_full_state", "boundary_interior_uncertainty",
           "is_rank0"]

logger = logging.getLogger("vlseg.medclipseg")


def is_rank0() -> bool:
    return not (torch.distributed.is_available() and torch.distributed.is_initialized()) or torch.distributed.get_rank() == 0


def _np(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().float().numpy()
    return np.asarray(x, dtype=np.float32)


def boundary_interior_uncertainty(uncertainty, label, band: int = 2) -> dict[str, float]:
    """Mean uncertainty on pixels within ``band`` px of the ground-truth object boundary, on the object interior
    (foreground farther than ``band`` from the boundary) and on the background farther than ``band``."""
    u = _np(uncertainty).squeeze()
    g = _np(label).squeeze() > 0.5
    if u.shape != g.shape:
        raise ValueError(f"uncertainty {u.shape} vs label {g.shape}")
    inner = ndimage.binary_erosion(g, iterations=band, border_value=0)
    outer = ndimage.binary_dilation(g, iterations=band)
    boundary = outer & ~inner
    background = ~outer

    def mean(m):
        return float(u[m].mean()) if m.any() else float("nan")

    return {"unc_boundary": mean(boundary), "unc_interior": mean(inner), "unc_background": mean(background),
            "unc_mean": float(u.mean())}


class TrainingReport:
    """Collects the learning curve; writes ``learning_curve.png`` and ``train_metrics.json`` into ``output_dir``."""

    def __init__(self, output_dir, evaluator=None, loss_fn=None, network=None, metric_name: str = "val_mean_dice",
                 extra: dict | None = None):
        self.output_dir = Path(output_dir)
        self.evaluator = evaluator
        self.loss_fn = loss_fn
        self.network = network
        self.metric_name = metric_name
        self.extra = extra or {}
        self.history: dict[str, list[float]] = {"train_loss": []}
        self._sums: dict[str, float] = {}
        self._n = 0
        self._t0 = None
        self._written = False

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, self._started)
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._iteration)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._epoch)
        engine.add_event_handler(Events.COMPLETED, self._write)

    def _started(self, engine):
        self._t0 = time.perf_counter()

    def _reset(self, engine):
        self._sums, self._n = {}, 0

    def _iteration(self, engine):
        out = engine.state.output
        out = out[0] if isinstance(out, list) else out
        loss = out.get("loss") if isinstance(out, dict) else None
        if loss is None:
            return
        self._sums["train_loss"] = self._sums.get("train_loss", 0.0) + float(loss.detach() if torch.is_tensor(loss) else loss)
        for k, v in (getattr(self.loss_fn, "last_terms", None) or {}).items():
            self._sums[f"train_{k}"] = self._sums.get(f"train_{k}", 0.0) + float(v)
        self._n += 1

    def _epoch(self, engine):
        for k, v in self._sums.items():
            self.history.setdefault(k, []).append(v / max(self._n, 1))
        if self.evaluator is not None and getattr(self.evaluator, "state", None) is not None:
            val = self.evaluator.state.metrics.get(self.metric_name)
            if val is not None:
                self.history.setdefault(self.metric_name, []).append(float(val))

    def _write(self, engine):
        if not is_rank0():
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        curves = {k: v for k, v in self.history.items() if v}
        if curves:
            save_learning_curve(self.output_dir / "learning_curve.png", curves, title="MedCLIPSeg training")
        val = self.history.get(self.metric_name, [])
        report = {
            "epochs_completed": int(engine.state.epoch),
            "iterations": int(engine.state.iteration),
            "wall_seconds": round(time.perf_counter() - self._t0, 1) if self._t0 else None,
            "stopped_by_time": bool(getattr(engine.state, "stopped_by_time", False)),
            f"best_{self.metric_name}": max(val) if val else None,
            f"best_{self.metric_name}_epoch": int(np.argmax(val)) + 1 if val else None,
            "history": self.history,
            **self.extra,
        }
        net = self.network.module if hasattr(self.network, "module") else self.network
        if net is not None and hasattr(net, "adapter_parameters"):
            report["parameters"] = net.adapter_parameters()
            report["encoders"] = {"pretrained": bool(net.encoders_pretrained), "trainable": bool(net.encoders_trainable),
                                  "image": {"pretrained": bool(net.encoders_pretrained), "trainable": bool(net.vision_trainable)},
                                  "text": {"pretrained": bool(net.text_pretrained), "trainable": bool(net.text_trainable)}}
        (self.output_dir / "train_metrics.json").write_text(json.dumps(report, indent=2) + "\n")
        logger.info("wrote %s", self.output_dir / "train_metrics.json")


class SegmentationReport:
    """Per-image metrics of an evaluator run (``pred`` = mean probability, ``uncertainty``, ``label``).

    Writes ``<output_dir>/metrics_<tag>.csv`` (one row per image) and ``metrics_<tag>.json`` (means) and puts the
    means into ``engine.state.metrics`` (``dice``, ``iou``, ``nsd``, ``unc_boundary`` ...).
    """

    def __init__(self, output_dir, tag: str = "eval", threshold: float = 0.5, nsd_tolerance: float = 2.0,
                 band: int = 2, label_key: str = "label", extra: dict | None = None):
        self.output_dir = Path(output_dir)
        self.label_key = label_key
        self.tag = tag
        self.threshold = float(threshold)
        self.nsd_tolerance = float(nsd_tolerance)
        self.band = int(band)
        self.extra = extra or {}
        self.rows: list[dict] = []

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.EPOCH_STARTED, lambda e: self.rows.clear())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._iteration)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._epoch)

    def _iteration(self, engine):
        outputs = engine.state.output
        outputs = outputs if isinstance(outputs, list) else [outputs]
        batch = engine.state.batch
        for i, out in enumerate(outputs):
            item = batch[i] if isinstance(batch, list) and i < len(batch) else {}
            pred = _np(out["pred"]).squeeze()
            label = out[self.label_key] if self.label_key in out else item[self.label_key]
            label = _np(label).squeeze()
            meta = getattr(out["pred"], "meta", {}) or {}
            row = {"image": str(meta.get("filename_or_obj", "")), "text": str(item.get("text", ""))}
            if not row["text"] and isinstance(batch, dict) and batch.get("text") is not None and i < len(batch["text"]):
                row["text"] = str(batch["text"][i])
            row.update(segmentation_metrics(pred >= self.threshold, label > 0.5, nsd_tolerance=self.nsd_tolerance))
            if "uncertainty" in out:
                row.update(boundary_interior_uncertainty(out["uncertainty"], label, band=self.band))
            self.rows.append(row)

    def _epoch(self, engine):
        keys = ("dice", "iou", "nsd", "unc_boundary", "unc_interior", "unc_background", "unc_mean")
        keys = [k for k in keys if self.rows and k in self.rows[0]]
        summary = summarize(self.rows, keys=[k for k in keys if not k.startswith("unc")])
        for k in keys:
            if k.startswith("unc"):
                vals = np.array([r[k] for r in self.rows], dtype=float)
                summary[k] = float(np.nanmean(vals)) if np.isfinite(vals).any() else float("nan")
        for k in keys:
            engine.state.metrics[k] = summary[k]
        summary.update(self.extra)
        if not is_rank0():
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        with open(self.output_dir / f"metrics_{self.tag}.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(self.rows[0].keys()) if self.rows else ["image"])
            w.writeheader()
            w.writerows(self.rows)
        (self.output_dir / f"metrics_{self.tag}.json").write_text(json.dumps(summary, indent=2) + "\n")
        logger.info("%s: %s", self.tag, {k: round(v, 4) if isinstance(v, float) else v for k, v in summary.items()})


def _out_name(data: dict, key: str, postfix: str) -> str:
    meta = getattr(data.get(key), "meta", {}) or {}
    stem = data.get("name") or meta.get("filename_or_obj") or "image"
    stem = Path(str(stem)).name
    for ext in (".nii.gz", ".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".nii", ".npy"):
        if stem.lower().endswith(ext):
            stem = stem[: -len(ext)]
            break
    return f"{stem}_{postfix}"


class OutputNamed(MapTransform):
    """Name the outputs of an item after ``data[name_key]`` (set by :func:`scripts.data.inference_items`): the
    ``filename_or_obj`` meta entry that SaveImaged names files by becomes ``<name>.png``; the source image path is
    kept as ``source_image``. Several samples of one image (different prompts) thus get separate folders."""

    def __init__(self, keys, name_key: str = "name", allow_missing_keys: bool = True):
        super().__init__(keys, allow_missing_keys)
        self.name_key = name_key

    def __call__(self, data):
        d = dict(data)
        name = d.get(self.name_key)
        if not name:
            return d
        for key in self.key_iterator(d):
            meta = getattr(d[key], "meta", None)
            if meta is not None:
                meta.setdefault("source_image", meta.get("filename_or_obj"))
                meta["filename_or_obj"] = f"{name}.png"
        return d


class SaveArrayd(MapTransform):
    """Save ``data[key]`` (float) as ``<output_dir>/<image stem>/<stem>_<postfix>.npy`` in the ORIGINAL image
    orientation (rows = image rows), unquantised."""

    def __init__(self, keys, output_dir, postfix: str = "uncertainty", allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.output_dir, self.postfix = Path(output_dir), postfix

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            name = _out_name(d, key, self.postfix)
            folder = self.output_dir / name.rsplit("_" + self.postfix, 1)[0]
            folder.mkdir(parents=True, exist_ok=True)
            arr = _np(d[key]).squeeze()
            np.save(folder / f"{name}.npy", arr.T if arr.ndim == 2 else arr)  # PILReader loads images transposed
        return d


class SaveOverlayd(MapTransform):
    """Overlay PNG (image | mask outline | uncertainty) via :func:`vlseg.viz.save_overlay` for each item.

    Reads the original image from the ``image`` meta data (PIL), so the overlay is at the original size.
    """

    def __init__(self, keys="pred", output_dir=".", uncertainty_key: str = "uncertainty", text_key: str = "text",
                 threshold: float = 0.5, label_key: str | None = None, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.output_dir = Path(output_dir)
        self.uncertainty_key, self.text_key, self.label_key = uncertainty_key, text_key, label_key
        self.threshold = float(threshold)

    def __call__(self, data):
        from PIL import Image

        d = dict(data)
        for key in self.key_iterator(d):
            meta = getattr(d[key], "meta", {}) or {}
            src = meta.get("source_image") or meta.get("filename_or_obj")
            pred = _np(d[key]).squeeze().T  # MONAI's PILReader gives [W, H]: back to rows x cols
            unc = _np(d[self.uncertainty_key]).squeeze().T if self.uncertainty_key in d else None
            image = np.asarray(Image.open(src).convert("RGB")) if src and Path(str(src)).is_file() else pred
            label = None
            if self.label_key and self.label_key in d and hasattr(d[self.label_key], "shape"):
                label = _np(d[self.label_key]).squeeze().T
            name = _out_name(d, key, "overlay")
            folder = self.output_dir / name.rsplit("_overlay", 1)[0]
            save_overlay(folder / f"{name}.png", image, pred >= self.threshold, unc, title=str(d.get(self.text_key, "")),
                         label=label)
        return d


def attach_full_state(trainer, ckpt_dir, objects: dict, resume: str | None = None, map_location=None, save: bool = True):
    """Resumable training: save ``objects`` + the trainer every epoch (``<ckpt_dir>/checkpoint_*.pt``, rank 0, the
    latest kept) and, when ``resume`` names such a file, load it before the run starts.

    Attached here rather than in ``train#handlers`` because the trainer itself is part of the saved state (a config
    handler referring to ``@train#trainer`` inside the trainer's own handler list would be a circular reference).
    """
    from monai.handlers import CheckpointLoader, CheckpointSaver

    state = dict(objects)
    state["trainer"] = trainer
    if resume:
        if not Path(str(resume)).is_file():
            raise FileNotFoundError(f"resume checkpoint {resume} not found")
        CheckpointLoader(load_path=str(resume), load_dict=state, map_location=map_location).attach(trainer)
    if save and is_rank0():
        CheckpointSaver(save_dir=str(ckpt_dir), save_dict=state, file_prefix="checkpoint", save_interval=1,
                        epoch_level=True, n_saved=1).attach(trainer)
    return trainer
