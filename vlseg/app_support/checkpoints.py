"""Make sure a bundle has a checkpoint for the size variant the app will serve.

``ensure_checkpoint(bundle_dir, variant)`` returns ``models/model.pt`` when it exists (and, if a record says which
variant made it, that it is the asked variant); otherwise it runs the bundle's own training,
``python -m monai.bundle run --config_file "['configs/train.json','configs/<variant>.json']"``, in a subprocess
with the bundle folder on ``PYTHONPATH``, and records the variant in ``models/vlseg_checkpoint.json``.

Command line (one bundle, or every bundle of a folder)::

    python -m vlseg.app_support.checkpoints --bundles-dir bundles --variant small
    python -m vlseg.app_support.checkpoints --bundle bundles/uavls --variant tiny --datalist /tmp/demo/datalist.json \
        --max-epochs 1
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from vlseg.bundles import (
    CHECKPOINT_RECORD,
    BundleError,
    bundle_context,
    checkpoint_path,
    config_files,
    discover_bundles,
    file_sha256,
    load_parser,
    read_checkpoint_record,
    repo_bundles_dir,
)

__all__ = ["ensure_checkpoint", "write_initial_checkpoint", "build_network", "checkpoint_mismatch", "train_command", "main"]

logger = logging.getLogger(__name__)



def save_atomic(obj, path) -> Path:
    """``torch.save`` to a temporary file next to ``path``, then ``os.replace``: a process killed while writing
    leaves the previous ``path`` (or none) in place, never a truncated one. Same mechanism as the bundles'
    ``CheckpointSaver`` (ignite ``DiskSaver(atomic=True)``)."""
    import torch

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path

def train_command(bundle_dir, variant: str | None = None, datalist=None, max_epochs: int | None = None,
                  overrides: dict | None = None, max_seconds: float | None = None,
                  extra_config_files: Sequence | None = None) -> list[str]:
    """The ``monai.bundle run`` command line training ``bundle_dir`` with its ``variant`` override file (and
    ``extra_config_files`` merged after it)."""
    bundle_dir = Path(bundle_dir).resolve()
    files = [str(p) for p in config_files(bundle_dir, "train", variant)]
    files += [str(Path(f).resolve()) for f in extra_config_files or ()]
    if max_seconds:
        files.append(str(_final_saver_file()))
    cmd = [sys.executable, "-m", "monai.bundle", "run", "run",
           "--meta_file", str(bundle_dir / "configs" / "metadata.json"),
           "--config_file", json.dumps(files).replace('"', "'"),
           "--bundle_root", str(bundle_dir)]
    logging_conf = bundle_dir / "configs" / "logging.conf"
    if logging_conf.is_file():
        cmd += ["--logging_file", str(logging_conf)]
    if datalist is not None:
        cmd += ["--datalist", str(Path(datalist).resolve())]
    if max_epochs is not None:
        cmd += ["--train#trainer#max_epochs", str(int(max_epochs))]
    if max_seconds:  # the bundles' vlseg.engine_handlers.StopAfterSeconds budget
        cmd += ["--max_train_seconds", str(float(max_seconds))]
    for k, v in (overrides or {}).items():
        cmd += [f"--{k}", v if isinstance(v, str) else json.dumps(v)]
    return cmd


#: Appended to the train configs of a time-boxed run: also save the network when training ends (also when the
#: time budget terminates it before the first validation saved a best checkpoint).
FINAL_SAVER = {"+train#handlers": [{
    "_target_": "CheckpointSaver", "save_dir": "$@bundle_root + '/models'", "save_dict": {"model": "@network"},
    "save_final": True, "final_filename": "model_final.pt"}]}


def _final_saver_file() -> Path:
    import tempfile

    path = Path(tempfile.gettempdir()) / "vlseg_final_saver.json"
    text = json.dumps(FINAL_SAVER, indent=1)
    if not path.is_file() or path.read_text() != text:
        path.write_text(text)
    return path


def _bundle_env(bundle_dir: Path) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(bundle_dir), env.get("PYTHONPATH", "")) if p)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    return env


def _run(cmd: list[str], cwd: Path, env: dict, timeout: float | None, log_path: Path | None,
         progress=None, max_seconds: float | None = None) -> int:
    """Run ``cmd`` in its own process group; on timeout stop that group (children first) and raise.
    With ``progress`` (a print function) and a ``log_path``, print the training's progress while waiting."""
    out = open(log_path, "w") if log_path else None
    try:
        proc = subprocess.Popen(cmd, cwd=str(cwd), env=env, stdout=out or None, stderr=subprocess.STDOUT if out else None,
                                start_new_session=True)
        try:
            if progress is not None and log_path:
                from vlseg.app_support.train_progress import wait_with_progress

                return wait_with_progress(proc, log_path, cwd.name, max_seconds, timeout, log=progress)
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _stop_tree(proc)
            raise BundleError(f"training {cwd.name} did not finish within {timeout:.0f} s (stopped)") from None
        except BaseException:
            _stop_tree(proc)
            raise
    finally:
        if out:
            out.close()


def _stop_tree(proc: subprocess.Popen) -> None:
    try:
        import psutil

        children = psutil.Process(proc.pid).children(recursive=True)
        for c in children:
            c.terminate()
        psutil.wait_procs(children, timeout=10)
    except Exception:  # psutil missing or process gone
        pass
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _weights_from_final_state(bundle_dir: Path, since: float, ckpt: Path) -> str | None:
    """When a time budget ends training before any validation, bundles still save their full training state
    (``models/*final*.pt`` or another ``*.pt`` written during the run, holding ``{"model": state_dict, ...}``).
    Write its network weights to ``ckpt`` and return the source file name (None when there is none)."""
    import torch

    cands = sorted((p for p in ckpt.parent.glob("*.pt") if p != ckpt and p.stat().st_mtime >= since - 1),
                   key=lambda p: (p.name != "model_final.pt", "final" not in p.name, -p.stat().st_mtime))
    for p in cands:
        try:
            state = torch.load(p, map_location="cpu", weights_only=True)
        except Exception:  # not a plain tensor checkpoint
            continue
        if isinstance(state, dict) and state and all(isinstance(v, torch.Tensor) for v in state.values()):
            save_atomic(state, ckpt)  # a bare state dict (CheckpointSaver with one object)
            return p.name
        for key in ("model", "network", "state_dict"):
            sd = state.get(key) if isinstance(state, dict) else None
            if isinstance(sd, dict) and sd and all(isinstance(v, torch.Tensor) for v in sd.values()):
                save_atomic(sd, ckpt)
                return p.name
    return None


def ensure_checkpoint(bundle_dir, variant: str | None = "small", datalist=None, max_epochs: int | None = None,
                      timeout: float | None = None, force: bool = False, log_path=None,
                      overrides: dict | None = None, max_seconds: float | None = None, check_fit: bool = True,
                      shipped: bool = False, progress=None) -> Path:
    """Return ``<bundle>/models/model.pt``, training the ``variant`` first if needed.

    Trains when the checkpoint is missing, when ``force``, when ``models/vlseg_checkpoint.json`` records a
    different variant, or (``check_fit``) when its tensors do not fit the variant's current network (the old file
    is kept as ``models/model.<old variant>.pt``). ``datalist`` (default: the
    bundle's own default, the demo set), ``max_epochs`` (default: the variant's) and ``max_seconds`` (the
    bundles' ``max_train_seconds`` wall-clock budget, ended gracefully after an epoch) are passed as overrides;
    ``timeout`` is a hard limit after which the training process is stopped. Raises :class:`BundleError` when training fails, times out or writes no checkpoint.

    ``shipped``: use the repository's shipped checkpoint of this bundle and variant (``checkpoints/``,
    :mod:`vlseg.app_support.shipped`) instead of training, re-installing it whenever ``models/model.pt`` is not
    its unchanged install (e.g. after a training from the app); if it no longer fits the network, train.
    ``progress``: a print function for per-step training progress with the time left (needs ``log_path``).
    """
    bundle_dir = Path(bundle_dir).resolve()
    variant = variant or None
    ckpt = checkpoint_path(bundle_dir)
    if shipped and variant and not force:
        from vlseg.app_support.shipped import install_shipped, shipped_is_installed, shipped_path

        if shipped_is_installed(bundle_dir, variant):
            return ckpt
        if shipped_path(bundle_dir.name, variant).is_file():
            if ckpt.is_file():
                made_by = read_checkpoint_record(bundle_dir).get("variant") or "previous"
                shutil.copy2(ckpt, ckpt.with_name(f"model.{made_by}.pt"))
                logger.warning("%s: replacing models/model.pt by the shipped %s checkpoint (the old one is kept as "
                               "models/model.%s.pt)", bundle_dir.name, variant, made_by)
            try:
                return install_shipped(bundle_dir, variant)
            except BundleError as e:
                logger.warning("%s: %s; training instead", bundle_dir.name, e)
                if progress is not None:
                    progress(f"[train {bundle_dir.name}] the shipped checkpoint cannot be used ({e}); training instead")
    record = read_checkpoint_record(bundle_dir)
    if ckpt.is_file() and not force:
        made_by = record.get("variant", "") if record else None
        if made_by is None or made_by == (variant or ""):
            why = checkpoint_mismatch(bundle_dir, variant) if check_fit else None
            if why is None:
                return ckpt
            reason = f"does not fit the current {variant or 'default'!r} network: {why}"
        else:
            reason = f"was made for variant {made_by!r}, not {variant!r}"
        backup = ckpt.with_name(f"model.{made_by or 'previous'}.pt")
        logger.warning("%s: models/model.pt %s; keeping it as %s and retraining", bundle_dir.name, reason, backup.name)
        shutil.move(str(ckpt), str(backup))
    cmd = train_command(bundle_dir, variant, datalist, max_epochs, overrides, max_seconds)
    logger.info("%s: training variant %r for a checkpoint: %s", bundle_dir.name, variant, " ".join(cmd))
    before = ckpt.stat().st_mtime_ns if ckpt.is_file() else None
    start = time.time()
    rc = _run(cmd, bundle_dir, _bundle_env(bundle_dir), timeout, Path(log_path) if log_path else None,
              progress=progress, max_seconds=max_seconds)
    seconds = time.time() - start
    if rc != 0:
        where = f"; log: {log_path}" if log_path else ""
        raise BundleError(f"training {bundle_dir.name} (variant {variant!r}) failed with exit code {rc}{where}")
    source = "models/model.pt (the bundle's best-validation checkpoint)"
    if not ckpt.is_file() or ckpt.stat().st_mtime_ns == before:
        fallback = _weights_from_final_state(bundle_dir, start, ckpt)
        if fallback is None:
            raise BundleError(f"training {bundle_dir.name} finished but wrote no models/model.pt "
                              "(does its CheckpointSaver run at least once within the epoch / time budget?)")
        source = f"models/{fallback} (the network weights of the last training state: the time budget ended " \
                 "before a validation saved a best checkpoint)"
        logger.warning("%s: no validated checkpoint within the budget; models/model.pt holds the weights of %s",
                       bundle_dir.name, fallback)
    (ckpt.parent / CHECKPOINT_RECORD).write_text(json.dumps({
        "variant": variant or "",
        "made_by": "vlseg.app_support.checkpoints.ensure_checkpoint",
        "datalist": str(datalist) if datalist else None,
        "max_epochs": max_epochs,
        "max_seconds": max_seconds,
        "train_seconds": round(seconds, 1),
        "source": source,
        "sha256": file_sha256(ckpt),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }, indent=2) + "\n")
    logger.info("%s: checkpoint ready after %.1f s: %s", bundle_dir.name, seconds, ckpt)
    return ckpt


def build_network(bundle_dir, variant: str | None = None, seed: int | None = None):
    """The ``network_def`` of ``configs/inference.json`` + the variant file, on CPU."""
    import torch

    bundle_dir = Path(bundle_dir).resolve()
    with bundle_context(bundle_dir):
        parser = load_parser(bundle_dir, variant)
        if seed is not None:
            torch.manual_seed(seed)
        return parser.get_parsed_content("network_def", instantiate=True)


def checkpoint_mismatch(bundle_dir, variant: str | None = None, network=None) -> str | None:
    """None when ``models/model.pt`` loads into the variant's network, else what does not fit."""
    import torch

    ckpt = checkpoint_path(bundle_dir)
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    state = state.get("model", state) if isinstance(state, dict) else state
    expected = (network if network is not None else build_network(bundle_dir, variant)).state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if tuple(expected[k].shape) != tuple(state[k].shape))
    if not (missing or unexpected or wrong):
        return None
    return (f"{len(missing)} missing, {len(unexpected)} unexpected, {len(wrong)} wrongly shaped tensors "
            f"(e.g. {(missing + unexpected + wrong)[:3]})")


def write_initial_checkpoint(bundle_dir, variant: str | None = None, seed: int = 0) -> Path:
    """Save the untrained network of ``configs/inference.json`` + variant as ``models/model.pt`` (tests only:
    serving needs weights that fit the network, not good ones). Recorded as ``random initialisation``."""
    bundle_dir = Path(bundle_dir).resolve()
    ckpt = checkpoint_path(bundle_dir)
    net = build_network(bundle_dir, variant, seed=seed)
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    save_atomic(net.state_dict(), ckpt)
    (ckpt.parent / CHECKPOINT_RECORD).write_text(json.dumps({
        "variant": variant or "", "made_by": "vlseg.app_support.checkpoints.write_initial_checkpoint",
        "source": f"random initialisation (seed {seed}); for tests only", "sha256": file_sha256(ckpt),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=2) + "\n")
    return ckpt


def exit_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit so running trainings and servers are stopped by their ``finally`` blocks."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))


def main(argv: Sequence[str] | None = None) -> int:
    exit_on_sigterm()
    ap = argparse.ArgumentParser(description="Train a bundle's size variant briefly when it has no models/model.pt.")
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--bundle", action="append", help="bundle folder (repeatable)")
    src.add_argument("--bundles-dir", default=None, help="every bundle of this folder (default: <repo>/bundles)")
    ap.add_argument("--models", default="", help="comma-separated subset of --bundles-dir")
    ap.add_argument("--variant", default="small", help="size variant override file: '' (default config), small, tiny")
    ap.add_argument("--datalist", default=None, help="training datalist (default: the bundle's, i.e. the demo set)")
    ap.add_argument("--max-epochs", type=int, default=None, help="override train#trainer#max_epochs")
    ap.add_argument("--max-seconds", type=float, default=None,
                    help="training budget per bundle (the bundles' max_train_seconds; ends after an epoch)")
    ap.add_argument("--timeout", type=float, default=None, help="hard limit per bundle; the run is stopped after it")
    ap.add_argument("--force", action="store_true", help="retrain even when a checkpoint exists")
    ap.add_argument("--log-dir", default=None, help="write each bundle's training output to <log-dir>/<name>.log")
    ap.add_argument("--random-init", action="store_true",
                    help="tests only: save the untrained network as the checkpoint instead of training")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    bundles = ({Path(b).name: Path(b) for b in args.bundle} if args.bundle
               else discover_bundles(args.bundles_dir or repo_bundles_dir(), args.models))
    failed = []
    for name, path in bundles.items():
        log_path = Path(args.log_dir) / f"{name}.log" if args.log_dir else None
        if log_path:
            log_path.parent.mkdir(parents=True, exist_ok=True)
        try:
            if args.random_init:
                print(f"{name}: {write_initial_checkpoint(path, args.variant)}")
                continue
            ckpt = ensure_checkpoint(path, args.variant, args.datalist, args.max_epochs, args.timeout, args.force, log_path,
                                     max_seconds=args.max_seconds)
            print(f"{name}: {ckpt}")
        except Exception as e:  # one bundle's failure must not hide the others
            print(f"{name}: FAILED: {type(e).__name__}: {e}", file=sys.stderr)
            failed.append(name)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
