"""MedCLIPSeg layout (folders ``{Train,Val,Test}_Folder/{img,label}`` or a flat one, plus ``Prompts_Folder/*.xlsx``)
to the canonical datalist."""

from __future__ import annotations

import json
import os
from pathlib import Path

from vlseg.data.convert.common import SPLIT_PREFIX, SPLITS, SUBSET_KEYS, ConversionError
from vlseg.data.convert.matching import (
    DirIndex,
    match_rows,
    split_folder_indexes,
    split_image_problems,
    unassigned_report,
)
from vlseg.data.convert.output import datalist_header, finish_conversion, ordered_datalist
from vlseg.data.convert.report import cross_split_duplicates, empty_split_report, finish_counts
from vlseg.data.convert.xlsx import named_rows, xlsx_rows

#: prompt variants of the MedCLIPSeg test set (``Test_text_<variant>.xlsx``)
MEDCLIPSEG_TEST_VARIANTS = ("original", "contradictory", "missing_location", "overdescriptive", "underdescriptive")


def convert_medclipseg(
    root: str | os.PathLike | None = None,
    output: str | os.PathLike | None = None,
    *,
    images_dir: str | os.PathLike | None = None,
    masks_dir: str | os.PathLike | None = None,
    prompts_dir: str | os.PathLike | None = None,
    image_folder: str = "img",
    mask_folder: str = "label",
    name: str | None = None,
    description: str | None = None,
    strict: bool = False,
    copy: bool = False,
    verbose: bool = False,
) -> dict:
    """Convert a MedCLIPSeg dataset to the canonical datalist.

    Folder layout (``root``): ``<root>/{Train,Val,Test}_Folder/{img,label}/`` and ``<root>/Prompts_Folder/``
    (``Train_text.xlsx``, ``Val_text.xlsx``, ``{Train,Val}_text_{10,25,50}.xlsx``,
    ``Test_text_{original,contradictory,missing_location,overdescriptive,underdescriptive}.xlsx``).
    A mask folder ``labelcol`` is accepted when ``label`` does not exist.

    Flat layout: ``images_dir`` + ``masks_dir`` (all splits in one folder each) + ``prompts_dir``; the split
    of an image is the xlsx its row is in. ``prompts_dir`` may also be combined with ``root``.

    Items: ``prompts = {"original": Description}`` for training/validation; for test, one entry per
    ``Test_text_<variant>.xlsx`` found, ``text`` = the ``original`` variant (or ``Test_text.xlsx`` when present).
    Subset files give ``datalist["subsets"][pct][split]`` (the same items as the full split).

    Returns the datalist (also written to ``output`` when given: a ``.json`` path or a folder).
    """
    flat = images_dir is not None or masks_dir is not None
    if flat and (images_dir is None or masks_dir is None):
        raise ConversionError("the flat layout needs both images_dir and masks_dir")
    if not flat and root is None:
        raise ConversionError("give root (folder layout) or images_dir + masks_dir + prompts_dir (flat layout)")
    root_p = Path(root).expanduser().resolve() if root is not None else None
    pdir = Path(prompts_dir).expanduser().resolve() if prompts_dir is not None else (root_p / "Prompts_Folder")
    if not pdir.is_dir():
        raise ConversionError(f"prompts folder not found: {pdir}")

    report: dict = {"layout": "medclipseg" + ("/flat" if flat else "/folders"), "splits": {}, "missing_tables": []}
    report["ignored_files"] = []

    if flat:
        shared_img = DirIndex(Path(images_dir).expanduser().resolve())
        shared_msk = DirIndex(Path(masks_dir).expanduser().resolve())
        for idx, what in ((shared_img, "images_dir"), (shared_msk, "masks_dir")):
            if not idx.exists:
                raise ConversionError(f"{what} not found: {idx.folder}")
        report["ignored_files"] += shared_img.ignored + shared_msk.ignored

    def split_dirs(split: str) -> tuple[DirIndex, DirIndex]:
        if flat:
            return shared_img, shared_msk
        return split_folder_indexes(root_p, split, image_folder, mask_folder, "labelcol", report)

    datalist: dict = datalist_header(
        name or (root_p.name if root_p else pdir.name),
        description or "Converted from the MedCLIPSeg layout by vlseg.data.convert",
        "medclipseg",
        {
            "root": str(root_p) if root_p else None,
            "images_dir": str(Path(images_dir).resolve()) if flat else None,
            "masks_dir": str(Path(masks_dir).resolve()) if flat else None,
            "prompts_dir": str(pdir),
        },
    )
    used_all: set[str] = set()
    for split in SPLITS:
        prefix = SPLIT_PREFIX[split]
        if split == "test":
            base = pdir / "Test_text.xlsx"
            if not base.is_file():
                base = pdir / "Test_text_original.xlsx"
        else:
            base = pdir / f"{prefix}_text.xlsx"
        entry = empty_split_report([base.name])
        report["splits"][split] = entry
        img_idx, msk_idx = split_dirs(split)
        if not base.is_file():
            # a split without a table: fine when it has no images either (e.g. CVC-300 has no Train split)
            entry["sources"] = []
            if not flat and img_idx.stems():
                report["missing_tables"].append(f"{split}: {base.name} (images exist in {img_idx.folder})")
            if not flat:
                split_image_problems(img_idx, msk_idx, set(), entry, check_masks=False)
            finish_counts(entry, 0, 0, None if flat else len(img_idx.by_stem))
            datalist[split] = []
            continue
        rows = xlsx_rows(base, "original", report)
        items, used = match_rows(rows, img_idx, msk_idx, entry)
        used_all |= used
        if not flat:
            split_image_problems(img_idx, msk_idx, used, entry, check_masks=False)
        datalist[split] = items

        if split == "test":
            variants = {}
            for variant in MEDCLIPSEG_TEST_VARIANTS:
                vf = pdir / f"Test_text_{variant}.xlsx"
                if vf.is_file():
                    variants[variant] = vf
            by_id = {it["id"]: it for it in items}
            report["prompt_variants"] = {}
            for variant, vf in variants.items():
                vum: dict[str, list] = {"rows_not_in_split": [], "rows_without_text": [], "items_without_row": []}
                found: set[str] = set()
                table = named_rows(vf)
                for sid, rec in table:
                    if sid not in by_id:
                        vum["rows_not_in_split"].append({"image": rec["image"], "source": rec["source"]})
                    elif not rec["description"]:
                        vum["rows_without_text"].append({"image": rec["image"], "source": rec["source"]})
                    else:
                        by_id[sid]["prompts"][variant] = rec["description"]
                        found.add(sid)
                vum["items_without_row"] = sorted(set(by_id) - found)
                counts = {"rows": len(table), "matched": len(found), **{k: len(v) for k, v in vum.items()}}
                report["prompt_variants"][f"test/{variant}"] = {"sources": [vf.name], "counts": counts, "unmatched": vum}
            for it in items:  # default text: the original description
                if "original" in it["prompts"]:
                    it["text"] = it["prompts"]["original"]
        finish_counts(entry, len(rows), len(items), None if flat else len(img_idx.by_stem))

    # data-efficiency subsets: fixed lists of the training / validation split
    subsets: dict = {}
    report["subsets"] = {}
    for pct in SUBSET_KEYS:
        for split in ("training", "validation"):
            sf = pdir / f"{SPLIT_PREFIX[split]}_text_{pct}.xlsx"
            if not sf.is_file():
                continue
            by_id = {it["id"]: it for it in datalist[split]}
            sentry = {"sources": [sf.name], "counts": {}, "unmatched": {"rows_not_in_split": [], "duplicate_rows": []}}
            chosen: list[dict] = []
            seen: set[str] = set()
            table = named_rows(sf)
            for sid, rec in table:
                if sid in seen:
                    sentry["unmatched"]["duplicate_rows"].append({"image": rec["image"], "source": rec["source"]})
                elif sid not in by_id:
                    sentry["unmatched"]["rows_not_in_split"].append({"image": rec["image"], "source": rec["source"]})
                else:
                    seen.add(sid)
                    chosen.append(json.loads(json.dumps(by_id[sid])))
            sentry["counts"] = {"rows": len(table), "matched": len(chosen)}
            sentry["counts"].update({k: len(v) for k, v in sentry["unmatched"].items()})
            report["subsets"][f"{split}/{pct}"] = sentry
            subsets.setdefault(pct, {})[split] = chosen
    if subsets:
        datalist["subsets"] = subsets

    if flat:
        unassigned_report(report, shared_img, shared_msk, used_all)
    report["cross_split_duplicates"] = cross_split_duplicates({s: datalist[s] for s in SPLITS})
    return finish_conversion(ordered_datalist(datalist), report, output, strict, copy, verbose)
