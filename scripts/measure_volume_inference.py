"""Time the app's volume inference: batched slices (``--conf volume_batch N``) against the older path (one full
MONAI Label bundle run per slice and prompt from a PNG, ``volume_batch 0``), per bundle.

    .venv/bin/python scripts/measure_volume_inference.py                       # 100 slices x 3 prompts, all bundles
    .venv/bin/python scripts/measure_volume_inference.py --bundles uavls --slices 20 --out /tmp/vol.json

The volume is a demo volume (``vlseg.data.demo``, the demo's 96 x 96 slices) with ``--slices`` slices, generated in
a temporary folder. Each bundle is served as the app serves it (:class:`lib.infers.text_bundle.TextBundleInferTask`)
from a temporary copy: the ``small`` variant when ``bundles/<name>/models/model.pt`` was made for it, else the
``tiny`` variant with a random-initialisation checkpoint (stated in the output as ``weights``). Both paths run on
the same task, warm (a 2-slice volume first), with the task's default ``num_samples`` unless ``--num-samples``;
the report also gives how far the two results agree (equal up to float rounding where the bundle's single pass is
deterministic; stochastic passes draw per batch, see lib/infers/volume.py).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "apps" / "vlseg"))

from lib.infers.text_bundle import TextBundleInferTask  # noqa: E402
from lib.params import resolve_prompts  # noqa: E402

from vlseg.app_support.bundles import read_checkpoint_record  # noqa: E402
from vlseg.app_support.checkpoints import write_initial_checkpoint  # noqa: E402

LABELS = {"polyp": 1, "cyst": 2, "lesion": 3}


def demo_volume(folder: Path, slices: int, seed: int = 0) -> Path:
    """One demo test volume of shape (96, 96, ``slices``) (the demo's slice size)."""
    from vlseg.data.demo import generate_demo_dataset

    dl = generate_demo_dataset(folder, seed=seed, n_images=(0, 0, 0), image_size=64, n_volumes=1,
                               volume_shape=(96, 96, int(slices)))
    return folder / dl["volumes"][0]["image"]


def served_copy(name: str, work: Path) -> tuple[Path, str, str]:
    """``(bundle folder, variant, weights)``: a copy of ``bundles/<name>`` with the checkpoint it is served with."""
    src = REPO / "bundles" / name
    dst = work / "bundles" / name
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("runs", "eval", "__pycache__"), symlinks=True)
    record = read_checkpoint_record(src) or {}
    if (src / "models" / "model.pt").is_file() and record.get("variant", "") == "small":
        return dst, "small", f"trained checkpoint ({record.get('source') or record.get('made_by') or 'models/model.pt'})"
    for f in (dst / "models").glob("*.pt"):
        f.unlink()
    write_initial_checkpoint(dst, "tiny")
    return dst, "tiny", "random initialisation (no small checkpoint in bundles/<name>/models)"


def timed(task, path: str, prompts, num_samples: int, batch: int) -> tuple[float, object]:
    task.volume_batch = batch
    t0 = time.perf_counter()
    pred = task.predict(path, prompts, num_samples, 0, 2, extra={"device": "cpu"})
    return time.perf_counter() - t0, pred


def measure(name: str, work: Path, volume: Path, warm: Path, n_prompts: int, num_samples: int | None,
            batch: int) -> dict:
    bundle, variant, weights = served_copy(name, work)
    task = TextBundleInferTask(str(bundle), {}, variant=variant, label_names=LABELS)
    prompts = resolve_prompts({"label_prompt": list(range(1, n_prompts + 1))}, task.label_names, "lesion")
    ns = int(num_samples or task.default_samples)
    for b in (0, batch):  # warm both paths (lazy imports, first allocations)
        timed(task, str(warm), prompts[:1], ns, b)
    old_s, old = timed(task, str(volume), prompts, ns, 0)
    new_s, new = timed(task, str(volume), prompts, ns, batch)
    return {
        "bundle": name, "variant": variant, "weights": weights, "num_samples": ns, "prompts": [p.prompt for p in prompts],
        "shape": list(old.mask.shape), "volume_batch": batch,
        "per_slice_s": round(old_s, 3), "batched_s": round(new_s, 3), "speedup": round(old_s / new_s, 2),
        "mask_agreement": round(float((old.mask == new.mask).mean()), 6),
        "uncertainty_max_abs_diff": round(float(np.abs(old.uncertainty - new.uncertainty).max()), 6),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundles", default="medclipseg,uavls,vilmedsam")
    ap.add_argument("--slices", type=int, default=100)
    ap.add_argument("--prompts", type=int, default=3, choices=(1, 2, 3))
    ap.add_argument("--num-samples", type=int, default=None, help="default: the task's default (bundle config)")
    ap.add_argument("--volume-batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory(prefix="vlseg_volume_timing_") as tmp:
        work = Path(tmp)
        volume = demo_volume(work / "demo", args.slices)
        warm = work / "warm.nii.gz"
        import nibabel as nib

        nib.save(nib.load(str(volume)).slicer[:, :, :2], str(warm))
        for name in [b.strip() for b in args.bundles.split(",") if b.strip()]:
            row = measure(name, work, volume, warm, args.prompts, args.num_samples, args.volume_batch)
            rows.append(row)
            print(f"{name:11s} {row['variant']:5s} S={row['num_samples']:<2d} {args.slices} slices x {args.prompts} "
                  f"prompts: per-slice {row['per_slice_s']:.1f}s, batched {row['batched_s']:.1f}s "
                  f"-> {row['speedup']:.1f}x (mask agreement {row['mask_agreement']:.4f}; weights: {row['weights']})",
                  flush=True)
    result = {"slices": args.slices, "prompts": args.prompts, "threads": args.threads, "device": "cpu",
              "torch": torch.__version__, "results": rows}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
