#!/usr/bin/env bash
# Several inference-only MONAI Label workers behind nginx, one primary for datastore, training and scoring
# (vlseg/app_support/scaled.py; nginx config: apps/vlseg/deploy/nginx.conf.template). Needs Debian's nginx
# (apt-get install -y nginx). Example:
#   bash scripts/serve_scaled.sh --studies /path/to/images --workers 2 --port 8000 --conf variant small
# Serves on 127.0.0.1:<port> until Ctrl-C; logs, the rendered nginx.conf and nginx's files go to --run-dir.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="${VLSEG_PYTHON:-$here/.venv/bin/python}"
[ -x "$py" ] || py="$(command -v python3)"
exec "$py" -m vlseg.app_support.scaled --app "$here/apps/vlseg" "$@"
