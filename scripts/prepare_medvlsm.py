#!/usr/bin/env python
"""Convert MedVLSM annotation JSONs ({train,val,test}.json) to the vlseg datalist JSON.

    python scripts/prepare_medvlsm.py --prompts-dir kvasir_seg/prompts/medvlsm \
        --images-dir kvasir_seg/images --masks-dir kvasir_seg/masks --output out/kvasir_medvlsm.json
    python scripts/prepare_medvlsm.py --root medvlsm/data/kvasir_polyp --output out/kvasir_medvlsm.json
"""

from __future__ import annotations

import argparse
import sys

from vlseg.data.convert import add_output_arguments, convert_medvlsm, run_converter


def _split_file(s: str) -> tuple[str, str]:
    if "=" not in s:
        raise argparse.ArgumentTypeError(f"expected SPLIT=FILE, got {s!r}")
    k, v = s.split("=", 1)
    return k, v


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", help="MedVLSM dataset folder with images/, masks/, anns/")
    p.add_argument("--prompts-dir", help="folder with the annotation JSONs (default: <root>/anns)")
    p.add_argument("--images-dir", help="image folder (default: <root>/images)")
    p.add_argument("--masks-dir", help="mask folder (default: <root>/masks)")
    p.add_argument(
        "--split-file",
        action="append",
        type=_split_file,
        metavar="SPLIT=FILE",
        help="map a split to a JSON file (repeatable; default training=train.json validation=val.json test=test.json)",
    )
    p.add_argument("--default-prompt", default="p9", help="prompt key used as the item's text (default: p9)")
    p.add_argument("--variant-index", type=int, default=0, help="which phrasing of list-valued prompts (p7-p9) is pK")
    add_output_arguments(p)
    a = p.parse_args(argv)
    return run_converter(convert_medvlsm, a, a.prompts_dir, images_dir=a.images_dir, masks_dir=a.masks_dir,
                         root=a.root, split_files=dict(a.split_file) if a.split_file else None,
                         default_prompt=a.default_prompt, variant_index=a.variant_index)


if __name__ == "__main__":
    sys.exit(main())
