"""The match report every converter builds: per split, what matched and every row or file that did not."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

ROW_PROBLEMS = ("rows_without_image", "rows_without_mask", "rows_without_text", "ambiguous", "duplicate_rows")
IMAGE_PROBLEMS = ("images_without_row", "images_without_mask")


def empty_split_report(sources: Sequence[str]) -> dict:
    """The report entry of one split read from ``sources`` (table files), every problem list empty."""
    unmatched = {k: [] for k in ROW_PROBLEMS + IMAGE_PROBLEMS}
    return {"sources": list(sources), "counts": {}, "unmatched": unmatched}


def finish_counts(entry: dict, rows: int, matched: int, images: int | None) -> None:
    """Fill ``entry["counts"]``: rows, matched items, images in the folder (when known) and each problem's count."""
    counts = {"rows": rows, "matched": matched}
    if images is not None:
        counts["images"] = images
    counts.update({k: len(v) for k, v in entry["unmatched"].items()})
    entry["counts"] = counts


def cross_split_duplicates(splits: Mapping[str, list[dict]]) -> list[dict]:
    """Item ids that occur in more than one split, with the splits they occur in."""
    where: dict[str, list[str]] = {}
    for split, items in splits.items():
        for it in items:
            where.setdefault(it["id"], []).append(split)
    return [{"id": k, "splits": v} for k, v in sorted(where.items()) if len(v) > 1]


def count_problems(report: dict) -> int:
    """Number of problems in a match report (every unmatched row or file, duplicate and missing table)."""
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
