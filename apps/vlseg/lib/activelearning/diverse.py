"""Active-learning strategy: a diverse batch of uncertain images (``diverse``).

Taking the top k by one score tends to pick near-copies of one hard case. This strategy clusters the scored
unlabelled images into ``batch_size`` groups by an image embedding (k-means, seeded) and takes the most uncertain
image of each group (:func:`vlseg.selection.diverse_batch`). The embedding is the 6 x 6 x 3 thumbnail the scoring
stores (``vlseg_uncertainty_embedding``, :func:`vlseg.selection.thumbnail_embedding`), not an encoder feature of the
bundle: the bundle contract exposes no encoder features, and the thumbnail is free.

MONAI Label serves one image per request, so every request recomputes the batch (same pool, scores and seed: same
batch) and serves the member served least recently by this strategy (never served first, then by score); the answer
lists the whole ``batch``. Annotated images leave the pool, so the next batch is chosen among the rest.

Request keys: ``batch_size`` (default ``--conf strategy_batch_size``, 5), ``score`` / ``key`` (as for
``uncertainty``), ``seed`` (k-means seed, default 0). Without scores or embeddings it falls back to the least recently
served image and says so.
"""

from __future__ import annotations

import logging

from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.strategy import Strategy

from lib.activelearning.uncertainty import NOT_SCORED, answer, pool_rows, resolve_key
from lib.scoring.uncertainty import EMBEDDING_KEY
from vlseg.scores import DEFAULT_SCORE
from vlseg.selection import diverse_batch

logger = logging.getLogger(__name__)

__all__ = ["DiverseUncertain"]


def _int(request: dict, key: str, default: int, lo: int) -> int:
    try:
        return max(lo, int(request.get(key, default)))
    except (TypeError, ValueError):
        raise ValueError(f"{key} must be an integer >= {lo}, got {request.get(key)!r}") from None


class DiverseUncertain(Strategy):
    def __init__(self, score: str = DEFAULT_SCORE, batch_size: int = 5, seed: int = 0, description: str | None = None):
        super().__init__(description or f"Diverse batch: the most uncertain image (score {score!r}) of each of "
                                        f"{batch_size} clusters of image thumbnails")
        self.key = resolve_key({"score": score}, "")
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = int(batch_size)
        self.seed = int(seed)

    def batch(self, request: dict, datastore: Datastore) -> tuple[list[str], list, str]:
        """(the batch ids by score, the pool rows, the score key) for ``request``."""
        key = resolve_key(request, self.key)
        k = _int(request, "batch_size", self.batch_size, 1)
        seed = _int(request, "seed", self.seed, 0)
        strategy = request.get("strategy") or "diverse"
        rows = pool_rows(request, datastore, key, strategy)
        scores = {r[0]: r[1] for r in rows if r[1] is not None}
        embeddings = {r[0]: r[3].get(EMBEDDING_KEY) for r in rows if isinstance(r[3].get(EMBEDDING_KEY), list)}
        return diverse_batch(scores, embeddings, k, seed), rows, key

    def __call__(self, request, datastore: Datastore):
        chosen, rows, key = self.batch(request, datastore)
        if not rows:
            return None
        by_id = {r[0]: r for r in rows}
        if chosen:
            order = {i: n for n, i in enumerate(chosen)}
            image_id = min(chosen, key=lambda i: (by_id[i][2], order[i]))
        else:
            image_id = min(rows, key=lambda r: (r[2], r[0]))[0]
        _, score, served, info = by_id[image_id]
        logger.info("diverse: %d unlabelled; batch %s by %s; selected %s (score %s, last served %s)", len(rows), chosen,
                    key, image_id, score, served)
        out = answer(image_id, info, score_key=key, score=score, batch=chosen,
                     batch_scores=[by_id[i][1] for i in chosen], last_served_ts=served)
        if not chosen:
            out["note"] = NOT_SCORED
        return out
