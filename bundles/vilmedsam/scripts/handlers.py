"""Engine handlers of the bundle.

* :class:`TrainingReport` -- the shared ``vlseg.engine_handlers.TrainingReport`` writing ``learning_curve.png`` and
  ``metrics.json`` (every epoch, so a run stopped early still leaves them) with the parameter counts and the
  encoder mode of the network.
* :class:`EvalReport` -- the shared ``vlseg.engine_handlers.EvalReport`` (``eval_metrics.json``: means, the prompt
  used, the demo set's text-blind ceiling and the margin over it) with the encoder mode.
* :class:`CLIPAlignmentStage` -- small / tiny variants: fit a randomly initialised CLIP before the main training.

The inference output transforms (``OutputNamed``, ``SaveArrayd``, ``SaveOverlayd``) are shared:
:mod:`vlseg.bundle_support`.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from vlseg import engine_handlers
from vlseg.engine_handlers import budget_clock, dist_any

from .alignment import alignment_loss

logger = logging.getLogger("vlseg.vilmedsam")

__all__ = ["TrainingReport", "EvalReport", "CLIPAlignmentStage"]


def _unwrap(network):
    return getattr(network, "module", network)


class TrainingReport(engine_handlers.TrainingReport):
    """Attach to the trainer AFTER the ValidationHandler (so the epoch's validation metric is available).
    ``metrics.json`` + ``learning_curve.png``, with ``parameters`` = ``SimpleViLMedSAM.parameter_report()``."""

    def __init__(self, output_dir, evaluator=None, network=None, loss_fn=None, key_metric: str = "val_mean_dice",
                 extra: dict | None = None, **kwargs):
        kwargs.setdefault("filename", "metrics.json")
        kwargs.setdefault("title", "Simple-ViLMedSAM training")
        super().__init__(output_dir, evaluator=evaluator, loss_fn=loss_fn, network=network, metric_names=(key_metric,),
                         extra=extra, **kwargs)

    def network_report(self, net) -> dict:
        return {"parameters": net.parameter_report()} if hasattr(net, "parameter_report") else {}


class EvalReport(engine_handlers.EvalReport):
    """``eval_metrics.json`` (engine metrics, prompt and text-blind ceiling) with the encoder mode (``mode``)."""

    def network_report(self, net) -> dict:
        return {"mode": net.mode_info} if hasattr(net, "mode_info") else {}


class CLIPAlignmentStage:
    """Small / tiny variants only: fit the randomly initialised CLIP towers BEFORE the main training, then freeze.

    The paper relies on a pretrained (BiomedCLIP) CLIP whose image-text alignment makes the M2IB map point at the
    named object; a random CLIP has none. On ``Events.STARTED`` this handler runs the training data loader through
    :func:`scripts.alignment.alignment_loss` (dense patch-text BCE, bottleneck margin and attribution terms at the
    M2IB layer, using the training masks), optimising only the CLIP and alignment-head parameters with AdamW, for ``max_seconds`` (on ``clock``: ``wall`` or ``process`` CPU
    seconds, as :class:`vlseg.engine_handlers.StopAfterSeconds`) and/or ``max_iterations``. Then
    the CLIP towers are frozen, so the main training is the paper's (CLIP frozen, M2IB maps cacheable).
    Under torch.distributed the CLIP gradients are averaged over ranks and the stop decision is shared.
    Does nothing when the CLIP is not trainable (pretrained weights loaded) or no budget is given. When the run
    resumes from a full-state checkpoint (``resume``), the aligned CLIP weights come from that checkpoint: the stage
    only freezes the CLIP towers instead of aligning again (the checkpoint would overwrite that work anyway).
    """

    def __init__(self, network, dataloader, max_seconds: float | None = None, max_iterations: int | None = None,
                 lr: float = 1e-3, weight_decay: float = 1e-4, log_every: int = 50, device=None, clock: str = "wall",
                 resume: str | None = None):
        self.network = network
        self.resume = resume
        self.dataloader = dataloader
        self.max_seconds = float(max_seconds or 0)
        self.clock = clock
        self._now = budget_clock(clock)
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
        if params and net.align_head is not None:
            params += [p for p in net.align_head.parameters() if p.requires_grad]
        if not params or (self.max_seconds <= 0 and self.max_iterations <= 0):
            return {}
        if self.resume:
            self._freeze(net)
            info = {"skipped": f"resuming from {self.resume}: aligned CLIP weights come from the checkpoint"}
            net.mode_info["clip_alignment_stage"] = info
            logger.info("CLIP alignment stage skipped, CLIP frozen: %s", info["skipped"])
            return info
        device = self.device or next(net.parameters()).device
        opt = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
        dist = torch.distributed.is_available() and torch.distributed.is_initialized()
        world = torch.distributed.get_world_size() if dist else 1
        was_training = net.training
        net.train()
        t0, it, losses, accs = self._now(), 0, [], []
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
                loss = alignment_loss(net, tokens, text_emb, lab)
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
                                self._now() - t0)
                stop = (self.max_iterations > 0 and it >= self.max_iterations) or (
                    self.max_seconds > 0 and self._now() - t0 >= self.max_seconds)
                if dist_any(stop):
                    done = True
                    break
        self._freeze(net)
        net.train(was_training)
        tail = max(1, min(50, len(losses)))
        info = {"iterations": it, "seconds": round(self._now() - t0, 1),
                "final_loss": float(np.mean(losses[-tail:])), "final_pointing_accuracy": float(np.mean(accs[-tail:]))}
        net.mode_info["clip_alignment_stage"] = info
        logger.info("CLIP alignment stage done, CLIP frozen: %s", info)
        return info

    @staticmethod
    def _freeze(net) -> None:
        for p in net.clip.parameters():
            p.requires_grad_(False)
        if net.align_head is not None:
            for p in net.align_head.parameters():
                p.requires_grad_(False)
        net.mode_info["clip_trainable"] = False
