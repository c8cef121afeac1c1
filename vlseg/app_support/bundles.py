"""Finding bundles that keep the vlseg bundle contract and resolving their size-variant config files.

A bundle is a folder ``<bundles_dir>/<name>/`` with ``configs/metadata.json``; its size variants are override
files ``configs/<variant>.json`` merged *after* the main config (``['configs/inference.json', 'configs/tiny.json']``),
exactly as ``python -m monai.bundle run --config_file "[...]"`` merges them.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

__all__ = [
    "BundleError",
    "VARIANT_RE",
    "CHECKPOINT_RECORD",
    "discover_bundles",
    "config_files",
    "checkpoint_path",
    "checkpoint_identity",
    "read_checkpoint_record",
    "file_sha256",
    "repo_bundles_dir",
]

#: Variant names are plain words (they name a file in ``configs/``; never a path).
VARIANT_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
#: Written next to a checkpoint by :func:`vlseg.app_support.checkpoints.ensure_checkpoint` (which variant made it).
CHECKPOINT_RECORD = "vlseg_checkpoint.json"


class BundleError(RuntimeError):
    """A bundle that cannot be used as asked; the message says why and what to do."""


def repo_bundles_dir() -> Path:
    """``<repo>/bundles`` of a source checkout (``vlseg`` installed in editable mode)."""
    return Path(__file__).resolve().parents[2] / "bundles"


def discover_bundles(bundles_dir, names=None) -> dict[str, Path]:
    """``{folder name: path}`` of every sub-folder of ``bundles_dir`` holding ``configs/metadata.json``.

    ``names`` (iterable or comma-separated string; ``None``/``""``/``"all"`` = every bundle) selects a subset;
    asking for a name that is not there raises :class:`BundleError` listing what is.
    """
    root = Path(bundles_dir).expanduser()
    if not root.is_dir():
        raise BundleError(f"bundles folder {root} does not exist")
    found = {
        d.name: d.resolve()
        for d in sorted(root.iterdir())
        if d.is_dir() and not d.name.startswith((".", "_")) and (d / "configs" / "metadata.json").is_file()
    }
    if names is None or (isinstance(names, str) and names.strip().lower() in ("", "all")):
        return found
    wanted = [n.strip() for n in (names.split(",") if isinstance(names, str) else names) if n and n.strip()]
    missing = [n for n in wanted if n not in found]
    if missing:
        raise BundleError(f"bundle(s) {missing} not found under {root}; available: {sorted(found)}")
    return {n: found[n] for n in wanted}


def config_files(bundle_dir, kind: str, variant: str | None = None) -> list[Path]:
    """``[configs/<kind>.json, configs/<variant>.json]`` (the variant only when given); checks both exist."""
    configs = Path(bundle_dir) / "configs"
    main = configs / f"{kind}.json"
    if not main.is_file():
        raise BundleError(f"{Path(bundle_dir).name}: no configs/{kind}.json")
    files = [main]
    if variant:
        if not VARIANT_RE.match(variant):
            raise BundleError(f"invalid variant name {variant!r} (letters, digits, '-' and '_' only)")
        override = configs / f"{variant}.json"
        if not override.is_file():
            have = sorted(p.stem for p in configs.glob("*.json") if p.stem not in _NOT_VARIANTS)
            raise BundleError(f"{Path(bundle_dir).name}: variant {variant!r} requested but configs/{variant}.json "
                              f"does not exist (variant files present: {have})")
        files.append(override)
    return files


_NOT_VARIANTS = {"metadata", "inference", "train", "evaluate", "multi_gpu_train", "multi_gpu_evaluate", "monailabel_train"}


def checkpoint_path(bundle_dir) -> Path:
    return Path(bundle_dir) / "models" / "model.pt"


def read_checkpoint_record(bundle_dir) -> dict:
    """The record :func:`ensure_checkpoint` leaves next to ``models/model.pt`` ({} when there is none)."""
    p = Path(bundle_dir) / "models" / CHECKPOINT_RECORD
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return {}


_SHA_CACHE: dict[tuple[str, int, int], str] = {}


def file_sha256(path) -> str:
    """SHA-256 of a file, cached by (path, mtime_ns, size) so repeated calls on an unchanged checkpoint are free."""
    st = os.stat(path)
    key = (str(Path(path).resolve()), st.st_mtime_ns, st.st_size)
    if key not in _SHA_CACHE:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _SHA_CACHE[key] = h.hexdigest()
    return _SHA_CACHE[key]


def checkpoint_identity(path) -> dict:
    """``{"path", "mtime", "size", "sha256"}`` of a checkpoint file, or ``{"path", "missing": True}``."""
    p = Path(path)
    if not p.is_file():
        return {"path": str(p), "missing": True}
    st = p.stat()
    return {"path": str(p), "mtime": st.st_mtime, "size": st.st_size, "sha256": file_sha256(p)}
