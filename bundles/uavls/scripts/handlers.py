"""Ignite/MONAI handlers used by the UA-VLS configs."""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import torch
from monai.handlers import EarlyStopHandler

__all__ = ["MinEpochEarlyStopHandler", "TrainingHistory", "MetricsJSONSaver", "is_main_process"]

logger = logging.getLogger("vlseg")


def is_main_process() -> bool:
    return not (torch.distributed.is_available() and torch.distributed.is_initialized()) or \
        torch.distributed.get_rank() == 0


def _metric(engine, name: str) -> float:
    value = engine.state.metrics.get(name)
    if value is None:
        raise KeyError(f"metric {name!r} not computed (have {sorted(engine.state.metrics)})")
    return float(value)


class MinEpochEarlyStopHandler(EarlyStopHandler):
    """Early stopping on a validation metric (higher is better) that never stops before ``min_epochs``.

    Paper section 4.3: patience 20, at least 20 epochs. Attach to the evaluator; the trainer is given at
    construction or with ``set_trainer`` (the configs do it in ``initialize`` to avoid a reference cycle).
    Before ``min_epochs`` the best score is still tracked but the patience counter stays at zero.
    """

    def __init__(self, patience: int = 20, metric_name: str = "val_mean_dice", min_epochs: int = 20,
                 trainer=None, min_delta: float = 0.0):
        self.metric_name = metric_name
        self.min_epochs = int(min_epochs)
        super().__init__(patience=int(patience), score_function=self._score, trainer=trainer, min_delta=min_delta)

    def _score(self, engine) -> float:
        return _metric(engine, self.metric_name)

    def __call__(self, engine) -> None:
        if self._handler is None:
            raise RuntimeError("call set_trainer() before training")
        trainer = self._handler.trainer
        if trainer.state.epoch < self.min_epochs:
            score = self._score(engine)
            best = self._handler.best_score
            if best is None or score > best + self.min_delta:
                self._handler.best_score = score
            self._handler.counter = 0
            return
        self._handler(engine)


class TrainingHistory:
    """Per-epoch record of training loss, validation metrics and learning rate.

    After every epoch (and when training ends) writes ``<output_dir>/train_metrics.json`` and the learning curve
    ``<output_dir>/learning_curve.png`` (``vlseg.viz.save_learning_curve``). Attach AFTER the ValidationHandler
    so the evaluator's metrics of the same epoch are available. Only the main process writes.
    """

    def __init__(self, output_dir: str, evaluator=None, optimizer=None, metric_names=("val_mean_dice", "val_mean_iou"),
                 extra: dict | None = None, loss_fn=None):
        self.output_dir = Path(output_dir)
        self.evaluator = evaluator
        self.optimizer = optimizer
        self.metric_names = tuple(metric_names)
        self.extra = dict(extra or {})
        self.loss_fn = loss_fn
        self.history: dict[str, list[float]] = {"train_loss": []}
        self._losses: list[float] = []
        self._terms: dict[str, list[float]] = {}
        self._t0 = None
        self.epoch_seconds: list[float] = []

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, self._started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._iteration)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._epoch)
        engine.add_event_handler(Events.COMPLETED, self._completed)

    def _started(self, engine) -> None:
        self._t0 = time.time()

    def _iteration(self, engine) -> None:
        out = engine.state.output
        if isinstance(out, list):
            out = out[0]
        loss = out.get("loss") if isinstance(out, dict) else None
        if loss is not None:
            self._losses.append(float(loss))
        for k, v in getattr(self.loss_fn, "last_terms", {}).items():
            self._terms.setdefault(k, []).append(float(v))

    def _epoch(self, engine) -> None:
        self.history["train_loss"].append(sum(self._losses) / max(len(self._losses), 1))
        self._losses = []
        for k, vals in self._terms.items():
            self.history.setdefault(f"train_{k}", []).append(sum(vals) / max(len(vals), 1))
        self._terms = {}
        if self.evaluator is not None and self.evaluator.state is not None:
            for name in self.metric_names:
                value = self.evaluator.state.metrics.get(name)
                if value is not None:
                    self.history.setdefault(name, []).append(float(value))
        if self.optimizer is not None:
            self.history.setdefault("lr", []).append(float(self.optimizer.param_groups[0]["lr"]))
        self.epoch_seconds.append(time.time() - (self._t0 or time.time()))
        self.write(engine)

    def _completed(self, engine) -> None:
        self.write(engine)

    def summary(self, engine) -> dict:
        best = {}
        for name in self.metric_names:
            vals = self.history.get(name, [])
            if vals:
                i = max(range(len(vals)), key=vals.__getitem__)
                best[name] = {"best": vals[i], "epoch": i + 1}
        return {
            "epochs_completed": len(self.history["train_loss"]),
            "iterations": int(engine.state.iteration),
            "elapsed_seconds": round(time.time() - (self._t0 or time.time()), 1),
            "best": best,
            "history": self.history,
            "epoch_end_seconds": [round(s, 1) for s in self.epoch_seconds],
            **self.extra,
        }

    def write(self, engine) -> None:
        if not is_main_process():
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        (self.output_dir / "train_metrics.json").write_text(json.dumps(self.summary(engine), indent=1) + "\n")
        curves = {k: v for k, v in self.history.items() if k != "lr" and v and all(math.isfinite(x) for x in v)}
        if curves:
            from vlseg.viz import save_learning_curve

            save_learning_curve(self.output_dir / "learning_curve.png", curves, title="UA-VLS training")


class MetricsJSONSaver:
    """At the end of an evaluation writes ``engine.state.metrics`` (plus ``extra``, e.g. the prompt variant)
    to ``path`` as JSON and logs it."""

    def __init__(self, path: str, extra: dict | None = None):
        self.path = Path(path)
        self.extra = dict(extra or {})

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine) -> None:
        if not is_main_process():
            return
        metrics = {k: float(v) for k, v in engine.state.metrics.items() if isinstance(v, (int, float))}
        out = {**self.extra, "n_iterations": int(engine.state.iteration), "metrics": metrics}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(out, indent=1) + "\n")
        logger.info("evaluation metrics %s -> %s", metrics, self.path)
