"""Matching prompt-table rows to image and mask files, by exact file stem (case-sensitive, no fuzzy matching)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from vlseg.data.convert.common import SPLIT_FOLDERS
from vlseg.data.convert.report import IMAGE_PROBLEMS, empty_split_report

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif", ".nii.gz", ".nii", ".nrrd", ".dcm")


def image_stem(name: str) -> str:
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


class DirIndex:
    """Index of the image files in one folder by stem (exact, case-sensitive)."""

    def __init__(self, folder: Path | None):
        self.folder = Path(folder) if folder is not None else None
        self.by_stem: dict[str, list[Path]] = {}
        self.ignored: list[str] = []
        if self.folder is None or not self.folder.is_dir():
            return
        for p in sorted(self.folder.iterdir()):
            if _is_image_file(p):
                self.by_stem.setdefault(image_stem(p.name), []).append(p)
            elif p.is_file():
                self.ignored.append(str(p))

    @property
    def exists(self) -> bool:
        return self.folder is not None and self.folder.is_dir()

    def stems(self) -> list[str]:
        return sorted(self.by_stem)

    def lookup(self, name: str) -> tuple[Path | None, str | None]:
        """(path, None) when found; (None, "missing" | "ambiguous") otherwise."""
        cands = self.by_stem.get(image_stem(name), [])
        if len(cands) == 1:
            return cands[0], None
        if not cands:
            return None, "missing"
        exact = [c for c in cands if c.name == os.path.basename(str(name).strip())]
        if len(exact) == 1:
            return exact[0], None
        return None, "ambiguous"


class Row:
    """One prompt-table row: image name, optional mask name, prompts, default prompt key."""

    __slots__ = ("image", "mask", "prompts", "text_key", "extra", "source")

    def __init__(self, image: str, mask: str | None, prompts: dict, text_key: str, extra: dict, source: str):
        self.image, self.mask, self.prompts, self.text_key = image, mask, prompts, text_key
        self.extra, self.source = extra, source


def split_folder_indexes(root: Path, split: str, image_folder: str, mask_folder: str, other_mask_folder: str,
                         report: dict) -> tuple[DirIndex, DirIndex]:
    """Image and mask indexes of one split of a folder layout: ``<root>/<Split>_Folder/<image_folder>`` and
    ``.../<mask_folder>`` (``.../<other_mask_folder>`` when only that one exists). The non-image files found there
    are added to ``report["ignored_files"]``."""
    sdir = root / SPLIT_FOLDERS[split]
    mdir = sdir / mask_folder
    if not mdir.is_dir() and (sdir / other_mask_folder).is_dir():
        mdir = sdir / other_mask_folder
    images, masks = DirIndex(sdir / image_folder), DirIndex(mdir)
    report["ignored_files"] += images.ignored + masks.ignored
    return images, masks


def match_rows(rows: Sequence[Row], images: DirIndex, masks: DirIndex, entry: dict) -> tuple[list[dict], set[str]]:
    """Match rows to image and mask files; record every failure in ``entry``. Returns (items, used image stems)."""
    items: list[dict] = []
    seen: dict[str, str] = {}
    used: set[str] = set()
    um = entry["unmatched"]
    for row in rows:
        sid = image_stem(row.image)
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


def split_image_problems(images: DirIndex, masks: DirIndex, used: set[str], entry: dict, check_masks: bool) -> None:
    """Images present in a folder that no row refers to, and (same-stem) images without a mask."""
    um = entry["unmatched"]
    for sid in images.stems():
        if sid not in used:
            um["images_without_row"].append(str(images.by_stem[sid][0]))
            if check_masks and masks.lookup(sid)[0] is None:
                um["images_without_mask"].append(str(images.by_stem[sid][0]))


def unassigned_report(report: dict, images: DirIndex, masks: DirIndex, used: set[str]) -> None:
    """Flat layouts: images in the shared folder that no split's table refers to."""
    entry = empty_split_report([])
    entry["unmatched"] = {k: [] for k in IMAGE_PROBLEMS}
    split_image_problems(images, masks, used, entry, check_masks=True)
    entry["counts"] = {"images": len(images.by_stem), "used": len(used & set(images.by_stem))}
    entry["counts"].update({k: len(v) for k, v in entry["unmatched"].items()})
    report["unassigned"] = entry
