"""Loading the trained models the evaluation benchmarks compare (bundles from their configs + the baseline)."""

from __future__ import annotations

from pathlib import Path

from vlseg.bench.bundles import BundleModel, load_bundle_model
from vlseg.bench.trained import TrainedModel

__all__ = ["load_trained"]


def load_trained(tm: TrainedModel, size=None) -> BundleModel:
    if tm.name == "monai_basicunet" and tm.root is None:
        from vlseg.bench.baseline import basicunet_model

        return basicunet_model(tm.checkpoint, size=size or (224, 224))
    return load_bundle_model(Path(tm.root), tm.variant_arg, checkpoint=tm.checkpoint)
