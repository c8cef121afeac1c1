"""MONAI Label round trip on the demo data: server + real client, Dice of every model, overlays, timings.

    python scripts/demo_roundtrip.py [--variant small|tiny] [--data DIR] [--out DIR] [--images N] [--volumes N]

1. makes the demo data set if needed, and each bundle's ``--variant`` checkpoint: the one shipped in
   ``checkpoints/`` (``--no-shipped``: train instead, ``python -m monai.bundle run`` with ``configs/train.json`` +
   ``configs/<variant>.json``, time-boxed by ``--train-seconds``, progress printed);
2. starts ``monailabel start_server --app apps/vlseg --host 127.0.0.1 --port <free> --conf variant <variant>
   --studies <copy of the demo test images and test volumes>``;
3. through ``monailabel.client.MONAILabelClient``: ``/info``; every model on every held-out test item (2D images
   and volumes, prompt = the item's full description), Dice against the truth; overlay PNGs of the first 2D
   image and the first volume per model (Dice in the title); labels saved with their prompts, uncertainty
   scoring, the next sample from active learning, a short training, an infer with the new checkpoint;
4. stops the server and prints each model's mean Dice (2D test items / test volume items), the overlay PNGs and
   the wall time. Exit status 1 when a model misses the Dice targets (0.80 2D, 0.70 volumes) with ``--strict``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _dice_table(report: dict) -> list[str]:
    lines = [f"  {'model':<12} {'2D test items':>22} {'test volume items':>22}   targets 0.80 / 0.70"]
    for model, result in report.get("dice", {}).items():
        cells, ok = [], True
        for kind in ("2d", "volume"):
            r = result[kind]
            cells.append("n/a" if r["mean"] is None else f"{r['mean']:.3f} (n={r['n']})")
            ok = ok and (r["mean"] is None or r["mean"] >= r["target"])
        lines.append(f"  {model:<12} {cells[0]:>22} {cells[1]:>22}   {'met' if ok else 'NOT met'}")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", default="small", help="bundle size variant: small (demo) or tiny (quick check)")
    ap.add_argument("--data", default=None, help="demo data folder (default: the vlseg demo cache)")
    ap.add_argument("--out", default=str(ROOT / "outputs" / "round_trip"))
    ap.add_argument("--bundles-dir", default=str(ROOT / "bundles"))
    ap.add_argument("--models", default="", help="comma-separated subset of bundles (default: all)")
    ap.add_argument("--no-shipped", action="store_true",
                    help="train the checkpoints (--train-seconds each) instead of using those shipped in checkpoints/")
    ap.add_argument("--train-seconds", type=float, default=150.0,
                    help="training budget per bundle (wall clock) when a checkpoint has to be trained")
    ap.add_argument("--images", type=int, default=0, help="2D test images to evaluate and serve (0: all)")
    ap.add_argument("--volumes", type=int, default=0, help="test volumes to evaluate and serve (0: all)")
    ap.add_argument("--num-samples", type=int, default=None,
                    help="stochastic passes per request (default: each model's own default)")
    ap.add_argument("--train-epochs", type=int, default=1, help="epochs of the training started from the server")
    ap.add_argument("--skip-checkpoints", action="store_true", help="use models/model.pt as it is")
    ap.add_argument("--strict", action="store_true", help="exit 1 when a model misses the Dice targets")
    args = ap.parse_args(argv)

    from vlseg.app_support.checkpoints import exit_on_sigterm
    from vlseg.data.demo import ensure_demo_dataset
    from vlseg.workflow import ensure_bundle_checkpoints, run_server_round_trip

    exit_on_sigterm()  # a killed run still stops its training / server processes
    t0 = time.time()
    print("[round-trip] demo data set (generated once, about 30 s) ...", flush=True)
    datalist = Path(ensure_demo_dataset(args.data)) if args.data else Path(ensure_demo_dataset())
    ceiling = json.loads(datalist.read_text())["text_blind_ceiling"]
    print(f"[round-trip] demo data: {datalist.parent}; text-blind Dice ceiling on its test split: {ceiling['max']:.3f} "
          f"(union of the objects {ceiling['union']:.3f}, one object at random {ceiling['random_object']:.3f})")
    if not args.skip_checkpoints:
        ensure_bundle_checkpoints(args.bundles_dir, args.variant, max_seconds=args.train_seconds, datalist=datalist,
                                  log_dir=Path(args.out) / "logs", models=args.models or None,
                                  shipped=not args.no_shipped, overrides={"max_train_clock": "wall"},
                                  progress=lambda line: print(line, flush=True))
    report = run_server_round_trip(ROOT, data_dir=datalist.parent, out_dir=args.out, variant=args.variant,
                                   bundles_dir=args.bundles_dir, models=args.models or None,
                                   n_images=args.images or None, n_volumes=args.volumes or None,
                                   num_samples=args.num_samples, train_epochs=args.train_epochs)
    print("[round-trip] overlay PNGs:")
    for p in report["overlays"]:
        print(f"  {p}")
    example = next(iter(report["dice"].values()), {}).get("items", [{}])[0].get("text", "")
    print(f"[round-trip] mean Dice on the held-out demo test set, through the server (prompt: each item's full "
          f"description, e.g. {example!r}):")
    print("\n".join(_dice_table(report)))
    print(f"[round-trip] server round trip {report['wall_s']} s; total wall time {time.time() - t0:.1f} s")
    missed = [m for m, r in report["dice"].items()
              if any(r[k]["mean"] is not None and r[k]["mean"] < r[k]["target"] for k in ("2d", "volume"))]
    return 1 if args.strict and missed else 0


if __name__ == "__main__":
    sys.exit(main())
