"""LViT layout (``{Train,Val,Test}_Folder/{img,labelcol}`` + ``{Split}_text.xlsx``) to the canonical datalist."""

from __future__ import annotations

import os
from pathlib import Path

from vlseg.data.convert.common import SPLIT_FOLDERS, SPLIT_PREFIX, SPLITS, ConversionError
from vlseg.data.convert.matching import match_rows, split_folder_indexes, split_image_problems
from vlseg.data.convert.output import datalist_header, finish_conversion, ordered_datalist
from vlseg.data.convert.report import cross_split_duplicates, empty_split_report, finish_counts
from vlseg.data.convert.xlsx import xlsx_rows


def _lvit_table(root: Path, split: str) -> Path | None:
    prefix = SPLIT_PREFIX[split]
    sdir = root / SPLIT_FOLDERS[split]
    for cand in (sdir / f"{prefix}_text.xlsx", root / f"{prefix}_text.xlsx"):
        if cand.is_file():
            return cand
    found = sorted(sdir.glob("*_text.xlsx")) if sdir.is_dir() else []
    return found[0] if len(found) == 1 else None


def convert_lvit(
    root: str | os.PathLike,
    output: str | os.PathLike | None = None,
    *,
    image_folder: str = "img",
    mask_folder: str = "labelcol",
    name: str | None = None,
    description: str | None = None,
    strict: bool = False,
    copy: bool = False,
    verbose: bool = False,
) -> dict:
    """Convert an LViT dataset (``<root>/{Train,Val,Test}_Folder/{img,labelcol}/`` + ``{Split}_text.xlsx``).

    The table of a split is ``<root>/<Split>_Folder/<Split>_text.xlsx`` (or ``<root>/<Split>_text.xlsx``);
    columns ``Image`` and ``Description``. Masks have the image's stem (or the ``Ground Truth`` column
    when present). ``prompts = {"original": Description}``, ``text`` = the description.
    """
    root_p = Path(root).expanduser().resolve()
    if not root_p.is_dir():
        raise ConversionError(f"root not found: {root_p}")
    report: dict = {"layout": "lvit", "splits": {}, "missing_tables": [], "ignored_files": []}
    datalist = datalist_header(
        name or root_p.name,
        description or "Converted from the LViT layout by vlseg.data.convert",
        "lvit",
        {"root": str(root_p)},
    )
    for split in SPLITS:
        images, masks = split_folder_indexes(root_p, split, image_folder, mask_folder, "label", report)
        table = _lvit_table(root_p, split)
        entry = empty_split_report([str(table.relative_to(root_p))] if table else [])
        report["splits"][split] = entry
        if table is None:
            if images.stems():
                report["missing_tables"].append(f"{split}: no {SPLIT_PREFIX[split]}_text.xlsx (images exist in {images.folder})")
            split_image_problems(images, masks, set(), entry, check_masks=True)
            finish_counts(entry, 0, 0, len(images.by_stem))
            datalist[split] = []
            continue
        rows = xlsx_rows(table, "original", report)
        items, used = match_rows(rows, images, masks, entry)
        split_image_problems(images, masks, used, entry, check_masks=True)
        finish_counts(entry, len(rows), len(items), len(images.by_stem))
        datalist[split] = items
    report["cross_split_duplicates"] = cross_split_duplicates({s: datalist[s] for s in SPLITS})
    return finish_conversion(ordered_datalist(datalist), report, output, strict, copy, verbose)
