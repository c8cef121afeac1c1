"""The UA-VLS network: ConvNeXt image encoder (eq. 1), frozen BERT text encoder (eq. 2), three MoDAB decoder
stages (eq. 3-21) and the sub-pixel head (eq. 22-25).

Calling convention shared by all vlseg bundles::

    logits = UAVLS(...)(image [B,3,H,W], text_ids [B,L], text_mask [B,L])   # -> [B, 1, H, W]

``H`` and ``W`` must be multiples of 32 (ConvNeXt's output stride); the paper uses 224.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from monai.networks.blocks import SubpixelUpsample, UnetOutBlock, UnetrUpBlock
from torch import nn

from scripts.convnext_weights import convnext_key_map
from scripts.modab import MoDAB
from vlseg.nets.common import as_token_tensor, freeze
from vlseg.nets.feature_cache import FeatureCacheMixin, TensorLRU, cached_rows
from vlseg.text.encoders import build_text_encoder
from vlseg.text.vocab import check_tokenizer_matches
from vlseg.weights import WeightsTarget, as_flag, fetch_command, load_pretrained, missing_weights

__all__ = ["ImageEncoder", "TextEncoder", "DecoderStage", "SubpixelHead", "UAVLS"]

logger = logging.getLogger("vlseg")

BUNDLE = "uavls"


class ImageEncoder(nn.Module):
    """Eq. 1: ``I'_i = V_e(I)``, the four stages of a timm ConvNeXt, trainable.

    The full timm classification model is built (never downloaded) and ``weights`` -- a local ImageNet checkpoint
    in timm's, Hugging Face transformers' or the original Facebook layout (:mod:`scripts.convnext_weights`) -- is
    loaded into it STRICTLY with :func:`vlseg.weights.load_pretrained`; then timm's ``FeatureListNet`` keeps the
    stem and the four stages (the same modules and names as ``timm.create_model(..., features_only=True)``; the
    ImageNet head is dropped). ``require`` (the configs' ``require_pretrained``): a missing or non-fitting file
    stops the build with :class:`vlseg.weights.PretrainedWeightsError` naming ``config_key`` and ``fetch``;
    otherwise one warning and random weights. ``kwargs`` go to ``timm.create_model`` (e.g. ``dims``/``depths``
    for the narrow demo variants).
    """

    def __init__(self, name: str = "convnext_tiny", weights: str | None = None, require: bool = False,
                 config_key: str = "image_weights", fetch: str | None = None, **kwargs):
        super().__init__()
        import timm
        from timm.models import FeatureListNet

        model = timm.create_model(name, pretrained=False, **kwargs)
        target = WeightsTarget(f"UA-VLS image encoder ({name})", config_key, fetch or fetch_command(BUNDLE))
        key_map = convnext_key_map(model) if isinstance(model, timm.models.convnext.ConvNeXt) else None
        self.pretrained = load_pretrained(model, weights, target, require, key_map=key_map)
        stages = len(model.feature_info)
        if stages != 4:
            raise ValueError(f"{name} gives {stages} feature stages; UA-VLS needs 4")
        self.body = FeatureListNet(model, out_indices=tuple(range(stages)), flatten_sequential=True)
        self.channels = list(self.body.feature_info.channels())

    def forward(self, image: torch.Tensor) -> list[torch.Tensor]:
        return self.body(image)


class TextEncoder(nn.Module):
    """Eq. 2: ``T' = T_e(T)``, token states ``[B, N, D]`` of a BERT-style encoder (``vlseg.text``).

    Frozen unless ``trainable``; while frozen it stays in eval mode, runs without autograd and its dropout
    probabilities are set to 0, so Monte-Carlo dropout never perturbs it. A frozen encoder is a fixed function
    of the token ids, so its outputs are memoised per prompt in a :class:`vlseg.nets.feature_cache.TensorLRU`
    (at most ``cache_size`` prompts and ``cache_mb`` MiB; either 0 switches it off): the same numbers, computed once
    per distinct prompt instead of once per batch. Keys hold the weights' version, and the memo is cleared whenever
    the weights or the device change (``load_state_dict``, ``.to()``).

    ``weights`` / ``require`` / ``config_key`` / ``fetch``: CXR-BERT's local file (upstream ``bert.*`` layout, loaded
    strictly by :func:`vlseg.text.encoders.build_text_encoder`; see :func:`vlseg.weights.load_pretrained`).
    """

    def __init__(self, spec: str = "cxr-bert", weights: str | None = None, trainable: bool = False,
                 config_overrides: dict | None = None, cache_size: int = 2048, require: bool = False,
                 config_key: str = "text_weights", fetch: str | None = None, cache_mb: float = 128.0):
        super().__init__()
        self.encoder = build_text_encoder(spec, weights=weights, config_overrides=config_overrides, require=require,
                                          config_key=config_key, fetch=fetch or fetch_command(BUNDLE))
        self.spec = spec
        self.pretrained = bool(self.encoder.pretrained)
        self.hidden_size = int(self.encoder.hidden_size)
        # ``trainable`` (the configs' ``train_encoders``) only applies to an encoder WITHOUT pretrained weights:
        # fine-tuning a pretrained encoder is not what the paper does, and a random frozen one helps nobody.
        self.trainable = bool(trainable) and not self.pretrained
        if trainable and self.pretrained:
            logger.info("text encoder %s has pretrained weights: it stays frozen (train_encoders ignored)", spec)
        self.cache_size = int(cache_size)
        self._cache = TensorLRU(cache_mb, max_entries=self.cache_size, name="uavls text states")
        freeze(self.encoder, frozen=not self.trainable)
        if not self.trainable:
            for m in self.encoder.modules():
                if isinstance(m, nn.Dropout):
                    m.p = 0.0
            self.encoder.eval()
        self.register_load_state_dict_pre_hook(TextEncoder._clear_cache)

    @staticmethod
    def _clear_cache(module, *args, **kwargs) -> None:
        module._cache.clear()  # new weights invalidate the memo

    def train(self, mode: bool = True):
        super().train(mode)
        if not self.trainable:
            self.encoder.eval()
        return self

    def _apply(self, fn, *args, **kwargs):
        self._cache.clear()  # device / dtype changes invalidate the memo
        return super()._apply(fn, *args, **kwargs)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if mask is None:
            mask = torch.ones_like(ids)
        if self.trainable:
            return self.encoder(ids, mask)
        with torch.no_grad():  # one row per prompt: (ids, mask) stacked
            return cached_rows(self._cache, "text", lambda im: self.encoder(im[:, 0], im[:, 1]),
                               torch.stack([ids, mask.to(ids.dtype)], dim=1), self.encoder)


class DecoderStage(nn.Module):
    """One decoder stage: MoDAB fusion on the coarse map (eq. 3-12), then MONAI ``UnetrUpBlock``:
    2x2 stride-2 transposed convolution (eq. 20), concatenation with the encoder skip and the convolutional
    refinement block -- two conv3x3 + BatchNorm + LeakyReLU (eq. 21)."""

    def __init__(self, in_channels: int, out_channels: int, text_dim: int, in_tokens: int, out_tokens: int,
                 **modab_kwargs):
        super().__init__()
        self.modab = MoDAB(in_channels, text_dim=text_dim, in_tokens=in_tokens, out_tokens=out_tokens, **modab_kwargs)
        self.up = UnetrUpBlock(2, in_channels, out_channels, kernel_size=3, upsample_kernel_size=2, norm_name="BATCH")

    def forward(self, x: torch.Tensor, skip: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return self.up(self.modab(x, text), skip)


class SubpixelHead(nn.Module):
    """Eq. 22-25: MONAI ``SubpixelUpsample`` (conv3x3 -> pixel shuffle x r (eq. 22-23) -> replication pad +
    r x r average pooling (eq. 24)) and ``UnetOutBlock`` (1x1 conv to the output channels, eq. 25)."""

    def __init__(self, in_channels: int, mid_channels: int = 24, out_channels: int = 1, scale: int = 4):
        super().__init__()
        self.subpixel = SubpixelUpsample(2, in_channels, mid_channels, scale_factor=scale, apply_pad_pool=True)
        self.out = UnetOutBlock(2, mid_channels, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.subpixel(x))


class UAVLS(FeatureCacheMixin, nn.Module):
    """UA-VLS (Das et al., WACV 2026): text-prompted binary segmentation, ``(image, ids, mask) -> logits``.

    Args:
        image_encoder / image_encoder_kwargs / image_weights: timm model name (``convnext_tiny``), extra
            ``timm.create_model`` arguments, local ImageNet checkpoint (see :class:`ImageEncoder`).
        text_encoder / text_weights / text_encoder_overrides: ``vlseg.text.build_text_encoder`` spec
            (``"cxr-bert"`` = paper, ``"minilm"`` = pretrained offline choice), local weights, config overrides.
        tokenizer: the tokenizer spec the data pipeline uses (``None``: the text encoder's own). It is checked
            against the vocabulary the text encoder was trained with (:func:`vlseg.text.vocab.check_tokenizer_matches`):
            another vocabulary raises :class:`vlseg.text.vocab.TokenizerMismatchError` here, at build time.
        require_pretrained: a missing or non-fitting ``image_weights`` / ``text_weights`` file stops the build with
            :class:`vlseg.weights.PretrainedWeightsError` (the paper configs); ``False`` = random weights on purpose,
            one warning per part.
        train_text_encoder: let the otherwise frozen text encoder train; honoured only when it has no pretrained
            weights (the bundle contract's ``train_encoders`` switch).
        text_tokens: N, tokens per prompt (24). decoder_tokens: SSMix output tokens per stage (24, 12, 9).
        num_heads, attn_drop, proj_drop, cross_attn_drop, alpha_init, qk_norm: MoDAB settings.
        ssmix: SSMix keyword arguments (d_state, d_conv, expand, use_kernel, delta_bias_twice, ...).
        subpixel_channels: channels after pixel shuffle (24). out_channels: 1 (foreground logit).
        feature_cache_mb: MiB for the image encoder's outputs (eq. 1), cached per image content and weights
            version (:mod:`vlseg.nets.feature_cache`) and served only while the encoder is deterministic (eval mode,
            no autograd): a second prompt on the same image, or the 2nd..S-th Monte-Carlo dropout pass, reuses
            them. 0 = off (the training configs). text_cache_mb: MiB for the frozen text states memo (per prompt).
    """

    def __init__(self, image_encoder: str = "convnext_tiny", image_encoder_kwargs: dict | None = None,
                 image_weights: str | None = None, text_encoder: str = "cxr-bert", text_weights: str | None = None,
                 text_encoder_overrides: dict | None = None, tokenizer: str | None = None,
                 require_pretrained: bool = False, train_text_encoder: bool = False, text_tokens: int = 24,
                 decoder_tokens=(24, 12, 9), num_heads: int = 4, attn_drop: float = 0.1, proj_drop: float = 0.1,
                 cross_attn_drop: float = 0.1, alpha_init: float = 1.421, qk_norm: bool = True,
                 ssmix: dict | None = None, subpixel_channels: int = 24, out_channels: int = 1,
                 feature_cache_mb: float = 0.0, text_cache_mb: float = 128.0):
        super().__init__()
        self.init_feature_cache(feature_cache_mb, name="uavls image features")
        require = as_flag(require_pretrained)
        fetch = fetch_command(BUNDLE)
        checks = [(image_weights, f"UA-VLS image encoder ({image_encoder})", "image_weights")]
        if text_encoder == "cxr-bert":  # MiniLM's weights ship with its package
            checks.append((text_weights, "CXR-BERT text encoder", "text_weights"))
        for path, what, key in checks if require else ():  # fail before building anything large
            if not path or not Path(str(path)).expanduser().exists():
                missing_weights(path, WeightsTarget(what, key, fetch), require=True)
        self.image_encoder = ImageEncoder(image_encoder, image_weights, require=require, fetch=fetch,
                                          **(image_encoder_kwargs or {}))
        self.text_encoder = TextEncoder(text_encoder, text_weights, train_text_encoder, text_encoder_overrides,
                                        require=require, fetch=fetch, cache_mb=text_cache_mb)
        check_tokenizer_matches(tokenizer or text_encoder, self.text_encoder.encoder.vocab_fingerprint, text_encoder)
        self.text_tokens = int(text_tokens)
        ch = self.image_encoder.channels  # e.g. [96, 192, 384, 768]
        toks = [self.text_tokens] + [int(t) for t in decoder_tokens]
        if len(toks) != 4:
            raise ValueError(f"decoder_tokens needs 3 entries, got {decoder_tokens}")
        mk = dict(num_heads=num_heads, attn_drop=attn_drop, proj_drop=proj_drop, cross_attn_drop=cross_attn_drop,
                  alpha_init=alpha_init, qk_norm=qk_norm, ssmix=ssmix)
        d = self.text_encoder.hidden_size
        self.decoders = nn.ModuleList(
            [DecoderStage(ch[3 - m], ch[2 - m], d, toks[0], toks[m + 1], **mk) for m in range(3)]
        )
        scale = self.image_encoder.body.feature_info.reduction()[0]
        self.head = SubpixelHead(ch[0], subpixel_channels, out_channels, scale=scale)

    def encode_text(self, text_ids, text_mask=None, batch_size: int | None = None, device=None) -> torch.Tensor:
        ids = as_token_tensor(text_ids, device)
        mask = as_token_tensor(text_mask, device) if text_mask is not None else torch.ones_like(ids)
        if ids.shape[1] != self.text_tokens:
            raise ValueError(f"UA-VLS expects {self.text_tokens} text tokens per prompt, got {ids.shape[1]}")
        if batch_size is not None and ids.shape[0] == 1 and batch_size > 1:
            ids, mask = ids.expand(batch_size, -1), mask.expand(batch_size, -1)
        return self.text_encoder(ids, mask)  # eq. 2

    def forward(self, image: torch.Tensor, text_ids=None, text_mask=None) -> torch.Tensor:
        if text_ids is None:
            raise ValueError("UA-VLS needs a text prompt (token ids); an empty prompt is not defined by the method")
        if image.shape[-1] % 32 or image.shape[-2] % 32:
            raise ValueError(f"image size {tuple(image.shape[-2:])} must be a multiple of 32")
        feats = cached_rows(self.feature_cache, "image", self.image_encoder, image, self.image_encoder)  # eq. 1
        text = self.encode_text(text_ids, text_mask, image.shape[0], image.device).to(feats[0].dtype)
        x = feats[3]
        for m, stage in enumerate(self.decoders):
            x = stage(x, feats[2 - m], text)  # eq. 3-21
        return self.head(x)  # eq. 22-25
