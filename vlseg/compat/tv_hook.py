"""Import hook: runs :func:`vlseg.compat.torchvision_ops.ensure_torchvision_importable` just before the first
``import torchvision`` of a process, then removes itself. Installed by ``scripts/setup.sh`` as a one-line
``.pth`` file in site-packages, so it holds for every process of the environment (pytest, bundles,
``monailabel start_server`` and its training subprocesses). Importing this module is cheap: torch is only
imported when torchvision is.
"""

from __future__ import annotations

import sys


class _TorchvisionShimFinder:
    """A meta-path finder that never finds anything; it only reacts to the name ``torchvision``."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname == "torchvision":
            uninstall()
            from vlseg.compat.torchvision_ops import ensure_torchvision_importable

            ensure_torchvision_importable()
        return None


def install() -> None:
    if "torchvision" in sys.modules or any(isinstance(f, _TorchvisionShimFinder) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _TorchvisionShimFinder())


def uninstall() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _TorchvisionShimFinder)]


install()
