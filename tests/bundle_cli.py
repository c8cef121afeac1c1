"""Helpers of the bundle tests (``tests/test_bundle_*.py``): a bundle's folders and its real command lines
(``python -m monai.bundle run``, ``torchrun``) run in a subprocess with the bundle on ``PYTHONPATH``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import vlseg

REPO = Path(__file__).resolve().parents[1]
SCHEMA = Path(vlseg.__file__).resolve().parent / "assets" / "bundle_meta_schema.json"


class BundleCLI:
    """``bundles/<name>``: its ``root`` and ``configs`` folders, ``cfg`` (a ``--config_file`` list), ``run`` (a
    command in the bundle folder; fails the test with the output tail on a non-zero exit) and command builders."""

    def __init__(self, name: str, timeout: float = 300):
        self.root = REPO / "bundles" / name
        self.configs = self.root / "configs"
        self.timeout = timeout

    def parser(self, *names: str, **overrides):
        """A ``ConfigParser`` over ``configs/<name>`` files in order, ``bundle_root`` set, ``overrides`` applied
        (parse it with the bundle's ``scripts`` importable, e.g. inside ``vlseg.bundles.bundle_context``)."""
        from monai.bundle import ConfigParser

        parser = ConfigParser()
        parser.read_config([str(self.configs / n) for n in names])
        parser["bundle_root"] = str(self.root)
        for k, v in overrides.items():
            parser[k] = v
        return parser

    def env(self) -> dict:
        env = dict(os.environ)
        env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        env["PYTHONPATH"] = os.pathsep.join([str(self.root), env.get("PYTHONPATH", "")])
        return env

    def cfg(self, *names: str) -> str:
        return "[" + ",".join(f"'{self.configs / n}'" for n in names) + "]"

    def run(self, cmd: list[str], timeout: float | None = None) -> subprocess.CompletedProcess:
        proc = subprocess.run(cmd, cwd=str(self.root), env=self.env(), capture_output=True, text=True,
                              timeout=timeout or self.timeout)
        assert proc.returncode == 0, (f"command failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stdout[-3000:]}\n"
                                      f"{proc.stderr[-5000:]}")
        return proc

    def train_tiny(self, root: Path, datalist, output: str = "eval") -> tuple[Path, Path]:
        """Train the ``tiny`` variant with the real command line into ``root``; returns (checkpoint dir, output dir)."""
        ckpt, out = root / "models", root / output
        self.run(self.bundle_run("train.json", "tiny.json", datalist=datalist, ckpt_dir=ckpt, output_dir=out))
        return ckpt, out

    def bundle_run(self, *config_names: str, logging_file: bool = True, nproc: int | None = None,
                   **args) -> list[str]:
        """``python -m monai.bundle run`` over ``configs/<config_names>`` with ``--<key> <value>`` for ``args``
        (``torchrun --standalone --nproc_per_node=<nproc>`` in front when ``nproc`` is given)."""
        prefix = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc \
            else [sys.executable]
        cmd = prefix + ["-m", "monai.bundle", "run", "--config_file", self.cfg(*config_names),
                        "--meta_file", str(self.configs / "metadata.json")]
        if logging_file:
            cmd += ["--logging_file", str(self.configs / "logging.conf")]
        for k, v in args.items():
            cmd += [f"--{k}", str(v)]
        return cmd

