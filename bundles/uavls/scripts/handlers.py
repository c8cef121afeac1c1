"""Ignite/MONAI handlers used by the UA-VLS configs (the training / evaluation reports are the shared
``vlseg.engine_handlers.TrainingReport`` and ``EvalReport``)."""

from __future__ import annotations

from monai.handlers import EarlyStopHandler

__all__ = ["MinEpochEarlyStopHandler"]


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
