"""The app's side of the torchrun pool job (``scripts/score_pool.py``): which images, what is written where.

The job (:mod:`vlseg.distributed.pool`) scores the same images the app's ``POST /scoring/uncertainty`` scores (the
unlabelled images of the folder datastore, optionally only those of a datalist) and leaves exactly what the app
leaves, so the app's strategies use the results directly and its own scoring skips these images:

* image info: the records of :func:`vlseg.app_support.score_records.scoring_record` (every score, the embedding,
  model, prompts, sample count, checkpoint sha256, signature), written by rank 0 through the datastore API;
* labels: the maps under the infer task's tags (``uncertainty``, ``uncertainty_mutual_information``,
  ``uncertainty_std``; 16-bit PNGs, value = map x 65535) and, with ``masks``, the mask (prompt values, 8-bit PNG)
  under MONAI Label's tag for model predictions, ``original`` (what its batch inference uses).

Each rank writes its images' files into a staging folder inside the studies folder (shared by every node that reads
the images); rank 0 moves them into the datastore with ``save_label`` and removes the staging folder.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass, field

from monailabel.config import settings

from lib import imageio
from lib.datastore import PromptCheckingDatastore
from lib.infers.outputs import map_tag
from lib.scoring.uncertainty import PREFIX, image_embedding, update_image_info
from vlseg.app_support.score_records import scoring_record, scoring_signature
from vlseg.distributed.batch_infer import ImagePrediction
from vlseg.distributed.pool import PoolItem
from vlseg.scores import compute_scores

logger = logging.getLogger(__name__)

__all__ = ["PoolSetup", "open_datastore", "read_datalist", "select_images", "stage_image", "commit_results",
           "remove_staging", "STAGING_DIR", "MASK_TAG"]

STAGING_DIR = ".vlseg_pool"
MASK_TAG = "original"


@dataclass
class PoolSetup:
    """What identifies one scoring run (the same on every rank)."""

    model: str
    variant: str
    prompts: list[tuple[str, int]]
    num_samples: int
    checkpoint_sha256: str | None
    uncertainty_tag: str = "uncertainty"
    masks: bool = False
    mask_tag: str = MASK_TAG
    staging: str = ""
    volume_axis: int = 2
    extra: dict = field(default_factory=dict)

    @property
    def prompt_texts(self) -> list[str]:
        return [p for p, _ in self.prompts]

    @property
    def signature(self) -> str:
        return scoring_signature(self.model, self.checkpoint_sha256, self.num_samples, self.prompt_texts)


def open_datastore(studies: str, read_only: bool = False) -> PromptCheckingDatastore:
    """The app's folder datastore (``<studies>/datastore_v2.json``, labels in ``<studies>/labels/<tag>/``)."""
    if not os.path.isdir(studies):
        raise FileNotFoundError(f"studies folder {studies} does not exist")
    return PromptCheckingDatastore(studies, extensions=settings.MONAI_LABEL_DATASTORE_FILE_EXT, auto_reload=False,
                                   read_only=read_only)


def read_datalist(path: str, sections: tuple[str, ...] = ()) -> list[str]:
    """Image paths (resolved) of a datalist: a JSON list of ``{"image": ...}`` items (or paths), or an object whose
    list-valued sections (``sections``, default every one) hold them; relative paths are relative to the file."""
    with open(path) as f:
        data = json.load(f)
    lists = [data] if isinstance(data, list) else [v for k, v in data.items() if isinstance(v, list)
                                                   and (not sections or k in sections)] if isinstance(data, dict) else []
    base = os.path.dirname(os.path.abspath(path))
    out = []
    for items in lists:
        for it in items:
            p = it.get("image") if isinstance(it, dict) else it
            if isinstance(p, str) and p:
                out.append(os.path.realpath(p if os.path.isabs(p) else os.path.join(base, p)))
    if not out:
        raise ValueError(f"datalist {path} names no images (expected a list of {{'image': path}} items, or an object "
                         "with such lists)")
    return out


def select_images(datastore, setup: PoolSetup, datalist: list[str] | None = None, force: bool = False,
                  include_labelled: bool = False) -> dict:
    """The work list, as the app's scoring chooses it: unlabelled images (all with ``include_labelled``), only those
    of ``datalist`` when given, without those already scored with the same signature (unless ``force``).

    Returns ``{"items": [PoolItem], "skipped": [...], "volumes": [...], "unsupported": [...]}``; volumes are
    scored slice by slice by the app's own scoring, not by this job.
    """
    ids = sorted(datastore.list_images() if include_labelled else datastore.get_unlabeled_images())
    if datalist is not None:
        by_path = {os.path.realpath(datastore.get_image_uri(i)): i for i in ids}
        every = {os.path.realpath(datastore.get_image_uri(i)) for i in datastore.list_images()}
        missing = sorted(p for p in set(datalist) if p not in every)
        if missing:
            raise ValueError(f"{len(missing)} datalist image(s) are not in the studies folder's datastore (e.g. "
                             f"{missing[:3]}); copy them into the studies folder first")
        ids = sorted({by_path[p] for p in datalist if p in by_path})
    out = {"items": [], "skipped": [], "volumes": [], "unsupported": []}
    signature = setup.signature
    for image_id in ids:
        path = datastore.get_image_uri(image_id)
        kind = imageio.image_kind(path)
        if kind != "2d":
            out["volumes" if kind == "volume" else "unsupported"].append(image_id)
        elif not force and (datastore.get_image_info(image_id) or {}).get(f"{PREFIX}_signature") == signature:
            out["skipped"].append(image_id)
        else:
            out["items"].append(PoolItem(image_id, path))
    return out


def stage_image(setup: PoolSetup, item: PoolItem, pred: ImagePrediction) -> dict:
    """Scores and embedding of one image (as the app computes them) and its map / mask files in the staging folder.

    Runs on the rank that predicted the image; returns a small picklable dict for rank 0."""
    scores = compute_scores(pred.maps, mask=pred.mask > 0)
    files = {}
    safe = item.image_id.replace(os.sep, "_")
    for name, array in pred.maps.items():
        tag = map_tag(setup.uncertainty_tag, name)
        files[tag] = imageio.write_uncertainty_png16(array, os.path.join(setup.staging, f"{safe}.{tag}.png"))
    if setup.masks:
        files[setup.mask_tag] = imageio.write_mask_png(pred.mask, os.path.join(setup.staging, f"{safe}.mask.png"))
    means = {name: round(float(a.mean(dtype="float64")), 6) for name, a in pred.maps.items()}
    return {"scores": scores, "embedding": image_embedding(item.path, setup.volume_axis), "files": files,
            "means": means, "prompts": pred.prompts, "foreground_pixels": int((pred.mask > 0).sum())}


def _label_info(setup: PoolSetup, tag: str, result: dict) -> dict:
    """Label info like the infer task's (model, variant, prompt, samples, kind, statistics, format)."""
    info = {"model": setup.model, "variant": setup.variant, "prompt": " | ".join(setup.prompt_texts),
            "num_samples": setup.num_samples, "kind": "2d", "source": "scripts/score_pool.py"}
    if tag == setup.mask_tag and setup.masks:
        return dict(info, label_names={p: v for p, v in setup.prompts}, prompts=result["prompts"],
                    foreground_pixels=result["foreground_pixels"])
    s = result["scores"]
    if tag == setup.uncertainty_tag:
        info.update({f"uncertainty_{k}": round(s[k], 6) for k in ("mean", "top5", "max") if k in s})
    else:
        name = tag[len(setup.uncertainty_tag) + 1:]
        info.update(map=name, mean=result["means"].get(name))
    return dict(info, format="png16", scale=imageio.UNCERTAINTY_PNG_SCALE)


def _reload(datastore) -> None:
    reload = getattr(datastore, "_init_from_datastore_file", None)  # as update_image_info does
    if callable(reload):
        reload()


def commit_results(datastore, setup: PoolSetup, results: dict[str, dict]) -> dict[str, str]:
    """Rank 0: write every image's record and labels (in image id order); returns ``{image id: error}`` of the
    images whose write failed (the others are written)."""
    failed = {}
    for image_id in sorted(results):
        r = results[image_id]
        try:
            update_image_info(datastore, image_id, scoring_record(
                r["scores"], r["embedding"], setup.model, setup.prompt_texts, setup.num_samples,
                setup.checkpoint_sha256, setup.signature))
            for tag, path in r["files"].items():
                _reload(datastore)  # the server may have changed the file meanwhile (save_label writes it whole)
                datastore.save_label(image_id, path, tag, _label_info(setup, tag, r))
        except Exception as e:  # noqa: BLE001 - one refused write must not lose the others
            logger.warning("pool: writing %s failed: %s", image_id, e)
            failed[image_id] = f"{type(e).__name__}: {e}"
    return failed


def remove_staging(setup: PoolSetup) -> None:
    shutil.rmtree(setup.staging, ignore_errors=True)
    parent = os.path.dirname(setup.staging)
    if os.path.basename(parent) == STAGING_DIR:
        try:
            os.rmdir(parent)  # only when no other run is staging there
        except OSError:
            pass
