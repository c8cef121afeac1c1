"""What the app's active-learning scoring stores per image, shared by the app and the torchrun pool job.

The MONAI Label app (``apps/vlseg/lib/scoring/uncertainty.py``) and ``scripts/score_pool.py``
(:mod:`vlseg.distributed.pool`) both write these image-info records, so the app's strategies read either one and
the app skips images the pool job already scored with the same model, checkpoint, sample count and prompts.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

from vlseg.scores import SCORES

__all__ = ["PREFIX", "SIGNATURE_VERSION", "SCORE_KEYS", "EMBEDDING_KEY", "score_key", "scoring_signature",
           "scoring_record"]

PREFIX = "vlseg_uncertainty"
SCORE_KEYS = tuple(f"{PREFIX}_{name}" for name in SCORES)
EMBEDDING_KEY = f"{PREFIX}_embedding"
SIGNATURE_VERSION = "v2"  # v2: decomposed-map scores and the embedding (older records are re-scored)


def score_key(name: str) -> str:
    """Image-info key of the score ``name`` (:data:`vlseg.scores.SCORES`)."""
    return f"{PREFIX}_{name}"


def scoring_signature(model: str, checkpoint_sha256: str | None, num_samples: int, prompts: Sequence[str]) -> str:
    """Identity of one scoring set-up; an image whose stored ``..._signature`` equals it needs no re-scoring."""
    return (f"{SIGNATURE_VERSION}|{model}|{(checkpoint_sha256 or '')[:16]}|{int(num_samples)}|"
            f"{'/'.join(prompts)}")


def scoring_record(scores: Mapping[str, float], embedding: Sequence[float], model: str, prompts: Sequence[str],
                   num_samples: int, checkpoint_sha256: str | None, signature: str,
                   ts: int | None = None) -> dict:
    """The image-info update of one scored image: every score (rounded to 6 digits), the thumbnail embedding, the
    model, prompts, sample count, checkpoint sha256, signature and time stamp."""
    return {
        **{score_key(k): round(float(v), 6) for k, v in scores.items()},
        EMBEDDING_KEY: list(embedding),
        f"{PREFIX}_model": model,
        f"{PREFIX}_prompts": list(prompts),
        f"{PREFIX}_num_samples": int(num_samples),
        f"{PREFIX}_checkpoint": checkpoint_sha256,
        f"{PREFIX}_signature": signature,
        f"{PREFIX}_ts": int(time.time()) if ts is None else int(ts),
    }
