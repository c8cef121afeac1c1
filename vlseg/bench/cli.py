"""Command-line pieces shared by the ``scripts/benchmark_*.py`` family."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

from vlseg.bench.report import default_out_dir, repo_root

__all__ = ["base_parser", "out_dir", "command_line", "log"]


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


def out_dir(args) -> Path:
    path = Path(args.out) if args.out is not None else default_out_dir(args._name)
    path.mkdir(parents=True, exist_ok=True)
    return path


def command_line() -> str:
    script = os.path.relpath(sys.argv[0], repo_root()) if os.path.isabs(sys.argv[0]) else sys.argv[0]
    return " ".join(["python", shlex.quote(script)] + [shlex.quote(a) for a in sys.argv[1:]])


def log(msg: str) -> None:
    print(f"[bench] {msg}", flush=True)
