"""Finding bundles, resolving their size-variant config files and importing their code: one module for the MONAI
Label app support (:mod:`vlseg.app_support`), the benchmarks (:mod:`vlseg.bench`) and the tests.

A bundle is a folder ``<bundles_dir>/<name>/`` with ``configs/metadata.json``; its size variants are override
files ``configs/<variant>.json`` merged *after* the main config (``['configs/inference.json', 'configs/tiny.json']``),
exactly as ``python -m monai.bundle run --config_file "[...]"`` merges them. The paper configuration is the main
config alone (variant ``None`` / ``""`` / ``"paper"``).

Every bundle has its own ``scripts`` package, so :func:`bundle_context` puts the bundle's folder first on
``sys.path`` with no ``scripts`` module imported, and on exit restores the ``scripts`` modules that were imported
before, which lets several bundles be built in one process.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "BundleError",
    "BundleNotFound",
    "VARIANT_RE",
    "CHECKPOINT_RECORD",
    "PAPER",
    "variant_label",
    "repo_bundles_dir",
    "discover_bundles",
    "find_bundles",
    "config_files",
    "bundle_context",
    "load_parser",
    "checkpoint_path",
    "checkpoint_identity",
    "read_checkpoint_record",
    "file_sha256",
]

#: Variant names are plain words (they name a file in ``configs/``; never a path).
VARIANT_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
#: Written next to a checkpoint by :func:`vlseg.app_support.checkpoints.ensure_checkpoint` (which variant made it).
CHECKPOINT_RECORD = "vlseg_checkpoint.json"
#: The label of the paper configuration (no variant file).
PAPER = "paper"

_NOT_VARIANTS = {"metadata", "inference", "train", "evaluate", "multi_gpu_train", "multi_gpu_evaluate", "monailabel_train"}


class BundleError(RuntimeError):
    """A bundle that cannot be used as asked; the message says why and what to do."""


class BundleNotFound(BundleError, FileNotFoundError):
    """A bundle, bundles folder or config file that is not there."""


def variant_label(variant: str | None) -> str:
    """``"paper"`` for the main config alone, else the variant name."""
    return PAPER if variant in (None, "", PAPER) else str(variant)


def repo_bundles_dir() -> Path:
    """``<repo>/bundles`` of a source checkout (``vlseg`` installed in editable mode)."""
    return Path(__file__).resolve().parents[1] / "bundles"


def discover_bundles(bundles_dir, names=None, require: str = "metadata.json") -> dict[str, Path]:
    """``{folder name: path}`` of every sub-folder of ``bundles_dir`` holding ``configs/<require>``.

    ``names`` (iterable or comma-separated string; ``None``/``""``/``"all"`` = every bundle) selects a subset, in the
    order given; asking for a name that is not there raises :class:`BundleNotFound` listing what is.
    """
    root = Path(bundles_dir).expanduser()
    if not root.is_dir():
        raise BundleNotFound(f"bundles folder {root} does not exist")
    found = {
        d.name: d.resolve()
        for d in sorted(root.iterdir())
        if d.is_dir() and not d.name.startswith((".", "_")) and (d / "configs" / require).is_file()
    }
    if names is None or (isinstance(names, str) and names.strip().lower() in ("", "all")):
        return found
    wanted = [n.strip() for n in (names.split(",") if isinstance(names, str) else names) if n and n.strip()]
    missing = [n for n in wanted if n not in found]
    if missing:
        raise BundleNotFound(f"bundle(s) {missing} not found (or without configs/{require}) under {root}; "
                             f"available: {sorted(found)}")
    return {n: found[n] for n in wanted}


def find_bundles(bundles_dir=None, names: Sequence[str] | None = None) -> list[Path]:
    """Bundle folders with a ``configs/inference.json`` (default folder: :func:`repo_bundles_dir`), sorted by name or
    in the order of ``names``; an absent folder has none."""
    bundles_dir = Path(bundles_dir) if bundles_dir is not None else repo_bundles_dir()
    if not bundles_dir.is_dir() and not names:
        return []
    return list(discover_bundles(bundles_dir, names or None, require="inference.json").values())


def config_files(bundle_dir, kind: str = "inference", variant: str | None = None, extra: Sequence = ()) -> list[Path]:
    """``[configs/<kind>.json, *extra, configs/<variant>.json]`` (the variant only when given and not ``"paper"``;
    ``extra`` names files in ``configs/``); checks that they exist."""
    configs = Path(bundle_dir) / "configs"
    main = configs / (kind if kind.endswith(".json") else f"{kind}.json")
    if not main.is_file():
        raise BundleNotFound(f"{Path(bundle_dir).name}: no configs/{main.name}")
    files = [main] + [configs / e for e in extra]
    if variant_label(variant) != PAPER:
        if not VARIANT_RE.match(variant):
            raise BundleError(f"invalid variant name {variant!r} (letters, digits, '-' and '_' only)")
        override = configs / f"{variant}.json"
        if not override.is_file():
            have = sorted(p.stem for p in configs.glob("*.json") if p.stem not in _NOT_VARIANTS)
            raise BundleNotFound(f"{Path(bundle_dir).name}: variant {variant!r} requested but configs/{variant}.json "
                                 f"does not exist (variant files present: {have})")
        files.append(override)
    return files


def _pop_scripts_modules() -> dict:
    return {name: sys.modules.pop(name) for name in [m for m in sys.modules if m == "scripts" or m.startswith("scripts.")]}


@contextlib.contextmanager
def bundle_context(bundle_root) -> Iterator[None]:
    """Make ``import scripts`` resolve to this bundle's package for the duration of the block (the ``scripts``
    modules imported before it are restored afterwards)."""
    root = str(Path(bundle_root).resolve())
    saved = _pop_scripts_modules()
    sys.path.insert(0, root)
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(root)
        _pop_scripts_modules()
        sys.modules.update(saved)


def load_parser(bundle_root, variant: str | None = None, base: str = "inference.json", extra: Sequence[str] = (),
                overrides: Mapping[str, Any] | None = None):
    """A ``ConfigParser`` over ``configs/<base>`` (+ ``extra``) (+ ``configs/<variant>.json``) with the metadata and
    ``bundle_root`` set (parse it inside :func:`bundle_context`)."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(f) for f in config_files(bundle_root, base, variant, extra)])
    meta = Path(bundle_root) / "configs" / "metadata.json"
    if meta.is_file():
        parser.read_meta(str(meta))
    parser["bundle_root"] = str(Path(bundle_root).resolve())
    for k, v in (overrides or {}).items():
        parser[k] = v
    return parser


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
