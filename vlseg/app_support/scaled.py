"""Scale-out serving on one machine: several inference-only MONAI Label workers behind nginx (issue 15, item 5b).

One **primary** ``monailabel start_server`` owns the datastore, training, scoring, active learning and sessions.
``workers`` more servers of the same app and studies serve only ``POST /infer/<model>``; nginx (Debian's package)
sends those to the worker with the fewest open requests (``least_conn``) and everything else to the primary
(``apps/vlseg/deploy/nginx.conf.template``).

Workers never write to the datastore, because each MONAI Label process writes its whole in-memory datastore file
and would overwrite the primary's changes. They run with ``--conf store_uncertainty false``,
``MONAI_LABEL_DATASTORE_READ_ONLY=true`` (no reconciliation at start-up) and no scoring at start-up. They see the
primary's new images through MONAI Label's datastore auto-reload. A client behind nginx gets the uncertainty map
inline (``"uncertainty_inline": true``), not as a stored ``uncertainty`` label. Folder studies only.

    python -m vlseg.app_support.scaled --app apps/vlseg --studies <folder> --workers 2 --port 8000 --conf variant small

(``scripts/serve_scaled.sh`` runs this) serves on 127.0.0.1:8000 until Ctrl-C. :func:`start_scaled` /
:func:`stop_scaled` do the same for tests.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

from vlseg.app_support.server import ServerHandle, free_port, start_server, stop_server, wait_until_answering
from vlseg.app_support.upload_limit import DEFAULT_MAX_UPLOAD_BYTES, parse_size

__all__ = ["ScaledHandle", "nginx_executable", "render_nginx_conf", "start_nginx", "start_scaled", "stop_scaled",
           "TEMPLATE"]

TEMPLATE = Path(__file__).resolve().parents[2] / "apps" / "vlseg" / "deploy" / "nginx.conf.template"
#: what a worker runs with on top of the shared --conf: it never writes to the datastore (see the module doc)
WORKER_CONF = {"skip_trainers": "true", "store_uncertainty": "false"}
WORKER_ENV = {"MONAI_LABEL_DATASTORE_READ_ONLY": "true", "MONAI_LABEL_AUTO_UPDATE_SCORING": "false",
              "MONAI_LABEL_SESSIONS": "false"}


def worker_threads(workers: int, cores: int | None = None) -> int:
    """CPU threads per inference worker: the cores shared out (at least 1). Every PyTorch process otherwise starts
    one OpenMP thread per core, so ``workers`` processes busy at once would run ``workers x cores`` spinning threads
    on ``cores`` cores, which is slower than one worker alone (measured: 2 workers at 2 threads each on 2 cores
    answered 0.24x the requests per second of one worker)."""
    if not cores:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, int(cores) // max(1, int(workers)))


def thread_env(threads: int) -> dict:
    """The environment that caps a child process's OpenMP / MKL / PyTorch intra-op threads at ``threads``."""
    n = str(int(threads))
    return {"OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n, "OPENBLAS_NUM_THREADS": n}


def nginx_executable() -> Optional[str]:
    """The nginx binary (PATH, then /usr/sbin where Debian puts it), or None."""
    return shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin:/usr/local/nginx/sbin")


def render_nginx_conf(listen: str, primary: str, workers: List[str], run_dir,
                      max_body_bytes: int = DEFAULT_MAX_UPLOAD_BYTES, read_timeout_s: int = 600,
                      template: Path = TEMPLATE) -> str:
    """The template with its ``{{...}}`` filled in: ``listen`` / ``primary`` / ``workers`` as ``host:port``."""
    if not workers:
        raise ValueError("at least one inference worker is needed")
    # a private nginx started by root: its worker processes run as root too (the template's temp folders live in
    # run_dir, which may not be reachable by nobody); for any other user the directive is ignored by nginx
    user = "user root;" if hasattr(os, "geteuid") and os.geteuid() == 0 else ""
    values = {"user_directive": user, "run_dir": str(Path(run_dir).resolve()), "listen": listen, "primary": primary,
              "infer_servers": "\n".join(f"        server {w} max_fails=0;" for w in workers),
              "max_body_bytes": str(int(max_body_bytes)) if int(max_body_bytes) > 0 else "0",
              "read_timeout_s": str(int(read_timeout_s))}
    text = Path(template).read_text()
    for key, value in values.items():
        text = text.replace("{{" + key + "}}", value)
    if "{{" in text:
        raise ValueError(f"{template}: unfilled placeholder near {text[text.index('{{'):][:40]!r}")
    return text


@dataclass
class ScaledHandle:
    url: str
    primary: ServerHandle
    workers: List[ServerHandle]
    nginx: Optional[subprocess.Popen] = None
    run_dir: Path = None
    _nginx_log: object = field(default=None, repr=False)

    def nginx_log_tail(self, n: int = 3000) -> str:
        try:
            return (self.run_dir / "error.log").read_text(errors="replace")[-n:]
        except OSError:
            return ""


def start_nginx(conf_text: str, run_dir: Path, check_url: str, timeout: float = 30.0):
    """Write ``nginx.conf`` into ``run_dir`` and run nginx in the foreground on it (its own process, ended by
    :func:`stop_scaled`); returns ``(process, log file)`` once ``check_url`` answers."""
    exe = nginx_executable()
    if not exe:
        raise RuntimeError("nginx is not installed (Debian: apt-get install -y nginx)")
    conf = run_dir / "nginx.conf"
    conf.write_text(conf_text)
    log = open(run_dir / "nginx.out", "w")
    proc = subprocess.Popen([exe, "-p", str(run_dir), "-e", str(run_dir / "error.log"), "-c", str(conf),
                             "-g", "daemon off;"], stdout=log,
                            stderr=subprocess.STDOUT)
    tail = lambda: (run_dir / "nginx.out").read_text(errors="replace")[-2000:] + (  # noqa: E731
        (run_dir / "error.log").read_text(errors="replace")[-2000:] if (run_dir / "error.log").exists() else "")
    try:
        wait_until_answering(proc, check_url, tail, timeout, interval=0.2, what="nginx")
    except BaseException:
        _end(proc)
        log.close()
        raise
    return proc, log


def start_scaled(app_dir, studies, conf: dict | None = None, workers: int = 2, host: str = "127.0.0.1",
                 port: int | None = None, run_dir=None, env: dict | None = None, primary_env: dict | None = None,
                 timeout: float = 300.0, threads: int | None = None) -> ScaledHandle:
    """Start the primary and ``workers`` inference workers (in parallel), then nginx in front of them on
    ``host:port``; returns once ``GET /info/`` answers through nginx. Each worker gets ``threads`` CPU threads
    (default :func:`worker_threads`: this machine's cores shared out; ``env`` may still set its own)."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    conf = dict(conf or {})
    run_dir = Path(run_dir or tempfile.mkdtemp(prefix="vlseg-scaled-"))
    run_dir.mkdir(parents=True, exist_ok=True)
    port = port or free_port(host)

    def one(k: int) -> ServerHandle:
        if k == 0:
            return start_server(app_dir, studies, conf, host=host, log_path=run_dir / "primary.log",
                                env={**(env or {}), **(primary_env or {})}, timeout=timeout)
        return start_server(app_dir, studies, {**conf, **WORKER_CONF}, host=host, log_path=run_dir / f"worker{k}.log",
                            env={**thread_env(threads or worker_threads(workers)), **(env or {}), **WORKER_ENV},
                            timeout=timeout)

    with ThreadPoolExecutor(max_workers=workers + 1) as pool:
        jobs = [pool.submit(one, k) for k in range(workers + 1)]
        started, errors = [], []
        for job in jobs:
            try:
                started.append(job.result())
            except Exception as e:
                errors.append(e)
    if errors:
        for h in started:
            stop_server(h)
        raise RuntimeError(f"{len(errors)} of {workers + 1} servers did not start: {errors[0]}")
    primary, worker_handles = started[0], started[1:]
    address = lambda h: h.url.split("://", 1)[1]  # noqa: E731
    text = render_nginx_conf(f"{host}:{port}", address(primary), [address(w) for w in worker_handles], run_dir,
                             max_body_bytes=parse_size(conf.get("max_upload_bytes", DEFAULT_MAX_UPLOAD_BYTES)))
    url = f"http://{host}:{port}"
    try:
        proc, log = start_nginx(text, run_dir, f"{url}/info/")
    except BaseException:
        for h in started:
            stop_server(h)
        raise
    return ScaledHandle(url, primary, worker_handles, proc, run_dir, log)


def _end(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGQUIT)  # nginx: graceful shutdown
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def stop_scaled(handle: ScaledHandle) -> None:
    """nginx first, then the workers and the primary together (each by its process id)."""
    try:
        if handle.nginx is not None:
            _end(handle.nginx)
    finally:
        if handle._nginx_log is not None:
            handle._nginx_log.close()
        with ThreadPoolExecutor(max_workers=len(handle.workers) + 1) as pool:  # each waits for its own exit
            list(pool.map(stop_server, [*handle.workers, handle.primary]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--app", default=str(Path(__file__).resolve().parents[2] / "apps" / "vlseg"))
    ap.add_argument("--studies", required=True, help="folder of images (shared by every process)")
    ap.add_argument("--workers", type=int, default=2, help="inference-only workers (default 2)")
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU threads per worker (default: the cores divided by --workers, at least 1)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000, help="nginx's port (default 8000)")
    ap.add_argument("--run-dir", default=None, help="logs, nginx.conf and nginx's temporary files (default: new)")
    ap.add_argument("--conf", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"),
                    help="--conf for every server (as monailabel start_server)")
    args = ap.parse_args(argv)
    if not os.path.isdir(args.studies):
        ap.error(f"--studies {args.studies!r} is not a folder (the scaled set-up serves folder studies only)")
    if not nginx_executable():
        ap.error("nginx is not installed; on Debian: apt-get install -y nginx")
    print(f"starting the primary and {args.workers} inference workers ...", flush=True)
    t0 = time.time()
    handle = start_scaled(args.app, args.studies, dict(args.conf), workers=args.workers, host=args.host,
                          port=args.port, run_dir=args.run_dir, threads=args.threads)
    print(f"serving on {handle.url} after {time.time() - t0:.0f} s: primary {handle.primary.url}, workers "
          f"{', '.join(w.url for w in handle.workers)}; logs and nginx.conf in {handle.run_dir}; Ctrl-C stops",
          flush=True)
    try:
        while all(p.poll() is None for p in [handle.nginx, handle.primary.proc, *(w.proc for w in handle.workers)]):
            time.sleep(1.0)
        print("a process ended; stopping the others", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        stop_scaled(handle)


if __name__ == "__main__":
    sys.exit(main())
