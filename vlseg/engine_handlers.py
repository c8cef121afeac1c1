"""Ignite/MONAI engine handlers shared by the bundles.

* :class:`StopAfterSeconds`: a wall-clock budget for training (benchmarks: "trained for at most N minutes").
"""

from __future__ import annotations

import logging
import time

import torch

__all__ = ["StopAfterSeconds"]

logger = logging.getLogger("vlseg")


class StopAfterSeconds:
    """Terminate an engine once ``max_seconds`` of wall clock have passed since it started.

    * at the end of every epoch (after the handlers registered before this one, e.g. validation), stop when the next
      epoch would not fit: ``elapsed + last_epoch_seconds > max_seconds``;
    * after any iteration, stop at once when ``elapsed > max_seconds`` (a hard limit).

    ``max_seconds`` of None or <= 0 disables the handler. Under torch.distributed the decision is all-reduced so all
    ranks stop together. ``engine.state.stopped_by_time`` tells whether the budget ended the run.
    """

    def __init__(self, max_seconds: float | None = None, epoch_level: bool = True):
        self.max_seconds = float(max_seconds) if max_seconds else 0.0
        self.epoch_level = bool(epoch_level)
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
        return 0.0 if self._t0 is None else time.perf_counter() - self._t0

    def _started(self, engine) -> None:
        self._t0 = time.perf_counter()
        engine.state.stopped_by_time = False

    def _epoch_started(self, engine) -> None:
        self._epoch_t0 = time.perf_counter()

    @staticmethod
    def _agree(flag: bool) -> bool:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            t = torch.tensor([1.0 if flag else 0.0])
            if torch.distributed.get_backend() == "nccl":
                t = t.cuda()
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
            return bool(t.item() > 0)
        return flag

    def _stop(self, engine, why: str) -> None:
        engine.state.stopped_by_time = True
        logger.info("StopAfterSeconds: %s (%.1f s elapsed, budget %.1f s): terminating", why, self.elapsed(), self.max_seconds)
        engine.terminate()

    def _iteration_completed(self, engine) -> None:
        if self._agree(self.elapsed() > self.max_seconds):
            self._stop(engine, "budget exceeded")

    def _epoch_completed(self, engine) -> None:
        last = time.perf_counter() - self._epoch_t0 if self._epoch_t0 is not None else 0.0
        if self._agree(self.elapsed() + last > self.max_seconds):
            self._stop(engine, "next epoch would not fit")
