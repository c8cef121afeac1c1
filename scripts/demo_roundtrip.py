"""MONAI Label round trip on the demo data: server + real client, overlays, timings.

    python scripts/demo_roundtrip.py [--variant small|tiny] [--data DIR] [--out DIR] [--train-seconds S]

1. makes the demo data set if needed and each bundle's ``--variant`` checkpoint if ``models/model.pt`` is absent
   (``python -m monai.bundle run`` with ``configs/train.json`` + ``configs/<variant>.json``, time-boxed);
2. starts ``monailabel start_server --app apps/vlseg --studies <copy of demo images> --host 127.0.0.1
   --port <free> --conf variant <variant>``;
3. through ``monailabel.client.MONAILabelClient``: ``/info``, a text-prompted infer per bundle (plus one NIfTI
   volume), the uncertainty maps, labels saved with their prompts, uncertainty scoring, the next sample from
   active learning, a short training, an infer with the new checkpoint;
4. stops the server and prints where the overlay PNGs are and the wall time.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", default="small", help="bundle size variant: small (demo) or tiny (quick check)")
    ap.add_argument("--data", default=None, help="demo data folder (default: the vlseg demo cache)")
    ap.add_argument("--out", default=str(ROOT / "outputs" / "round_trip"))
    ap.add_argument("--bundles-dir", default=str(ROOT / "bundles"))
    ap.add_argument("--models", default="", help="comma-separated subset of bundles (default: all)")
    ap.add_argument("--train-seconds", type=float, default=150.0,
                    help="training budget per bundle when its checkpoint is absent")
    ap.add_argument("--images", type=int, default=8, help="demo test images in the studies folder")
    ap.add_argument("--train-epochs", type=int, default=1, help="epochs of the training started from the server")
    ap.add_argument("--skip-checkpoints", action="store_true", help="do not train missing checkpoints")
    args = ap.parse_args(argv)

    from vlseg.app_support.checkpoints import exit_on_sigterm
    from vlseg.data.demo import ensure_demo_dataset
    from vlseg.workflow import ensure_bundle_checkpoints, run_server_round_trip

    exit_on_sigterm()  # a killed run still stops its training / server processes
    t0 = time.time()
    datalist = Path(ensure_demo_dataset(args.data)) if args.data else Path(ensure_demo_dataset())
    ceiling = json.loads(datalist.read_text())["text_blind_ceiling"]
    print(f"[round-trip] demo data: {datalist.parent}; text-blind Dice ceiling on its test split: {ceiling['max']:.3f} "
          f"(union of the objects {ceiling['union']:.3f}, one object at random {ceiling['random_object']:.3f})")
    if not args.skip_checkpoints:
        ensure_bundle_checkpoints(args.bundles_dir, args.variant, max_seconds=args.train_seconds, datalist=datalist,
                                  log_dir=Path(args.out) / "logs", models=args.models or None)
    report = run_server_round_trip(ROOT, data_dir=datalist.parent, out_dir=args.out, variant=args.variant,
                                   bundles_dir=args.bundles_dir, models=args.models or None, n_images=args.images,
                                   train_epochs=args.train_epochs)
    print("[round-trip] overlay PNGs:")
    for p in report["overlays"]:
        print(f"  {p}")
    print(f"[round-trip] server round trip {report['wall_s']} s; total wall time {time.time() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
