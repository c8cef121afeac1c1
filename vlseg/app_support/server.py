"""Start and stop a real ``monailabel start_server`` for the vlseg app (tests and the demo round trip).

The server runs in its own process with its output in a log file; :func:`stop_server` ends the processes it
started (scoring / training subprocesses, torchrun workers) first, then the server itself, by process id.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["ServerHandle", "free_port", "start_server", "stop_server", "repo_app_dir"]


def repo_app_dir() -> Path:
    return Path(__file__).resolve().parents[2] / "apps" / "vlseg"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass
class ServerHandle:
    proc: subprocess.Popen
    url: str
    log_path: Path
    _log: object = None

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""


def _monailabel_cmd() -> list[str]:
    exe = shutil.which("monailabel", path=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    return [exe] if exe else [sys.executable, "-m", "monailabel.main"]


def start_server(app_dir, studies, conf: dict | None = None, host: str = "127.0.0.1", port: int | None = None,
                 log_path=None, env: dict | None = None, timeout: float = 300.0) -> ServerHandle:
    """``monailabel start_server --app APP --studies STUDIES --host HOST --port PORT --conf k v ...``; returns once
    ``GET /info/`` answers 200 (raises with the log tail if the server exits or is not up within ``timeout``)."""
    port = port or free_port(host)
    log_path = Path(log_path or Path(studies).parent / "server.log")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    cmd = _monailabel_cmd() + ["start_server", "--app", str(app_dir), "--studies", str(studies), "--host", host,
                               "--port", str(port)]
    for k, v in (conf or {}).items():
        cmd += ["--conf", str(k), str(v)]
    full_env = dict(os.environ)
    full_env.update({"MONAILABEL_PYEXE": sys.executable, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    full_env.update(env or {})
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=full_env, cwd=str(log_path.parent))
    handle = ServerHandle(proc, f"http://{host}:{port}", log_path, log)
    try:
        wait_until_answering(proc, f"{handle.url}/info/", handle.log_tail, timeout, what="monailabel server")
    except BaseException:
        stop_server(handle)
        raise
    return handle


def wait_until_answering(proc: subprocess.Popen, url: str, log_tail, timeout: float, ok_status=(200,),
                         interval: float = 1.0, request_timeout: float = 10.0, what: str = "server") -> None:
    """Poll ``url`` until it answers with a status in ``ok_status``. Raises ``RuntimeError`` (with ``log_tail()``,
    the end of the process's log) when the process ``proc`` exits first or after ``timeout`` seconds."""
    import requests

    start = time.time()
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}:\n{log_tail()}")
        try:
            if requests.get(url, timeout=request_timeout).status_code in ok_status:
                return
        except requests.RequestException:
            pass
        if time.time() - start > timeout:
            raise RuntimeError(f"{what} not up after {timeout:.0f} s:\n{log_tail()}")
        time.sleep(interval)


def stop_server(handle: ServerHandle, timeout: float = 20.0) -> None:
    """Stop the server's children (recursively) first, then the server, all by process id."""
    import psutil

    proc = handle.proc
    try:
        if proc.poll() is None:
            try:
                children = psutil.Process(proc.pid).children(recursive=True)
            except psutil.NoSuchProcess:
                children = []
            for c in children:
                try:
                    c.terminate()
                except psutil.NoSuchProcess:
                    pass
            _, alive = psutil.wait_procs(children, timeout=timeout)
            for c in alive:
                try:
                    c.kill()
                except psutil.NoSuchProcess:
                    pass
            proc.send_signal(signal.SIGINT)  # uvicorn shuts down cleanly on SIGINT
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    finally:
        if handle._log is not None:
            handle._log.close()
            handle._log = None
