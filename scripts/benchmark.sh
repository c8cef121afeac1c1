#!/usr/bin/env bash
# Regenerate every benchmark report (reports/README.md links them):
#   bash scripts/benchmark.sh            # full evidence; hours on 2 CPU cores (time stated in reports/README.md)
#   bash scripts/benchmark.sh --quick    # smoke test of every part
# Extra arguments go to scripts/benchmark_all.py (e.g. --parts speed accuracy, --budget-seconds 600).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VLSEG_VENV:-$ROOT/.venv}"
bash "$ROOT/scripts/setup.sh"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 MPLBACKEND=Agg
cd "$ROOT"
start=$(date +%s)
"$VENV/bin/python" "$ROOT/scripts/benchmark_all.py" "$@"
echo "[benchmark] total wall time $(( $(date +%s) - start )) s"
