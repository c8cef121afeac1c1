#!/usr/bin/env bash
# System packages of the browser and serving tests (tests/test_viewer_e2e.py, tests/test_annotation_page.py,
# tests/test_serving_nginx.py): Orthanc with its DICOMweb plugin, headless Chromium with its WebDriver, and nginx
# (nginx-light; not started as a service: the test runs its own). Idempotent; does nothing when they are installed. Never fails: when they
# cannot be installed (not root, no apt-get, no network) the test skips and says why.
#   bash scripts/install_viewer_deps.sh
set -u
PKGS="orthanc orthanc-dicomweb chromium chromium-driver nginx-light"
have() {
  command -v Orthanc >/dev/null 2>&1 || [ -x /usr/sbin/Orthanc ] || return 1
  ls /usr/share/orthanc/plugins/libOrthancDicomWeb.so* >/dev/null 2>&1 || return 1
  command -v chromium >/dev/null 2>&1 || return 1
  command -v chromedriver >/dev/null 2>&1 || return 1
  command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || return 1
}
if have; then
  echo "[viewer-deps] Orthanc, its DICOMweb plugin, Chromium, chromedriver and nginx are installed"
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "[viewer-deps] no apt-get here: install $PKGS yourself (tests/test_viewer_e2e.py skips without them)"
  exit 0
fi
SUDO=""
if [ "$(id -u)" != "0" ]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then SUDO="sudo -n"; else
    echo "[viewer-deps] not root and no password-less sudo: install $PKGS yourself (the viewer test skips)"
    exit 0
  fi
fi
start=$(date +%s)
export DEBIAN_FRONTEND=noninteractive
if ! $SUDO apt-get install -y --no-install-recommends $PKGS >/tmp/vlseg_viewer_deps.log 2>&1; then
  $SUDO apt-get update >>/tmp/vlseg_viewer_deps.log 2>&1 || true
  $SUDO apt-get install -y --no-install-recommends $PKGS >>/tmp/vlseg_viewer_deps.log 2>&1 || {
    echo "[viewer-deps] apt-get install $PKGS failed (log: /tmp/vlseg_viewer_deps.log); the viewer test will skip"
    tail -n 5 /tmp/vlseg_viewer_deps.log
    exit 0
  }
fi
echo "[viewer-deps] installed $PKGS in $(( $(date +%s) - start )) s"
exit 0
