"""Command line of the demo generator: ``python -m vlseg.data.demo --out DIR [--seed 0] [--small] [--overwrite]``."""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vlseg.data.demo.dataset import generate_demo_dataset
from vlseg.data.demo.readme import ceiling_lines, summary_lines
from vlseg.data.demo.splits import SMALL_N_IMAGES, SMALL_N_VOLUMES

DESCRIPTION = 'Deterministic synthetic demo data for text-prompted ("referring") segmentation.'


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vlseg.data.demo", description=DESCRIPTION)
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--small", action="store_true",
                        help=f"tiny set: {SMALL_N_IMAGES} images, {SMALL_N_VOLUMES} volumes (train, validation, test)")
    parser.add_argument("--image-size", type=int, default=192)
    parser.add_argument("--overwrite", action="store_true", help="regenerate even if an identical set exists")
    args = parser.parse_args(argv)
    kwargs: dict[str, Any] = {"seed": args.seed, "image_size": args.image_size, "overwrite": args.overwrite}
    if args.small:
        kwargs.update(n_images=SMALL_N_IMAGES, n_volumes=SMALL_N_VOLUMES)
    start = time.perf_counter()
    datalist = generate_demo_dataset(args.out, **kwargs)
    elapsed = time.perf_counter() - start
    print(f"demo data set in {Path(args.out).resolve()} ({elapsed:.1f} s)")
    print("\n".join(summary_lines(datalist)))
    print(f"text-blind ceiling ({datalist['text_blind_ceiling']['split']} split, mean Dice):")
    print("\n".join("  " + line for line in ceiling_lines(datalist["text_blind_ceiling"])))
    return 0
