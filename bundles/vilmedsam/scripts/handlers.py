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

__all__ = ["TrainingReport", "EvalReport", "SetOutputNamed", "SaveArrayd", "SaveOverlayd", "CLIPAlignmentStage"]


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
        out = engine.state.output
        if isinstance(out, (list, tuple)) and out:  # decollated by the workflow: every item holds the batch loss
            out = out[0]
        loss = out.get("loss") if isinstance(out, dict) else None
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


def _dist_any(flag: bool) -> bool:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        t = torch.tensor([1.0 if flag else 0.0])
        if torch.distributed.get_backend() == "nccl":
            t = t.cuda()
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return bool(t.item() > 0)
    return flag


class CLIPAlignmentStage:
    """Small / tiny variants only: fit the randomly initialised CLIP towers BEFORE the main training, then freeze.

    The paper relies on a pretrained (BiomedCLIP) CLIP whose image-text alignment makes the M2IB map point at the
    named object; a random CLIP has none. On ``Events.STARTED`` this handler runs the training data loader through
    ``SimpleViLMedSAM.alignment_loss`` (region-text InfoNCE at the bottleneck layer, using the training masks),
    optimising only the CLIP parameters with AdamW, for ``max_seconds`` wall clock and/or ``max_iterations``. Then
    the CLIP towers are frozen, so the main training is the paper's (CLIP frozen, M2IB maps cacheable).
    Under torch.distributed the CLIP gradients are averaged over ranks and the stop decision is shared.
    Does nothing when the CLIP is not trainable (pretrained weights loaded) or no budget is given.
    """

    def __init__(self, network, dataloader, max_seconds: float | None = None, max_iterations: int | None = None,
                 lr: float = 1e-3, weight_decay: float = 1e-4, log_every: int = 50, device=None):
        self.network = network
        self.dataloader = dataloader
        self.max_seconds = float(max_seconds or 0)
        self.max_iterations = int(max_iterations or 0)
        self.lr, self.weight_decay = float(lr), float(weight_decay)
        self.log_every = int(log_every)
        self.device = device

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, self.run)

    def run(self, engine=None) -> dict:
        net = _unwrap(self.network)
        params = [p for p in net.clip.parameters() if p.requires_grad]
        if not params or (self.max_seconds <= 0 and self.max_iterations <= 0):
            return {}
        device = self.device or next(net.parameters()).device
        opt = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
        dist = torch.distributed.is_available() and torch.distributed.is_initialized()
        world = torch.distributed.get_world_size() if dist else 1
        was_training = net.training
        net.train()
        t0, it, losses, accs = time.perf_counter(), 0, [], []
        done = False
        while not done:
            for batch in self.dataloader:
                img = batch["image"].to(device).float()
                ids = torch.as_tensor(batch["text_ids"]).to(device).long()
                ids = net._text_ids(ids, device)
                lab = batch["label"].to(device).float()
                pix = net.clip.preprocess(img)
                tokens = net.clip.tokens_at(pix, net.prompter.layer)
                text_emb = net.clip.encode_text(ids)
                loss = net.alignment_loss(tokens, text_emb, ids, lab)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if dist:
                    for p in params:
                        if p.grad is not None:
                            torch.distributed.all_reduce(p.grad)
                            p.grad /= world
                opt.step()
                it += 1
                losses.append(float(loss.detach()))
                accs.append(net.last_alignment_accuracy)
                if self.log_every and it % self.log_every == 0:
                    logger.info("CLIP alignment stage: iteration %d, loss %.4f, pointing accuracy %.3f (%.0f s)",
                                it, float(np.mean(losses[-self.log_every:])), float(np.mean(accs[-self.log_every:])),
                                time.perf_counter() - t0)
                stop = (self.max_iterations > 0 and it >= self.max_iterations) or (
                    self.max_seconds > 0 and time.perf_counter() - t0 >= self.max_seconds)
                if _dist_any(stop):
                    done = True
                    break
        for p in net.clip.parameters():
            p.requires_grad_(False)
        net.train(was_training)
        tail = max(1, min(50, len(losses)))
        info = {"iterations": it, "seconds": round(time.perf_counter() - t0, 1),
                "final_loss": float(np.mean(losses[-tail:])), "final_pointing_accuracy": float(np.mean(accs[-tail:]))}
        net.mode_info["clip_trainable"] = False
        net.mode_info["clip_alignment_stage"] = info
        logger.info("CLIP alignment stage done, CLIP frozen: %s", info)
        return info
