"""Training-loop pieces: gradient accumulation for MONAI's ``SupervisedTrainer`` and the warm-up cosine schedule.

MONAI 1.5.2's ``SupervisedTrainer`` has no gradient accumulation; it accepts an ``iteration_update`` callable,
which :class:`AccumulationIteration` provides (the paper trains with batch 1 and 8 accumulation steps).
"""

from __future__ import annotations

import math

import torch
from monai.engines.utils import IterationEvents
from monai.utils.enums import CommonKeys as Keys

from vlseg.engine_handlers import attach_full_state as attach_full_state_shared
from vlseg.inferers import logits_of

__all__ = ["AccumulationIteration", "WarmupCosine", "EpochCosine", "lr_factor", "set_threads", "attach_full_state"]


class AccumulationIteration:
    """``SupervisedTrainer(iteration_update=AccumulationIteration(k))``: optimizer step every ``k`` iterations.

    The loss of each iteration is divided by the number of iterations in its accumulation window (the last
    window of an epoch may be shorter), so the accumulated gradient is the gradient of the mean loss.
    ``engine.state.output`` keeps the full (undivided) loss and the detached logits.
    """

    def __init__(self, accumulation_steps: int = 1):
        if int(accumulation_steps) < 1:
            raise ValueError("accumulation_steps must be >= 1")
        self.steps = int(accumulation_steps)
        self.optimizer_steps = 0

    def __call__(self, engine, batchdata):
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        batch = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs)
        if len(batch) == 2:
            inputs, targets = batch
            args, kwargs = (), {}
        else:
            inputs, targets, args, kwargs = batch
        engine.state.output = {Keys.IMAGE: inputs, Keys.LABEL: targets}
        epoch_length = engine.state.epoch_length or 1
        pos = (engine.state.iteration - 1) % epoch_length
        window_start = (pos // self.steps) * self.steps
        window = min(self.steps, epoch_length - window_start)
        engine.network.train()
        if pos == window_start:
            engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        pred = engine.inferer(inputs, engine.network, *args, **kwargs)
        engine.state.output[Keys.PRED] = pred
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        loss = engine.loss_function(pred, targets).mean()
        engine.state.output[Keys.LOSS] = loss
        engine.fire_event(IterationEvents.LOSS_COMPLETED)
        (loss / window).backward()
        engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
        if pos + 1 == window_start + window:
            engine.optimizer.step()
            self.optimizer_steps += 1
        engine.state.output[Keys.PRED] = logits_of(pred).detach()
        engine.state.output[Keys.LOSS] = loss.detach()
        engine.fire_event(IterationEvents.MODEL_COMPLETED)  # may decollate the output (MONAI workflows)
        return engine.state.output


class WarmupCosine:
    """``LambdaLR`` factor: linear warm-up over ``warmup_fraction`` of ``total_steps``, then cosine to 0
    (the public code's ``get_cosine_schedule_with_warmup`` with 5 % warm-up, "zero-shot" setting)."""

    def __init__(self, total_steps: int, warmup_fraction: float = 0.05, min_factor: float = 0.0):
        self.total = max(1, int(total_steps))
        self.warmup = int(round(self.total * float(warmup_fraction)))
        self.min_factor = float(min_factor)

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return float(step + 1) / float(max(1, self.warmup))
        progress = min(1.0, (step - self.warmup) / float(max(1, self.total - self.warmup)))
        return self.min_factor + (1.0 - self.min_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))


class EpochCosine:
    """``LambdaLR`` factor of the public code's few-shot schedule: ``CosineAnnealingLR(T_max=epochs, eta_min=0.01 x
    the decoder lr)`` stepped once per epoch, here evaluated per iteration from the epoch index (same values).
    The floor is ``min_factor`` of each group's own lr (upstream: 0.01 x the decoder lr for both groups)."""

    def __init__(self, steps_per_epoch: int, epochs: int, min_factor: float = 0.01):
        self.steps_per_epoch = max(1, int(steps_per_epoch))
        self.epochs = max(1, int(epochs))
        self.min_factor = float(min_factor)

    def __call__(self, step: int) -> float:
        epoch = min(self.epochs, step // self.steps_per_epoch)
        return self.min_factor + (1.0 - self.min_factor) * 0.5 * (1.0 + math.cos(math.pi * epoch / self.epochs))


def lr_factor(schedule: str, steps_per_epoch: int, epochs: int, warmup_fraction: float = 0.05):
    """The config's ``lr_schedule``: ``"zero"`` (zero-shot setting of the public code: per-step cosine with
    ``warmup_fraction`` linear warm-up, :class:`WarmupCosine`) or ``"few"`` (few-shot setting, :class:`EpochCosine`)."""
    if schedule == "zero":
        return WarmupCosine(int(steps_per_epoch) * int(epochs), warmup_fraction)
    if schedule == "few":
        return EpochCosine(steps_per_epoch, epochs)
    raise ValueError(f"lr_schedule must be 'zero' or 'few', got {schedule!r}")


def set_threads(n: int | None) -> int:
    """Optionally fix the number of intra-op CPU threads (``num_threads`` config key); returns the count in use."""
    if n:
        torch.set_num_threads(int(n))
    return torch.get_num_threads()


def attach_full_state(trainer, save_dir, objects: dict, resume: str | None = None, device=None) -> None:
    """Resumable full-state checkpoint (``vlseg.engine_handlers.attach_full_state``): ``full_state_*.pt`` every epoch
    and ``full_state_final.pt`` at the end; optional resumption from one."""
    attach_full_state_shared(trainer, save_dir, objects, resume=resume, map_location=device, file_prefix="full_state",
                             final_filename="full_state_final.pt")
