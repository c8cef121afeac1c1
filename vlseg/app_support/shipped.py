"""Checkpoints that ship in the repository: the tensors a training run changed, in half precision.

A bundle's ``models/model.pt`` holds every tensor of its network, including frozen ones that the network
definition rebuilds identically anyway (the pretrained MiniLM text encoder is 22.7 M of MedCLIPSeg's 23.5 M
parameters). :func:`export_trainable` keeps only the tensors that the definition cannot rebuild: trainable
parameters, buffers (batch-norm statistics) and frozen tensors whose value depends on the random seed. Floating
tensors are stored as float16. :func:`install_shipped` rebuilds the network, loads those tensors into it and
writes a complete ``models/model.pt`` for the bundle and the app to load as usual.

Files: ``<repo>/checkpoints/<bundle>_<variant>.pt`` plus ``<bundle>_<variant>.json`` (what made it: the
training command, its data and budget, the export command, sizes). Made by ``scripts/make_demo_checkpoints.py``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

from vlseg.bundles import CHECKPOINT_RECORD, BundleError, checkpoint_path, file_sha256

__all__ = ["SHIPPED_FORMAT", "shipped_dir", "shipped_path", "export_trainable", "install_shipped",
           "shipped_is_installed"]

logger = logging.getLogger(__name__)

SHIPPED_FORMAT = "vlseg-trainable-fp16/1"


def shipped_dir() -> Path:
    """``<repo>/checkpoints`` (a source checkout: ``vlseg`` installed in editable mode)."""
    return Path(__file__).resolve().parents[2] / "checkpoints"


def shipped_path(bundle_name: str, variant: str, folder=None) -> Path:
    return Path(folder or shipped_dir()) / f"{bundle_name}_{variant}.pt"


def _digest(tensors: dict) -> str:
    """SHA-256 over the names and float32 bytes of ``tensors`` (sorted by name)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu")
        t = t.float() if t.is_floating_point() else t
        h.update(name.encode())
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()


def export_trainable(bundle_dir, variant: str, checkpoint, out_path, record: dict | None = None) -> dict:
    """Write the tensors of ``checkpoint`` (a full state dict of the ``variant`` network) that the network
    definition does not rebuild to ``out_path`` (float16) and a JSON record next to it; returns the record.

    A tensor is left out only when it is a frozen parameter that equals the freshly built network's with two
    different seeds (so it comes from a file, e.g. a pretrained encoder, not from the random initialisation);
    the left-out tensors' digest is stored and checked again by :func:`install_shipped`.
    """
    import torch

    from vlseg.app_support.checkpoints import build_network, checkpoint_mismatch

    bundle_dir = Path(bundle_dir).resolve()
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    state = state.get("model", state) if isinstance(state, dict) and "model" in state else state
    net_a = build_network(bundle_dir, variant, seed=0)
    built_a = net_a.state_dict()
    built_b = build_network(bundle_dir, variant, seed=1).state_dict()
    frozen = {n for n, p in net_a.named_parameters() if not p.requires_grad}
    expected = set(built_a)
    if set(state) != expected or any(tuple(state[k].shape) != tuple(built_a[k].shape) for k in expected):
        raise BundleError(f"{checkpoint} does not fit the {variant!r} network of {bundle_dir.name}: "
                          f"{checkpoint_mismatch(bundle_dir, variant, network=net_a)}")
    skipped = {k: built_a[k] for k in sorted(frozen)
               if torch.equal(built_a[k], built_b[k]) and torch.equal(state[k].to(built_a[k].dtype), built_a[k])}
    kept = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in state.items() if k not in skipped}
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"format": SHIPPED_FORMAT, "bundle": bundle_dir.name, "variant": variant, "tensors": kept,
                "skipped": sorted(skipped), "skipped_sha256": _digest(skipped)}, out_path)
    info = {
        "format": SHIPPED_FORMAT, "bundle": bundle_dir.name, "variant": variant, "file": out_path.name,
        "bytes": out_path.stat().st_size, "sha256": file_sha256(out_path),
        "tensors_kept": len(kept), "values_kept": int(sum(v.numel() for v in kept.values())),
        "tensors_left_out": len(skipped), "values_left_out": int(sum(v.numel() for v in skipped.values())),
        "left_out_because": "frozen parameters equal to the network definition's own (seed-independent: "
                            "pretrained files); rebuilt by install_shipped",
        "source_checkpoint_sha256": file_sha256(checkpoint), "exported": time.strftime("%Y-%m-%dT%H:%M:%S"),
        **(record or {}),
    }
    out_path.with_suffix(".json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def shipped_is_installed(bundle_dir, variant: str, folder=None) -> bool:
    """True when ``models/model.pt`` is the unchanged install of the current shipped file."""
    bundle_dir = Path(bundle_dir)
    src, ckpt = shipped_path(bundle_dir.name, variant, folder), checkpoint_path(bundle_dir)
    try:
        record = json.loads((ckpt.parent / CHECKPOINT_RECORD).read_text())
    except (OSError, ValueError):
        return False
    return (src.is_file() and ckpt.is_file() and record.get("variant") == variant
            and record.get("shipped_sha256") == file_sha256(src) and record.get("sha256") == file_sha256(ckpt))


def install_shipped(bundle_dir, variant: str, folder=None) -> Path | None:
    """Write ``models/model.pt`` from the shipped file of this bundle and variant; None when there is none.

    Raises :class:`BundleError` when the shipped tensors no longer fit the current network (names, shapes, or
    the digest of the tensors it leaves to the network definition): the caller then trains instead.
    """
    import torch

    from vlseg.app_support.checkpoints import build_network, save_atomic

    bundle_dir = Path(bundle_dir).resolve()
    src = shipped_path(bundle_dir.name, variant, folder)
    if not src.is_file():
        return None
    data = torch.load(src, map_location="cpu", weights_only=True)
    if not isinstance(data, dict) or data.get("format") != SHIPPED_FORMAT:
        raise BundleError(f"{src} is not a {SHIPPED_FORMAT} file")
    state = build_network(bundle_dir, variant, seed=0).state_dict()
    tensors, skipped = data["tensors"], set(data["skipped"])
    unknown = sorted(set(tensors) - set(state))
    uncovered = sorted(set(state) - set(tensors) - skipped)
    wrong = sorted(k for k in set(tensors) & set(state) if tuple(tensors[k].shape) != tuple(state[k].shape))
    if unknown or uncovered or wrong:
        raise BundleError(f"{src.name} does not fit the current {variant!r} network of {bundle_dir.name}: "
                          f"{len(unknown)} unknown, {len(uncovered)} missing, {len(wrong)} wrongly shaped tensors "
                          f"(e.g. {(unknown + uncovered + wrong)[:3]}); re-make it with scripts/make_demo_checkpoints.py")
    if _digest({k: state[k] for k in skipped}) != data["skipped_sha256"]:
        raise BundleError(f"{src.name}: the tensors it leaves to the network definition (pretrained files) changed "
                          "since it was exported; re-make it with scripts/make_demo_checkpoints.py")
    for k, v in tensors.items():
        state[k] = v.to(state[k].dtype)
    ckpt = checkpoint_path(bundle_dir)
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    save_atomic(state, ckpt)
    made = {}
    meta = src.with_suffix(".json")
    if meta.is_file():
        made = {k: v for k, v in json.loads(meta.read_text()).items() if k in ("train_command", "made_with", "date")}
    (ckpt.parent / CHECKPOINT_RECORD).write_text(json.dumps({
        "variant": variant, "made_by": "vlseg.app_support.shipped.install_shipped",
        "source": f"checkpoints/{src.name} (shipped trainable tensors, float16, completed by the network definition)",
        "shipped_sha256": file_sha256(src), "sha256": file_sha256(ckpt), **made,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=2) + "\n")
    logger.info("%s: installed the shipped %s checkpoint %s", bundle_dir.name, variant, src)
    return ckpt
