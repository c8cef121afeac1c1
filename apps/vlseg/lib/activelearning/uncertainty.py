"""Active-learning strategy: serve the most uncertain unlabelled image next.

Scores come from :mod:`lib.scoring.uncertainty`: one image-info key per score of :data:`vlseg.scores.SCORES`. The
strategy ranks by its ``score`` (``--conf scoring_score``, default ``top5``: the behaviour before the decomposed maps,
kept until the gate of ``scripts/benchmark_uncertainty.py`` names a better one); a request may pick another with
``{"score": "mi_mean"}`` or the full key ``{"key": "vlseg_uncertainty_mean"}``. Among the ``top_k`` highest scores
(default 1) and everything tied with them, the image served least recently by this strategy wins (never served counts
as oldest), then the image id. Unscored images rank below scored ones; when nothing is scored yet the least recently
served image is returned and the answer says so (run ``POST /scoring/uncertainty``).
"""

from __future__ import annotations

import logging
import math

from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.strategy import Strategy

from lib.scoring.uncertainty import SCORE_KEYS, score_key
from vlseg.scores import DEFAULT_SCORE, SCORES

logger = logging.getLogger(__name__)

__all__ = ["MostUncertain", "KEYS", "resolve_key", "pool_rows", "answer"]

KEYS = SCORE_KEYS
DICOM_FIELDS = ("StudyInstanceUID", "SeriesInstanceUID", "Modality", "PatientID", "StudyDate", "StudyTime", "RetrieveURL")
NOT_SCORED = "no uncertainty scores yet: run POST /scoring/uncertainty; served the least recently served image"


def resolve_key(request: dict, default_key: str) -> str:
    """The image-info key to rank by: request ``key`` (a full key), else request ``score`` (a score name), else the
    strategy's own; a ``ValueError`` names the valid choices."""
    if request.get("key"):
        key = request["key"]
    elif request.get("score"):
        if request["score"] not in SCORES:
            raise ValueError(f"unknown score {request['score']!r}; use one of {list(SCORES)}")
        key = score_key(request["score"])
    else:
        key = default_key
    if key not in KEYS:
        raise ValueError(f"unknown score key {key!r}; use one of {KEYS}")
    return key


def pool_rows(request: dict, datastore: Datastore, key: str, strategy: str) -> list[tuple[str, float | None, float, dict]]:
    """``(image id, score or None, last served ts, image info)`` of every unlabelled image."""
    rows = []
    for image_id in datastore.get_unlabeled_images(request.get("label_tag"), request.get("labels")):
        info = datastore.get_image_info(image_id) or {}
        score = info.get(key)
        score = float(score) if isinstance(score, (int, float)) and math.isfinite(score) else None
        served = info.get("strategy", {}).get(strategy, {}).get("ts", 0) or 0
        rows.append((image_id, score, served, info))
    return rows


def answer(image_id: str, info: dict, **extra) -> dict:
    """The strategy's answer: the id, ``extra`` and the DICOM identifiers of a DICOMweb datastore's series (OHIF's
    next-sample dialog shows them and opens the study by its StudyInstanceUID)."""
    out = {"id": image_id, **extra}
    out.update({k: info[k] for k in DICOM_FIELDS if info.get(k) not in (None, "")})
    return out


class MostUncertain(Strategy):
    def __init__(self, key: str | None = None, top_k: int = 1, tie_tolerance: float = 1e-6,
                 description: str | None = None, score: str = DEFAULT_SCORE):
        super().__init__(description or f"Most uncertain unlabelled image (vlseg score {score!r}; ties: least "
                                        "recently served)")
        self.key = key or score_key(score)
        if self.key not in KEYS:
            raise ValueError(f"unknown score key {self.key!r}; use one of {KEYS}")
        self.top_k = int(top_k)
        self.tie_tolerance = float(tie_tolerance)

    def __call__(self, request, datastore: Datastore):
        key = resolve_key(request, self.key)
        try:
            top_k = max(1, int(request.get("top_k", self.top_k)))
        except (TypeError, ValueError):
            top_k = self.top_k
        strategy = request.get("strategy") or "uncertainty"
        rows = pool_rows(request, datastore, key, strategy)
        if not rows:
            return None

        scored = sorted((r for r in rows if r[1] is not None), key=lambda r: -r[1])
        if scored:
            threshold = scored[min(top_k, len(scored)) - 1][1] - self.tie_tolerance
            candidates = [r for r in scored if r[1] >= threshold]
        else:
            candidates = rows
        image_id, score, served, info = min(candidates, key=lambda r: (r[2], r[0]))
        logger.info("%s: %d unlabelled, %d scored; %d candidate(s) at %s >= %s; selected %s (score %s, last served %s)",
                    strategy, len(rows), len(scored), len(candidates), key,
                    None if not scored else round(candidates[-1][1], 6), image_id, score, served)
        out = answer(image_id, info, score_key=key, score=score, candidates=len(candidates), last_served_ts=served)
        if not scored:
            out["note"] = NOT_SCORED
        return out
