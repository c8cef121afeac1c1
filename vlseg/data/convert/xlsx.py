"""Reading the xlsx prompt tables of the MedCLIPSeg and LViT layouts (columns ``Image``, ``Description``,
optional ``Ground Truth``)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from vlseg.data.convert.common import ConversionError
from vlseg.data.convert.matching import Row, image_stem


def _clean_text(value: Any) -> str | None:
    """Strip whitespace/newlines; ``None`` for empty cells (NaN, None, blank)."""
    if value is None:
        return None
    if isinstance(value, float) and math.isnan(value):
        return None
    text = str(value).strip()
    return text or None


def read_xlsx(path: Path) -> list[dict]:
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


def named_rows(path: Path) -> list[tuple[str, dict]]:
    """``(image stem, row)`` of every row of a prompt table that names an image (blank rows are left out)."""
    return [(image_stem(rec["image"]), rec) for rec in read_xlsx(path) if rec["image"] is not None]


def xlsx_rows(path: Path, prompt_name: str, report: dict) -> list[Row]:
    """The rows of a prompt table, the description stored as prompt ``prompt_name``; blank rows are counted in
    ``report["blank_rows"]``."""
    rows = []
    blank = 0
    for rec in read_xlsx(path):
        if rec["image"] is None:
            blank += 1
            continue
        prompts = {prompt_name: rec["description"]} if rec["description"] else {}
        rows.append(Row(rec["image"], rec["mask"], prompts, prompt_name, {}, rec["source"]))
    if blank:
        report.setdefault("blank_rows", {})[path.name] = blank
    return rows
