"""Make the checkpoints the main job ships with (``checkpoints/<bundle>_<variant>.pt`` + ``.json``).

    python scripts/make_demo_checkpoints.py [--models medclipseg,uavls,vilmedsam] [--variant small]
        [--seconds medclipseg=1000,uavls=1000,vilmedsam=1100] [--overrides '{"uavls": {"max_epochs": 14}}']
    python scripts/make_demo_checkpoints.py --export-only medclipseg=/path/to/work/medclipseg ...

For each bundle: copy the bundle to a work folder (the repository's ``bundles/*/models`` stay untouched), train
its ``--variant`` on the demo data set (``python -m monai.bundle run`` with ``configs/train.json`` +
``configs/<variant>.json``, one thread, a budget in CPU seconds of the training process, so the result does not
depend on how busy the machine is), then keep the tensors the network definition cannot rebuild, in float16
(:func:`vlseg.app_support.shipped.export_trainable`). The JSON record next to each file holds the exact training
command, the data set parameters, the budget, the times and the best validation Dice from the log.
``--export-only NAME=DIR`` exports ``DIR/models/model.pt`` of a finished run made by this script (its
``train_command.json`` and ``train.log`` are read from ``DIR``). The main job checks the shipped files against
the current networks and trains instead when one no longer fits.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SECONDS = {"medclipseg": 1000.0, "uavls": 1000.0, "vilmedsam": 1100.0}
DEFAULT_OVERRIDES = {"uavls": {"max_epochs": 14}}
MAX_TOTAL_BYTES = 20_000_000


def _pairs(text: str) -> dict[str, str]:
    out = {}
    for part in filter(None, (p.strip() for p in (text or "").split(","))):
        name, _, value = part.partition("=")
        if not value:
            raise SystemExit(f"expected NAME=VALUE, got {part!r}")
        out[name.strip()] = value.strip()
    return out


def _best_val(log_text: str) -> float | None:
    values = [float(v) for v in re.findall(r"val_mean_dice: ([0-9.]+)", log_text)]
    return max(values) if values else None


def train(name: str, variant: str, work: Path, datalist: Path, seconds: float, overrides: dict) -> dict:
    """Train a copy of bundle ``name`` in ``work``; returns what the record needs."""
    from vlseg.app_support.checkpoints import _bundle_env, train_command

    if work.exists():
        shutil.rmtree(work)
    shutil.copytree(ROOT / "bundles" / name, work, ignore=shutil.ignore_patterns("*.pt", "runs", "eval"))
    overrides = {"max_train_clock": "process", "num_threads": 1, **overrides}
    cmd = train_command(work, variant, datalist, None, overrides, seconds)
    (work / "train_command.json").write_text(json.dumps(cmd))
    env = _bundle_env(work)
    env["OMP_NUM_THREADS"] = "1"
    t0, c0 = time.time(), os.times()
    with open(work / "train.log", "w") as log:
        rc = subprocess.call(cmd, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT)
    c1 = os.times()
    if rc != 0:
        raise SystemExit(f"{name}: training failed (exit {rc}); see {work / 'train.log'}")
    return {"wall_s": round(time.time() - t0, 1), "cpu_s": round(c1.children_user + c1.children_system
                                                                  - c0.children_user - c0.children_system, 1)}


def export(name: str, variant: str, work: Path, times: dict | None, datalist: Path) -> dict:
    from vlseg.app_support.shipped import export_trainable, shipped_path

    cmd = json.loads((work / "train_command.json").read_text())
    log_text = (work / "train.log").read_text(errors="replace") if (work / "train.log").is_file() else ""
    params = json.loads(datalist.read_text())["params"]
    record = {
        "train_command": " ".join(cmd).replace(str(work), f"<copy of bundles/{name}>"),
        "made_with": "python scripts/make_demo_checkpoints.py " + " ".join(sys.argv[1:]),
        "demo_data_params": params,
        "best_val_mean_dice": _best_val(log_text),
        "train_times": times,
        "date": time.strftime("%Y-%m-%d"),
    }
    return export_trainable(work, variant, work / "models" / "model.pt", shipped_path(name, variant), record)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="medclipseg,uavls,vilmedsam")
    ap.add_argument("--variant", default="small")
    ap.add_argument("--seconds", default="", help="NAME=CPU seconds, comma-separated (defaults: %s)" % DEFAULT_SECONDS)
    ap.add_argument("--overrides", default="{}", help="JSON {NAME: {config key: value}} (defaults: %s)" % DEFAULT_OVERRIDES)
    ap.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "vlseg_demo_checkpoints"))
    ap.add_argument("--export-only", default="", help="NAME=DIR, comma-separated: export finished runs")
    ap.add_argument("--data", default=None, help="demo data folder (default: the vlseg demo cache)")
    args = ap.parse_args(argv)

    from vlseg.data.demo import ensure_demo_dataset

    datalist = Path(ensure_demo_dataset(args.data))
    infos = {}
    if args.export_only:
        for name, work in _pairs(args.export_only).items():
            infos[name] = export(name, args.variant, Path(work), None, datalist)
    else:
        seconds = {**DEFAULT_SECONDS, **{k: float(v) for k, v in _pairs(args.seconds).items()}}
        overrides = {**DEFAULT_OVERRIDES, **json.loads(args.overrides)}
        for name in [m for m in args.models.split(",") if m]:
            work = Path(args.work) / name
            print(f"[checkpoints] training {name} ({args.variant}, {seconds[name]:.0f} CPU s) in {work} ...", flush=True)
            times = train(name, args.variant, work, datalist, seconds[name], overrides.get(name, {}))
            infos[name] = export(name, args.variant, work, times, datalist)
    for name, info in infos.items():
        print(f"[checkpoints] {name}: {info['file']} {info['bytes'] / 1e6:.2f} MB, {info['values_kept']} values kept, "
              f"{info['values_left_out']} left to the network definition; best validation Dice "
              f"{info.get('best_val_mean_dice')}")
    total = sum(p.stat().st_size for p in (ROOT / "checkpoints").glob("*.pt"))
    print(f"[checkpoints] all shipped checkpoints: {total / 1e6:.2f} MB (limit {MAX_TOTAL_BYTES / 1e6:.1f} MB)")
    return 0 if total <= MAX_TOTAL_BYTES else 1


if __name__ == "__main__":
    sys.exit(main())
