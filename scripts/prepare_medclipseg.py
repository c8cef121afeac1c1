#!/usr/bin/env python
"""Convert a MedCLIPSeg dataset (folder or flat layout) to the vlseg datalist JSON.

Folder layout:  python scripts/prepare_medclipseg.py --root data/Kvasir --output out/kvasir.json
Flat layout:    python scripts/prepare_medclipseg.py --images-dir kvasir_seg/images --masks-dir kvasir_seg/masks \
                    --prompts-dir kvasir_seg/prompts/medclipseg --output out/kvasir.json
"""

from __future__ import annotations

import argparse
import sys

from vlseg.data.convert import ConversionError, convert_medclipseg


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", help="dataset folder with {Train,Val,Test}_Folder/{img,label}/ and Prompts_Folder/")
    p.add_argument("--images-dir", help="flat layout: one folder with the images of all splits")
    p.add_argument("--masks-dir", help="flat layout: one folder with the masks of all splits")
    p.add_argument("--prompts-dir", help="folder with the *_text*.xlsx files (default: <root>/Prompts_Folder)")
    p.add_argument("--image-folder", default="img", help="image folder name inside <Split>_Folder (default: img)")
    p.add_argument("--mask-folder", default="label", help="mask folder name inside <Split>_Folder (default: label)")
    p.add_argument("--output", required=True, help="datalist .json path, or a folder (-> <folder>/datalist.json)")
    p.add_argument("--name", help="dataset name stored in the datalist")
    p.add_argument("--description", help="description stored in the datalist")
    p.add_argument("--strict", action="store_true", help="fail on any unmatched row or file")
    p.add_argument("--copy", action="store_true", help="copy images and masks next to the datalist")
    p.add_argument("--quiet", action="store_true", help="do not print the match report")
    a = p.parse_args(argv)
    try:
        convert_medclipseg(
            a.root,
            a.output,
            images_dir=a.images_dir,
            masks_dir=a.masks_dir,
            prompts_dir=a.prompts_dir,
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
