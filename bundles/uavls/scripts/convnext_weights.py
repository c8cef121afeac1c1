"""ImageNet ConvNeXt checkpoints -> the names of timm's ConvNeXt classification model (eq. 1's encoder ``V_e``).

Three published layouts of the same weights, told apart by their names:

* timm (``timm/convnext_tiny.fb_in1k``, ``model.safetensors``; the file ``large_files.yml`` fetches): already timm's
  names, used as they are.
* Hugging Face transformers (``facebook/convnext-tiny-224``, the public UA-VLS code's ``vision_type``):
  ``convnext.embeddings.*``, ``convnext.encoder.stages.<i>.layers.<j>.*``, ``convnext.layernorm.*``,
  ``classifier.*``; renamed by :func:`hf_to_timm`.
* The original Facebook release (``convnext_tiny_1k_224_ema.pth``: ``downsample_layers.*``, ``stages.<i>.<j>.*``):
  renamed by timm's own ``convnext.checkpoint_filter_fn``.

The result is then loaded STRICTLY (:func:`vlseg.weights.load_pretrained`) into the full classification model,
so every tensor of the file, the ImageNet head included, must fit.
"""

from __future__ import annotations

import re

__all__ = ["hf_to_timm", "convnext_key_map"]

_HF_RULES = (
    (r"^convnext\.embeddings\.patch_embeddings\.", "stem.0."),
    (r"^convnext\.embeddings\.layernorm\.", "stem.1."),
    (r"^convnext\.encoder\.stages\.(\d+)\.downsampling_layer\.(\d+)\.", r"stages.\1.downsample.\2."),
    (r"^convnext\.encoder\.stages\.(\d+)\.layers\.(\d+)\.layer_scale_parameter$", r"stages.\1.blocks.\2.gamma"),
    (r"^convnext\.encoder\.stages\.(\d+)\.layers\.(\d+)\.dwconv\.", r"stages.\1.blocks.\2.conv_dw."),
    (r"^convnext\.encoder\.stages\.(\d+)\.layers\.(\d+)\.layernorm\.", r"stages.\1.blocks.\2.norm."),
    (r"^convnext\.encoder\.stages\.(\d+)\.layers\.(\d+)\.pwconv1\.", r"stages.\1.blocks.\2.mlp.fc1."),
    (r"^convnext\.encoder\.stages\.(\d+)\.layers\.(\d+)\.pwconv2\.", r"stages.\1.blocks.\2.mlp.fc2."),
    (r"^convnext\.layernorm\.", "head.norm."),
    (r"^classifier\.", "head.fc."),
)


def hf_to_timm(state: dict) -> dict:
    """Rename a transformers ``ConvNextForImageClassification`` state dict to timm's ``ConvNeXt`` names.

    Names no rule matches are kept as they are, so the strict comparison that follows reports them."""
    out = {}
    for key, value in state.items():
        new = key
        for pattern, repl in _HF_RULES:
            new, n = re.subn(pattern, repl, key)
            if n:
                break
        out[new] = value
    return out


def convnext_key_map(model):
    """``key_map`` for :func:`vlseg.weights.load_pretrained` that accepts the three layouts of the module docstring
    for the timm ConvNeXt ``model``."""
    from timm.models.convnext import checkpoint_filter_fn

    def key_map(state: dict) -> dict:
        if any(k.startswith("convnext.") for k in state):
            return hf_to_timm(state)
        if "head.norm.weight" in state or "norm_pre.weight" in state:
            return state  # timm layout
        return checkpoint_filter_fn(state, model)  # original Facebook layout

    return key_map
