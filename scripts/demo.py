"""Main job on the embedded demo (called by scripts/run_demo.sh after set-up).

Steps: demo data -> text-blind ceiling -> `small` checkpoint per bundle (if absent) -> MONAI Label server round
trip with the real client -> overlay PNGs. Outputs go to ``outputs/demo_run/`` unless ``--out`` says otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=str(ROOT / "outputs" / "demo_run"))
    ap.add_argument("--data", default=str(ROOT / "demo_data"), help="where the demo data set is generated")
    ap.add_argument("--variant", default="small", choices=["small", "tiny"])
    ap.add_argument("--train-seconds", type=float, default=150.0, help="time box per bundle when a checkpoint is absent")
    ap.add_argument("--skip-server", action="store_true", help="stop after data + checkpoints (no MONAI Label round trip)")
    args = ap.parse_args(argv)

    from vlseg.data.demo import generate_demo_dataset
    from vlseg.viz import save_overlay

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    datalist = generate_demo_dataset(args.data)
    counts = {k: len(datalist[k]) for k in ("training", "validation", "test", "volumes")}
    ceiling = datalist["text_blind_ceiling"]
    print(f"[demo] data set in {args.data}: {counts} ({time.time() - t0:.1f} s)")
    print(f"[demo] text-blind Dice ceiling on the test split: max {ceiling['max']:.3f} "
          f"(union {ceiling['union']:.3f}, one random object {ceiling['random_object']:.3f})")

    # bundle-free smoke step: the ground truth of the first test sample as an overlay
    import numpy as np
    from PIL import Image

    item = datalist["test"][0]
    img = np.asarray(Image.open(Path(args.data) / item["image"]).convert("RGB"))
    lab = np.asarray(Image.open(Path(args.data) / item["label"])) > 127
    p = save_overlay(out / "demo_ground_truth.png", img, lab, None, title=f"ground truth for: {item['text']}")
    print(f"[demo] wrote {p}")

    try:
        from vlseg.workflow import ensure_bundle_checkpoints, run_server_round_trip
    except ImportError as e:  # the app round trip lives in vlseg.workflow
        print(f"[demo] bundles/app round trip not available: {e}")
        return 0
    ckpts = ensure_bundle_checkpoints(ROOT / "bundles", variant=args.variant, max_seconds=args.train_seconds,
                                      datalist=Path(args.data) / "datalist.json")
    print("[demo] checkpoints:", json.dumps({k: str(v) for k, v in ckpts.items()}, indent=1))
    if args.skip_server:
        return 0
    report = run_server_round_trip(ROOT, data_dir=Path(args.data), out_dir=out, variant=args.variant)
    print(json.dumps(report, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
