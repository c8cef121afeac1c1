"""SAM image encoder (``segment_anything.modeling.ImageEncoderViT``) with LoRA on the q and v projections.

Paper Eq. (1c): ``F_IS = Phi_img(I)``: the SAM ViT image encoder gives pixel features ``[B, 256, 64, 64]`` for a
1024 x 1024 input. Following SAMed (and the public code), a rank-4 LoRA bypass is added to the query and value
parts of every block's fused ``qkv`` projection; everything else in the encoder stays frozen.

Presets ``vit_b`` / ``vit_l`` / ``vit_h`` use exactly the hyper-parameters of ``segment_anything.build_sam``;
``overrides`` change any of them (the ``small`` / ``tiny`` variants use narrower, shallower encoders at a smaller
input). Pretrained weights (the official ``sam_vit_*.pth``) are loaded strictly from a LOCAL file only
(:func:`load_sam_weights`); for a different input size their absolute and relative position embeddings are resized
(bicubic / linear interpolation).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from vlseg.weights import WeightsTarget, fetch_command, load_pretrained

__all__ = ["SAM_PRESETS", "SAM_URLS", "SAM_FILES", "SAM_IGNORE", "LORA_OPTIONAL", "LoRAQV", "build_sam_image_encoder",
           "apply_lora", "sam_key_map", "sam_weights_target", "load_sam_weights"]

#: Hyper-parameters of ``segment_anything.build_sam._build_sam`` for each registry entry.
SAM_PRESETS = {
    "vit_b": dict(embed_dim=768, depth=12, num_heads=12, global_attn_indexes=(2, 5, 8, 11)),
    "vit_l": dict(embed_dim=1024, depth=24, num_heads=16, global_attn_indexes=(5, 11, 17, 23)),
    "vit_h": dict(embed_dim=1280, depth=32, num_heads=16, global_attn_indexes=(7, 15, 23, 31)),
}
#: official checkpoint file names (``large_files.yml`` puts them under ``models/``) and their URLs
SAM_FILES = {"vit_b": "sam_vit_b_01ec64.pth", "vit_l": "sam_vit_l_0b3195.pth", "vit_h": "sam_vit_h_4b8939.pth"}
SAM_URLS = {k: f"https://dl.fbaipublicfiles.com/segment_anything/{v}" for k, v in SAM_FILES.items()}
#: upstream tensors this network has no use for (SAM's prompt encoder and mask decoder), ignored by name
SAM_IGNORE = (r"^prompt_encoder\.", r"^mask_decoder\.")
#: LoRA tensors: no upstream file has them (they start as B = 0, i.e. the plain SAM encoder)
LORA_OPTIONAL = (r"\.lora_[ab]_[qv]\.weight$",)
#: SAM's own pixel normalisation (``Sam.pixel_mean`` / ``Sam.pixel_std``), on a 0..255 scale.
SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)


class LoRAQV(nn.Module):
    """Fused ``qkv`` linear layer plus low-rank updates of its query and value outputs.

    ``qkv(x) + [B_q A_q x, 0, B_v A_v x]``; ``A`` is Kaiming-uniform initialised, ``B`` zero-initialised, so the
    wrapped layer starts exactly equal to the original one.
    """

    def __init__(self, qkv: nn.Linear, rank: int = 4):
        super().__init__()
        self.qkv = qkv
        self.dim = qkv.in_features
        self.rank = int(rank)
        self.lora_a_q = nn.Linear(self.dim, self.rank, bias=False)
        self.lora_b_q = nn.Linear(self.rank, self.dim, bias=False)
        self.lora_a_v = nn.Linear(self.dim, self.rank, bias=False)
        self.lora_b_v = nn.Linear(self.rank, self.dim, bias=False)
        for a in (self.lora_a_q, self.lora_a_v):
            nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))
        for b in (self.lora_b_q, self.lora_b_v):
            nn.init.zeros_(b.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.qkv(x)
        dq = self.lora_b_q(self.lora_a_q(x))
        dv = self.lora_b_v(self.lora_a_v(x))
        zeros = torch.zeros_like(dq)
        return out + torch.cat([dq, zeros, dv], dim=-1)


def apply_lora(encoder: nn.Module, rank: int = 4) -> list[nn.Parameter]:
    """Replace ``blocks[i].attn.qkv`` of every block by :class:`LoRAQV`; returns the new LoRA parameters."""
    params: list[nn.Parameter] = []
    for blk in encoder.blocks:
        if isinstance(blk.attn.qkv, LoRAQV):
            raise RuntimeError("LoRA already applied")
        blk.attn.qkv = LoRAQV(blk.attn.qkv, rank)
        params += [p for n, p in blk.attn.qkv.named_parameters() if n.startswith("lora_")]
    return params


def build_sam_image_encoder(variant: str = "vit_h", img_size: int = 1024, overrides: dict | None = None) -> nn.Module:
    """``ImageEncoderViT`` configured like ``sam_model_registry[variant]`` (``out_chans`` 256, window 14,
    relative positions), with ``overrides`` applied (e.g. ``embed_dim``, ``depth``, ``num_heads``,
    ``patch_size``, ``window_size``, ``global_attn_indexes``, ``out_chans``)."""
    from segment_anything.modeling import ImageEncoderViT

    if variant not in SAM_PRESETS:
        raise ValueError(f"unknown SAM variant {variant!r}; choose one of {sorted(SAM_PRESETS)}")
    cfg = dict(
        img_size=int(img_size),
        patch_size=16,
        mlp_ratio=4.0,
        out_chans=256,
        qkv_bias=True,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        use_rel_pos=True,
        window_size=14,
        **SAM_PRESETS[variant],
    )
    for k, v in (overrides or {}).items():
        cfg[k] = tuple(v) if k == "global_attn_indexes" else v
    return ImageEncoderViT(**cfg)


def _resize_pos_embed(pe: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """``[1, H, W, C]`` absolute position embedding resized (bicubic) to ``grid``."""
    if tuple(pe.shape[1:3]) == tuple(grid):
        return pe
    out = F.interpolate(pe.permute(0, 3, 1, 2).float(), size=grid, mode="bicubic", align_corners=False)
    return out.permute(0, 2, 3, 1).to(pe.dtype)


def _resize_rel_pos(rel: torch.Tensor, length: int) -> torch.Tensor:
    """``[2 S - 1, C]`` relative position table resized (linear) to ``length`` rows."""
    if rel.shape[0] == length:
        return rel
    out = F.interpolate(rel.t()[None].float(), size=length, mode="linear", align_corners=False)
    return out[0].t().to(rel.dtype)


def sam_key_map(expected: Mapping[str, torch.Tensor]) -> Callable[[dict], dict]:
    """File names of an official ``sam_vit_*.pth`` -> this encoder's names (``expected``: its ``state_dict()``,
    meta tensors allowed).

    ``image_encoder.`` is stripped; ``blocks.i.attn.qkv.*`` becomes ``blocks.i.attn.qkv.qkv.*`` when LoRA wraps the
    projection; the absolute (bicubic) and relative (linear) position embeddings are resized to the encoder's input
    size. Every other name (``prompt_encoder.*``, ``mask_decoder.*``) is kept, for the loader to ignore explicitly.
    """

    def key_map(state: dict) -> dict:
        out = {}
        for k, v in state.items():
            if not k.startswith("image_encoder."):
                out[k] = v
                continue
            name = k[len("image_encoder."):]
            wrapped = name.replace(".attn.qkv.", ".attn.qkv.qkv.")
            if wrapped in expected:
                name = wrapped
            if name == "pos_embed" and name in expected:
                v = _resize_pos_embed(v, tuple(expected[name].shape[1:3]))
            elif name.endswith(("rel_pos_h", "rel_pos_w")) and name in expected and v.shape[1:] == expected[name].shape[1:]:
                v = _resize_rel_pos(v, int(expected[name].shape[0]))
            out[name] = v
        return out

    return key_map


def sam_weights_target(variant: str) -> WeightsTarget:
    return WeightsTarget(f"SAM {variant} image encoder (official sam_vit_*.pth)", "sam_checkpoint",
                         fetch_command("vilmedsam"))


def load_sam_weights(encoder: nn.Module, path, variant: str, require: bool) -> bool:
    """Load the ``image_encoder.*`` tensors of an official SAM checkpoint (LOCAL file) STRICTLY into ``encoder``
    (:func:`vlseg.weights.load_pretrained`): every encoder tensor present with its shape (after
    :func:`sam_key_map`), the LoRA tensors optional (no upstream file has them), the prompt encoder and mask decoder
    ignored by name (``SAM_IGNORE``). ``require`` (config ``require_pretrained``): a missing or non-fitting file stops
    the build; otherwise one warning and random weights. Returns True when loaded."""
    return load_pretrained(encoder, path, sam_weights_target(variant), require,
                           key_map=sam_key_map(encoder.state_dict()), optional=LORA_OPTIONAL, ignore=SAM_IGNORE)
