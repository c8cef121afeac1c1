"""Simple-ViLMedSAM network: LoRA-SAM image encoder + CLIP/M2IB Implicit Position Prompter + BID decoder.

Calling convention (project-wide)::

    logits = net(image, text_ids, text_mask)      # image [B, 3, H, W] in 0..255, ids/mask [B, L] -> [B, 1, H, W]

In training mode the network returns ``{"logits": ..., "align_loss": ...}`` (``align_loss`` only in the small / tiny
variants, see :mod:`scripts.alignment`). ``m2ib_map`` (``[B, 1, gh, gw]``, optional) is a precomputed M2IB map at the
CLIP grid: training computes it on the UN-augmented image and transforms it with the image
(:class:`scripts.augment.M2IBAugmentBatch`), so it is cached across epochs.
``sample_probabilities`` runs the encoders and the M2IB map once and the decoder ``num_samples`` times with
Monte-Carlo dropout (the paper has no uncertainty; the dropout layers are this project's addition).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from vlseg.inferers import mc_dropout
from vlseg.nets.common import as_token_tensor, count_parameters, freeze, trainable_parameters
from vlseg.nets.feature_cache import FeatureCacheMixin, cached_rows

from vlseg.weights import missing_weights

from .alignment import AlignmentHead, alignment_loss
from .checkpointing import PretrainedAwareState
from .clip import CLIPTowers, build_clip, check_clip_tokenizer, required_clip_files
from .decoder import BidirectionalInteractionDecoder, affinity_refine
from .m2ib import M2IBPrompter, resize_minmax
from .sam_encoder import (SAM_PIXEL_MEAN, SAM_PIXEL_STD, LoRAQV, apply_lora, build_sam_image_encoder, load_sam_weights,
                          sam_weights_target)

logger = logging.getLogger("vlseg.vilmedsam")

__all__ = ["SimpleViLMedSAM"]


class SimpleViLMedSAM(FeatureCacheMixin, PretrainedAwareState, nn.Module):
    """See the module docstring and ``docs/README.md``.

    Args:
        sam_variant: ``vit_b`` | ``vit_l`` | ``vit_h`` (paper: ``vit_h``).
        sam_checkpoint: local official SAM checkpoint (``sam_vit_h_4b8939.pth`` ...), loaded strictly.
        require_pretrained: a missing or non-fitting SAM / CLIP weights file stops the build
            (:class:`vlseg.weights.PretrainedWeightsError`); ``False``: one warning each and random weights.
        sam_image_size: SAM input side (paper 1024 -> 64 x 64 features).
        sam_overrides: ``ImageEncoderViT`` arguments replacing the preset's (small / tiny variants).
        lora_rank: LoRA rank on q and v of every block (paper 4); 0 disables LoRA.
        clip_model / clip_pretrained / clip_cfg / clip_config / clip_text_config: see :func:`scripts.clip.build_clip`.
        tokenizer: the config's tokenizer spec, checked against the CLIP text tower (None: not checked).
        m2ib_*: M2IB settings (public code: layer 7, beta 2, sigma 1, 10 Adam steps at lr 1, 1 noise sample per
            step, map from the last forward pass; see :func:`scripts.m2ib.m2ib_capacity`).
        m2ib_cache_size / m2ib_cache_mb / m2ib_cache_dir: in-memory LRU bounds of the M2IB maps (entries, MiB; either
            0 switches it off) and an optional on-disk cache folder; keys hold a fingerprint of the CLIP weights.
        feature_cache_mb: MiB for the SAM image embedding, CLIP's vision tokens at the M2IB layer (both per image
            content) and CLIP's text embedding (per prompt), keyed by the weights' version and served only while the
            part is deterministic (eval mode, no autograd; :mod:`vlseg.nets.feature_cache`): a second prompt on the
            same image skips SAM. 0 = off (the training configs).
        affinity_scale / affinity_mean_factor: 3.0 and 1.2 of the refinement (public code).
        decoder_heads / decoder_mlp_dim / attention_downsample / decoder_mode: BID settings (8, 2048, 2, ``code``:
            the public code that produced the published numbers; ``paper``: the paper's Eq. 7-8).
        dropout: decoder dropout probability (MC-dropout uncertainty; not in the paper).
        train_encoders: ``False`` (paper: SAM frozen except LoRA, CLIP frozen), ``True`` (both trainable) or
            ``"auto"`` (an encoder whose pretrained weights were NOT loaded becomes trainable).
        align: compute the auxiliary region-text alignment loss while the CLIP towers train (small variant).
    """

    def __init__(self, sam_variant: str = "vit_h", sam_checkpoint: str | None = None, sam_image_size: int = 1024,
                 sam_overrides: dict | None = None, lora_rank: int = 4, clip_model: str = "ViT-B-16-quickgelu",
                 clip_pretrained: str | None = None, clip_cfg: dict | None = None, clip_config: str | None = None,
                 clip_text_config: str | None = None, tokenizer: str | None = None, require_pretrained: bool = False,
                 m2ib_layer: int = 7, m2ib_beta: float = 2.0, m2ib_noise_var: float | None = None,
                 m2ib_steps: int = 10, m2ib_lr: float = 1.0, m2ib_samples: int = 1, m2ib_map_from: str = "last_forward",
                 m2ib_cache_size: int = 4096, m2ib_cache_dir: str | None = None, m2ib_cache_mb: float = 64.0,
                 feature_cache_mb: float = 0.0, affinity_scale: float = 3.0,
                 affinity_mean_factor: float = 1.2, decoder_heads: int = 8, decoder_mlp_dim: int = 2048,
                 attention_downsample: int = 2, decoder_mode: str = "code", dropout: float = 0.1,
                 train_encoders: bool | str = False, align: bool = False):
        super().__init__()
        if train_encoders not in (True, False, "auto"):
            raise ValueError(f"train_encoders must be true, false or 'auto', got {train_encoders!r}")
        require = bool(require_pretrained)
        self.init_feature_cache(feature_cache_mb, name="vilmedsam features")
        if require:  # fail fast, before building a 600 M-parameter encoder
            clip_files = required_clip_files(clip_model, clip_pretrained, clip_config, clip_text_config)
            for path, target in [(sam_checkpoint, sam_weights_target(sam_variant))] + clip_files:
                if not path or not Path(str(path)).exists():
                    missing_weights(path, target, require=True)
        # --- SAM image encoder (Eq. 1c) + LoRA
        self.sam_image_size = int(sam_image_size)
        self.sam_encoder = build_sam_image_encoder(sam_variant, self.sam_image_size, sam_overrides)
        self.lora_rank = int(lora_rank)
        if self.lora_rank > 0:
            apply_lora(self.sam_encoder, self.lora_rank)
        sam_loaded = load_sam_weights(self.sam_encoder, sam_checkpoint, sam_variant, require)
        patch = int(self.sam_encoder.patch_embed.proj.kernel_size[0])
        self.grid = (self.sam_image_size // patch, self.sam_image_size // patch)
        dim = int(self.sam_encoder.neck[0].out_channels)
        self.register_buffer("sam_mean", torch.tensor(SAM_PIXEL_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("sam_std", torch.tensor(SAM_PIXEL_STD).view(1, 3, 1, 1), persistent=False)
        # --- CLIP (Eq. 1a, 1b) + M2IB (Eq. 2-3)
        clip_model_obj, clip_loaded = build_clip(clip_model, clip_pretrained, clip_cfg, require, clip_config,
                                                 clip_text_config)
        check_clip_tokenizer(clip_model_obj, tokenizer, clip_text_config)
        self.clip = CLIPTowers(clip_model_obj)
        self.prompter = M2IBPrompter(self.clip, layer=m2ib_layer, beta=m2ib_beta, noise_var=m2ib_noise_var,
                                     steps=m2ib_steps, lr=m2ib_lr, n_samples=m2ib_samples, map_from=m2ib_map_from,
                                     cache_size=m2ib_cache_size, cache_dir=m2ib_cache_dir, cache_mb=m2ib_cache_mb,
                                     feature_cache=self.feature_cache)
        self.affinity_scale = float(affinity_scale)
        self.affinity_mean_factor = float(affinity_mean_factor)
        # --- BID decoder (Eq. 6-9)
        self.decoder = BidirectionalInteractionDecoder(dim, decoder_heads, decoder_mlp_dim, self.grid,
                                                       attention_downsample, dropout, decoder_mode)
        # --- what trains
        sam_trainable = train_encoders is True or (train_encoders == "auto" and not sam_loaded)
        clip_trainable = train_encoders is True or (train_encoders == "auto" and not clip_loaded)
        freeze(self.sam_encoder, not sam_trainable)
        for p in self.lora_parameters():
            p.requires_grad_(True)
        freeze(self.clip, not clip_trainable)
        self.align = bool(align) and clip_trainable
        self.align_head = AlignmentHead() if self.align else None
        self.last_alignment_accuracy = float("nan")
        # --- what checkpoints leave out: frozen tensors that come from the pretrained files (PretrainedAwareState)
        if sam_loaded:
            self.mark_from_files("sam_encoder.", (k for k in self.sam_encoder.state_dict() if ".lora_" not in k))
        if clip_loaded:
            self.mark_from_files("clip.model.", clip_model_obj.state_dict())
        self.mode_info = {
            "sam_weights_loaded": bool(sam_loaded), "clip_weights_loaded": bool(clip_loaded),
            "sam_encoder_trainable": bool(sam_trainable), "clip_trainable": bool(clip_trainable),
            "train_encoders": train_encoders, "alignment_loss": self.align,
        }
        if not sam_loaded or not clip_loaded:
            logger.warning("Simple-ViLMedSAM mode: %s%s", self.mode_info,
                           "" if (sam_trainable and clip_trainable) else
                           " -- random frozen encoders are useless; set train_encoders 'auto' to train them")
        else:
            logger.info("Simple-ViLMedSAM mode: %s", self.mode_info)

    # ------------------------------------------------------------------ parameters
    def lora_parameters(self) -> list[nn.Parameter]:
        return [p for m in self.sam_encoder.modules() if isinstance(m, LoRAQV)
                for n, p in m.named_parameters() if n.startswith("lora_")]

    def param_groups(self, lora_lr: float = 2e-4, decoder_lr: float = 1e-4, encoder_lr: float = 1e-4) -> list[dict]:
        """AdamW parameter groups of the TRAINABLE parameters only: LoRA (paper lr 2e-4), decoder (1e-4) and,
        when ``train_encoders`` unfroze them, the encoders (``encoder_lr``)."""
        lora = [p for p in self.lora_parameters() if p.requires_grad]
        lora_ids = {id(p) for p in lora}
        dec = [p for p in self.decoder.parameters() if p.requires_grad]
        dec_ids = {id(p) for p in dec}
        enc = [p for p in trainable_parameters(self) if id(p) not in lora_ids and id(p) not in dec_ids]
        groups = [{"params": lora, "lr": float(lora_lr), "name": "lora"},
                  {"params": dec, "lr": float(decoder_lr), "name": "decoder"}]
        if enc:
            groups.append({"params": enc, "lr": float(encoder_lr), "name": "encoders"})
        return [g for g in groups if g["params"]]

    def parameter_report(self) -> dict:
        lora = sum(p.numel() for p in self.lora_parameters())
        dec = sum(p.numel() for p in self.decoder.parameters())
        return {**count_parameters(self), "lora": int(lora), "decoder": int(dec), "lora_plus_decoder": int(lora + dec),
                "sam_encoder": int(sum(p.numel() for p in self.sam_encoder.parameters()) - lora),
                "clip": int(sum(p.numel() for p in self.clip.parameters())), "mode": dict(self.mode_info),
                "checkpoint_tensors": len(self.state_dict())}

    # ------------------------------------------------------------------ pieces
    def _text_ids(self, text_ids, device) -> torch.Tensor:
        ids = as_token_tensor(text_ids, device)
        ctx = self.clip.context_length or ids.shape[1]
        if ids.shape[1] > ctx:
            ids = ids[:, :ctx]
        elif ids.shape[1] < ctx:
            ids = F.pad(ids, (0, ctx - ids.shape[1]))
        return ids

    def sam_features(self, image: torch.Tensor) -> torch.Tensor:
        """Eq. 1c, SAM's image embedding of ``image`` (0..255); cached per image while the encoder is deterministic."""
        return cached_rows(self.feature_cache, "sam", self._sam_features, image, self.sam_encoder)

    def _sam_features(self, image: torch.Tensor) -> torch.Tensor:
        x = image.float()
        if tuple(x.shape[-2:]) != (self.sam_image_size, self.sam_image_size):
            x = F.interpolate(x, size=(self.sam_image_size, self.sam_image_size), mode="bilinear", align_corners=False)
        return self.sam_encoder((x - self.sam_mean) / self.sam_std)

    def position_maps(self, sam_feats: torch.Tensor, init_map: torch.Tensor) -> torch.Tensor:
        """``[A_init, A_f]`` at the SAM feature grid (decoder input)."""
        refined = affinity_refine(sam_feats, init_map, self.affinity_scale, self.affinity_mean_factor)
        return torch.cat([init_map, refined], dim=1)

    def clip_trains(self) -> bool:
        return any(p.requires_grad for p in self.clip.parameters())

    @torch.no_grad()
    def m2ib_grid_map(self, image: torch.Tensor, text_ids) -> torch.Tensor:
        """The (cached) M2IB map ``[B, 1, gh, gw]`` at the CLIP patch grid for ``image`` (0..255) and the prompt."""
        ids = self._text_ids(text_ids, image.device)
        return self.prompter.grid_saliency(self.clip.preprocess(image), ids)

    def _encode(self, image, text_ids, align_target=None, m2ib_map=None):
        ids = self._text_ids(text_ids, image.device)
        feats = self.sam_features(image)
        train_clip = self.training and self.clip_trains()
        align_loss = None
        if train_clip:  # joint mode: the map follows the CLIP being trained (no cache, no precomputed map)
            pix = self.clip.preprocess(image)
            tokens = self.clip.tokens_at(pix, self.prompter.layer)
            text_emb = self.clip.encode_text(ids)
            grid_map = self.prompter.grid_saliency(pix, ids, tokens, text_emb, use_cache=False)
            if self.align and align_target is not None:
                align_loss = alignment_loss(self, tokens, text_emb, align_target)
        elif m2ib_map is not None:
            grid_map = m2ib_map
        else:
            grid_map = self.prompter.grid_saliency(self.clip.preprocess(image), ids)
        init = resize_minmax(grid_map.to(feats.device, feats.dtype), feats.shape[-2:])
        return feats, self.position_maps(feats, init), align_loss

    def _decode(self, feats, maps, size):
        logits = self.decoder(feats, maps)
        if tuple(logits.shape[-2:]) != tuple(size):
            logits = F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)
        return logits

    # ------------------------------------------------------------------ API
    def forward(self, image: torch.Tensor, text_ids=None, text_mask=None, align_target=None, m2ib_map=None):
        """``text_mask`` is accepted for the shared calling convention; open_clip pools at the end-of-text token."""
        if text_ids is None:
            raise ValueError("Simple-ViLMedSAM needs a text prompt (token ids)")
        feats, maps, align_loss = self._encode(image, text_ids, align_target, m2ib_map)
        logits = self._decode(feats, maps, image.shape[-2:])
        if self.training:
            out = {"logits": logits}
            if align_loss is not None:
                out["align_loss"] = align_loss
            return out
        return logits

    @torch.no_grad()
    def sample_probabilities(self, image, text_ids=None, text_mask=None, num_samples: int = 1) -> torch.Tensor:
        """``[S, B, 1, H, W]``: encoders and M2IB once, the decoder ``num_samples`` times (MC dropout when > 1)."""
        was_training = self.training
        self.eval()
        try:
            feats, maps, _ = self._encode(image, text_ids)
            if num_samples == 1:
                return torch.sigmoid(self._decode(feats, maps, image.shape[-2:]))[None]
            with mc_dropout(self.decoder):
                return torch.stack([torch.sigmoid(self._decode(feats, maps, image.shape[-2:]))
                                    for _ in range(int(num_samples))])
        finally:
            self.train(was_training)

    @torch.no_grad()
    def attribution_maps(self, image, text_ids) -> torch.Tensor:
        """``[B, 2, h, w]``: the initial M2IB map and its affinity refinement (for inspection / figures)."""
        feats, maps, _ = self._encode(image, text_ids)
        return maps
