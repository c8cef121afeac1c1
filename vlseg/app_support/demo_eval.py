"""The main job's accuracy figures: each served model's Dice on the demo's held-out 2D test images and test
volumes, measured through the MONAI Label server with the real client (the path a user's request takes).

:func:`evaluate_model` sends one text-prompted ``/infer`` per test item (its ``text``, the full description)
and compares the returned mask with the item's ground truth: Dice per item, the mean per kind (``2d``,
``volume``). Volumes go through the app's slice-by-slice inference and are scored in 3D.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

import numpy as np

__all__ = ["dice_score", "load_mask", "evaluate_model", "Progress"]

#: Dice targets of the main job (issue 17): mean over the 2D test items / over the test volume items.
TARGETS = {"2d": 0.80, "volume": 0.70}


def dice_score(pred, truth) -> float:
    """Dice of two binary masks (1.0 when both are empty)."""
    pred, truth = np.asarray(pred, bool), np.asarray(truth, bool)
    total = int(pred.sum()) + int(truth.sum())
    return 1.0 if total == 0 else 2.0 * float(np.logical_and(pred, truth).sum()) / total


def load_mask(path) -> np.ndarray:
    """A label file (PNG or NIfTI) as a boolean mask."""
    path = str(path)
    if path.endswith((".nii", ".nii.gz")):
        import nibabel as nib

        return np.asarray(nib.load(path).dataobj) > 0
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im) > 0


def _work(item: Mapping) -> float:
    """Relative cost of segmenting an item: 1 for a 2D image, the number of slices for a volume."""
    if item.get("_section") != "volumes":
        return 1.0
    import nibabel as nib

    shape = nib.load(item["_path"]).shape
    return float(shape[2]) if len(shape) > 2 else 1.0


class Progress:
    """``[tag] k/n ..., m:ss left`` lines, printed at most every ``every`` seconds and at the last step. The time
    left is the time per unit of work so far times the work left; ``weights`` (one per step, default 1) say how
    much work each step is, e.g. a volume's number of slices."""

    def __init__(self, tag: str, total: int, log: Callable[[str], None] = print, every: float = 10.0,
                 weights: list[float] | None = None):
        self.tag, self.total, self.log, self.every = tag, max(1, int(total)), log, every
        self.weights = list(weights) if weights else [1.0] * self.total
        self.t0 = self.last = time.time()

    def step(self, done: int, what: str = "") -> None:
        now = time.time()
        if done < self.total and now - self.last < self.every:
            return
        self.last = now
        work_done = sum(self.weights[:done])
        left = (now - self.t0) / max(work_done, 1e-9) * (sum(self.weights) - work_done)
        self.log(f"[{self.tag}] {done}/{self.total}{' ' + what if what else ''}, "
                 f"{int(left // 60)}:{int(left % 60):02d} left")


def evaluate_model(client, model: str, items: Mapping[str, list[dict]], log: Callable[[str], None] = print,
                   tag: str = "round-trip", num_samples: int | None = None,
                   on_result: Callable | None = None) -> dict:
    """Dice of ``model`` on every test item; ``items`` maps a datastore image id to its datalist items (each with
    ``text``, ``_label_path`` and ``_section``: ``"test"`` for 2D images, ``"volumes"`` for volumes).

    Returns ``{"2d": {"mean": .., "n": .., "target": ..}, "volume": {...}, "items": [{image, kind, text, dice,
    latency_s}]}``. ``on_result(image_id, item, label_file, response, dice)`` is called after each answer (e.g. to
    fetch the uncertainty map it stored before the next request replaces it).
    """
    jobs = [(image_id, it) for image_id, its in items.items() for it in its]
    progress = Progress(f"{tag}: {model} Dice", len(jobs), log, weights=[_work(it) for _, it in jobs])
    rows: list[dict] = []
    for k, (image_id, item) in enumerate(jobs, 1):
        params = {"text": item["text"]}
        if num_samples:
            params["num_samples"] = int(num_samples)
        label_file, res = client.infer(model, image_id, params)
        kind = "volume" if item["_section"] == "volumes" else "2d"
        pred = load_mask(label_file)
        truth = load_mask(item["_label_path"])
        if pred.shape != truth.shape:
            raise RuntimeError(f"{model} on {image_id}: mask shape {pred.shape} differs from the truth's {truth.shape}")
        rows.append({"image": image_id, "kind": kind, "text": item["text"], "dice": round(dice_score(pred, truth), 4),
                     "latency_s": res.get("latency_s")})
        if on_result is not None:
            on_result(image_id, item, label_file, res, rows[-1]["dice"])
        mean_so_far = np.mean([r["dice"] for r in rows])
        progress.step(k, f"({kind} {image_id}: Dice {rows[-1]['dice']:.3f}; mean so far {mean_so_far:.3f})")
    out: dict = {"items": rows}
    for kind in ("2d", "volume"):
        values = [r["dice"] for r in rows if r["kind"] == kind]
        out[kind] = {"mean": round(float(np.mean(values)), 4) if values else None, "n": len(values),
                     "target": TARGETS[kind]}
    return out
