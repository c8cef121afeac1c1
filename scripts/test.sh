#!/usr/bin/env bash
# The test command (README): sets up the environment if needed, then runs the whole test suite on CPU.
#   bash scripts/test.sh [extra pytest args]
# Exits non-zero on any failure, and also when no test was collected (pytest exit code 5).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VLSEG_VENV:-$ROOT/.venv}"
bash "$ROOT/scripts/setup.sh"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
export MPLBACKEND=Agg
cd "$ROOT"
start=$(date +%s)
set +e
"$VENV/bin/python" -m pytest -q -rs --timeout=1200 -p no:cacheprovider "$@"
rc=$?
set -e
echo "[test] pytest exit code $rc after $(( $(date +%s) - start )) s"
if [ "$rc" -eq 5 ]; then
  echo "[test] no tests were collected: failing" >&2
fi
exit "$rc"
