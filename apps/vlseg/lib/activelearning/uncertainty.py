"""Active-learning strategy: serve the most uncertain unlabelled image next.

Scores come from :mod:`lib.scoring.uncertainty` (image info ``vlseg_uncertainty_top5`` by default; request
``{"key": "vlseg_uncertainty_mean"}`` to rank by the mean). Among the ``top_k`` highest scores (default 1) and
everything tied with them, the image served least recently by this strategy wins (never served counts as
oldest), then the image id. Unscored images rank below scored ones; when nothing is scored yet the least recently
served image is returned and the answer says so (run ``POST /scoring/uncertainty``).
"""

from __future__ import annotations

import logging
import math

from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.strategy import Strategy

logger = logging.getLogger(__name__)

__all__ = ["MostUncertain"]

KEYS = ("vlseg_uncertainty_top5", "vlseg_uncertainty_mean", "vlseg_uncertainty_max")
DICOM_FIELDS = ("StudyInstanceUID", "SeriesInstanceUID", "Modality", "PatientID", "StudyDate", "StudyTime", "RetrieveURL")


class MostUncertain(Strategy):
    def __init__(self, key: str = KEYS[0], top_k: int = 1, tie_tolerance: float = 1e-6, description: str | None = None):
        super().__init__(description or "Most uncertain unlabelled image (vlseg uncertainty scores; ties: least "
                                        "recently served)")
        self.key = key
        self.top_k = int(top_k)
        self.tie_tolerance = float(tie_tolerance)

    def __call__(self, request, datastore: Datastore):
        key = request.get("key") or self.key
        if key not in KEYS:
            raise ValueError(f"unknown score key {key!r}; use one of {KEYS}")
        try:
            top_k = max(1, int(request.get("top_k", self.top_k)))
        except (TypeError, ValueError):
            top_k = self.top_k
        strategy = request.get("strategy") or "uncertainty"
        images = datastore.get_unlabeled_images(request.get("label_tag"), request.get("labels"))
        if not images:
            return None

        rows = []
        for image_id in images:
            info = datastore.get_image_info(image_id)
            score = info.get(key)
            score = float(score) if isinstance(score, (int, float)) and math.isfinite(score) else None
            served = info.get("strategy", {}).get(strategy, {}).get("ts", 0) or 0
            rows.append((image_id, score, served))

        scored = sorted((r for r in rows if r[1] is not None), key=lambda r: -r[1])
        if scored:
            threshold = scored[min(top_k, len(scored)) - 1][1] - self.tie_tolerance
            candidates = [r for r in scored if r[1] >= threshold]
        else:
            candidates = rows
        image_id, score, served = min(candidates, key=lambda r: (r[2], r[0]))
        logger.info("%s: %d unlabelled, %d scored; %d candidate(s) at %s >= %s; selected %s (score %s, last served %s)",
                    strategy, len(rows), len(scored), len(candidates), key,
                    None if not scored else round(candidates[-1][1], 6), image_id, score, served)
        out = {"id": image_id, "score_key": key, "score": score, "candidates": len(candidates),
               "last_served_ts": served}
        # DICOMweb datastores keep the series' DICOM identifiers in the image info: OHIF's next-sample dialog shows
        # them and opens the study by its StudyInstanceUID
        info = datastore.get_image_info(image_id) or {}
        out.update({k: info[k] for k in DICOM_FIELDS if info.get(k) not in (None, "")})
        if not scored:
            out["note"] = "no uncertainty scores yet: run POST /scoring/uncertainty; served the least recently served image"
        return out
