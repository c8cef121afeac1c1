"""MedVLSM annotation JSONs (``anns/{train,val,test}.json``, prompts ``p0..p9``) to the canonical datalist."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from vlseg.data.convert.common import SPLITS, ConversionError
from vlseg.data.convert.matching import DirIndex, Row, match_rows, unassigned_report
from vlseg.data.convert.output import datalist_header, finish_conversion, ordered_datalist
from vlseg.data.convert.report import cross_split_duplicates, empty_split_report, finish_counts

_MEDVLSM_FILES = {"training": "train.json", "validation": "val.json", "test": "test.json"}


def _medvlsm_prompts(entry: Mapping, variant_index: int, where: str) -> dict:
    src = entry["prompts"] if isinstance(entry.get("prompts"), Mapping) else entry
    keys = sorted((k for k in src if isinstance(k, str) and k[:1] == "p" and k[1:].isdigit()), key=lambda k: int(k[1:]))
    out: dict[str, Any] = {}
    for k in keys:
        v = src[k]
        if isinstance(v, (list, tuple)):
            vals = [str(x).strip() for x in v]
            if not vals:
                continue
            if not -len(vals) <= variant_index < len(vals):
                raise ConversionError(f"{where}: variant_index {variant_index} out of range for {k} ({len(vals)} variants)")
            out[k] = vals[variant_index]
            out[f"{k}_all"] = vals
        elif v is not None:
            out[k] = str(v).strip()
    return out


def convert_medvlsm(
    prompts_dir: str | os.PathLike | None = None,
    output: str | os.PathLike | None = None,
    *,
    images_dir: str | os.PathLike | None = None,
    masks_dir: str | os.PathLike | None = None,
    root: str | os.PathLike | None = None,
    split_files: Mapping[str, str | os.PathLike] | None = None,
    default_prompt: str = "p9",
    variant_index: int = 0,
    name: str | None = None,
    description: str | None = None,
    strict: bool = False,
    copy: bool = False,
    verbose: bool = False,
) -> dict:
    """Convert MedVLSM annotation JSONs (``anns/{train,val,test}.json``) to the canonical datalist.

    ``root`` is the MedVLSM dataset folder (``<root>/{images,masks,anns}``); ``images_dir``, ``masks_dir``,
    ``prompts_dir`` override its parts. ``split_files`` maps split key -> JSON file (relative to
    ``prompts_dir``); default ``{"training": "train.json", "validation": "val.json", "test": "test.json"}``;
    other keys (e.g. ``"testB"``) become extra top-level lists.

    Prompts: ``p0..p9``; list-valued prompts (p7-p9: several phrasings) are kept as ``pK`` = the
    ``variant_index``-th phrasing and ``pK_all`` = all of them. ``text`` = ``prompts[default_prompt]``.
    ``bbox`` (``[x0, y0, x1, y1]`` pixels, as in the JSON) is kept in the item.
    """
    root_p = Path(root).expanduser().resolve() if root is not None else None
    pdir = Path(prompts_dir).expanduser().resolve() if prompts_dir is not None else (root_p / "anns" if root_p else None)
    idir = Path(images_dir).expanduser().resolve() if images_dir is not None else (root_p / "images" if root_p else None)
    mdir = Path(masks_dir).expanduser().resolve() if masks_dir is not None else (root_p / "masks" if root_p else None)
    for what, p in (("prompts_dir", pdir), ("images_dir", idir), ("masks_dir", mdir)):
        if p is None or not p.is_dir():
            raise ConversionError(f"{what} not found: {p} (give root= or {what}=)")
    files = dict(split_files) if split_files else dict(_MEDVLSM_FILES)

    images, masks = DirIndex(idir), DirIndex(mdir)
    report: dict = {"layout": "medvlsm", "splits": {}, "missing_tables": [], "ignored_files": images.ignored + masks.ignored}
    datalist = datalist_header(
        name or (root_p.name if root_p else pdir.parent.name),
        description or "Converted from MedVLSM annotation JSONs by vlseg.data.convert",
        "medvlsm",
        {"prompts_dir": str(pdir), "images_dir": str(idir), "masks_dir": str(mdir), "default_prompt": default_prompt, "variant_index": variant_index},
    )
    mapped = {Path(pdir / f).resolve() for f in files.values()}
    unmapped = sorted(p.name for p in pdir.glob("*.json") if p.resolve() not in mapped)
    if unmapped:
        report["unused_json"] = unmapped
    used_all: set[str] = set()
    extra_splits = []
    for split, fname in files.items():
        jf = (pdir / fname) if not Path(fname).is_absolute() else Path(fname)
        entry = empty_split_report([jf.name])
        report["splits"][split] = entry
        if split not in SPLITS:
            extra_splits.append(split)
        if not jf.is_file():
            report["missing_tables"].append(f"{split}: {jf}")
            finish_counts(entry, 0, 0, None)
            datalist[split] = []
            continue
        with open(jf) as f:
            entries = json.load(f)
        if not isinstance(entries, list):
            raise ConversionError(f"{jf}: expected a JSON list of entries, got {type(entries).__name__}")
        rows = []
        for i, e in enumerate(entries):
            where = f"{jf.name}[{i}]"
            img_name = e.get("img_name")
            if not img_name:
                raise ConversionError(f"{where}: entry has no img_name (keys: {sorted(e)})")
            extra = {}
            if e.get("bbox") is not None:
                extra["bbox"] = e["bbox"]
            rows.append(Row(str(img_name), e.get("mask_name"), _medvlsm_prompts(e, variant_index, where), default_prompt, extra, where))
        items, used = match_rows(rows, images, masks, entry)
        used_all |= used
        finish_counts(entry, len(rows), len(items), None)
        datalist[split] = items
    if extra_splits:
        datalist["extra_splits"] = extra_splits
    unassigned_report(report, images, masks, used_all)
    report["cross_split_duplicates"] = cross_split_duplicates({s: datalist[s] for s in files})
    return finish_conversion(ordered_datalist(datalist), report, output, strict, copy, verbose)
