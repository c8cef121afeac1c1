"""Command-line pieces shared by the ``scripts/benchmark_*.py`` family."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

from vlseg.bench.report import default_out_dir, repo_root

__all__ = ["base_parser", "add_budget_clock", "apply_threads", "budget_unit", "budget_words", "out_dir", "command_line", "log"]


def base_parser(name: str, doc: str | None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"scripts/benchmark_{name}.py", description=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke-test sizes (seconds, not hours): tiny variants, few images")
    p.add_argument("--out", type=Path, default=None, help=f"report folder (default: reports/{name})")
    p.add_argument("--bundles-dir", type=Path, default=repo_root() / "bundles", help="where the bundles live")
    p.add_argument("--bundles", nargs="*", default=None, help="bundle names (default: every bundle found)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    p.set_defaults(_name=name)
    return p


def add_budget_clock(p: argparse.ArgumentParser) -> None:
    """``--budget-clock``: what a training budget counts (the bundles' ``max_train_clock``)."""
    p.add_argument("--budget-clock", choices=("wall", "process"), default="wall",
                   help="what the training budget counts: 'wall' seconds (default; needs an otherwise idle machine) or "
                        "'process' CPU seconds of the training process, all threads (fair when parts run side by side; "
                        "data-loader workers are then turned off so that all data work is inside the budget)")


def budget_words(clock: str) -> str:
    """How a report names the budget's unit."""
    return "s of training wall clock" if clock == "wall" else "CPU s of the training process (process clock)"


def budget_unit(clock: str) -> str:
    """The short unit of a budget, for plot titles: ``"CPU s"`` on the process clock, ``"s"`` on the wall clock."""
    return "CPU s" if clock == "process" else "s"


def apply_threads(threads: int | None) -> None:
    """Use ``threads`` torch threads here and in every training subprocess started from here (through
    ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS``, which a fresh torch reads at start-up)."""
    if not threads:
        return
    import torch

    torch.set_num_threads(int(threads))
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(int(threads))


def out_dir(args) -> Path:
    path = Path(args.out) if args.out is not None else default_out_dir(args._name)
    path.mkdir(parents=True, exist_ok=True)
    return path


def command_line() -> str:
    """The command that reproduces this run: this process's own, or the parent's when a ``--concurrent`` branch
    (``VLSEG_BENCH_COMMAND``) started it."""
    if os.environ.get("VLSEG_BENCH_COMMAND"):
        return os.environ["VLSEG_BENCH_COMMAND"]
    script = os.path.relpath(sys.argv[0], repo_root()) if os.path.isabs(sys.argv[0]) else sys.argv[0]
    return " ".join(["python", shlex.quote(script)] + [shlex.quote(a) for a in sys.argv[1:]])


def log(msg: str) -> None:
    print(f"[bench] {msg}", flush=True)
