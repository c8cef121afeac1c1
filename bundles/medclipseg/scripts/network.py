"""MedCLIPSeg network: frozen CLIP encoders run in lock-step with probabilistic vision-language (PVL) adapters.

One concept per file: :mod:`scripts.backbone` builds the open_clip towers and loads their pretrained files strictly,
:mod:`scripts.adapters` holds the PVL adapters and their equations (E1-E4), :mod:`scripts.head` the segmentation
head (E5), :mod:`scripts.sampler` the per-pass noise of the fast sampler, :mod:`scripts.upstream` the converter of
the authors' released checkpoints. This file wires them into the model.

Calling convention (``docs/ARCHITECTURE.md``): ``network(image [B,3,H,W], text_ids [B,L], text_mask [B,L])`` returns
logits ``[B,1,H,W]`` in eval mode and a dict (``logits``, ``patch_mean``, ``text_embed``) in train mode (the extra
terms feed the soft patch-level contrastive loss). :meth:`MedCLIPSeg.sample_probabilities` is the fast sampler used
by :class:`vlseg.inferers.StochasticTextInferer`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from vlseg.nets.common import as_token_tensor, count_parameters, freeze
from vlseg.weights import as_flag, missing_weights

from .adapters import PVLAdapter
from .backbone import (BUNDLE_ROOT, CLIP_TARGET, build_clip_backbone, check_tokenizer, load_clip_weights,
                       load_hf_text_weights)
from .head import ScaleBlock, mask_head_mlp, text_conditioned_logits
from .sampler import SampleNoise, pass_seeds

__all__ = ["MedCLIPSeg", "BUNDLE_ROOT"]

logger = logging.getLogger("vlseg.medclipseg")


class MedCLIPSeg(nn.Module):
    """MedCLIPSeg with any open_clip ViT backbone (OpenAI-style or HF BERT text tower).

    Args:
        clip_model_name: open_clip model config name (``ViT-B-16-quickgelu``: ViT-B/16, 224 px, 197 tokens).
        clip_cfg: dict deep-merged over that config (e.g. ``{"text_cfg": {"hf_model_name": "biomedbert_base",
            "hf_proj_type": "mlp", "hf_pooler_type": "cls_last_hidden_state_pooler", "context_length": 256}}``
            for the UniMedCLIP layout, or a smaller ViT for the demo variants).
        clip_pretrained: local weights file of the whole CLIP model (open_clip or UniMedCLIP format), loaded strictly.
        require_pretrained: a missing or non-fitting pretrained file (``clip_pretrained``; the HF text folder when
            ``text_cfg.hf_model_pretrained``) raises :class:`vlseg.weights.PretrainedWeightsError`; false: random
            weights and one warning (the ``small`` / ``tiny`` variants).
        tokenizer: the config's tokenizer spec; checked against the text tower's vocabulary (None: not checked).
        train_encoders: let the encoders train, but only when no pretrained weights were loaded (bundle contract).
        adapter_layers: blocks that get a PVL adapter in front of them (upstream 1..10; ``[]``: plain CLIP towers).
        adapter_dim, beta, gate_init: adapter width (256), key-uncertainty penalty (2.35), gate init (0).
        num_upscale: number of :class:`ScaleBlock` (2: 14x14 -> 56x56).
        mask_text_padding: ignore padded text tokens as attention keys in the adapters (upstream: False, the adapters
            attend to all tokens); then no padded position can reach the output and the fast sampler drops them.
        max_sample_batch: rows per batched forward in :meth:`sample_probabilities` (memory bound of the fast path).
    """

    def __init__(self, clip_model_name: str = "ViT-B-16-quickgelu", clip_cfg: dict | None = None,
                 clip_pretrained: str | None = None, require_pretrained: bool = False, tokenizer=None,
                 train_encoders: bool = False,
                 adapter_layers: Sequence[int] = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10), adapter_dim: int = 256,
                 beta: float = 2.35, gate_init: float = 0.0, num_upscale: int = 2, mask_text_padding: bool = False,
                 max_sample_batch: int = 64):
        super().__init__()
        require_pretrained = as_flag(require_pretrained)
        if require_pretrained and not (clip_pretrained and Path(str(clip_pretrained)).expanduser().exists()):
            missing_weights(clip_pretrained, CLIP_TARGET, True)  # fail fast, before building the towers
        self.clip, hf = build_clip_backbone(clip_model_name, clip_cfg)
        visual = self.clip.visual
        if not hasattr(visual, "transformer") or not hasattr(visual, "_embeds"):
            raise ValueError(f"{clip_model_name}: only open_clip VisionTransformer image towers are supported")
        self.text_kind = "hf" if hf is not None else "openclip"
        check_tokenizer(tokenizer, clip_model_name, self.clip, hf)
        self.image_size = tuple(int(s) for s in visual.image_size)
        self.patch_size = tuple(int(s) for s in visual.patch_size)
        self.grid_size = tuple(int(s) for s in visual.grid_size)
        vis_dim = int(visual.transformer.width)
        txt_dim = self._text_width()
        self.embed_dim = int(visual.output_dim)
        n_vis, n_txt = len(visual.transformer.resblocks), len(self._text_blocks())
        self.adapter_layers = [int(i) for i in adapter_layers]
        if self.adapter_layers != sorted(set(self.adapter_layers)):
            raise ValueError(f"adapter_layers must be increasing and unique, got {adapter_layers}")
        if self.adapter_layers and not (0 <= self.adapter_layers[0] and self.adapter_layers[-1] < min(n_vis, n_txt)):
            raise ValueError(f"adapter_layers {self.adapter_layers} outside 0..{min(n_vis, n_txt) - 1}")
        self.n_vis_blocks, self.n_txt_blocks = n_vis, n_txt
        self.mask_text_padding = bool(mask_text_padding)
        self.max_sample_batch = int(max_sample_batch)

        self.pvl_adapters = nn.ModuleList(
            [PVLAdapter(vis_dim, txt_dim, adapter_dim, beta, gate_init) for _ in self.adapter_layers])
        self.mask_head = mask_head_mlp(self.embed_dim)
        self.upscale = nn.Sequential(*[ScaleBlock(self.embed_dim) for _ in range(int(num_upscale))])

        self.clip_pretrained = clip_pretrained
        text_loaded = False
        if hf is not None and hf["pretrained"]:  # the folder's own BERT weights (e.g. the small variant's MiniLM)
            text_loaded = load_hf_text_weights(self.clip.text.transformer, hf["dir"], hf["num_layers"],
                                               require_pretrained)
        if clip_pretrained or require_pretrained or not text_loaded:
            self.encoders_pretrained = load_clip_weights(self.clip, clip_pretrained, require_pretrained)
        else:  # a deliberately weight-less image tower next to a pretrained text tower (small variant)
            logger.info("MedCLIPSeg: no CLIP weights file configured: image encoder RANDOM")
            self.encoders_pretrained = False
        self.text_pretrained = self.encoders_pretrained or text_loaded
        self.vision_trainable = bool(train_encoders) and not self.encoders_pretrained
        self.text_trainable = bool(train_encoders) and not self.text_pretrained
        self.encoders_trainable = self.vision_trainable or self.text_trainable
        if train_encoders and (self.encoders_pretrained or text_loaded):
            logger.warning("train_encoders is set but pretrained weights were loaded for %s: those stay FROZEN "
                           "(the switch only applies to randomly initialised encoders)",
                           "both encoders" if self.encoders_pretrained else "the text transformer")
        freeze(self.clip, frozen=True)
        if self.vision_trainable:
            freeze(self.clip.visual, frozen=False)
        if self.text_kind == "hf":
            if self.text_trainable:
                freeze(self.clip.text, frozen=False)
            elif train_encoders and not self.encoders_pretrained:  # pretrained BERT, random CLIP projection head
                freeze(self.clip.text.proj, frozen=False)
        elif self.text_trainable:
            freeze(self.clip, frozen=False)
            freeze(self.clip.visual, frozen=not self.vision_trainable)
        for name in ("logit_scale", "logit_bias"):  # never used by the segmentation model
            p = getattr(self.clip, name, None)
            if isinstance(p, nn.Parameter):
                p.requires_grad_(False)
        logger.info("MedCLIPSeg: %s (%s text tower), image encoder %s/%s, text encoder %s/%s", clip_model_name,
                    self.text_kind, "pretrained" if self.encoders_pretrained else "RANDOM",
                    "trainable" if self.vision_trainable else "frozen",
                    "pretrained" if self.text_pretrained else "RANDOM", "trainable" if self.text_trainable else "frozen")

    def adapter_parameters(self) -> dict[str, int]:
        """Parameter counts of the MedCLIPSeg-specific parts (what upstream trains)."""
        def n(m):
            return sum(p.numel() for p in m.parameters())
        out = {"pvl_adapters": n(self.pvl_adapters), "mask_head": n(self.mask_head), "upscale": n(self.upscale)}
        out["method_total"] = sum(out.values())
        out.update({f"model_{k}": v for k, v in count_parameters(self).items()})
        return out

    # ------------------------------------------------------------------ text tower access
    def _text_tower(self):
        text = getattr(self.clip, "text", None)
        return self.clip if text is None else text

    def _text_blocks(self):
        if self.text_kind == "hf":
            return self.clip.text.transformer.encoder.layer
        return self._text_tower().transformer.resblocks

    def _text_width(self) -> int:
        if self.text_kind == "hf":
            return int(self.clip.text.transformer.config.hidden_size)
        return int(self._text_tower().transformer.width)

    def _text_context(self) -> int:
        if self.text_kind == "hf":
            return int(self.clip.text.transformer.config.max_position_embeddings)
        return int(self._text_tower().positional_embedding.shape[0])

    # ------------------------------------------------------------------ stages
    def _embed(self, image: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> dict:
        """Everything before the first block: patch/token embeddings, masks. Returns the running state."""
        if ids.shape[1] > self._text_context():
            raise ValueError(f"{ids.shape[1]} text tokens but the text tower takes at most {self._text_context()}")
        x_img = self.clip.visual._embeds(image)
        if self.text_kind == "hf":
            bert = self.clip.text.transformer
            x_txt = bert.embeddings(input_ids=ids)
            txt_attn = (1.0 - mask[:, None, None, :].to(x_txt.dtype)) * torch.finfo(x_txt.dtype).min
        else:
            tt = self._text_tower()
            if getattr(tt, "cls_emb", None) is not None:
                raise ValueError("open_clip text towers with an appended CLS embedding (CoCa) are not supported")
            n = ids.shape[1]
            x_txt = tt.token_embedding(ids) + tt.positional_embedding[:n]
            txt_attn = tt.attn_mask[:n, :n] if getattr(tt, "attn_mask", None) is not None else None
        return {"img": x_img, "txt": x_txt, "ids": ids, "mask": mask, "txt_attn": txt_attn}

    def _run_blocks(self, st: dict, start: int, stop: int, noise: SampleNoise | None) -> dict:
        """Lock-step blocks ``start <= i < stop`` (an adapter before block i when i is in ``adapter_layers``)."""
        vblocks, tblocks = self.clip.visual.transformer.resblocks, self._text_blocks()
        key_mask = st["mask"] if self.mask_text_padding else None
        x_img, x_txt = st["img"], st["txt"]
        for i in range(start, stop):
            if i in self.adapter_layers:
                d_img, d_txt = self.pvl_adapters[self.adapter_layers.index(i)](x_img, x_txt, key_mask, noise)
                x_img, x_txt = x_img + d_img, x_txt + d_txt
            if i < self.n_vis_blocks:
                x_img = vblocks[i](x_img)
            if i < self.n_txt_blocks:
                if self.text_kind == "hf":
                    out = tblocks[i](x_txt, attention_mask=st["txt_attn"])
                    x_txt = out[0] if isinstance(out, tuple) else out
                else:
                    x_txt = tblocks[i](x_txt, attn_mask=st["txt_attn"])
        return {**st, "img": x_img, "txt": x_txt}

    def _text_feature(self, st: dict) -> torch.Tensor:
        x, ids, mask = st["txt"], st["ids"], st["mask"]
        if self.text_kind == "hf":
            text = self.clip.text
            pooled = text.pooler(SimpleNamespace(last_hidden_state=x, pooler_output=None), mask)
            return text.proj(pooled)
        from open_clip.transformer import text_global_pool

        tt = self._text_tower()
        x = tt.ln_final(x)
        pool_type = getattr(tt, "pool_type", None) or getattr(tt, "text_pool_type", "argmax")
        eos = getattr(tt, "eos_id", None) or getattr(tt, "text_eos_id", None)
        pooled = text_global_pool(x, ids, pool_type=pool_type, eos_token_id=eos)
        proj = tt.text_projection
        if proj is None:
            return pooled
        return proj(pooled) if isinstance(proj, nn.Linear) else pooled @ proj

    def encode_towers(self, image: torch.Tensor, text_ids, text_mask=None, noise: SampleNoise | None = None):
        """Pooled image and text embeddings ``[B,E]`` of the lock-step run (adapters in the loop). With
        ``adapter_layers=[]`` these are the plain CLIP towers: open_clip's ``encode_image`` / ``encode_text``."""
        image, ids, mask, _ = self._prepare(image, text_ids, text_mask)
        st = self._run_blocks(self._embed(image, ids, mask), 0, max(self.n_vis_blocks, self.n_txt_blocks), noise)
        visual = self.clip.visual
        pooled = visual._pool(st["img"])[0]
        if visual.proj is not None:
            pooled = pooled @ visual.proj
        return pooled, self._text_feature(st)

    def _drop_padding(self, ids: torch.Tensor, mask: torch.Tensor):
        """With ``mask_text_padding`` no padded token can reach the output (masked as keys in the text tower and in
        the adapters; pooling ignores them), so the trailing padding columns are dropped (fast path only)."""
        if not self.mask_text_padding or mask.shape[1] == 0:
            return ids, mask
        n = int(mask.sum(dim=1).max().item())
        if n < mask.shape[1] and not mask[:, n:].any():
            if self.text_kind == "openclip" and getattr(self._text_tower(), "pool_type", "argmax") not in ("argmax", "first", "eos"):
                return ids, mask  # 'last' pooling reads the final (padded) position
            return ids[:, :n], mask[:, :n]
        return ids, mask

    @staticmethod
    def _repeat_state(st: dict, k: int) -> dict:
        """Tile a batch-B state ``k`` times, sample-major (rows s*B..s*B+B-1 = pass s)."""
        out = dict(st)
        for key in ("img", "txt", "ids", "mask"):
            out[key] = st[key].repeat(k, *([1] * (st[key].ndim - 1)))
        if st["txt_attn"] is not None and st["txt_attn"].ndim == 4:  # per-row BERT padding mask; causal mask is shared
            out["txt_attn"] = st["txt_attn"].repeat(k, 1, 1, 1)
        return out

    def _head(self, st: dict, out_size) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Patch tokens -> final norm + projection -> L2-normalised grid -> up-scaling; text -> MLP; E5."""
        visual = self.clip.visual
        tokens = visual.ln_post(st["img"])
        if visual.proj is not None:
            tokens = tokens @ visual.proj
        patches = F.normalize(tokens[:, 1:], dim=-1)
        b = patches.shape[0]
        grid = patches.transpose(1, 2).reshape(b, -1, *self.grid_size)
        text_embed = self._text_feature(st)
        query = self.mask_head(F.normalize(text_embed, dim=-1))
        logits = text_conditioned_logits(query, self.upscale(grid))
        logits = F.interpolate(logits, size=tuple(out_size), mode="bilinear", align_corners=False)
        return logits, patches, text_embed

    def _prepare(self, image, text_ids, text_mask):
        ids = as_token_tensor(text_ids, device=image.device)
        if ids is None:
            raise ValueError("MedCLIPSeg needs text_ids (tokenised prompt)")
        mask = as_token_tensor(text_mask, device=image.device) if text_mask is not None else (ids != 0).long()
        if ids.shape[0] != image.shape[0]:
            if ids.shape[0] == 1:
                ids, mask = ids.expand(image.shape[0], -1), mask.expand(image.shape[0], -1)
            else:
                raise ValueError(f"{ids.shape[0]} prompts for {image.shape[0]} images")
        out_size = image.shape[-2:]
        if tuple(out_size) != self.image_size:  # the ViT has a fixed grid: resize in, logits are resized back
            image = F.interpolate(image, size=self.image_size, mode="bilinear", align_corners=False)
        return image, ids, mask, out_size

    # ------------------------------------------------------------------ public API
    def forward(self, image: torch.Tensor, text_ids, text_mask=None, noise: SampleNoise | None = None):
        image, ids, mask, out_size = self._prepare(image, text_ids, text_mask)
        st = self._run_blocks(self._embed(image, ids, mask), 0, max(self.n_vis_blocks, self.n_txt_blocks), noise)
        logits, patches, text_embed = self._head(st, out_size)
        if self.training:
            return {"logits": logits, "patch_mean": patches.mean(dim=1), "text_embed": text_embed}
        return logits

    def sample_probabilities(self, image: torch.Tensor, text_ids, text_mask=None, num_samples: int = 30,
                             seed: int | None = None, fast: bool = True) -> torch.Tensor:
        """Foreground probabilities of ``num_samples`` stochastic passes, ``[S,B,1,H,W]``.

        ``fast=True`` runs the sample-independent prefix (embeddings and every block before the first adapter) once
        and pushes the passes through the rest of the network as one sample-major batch (chunks of at most
        ``max_sample_batch`` rows); with ``mask_text_padding`` it also drops the trailing padded text positions,
        which cannot reach the output then. ``fast=False`` is the naive loop of full passes. Both draw each pass's noise
        from that pass's own generator (:class:`SampleNoise`), so they give the same maps for the same seed. A pass
        draws its noise for the whole batch of images, so an image's maps also depend on the batch size and its
        position in the batch (same distribution, other draws).
        """
        s_total = int(num_samples)
        if s_total < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        seeds = pass_seeds(s_total, seed)
        with torch.inference_mode():
            image, ids, mask, out_size = self._prepare(image, text_ids, text_mask)
            n_blocks = max(self.n_vis_blocks, self.n_txt_blocks)
            if not fast:
                out = []
                for s in seeds:
                    st = self._run_blocks(self._embed(image, ids, mask), 0, n_blocks,
                                          SampleNoise([s], image.device, text_len=ids.shape[1]))
                    out.append(torch.sigmoid(self._head(st, out_size)[0]))
                return torch.stack(out)
            full_len = ids.shape[1]
            ids, mask = self._drop_padding(ids, mask)
            b = image.shape[0]
            first = self.adapter_layers[0] if self.adapter_layers else n_blocks
            prefix = self._run_blocks(self._embed(image, ids, mask), 0, first, None)
            chunk = max(1, self.max_sample_batch // max(b, 1))
            out = []
            for c0 in range(0, s_total, chunk):
                cs = seeds[c0:c0 + chunk]
                k = len(cs)
                st = self._repeat_state(prefix, k)
                st = self._run_blocks(st, first, n_blocks, SampleNoise(cs, image.device, text_len=full_len))
                probs = torch.sigmoid(self._head(st, out_size)[0])
                out.append(probs.reshape(k, b, *probs.shape[1:]))
            return torch.cat(out, dim=0)
