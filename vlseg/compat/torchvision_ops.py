"""Make ``import torchvision`` work when its compiled operators cannot load.

PyPI only carries CUDA builds of torchvision. On a CPU-only machine its ``_C`` extension fails to load
(it links ``libc10_cuda.so``), torchvision then marks its custom ops as unavailable, but
``torchvision/_meta_registrations.py`` still registers fake kernels for ``torchvision::nms`` and
``torchvision::qnms`` unconditionally, which raises ``operator torchvision::nms does not exist`` and
breaks the import of torchvision and of everything built on it (open_clip, segment_anything, timm,
MONAI Label).

vlseg itself does not need any torchvision operator. This module therefore does the least that makes the
import succeed, and nothing when the compiled operators load:

* :func:`compiled_ops_available` tries to load torchvision's own ``_C`` library (without importing
  torchvision);
* only if that fails, :func:`register_missing_schemas` defines the two operator schemas that the import
  needs, with a real CPU kernel (:func:`nms_reference`, a plain PyTorch greedy NMS) so a direct call
  gives a correct answer instead of a crash. ``torchvision.extension._has_ops()`` stays ``False``, so the
  other torchvision ops (roi_align, deform_conv2d, ...) still raise torchvision's own clear error.

:mod:`vlseg.compat.tv_hook` runs :func:`ensure_torchvision_importable` lazily, the first time any process
of the environment imports torchvision (installed as a ``.pth`` file by ``scripts/setup.sh``).
"""

from __future__ import annotations

import glob
import importlib.machinery
import os

__all__ = ["compiled_ops_available", "register_missing_schemas", "ensure_torchvision_importable", "nms_reference"]

_STATE: dict[str, object] = {}
_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}


def _torchvision_dir() -> str | None:
    spec = importlib.machinery.PathFinder.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return None
    return list(spec.submodule_search_locations)[0]


def compiled_ops_available() -> bool:
    """Return True when torchvision's compiled ``_C`` extension loads in this process."""
    import torch

    if "compiled" in _STATE:
        return bool(_STATE["compiled"])
    ok = False
    tv_dir = _torchvision_dir()
    if tv_dir is not None:
        for lib in glob.glob(os.path.join(tv_dir, "_C*.so")) + glob.glob(os.path.join(tv_dir, "_C*.pyd")):
            try:
                torch.ops.load_library(lib)
                ok = True
                break
            except (OSError, ImportError, RuntimeError):
                ok = False
    _STATE["compiled"] = ok
    return ok


def nms_reference(dets, scores, iou_threshold: float):
    """Greedy non-maximum suppression in plain PyTorch (same contract as ``torchvision.ops.nms``).

    Boxes are ``(x1, y1, x2, y2)``; returns the indices of kept boxes sorted by decreasing score.
    """
    import torch

    if dets.numel() == 0:
        return torch.empty((0,), dtype=torch.long, device=dets.device)
    x1, y1, x2, y2 = dets.unbind(1)
    areas = (x2 - x1).clamp(min=0) * (y2 - y1).clamp(min=0)
    order = scores.argsort(descending=True)
    suppressed = torch.zeros(dets.shape[0], dtype=torch.bool, device=dets.device)
    keep = []
    for i in order.tolist():
        if suppressed[i]:
            continue
        keep.append(i)
        xx1 = torch.maximum(x1[i], x1)
        yy1 = torch.maximum(y1[i], y1)
        xx2 = torch.minimum(x2[i], x2)
        yy2 = torch.minimum(y2[i], y2)
        inter = (xx2 - xx1).clamp(min=0) * (yy2 - yy1).clamp(min=0)
        iou = inter / (areas[i] + areas - inter).clamp(min=1e-12)
        suppressed |= iou > iou_threshold
    return torch.tensor(keep, dtype=torch.long, device=dets.device)


def _op_exists(name: str) -> bool:
    import torch

    try:
        getattr(torch.ops.torchvision, name)
        return True
    except (AttributeError, RuntimeError):
        return False


def register_missing_schemas() -> list[str]:
    """Define the torchvision operator schemas that ``import torchvision`` needs; return the names defined."""
    import torch

    missing = [name for name in _SCHEMAS if not _op_exists(name)]
    if not missing:
        return []
    lib = torch.library.Library("torchvision", "FRAGMENT")
    for name in missing:
        lib.define(_SCHEMAS[name])
        lib.impl(name, nms_reference, "CPU")
    _STATE["library"] = lib  # keep the registration alive for the life of the process
    return missing


def ensure_torchvision_importable() -> str:
    """Idempotent: ``"compiled"`` when torchvision's own ops load, else ``"schemas"`` after registering them."""
    if os.environ.get("VLSEG_DISABLE_TORCHVISION_SHIM"):
        return "disabled"
    if compiled_ops_available():
        return "compiled"
    register_missing_schemas()
    return "schemas"
