"""Which data the benchmarks run on, and datalists cut from it.

* When ``<repo>/../shared/data/kvasir_seg`` exists: Kvasir-SEG with the MedVLSM split (800/100/100, prompts
  ``p1..p9``) merged with the MedCLIPSeg tables of the same split (test variants ``original``,
  ``contradictory``, ``missing_location``, ``overdescriptive``, ``underdescriptive`` and the fixed 10/25/50 %
  training subsets), both converted by :mod:`vlseg.data.convert`. Images and masks are resized once to
  224 x 224 (bilinear / nearest) into a cache folder so training does not decode 600 x 500 JPEGs every epoch.
* Otherwise the embedded synthetic demo set (:func:`vlseg.data.demo.ensure_demo_dataset`), whose items carry
  the same prompt keys.
* ``--datalist PATH`` uses any canonical datalist as is (the tests pass the tiny demo set).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vlseg.bench.report import repo_root

__all__ = [
    "PROMPT_LEVELS",
    "TEST_VARIANTS",
    "BenchData",
    "shared_data_dir",
    "resolve_data",
    "prepare_kvasir",
    "subset_items",
    "write_datalist",
    "cache_dir",
]

PROMPT_LEVELS = tuple(f"p{i}" for i in range(1, 10))
TEST_VARIANTS = ("original", "contradictory", "missing_location", "overdescriptive", "underdescriptive")
#: demo data only: the description of another object of the same image (a wrong prompt)
EXTRA_VARIANTS = ("other_object",)
KVASIR_SIZE = 224
_KVASIR_VERSION = 1


def shared_data_dir() -> Path:
    return repo_root().parent / "shared" / "data"


def cache_dir() -> Path:
    env = os.environ.get("VLSEG_BENCH_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "vlseg" / "bench"


@dataclass
class BenchData:
    """A canonical datalist plus what the reports say about it."""

    datalist: Path
    name: str
    kind: str  # "kvasir", "demo" or "custom"
    description: str = ""
    limits: dict[str, int] = field(default_factory=dict)  # split -> max items (quick runs)

    def raw(self) -> dict[str, Any]:
        return json.loads(self.datalist.read_text())

    def items(self, split: str, subset: str | int | None = None, prompt_key: str | None = None,
              limit: int | None = None) -> list[dict]:
        """Items with absolute paths; ``limit`` (or the quick-run limit of the split) keeps the first ones."""
        from vlseg.data.convert import load_datalist

        items = load_datalist(self.datalist, split=split, prompt_key=prompt_key, subset=subset) if subset is not None \
            else load_datalist(self.datalist, split=split, prompt_key=prompt_key)
        n = limit if limit is not None else self.limits.get(split)
        return items[:n] if n else items

    def prompt_keys(self, split: str = "test") -> list[str]:
        """Prompt keys every item of ``split`` has (in a fixed order: p1..p9 then the MedCLIPSeg variants)."""
        items = self.items(split)
        if not items:
            return []
        common = set.intersection(*[set((it.get("prompts") or {}).keys()) for it in items])
        order = list(PROMPT_LEVELS) + list(TEST_VARIANTS) + list(EXTRA_VARIANTS)
        return [k for k in order if k in common and all(isinstance(it["prompts"][k], str) for it in items)]


def _resize_pair(src_img: Path, src_msk: Path, dst_img: Path, dst_msk: Path, size: int) -> None:
    from PIL import Image

    img = Image.open(src_img).convert("RGB").resize((size, size), Image.BILINEAR)
    msk = np.asarray(Image.open(src_msk).convert("L")) > 127
    msk = Image.fromarray((msk * 255).astype(np.uint8)).resize((size, size), Image.NEAREST)
    dst_img.parent.mkdir(parents=True, exist_ok=True)
    dst_msk.parent.mkdir(parents=True, exist_ok=True)
    img.save(dst_img)
    msk.save(dst_msk)


def prepare_kvasir(shared: Path | None = None, out_dir: Path | None = None, size: int = KVASIR_SIZE,
                   verbose: bool = True) -> Path:
    """Convert Kvasir-SEG (MedVLSM + MedCLIPSeg prompts) and resize it to ``size``; returns the datalist path.

    Idempotent: a finished cache (``datalist.json`` written last, with a matching ``bench_params``) is reused.
    """
    from vlseg.data.convert import convert_medclipseg, convert_medvlsm

    shared = Path(shared) if shared is not None else shared_data_dir()
    src = shared / "kvasir_seg"
    out_dir = Path(out_dir) if out_dir is not None else cache_dir() / f"kvasir_{size}"
    out_json = out_dir / "datalist.json"
    params = {"version": _KVASIR_VERSION, "size": size, "source": str(src)}
    if out_json.is_file():
        try:
            if json.loads(out_json.read_text()).get("bench_params") == params:
                return out_json
        except (OSError, ValueError):
            pass
    if verbose:
        print(f"[data] converting Kvasir-SEG from {src} into {out_dir} ({size}x{size}) ...", flush=True)
    medvlsm = convert_medvlsm(src / "prompts" / "medvlsm", images_dir=src / "images", masks_dir=src / "masks")
    medclip = convert_medclipseg(images_dir=src / "images", masks_dir=src / "masks", prompts_dir=src / "prompts" / "medclipseg")
    by_id = {s: {it["id"]: it for it in medclip.get(s, [])} for s in ("training", "validation", "test")}
    merged: dict[str, Any] = {
        "name": "Kvasir-SEG (MedVLSM split + MedCLIPSeg prompt tables)",
        "description": "Kvasir-SEG 800/100/100 (MedVLSM split), resized to "
        f"{size}x{size}; prompts p0..p9 (MedVLSM) and the MedCLIPSeg descriptions / test variants. "
        "text = the MedCLIPSeg 'original' description.",
        "bench_params": params,
        "training": [], "validation": [], "test": [],
    }  # fmt: skip
    mismatched = []
    for split in ("training", "validation", "test"):
        for it in medvlsm[split]:
            other = by_id[split].get(it["id"])
            if other is None:
                mismatched.append((split, it["id"]))
                continue
            prompts = {k: v for k, v in it["prompts"].items() if not k.endswith("_all")}
            prompts.update(other["prompts"])
            img = out_dir / "images" / f"{it['id']}.png"
            msk = out_dir / "masks" / f"{it['id']}.png"
            if not (img.is_file() and msk.is_file()):
                _resize_pair(Path(it["image"]), Path(it["label"]), img, msk, size)
            merged[split].append({
                "id": it["id"], "image": os.path.relpath(img, out_dir), "label": os.path.relpath(msk, out_dir),
                "text": prompts.get("original") or it["text"], "prompts": prompts,
            })  # fmt: skip
    if mismatched:
        raise RuntimeError(f"MedVLSM and MedCLIPSeg splits disagree on {len(mismatched)} items, e.g. {mismatched[:3]}")
    ids = {s: {it["id"] for it in merged[s]} for s in ("training", "validation")}
    merged["subsets"] = {}
    for pct, sub in (medclip.get("subsets") or {}).items():
        merged["subsets"][pct] = {}
        for split, items in sub.items():
            keep = {it["id"] for it in items}
            if not keep <= ids[split]:
                raise RuntimeError(f"subset {pct} {split} has items outside the split")
            merged["subsets"][pct][split] = [it for it in merged[split] if it["id"] in keep]
    write_datalist(merged, out_json)
    if verbose:
        print(f"[data] Kvasir-SEG ready: {out_json}", flush=True)
    return out_json


def write_datalist(datalist: dict, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(datalist, indent=1) + "\n")
    tmp.replace(path)
    return path


def resolve_data(datalist: str | Path | None = None, quick: bool = False, prefer_shared: bool = True,
                 limits: dict[str, int] | None = None) -> BenchData:
    """The data a benchmark uses: ``datalist`` if given, else Kvasir-SEG when the shared folder has it, else the demo.

    ``quick`` without an explicit ``datalist`` uses the demo set (never the 1000 Kvasir images) with ``limits``.
    """
    limits = dict(limits or {})
    if datalist is not None:
        path = Path(datalist).expanduser().resolve()
        raw = json.loads(path.read_text())
        return BenchData(path, raw.get("name", path.parent.name), "custom", raw.get("description", ""), limits)
    shared = shared_data_dir() / "kvasir_seg"
    if prefer_shared and not quick and shared.is_dir():
        path = prepare_kvasir()
        return BenchData(path, "Kvasir-SEG", "kvasir", f"Kvasir-SEG 800/100/100 (MedVLSM split), {KVASIR_SIZE}x{KVASIR_SIZE}", limits)
    from vlseg.data.demo import ensure_demo_dataset

    path = ensure_demo_dataset()
    return BenchData(Path(path), "vlseg demo", "demo",
                     "synthetic referring-segmentation demo set (vlseg.data.demo), 192x192", limits)


def subset_items(data: BenchData, split: str, pct: int | str, seed: int = 0) -> list[dict]:
    """The ``pct`` % subset of ``split``: the data set's own fixed subset when it has one (Kvasir: MedCLIPSeg's
    10/25/50 % tables), otherwise a seeded random choice of images (all samples of an image stay together)."""
    pct = int(pct)
    items = data.items(split)
    if pct >= 100:
        return items
    subsets = data.raw().get("subsets") or {}
    if str(pct) in subsets and split in subsets[str(pct)] and not data.limits.get(split):
        return data.items(split, subset=str(pct))
    groups: dict[str, list[dict]] = {}
    for it in items:
        groups.setdefault(str(it.get("image_id", it.get("id", it["image"]))), []).append(it)
    keys = sorted(groups)
    random.Random(seed).shuffle(keys)
    n = max(1, int(round(len(keys) * pct / 100.0)))
    chosen = set(keys[:n])
    return [it for it in items if str(it.get("image_id", it.get("id", it["image"]))) in chosen]


def items_digest(items: list[dict]) -> str:
    h = hashlib.sha1()
    for it in items:
        h.update(str(it.get("image")).encode())
        h.update(str(it.get("label")).encode())
    return h.hexdigest()[:10]
