"""Progress lines for a bundle training that runs in a subprocess writing to a log file.

The bundles log ignite's ``StatsHandler`` lines (``Epoch: 3/30, Iter: 12/76 -- train_loss: ...``) and/or a tqdm
``ProgressBar`` (``Epoch [3/30]: [12/76]``). :func:`wait_with_progress` waits for the process and, every
``every`` seconds, prints ``[train <name>] epoch 3/30, step 12/76, 2:10 left`` where the time left is the smaller
of the time budget's rest and the estimate from the steps done so far.
"""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

__all__ = ["last_progress", "wait_with_progress"]

_PATTERNS = (re.compile(r"Epoch: (\d+)/(\d+), Iter: (\d+)/(\d+)"), re.compile(r"Epoch \[(\d+)/(\d+)\]: \[(\d+)/(\d+)\]"))


def last_progress(text: str) -> tuple[int, int, int, int] | None:
    """``(epoch, epochs, step, steps)`` of the last progress mark in ``text`` (None when there is none)."""
    best = None
    for pattern in _PATTERNS:
        for m in pattern.finditer(text):
            if best is None or m.end() > best[0]:
                best = (m.end(), tuple(int(g) for g in m.groups()))
    return best[1] if best else None


def _tail(path: Path, size: int = 16384) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - size))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def _mmss(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 60}:{seconds % 60:02d}"


def wait_with_progress(proc: subprocess.Popen, log_path, name: str, max_seconds: float | None = None,
                       timeout: float | None = None, log: Callable[[str], None] = print, every: float = 15.0) -> int:
    """Wait for ``proc`` (raising ``subprocess.TimeoutExpired`` after ``timeout`` s) and print progress lines."""
    t0 = last = time.time()
    first_step = None  # (time, global step) of the first progress seen: start-up time is not training time
    while True:
        try:
            return proc.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            pass
        now = time.time()
        if timeout is not None and now - t0 > timeout:
            raise subprocess.TimeoutExpired(proc.args, timeout)
        if now - last < every:
            continue
        last = now
        mark = last_progress(_tail(Path(log_path))) if log_path else None
        elapsed = now - t0
        if mark is None:
            budget = f", time budget {_mmss(max_seconds - elapsed)} left" if max_seconds else ""
            log(f"[train {name}] starting ({_mmss(elapsed)} so far: building the network, caching the data){budget}")
            continue
        epoch, epochs, step, steps = mark
        done, total = (epoch - 1) * steps + step, epochs * steps
        first_step = first_step or (now, done)
        lefts = []
        if max_seconds:  # the bundles' budget counts from the start of the training loop, about the first step
            lefts.append(max_seconds - (now - first_step[0]))
        if done > first_step[1]:
            rate = (now - first_step[0]) / (done - first_step[1])
            lefts.append(rate * (total - done))
        left = f", {_mmss(min(lefts))} left" if lefts else ""
        log(f"[train {name}] epoch {epoch}/{epochs}, step {step}/{steps}{left}"
            + (f" (budget {max_seconds:.0f} s)" if max_seconds else ""))
