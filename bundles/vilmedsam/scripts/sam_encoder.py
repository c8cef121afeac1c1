"""SAM image encoder (``segment_anything.modeling.ImageEncoderViT``) with LoRA on the q and v projections.

Paper Eq. (1c): ``F_IS = Phi_img(I)``: the SAM ViT image encoder gives pixel features ``[B, 256, 64, 64]`` for a
1024 x 1024 input. Following SAMed (and the public code), a rank-4 LoRA bypass is added to the query and value
parts of every block's fused ``qkv`` projection; everything else in the encoder stays frozen.

Presets ``vit_b`` / ``vit_l`` / ``vit_h`` use exactly the hyper-parameters of ``segment_anything.build_sam``;
``overrides`` change any of them (the ``small`` / ``tiny`` variants use narrower, shallower encoders at a smaller
input). Pretrained weights (the official ``sam_vit_*.pth``) are loaded from a LOCAL file only; for a different
input size their absolute and relative position embeddings are resized (bicubic / linear interpolation).
"""

from __future__ import annotations

import logging
import math
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger("vlseg.vilmedsam")

__all__ = ["SAM_PRESETS", "SAM_URLS", "LoRAQV", "build_sam_image_encoder", "apply_lora", "load_sam_encoder_weights"]

#: Hyper-parameters of ``segment_anything.build_sam._build_sam`` for each registry entry.
SAM_PRESETS = {
    "vit_b": dict(embed_dim=768, depth=12, num_heads=12, global_attn_indexes=(2, 5, 8, 11)),
    "vit_l": dict(embed_dim=1024, depth=24, num_heads=16, global_attn_indexes=(5, 11, 17, 23)),
    "vit_h": dict(embed_dim=1280, depth=32, num_heads=16, global_attn_indexes=(7, 15, 23, 31)),
}
SAM_URLS = {
    "vit_b": "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth",
    "vit_l": "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_l_0b3195.pth",
    "vit_h": "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth",
}
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


def load_sam_encoder_weights(encoder: nn.Module, path: str | None, variant: str) -> bool:
    """Load the ``image_encoder.*`` tensors of an official SAM checkpoint (LOCAL file) into ``encoder``.

    Position embeddings are resized when the input size differs; LoRA keys are left as initialised. Returns True
    when weights were loaded; otherwise logs one warning naming the file and where to fetch it.
    """
    if not path or not Path(path).is_file():
        logger.warning(
            "SAM %s image encoder: weights file %r not found -> RANDOM weights. Fetch %s into models/ "
            "(see large_files.yml: `python -m monai.bundle download` does not cover it; use e.g. "
            "`wget -P models %s`) and set sam_checkpoint.",
            variant, path, SAM_URLS.get(variant, "?"), SAM_URLS.get(variant, "?"),
        )
        return False
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    enc_state = {k[len("image_encoder."):]: v for k, v in state.items() if k.startswith("image_encoder.")}
    if not enc_state:  # a bare encoder state dict
        enc_state = dict(state)
    own = encoder.state_dict()
    mapped = {}
    for k, v in enc_state.items():
        # LoRA wraps qkv: blocks.i.attn.qkv.weight -> blocks.i.attn.qkv.qkv.weight
        tk = k.replace(".attn.qkv.", ".attn.qkv.qkv.") if k.replace(".attn.qkv.", ".attn.qkv.qkv.") in own else k
        if tk not in own:
            continue
        if tk == "pos_embed":
            v = _resize_pos_embed(v, tuple(own[tk].shape[1:3]))
        elif tk.endswith(("rel_pos_h", "rel_pos_w")):
            v = _resize_rel_pos(v, own[tk].shape[0])
        if v.shape != own[tk].shape:
            raise ValueError(f"SAM weights {path}: {tk} has shape {tuple(v.shape)}, encoder expects "
                             f"{tuple(own[tk].shape)} (wrong sam_variant / overrides?)")
        mapped[tk] = v
    missing, unexpected = encoder.load_state_dict(mapped, strict=False)
    missing = [k for k in missing if ".lora_" not in k]
    if missing:
        raise ValueError(f"SAM weights {path}: {len(missing)} encoder tensors missing, e.g. {missing[:3]}")
    logger.info("SAM %s image encoder: loaded %d tensors from %s", variant, len(mapped), path)
    return True
