"""Where the evaluation benchmarks (prompts, uncertainty) get trained weights from.

1. ``--from-accuracy reports/accuracy/results.json`` (default when it exists): the checkpoints the accuracy
   benchmark trained (same data, same budget), for every bundle it trained;
2. otherwise each bundle's own ``models/model.pt`` (variant from ``models/vlseg_checkpoint.json`` when present,
   else ``--variant``).
A bundle with neither is reported as skipped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from vlseg.bundles import PAPER, checkpoint_path, find_bundles, read_checkpoint_record

__all__ = ["TrainedModel", "trained_models", "start_trained_benchmark"]


@dataclass
class TrainedModel:
    name: str
    root: Path | None
    variant: str
    checkpoint: Path | None
    source: str
    note: str = ""

    @property
    def variant_arg(self) -> str | None:
        return None if self.variant in (PAPER, "", None) else self.variant


def trained_models(bundles_dir: Path, names=None, from_accuracy: Path | None = None, variant: str = "small",
                   include_baseline: bool = False) -> list[TrainedModel]:
    bundles = {b.name: b for b in find_bundles(bundles_dir, names)}
    out: list[TrainedModel] = []
    acc = {}
    if from_accuracy is not None and Path(from_accuracy).is_file():
        res = json.loads(Path(from_accuracy).read_text())
        for m in res.get("models", []):
            if m.get("checkpoint") and Path(m["checkpoint"]).is_file() and m.get("fraction", 100) == 100:
                acc[m["name"]] = m
        if include_baseline and "monai_basicunet" in acc:
            m = acc["monai_basicunet"]
            out.append(TrainedModel("monai_basicunet", None, "default", Path(m["checkpoint"]),
                                    f"accuracy benchmark ({from_accuracy})"))
    for name, root in bundles.items():
        if name in acc:
            m = acc[name]
            out.append(TrainedModel(name, root, m["variant"], Path(m["checkpoint"]), f"accuracy benchmark ({from_accuracy})"))
            continue
        ckpt = checkpoint_path(root)
        if ckpt.is_file():
            rec = read_checkpoint_record(root)
            v = (rec.get("variant") or PAPER) if rec else variant
            out.append(TrainedModel(name, root, v, ckpt, "bundle models/model.pt"))
        else:
            out.append(TrainedModel(name, root, variant, None, "none",
                                    "no trained checkpoint: run scripts/benchmark_accuracy.py first"))
    return out


def start_trained_benchmark(args):
    """The start of a benchmark that evaluates trained checkpoints on the test split (prompts, uncertainty): torch
    threads (``--threads``), the output folder and the test data (``--datalist``, else the accuracy benchmark's
    datalist from ``--from-accuracy``, else the default; ``--max-test`` items at most). Returns ``(out_dir, data,
    accuracy results)`` (``{}`` without an accuracy ``results.json``)."""
    from vlseg.bench.cli import apply_threads, out_dir
    from vlseg.bench.data import resolve_data

    apply_threads(args.threads)
    out = out_dir(args)
    acc = json.loads(args.from_accuracy.read_text()) if args.from_accuracy and args.from_accuracy.is_file() else {}
    dl = args.datalist or ((acc.get("data") or {}).get("datalist") if acc else None)
    data = resolve_data(dl, quick=args.quick, limits={"test": args.max_test} if args.max_test else None)
    return out, data, acc
