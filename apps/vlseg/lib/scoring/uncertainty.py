"""Active-learning scores from the bundles' own uncertainty maps.

``UncertaintyScoring`` runs a bundle's stochastic inference (``num_samples`` > 1 passes of the method's own
sampler or Monte-Carlo dropout) on every unlabelled image and stores image-level scores in the datastore image
info. It is a MONAI Label scoring method, so the server runs it as its background scoring task (a subprocess:
inference requests are not blocked): ``POST /scoring/uncertainty``; progress and result in ``GET /scoring/``.

Stored keys (image info):

* ``vlseg_uncertainty_mean``: mean of the uncertainty map (normalised binary entropy, [0, 1]);
* ``vlseg_uncertainty_top5``: mean of the 5 % most uncertain pixels (a small doubtful region is not washed out
  by a large confident background);
* ``vlseg_uncertainty_max``, ``..._model``, ``..._prompts``, ``..._num_samples``, ``..._checkpoint`` (sha256),
  ``..._ts`` and ``..._signature`` (images already scored with the same model, checkpoint, prompts and sample
  count are skipped unless ``force`` is given).

Which prompts: ``labels`` (default: one map per app label word, combined by the pixel-wise maximum, i.e. "how
unsure is the model about any of the structures we annotate"), ``default`` (the task's default prompt) or
``caption`` (the image caption, falling back to the label words).
"""

from __future__ import annotations

import logging
import time

import torch

from monailabel.interfaces.tasks.scoring import ScoringMethod

from lib.params import PromptSpec, RequestError, check_prompt, parse_bool, parse_int
from lib.trainset import caption_of
from vlseg.uncertainty import uncertainty_scores

logger = logging.getLogger(__name__)

__all__ = ["UncertaintyScoring", "SCORE_KEYS", "update_image_info"]

PREFIX = "vlseg_uncertainty"
SCORE_KEYS = (f"{PREFIX}_top5", f"{PREFIX}_mean", f"{PREFIX}_max")
PROMPT_MODES = ("labels", "default", "caption")


def update_image_info(datastore, image_id: str, info: dict) -> None:
    """Update image info, re-reading a local datastore file first: the server may have changed it meanwhile."""
    reload = getattr(datastore, "_init_from_datastore_file", None)
    if callable(reload):
        reload()
    datastore.update_image_info(image_id, info)


class UncertaintyScoring(ScoringMethod):
    def __init__(self, infers: dict, model: str, num_samples: int = 8, prompts: str = "labels", max_images: int = 0,
                 label_names: dict[str, int] | None = None):
        super().__init__("Uncertainty of the text-prompted bundles' stochastic inference on unlabelled images "
                         f"(model {model}, {num_samples} samples, prompts: {prompts})")
        if prompts not in PROMPT_MODES:
            raise ValueError(f"scoring prompts must be one of {PROMPT_MODES}, got {prompts!r}")
        self.infers = infers
        self.model = model
        self.num_samples = int(num_samples)
        self.prompts = prompts
        self.max_images = int(max_images)
        self.label_names = dict(label_names or {})

    def info(self):
        i = super().info()
        i.update(model=self.model, num_samples=self.num_samples, prompts=self.prompts, keys=list(SCORE_KEYS))
        return i

    def _prompts(self, mode: str, task, image_path: str, image_info: dict) -> list[PromptSpec]:
        if mode == "caption":
            cap = caption_of(image_path, image_info)
            if cap:
                try:
                    return [PromptSpec(check_prompt(cap), 1, "caption")]
                except RequestError:
                    pass
        if mode in ("labels", "caption") and self.label_names:
            return [PromptSpec(name, idx, "labels") for name, idx in self.label_names.items()]
        return [PromptSpec(task.default_prompt, 1, "default")]

    def __call__(self, request, datastore):
        start = time.time()
        model = request.get("model") or self.model
        if model not in self.infers:
            raise RuntimeError(f"scoring: unknown model {model!r}; available: {sorted(self.infers)}")
        task = self.infers[model]
        try:
            ns = parse_int(request, "num_samples", self.num_samples, 2, task.max_samples)
            limit = parse_int(request, "max_images", self.max_images, 0, None)
            force = parse_bool(request, "force", False)
        except RequestError as e:
            raise RuntimeError(f"scoring: {e}") from None
        mode = request.get("prompts") or self.prompts
        if mode not in PROMPT_MODES:
            raise RuntimeError(f"scoring: prompts must be one of {PROMPT_MODES}, got {mode!r}")

        ckpt = task.checkpoint()
        images = sorted(datastore.get_unlabeled_images())
        if limit:
            images = images[:limit]
        scored, skipped, failed = {}, [], {}
        for image_id in images:
            info = datastore.get_image_info(image_id)
            path = datastore.get_image_uri(image_id)
            prompts = self._prompts(mode, task, path, info)
            signature = f"{model}|{ckpt.get('sha256', '')[:16]}|{ns}|{'/'.join(p.prompt for p in prompts)}"
            if not force and info.get(f"{PREFIX}_signature") == signature:
                skipped.append(image_id)
                continue
            try:
                pred = task.predict(path, prompts, ns, seed=None, extra={"logging": "WARNING"})
            except Exception as e:  # one unreadable image must not stop the others
                logger.warning("scoring: %s failed: %s", image_id, e)
                failed[image_id] = str(e)
                continue
            s = uncertainty_scores(torch.from_numpy(pred.uncertainty))
            update_image_info(datastore, image_id, {
                f"{PREFIX}_mean": round(s["mean"], 6),
                f"{PREFIX}_top5": round(s["top5"], 6),
                f"{PREFIX}_max": round(s["max"], 6),
                f"{PREFIX}_model": model,
                f"{PREFIX}_prompts": [p.prompt for p in prompts],
                f"{PREFIX}_num_samples": ns,
                f"{PREFIX}_checkpoint": ckpt.get("sha256"),
                f"{PREFIX}_signature": signature,
                f"{PREFIX}_ts": int(time.time()),
            })
            scored[image_id] = round(s["top5"], 6)
            logger.info("scoring: %s top5=%.4f mean=%.4f (%s)", image_id, s["top5"], s["mean"], model)
        result = {"model": model, "num_samples": ns, "prompts": mode, "scored": scored, "skipped": skipped,
                  "failed": failed, "seconds": round(time.time() - start, 2)}
        logger.info("scoring: %d scored, %d unchanged, %d failed in %.1fs", len(scored), len(skipped), len(failed),
                    result["seconds"])
        return result
