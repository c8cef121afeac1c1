"""Active-learning simulation driven by the MONAI Label app's own code (``apps/vlseg``).

Nothing here ranks images itself: the pool of unlabelled training images is a MONAI Label datastore (the app's
``PromptCheckingDatastore``), the uncertainty scores come from the app's ``UncertaintyScoring`` running the app's
``TextBundleInferTask`` on the round's checkpoint, and the images are picked one at a time by the app's
``MostUncertain`` strategy. "Annotating" an image = saving its ground-truth mask as the ``final`` label with the
image's prompt (``params={"text": ...}``), exactly what a user of the app does, which also takes it out of the
unlabelled pool for the next pick.

If the app cannot be imported, :class:`AppUnavailable` says why (the random baseline still runs).
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
from pathlib import Path

from vlseg.bench.report import repo_root

__all__ = ["AppUnavailable", "AppActiveLearner", "item_key", "app_dir"]


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


def _import_app():
    app = str(app_dir())
    if not (Path(app) / "lib" / "scoring" / "uncertainty.py").is_file():
        raise AppUnavailable(f"the app's scoring code is not there ({app}/lib/scoring/uncertainty.py)")
    for name in [m for m in sys.modules if m == "lib" or m.startswith("lib.")]:
        mod_file = getattr(sys.modules[name], "__file__", "") or ""
        if not mod_file.startswith(app):
            del sys.modules[name]
    if app not in sys.path:
        sys.path.insert(0, app)
    try:
        from lib.activelearning.uncertainty import MostUncertain
        from lib.datastore import PromptCheckingDatastore
        from lib.infers.text_bundle import TextBundleInferTask
        from lib.scoring.uncertainty import UncertaintyScoring
    except Exception as e:  # noqa: BLE001
        raise AppUnavailable(f"cannot import the app's active-learning code from {app}: {type(e).__name__}: {e}") from e
    return MostUncertain, PromptCheckingDatastore, TextBundleInferTask, UncertaintyScoring


class AppActiveLearner:
    """A studies folder + datastore over the training pool, scored and ranked by the app's classes.

    ``items``: the whole training pool (datalist items with ``image``, ``label``, ``text``); ``labeled``: keys of the
    initially labelled ones (their masks are saved as ``final`` labels right away).
    """

    def __init__(self, items: list[dict], labeled: set[str], studies: Path, num_samples: int = 8,
                 score_key: str = "vlseg_uncertainty_top5"):
        self.MostUncertain, Datastore, self.InferTask, self.Scoring = _import_app()
        self.items = {item_key(it, i): it for i, it in enumerate(items)}
        self.num_samples = int(num_samples)
        self.score_key = score_key
        studies = Path(studies)
        if studies.exists():
            shutil.rmtree(studies)
        studies.mkdir(parents=True)
        for key, it in self.items.items():
            src = Path(it["image"])
            dst = studies / f"{key}{''.join(src.suffixes) or '.png'}"
            try:
                os.symlink(src, dst)
            except OSError:
                shutil.copy2(src, dst)
            (studies / f"{key}.txt").write_text(it.get("text") or "")  # the caption the app's scoring prompts with
        self.studies = studies
        self.datastore = Datastore(str(studies), extensions=["*.png", "*.jpg", "*.jpeg"], auto_reload=False)
        self.image_ids = {self._image_id(k): k for k in self.items}
        for key in labeled:
            self.annotate(key)

    def _image_id(self, key: str) -> str:
        return key

    def annotate(self, key: str) -> None:
        it = self.items[key]
        self.datastore.save_label(self._image_id(key), str(it["label"]), "final", {"text": it.get("text")})

    def labeled(self) -> list[str]:
        return sorted(self.datastore.get_labeled_images())

    def unlabeled(self) -> list[str]:
        return sorted(self.datastore.get_unlabeled_images())

    def score(self, bundle_copy: Path, variant: str | None, checkpoint: Path | None = None, model_name: str = "bench") -> dict:
        """Run the app's scoring with the bundle at ``bundle_copy``; its ``models/model.pt`` (the app's checkpoint
        location) is this round's weights (``checkpoint`` is copied there when it is another file)."""
        target = Path(bundle_copy) / "models" / "model.pt"
        if checkpoint is not None and Path(checkpoint).resolve() != target.resolve():
            import torch

            state = torch.load(str(checkpoint), map_location="cpu", weights_only=False)
            for k in ("state_dict", "model", "network"):
                if isinstance(state, dict) and k in state and isinstance(state[k], dict):
                    state = state[k]
            torch.save({"model": state}, target)
        logging.getLogger("lib").setLevel(logging.WARNING)
        task = self.InferTask(str(bundle_copy), {}, variant=variant or "", datastore=self.datastore,
                              store_uncertainty=False)
        if not task.is_valid():
            raise RuntimeError(f"the app rejected the bundle at {bundle_copy}")
        scoring = self.Scoring({model_name: task}, model=model_name, num_samples=self.num_samples, prompts="caption")
        return scoring({"model": model_name, "num_samples": self.num_samples, "prompts": "caption", "force": True},
                       self.datastore)

    def select(self, n: int) -> list[str]:
        """Ask the app's strategy ``n`` times, annotating each answer (so the next ask sees the smaller pool)."""
        strategy = self.MostUncertain(key=self.score_key)
        chosen = []
        for _ in range(n):
            ans = strategy({"strategy": "uncertainty"}, self.datastore)
            if not ans:
                break
            key = self.image_ids[ans["id"]]
            self.annotate(key)
            chosen.append(key)
        return chosen
