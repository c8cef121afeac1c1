"""Engine handlers of the MedCLIPSeg bundle.

* :class:`TrainingReport` (trainer): the shared ``vlseg.engine_handlers.TrainingReport`` (learning-curve PNG and
  ``train_metrics.json``, also when a time budget stopped the run) plus the adapter parameter counts and the encoder
  mode.
* :class:`SegmentationReport` (evaluator): per-image Dice / IoU / NSD(2 px) from :mod:`vlseg.metrics`, mean
  uncertainty on boundary / interior / background pixels, CSV + JSON summary.
* :func:`attach_full_state`: resumable full-state checkpoints.

The inference output transforms (``OutputNamed``, ``SaveArrayd``, ``SaveOverlayd``) are shared:
:mod:`vlseg.bundle_support`.
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from vlseg import engine_handlers
from vlseg.engine_handlers import is_main_process
from vlseg.metrics import segmentation_metrics, summarize

__all__ = ["TrainingReport", "SegmentationReport", "attach_full_state", "boundary_interior_uncertainty"]

logger = logging.getLogger("vlseg.medclipseg")


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


class TrainingReport(engine_handlers.TrainingReport):
    """``vlseg.engine_handlers.TrainingReport`` (``train_metrics.json`` + ``learning_curve.png``) with the adapter
    parameter counts (``parameters``) and the encoder mode (``encoders``: pretrained / trainable per tower)."""

    def __init__(self, output_dir, evaluator=None, loss_fn=None, network=None, metric_name: str = "val_mean_dice",
                 extra: dict | None = None, **kwargs):
        kwargs.setdefault("title", "MedCLIPSeg training")
        super().__init__(output_dir, evaluator=evaluator, loss_fn=loss_fn, network=network, metric_names=(metric_name,),
                         extra=extra, **kwargs)

    def network_report(self, net) -> dict:
        if not hasattr(net, "adapter_parameters"):
            return {}
        return {"parameters": net.adapter_parameters(),
                "encoders": {"pretrained": bool(net.encoders_pretrained), "trainable": bool(net.encoders_trainable),
                             "image": {"pretrained": bool(net.encoders_pretrained), "trainable": bool(net.vision_trainable)},
                             "text": {"pretrained": bool(net.text_pretrained), "trainable": bool(net.text_trainable)}}}


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
        if not is_main_process():
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        with open(self.output_dir / f"metrics_{self.tag}.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(self.rows[0].keys()) if self.rows else ["image"])
            w.writeheader()
            w.writerows(self.rows)
        (self.output_dir / f"metrics_{self.tag}.json").write_text(json.dumps(summary, indent=2) + "\n")
        logger.info("%s: %s", self.tag, {k: round(v, 4) if isinstance(v, float) else v for k, v in summary.items()})


def attach_full_state(trainer, ckpt_dir, objects: dict, resume: str | None = None, map_location=None, save: bool = True):
    """Resumable training (``vlseg.engine_handlers.attach_full_state``): ``<ckpt_dir>/checkpoint_*.pt`` every epoch."""
    return engine_handlers.attach_full_state(trainer, ckpt_dir, objects, resume=resume, map_location=map_location,
                                             save=save, file_prefix="checkpoint")
