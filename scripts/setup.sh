#!/usr/bin/env bash
# One-time (idempotent) set-up of the vlseg environment on a CPU-only machine.
#   bash scripts/setup.sh            # creates ./.venv (or uses $VLSEG_VENV) and installs everything
# Steps: venv -> torch 2.13.0 (CPU) first -> requirements.txt under PIP_CONSTRAINT=constraints.txt (so no
# package, not even sam2's isolated build, pulls a CUDA torch) -> vlseg itself (editable) -> the torchvision
# import shim (.pth) -> an import check. A stamp file skips all of it when nothing changed.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VLSEG_VENV:-$ROOT/.venv}"
PY_BOOT="${PYTHON:-python3}"
export PIP_CONSTRAINT="$ROOT/constraints.txt"
export PIP_DISABLE_PIP_VERSION_CHECK=1
export HF_HUB_OFFLINE=1

stamp_src="$(cat "$ROOT/requirements.txt" "$ROOT/constraints.txt" "$ROOT/pyproject.toml" "$ROOT/scripts/setup.sh" | sha256sum | cut -c1-16)"
STAMP="$VENV/.vlseg-setup-$stamp_src"
if [ -f "$STAMP" ]; then
  echo "[setup] environment up to date: $VENV"
  exit 0
fi

start=$(date +%s)
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating virtual environment $VENV"
  "$PY_BOOT" -m venv "$VENV"
fi
PY="$VENV/bin/python"
"$PY" -m pip install -q --upgrade "pip>=23" setuptools wheel 2>&1 | grep -v "^WARNING: Location" || true
echo "[setup] installing torch 2.13.0 (CPU) first"
"$PY" -m pip install -q torch==2.13.0 2>&1 | grep -v "^WARNING: Location" || true
echo "[setup] installing requirements.txt (pinned by constraints.txt)"
"$PY" -m pip install -q -r "$ROOT/requirements.txt" 2>&1 | grep -v "^WARNING: Location" || true
"$PY" -m pip install -q --no-deps --no-build-isolation -e "$ROOT" 2>&1 | grep -v "^WARNING: Location" || true

# torchvision from PyPI is a CUDA build whose compiled ops cannot load on CPU: install the lazy import hook
# (see vlseg/compat/torchvision_ops.py). It is a no-op wherever torchvision's own ops load.
SITE="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
echo 'import sys; exec("try:\n import vlseg.compat.tv_hook\nexcept Exception as e:\n sys.stderr.write(f\"vlseg torchvision hook not active: {e}\\n\")")' > "$SITE/zz_vlseg_torchvision.pth"

echo "[setup] checking imports"
"$PY" - <<'PYEOF'
import torch, torchvision, open_clip, segment_anything, timm, transformers, monai, monailabel, ignite, numpy, pydicom
from vlseg.compat.torchvision_ops import ensure_torchvision_importable
assert torch.__version__.startswith("2.13.0"), torch.__version__
assert not torch.cuda.is_available() or True
print(f"[setup] torch {torch.__version__}, torchvision {torchvision.__version__} ({ensure_torchvision_importable()} ops), "
      f"monai {monai.__version__}, monailabel {monailabel.__version__}, numpy {numpy.__version__}, pydicom {pydicom.__version__}")
PYEOF
rm -f "$VENV"/.vlseg-setup-*
touch "$STAMP"
echo "[setup] done in $(( $(date +%s) - start )) s; environment size $(du -sh "$VENV" | cut -f1)"
