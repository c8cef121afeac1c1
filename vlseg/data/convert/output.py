"""Finishing a conversion: the report's verdict, strict mode, copying files, relative paths and the JSON file."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path

from vlseg.data.convert.common import SPLITS, ConversionError
from vlseg.data.convert.report import count_problems, format_report


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


def finish_conversion(
    datalist: dict, report: dict, output: str | os.PathLike | None, strict: bool, copy: bool, verbose: bool
) -> dict:
    """Store the verdict in the report and the report in ``datalist``; raise in strict mode; copy files, fix
    paths and write ``output`` when given."""
    report["n_unmatched"] = count_problems(report)
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


def datalist_header(name: str, description: str, layout: str, sources: dict) -> dict:
    """The metadata keys every converted datalist starts with."""
    return {"name": name, "description": description, "source_layout": layout, "sources": sources}


def ordered_datalist(datalist: dict) -> dict:
    """Put the splits/subsets after the metadata keys (only cosmetic for the JSON file)."""
    keys = ["name", "description", "source_layout", "sources", "match_report"]
    out = {k: datalist[k] for k in keys if k in datalist}
    out.update({k: v for k, v in datalist.items() if k not in out})
    return out
