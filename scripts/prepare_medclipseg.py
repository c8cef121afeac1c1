#!/usr/bin/env python
"""Convert a MedCLIPSeg dataset (folder or flat layout) to the vlseg datalist JSON.

Folder layout:  python scripts/prepare_medclipseg.py --root data/Kvasir --output out/kvasir.json
Flat layout:    python scripts/prepare_medclipseg.py --images-dir kvasir_seg/images --masks-dir kvasir_seg/masks \
                    --prompts-dir kvasir_seg/prompts/medclipseg --output out/kvasir.json
"""

from __future__ import annotations

import argparse
import sys

from vlseg.data.convert import add_output_arguments, convert_medclipseg, run_converter


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", help="dataset folder with {Train,Val,Test}_Folder/{img,label}/ and Prompts_Folder/")
    p.add_argument("--images-dir", help="flat layout: one folder with the images of all splits")
    p.add_argument("--masks-dir", help="flat layout: one folder with the masks of all splits")
    p.add_argument("--prompts-dir", help="folder with the *_text*.xlsx files (default: <root>/Prompts_Folder)")
    p.add_argument("--image-folder", default="img", help="image folder name inside <Split>_Folder (default: img)")
    p.add_argument("--mask-folder", default="label", help="mask folder name inside <Split>_Folder (default: label)")
    add_output_arguments(p)
    a = p.parse_args(argv)
    return run_converter(convert_medclipseg, a, a.root, images_dir=a.images_dir, masks_dir=a.masks_dir,
                         prompts_dir=a.prompts_dir, image_folder=a.image_folder, mask_folder=a.mask_folder)


if __name__ == "__main__":
    sys.exit(main())
