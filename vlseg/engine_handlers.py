"""Ignite/MONAI engine handlers shared by the bundles.

* :class:`StopAfterSeconds`: a wall-clock budget for training (benchmarks: "trained for at most N minutes").
* :class:`TrainingReport` (trainer): per-epoch learning curve -> ``learning_curve.png`` + a JSON report
  (``train_metrics.json`` by default).
* :class:`EvalReport` (evaluator): the evaluation metrics (+ settings, the demo set's text-blind ceiling) as JSON
  (``eval_metrics.json`` by default).
* :func:`attach_full_state`: resumable full-state checkpoints (model, optimizer, scheduler, trainer) every epoch.
* :func:`is_main_process`, :func:`dist_any`: torch.distributed helpers (who writes files; "any rank says stop").
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch

__all__ = ["StopAfterSeconds", "attach_full_state", "budget_clock", "TrainingReport", "EvalReport", "is_main_process", "dist_any", "jsonable"]

logger = logging.getLogger("vlseg")


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def is_main_process() -> bool:
    """True without torch.distributed and on rank 0 with it (the process that writes reports)."""
    return not _distributed() or torch.distributed.get_rank() == 0


def dist_any(flag: bool) -> bool:
    """``flag`` of this process, OR-ed over all ranks under torch.distributed (so all ranks stop together)."""
    if _distributed():
        t = torch.tensor([1.0 if flag else 0.0])
        if torch.distributed.get_backend() == "nccl":
            t = t.cuda()
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return bool(t.item() > 0)
    return flag


def jsonable(x):
    """``x`` with tensors / numpy values / paths made JSON-serialisable (dict keys as strings)."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, torch.Tensor):
        return jsonable(x.detach().cpu().numpy().tolist())
    if isinstance(x, np.ndarray):
        return jsonable(x.tolist())
    if isinstance(x, (np.floating, np.integer, np.bool_)):
        return x.item()
    if isinstance(x, Path):
        return str(x)
    return x


def budget_clock(clock: str = "wall"):
    """The clock of a training budget: ``"wall"`` -> :func:`time.perf_counter`, ``"process"`` -> CPU seconds of
    this process (:func:`time.process_time`, all threads)."""
    if clock == "wall":
        return time.perf_counter
    if clock == "process":
        return time.process_time
    raise ValueError(f"clock must be 'wall' or 'process', got {clock!r}")


def _unwrap(network):
    return getattr(network, "module", network)  # DistributedDataParallel / DataParallel


class StopAfterSeconds:
    """Terminate an engine once ``max_seconds`` of wall clock have passed since it started.

    * at the end of every epoch (after the handlers registered before this one, e.g. validation), stop when the next
      epoch would not fit: ``elapsed + last_epoch_seconds > max_seconds``;
    * after any iteration, stop at once when ``elapsed > max_seconds`` (a hard limit).

    ``max_seconds`` of None or <= 0 disables the handler. Under torch.distributed the decision is all-reduced so all
    ranks stop together. ``engine.state.stopped_by_time`` tells whether the budget ended the run.

    ``clock``: ``"wall"`` (default) counts wall-clock seconds; ``"process"`` counts the CPU seconds this process
    used (all its threads, :func:`time.process_time`), which is the budget that stays meaningful on a machine shared
    with other jobs: a run with one torch thread and a budget of N CPU seconds needs at most N seconds on one free
    core.
    """

    def __init__(self, max_seconds: float | None = None, epoch_level: bool = True, clock: str = "wall"):
        self.max_seconds = float(max_seconds) if max_seconds else 0.0
        self.epoch_level = bool(epoch_level)
        self._now = budget_clock(clock)  # raises ValueError for an unknown clock
        self.clock = clock
        self._t0 = None
        self._epoch_t0 = None

    def attach(self, engine) -> None:
        from ignite.engine import Events

        if self.max_seconds <= 0:
            return
        engine.add_event_handler(Events.STARTED, self._started)
        engine.add_event_handler(Events.EPOCH_STARTED, self._epoch_started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._iteration_completed)
        if self.epoch_level:
            engine.add_event_handler(Events.EPOCH_COMPLETED, self._epoch_completed)

    def elapsed(self) -> float:
        return 0.0 if self._t0 is None else self._now() - self._t0

    def _started(self, engine) -> None:
        self._t0 = self._now()
        engine.state.stopped_by_time = False
        engine.state.budget_clock = self.clock

    def _epoch_started(self, engine) -> None:
        self._epoch_t0 = self._now()

    def _stop(self, engine, why: str) -> None:
        engine.state.stopped_by_time = True
        logger.info("StopAfterSeconds: %s (%.1f %s s elapsed, budget %.1f s): terminating", why, self.elapsed(),
                    self.clock, self.max_seconds)
        engine.terminate()

    def _iteration_completed(self, engine) -> None:
        if dist_any(self.elapsed() > self.max_seconds):
            self._stop(engine, "budget exceeded")

    def _epoch_completed(self, engine) -> None:
        last = self._now() - self._epoch_t0 if self._epoch_t0 is not None else 0.0
        if dist_any(self.elapsed() + last > self.max_seconds):
            self._stop(engine, "next epoch would not fit")


class TrainingReport:
    """Learning curve of a trainer: ``<output_dir>/<filename>`` (JSON) and ``<output_dir>/learning_curve.png``.

    Attach AFTER the ValidationHandler, so the evaluator's metrics of the same epoch are available. Per epoch it records
    the mean training loss (``train_loss``), the mean of every term a loss exposes in ``loss_fn.last_terms``
    (``train_<term>``), the evaluator's ``metric_names`` (once they exist) and, with ``optimizer``, the learning rate
    (``lr``, not plotted). Both files are written after every epoch and at the end (also when a time budget or early
    stopping terminated the run), by the main process only. The JSON holds ``epochs_completed``, ``iterations``,
    ``elapsed_seconds``, ``stopped_by_time``, the best value and epoch of every metric (``best`` and
    ``best_<metric>`` / ``best_<metric>_epoch``), ``history``, ``loss_terms`` (the per-term series by term name),
    ``epoch_end_seconds``, ``torch_threads``, what :meth:`network_report` returns, and ``extra``.

    A bundle whose network has facts worth reporting (parameter counts, encoder mode) subclasses this and overrides
    :meth:`network_report`.
    """

    def __init__(self, output_dir, evaluator=None, loss_fn=None, network=None, optimizer=None,
                 metric_names=("val_mean_dice",), filename: str = "train_metrics.json", title: str = "training",
                 extra: dict | None = None):
        self.output_dir = Path(output_dir)
        self.evaluator = evaluator
        self.loss_fn = loss_fn
        self.network = network
        self.optimizer = optimizer
        self.metric_names = (metric_names,) if isinstance(metric_names, str) else tuple(metric_names)
        self.filename = filename
        self.title = title
        self.extra = dict(extra or {})
        self.history: dict[str, list[float]] = {"train_loss": []}
        self.epoch_seconds: list[float] = []
        self._losses: list[float] = []
        self._terms: dict[str, list[float]] = {}
        self._term_names: set[str] = set()
        self._t0 = None
        self._cpu0 = None

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, self._started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._iteration)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._epoch)
        engine.add_event_handler(Events.COMPLETED, self.write)  # ignite fires COMPLETED after TERMINATE too

    def _started(self, engine) -> None:
        self._t0 = time.perf_counter()
        self._cpu0 = time.process_time()
        self._losses, self._terms = [], {}

    def _iteration(self, engine) -> None:
        out = engine.state.output
        if isinstance(out, (list, tuple)) and out:  # decollated by the workflow: every item holds the batch loss
            out = out[0]
        loss = out.get("loss") if isinstance(out, dict) else None
        if loss is None:
            return
        self._losses.append(float(loss.detach() if torch.is_tensor(loss) else loss))
        for k, v in (getattr(self.loss_fn, "last_terms", None) or {}).items():
            self._terms.setdefault(k, []).append(float(v))

    def _epoch(self, engine) -> None:
        self.history["train_loss"].append(float(np.mean(self._losses)) if self._losses else float("nan"))
        for k, vals in self._terms.items():
            self.history.setdefault(f"train_{k}", []).append(float(np.mean(vals)))
        self._term_names |= set(self._terms)
        self._losses, self._terms = [], {}
        if self.evaluator is not None and getattr(self.evaluator, "state", None) is not None:
            for name in self.metric_names:
                value = (self.evaluator.state.metrics or {}).get(name)
                if value is not None:
                    self.history.setdefault(name, []).append(float(value))
        if self.optimizer is not None:
            self.history.setdefault("lr", []).append(float(self.optimizer.param_groups[0]["lr"]))
        self.epoch_seconds.append(self.elapsed())
        self.write(engine)

    def elapsed(self) -> float:
        return time.perf_counter() - self._t0 if self._t0 is not None else 0.0

    def network_report(self, network) -> dict:
        """Entries about the (unwrapped) network merged into the report; none by default."""
        return {}

    def summary(self, engine) -> dict:
        best: dict[str, dict] = {}
        for name in self.metric_names:
            vals = [v for v in self.history.get(name, []) if math.isfinite(v)]
            if vals:
                i = self.history[name].index(max(vals))
                best[name] = {"best": self.history[name][i], "epoch": i + 1}
        state = engine.state
        epoch_length = getattr(state, "epoch_length", None)
        completed = int(state.iteration) // int(epoch_length) if epoch_length else len(self.history["train_loss"])
        report = {
            "epochs_completed": completed,
            "iterations": int(state.iteration),
            "elapsed_seconds": round(self.elapsed(), 1),
            "cpu_seconds": round(time.process_time() - self._cpu0, 1) if self._cpu0 is not None else None,
            "budget_clock": getattr(state, "budget_clock", None),
            "stopped_by_time": bool(getattr(state, "stopped_by_time", False)),
            "best": best,
        }
        for name in self.metric_names:
            report[f"best_{name}"] = best[name]["best"] if name in best else None
            report[f"best_{name}_epoch"] = best[name]["epoch"] if name in best else None
        terms = sorted(self._term_names)
        report.update({
            "history": self.history,
            "loss_terms": {k: self.history.get(f"train_{k}", []) for k in terms},
            "epoch_end_seconds": [round(s, 1) for s in self.epoch_seconds],
            "torch_threads": torch.get_num_threads(),
        })
        if self.network is not None:
            report.update(self.network_report(_unwrap(self.network)))
        report.update(self.extra)
        return jsonable(report)

    def write(self, engine) -> None:
        if not is_main_process():
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        (self.output_dir / self.filename).write_text(json.dumps(self.summary(engine), indent=1) + "\n")
        curves = {k: v for k, v in self.history.items() if k != "lr" and any(math.isfinite(x) for x in v)}
        if curves:
            from vlseg.viz import save_learning_curve

            save_learning_curve(self.output_dir / "learning_curve.png", curves, title=self.title)


class EvalReport:
    """At the end of an evaluation writes ``<output_dir>/<filename>``: the numeric ``engine.state.metrics``
    (``metrics``), ``n_items``, ``n_iterations``, ``seconds``, ``extra`` (split, prompt, checkpoint ...) and, for a
    datalist carrying one (the demo set), its ``text_blind_ceiling`` with ``margin_over_text_blind_ceiling`` (mean Dice
    minus the ceiling's ``max``). Main process only. Subclasses add network facts with :meth:`network_report`.
    """

    def __init__(self, output_dir, filename: str = "eval_metrics.json", extra: dict | None = None, datalist=None,
                 network=None):
        self.output_dir = Path(output_dir)
        self.filename = filename
        self.extra = dict(extra or {})
        self.datalist = datalist
        self.network = network
        self._t0 = None

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, self._started)
        engine.add_event_handler(Events.COMPLETED, self)

    def _started(self, engine) -> None:
        self._t0 = time.perf_counter()

    def network_report(self, network) -> dict:
        """Entries about the (unwrapped) network merged into the report; none by default."""
        return {}

    def __call__(self, engine) -> None:
        if not is_main_process():
            return
        from vlseg.bundle_support import stored_text_blind_ceiling

        metrics = {k: float(v) for k, v in (engine.state.metrics or {}).items() if isinstance(v, (int, float))}
        report = {"metrics": metrics, "n_items": len(getattr(engine.data_loader, "dataset", []) or []),
                  "n_iterations": int(engine.state.iteration),
                  "seconds": round(time.perf_counter() - self._t0, 1) if self._t0 else None, **self.extra}
        ceiling = stored_text_blind_ceiling(self.datalist) if self.datalist else None
        if ceiling:
            report["text_blind_ceiling"] = ceiling
            dice = metrics.get("test_mean_dice", metrics.get("val_mean_dice"))
            if dice is not None and ceiling.get("max") is not None:
                report["margin_over_text_blind_ceiling"] = round(dice - float(ceiling["max"]), 4)
        if self.network is not None:
            report.update(self.network_report(_unwrap(self.network)))
        report = jsonable(report)
        path = self.output_dir / self.filename
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=1) + "\n")
        logger.info("evaluation metrics %s -> %s", metrics, path)


def attach_full_state(trainer, save_dir, objects: dict, resume: str | None = None, map_location=None,
                      save: bool = True, file_prefix: str = "checkpoint", final_filename: str | None = None):
    """Resumable training: save ``objects`` + the trainer every epoch (``<save_dir>/<file_prefix>_*.pt``, main process
    only, the latest kept; with ``final_filename`` also when training ends) and, when ``resume`` names such a file,
    load it before the run starts. Returns the trainer.

    Called from a config's ``initialize`` (or a config key) rather than listed in ``train#handlers``: the saved state
    includes the trainer itself, which a handler inside the trainer's own handler list would refer to circularly.
    """
    from monai.handlers import CheckpointLoader, CheckpointSaver

    state = dict(objects)
    state.setdefault("trainer", trainer)
    if resume:
        if not Path(str(resume)).is_file():
            raise FileNotFoundError(f"resume checkpoint {resume} not found")
        CheckpointLoader(load_path=str(resume), load_dict=state, map_location=map_location).attach(trainer)
    if save and is_main_process():
        CheckpointSaver(save_dir=str(save_dir), save_dict=state, file_prefix=file_prefix, save_interval=1,
                        epoch_level=True, n_saved=1, save_final=bool(final_filename),
                        final_filename=final_filename).attach(trainer)
    return trainer
