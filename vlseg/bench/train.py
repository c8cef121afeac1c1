"""Train a bundle with its own ``configs/train.json`` through ``python -m monai.bundle run``, on a time budget.

The bundle folder is copied (without ``models/``, so no checkpoint or pretrained file of the working copy is read
or overwritten: training starts from random initialisation) into a work folder, and run there with overrides for

* ``datalist`` (the benchmark's own datalist file: a subset, or the labeled pool of an active-learning round),
* ``ckpt_dir`` / ``output_dir`` (inside the work folder),
* ``max_train_seconds`` / ``max_train_clock`` (the budget, wall or process-CPU seconds; the bundles stop with
  ``vlseg.engine_handlers.StopAfterSeconds``),
* ``train_encoders`` true where the config has it (no pretrained weights here, so frozen encoders would stay random),

plus any ``extra`` overrides whose keys the config has. The best-validation checkpoint (``ckpt_dir/model.pt``) is
what the evaluation then loads into the inference network.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlseg.bundles import bundle_context, config_files, load_parser, variant_label

__all__ = ["TrainResult", "train_bundle", "copy_bundle", "REQUIRED_KEYS"]

REQUIRED_KEYS = ("datalist", "ckpt_dir", "max_train_seconds")
_IGNORE = shutil.ignore_patterns("models", "runs", "eval", "__pycache__", "*.pyc", ".pytest_cache")


@dataclass
class TrainResult:
    bundle: str
    variant: str
    checkpoint: Path | None
    wall_s: float
    returncode: int
    log: Path
    command: list[str]
    overrides: dict[str, Any] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and self.checkpoint is not None


def copy_bundle(bundle_root: Path, dest: Path) -> Path:
    dest = Path(dest)
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(bundle_root, dest, ignore=_IGNORE, symlinks=True)
    (dest / "models").mkdir(exist_ok=True)
    return dest


def _cli_value(v: Any) -> str:
    if isinstance(v, bool):
        return "True" if v else "False"
    if v is None:
        return "None"
    if isinstance(v, (list, dict)):
        return json.dumps(v)
    return str(v)


def _train_files(root: Path, variant: str | None) -> list[str]:
    return [str(f) for f in config_files(root, "train", variant)]


def _run_in_process(copy: Path, variant: str | None, overrides: Mapping[str, Any], log: Path) -> int:
    """What ``python -m monai.bundle run`` does (``monai.bundle.create_workflow`` + ``run`` + ``finalize``), in this
    process: no interpreter start-up (the ``--quick`` smoke tests). Output goes to ``log`` as for a subprocess.

    If the budget ended the run before any validation wrote the best checkpoint, the final weights are saved as
    ``models/model_final.pt`` (a subprocess run has no such fallback and reports "no checkpoint").
    """
    import contextlib
    import logging

    import torch
    from monai.bundle import create_workflow

    kwargs = {"config_file": _train_files(copy, variant), "bundle_root": str(copy)}
    if (copy / "configs" / "metadata.json").is_file():
        kwargs["meta_file"] = str(copy / "configs" / "metadata.json")
    kwargs.update(overrides)
    root_logger = logging.getLogger()
    with open(log, "a") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        handler = logging.StreamHandler(f)
        root_logger.addHandler(handler)
        old_level = root_logger.level
        root_logger.setLevel(logging.INFO)
        try:
            with bundle_context(copy):
                wf = create_workflow(**kwargs)
                wf.run()
                wf.finalize()
                if not (copy / "models" / "model.pt").is_file():
                    net = wf.parser.get_parsed_content("network")
                    net = getattr(net, "module", net)
                    torch.save({"model": net.state_dict()}, copy / "models" / "model_final.pt")
            return 0
        except Exception:  # noqa: BLE001 - reported through the return code and the log
            import traceback

            traceback.print_exc(file=f)
            return 1
        finally:
            root_logger.setLevel(old_level)
            _drop_handlers_on(f)


def _drop_handlers_on(stream) -> None:
    """Remove every logging handler writing to ``stream`` (handlers created while stdout/stderr were redirected)."""
    import logging

    loggers = [logging.getLogger()] + [lg for lg in logging.root.manager.loggerDict.values() if isinstance(lg, logging.Logger)]
    for lg in loggers:
        for h in list(lg.handlers):
            if getattr(h, "stream", None) is stream:
                lg.removeHandler(h)


def train_bundle(bundle_root: Path, variant: str | None, datalist: Path, work_dir: Path, max_seconds: float,
                 extra: Mapping[str, Any] | None = None, timeout: float | None = None, in_process: bool = False,
                 epoch_length: int | None = None, clock: str = "wall") -> TrainResult:
    """Train in a copy of the bundle under ``work_dir``; returns where the checkpoint is and how it went.

    ``epoch_length`` (iterations per ignite epoch; the bundle's ``epoch_length`` key, else ``train#trainer#epoch_length``)
    makes validation and the best-checkpoint save happen every that many iterations, so a budget shorter than a
    full pass over a large training set still leaves a checkpoint.

    ``clock`` is what ``max_seconds`` counts (the bundle's ``max_train_clock``): ``"wall"`` seconds or ``"process"``
    CPU seconds of the training process; it is set whatever the variant file says, so every model of a benchmark
    gets the same kind of budget.

    ``in_process`` runs ``monai.bundle.run`` in this process instead of ``python -m monai.bundle run`` (same
    configs and overrides; saves the interpreter and import start-up, for quick runs).
    """
    bundle_root = Path(bundle_root).resolve()
    work_dir = Path(work_dir).resolve()
    work_dir.mkdir(parents=True, exist_ok=True)
    copy = copy_bundle(bundle_root, work_dir / bundle_root.name)
    with bundle_context(copy):
        parser = load_parser(copy, variant, base="train.json")
    keys = set(parser.config.keys()) if hasattr(parser.config, "keys") else set()
    missing = [k for k in REQUIRED_KEYS if k not in keys]
    log = work_dir / "train.log"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", json.dumps(_train_files(copy, variant)),
           "--bundle_root", str(copy)]
    if (copy / "configs" / "metadata.json").is_file():
        cmd += ["--meta_file", str(copy / "configs" / "metadata.json")]
    if (copy / "configs" / "logging.conf").is_file():
        cmd += ["--logging_file", str(copy / "configs" / "logging.conf")]
    if missing:
        log.write_text(f"train config lacks {missing}\n")
        return TrainResult(bundle_root.name, variant_label(variant), None, 0.0, -1, log, cmd,
                           error=f"{bundle_root.name}/configs/train.json has no key(s) {missing} (needed for a budgeted run)")
    overrides: dict[str, Any] = {
        "datalist": str(Path(datalist).resolve()),
        "ckpt_dir": str(copy / "models"),
        "max_train_seconds": float(max_seconds),
    }
    if "output_dir" in keys:
        overrides["output_dir"] = str(work_dir / "runs")
    if "max_train_clock" in keys:  # one kind of budget for every model, whatever a variant file sets
        overrides["max_train_clock"] = clock
    elif clock != "wall":
        log.write_text(f"train config lacks max_train_clock (needed for a {clock}-clock budget)\n")
        return TrainResult(bundle_root.name, variant_label(variant), None, 0.0, -1, log, cmd,
                           error=f"{bundle_root.name}/configs/train.json has no max_train_clock (needed for a {clock}-clock budget)")
    if "train_encoders" in keys:
        overrides["train_encoders"] = True
    if "require_pretrained" in keys:  # no pretrained files here: random initialisation, deliberately
        overrides["require_pretrained"] = False
    if epoch_length:
        if "epoch_length" in keys:
            overrides["epoch_length"] = int(epoch_length)
        elif isinstance(parser.config.get("train"), dict) and "trainer" in parser.config["train"]:
            overrides["train#trainer#epoch_length"] = int(epoch_length)
    for k, v in (extra or {}).items():
        if k in keys or "#" in k:
            overrides[k] = v
    for k, v in overrides.items():
        cmd += [f"--{k}", _cli_value(v)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1", MPLBACKEND="Agg")
    env["PYTHONPATH"] = str(copy) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    t0 = time.perf_counter()
    rc = 0
    with open(log, "w") as f:
        f.write(("(in process) " if in_process else "") + " ".join(cmd) + "\n\n")
        f.flush()
        if not in_process:
            try:
                rc = subprocess.run(cmd, cwd=str(copy), env=env, stdout=f, stderr=subprocess.STDOUT, timeout=timeout).returncode
            except subprocess.TimeoutExpired:
                rc = -9
    if in_process:
        rc = _run_in_process(copy, variant, overrides, log)
    wall = time.perf_counter() - t0
    ckpt = next((copy / "models" / n for n in ("model.pt", "model_final.pt") if (copy / "models" / n).is_file()), None)
    if ckpt is None:
        cands = sorted((copy / "models").glob("*.pt"), key=lambda p: p.stat().st_mtime)
        ckpt = cands[-1] if cands else None
    res = TrainResult(bundle_root.name, variant_label(variant), ckpt, wall, rc, log, cmd, overrides)
    for rep in sorted((work_dir / "runs").rglob("*.json")) if (work_dir / "runs").is_dir() else []:
        try:
            res.report[rep.name] = json.loads(rep.read_text())
        except (OSError, ValueError):
            pass
    if rc != 0:
        res.error = f"exit code {rc}; log {log}: " + _tail(log)
    elif ckpt is None:
        res.error = f"no checkpoint written (budget shorter than one epoch + validation?); log {log}"
    return res


def _tail(path: Path, n: int = 800) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return text[-n:].replace("\n", " | ")
