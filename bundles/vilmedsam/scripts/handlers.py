"""Reporting handlers and output transforms of the bundle.

* :class:`TrainingReport` -- per-epoch train loss / validation Dice, ``learning_curve.png`` (vlseg.viz) and
  ``metrics.json`` (with the parameter counts and the encoder mode) in the output folder; written every epoch, so
  a run stopped early still leaves them.
* :class:`EvalReport` -- ``eval_metrics.json`` of an evaluation run (means, the prompt used, the demo set's
  text-blind ceiling and the margin over it).
* :class:`SetOutputNamed`, :class:`SaveArrayd`, :class:`SaveOverlayd` -- inference outputs: unique file names per
  (image, prompt) item, float ``.npy`` maps (not quantised) and an overlay PNG (vlseg.viz).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform

from vlseg.viz import save_learning_curve, save_overlay

logger = logging.getLogger("vlseg.vilmedsam")

__all__ = ["TrainingReport", "EvalReport", "SetOutputNamed", "SaveArrayd", "SaveOverlayd"]


def _unwrap(network):
    return getattr(network, "module", network)


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (torch.Tensor, np.ndarray)):
        return _jsonable(np.asarray(x.detach().cpu() if isinstance(x, torch.Tensor) else x).tolist())
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, Path):
        return str(x)
    return x


class TrainingReport:
    """Attach to the trainer AFTER the ValidationHandler (so the epoch's validation metric is available)."""

    def __init__(self, output_dir, evaluator=None, network=None, loss_fn=None, key_metric: str = "val_mean_dice",
                 extra: dict | None = None):
        self.output_dir = Path(output_dir)
        self.evaluator = evaluator
        self.network = network
        self.loss_fn = loss_fn
        self.key_metric = key_metric
        self.extra = dict(extra or {})
        self.history: dict[str, list[float]] = {"train_loss": [], self.key_metric: []}
        self.terms: dict[str, list[float]] = {}
        self._losses: list[float] = []
        self._terms: dict[str, list[float]] = {}
        self._t0 = None

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, self._started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._iteration)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._epoch)
        engine.add_event_handler(Events.COMPLETED, self._write)
        engine.add_event_handler(Events.TERMINATE, self._write)

    def _started(self, engine) -> None:
        self._t0 = time.perf_counter()

    def _iteration(self, engine) -> None:
        loss = engine.state.output.get("loss") if isinstance(engine.state.output, dict) else None
        if loss is not None:
            self._losses.append(float(loss))
        for k, v in (getattr(self.loss_fn, "last_terms", None) or {}).items():
            self._terms.setdefault(k, []).append(float(v))

    def _epoch(self, engine) -> None:
        self.history["train_loss"].append(float(np.mean(self._losses)) if self._losses else float("nan"))
        for k, v in self._terms.items():
            self.terms.setdefault(k, []).append(float(np.mean(v)))
        self._losses, self._terms = [], {}
        val = None
        if self.evaluator is not None and self.evaluator.state is not None:
            val = (self.evaluator.state.metrics or {}).get(self.key_metric)
        self.history[self.key_metric].append(float(val) if val is not None else float("nan"))
        self._write(engine)

    def _write(self, engine) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        series = {k: v for k, v in self.history.items() if v}
        if series:
            save_learning_curve(self.output_dir / "learning_curve.png", series, title="Simple-ViLMedSAM training")
        net = _unwrap(self.network) if self.network is not None else None
        vals = [v for v in self.history[self.key_metric] if v == v]
        report = {
            "epochs_completed": int(engine.state.epoch) if engine.state.iteration else 0,
            "iterations": int(engine.state.iteration),
            "train_seconds": round(time.perf_counter() - self._t0, 1) if self._t0 else None,
            "stopped_by_time": bool(getattr(engine.state, "stopped_by_time", False)),
            "history": self.history,
            "loss_terms": self.terms,
            f"best_{self.key_metric}": max(vals) if vals else None,
            "torch_threads": torch.get_num_threads(),
            **self.extra,
        }
        if net is not None and hasattr(net, "parameter_report"):
            report["parameters"] = net.parameter_report()
        (self.output_dir / "metrics.json").write_text(json.dumps(_jsonable(report), indent=1) + "\n")


class EvalReport:
    """Attach to an evaluator: writes ``eval_metrics.json`` (engine metrics, prompt and text-blind ceiling)."""

    def __init__(self, output_dir, datalist=None, extra: dict | None = None, network=None,
                 filename: str = "eval_metrics.json"):
        self.output_dir = Path(output_dir)
        self.datalist = datalist
        self.extra = dict(extra or {})
        self.network = network
        self.filename = filename
        self._t0 = None

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, lambda e: setattr(self, "_t0", time.perf_counter()))
        engine.add_event_handler(Events.COMPLETED, self._write)

    def _write(self, engine) -> None:
        from .data import text_blind_ceiling

        metrics = {k: float(v) for k, v in (engine.state.metrics or {}).items() if isinstance(v, (int, float))}
        report = {"metrics": metrics, "n_items": len(getattr(engine.data_loader, "dataset", []) or []),
                  "seconds": round(time.perf_counter() - self._t0, 1) if self._t0 else None, **self.extra}
        ceiling = text_blind_ceiling(self.datalist) if self.datalist else None
        if ceiling:
            report["text_blind_ceiling"] = ceiling
            dice = metrics.get("test_mean_dice", metrics.get("val_mean_dice"))
            if dice is not None and ceiling.get("max") is not None:
                report["margin_over_text_blind_ceiling"] = round(dice - float(ceiling["max"]), 4)
        net = _unwrap(self.network) if self.network is not None else None
        if net is not None and hasattr(net, "mode_info"):
            report["mode"] = net.mode_info
        self.output_dir.mkdir(parents=True, exist_ok=True)
        (self.output_dir / self.filename).write_text(json.dumps(_jsonable(report), indent=1) + "\n")
        logger.info("evaluation: %s", json.dumps(_jsonable({k: report[k] for k in report if k != "text_blind_ceiling"})))


def _name(d: dict, default: str = "item") -> str:
    name = d.get("name")
    if not name:
        meta = getattr(d.get("image"), "meta", {}) or {}
        name = Path(str(meta.get("filename_or_obj", default))).name.split(".")[0]
    return str(name)


class SetOutputNamed(MapTransform):
    """Give the output tensors the item's unique ``name`` (several prompts of one image would overwrite each
    other's files otherwise): sets ``meta['filename_or_obj']`` used by ``SaveImaged``."""

    def __call__(self, data):
        d = dict(data)
        name = _name(d)
        for key in self.key_iterator(d):
            if hasattr(d[key], "meta"):
                d[key].meta["filename_or_obj"] = f"{name}.png"
        return d


def _hw(x, reverse_indexing: bool) -> np.ndarray:
    a = np.asarray(x.detach().cpu() if isinstance(x, torch.Tensor) else x, dtype=np.float32)
    if a.ndim == 3 and a.shape[0] in (1, 3):
        a = np.moveaxis(a, 0, -1)
    if reverse_indexing:  # MONAI's PILReader gives (W, H): back to (H, W)
        a = np.swapaxes(a, 0, 1)
    return a.squeeze(-1) if a.ndim == 3 and a.shape[-1] == 1 else a


class SaveArrayd(MapTransform):
    """Save ``data[key]`` as float32 ``<output_dir>/<name>_<key>.npy`` in (H, W) image orientation."""

    def __init__(self, keys: KeysCollection, output_dir, reverse_indexing: bool = True):
        super().__init__(keys)
        self.output_dir = Path(output_dir)
        self.reverse_indexing = reverse_indexing

    def __call__(self, data):
        d = dict(data)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        for key in self.key_iterator(d):
            np.save(self.output_dir / f"{_name(d)}_{key}.npy", _hw(d[key], self.reverse_indexing))
        return d


class SaveOverlayd(MapTransform):
    """``<output_dir>/<name>_overlay.png``: image | mask outline | uncertainty (vlseg.viz.save_overlay)."""

    def __init__(self, keys: KeysCollection = "image", mask_key: str = "mask", uncertainty_key: str = "uncertainty",
                 output_dir=".", text_key: str = "text", reverse_indexing: bool = True):
        super().__init__(keys)
        self.mask_key, self.uncertainty_key, self.text_key = mask_key, uncertainty_key, text_key
        self.output_dir = Path(output_dir)
        self.reverse_indexing = reverse_indexing

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            img = _hw(d[key], self.reverse_indexing)
            mask = _hw(d[self.mask_key], self.reverse_indexing)
            unc = _hw(d[self.uncertainty_key], self.reverse_indexing) if self.uncertainty_key in d else None
            save_overlay(self.output_dir / f"{_name(d)}_overlay.png", img, mask, unc, title=str(d.get(self.text_key, "")))
        return d
