#!/usr/bin/env python
"""Convert an LViT dataset ({Train,Val,Test}_Folder/{img,labelcol}/ + *_text.xlsx) to the vlseg datalist JSON.

    python scripts/prepare_lvit.py --root monuseg --output out/monuseg.json
"""

from __future__ import annotations

import argparse
import sys

from vlseg.data.convert import add_output_arguments, convert_lvit, run_converter


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", required=True, help="dataset folder with {Train,Val,Test}_Folder/")
    p.add_argument("--image-folder", default="img", help="image folder name inside <Split>_Folder (default: img)")
    p.add_argument("--mask-folder", default="labelcol", help="mask folder name inside <Split>_Folder (default: labelcol)")
    add_output_arguments(p)
    a = p.parse_args(argv)
    return run_converter(convert_lvit, a, a.root, image_folder=a.image_folder, mask_folder=a.mask_folder)


if __name__ == "__main__":
    sys.exit(main())
