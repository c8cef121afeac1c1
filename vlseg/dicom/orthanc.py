"""A throw-away Orthanc (with its DICOMweb plugin) on a loopback port, and STOW-RS uploads to any DICOMweb store.

``start_orthanc(workdir)`` writes a configuration into ``workdir`` (storage and index in ``workdir/db``, HTTP on
``127.0.0.1:<free port>``, no DICOM port, no authentication, remote access off), starts the ``Orthanc`` binary
and returns once ``/dicom-web/studies`` answers. ``stop_orthanc`` ends that process by its id.

Install on Debian / Ubuntu: ``apt-get install orthanc orthanc-dicomweb`` (``scripts/install_viewer_deps.sh``).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from vlseg.app_support.server import free_port, wait_until_answering

__all__ = ["OrthancHandle", "find_orthanc", "find_dicomweb_plugin", "orthanc_missing", "start_orthanc",
           "stop_orthanc", "stow_rs", "DICOMWEB_PLUGIN_DIRS"]

DICOMWEB_PLUGIN_DIRS = ("/usr/share/orthanc/plugins", "/usr/lib/orthanc", "/usr/local/share/orthanc/plugins")


@dataclass
class OrthancHandle:
    proc: subprocess.Popen
    url: str  # http://127.0.0.1:PORT
    workdir: Path
    log_path: Path
    _log: object = None

    @property
    def dicomweb(self) -> str:
        return f"{self.url}/dicom-web"

    def log_tail(self, n: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""


def find_orthanc() -> str | None:
    return shutil.which("Orthanc") or next((p for p in ("/usr/sbin/Orthanc", "/usr/bin/Orthanc") if os.path.isfile(p)),
                                           None)


def find_dicomweb_plugin() -> str | None:
    for d in DICOMWEB_PLUGIN_DIRS:
        if os.path.isdir(d):
            for name in sorted(os.listdir(d)):
                if name.startswith("libOrthancDicomWeb.so"):
                    return os.path.join(d, name)
    return None


def orthanc_missing() -> str | None:
    """None when Orthanc and its DICOMweb plugin are installed, else what is missing and how to install it."""
    if not find_orthanc():
        return "the Orthanc binary is not installed (apt-get install orthanc orthanc-dicomweb)"
    if not find_dicomweb_plugin():
        return "Orthanc's DICOMweb plugin is not installed (apt-get install orthanc-dicomweb)"
    return None


def start_orthanc(workdir, port: int | None = None, timeout: float = 60.0) -> OrthancHandle:
    missing = orthanc_missing()
    if missing:
        raise RuntimeError(missing)
    workdir = Path(workdir).resolve()
    (workdir / "db").mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    config = {
        "Name": "vlseg-orthanc",
        "StorageDirectory": str(workdir / "db"),
        "IndexDirectory": str(workdir / "db"),
        "HttpServerEnabled": True,
        "HttpPort": port,
        "RemoteAccessAllowed": False,  # loopback only
        "AuthenticationEnabled": False,
        "DicomServerEnabled": False,
        "Plugins": [find_dicomweb_plugin()],
        "StorageCompression": False,
        "HttpTimeout": 60,
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": True, "WadoRoot": "/wado",
                     "Host": f"127.0.0.1:{port}", "Ssl": False, "StudiesMetadata": "Full",
                     "SeriesMetadata": "Full"},
    }
    cfg = workdir / "orthanc.json"
    cfg.write_text(json.dumps(config, indent=2))
    log_path = workdir / "orthanc.log"
    log = open(log_path, "w")
    proc = subprocess.Popen([find_orthanc(), str(cfg)], stdout=log, stderr=subprocess.STDOUT, cwd=str(workdir),
                            start_new_session=True)
    handle = OrthancHandle(proc, f"http://127.0.0.1:{port}", workdir, log_path, log)
    try:
        wait_until_answering(proc, f"{handle.dicomweb}/studies", handle.log_tail, timeout, ok_status=(200, 204),
                             interval=0.3, request_timeout=5.0, what="Orthanc")
    except BaseException:
        stop_orthanc(handle)
        raise
    return handle


def stop_orthanc(handle: OrthancHandle, timeout: float = 15.0) -> None:
    try:
        if handle.proc.poll() is None:
            handle.proc.send_signal(signal.SIGTERM)
            try:
                handle.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                handle.proc.kill()
                handle.proc.wait()
    finally:
        if handle._log is not None:
            handle._log.close()
            handle._log = None


def stow_rs(dicomweb_url: str, files: Iterable, batch: int = 32, timeout: float = 120.0, session=None) -> list[dict]:
    """Upload DICOM files (paths or bytes) with STOW-RS (``POST <dicomweb_url>/studies``, multipart/related),
    ``batch`` instances per request. Returns the JSON answers; raises on an HTTP error or a failed instance."""
    import requests

    s = session or requests.Session()
    items = list(files)
    answers = []
    for i in range(0, len(items), batch):
        boundary = uuid.uuid4().hex
        body = bytearray()
        for f in items[i:i + batch]:
            data = f if isinstance(f, (bytes, bytearray)) else Path(f).read_bytes()
            body += f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + data + b"\r\n"
        body += f"--{boundary}--\r\n".encode()
        r = s.post(f"{dicomweb_url.rstrip('/')}/studies", data=bytes(body), timeout=timeout, headers={
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
            "Accept": "application/dicom+json"})
        if r.status_code not in (200, 202):
            raise RuntimeError(f"STOW-RS to {dicomweb_url} failed: HTTP {r.status_code}: {r.text[:500]}")
        answer = r.json() if r.content else {}
        failed = answer.get("00081198", {}).get("Value") if isinstance(answer, dict) else None
        if failed:
            raise RuntimeError(f"STOW-RS refused {len(failed)} instance(s): {json.dumps(failed)[:500]}")
        answers.append(answer)
    return answers
