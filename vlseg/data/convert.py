"""Converters from public dataset layouts to the project's canonical datalist.

Canonical form: a MONAI (Decathlon-style) datalist JSON::

    {
      "name": ..., "description": ..., "source_layout": "medclipseg" | "medvlsm" | "lvit",
      "match_report": {...},
      "training": [item, ...], "validation": [...], "test": [...],
      "subsets": {"10": {"training": [...], "validation": [...]}, "25": ..., "50": ...}   # optional
    }

with items ``{"id", "image", "label", "text", "prompts": {name: str, ...}}`` (+ ``bbox`` for MedVLSM).
``image``/``label`` are relative to the datalist file's folder when the data lies under that folder,
absolute otherwise, so ``monai.data.load_decathlon_datalist(path)`` resolves them either way.

Supported layouts:

* MedCLIPSeg: ``<root>/{Train,Val,Test}_Folder/{img,label}/`` + ``<root>/Prompts_Folder/*.xlsx``
  (columns ``Image``, ``Description``, ``Ground Truth``), or a flat layout given by
  ``images_dir``/``masks_dir``/``prompts_dir`` where the split comes from the xlsx a row is in.
* MedVLSM: ``{train,val,test}.json`` (entries with ``img_name``, ``mask_name``, ``bbox`` and prompts
  ``p0..p9``, either top-level or under ``"prompts"``) + ``images_dir``/``masks_dir``.
* LViT: ``<root>/{Train,Val,Test}_Folder/{img,labelcol}/`` + ``{Split}_text.xlsx`` in each split folder.

Names are matched by file stem, exactly (case-sensitive, no fuzzy matching): the xlsx files may say
``x.png`` while the file on disk is ``x.jpg``. Every converter builds a match report (what matched and
every row/file that did not) and stores it in the datalist; ``strict=True`` turns any problem into a
:class:`ConversionError`.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


from vlseg.data.transforms import BinarizeLabeld  # re-exported: masks are binarised on load

__all__ = [
    "SPLITS",
    "SUBSET_KEYS",
    "MEDCLIPSEG_TEST_VARIANTS",
    "ConversionError",
    "BinarizeLabeld",
    "convert_medclipseg",
    "convert_medvlsm",
    "convert_lvit",
    "load_datalist",
    "write_datalist",
    "format_report",
    "add_output_arguments",
    "run_converter",
]

#: canonical split keys of the datalist
SPLITS = ("training", "validation", "test")
#: data-efficiency subsets of MedCLIPSeg (percent of the training / validation split)
SUBSET_KEYS = ("10", "25", "50")
#: prompt variants of the MedCLIPSeg test set (``Test_text_<variant>.xlsx``)
MEDCLIPSEG_TEST_VARIANTS = ("original", "contradictory", "missing_location", "overdescriptive", "underdescriptive")

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif", ".nii.gz", ".nii", ".nrrd", ".dcm")

# folder-layout names (MedCLIPSeg and LViT share them)
_SPLIT_FOLDERS = {"training": "Train_Folder", "validation": "Val_Folder", "test": "Test_Folder"}
_SPLIT_PREFIX = {"training": "Train", "validation": "Val", "test": "Test"}
_MEDVLSM_FILES = {"training": "train.json", "validation": "val.json", "test": "test.json"}

_ROW_PROBLEMS = ("rows_without_image", "rows_without_mask", "rows_without_text", "ambiguous", "duplicate_rows")
_IMAGE_PROBLEMS = ("images_without_row", "images_without_mask")


class ConversionError(ValueError):
    """Raised for unusable inputs, and in strict mode for any unmatched row or file."""


# ----------------------------------------------------------------------------------------------
# small helpers
# ----------------------------------------------------------------------------------------------
def _stem(name: str) -> str:
    """File name without folder and without its image extension (``a.nii.gz`` -> ``a``, ``x.PNG`` -> ``x``).

    Only known image extensions are removed, so ``case.01`` stays ``case.01``.
    """
    base = os.path.basename(str(name).strip())
    low = base.lower()
    for ext in sorted(IMAGE_EXTENSIONS, key=len, reverse=True):
        if low.endswith(ext) and len(base) > len(ext):
            return base[: -len(ext)]
    return base


def _is_image_file(path: Path) -> bool:
    return path.is_file() and not path.name.startswith(".") and path.name.lower().endswith(IMAGE_EXTENSIONS)


def _clean_text(value: Any) -> str | None:
    """Strip whitespace/newlines; ``None`` for empty cells (NaN, None, blank)."""
    if value is None:
        return None
    if isinstance(value, float) and math.isnan(value):
        return None
    text = str(value).strip()
    return text or None


class _DirIndex:
    """Index of the image files in one folder by stem (exact, case-sensitive)."""

    def __init__(self, folder: Path | None):
        self.folder = Path(folder) if folder is not None else None
        self.by_stem: dict[str, list[Path]] = {}
        self.ignored: list[str] = []
        if self.folder is None or not self.folder.is_dir():
            return
        for p in sorted(self.folder.iterdir()):
            if _is_image_file(p):
                self.by_stem.setdefault(_stem(p.name), []).append(p)
            elif p.is_file():
                self.ignored.append(str(p))

    @property
    def exists(self) -> bool:
        return self.folder is not None and self.folder.is_dir()

    def stems(self) -> list[str]:
        return sorted(self.by_stem)

    def lookup(self, name: str) -> tuple[Path | None, str | None]:
        """(path, None) when found; (None, "missing" | "ambiguous") otherwise."""
        cands = self.by_stem.get(_stem(name), [])
        if len(cands) == 1:
            return cands[0], None
        if not cands:
            return None, "missing"
        exact = [c for c in cands if c.name == os.path.basename(str(name).strip())]
        if len(exact) == 1:
            return exact[0], None
        return None, "ambiguous"


class _Row:
    """One prompt-table row: image name, optional mask name, prompts, default prompt key."""

    __slots__ = ("image", "mask", "prompts", "text_key", "extra", "source")

    def __init__(self, image: str, mask: str | None, prompts: dict, text_key: str, extra: dict, source: str):
        self.image, self.mask, self.prompts, self.text_key = image, mask, prompts, text_key
        self.extra, self.source = extra, source


def _empty_split_report(sources: Sequence[str]) -> dict:
    unmatched = {k: [] for k in _ROW_PROBLEMS + _IMAGE_PROBLEMS}
    return {"sources": list(sources), "counts": {}, "unmatched": unmatched}


def _finish_counts(entry: dict, rows: int, matched: int, images: int | None) -> None:
    counts = {"rows": rows, "matched": matched}
    if images is not None:
        counts["images"] = images
    counts.update({k: len(v) for k, v in entry["unmatched"].items()})
    entry["counts"] = counts


def _match_rows(rows: Sequence[_Row], images: _DirIndex, masks: _DirIndex, entry: dict) -> tuple[list[dict], set[str]]:
    """Match rows to image and mask files; record every failure in ``entry``. Returns (items, used image stems)."""
    items: list[dict] = []
    seen: dict[str, str] = {}
    used: set[str] = set()
    um = entry["unmatched"]
    for row in rows:
        sid = _stem(row.image)
        if sid in seen:
            um["duplicate_rows"].append({"image": row.image, "source": row.source, "first": seen[sid]})
            continue
        seen[sid] = row.source
        img, why = images.lookup(row.image)
        if img is None:
            key = "ambiguous" if why == "ambiguous" else "rows_without_image"
            um[key].append({"image": row.image, "source": row.source})
            continue
        used.add(sid)
        mask_name = row.mask if row.mask else img.name
        msk, why = masks.lookup(mask_name)
        if msk is None:
            key = "ambiguous" if why == "ambiguous" else "rows_without_mask"
            um[key].append({"image": row.image, "mask": mask_name, "source": row.source})
            continue
        text = row.prompts.get(row.text_key)
        if not isinstance(text, str) or not text:
            um["rows_without_text"].append({"image": row.image, "prompt_key": row.text_key, "source": row.source})
            continue
        item = {"id": sid, "image": str(img), "label": str(msk), "text": text, "prompts": dict(row.prompts)}
        item.update(row.extra)
        items.append(item)
    return items, used


def _split_image_problems(images: _DirIndex, masks: _DirIndex, used: set[str], entry: dict, check_masks: bool) -> None:
    """Images present in a folder that no row refers to, and (same-stem) images without a mask."""
    um = entry["unmatched"]
    for sid in images.stems():
        if sid not in used:
            um["images_without_row"].append(str(images.by_stem[sid][0]))
            if check_masks and masks.lookup(sid)[0] is None:
                um["images_without_mask"].append(str(images.by_stem[sid][0]))


def _cross_split_duplicates(splits: Mapping[str, list[dict]]) -> list[dict]:
    where: dict[str, list[str]] = {}
    for split, items in splits.items():
        for it in items:
            where.setdefault(it["id"], []).append(split)
    return [{"id": k, "splits": v} for k, v in sorted(where.items()) if len(v) > 1]


def _count_problems(report: dict) -> int:
    n = 0
    for entry in list(report["splits"].values()) + ([report["unassigned"]] if "unassigned" in report else []):
        n += sum(len(v) for v in entry["unmatched"].values())
    for group in ("subsets", "prompt_variants"):
        for entry in report.get(group, {}).values():
            n += sum(len(v) for v in entry["unmatched"].values())
    n += len(report.get("cross_split_duplicates", []))
    n += len(report.get("missing_tables", []))
    return n


def format_report(report: Mapping) -> str:
    """Human-readable summary (counts) of a match report."""
    lines = [f"match report ({report.get('layout', '?')}): {report.get('n_unmatched', '?')} unmatched"]
    for split, entry in report.get("splits", {}).items():
        c = entry["counts"]
        lines.append(f"  {split:<11} " + ", ".join(f"{k}={v}" for k, v in c.items()))
    if "unassigned" in report:
        c = report["unassigned"]["counts"]
        lines.append("  unassigned  " + ", ".join(f"{k}={v}" for k, v in c.items()))
    for group in ("subsets", "prompt_variants"):
        for key, entry in report.get(group, {}).items():
            lines.append(f"  {group[:-1]} {key}: " + ", ".join(f"{k}={v}" for k, v in entry["counts"].items()))
    if report.get("blank_rows"):
        lines.append(f"  blank_rows (skipped): {report['blank_rows']}")
    for key in ("cross_split_duplicates", "missing_tables", "ignored_files", "unused_json"):
        if report.get(key):
            lines.append(f"  {key}: {len(report[key])} -> {report[key][:5]}{' ...' if len(report[key]) > 5 else ''}")
    for split, entry in report.get("splits", {}).items():
        for k, v in entry["unmatched"].items():
            if v:
                lines.append(f"  [{split}] {k}: {v[:5]}{' ...' if len(v) > 5 else ''}")
    if "unassigned" in report:
        for k, v in report["unassigned"]["unmatched"].items():
            if v:
                lines.append(f"  [unassigned] {k}: {v[:5]}{' ...' if len(v) > 5 else ''}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# xlsx reading
# ----------------------------------------------------------------------------------------------
def _read_xlsx(path: Path) -> list[dict]:
    """Rows of an xlsx prompt table as dicts with canonical keys ``image``, ``description``, ``mask``."""
    import pandas as pd

    df = pd.read_excel(path, engine="openpyxl")
    cols = {str(c).strip().lower(): c for c in df.columns}
    want = {"image": "image", "description": "description", "mask": "ground truth"}
    for required in ("image", "description"):
        if want[required] not in cols:
            raise ConversionError(
                f"{path}: missing column {want[required].title()!r}; found columns {[str(c) for c in df.columns]}"
            )
    out = []
    for i, rec in enumerate(df.to_dict("records")):
        out.append(
            {
                "image": _clean_text(rec[cols["image"]]),
                "description": _clean_text(rec[cols["description"]]),
                "mask": _clean_text(rec[cols["ground truth"]]) if "ground truth" in cols else None,
                "source": f"{path.name}:{i + 2}",  # spreadsheet row number (header is row 1)
            }
        )
    return out


def _xlsx_rows(path: Path, prompt_name: str, report: dict) -> list[_Row]:
    rows = []
    blank = 0
    for rec in _read_xlsx(path):
        if rec["image"] is None:
            blank += 1
            continue
        prompts = {prompt_name: rec["description"]} if rec["description"] else {}
        rows.append(_Row(rec["image"], rec["mask"], prompts, prompt_name, {}, rec["source"]))
    if blank:
        report.setdefault("blank_rows", {})[path.name] = blank
    return rows


# ----------------------------------------------------------------------------------------------
# output
# ----------------------------------------------------------------------------------------------
def _resolve_output(output: str | os.PathLike | None) -> Path | None:
    if output is None:
        return None
    out = Path(output).expanduser()
    if out.suffix.lower() != ".json":
        out = out / "datalist.json"
    return out.resolve()


def _finalize_paths(datalist: dict, out_json: Path | None, copy: bool) -> None:
    """Copy files (optional) and make ``image``/``label`` relative to the datalist folder where possible."""
    if out_json is None:
        return
    folder = out_json.parent
    copied: dict[str, str] = {}

    def place(src: str, split: str, kind: str) -> str:
        p = Path(src).resolve()
        if copy:
            if src not in copied:
                dst = folder / split / kind / p.name
                dst.parent.mkdir(parents=True, exist_ok=True)
                if not dst.exists() or not os.path.samefile(p, dst):
                    shutil.copy2(p, dst)
                copied[src] = str(dst)
            p = Path(copied[src])
        try:
            return p.relative_to(folder).as_posix()
        except ValueError:
            return str(p)

    def fix(items: list[dict], split: str) -> None:
        for it in items:
            it["image"] = place(it["image"], split, "images")
            it["label"] = place(it["label"], split, "labels")

    for split in SPLITS:
        fix(datalist.get(split, []), split)
    for extra in datalist.get("extra_splits", []):
        fix(datalist.get(extra, []), extra)
    for sub in datalist.get("subsets", {}).values():
        for split, items in sub.items():
            fix(items, split)


def write_datalist(datalist: Mapping, output: str | os.PathLike) -> Path:
    """Write ``datalist`` as JSON to ``output`` (a ``.json`` file, or a folder -> ``<folder>/datalist.json``)."""
    out = _resolve_output(output)
    assert out is not None
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w") as f:
        json.dump(datalist, f, indent=2, ensure_ascii=False)
        f.write("\n")
    return out


def _finish(
    datalist: dict, report: dict, output: str | os.PathLike | None, strict: bool, copy: bool, verbose: bool
) -> dict:
    report["n_unmatched"] = _count_problems(report)
    report["ok"] = report["n_unmatched"] == 0
    datalist["match_report"] = report
    if verbose:
        print(format_report(report))
    if strict and report["n_unmatched"]:
        raise ConversionError("strict mode: unmatched rows/files\n" + format_report(report))
    out_json = _resolve_output(output)
    if copy and out_json is None:
        raise ConversionError("copy=True needs an output path")
    _finalize_paths(datalist, out_json, copy)
    if out_json is not None:
        write_datalist(datalist, out_json)
        if verbose:
            print(f"wrote {out_json}")
    return datalist


def _header(name: str, description: str, layout: str, sources: dict) -> dict:
    return {"name": name, "description": description, "source_layout": layout, "sources": sources}


def _order(datalist: dict) -> dict:
    """Put the splits/subsets after the metadata keys (only cosmetic for the JSON file)."""
    keys = ["name", "description", "source_layout", "sources", "match_report"]
    out = {k: datalist[k] for k in keys if k in datalist}
    out.update({k: v for k, v in datalist.items() if k not in out})
    return out


# ----------------------------------------------------------------------------------------------
# MedCLIPSeg
# ----------------------------------------------------------------------------------------------
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
        shared_img = _DirIndex(Path(images_dir).expanduser().resolve())
        shared_msk = _DirIndex(Path(masks_dir).expanduser().resolve())
        for idx, what in ((shared_img, "images_dir"), (shared_msk, "masks_dir")):
            if not idx.exists:
                raise ConversionError(f"{what} not found: {idx.folder}")
        report["ignored_files"] += shared_img.ignored + shared_msk.ignored

    def split_dirs(split: str) -> tuple[_DirIndex, _DirIndex]:
        if flat:
            return shared_img, shared_msk
        sdir = root_p / _SPLIT_FOLDERS[split]
        mdir = sdir / mask_folder
        if not mdir.is_dir() and (sdir / "labelcol").is_dir():
            mdir = sdir / "labelcol"
        img, msk = _DirIndex(sdir / image_folder), _DirIndex(mdir)
        report["ignored_files"].extend(img.ignored + msk.ignored)
        return img, msk

    datalist: dict = _header(
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
        prefix = _SPLIT_PREFIX[split]
        if split == "test":
            base = pdir / "Test_text.xlsx"
            if not base.is_file():
                base = pdir / "Test_text_original.xlsx"
        else:
            base = pdir / f"{prefix}_text.xlsx"
        entry = _empty_split_report([base.name])
        report["splits"][split] = entry
        img_idx, msk_idx = split_dirs(split)
        if not base.is_file():
            # a split without a table: fine when it has no images either (e.g. CVC-300 has no Train split)
            entry["sources"] = []
            if not flat and img_idx.stems():
                report["missing_tables"].append(f"{split}: {base.name} (images exist in {img_idx.folder})")
            if not flat:
                _split_image_problems(img_idx, msk_idx, set(), entry, check_masks=False)
            _finish_counts(entry, 0, 0, None if flat else len(img_idx.by_stem))
            datalist[split] = []
            continue
        rows = _xlsx_rows(base, "original", report)
        items, used = _match_rows(rows, img_idx, msk_idx, entry)
        used_all |= used
        if not flat:
            _split_image_problems(img_idx, msk_idx, used, entry, check_masks=False)
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
                n_rows = 0
                for rec in _read_xlsx(vf):
                    if rec["image"] is None:
                        continue
                    n_rows += 1
                    sid = _stem(rec["image"])
                    if sid not in by_id:
                        vum["rows_not_in_split"].append({"image": rec["image"], "source": rec["source"]})
                    elif not rec["description"]:
                        vum["rows_without_text"].append({"image": rec["image"], "source": rec["source"]})
                    else:
                        by_id[sid]["prompts"][variant] = rec["description"]
                        found.add(sid)
                vum["items_without_row"] = sorted(set(by_id) - found)
                counts = {"rows": n_rows, "matched": len(found), **{k: len(v) for k, v in vum.items()}}
                report["prompt_variants"][f"test/{variant}"] = {"sources": [vf.name], "counts": counts, "unmatched": vum}
            for it in items:  # default text: the original description
                if "original" in it["prompts"]:
                    it["text"] = it["prompts"]["original"]
        _finish_counts(entry, len(rows), len(items), None if flat else len(img_idx.by_stem))

    # data-efficiency subsets: fixed lists of the training / validation split
    subsets: dict = {}
    report["subsets"] = {}
    for pct in SUBSET_KEYS:
        for split in ("training", "validation"):
            sf = pdir / f"{_SPLIT_PREFIX[split]}_text_{pct}.xlsx"
            if not sf.is_file():
                continue
            by_id = {it["id"]: it for it in datalist[split]}
            sentry = {"sources": [sf.name], "counts": {}, "unmatched": {"rows_not_in_split": [], "duplicate_rows": []}}
            chosen: list[dict] = []
            seen: set[str] = set()
            n_rows = 0
            for rec in _read_xlsx(sf):
                if rec["image"] is None:
                    continue
                n_rows += 1
                sid = _stem(rec["image"])
                if sid in seen:
                    sentry["unmatched"]["duplicate_rows"].append({"image": rec["image"], "source": rec["source"]})
                elif sid not in by_id:
                    sentry["unmatched"]["rows_not_in_split"].append({"image": rec["image"], "source": rec["source"]})
                else:
                    seen.add(sid)
                    chosen.append(json.loads(json.dumps(by_id[sid])))
            sentry["counts"] = {"rows": n_rows, "matched": len(chosen)}
            sentry["counts"].update({k: len(v) for k, v in sentry["unmatched"].items()})
            report["subsets"][f"{split}/{pct}"] = sentry
            subsets.setdefault(pct, {})[split] = chosen
    if subsets:
        datalist["subsets"] = subsets

    if flat:
        _unassigned(report, shared_img, shared_msk, used_all)
    report["cross_split_duplicates"] = _cross_split_duplicates({s: datalist[s] for s in SPLITS})
    return _finish(_order(datalist), report, output, strict, copy, verbose)


def _unassigned(report: dict, images: _DirIndex, masks: _DirIndex, used: set[str]) -> None:
    """Flat layouts: images in the shared folder that no split's table refers to."""
    entry = _empty_split_report([])
    entry["unmatched"] = {k: [] for k in _IMAGE_PROBLEMS}
    _split_image_problems(images, masks, used, entry, check_masks=True)
    entry["counts"] = {"images": len(images.by_stem), "used": len(used & set(images.by_stem))}
    entry["counts"].update({k: len(v) for k, v in entry["unmatched"].items()})
    report["unassigned"] = entry


# ----------------------------------------------------------------------------------------------
# MedVLSM
# ----------------------------------------------------------------------------------------------
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

    images, masks = _DirIndex(idir), _DirIndex(mdir)
    report: dict = {"layout": "medvlsm", "splits": {}, "missing_tables": [], "ignored_files": images.ignored + masks.ignored}
    datalist = _header(
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
        entry = _empty_split_report([jf.name])
        report["splits"][split] = entry
        if split not in SPLITS:
            extra_splits.append(split)
        if not jf.is_file():
            report["missing_tables"].append(f"{split}: {jf}")
            _finish_counts(entry, 0, 0, None)
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
            rows.append(_Row(str(img_name), e.get("mask_name"), _medvlsm_prompts(e, variant_index, where), default_prompt, extra, where))
        items, used = _match_rows(rows, images, masks, entry)
        used_all |= used
        _finish_counts(entry, len(rows), len(items), None)
        datalist[split] = items
    if extra_splits:
        datalist["extra_splits"] = extra_splits
    _unassigned(report, images, masks, used_all)
    report["cross_split_duplicates"] = _cross_split_duplicates({s: datalist[s] for s in files})
    return _finish(_order(datalist), report, output, strict, copy, verbose)


# ----------------------------------------------------------------------------------------------
# LViT
# ----------------------------------------------------------------------------------------------
def _lvit_table(root: Path, split: str) -> Path | None:
    prefix = _SPLIT_PREFIX[split]
    sdir = root / _SPLIT_FOLDERS[split]
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
    datalist = _header(
        name or root_p.name,
        description or "Converted from the LViT layout by vlseg.data.convert",
        "lvit",
        {"root": str(root_p)},
    )
    for split in SPLITS:
        sdir = root_p / _SPLIT_FOLDERS[split]
        mdir = sdir / mask_folder
        if not mdir.is_dir() and (sdir / "label").is_dir():
            mdir = sdir / "label"
        images, masks = _DirIndex(sdir / image_folder), _DirIndex(mdir)
        report["ignored_files"] += images.ignored + masks.ignored
        table = _lvit_table(root_p, split)
        entry = _empty_split_report([str(table.relative_to(root_p))] if table else [])
        report["splits"][split] = entry
        if table is None:
            if images.stems():
                report["missing_tables"].append(f"{split}: no {_SPLIT_PREFIX[split]}_text.xlsx (images exist in {images.folder})")
            _split_image_problems(images, masks, set(), entry, check_masks=True)
            _finish_counts(entry, 0, 0, len(images.by_stem))
            datalist[split] = []
            continue
        rows = _xlsx_rows(table, "original", report)
        items, used = _match_rows(rows, images, masks, entry)
        _split_image_problems(images, masks, used, entry, check_masks=True)
        _finish_counts(entry, len(rows), len(items), len(images.by_stem))
        datalist[split] = items
    report["cross_split_duplicates"] = _cross_split_duplicates({s: datalist[s] for s in SPLITS})
    return _finish(_order(datalist), report, output, strict, copy, verbose)


# ----------------------------------------------------------------------------------------------
# reading the canonical datalist
# ----------------------------------------------------------------------------------------------
def load_datalist(
    path: str | os.PathLike,
    split: str = "training",
    prompt_key: str | None = None,
    subset: str | int | None = None,
) -> list[dict]:
    """Items of one split of a canonical datalist, with absolute ``image``/``label`` paths.

    Args:
        path: the datalist JSON.
        split: ``"training"``, ``"validation"``, ``"test"`` (or another list key of the file).
        prompt_key: when given, ``text`` is replaced by ``prompts[prompt_key]`` (e.g. ``"p6"``,
            ``"contradictory"``); a ``ValueError`` lists the available keys when an item lacks it.
        subset: ``"10"``, ``"25"`` or ``"50"``: the items of ``datalist["subsets"][subset][split]``.
    """
    path = Path(path).expanduser().resolve()
    with open(path) as f:
        data = json.load(f)
    base = path.parent
    if subset is not None:
        subset = str(subset)
        subsets = data.get("subsets") or {}
        if subset not in subsets:
            raise ValueError(f"{path}: no subset {subset!r}; available subsets: {sorted(subsets)}")
        if split not in subsets[subset]:
            raise ValueError(f"{path}: subset {subset!r} has no split {split!r}; available: {sorted(subsets[subset])}")
        items = subsets[subset][split]
    else:
        if split not in data or not isinstance(data[split], list):
            avail = [k for k, v in data.items() if isinstance(v, list)]
            raise ValueError(f"{path}: no split {split!r}; available: {avail}")
        items = data[split]
    out = []
    for it in items:
        it = dict(it) if isinstance(it, Mapping) else {"image": it}
        for key in ("image", "label"):
            if key in it and isinstance(it[key], str) and not os.path.isabs(it[key]):
                it[key] = os.path.normpath(os.path.join(base, it[key]))
        if prompt_key is not None:
            prompts = it.get("prompts") or {}
            if prompt_key not in prompts:
                raise ValueError(
                    f"{path} [{split}] item {it.get('id', it.get('image'))!r} has no prompt {prompt_key!r}; "
                    f"available prompt keys: {sorted(prompts)}"
                )
            value = prompts[prompt_key]
            if not isinstance(value, str):
                raise ValueError(f"prompt {prompt_key!r} is a {type(value).__name__}, not a string; use a single-string key")
            it["text"] = value
        out.append(it)
    return out


# ----------------------------------------------------------------------------------------------
# label binarisation on load
# ----------------------------------------------------------------------------------------------


# ----------------------------------------------------------------------------------------------
# command lines (scripts/prepare_*.py)
# ----------------------------------------------------------------------------------------------
def add_output_arguments(parser) -> None:
    """The options every ``scripts/prepare_*.py`` shares: the datalist path, its name and description, and how the
    conversion treats and reports problems (add them after the layout's own options)."""
    parser.add_argument("--output", required=True, help="datalist .json path, or a folder (-> <folder>/datalist.json)")
    parser.add_argument("--name", help="dataset name stored in the datalist")
    parser.add_argument("--description", help="description stored in the datalist")
    parser.add_argument("--strict", action="store_true", help="fail on any unmatched row or file")
    parser.add_argument("--copy", action="store_true", help="copy images and masks next to the datalist")
    parser.add_argument("--quiet", action="store_true", help="do not print the match report")


def run_converter(convert, args, *positional, **kwargs) -> int:
    """``convert(*positional, output=args.output, **kwargs)`` with the options of :func:`add_output_arguments`:
    the exit status of a ``prepare_*`` command (1 after printing a :class:`ConversionError` to stderr)."""
    try:
        convert(*positional, output=args.output, name=args.name, description=args.description, strict=args.strict,
                copy=args.copy, verbose=not args.quiet, **kwargs)
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0
