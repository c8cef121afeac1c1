#!/usr/bin/env bash
# The main job (README): set up everything on a fresh machine and run vlseg end to end on the embedded demo.
#   bash scripts/run_demo.sh [--variant small|tiny] [--train-seconds S] [--images N]   (see scripts/demo_roundtrip.py --help)
# 1) installs the environment (scripts/setup.sh, idempotent), 2) generates the demo data set,
# 3) makes the `small` checkpoint of each bundle if absent (a short, time-boxed training),
# 4) starts the MONAI Label server on 127.0.0.1 and drives it with the real MONAILabelClient
#    (info, text-prompted infer per bundle, save label + prompt, active learning, scoring, training),
# 5) writes overlay PNGs (image | mask outline | uncertainty heat map) and prints where they are.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VLSEG_VENV:-$ROOT/.venv}"
start=$(date +%s)
bash "$ROOT/scripts/setup.sh"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 MPLBACKEND=Agg
cd "$ROOT"
"$VENV/bin/python" "$ROOT/scripts/demo_roundtrip.py" "$@"
echo "[run_demo] total wall time $(( $(date +%s) - start )) s (install included)"
