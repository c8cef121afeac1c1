"""MONAI dictionary transforms shared by all bundles and the app.

Pipeline shape used by every bundle (see each ``configs/*.json``)::

    LoadImaged(image, label) -> EnsureChannelFirstd -> EnsureRGBd(image) -> BinarizeLabeld(label)
    -> SelectPromptd(text) -> TokenizeTextd(text) -> Resized / normalisation (bundle-specific)

After it a batch holds ``image [B,3,H,W]``, ``label [B,1,H,W]``, ``text_ids [B,L]``, ``text_mask [B,L]`` and the
raw ``text`` strings; ``PrepareBatchExtraInput(extra_keys=["text_ids", "text_mask"])`` feeds the token tensors to
``network(image, text_ids, text_mask)``.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform

from vlseg.text.prompts import PromptError, validate_prompt
from vlseg.text.tokenizers import TextTokenizer, build_tokenizer

__all__ = ["EnsureRGBd", "BinarizeLabeld", "SelectPromptd", "TokenizeTextd", "SplitPredUncertaintyd", "ImageInputError"]


class ImageInputError(ValueError):
    """An image that cannot be segmented (wrong channels, empty, non-finite ...); message is user-facing."""


def _as_tensor(x) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))


class EnsureRGBd(MapTransform):
    """Channel-first image -> 3 channels in [0, 255] float32.

    Grey (1) is repeated, grey+alpha (2) and RGBA (4) drop alpha; 16-bit or other ranges above 255 are rescaled
    by their dtype's range (uint16) or by the image maximum. Non-finite values, empty images and other channel
    counts raise :class:`ImageInputError`.
    """

    def __init__(self, keys: KeysCollection = "image", allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            t = _as_tensor(img)
            if t.ndim != 3:
                raise ImageInputError(f"'{key}' must be a 2D image with channels first, got shape {tuple(t.shape)}")
            c, h, w = t.shape
            if h < 2 or w < 2:
                raise ImageInputError(f"'{key}' is too small ({h}x{w} pixels)")
            was_uint16 = t.dtype in (torch.uint16, torch.int32) or (t.dtype == torch.int16)
            t = t.float()
            if not torch.isfinite(t).all():
                raise ImageInputError(f"'{key}' has NaN or infinite values")
            if c in (2, 4):
                t = t[: c - 1]
                c -= 1
            if c == 1:
                t = t.repeat(3, 1, 1)
            elif c != 3:
                raise ImageInputError(f"'{key}' has {c} channels; expected 1 (grey), 3 (RGB) or 4 (RGBA)")
            vmax = float(t.max())
            if vmax > 255.0:
                t = t * (255.0 / (65535.0 if was_uint16 and vmax <= 65535 else vmax))
            if hasattr(img, "copy_meta_from") or hasattr(img, "meta"):
                from monai.data import MetaTensor

                t = MetaTensor(t, meta=getattr(img, "meta", None), applied_operations=getattr(img, "applied_operations", None))
            d[key] = t
        return d


class BinarizeLabeld(MapTransform):
    """Binarise a loaded mask to one float32 channel of {0, 1}.

    Input ``[C, H, W(, D)]`` (channel first, e.g. after ``EnsureChannelFirstd``) or ``[H, W]``. Several
    channels (an RGB JPEG mask) are reduced with ``reduction`` (``"mean"`` or ``"max"``) over ``channel_dim``.
    Then ``> threshold`` when the mask's maximum is > 1 (0..255 masks, JPEG noise included), else
    ``> unit_threshold`` (masks already in [0, 1]). Output: ``[1, H, W(, D)]`` float32, same array type
    (numpy / torch / MetaTensor, metadata kept).
    """

    def __init__(
        self,
        keys: KeysCollection = "label",
        threshold: float = 127,
        unit_threshold: float = 0.5,
        reduction: str = "mean",
        channel_dim: int = 0,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if reduction not in ("mean", "max"):
            raise ValueError(f"reduction must be 'mean' or 'max', got {reduction!r}")
        self.threshold, self.unit_threshold = float(threshold), float(unit_threshold)
        self.reduction, self.channel_dim = reduction, channel_dim

    def binarize(self, x: Any) -> Any:
        """Binarise one array (numpy, torch tensor or MetaTensor)."""
        if isinstance(x, torch.Tensor):
            x = x.float()
            if x.ndim == 2:
                x = x.unsqueeze(0)
            else:
                cd = self.channel_dim
                x = x.mean(dim=cd, keepdim=True) if self.reduction == "mean" else x.amax(dim=cd, keepdim=True)
                x = x.movedim(cd, 0)
            thr = self.threshold if x.numel() and float(x.max()) > 1 else self.unit_threshold
            return (x > thr).to(torch.float32)
        x = np.asarray(x, dtype=np.float32)
        if x.ndim == 2:
            x = x[None]
        else:
            cd = self.channel_dim
            x = x.mean(axis=cd, keepdims=True) if self.reduction == "mean" else x.max(axis=cd, keepdims=True)
            x = np.moveaxis(x, cd, 0)
        thr = self.threshold if x.size and float(x.max()) > 1 else self.unit_threshold
        return (x > thr).astype(np.float32)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.binarize(d[key])
        return d


class SelectPromptd(MapTransform):
    """Choose and validate the prompt.

    Order: ``override`` (a ``text`` given on the command line / by the app) -> ``data["prompts"][prompt_key]`` ->
    ``data[key]`` -> ``default``. Raises :class:`vlseg.text.PromptError` for unusable prompts.
    """

    def __init__(self, keys: KeysCollection = "text", prompt_key: str | None = None, override: str | None = None,
                 default: str | None = None, max_chars: int | None = None, allow_missing_keys: bool = True):
        super().__init__(keys, allow_missing_keys)
        self.prompt_key = prompt_key or None
        self.override = override or None
        self.default = default
        self.max_chars = max_chars

    def __call__(self, data):
        d = dict(data)
        for key in self.keys:
            text = self.override
            if text is None and self.prompt_key is not None:
                prompts = d.get("prompts") or {}
                if self.prompt_key not in prompts:
                    raise PromptError(f"prompt variant {self.prompt_key!r} not in this item (has {sorted(prompts)})")
                text = prompts[self.prompt_key]
            if text is None:
                text = d.get(key)
            if text is None:
                text = self.default
            d[key] = validate_prompt(text, max_chars=self.max_chars)
        return d


class TokenizeTextd(MapTransform):
    """``data[text]`` -> ``data["text_ids"]``, ``data["text_mask"]`` (1-D long tensors of ``max_length``)."""

    def __init__(self, keys: KeysCollection = "text", tokenizer: TextTokenizer | str = "minilm", max_length: int = 24,
                 ids_key: str = "text_ids", mask_key: str = "text_mask"):
        super().__init__(keys)
        self.tokenizer = build_tokenizer(tokenizer, max_length) if isinstance(tokenizer, str) else tokenizer
        self.ids_key, self.mask_key = ids_key, mask_key

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            ids, mask = self.tokenizer([d[key]])
            d[self.ids_key], d[self.mask_key] = ids[0], mask[0]
        return d


class SplitPredUncertaintyd(MapTransform):
    """Split the inferer's output into ``pred`` (mean probability) and ``uncertainty`` (1 channel each); the
    decomposed 4-channel output (``StochasticTextInferer(decompose=True)``) also gives ``map_keys`` (by default
    ``mutual_information`` and ``std``, :data:`vlseg.uncertainty.EXTRA_MAP_NAMES`)."""

    def __init__(self, keys: KeysCollection = "pred", uncertainty_key: str = "uncertainty",
                 map_keys: Sequence[str] = ("mutual_information", "std")):
        super().__init__(keys)
        self.uncertainty_key = uncertainty_key
        self.map_keys = tuple(map_keys)

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            out = d[key]
            if out.shape[0] not in (2, 2 + len(self.map_keys)):
                raise ValueError(f"expected 2 channels (probability, uncertainty) or {2 + len(self.map_keys)} (also "
                                 f"{', '.join(self.map_keys)}) in '{key}', got {out.shape[0]}")
            d[key], d[self.uncertainty_key] = out[0:1], out[1:2]
            if out.shape[0] > 2:
                for i, name in enumerate(self.map_keys):
                    d[name] = out[2 + i:3 + i]
        return d
