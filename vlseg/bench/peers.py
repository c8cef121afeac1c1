"""Peer models measured next to the bundles, wrapped in the bundles' calling convention.

``network(image [B,3,H,W], text_ids [B,L], text_mask [B,L]) -> [B,1,H,W]`` (text-blind peers ignore the text).
Random weights throughout: these are for timing and size, not accuracy (except BasicUNet, which the accuracy
benchmark trains as the text-blind baseline).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

__all__ = ["PEERS", "build_peer", "peer_tokenizer_spec", "MONAI_UNET_KW"]

#: The MONAI UNet configuration used everywhere in the benchmarks (the model-zoo's spleen UNet, in 2D).
MONAI_UNET_KW = dict(spatial_dims=2, in_channels=3, out_channels=1, channels=(16, 32, 64, 128, 256), strides=(2, 2, 2, 2),
                     num_res_units=2)


class _TextBlind(nn.Module):
    def __init__(self, net: nn.Module, description: str):
        super().__init__()
        self.net = net
        self.description = description

    def forward(self, image, text_ids=None, text_mask=None):
        return self.net(image)


class CLIPSegPeer(nn.Module):
    """Hugging Face ``CLIPSegForImageSegmentation`` with the default ``CLIPSegConfig`` (ViT-B/32 at 224, reduce_dim 64)."""

    description = "HF transformers CLIPSeg, default CLIPSegConfig: ViT-B/32 vision + CLIP text, reduce_dim 64 (random weights)"

    def __init__(self):
        super().__init__()
        from transformers import CLIPSegConfig, CLIPSegForImageSegmentation

        self.net = CLIPSegForImageSegmentation(CLIPSegConfig())

    def forward(self, image, text_ids, text_mask=None):
        out = self.net(input_ids=text_ids, pixel_values=image, attention_mask=text_mask, interpolate_pos_encoding=True)
        logits = out.logits
        b = image.shape[0]
        logits = logits.reshape(b, 1, *logits.shape[-2:])
        if logits.shape[-2:] != image.shape[-2:]:
            logits = torch.nn.functional.interpolate(logits, size=image.shape[-2:], mode="bilinear", align_corners=False)
        return logits


class SAMEncoderPeer(nn.Module):
    """``segment_anything``'s ViT-B image encoder (the encoder of SAM ``vit_b``) at ``img_size``."""

    def __init__(self, img_size: int = 1024):
        super().__init__()
        from functools import partial

        from segment_anything.modeling import ImageEncoderViT

        # the vit_b settings of segment_anything.build_sam
        self.net = ImageEncoderViT(
            depth=12, embed_dim=768, img_size=img_size, mlp_ratio=4, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            num_heads=12, patch_size=16, qkv_bias=True, use_rel_pos=True, global_attn_indexes=(2, 5, 8, 11),
            window_size=14, out_chans=256,
        )
        self.img_size = img_size
        self.description = f"segment_anything ViT-B image encoder at {img_size}x{img_size} (random weights)"

    def forward(self, image, text_ids=None, text_mask=None):
        return self.net(image)


def _unet() -> nn.Module:
    from monai.networks.nets import UNet

    return _TextBlind(UNet(**MONAI_UNET_KW), "MONAI UNet 2D, channels 16-256, 2 residual units")


def _basicunet() -> nn.Module:
    from monai.networks.nets import BasicUNet

    return _TextBlind(BasicUNet(spatial_dims=2, in_channels=3, out_channels=1), "MONAI BasicUNet 2D, default features")


def _swinunetr() -> nn.Module:
    from monai.networks.nets import SwinUNETR

    return _TextBlind(SwinUNETR(in_channels=3, out_channels=1, spatial_dims=2, feature_size=24),
                      "MONAI SwinUNETR 2D, feature size 24")


#: name -> (builder, native input size or None for "same as the bundles", needs text)
PEERS: dict[str, tuple[Callable[[], nn.Module], int | None, bool]] = {
    "clipseg": (CLIPSegPeer, None, True),
    "monai_unet": (_unet, None, False),
    "monai_basicunet": (_basicunet, None, False),
    "monai_swinunetr": (_swinunetr, None, False),
    "sam_vit_b_encoder": (lambda: SAMEncoderPeer(1024), 1024, False),
    "sam_vit_b_encoder_224": (lambda: SAMEncoderPeer(224), None, False),
}


def build_peer(name: str) -> nn.Module:
    if name not in PEERS:
        raise KeyError(f"unknown peer {name!r}; choose from {sorted(PEERS)}")
    return PEERS[name][0]()


def peer_tokenizer_spec(name: str) -> str | None:
    """CLIPSeg reads CLIP BPE ids (vocabulary 49408); the text-blind peers get any ids."""
    return "open_clip:ViT-B-16" if name == "clipseg" else None
