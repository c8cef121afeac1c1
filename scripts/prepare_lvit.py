#!/usr/bin/env python
"""Convert an LViT dataset ({Train,Val,Test}_Folder/{img,labelcol}/ + *_text.xlsx) to the vlseg datalist JSON.

    python scripts/prepare_lvit.py --root monuseg --output out/monuseg.json
"""

from __future__ import annotations

import argparse
import sys

from vlseg.data.convert import ConversionError, convert_lvit


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", required=True, help="dataset folder with {Train,Val,Test}_Folder/")
    p.add_argument("--image-folder", default="img", help="image folder name inside <Split>_Folder (default: img)")
    p.add_argument("--mask-folder", default="labelcol", help="mask folder name inside <Split>_Folder (default: labelcol)")
    p.add_argument("--output", required=True, help="datalist .json path, or a folder (-> <folder>/datalist.json)")
    p.add_argument("--name", help="dataset name stored in the datalist")
    p.add_argument("--description", help="description stored in the datalist")
    p.add_argument("--strict", action="store_true", help="fail on any unmatched row or file")
    p.add_argument("--copy", action="store_true", help="copy images and masks next to the datalist")
    p.add_argument("--quiet", action="store_true", help="do not print the match report")
    a = p.parse_args(argv)
    try:
        convert_lvit(
            a.root,
            a.output,
            image_folder=a.image_folder,
            mask_folder=a.mask_folder,
            name=a.name,
            description=a.description,
            strict=a.strict,
            copy=a.copy,
            verbose=not a.quiet,
        )
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
