"""Active-learning scores from the bundles' own uncertainty maps.

``UncertaintyScoring`` runs a bundle's stochastic inference (``num_samples`` > 1 passes of the method's own
sampler or Monte-Carlo dropout) on the unlabelled images and stores image-level scores in the datastore image
info. It is a MONAI Label scoring method, so the server runs it as its background scoring task (a subprocess:
inference requests are not blocked): ``POST /scoring/uncertainty``; progress and result in ``GET /scoring/``.

Stored keys (image info), one per score of :data:`vlseg.scores.SCORES` whose map the bundle outputs:

* ``vlseg_uncertainty_mean`` / ``_top5`` / ``_max``: mean, mean of the 5 % most uncertain pixels, maximum of the
  predictive-entropy map (normalised binary entropy, [0, 1]);
* ``vlseg_uncertainty_boundary``: mean predictive entropy outside a band around the predicted edge;
* ``vlseg_uncertainty_mi_mean`` / ``_mi_top5``: the same for the mutual-information (epistemic) map;
  ``vlseg_uncertainty_std_mean``: mean standard deviation over the passes;
* ``vlseg_uncertainty_embedding``: a 6 x 6 x 3 thumbnail of the image (:func:`vlseg.selection.thumbnail_embedding`),
  what the ``diverse`` strategy clusters;
* ``..._model``, ``..._prompts``, ``..._num_samples``, ``..._checkpoint`` (sha256), ``..._ts`` and ``..._signature``
  (images already scored with the same model, checkpoint, prompts and sample count are skipped unless ``force``).

Which prompts: ``labels`` (default: one map per app label word, combined by the pixel-wise maximum, i.e. "how
unsure is the model about any of the structures we annotate"), ``default`` (the task's default prompt) or
``caption`` (the image caption, falling back to the label words).

Which images: every unlabelled one, or with ``max_images`` N (``--conf scoring_max_images``) N drawn at random
(``random.Random(seed)``, ``seed`` from the request or ``--conf scoring_seed``, default 0) from those not yet scored
with the current signature, so repeated runs work through the whole pool.

Speed: ``max_workers`` threads (``--conf scoring_max_workers``, default 2) score images side by side, as MONAI
Label's ``EpistemicScoringV2`` does. One task's MONAI Label inference runs one call at a time (its lock); the
threads overlap the rest (reading images and the embedding, slicing volumes, the scores). The result reports
``images_per_s``.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from monailabel.interfaces.tasks.scoring import ScoringMethod

from lib import imageio
from lib.params import PromptSpec, RequestError, check_prompt, parse_bool, parse_int, parse_score_name
from lib.trainset import caption_of
from vlseg.app_support.score_records import (EMBEDDING_KEY, PREFIX, SCORE_KEYS, score_key, scoring_record,
                                             scoring_signature)
from vlseg.scores import DEFAULT_SCORE, SCORES, compute_scores
from vlseg.selection import random_subset, thumbnail_embedding

logger = logging.getLogger(__name__)

__all__ = ["UncertaintyScoring", "SCORE_KEYS", "EMBEDDING_KEY", "score_key", "update_image_info"]

PROMPT_MODES = ("labels", "default", "caption")
# the record layout (PREFIX, SCORE_KEYS, EMBEDDING_KEY, score_key, the signature) is
# vlseg.app_support.score_records, shared with the torchrun pool job (scripts/score_pool.py)


def update_image_info(datastore, image_id: str, info: dict) -> None:
    """Update image info, re-reading a local datastore file first: the server may have changed it meanwhile."""
    reload = getattr(datastore, "_init_from_datastore_file", None)
    if callable(reload):
        reload()
    datastore.update_image_info(image_id, info)


def image_embedding(path: str, axis: int) -> list[float]:
    """:func:`vlseg.selection.thumbnail_embedding` of a 2D image, or of a volume's mean projection along ``axis``."""
    if imageio.image_kind(path) == "volume":
        _, vol = imageio.load_volume(path)
        return thumbnail_embedding(imageio.window_to_uint8(vol).mean(axis=axis))
    from PIL import Image

    with Image.open(path) as im:
        return thumbnail_embedding(np.asarray(im.convert("RGB")))


class UncertaintyScoring(ScoringMethod):
    def __init__(self, infers: dict, model: str, num_samples: int = 8, prompts: str = "labels", max_images: int = 0,
                 label_names: dict[str, int] | None = None, score: str = DEFAULT_SCORE, max_workers: int = 2,
                 seed: int = 0):
        super().__init__("Uncertainty of the text-prompted bundles' stochastic inference on unlabelled images "
                         f"(model {model}, {num_samples} samples, prompts: {prompts})")
        if prompts not in PROMPT_MODES:
            raise ValueError(f"scoring prompts must be one of {PROMPT_MODES}, got {prompts!r}")
        if score not in SCORES:
            raise ValueError(f"scoring score must be one of {list(SCORES)}, got {score!r}")
        if int(max_workers) < 1:
            raise ValueError(f"scoring max_workers must be >= 1, got {max_workers}")
        self.infers = infers
        self.model = model
        self.num_samples = int(num_samples)
        self.prompts = prompts
        self.max_images = int(max_images)
        self.label_names = dict(label_names or {})
        self.score = score
        self.max_workers = int(max_workers)
        self.seed = int(seed)

    def info(self):
        i = super().info()
        i.update(model=self.model, num_samples=self.num_samples, prompts=self.prompts, keys=list(SCORE_KEYS),
                 score=self.score, max_workers=self.max_workers, max_images=self.max_images, seed=self.seed)
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

    def _score_one(self, task, path: str, prompts: list[PromptSpec], ns: int, image_id: str | None = None) -> dict:
        """Scores and embedding of one image (runs in a worker thread); ``image_id`` lets a volume get the window
        inference gives it (e.g. the CT window of a CT series)."""
        pred = task.predict(path, prompts, ns, seed=None, extra={"logging": "WARNING", "vlseg_image_id": image_id})
        scores = compute_scores(pred.all_maps(), mask=pred.mask > 0)
        return {"scores": scores, "embedding": image_embedding(path, getattr(task, "volume_axis", 2))}

    def __call__(self, request, datastore):
        start = time.time()
        model = request.get("model") or self.model
        if model not in self.infers:
            raise RuntimeError(f"scoring: unknown model {model!r}; available: {sorted(self.infers)}")
        task = self.infers[model]
        try:
            ns = parse_int(request, "num_samples", self.num_samples, 2, task.max_samples)
            limit = parse_int(request, "max_images", self.max_images, 0, None)
            workers = parse_int(request, "max_workers", self.max_workers, 1, 64)
            seed = parse_int(request, "seed", self.seed, 0, 2**31 - 1)
            force = parse_bool(request, "force", False)
            score = parse_score_name(request, "score", self.score)
        except RequestError as e:
            raise RuntimeError(f"scoring: {e}") from None
        mode = request.get("prompts") or self.prompts
        if mode not in PROMPT_MODES:
            raise RuntimeError(f"scoring: prompts must be one of {PROMPT_MODES}, got {mode!r}")

        ckpt = task.checkpoint()
        todo, skipped = {}, []
        for image_id in sorted(datastore.get_unlabeled_images()):
            info = datastore.get_image_info(image_id)
            path = datastore.get_image_uri(image_id)
            prompts = self._prompts(mode, task, path, info)
            signature = scoring_signature(model, ckpt.get("sha256"), ns, [p.prompt for p in prompts])
            if not force and info.get(f"{PREFIX}_signature") == signature:
                skipped.append(image_id)
            else:
                todo[image_id] = (path, prompts, signature)
        chosen = random_subset(list(todo), limit, seed)
        not_chosen = sorted(set(todo) - set(chosen))

        scored, failed = {}, {}
        t0 = time.time()
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="vlseg-scoring") as pool:
            jobs = {i: pool.submit(self._score_one, task, todo[i][0], todo[i][1], ns, i) for i in chosen}
            for image_id, job in jobs.items():  # datastore writes stay in this thread, in id order
                try:
                    out = job.result()
                except Exception as e:  # one unreadable image must not stop the others
                    logger.warning("scoring: %s failed: %s", image_id, e)
                    failed[image_id] = str(e)
                    continue
                s = out["scores"]
                update_image_info(datastore, image_id, scoring_record(
                    s, out["embedding"], model, [p.prompt for p in todo[image_id][1]], ns, ckpt.get("sha256"),
                    todo[image_id][2]))
                scored[image_id] = round(s[score], 6) if score in s else None
                logger.info("scoring: %s %s=%s (%s)", image_id, score, scored[image_id], model)
        infer_s = time.time() - t0
        rate = len(scored) / infer_s if scored and infer_s > 0 else 0.0
        result = {"model": model, "num_samples": ns, "prompts": mode, "score": score, "scored": scored,
                  "skipped": skipped, "not_sampled": not_chosen, "failed": failed, "max_images": limit, "seed": seed,
                  "max_workers": workers, "images_per_s": round(rate, 3), "seconds": round(time.time() - start, 2)}
        if any(v is None for v in scored.values()):
            result["note"] = (f"{model} outputs no map for the score {score!r} ({SCORES[score].map_name}); its "
                              "strategies rank these images as unscored: choose another scoring_score")
            logger.warning("scoring: %s", result["note"])
        logger.info("scoring: %d scored (%.2f images/s, %d worker(s)), %d unchanged, %d not sampled, %d failed in "
                    "%.1fs", len(scored), rate, workers, len(skipped), len(not_chosen), len(failed), result["seconds"])
        return result
