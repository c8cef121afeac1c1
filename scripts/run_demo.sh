#!/usr/bin/env bash
# The main job (README): set up everything on a fresh machine and run vlseg end to end on the embedded demo.
#   bash scripts/run_demo.sh [--variant small|tiny] [--images N] [--volumes N] [--no-shipped --train-seconds S]
#   (see scripts/demo_roundtrip.py --help)
# 1) installs the environment (scripts/setup.sh, idempotent), 2) generates the demo data set,
# 3) installs each bundle's `small` checkpoint shipped in checkpoints/ (made by scripts/make_demo_checkpoints.py;
#    with --no-shipped, or when one no longer fits its network, a time-boxed training with progress lines),
# 4) starts the MONAI Label server on 127.0.0.1 and drives it with the real MONAILabelClient: info, every model on
#    every held-out demo test image and test volume (text prompt, Dice against the truth), save label + prompt,
#    active learning, scoring, training; progress as "[round-trip k/N] ..." lines,
# 5) writes overlay PNGs (image | mask outline | uncertainty heat map, Dice in the title) and prints each model's
#    mean Dice on the 2D test items and on the test volume items.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VLSEG_VENV:-$ROOT/.venv}"
start=$(date +%s)
bash "$ROOT/scripts/setup.sh"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 MPLBACKEND=Agg
cd "$ROOT"
"$VENV/bin/python" "$ROOT/scripts/demo_roundtrip.py" "$@"
echo "[run_demo] total wall time $(( $(date +%s) - start )) s (install included)"
