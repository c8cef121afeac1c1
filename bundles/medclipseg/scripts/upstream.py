"""The MedCLIPSeg authors' released checkpoints -> this bundle's network state dict, strictly.

The authors' training script saves ``{"model": CustomCLIP.state_dict(), "optimizer": ..., "scheduler": ..., ...}``
(HealthX-Lab/MedCLIPSeg ``train.py``; released as ``<Dataset>[_<pct>]/trained_models/seed<seed>/
MedCLIPSeg_unimedclip_ViT-B-16_latest.pth`` on huggingface.co/TahaKoleilat/MedCLIPSeg). Its tensors, for the
UniMedCLIP backbone that every released file uses (``trainers/medclipseg_unimedclip.py``):

==========================================  =====================================================================
upstream name                               this bundle
==========================================  =====================================================================
``vision_model.<open_clip ViT names>``      ``clip.visual.<same>``
``text_model.transformer.<BertModel>``      ``clip.text.transformer.<same>`` (Hugging Face BERT, no pooler)
``text_model.proj.{0,2}.weight``            ``clip.text.proj.{0,2}.weight`` (MLP 768 -> 640 -> 512)
``logit_scale``                             ``clip.logit_scale`` (kept; unused by segmentation)
``pvl_adapters.<i>.proj_vis_down.0.weight`` ``pvl_adapters.<i>.proj_vis_down.weight`` (``nn.Sequential`` upstream)
``pvl_adapters.<i>.<other names>``          same names
``mask_head.*``, ``upscale.*``              same names
``text_model.transformer.embeddings.``      dropped: a buffer (0..511) that older transformers versions saved
``position_ids``                            with the weights; recomputed, not a weight
==========================================  =====================================================================

Every other name is an error (:func:`convert_upstream_state` reports it). The network must be built in the
UniMedCLIP layout (``configs/unimedclip.json``) with ``adapter_layers`` 1-10, ``adapter_dim`` 256 and
``num_upscale`` 2 (the released ``configs/*.yaml``); and the released weights were trained on BGR input with
ImageNet statistics, so run them with ``bgr_imagenet_compat: true``.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

import torch
from torch import nn

from vlseg.weights import WeightsTarget, load_pretrained, read_state_dict

from .backbone import FETCH

__all__ = ["UPSTREAM_DROPPED", "ConversionReport", "convert_upstream_state", "load_upstream_checkpoint"]

logger = logging.getLogger("vlseg.medclipseg")

#: upstream names with no counterpart here, and why
UPSTREAM_DROPPED = {
    r"^text_model\.transformer\.embeddings\.position_ids$": "position-id buffer saved by older transformers "
                                                           "versions (0..max_positions-1), recomputed here",
}
_PREFIXES = (("vision_model.", "clip.visual."), ("text_model.", "clip.text."))
_VIS_DOWN = re.compile(r"^(pvl_adapters\.\d+\.proj_vis_down)\.0\.(weight|bias)$")
_SAME = re.compile(r"^(pvl_adapters|mask_head|upscale)\.")


@dataclass
class ConversionReport:
    """What :func:`convert_upstream_state` did: ``converted`` (count), ``dropped`` ({name: why}), ``unknown``
    (upstream names it has no rule for: the file is not in the authors' layout)."""

    converted: int = 0
    dropped: dict[str, str] = field(default_factory=dict)
    unknown: list[str] = field(default_factory=list)

    def describe(self) -> str:
        parts = [f"{self.converted} tensors mapped"]
        if self.dropped:
            parts.append(f"{len(self.dropped)} dropped (" + "; ".join(f"{k}: {v}" for k, v in self.dropped.items()) + ")")
        if self.unknown:
            parts.append(f"{len(self.unknown)} without a rule (e.g. {', '.join(self.unknown[:5])})")
        return ", ".join(parts)


def _map_name(name: str) -> str | None:
    name = name.removeprefix("module.")
    for old, new in _PREFIXES:
        if name.startswith(old):
            return new + name[len(old):]
    if name == "logit_scale":
        return "clip.logit_scale"
    m = _VIS_DOWN.match(name)
    if m:
        return f"{m.group(1)}.{m.group(2)}"
    if _SAME.match(name):
        return name
    return None


def convert_upstream_state(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], ConversionReport]:
    """Map a ``CustomCLIP.state_dict()`` of the authors' code (already un-nested from ``"model"``) onto this
    bundle's ``MedCLIPSeg`` names. Returns ``(state, report)``; names without a rule are listed in the report and
    left out, so a strict load then fails on them (never a silent partial load)."""
    out, report = {}, ConversionReport()
    for name, value in state.items():
        why = next((w for pat, w in UPSTREAM_DROPPED.items() if re.search(pat, name)), None)
        if why is not None:
            report.dropped[name] = why
            continue
        new = _map_name(name)
        if new is None:
            report.unknown.append(name)
            out[f"<unmapped>{name}"] = value  # kept under a name no network has: the strict load reports it
            continue
        out[new] = value
        report.converted += 1
    return out, report


def _key_map(state: dict) -> dict:
    converted, report = convert_upstream_state(state)
    logger.info("MedCLIPSeg released checkpoint: %s", report.describe())
    return converted


def load_upstream_checkpoint(network: nn.Module, path=None, require: bool = True) -> nn.Module:
    """Load an authors' released checkpoint into ``network`` strictly (config key ``upstream_checkpoint``); returns
    the network. ``path`` None or empty: the network unchanged (the key is off). A file that is missing or does not
    fit every tensor of the network raises :class:`vlseg.weights.PretrainedWeightsError` (``require``)."""
    if not path:
        return network
    target = WeightsTarget("MedCLIPSeg released checkpoint", "upstream_checkpoint", FETCH)
    load_pretrained(network, path, target, require, key_map=_key_map)
    return network


def converted_checkpoint(path) -> tuple[dict[str, torch.Tensor], ConversionReport]:
    """Read a released file (``{"model": ...}``) and convert it (used by ``scripts/convert_upstream.py``)."""
    return convert_upstream_state(read_state_dict(path))
