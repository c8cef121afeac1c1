"""The MONAI Label app's own classes (``apps/vlseg``) driven over a simulated annotation pool.

Nothing here ranks, scores or trains by itself:

* the pool is a MONAI Label datastore (the app's ``PromptCheckingDatastore`` over a studies folder of links to the
  training images); "annotating" an image = saving its ground-truth mask as its ``final`` label with the app's label
  word as the prompt (``params={"text": "polyp"}``), exactly what a user of the app does;
* scores come from the app's ``UncertaintyScoring`` running the app's ``TextBundleInferTask`` on the bundle copy's
  current ``models/model.pt``, prompted with the app's label words (``prompts="labels"``), never captions;
* the picks come from the app's strategies: ``MostUncertain`` asked once per image (each answer annotated before
  the next ask) and ``DiverseUncertain.batch`` (one batch of the round's size); the random arm draws with
  :func:`vlseg.selection.random_subset`, the seeded draw the app's ``scoring_max_images`` uses;
* training is the app's ``TextBundleTrainTask``: it reads the datastore's final labels, splits them 80/20 for
  validation (early stopping, best checkpoint), and **fine-tunes from the bundle's current models/model.pt** (MONAI
  Label's ``CheckpointLoader``), so every round warm-starts from the previous round's checkpoint.

If the app cannot be imported, :class:`AppUnavailable` says why.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
from pathlib import Path

from vlseg.bench.report import repo_root

__all__ = ["AppUnavailable", "AppPool", "item_key", "app_dir", "file_sha256"]


class AppUnavailable(RuntimeError):
    pass


def app_dir() -> Path:
    return repo_root() / "apps" / "vlseg"


def item_key(item: dict, index: int) -> str:
    """A file-name-safe unique id of a datalist item (Kvasir: its id; demo: image id + object index)."""
    if item.get("id"):
        key = str(item["id"])
    elif item.get("image_id") is not None:
        key = f"{item['image_id']}_obj{item.get('object_index', index)}"
    else:
        key = f"item{index:05d}"
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in key)


def file_sha256(path) -> str | None:
    """sha256 of a checkpoint file (:func:`vlseg.bundles.checkpoint_identity`); ``None`` when it does not exist."""
    from vlseg.bundles import checkpoint_identity

    return checkpoint_identity(path).get("sha256")


def import_app() -> dict:
    """The app's classes, imported from ``apps/vlseg`` (its ``lib`` package)."""
    app = str(app_dir())
    if not (Path(app) / "lib" / "scoring" / "uncertainty.py").is_file():
        raise AppUnavailable(f"the app's scoring code is not there ({app}/lib/scoring/uncertainty.py)")
    for name in [m for m in sys.modules if m == "lib" or m.startswith("lib.")]:
        if not (getattr(sys.modules[name], "__file__", "") or "").startswith(app):
            del sys.modules[name]
    if app not in sys.path:
        sys.path.insert(0, app)
    try:
        from lib.activelearning.diverse import DiverseUncertain
        from lib.activelearning.uncertainty import MostUncertain
        from lib.datastore import PromptCheckingDatastore
        from lib.infers.text_bundle import TextBundleInferTask
        from lib.scoring.uncertainty import UncertaintyScoring
        from lib.trainers.text_bundle import TextBundleTrainTask
    except Exception as e:  # noqa: BLE001
        raise AppUnavailable(f"cannot import the app's active-learning code from {app}: {type(e).__name__}: {e}") from e
    return {"MostUncertain": MostUncertain, "DiverseUncertain": DiverseUncertain, "Datastore": PromptCheckingDatastore,
            "InferTask": TextBundleInferTask, "Scoring": UncertaintyScoring, "TrainTask": TextBundleTrainTask}


class AppPool:
    """A studies folder + the app's datastore over the pool, one bundle copy, and the app's tasks on them.

    ``items``: ``{key: datalist item}`` of the whole pool; ``labeled``: keys labelled from the start; ``word``: the
    app's label word used as every prompt; ``bundle``: a bundle copy whose ``models/model.pt`` is the current model;
    ``variant``: the override file (``configs/<variant>.json``) the app serves and trains with.
    """

    def __init__(self, items: dict[str, dict], labeled, studies: Path, bundle: Path, variant: str, word: str = "polyp"):
        self.app = import_app()
        self.items = dict(items)
        self.word = word
        self.bundle = Path(bundle)
        self.variant = variant
        studies = Path(studies)
        if studies.exists():
            shutil.rmtree(studies)
        studies.mkdir(parents=True)
        for key, it in self.items.items():
            src = Path(it["image"])
            dst = studies / f"{key}{''.join(src.suffixes) or '.png'}"
            try:
                os.symlink(src.resolve(), dst)
            except OSError:
                shutil.copy2(src, dst)
        self.studies = studies
        self.datastore = self.app["Datastore"](str(studies), extensions=["*.png", "*.jpg", "*.jpeg"], auto_reload=False)
        for key in sorted(labeled):
            self.annotate(key)

    @property
    def checkpoint(self) -> Path:
        return self.bundle / "models" / "model.pt"

    def annotate(self, key: str) -> None:
        """Save the item's ground-truth mask as its final label, prompt = the label word, the way a viewer sends it:
        a new file with the label id 1 on the object (the app's datastore rewrites a saved file in place -- e.g. 255
        is its "uncertain" value -- so the data set's own mask file is never handed to it)."""
        import numpy as np
        from PIL import Image

        upload = self.studies.parent / f".upload_{key}.png"
        with Image.open(self.items[key]["label"]) as m:
            Image.fromarray((np.asarray(m) > 0).astype(np.uint8)).save(upload)
        try:
            self.datastore.save_label(key, str(upload), "final", {"text": self.word})
        finally:
            upload.unlink(missing_ok=True)

    def labeled(self) -> list[str]:
        return sorted(self.datastore.get_labeled_images())

    def unlabeled(self) -> list[str]:
        return sorted(self.datastore.get_unlabeled_images())

    # ------------------------------------------------------------------------------------------------ selection
    def score(self, score: str, num_samples: int, max_images: int = 0, seed: int = 0) -> dict:
        """The app's ``UncertaintyScoring`` over the unlabelled pool with the current checkpoint (label-word
        prompts; ``max_images`` > 0 scores that many drawn at random, as ``scoring_max_images`` does)."""
        logging.getLogger("lib").setLevel(logging.WARNING)
        self.forget_scores()
        task = self.app["InferTask"](str(self.bundle), {}, variant=self.variant, label_names={self.word: 1},
                                     datastore=self.datastore, store_uncertainty=False)
        if not task.is_valid():
            raise RuntimeError(f"the app rejected the bundle at {self.bundle}")
        scoring = self.app["Scoring"]({"al": task}, model="al", num_samples=num_samples, prompts="labels",
                                      max_images=max_images, label_names={self.word: 1}, score=score, max_workers=1,
                                      seed=seed)
        return scoring({"force": True}, self.datastore)

    def forget_scores(self) -> None:
        """Drop the scores of earlier rounds from the image info, so that a round ranks only images scored with its
        own checkpoint (with ``max_images`` the app scores a random part of the pool; the images left out would
        otherwise keep a previous model's scores). The datastore is written once (``update_image_info`` writes its
        file on every call)."""
        prefix = "vlseg_uncertainty_"
        objects = self.datastore._datastore.objects  # LocalDatastore's in-memory model
        changed = False
        for obj in objects.values():
            for k in [k for k in obj.image.info if k.startswith(prefix)]:
                del obj.image.info[k]
                changed = True
        if changed:
            self.datastore._update_datastore_file()

    def select_uncertain(self, n: int, score: str) -> list[str]:
        """Ask the app's ``MostUncertain`` ``n`` times, annotating each answer before the next ask."""
        strategy = self.app["MostUncertain"](score=score)
        chosen = []
        for _ in range(n):
            ans = strategy({"strategy": "uncertainty"}, self.datastore)
            if not ans:
                break
            self.annotate(ans["id"])
            chosen.append(ans["id"])
        return chosen

    def select_diverse(self, n: int, score: str, seed: int = 0) -> list[str]:
        """One batch of ``n`` from the app's ``DiverseUncertain`` (most uncertain image per k-means cluster)."""
        strategy = self.app["DiverseUncertain"](score=score, batch_size=n, seed=seed)
        chosen, _, _ = strategy.batch({"strategy": "diverse"}, self.datastore)
        for key in chosen:
            self.annotate(key)
        return list(chosen)

    def select_random(self, n: int, seed: int) -> list[str]:
        from vlseg.selection import random_subset

        chosen = random_subset(self.unlabeled(), n, seed)
        for key in chosen:
            self.annotate(key)
        return chosen

    # ------------------------------------------------------------------------------------------------ training
    def train(self, max_epochs: int, cache_dir: Path, val_split: float = 0.2) -> dict:
        """The app's train task on the datastore's final labels; it fine-tunes from ``models/model.pt`` when that
        exists (random initialisation otherwise). Returns the app's train stats plus the checkpoint hashes."""
        logging.getLogger("lib").setLevel(logging.WARNING)
        before = file_sha256(self.checkpoint)
        task = self.app["TrainTask"](str(self.bundle), {}, variant=self.variant, cache_dir=str(cache_dir),
                                     default_epochs=max_epochs)
        if not task.is_valid():
            raise RuntimeError(f"the app's train task rejected the bundle at {self.bundle}")
        stats = task({"device": "cpu", "max_epochs": int(max_epochs), "val_split": float(val_split),
                      "pretrained": True}, self.datastore)
        return {"start_sha256": before, "checkpoint_sha256": file_sha256(self.checkpoint),
                "warm_start": before is not None, "train_items": stats.get("train_items"),
                "val_items": stats.get("val_items"), "train_seconds": stats.get("seconds")}
