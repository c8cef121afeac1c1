"""Build a bundle's network, preprocessing, tokenizer and inferer from its own configs (``monai.bundle``).

Finding bundles, their variant files and importing their ``scripts`` package is :mod:`vlseg.bundles` (shared with
the MONAI Label app support). The paper configuration is ``configs/inference.json`` alone; a variant (``small``,
``tiny``) adds ``configs/<variant>.json`` on top.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vlseg.bundles import bundle_context, load_parser, variant_label

__all__ = ["BundleModel", "load_bundle_model", "find_transform"]


def find_transform(transform, cls_name: str):
    """First transform of class name ``cls_name`` inside a (nested) MONAI ``Compose``; None when absent."""
    if transform is None:
        return None
    if type(transform).__name__ == cls_name:
        return transform
    for t in getattr(transform, "transforms", ()) or ():
        found = find_transform(t, cls_name)
        if found is not None:
            return found
    return None


def _spatial_size(preprocessing) -> tuple[int, int] | None:
    for name in ("Resized", "ResizeWithPadOrCropd", "Resize"):
        t = find_transform(preprocessing, name)
        if t is not None:
            size = getattr(getattr(t, "resizer", t), "spatial_size", None) or getattr(t, "spatial_size", None)
            if size is None and hasattr(t, "padcropper"):
                size = getattr(t.padcropper, "spatial_size", None)
            if isinstance(size, (int, float)):  # ``size_mode="longest"``: the longest side, padded to a square
                size = (int(size), int(size))
            if size is not None:
                size = tuple(int(s) for s in size)
                if len(size) == 2 and all(s > 0 for s in size):
                    return size
    return None


@dataclass
class BundleModel:
    """What the benchmarks need from one bundle at one variant."""

    name: str
    root: Path
    variant: str
    network: torch.nn.Module
    parser: Any
    preprocessing: Any = None
    inferer: Any = None
    tokenizer: Any = None
    input_size: tuple[int, int] = (224, 224)
    num_samples: int = 1

    @property
    def label(self) -> str:
        return f"{self.name} ({self.variant})"

    def tokenize(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.tokenizer(list(texts))

    def load_checkpoint(self, path: Path) -> None:
        state = torch.load(str(path), map_location="cpu", weights_only=False)
        for k in ("state_dict", "model", "network"):
            if isinstance(state, dict) and k in state and isinstance(state[k], dict):
                state = state[k]
        state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
        self.network.load_state_dict(state, strict=True)


def _get(parser, key: str, default=None):
    try:
        return parser.get_parsed_content(key) if key in parser else default
    except Exception as e:  # noqa: BLE001 - a broken optional key must not stop the benchmark
        logging.getLogger("vlseg.bench").warning("could not parse %r: %s", key, e)
        return default


def load_bundle_model(bundle_root: Path, variant: str | None = None, overrides: Mapping[str, Any] | None = None,
                      with_preprocessing: bool = True, checkpoint: Path | None = None,
                      random_init: bool = True) -> BundleModel:
    """Build ``network_def`` (and, when asked, ``preprocessing`` / ``inferer`` / the tokenizer) from the bundle's configs.

    ``random_init``: the benchmarks measure architectures without pretrained files, so ``require_pretrained`` is
    set false (explicitly, as the configs ask) unless ``overrides`` says otherwise."""
    from vlseg.text.tokenizers import build_tokenizer

    bundle_root = Path(bundle_root).resolve()
    with bundle_context(bundle_root):
        parser = load_parser(bundle_root, variant, overrides=overrides)
        if random_init and "require_pretrained" in parser and "require_pretrained" not in (overrides or {}):
            parser["require_pretrained"] = False
        network = parser.get_parsed_content("network_def", instantiate=True)
        preprocessing = _get(parser, "preprocessing") if with_preprocessing else None
        inferer = _get(parser, "inferer") if with_preprocessing else None
    tok_t = find_transform(preprocessing, "TokenizeTextd")
    tokenizer = getattr(tok_t, "tokenizer", None)
    if tokenizer is None:
        with bundle_context(bundle_root):
            spec = _get(parser, "tokenizer") if "tokenizer" in parser else None
        spec = spec if isinstance(spec, str) and spec else "minilm"
        tokenizer = build_tokenizer(spec, int(parser.get("text_max_length", parser.get("max_length", 24)) or 24))
    size = _spatial_size(preprocessing) or (224, 224)
    num_samples = int(getattr(inferer, "num_samples", None) or parser.get("num_samples", 1) or 1) if inferer is not None \
        else int(parser.get("num_samples", 1) or 1)
    model = BundleModel(bundle_root.name, bundle_root, variant_label(variant), network, parser, preprocessing, inferer,
                        tokenizer, size, num_samples)
    if checkpoint is not None:
        model.load_checkpoint(checkpoint)
    network.eval()
    return model
