"""CLIP towers of the Implicit Position Prompter (open_clip), built OFFLINE, with strictly loaded weights.

Paper Eq. (1a, 1b): ``F_T = Psi_text(T)``, ``F_IC = Psi_img(I)`` (CLIP text / image encoders, 224 input).

:func:`build_clip` builds one of three kinds of CLIP and loads its weights through :func:`vlseg.weights.load_pretrained`
(strict; ``require`` is the config's ``require_pretrained``):

* an open_clip architecture name, e.g. ``ViT-B-16-quickgelu`` (the OpenAI ViT-B/16 weights were trained with
  QuickGELU: the plain ``ViT-B-16`` name builds exact GELU, which loads the same tensors but computes another
  function), weights = an open_clip state dict (``open_clip_pytorch_model.bin``);
* ``biomedclip`` (the paper's CLIP): the ``open_clip_config.json`` of the BiomedCLIP Hub repository read from a LOCAL
  folder, with its BERT text tower built from a LOCAL BERT config folder (``text_config``) instead of the Hub name in
  that file, weights = ``open_clip_pytorch_model.bin`` of the same repository;
* ``cfg`` (a dict with ``embed_dim``, ``vision_cfg``, ``text_cfg``): a custom :class:`open_clip.CLIP` (the small / tiny
  variants, normally without weights).

:func:`check_clip_tokenizer` refuses a tokenizer that does not belong to the text tower (BPE towers need an
``open_clip:<BPE model>`` tokenizer; BERT towers an ``hf:<folder>`` tokenizer with the tower's vocabulary).
:class:`CLIPTowers` gives M2IB uniform access to the vision tokens at a layer and to the rest of the tower.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from vlseg.text.vocab import TokenizerMismatchError, check_tokenizer_matches, encoder_vocab_fingerprint
from vlseg.weights import PretrainedWeightsError, WeightsTarget, fetch_command, load_pretrained, missing_weights

__all__ = ["BIOMEDCLIP", "CLIP_IGNORE", "build_clip", "clip_weights_target", "required_clip_files", "biomedclip_model_cfg",
           "check_clip_tokenizer", "CLIPTowers"]

BIOMEDCLIP = "biomedclip"
#: names some released CLIP files carry that current open_clip / transformers modules hold as non-persistent buffers
CLIP_IGNORE = (r"(^|\.)position_ids$",)
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_weights_target(model_name: str) -> WeightsTarget:
    return WeightsTarget(f"CLIP {model_name}", "clip_pretrained", fetch_command("vilmedsam"))


def required_clip_files(model_name: str, pretrained, clip_config=None, text_config=None) -> list[tuple]:
    """``(path, WeightsTarget)`` of every file the CLIP needs from ``models/`` (checked before anything is built)."""
    files = [(pretrained, clip_weights_target(model_name))]
    if model_name == BIOMEDCLIP:
        fetch = fetch_command("vilmedsam")
        files += [(clip_config, WeightsTarget("BiomedCLIP open_clip_config.json", "clip_config", fetch)),
                  (Path(str(text_config)) / "config.json" if text_config else None,
                   WeightsTarget("BiomedCLIP text tower (BERT config.json)", "clip_text_config", fetch))]
    return files


def biomedclip_model_cfg(config_file, text_config) -> dict:
    """``model_cfg`` of BiomedCLIP's ``open_clip_config.json`` with the BERT text tower redirected to the LOCAL
    folder ``text_config`` (a BERT ``config.json``; with its ``vocab.txt`` it is also the tokenizer folder), built
    without pretrained text weights (the whole CLIP file is loaded afterwards)."""
    config_file, text_config = Path(str(config_file)), Path(str(text_config))
    if not config_file.is_file():
        raise PretrainedWeightsError(
            f"BiomedCLIP config {config_file} not found (config key `clip_config`). Fetch it with "
            f"`{fetch_command('vilmedsam')}`.")
    if not (text_config / "config.json").is_file():
        raise PretrainedWeightsError(
            f"BiomedCLIP text tower: no BERT config.json in {text_config} (config key `clip_text_config`).")
    cfg = json.loads(config_file.read_text())
    cfg = dict(cfg.get("model_cfg", cfg))
    text = dict(cfg["text_cfg"])
    text.update(hf_model_name=str(text_config), hf_tokenizer_name=str(text_config), hf_model_pretrained=False)
    cfg["text_cfg"] = text
    return cfg


def build_clip(model_name: str = "ViT-B-16-quickgelu", pretrained=None, cfg: dict | None = None,
               require: bool = False, clip_config=None, text_config=None):
    """Build the CLIP OFFLINE and load ``pretrained`` strictly. Returns ``(model, loaded)``; see the module doc.

    ``clip_config`` / ``text_config``: BiomedCLIP's ``open_clip_config.json`` and the local BERT config folder
    (``model_name == "biomedclip"`` only).
    """
    import open_clip

    target = clip_weights_target(model_name if cfg is None else "(custom clip_cfg)")
    if require and cfg is None:  # fail before building a large tower
        for path, what in required_clip_files(model_name, pretrained, clip_config, text_config):
            if not path or not Path(str(path)).exists():
                missing_weights(path, what, require=True)
    if cfg is not None:
        model = open_clip.CLIP(embed_dim=int(cfg["embed_dim"]), vision_cfg=dict(cfg["vision_cfg"]),
                               text_cfg=dict(cfg["text_cfg"]), quick_gelu=bool(cfg.get("quick_gelu", False)))
    elif model_name == BIOMEDCLIP:
        model = open_clip.CustomTextCLIP(**biomedclip_model_cfg(clip_config, text_config))
    else:
        if model_name not in open_clip.list_models():
            raise ValueError(f"unknown open_clip architecture {model_name!r} (clip_model); use e.g. "
                             f"'ViT-B-16-quickgelu' (OpenAI weights) or '{BIOMEDCLIP}'")
        model = open_clip.create_model(model_name, pretrained=None, device=torch.get_default_device())
    loaded = load_pretrained(model, pretrained, target, require, ignore=CLIP_IGNORE)
    return model, loaded


def _text_tower_kind(model: nn.Module) -> str:
    text = getattr(model, "text", None)
    return "hf" if text is not None and hasattr(text, "transformer") and hasattr(text, "config") else "bpe"


def check_clip_tokenizer(model: nn.Module, tokenizer: str | None, text_config=None) -> None:
    """The tokenizer spec (config ``tokenizer``) must belong to the CLIP text tower; raises
    :class:`TokenizerMismatchError` naming the right spec. ``None`` skips the check (direct Python use)."""
    if tokenizer is None:
        return
    import open_clip

    spec = str(tokenizer)
    if _text_tower_kind(model) == "bpe":
        name = spec[len("open_clip:"):] if spec.startswith("open_clip:") else None
        cfg = open_clip.get_model_config(name) if name else None
        if cfg is None or "hf_tokenizer_name" in cfg.get("text_cfg", {}):
            raise TokenizerMismatchError(
                f"tokenizer {spec!r} does not belong to the CLIP text tower (open_clip BPE vocabulary, "
                f"{getattr(model, 'vocab_size', 49408)} tokens): set `tokenizer` to 'open_clip:ViT-B-16'.")
        return
    if not spec.startswith("hf:"):
        raise TokenizerMismatchError(
            f"tokenizer {spec!r} does not belong to the BERT text tower of BiomedCLIP: set `tokenizer` to "
            f"'hf:{text_config}' (the folder of `clip_text_config`, with the BiomedBERT vocab.txt).")
    check_tokenizer_matches(spec, encoder_vocab_fingerprint(f"hf:{text_config}"), f"hf:{text_config}")


class CLIPTowers(nn.Module):
    """Uniform access to an open_clip model for M2IB: text embedding, vision tokens after block ``l`` and the
    image embedding computed from (possibly bottlenecked) tokens at that layer.

    Supports open_clip's own ``VisionTransformer`` (OpenAI-style CLIP) and ``TimmModel`` towers (BiomedCLIP).
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        visual = model.visual
        if hasattr(visual, "transformer") and hasattr(visual, "_embeds"):
            self.kind = "open_clip"
            self.num_prefix = 1
            grid = visual.grid_size
        elif hasattr(visual, "trunk") and hasattr(visual.trunk, "blocks"):
            self.kind = "timm"
            self.num_prefix = int(getattr(visual.trunk, "num_prefix_tokens", 1))
            grid = visual.trunk.patch_embed.grid_size
        else:
            raise TypeError(f"unsupported CLIP vision tower {type(visual).__name__}")
        self.grid = (int(grid[0]), int(grid[1]))
        size = getattr(visual, "image_size", None) or (self.grid[0] * 16, self.grid[1] * 16)
        self.image_size = (int(size[0]), int(size[1])) if isinstance(size, (tuple, list)) else (int(size), int(size))
        cfg = getattr(visual, "preprocess_cfg", None) or {}
        self.register_buffer("mean", torch.tensor(cfg.get("mean", OPENAI_MEAN)).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg.get("std", OPENAI_STD)).view(1, 3, 1, 1), persistent=False)

    @property
    def blocks(self) -> nn.ModuleList:
        """The vision tower's blocks (a property, not a submodule: the tensors appear once in the state dict)."""
        v = self.model.visual
        return v.transformer.resblocks if self.kind == "open_clip" else v.trunk.blocks

    @property
    def depth(self) -> int:
        return len(self.blocks)

    @property
    def context_length(self) -> int | None:
        pe = getattr(self.model, "positional_embedding", None)
        return int(pe.shape[0]) if pe is not None else None

    def preprocess(self, image: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` in 0..255 -> CLIP input (resized with antialiasing to the tower's size, normalised)."""
        x = image.float() / 255.0
        if tuple(x.shape[-2:]) != self.image_size:
            x = F.interpolate(x, size=self.image_size, mode="bicubic", align_corners=False,
                              antialias=True).clamp(0.0, 1.0)
        return (x - self.mean) / self.std

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(ids)

    def tokens_at(self, pix: torch.Tensor, layer: int) -> torch.Tensor:
        """Token states ``[B, N, C]`` after vision block ``layer`` (0-based; the bottleneck sits there)."""
        v = self.model.visual
        if self.kind == "open_clip":
            x = v._embeds(pix)
        else:
            t = v.trunk
            x = t.norm_pre(t.patch_drop(t._pos_embed(t.patch_embed(pix))))
        for blk in self.blocks[: layer + 1]:
            x = blk(x)
        return x

    def embed_from(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        """Image embedding ``[B, D]`` from token states after block ``layer`` (the rest of the tower + head)."""
        v = self.model.visual
        for blk in self.blocks[layer + 1:]:
            x = blk(x)
        if self.kind == "open_clip":
            pooled, _ = v._pool(x)
            return pooled @ v.proj if v.proj is not None else pooled
        t = v.trunk
        return v.head(t.forward_head(t.norm(x)))

    def patch_embeddings(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        """Per-patch embeddings ``[B, gh * gw, D]`` in the joint space, from token states after block ``layer``
        (the rest of the tower, the final norm and the projection applied to every patch token)."""
        v = self.model.visual
        for blk in self.blocks[layer + 1:]:
            x = blk(x)
        x = x[:, self.num_prefix:]
        if self.kind == "open_clip":
            x = v.ln_post(x)
            return x @ v.proj if v.proj is not None else x
        return v.head(v.trunk.norm(x))
