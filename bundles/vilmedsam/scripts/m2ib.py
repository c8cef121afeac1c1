"""CLIP towers (open_clip) and the M2IB attribution map of the Implicit Position Prompter.

Paper Eq. (1a, 1b): ``F_T = Psi_text(T)``, ``F_IC = Psi_img(I)`` (CLIP text / image encoders, 224 input).
Paper Eq. (2): ``max MI(Z_IC, F_T) - beta MI(Z_IC, I)``, optimised per image through the variational bound
``beta * KL(N(lambda x, (1 - lambda)^2) || N(0, 1)) - cos(F_T, Psi_img(Z_IC))`` (M2IB, Wang et al. 2023).
Paper Eq. (3): ``Z_IC = h(I; alpha) * F^l_IC + sigma (1 - h(I; alpha)) * eps``, ``h = sigmoid(alpha)``.

:func:`m2ib_capacity` is the per-image optimisation (10 Adam steps at lr 1, alpha initialised to 5),
:func:`saliency_from_capacity` turns the capacity into the initial attribution map ``A_init`` (channels summed,
class token dropped, reshaped to the patch grid, resized, min-max normalised), and :class:`M2IBPrompter` runs both
on a CLIP model, with an in-memory LRU cache (and an optional on-disk cache) keyed by image content, prompt tokens,
the M2IB settings and a fingerprint of the CLIP weights, so repeated epochs / inference do not recompute maps.
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger("vlseg.vilmedsam")

__all__ = ["CLIPTowers", "m2ib_capacity", "saliency_from_capacity", "M2IBPrompter", "build_clip"]

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
CLIP_HINT = (
    "BiomedCLIP (the paper's CLIP): download microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224 "
    "(open_clip_config.json, open_clip_pytorch_model.bin and the text tokenizer files) into a folder and set "
    "clip_model 'local-dir:<folder>'; an OpenAI-style checkpoint for clip_model 'ViT-B-16' is any local open_clip "
    ".bin/.pt file given as clip_pretrained (see large_files.yml)."
)


def build_clip(model_name: str = "ViT-B-16", pretrained: str | None = None, cfg: dict | None = None):
    """Build an open_clip model OFFLINE. Returns ``(model, loaded)``.

    ``cfg`` (a dict with ``embed_dim``, ``vision_cfg``, ``text_cfg``) builds a custom :class:`open_clip.CLIP`
    (the small / tiny variants). Otherwise ``model_name`` is an open_clip architecture name or
    ``local-dir:<folder>`` (BiomedCLIP); ``pretrained`` a local weights file. Missing weights -> one warning.
    """
    import open_clip

    if cfg is not None:
        model = open_clip.CLIP(embed_dim=int(cfg["embed_dim"]), vision_cfg=dict(cfg["vision_cfg"]),
                               text_cfg=dict(cfg["text_cfg"]))
        loaded = False
        if pretrained and Path(pretrained).is_file():
            state = torch.load(str(pretrained), map_location="cpu", weights_only=True)
            model.load_state_dict(state.get("state_dict", state))
            loaded = True
        elif pretrained:
            logger.warning("CLIP: weights file %r not found -> RANDOM weights. %s", pretrained, CLIP_HINT)
        return model, loaded
    if model_name.startswith("local-dir:"):
        if not Path(model_name[len("local-dir:"):]).is_dir():
            raise FileNotFoundError(f"CLIP folder {model_name} not found. {CLIP_HINT}")
        model = open_clip.create_model(model_name, pretrained=model_name, load_weights=True)
        return model, True
    if pretrained and Path(pretrained).is_file():
        return open_clip.create_model(model_name, pretrained=str(pretrained), pretrained_text=False), True
    logger.warning("CLIP %s: weights file %r not found -> RANDOM weights. %s", model_name, pretrained, CLIP_HINT)
    return open_clip.create_model(model_name, pretrained=None), False


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
            self.blocks = visual.transformer.resblocks
            self.num_prefix = 1
            grid = visual.grid_size
        elif hasattr(visual, "trunk") and hasattr(visual.trunk, "blocks"):
            self.kind = "timm"
            self.blocks = visual.trunk.blocks
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
        # scale / bias of the per-patch text logits of the auxiliary alignment loss (small / tiny variants only)
        self.align_scale = nn.Parameter(torch.tensor(10.0))
        self.align_bias = nn.Parameter(torch.tensor(-2.0))

    @property
    def depth(self) -> int:
        return len(self.blocks)

    def preprocess(self, image: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` in 0..255 -> CLIP input (resized to the tower's size, normalised)."""
        x = image.float() / 255.0
        if tuple(x.shape[-2:]) != self.image_size:
            x = F.interpolate(x, size=self.image_size, mode="bicubic", align_corners=False).clamp(0.0, 1.0)
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

    def logit_scale(self) -> torch.Tensor:
        ls = getattr(self.model, "logit_scale", None)
        return ls.exp().clamp(max=100.0) if ls is not None else torch.tensor(10.0)


def m2ib_capacity(tokens: torch.Tensor, embed_fn: Callable[[torch.Tensor], torch.Tensor], text_emb: torch.Tensor,
                  beta: float = 2.0, noise_var: float = 2.0, steps: int = 10, lr: float = 1.0, n_samples: int = 10,
                  alpha_init: float = 5.0, generators: list[torch.Generator] | None = None) -> torch.Tensor:
    """Paper Eq. (2)-(3), M2IB: per-image information bottleneck on the token states ``tokens [B, N, C]``.

    For each image a mask ``lambda = sigmoid(alpha)`` (one value per token and channel, ``alpha`` initialised to
    ``alpha_init``) is optimised with Adam (``steps`` steps, learning rate ``lr``) to minimise
    ``beta * mean KL(N(lambda x, (1 - lambda)^2) || N(0, 1)) - mean cos(text_emb, embed_fn(z))``, with
    ``z = lambda x + (1 - lambda) sqrt(noise_var) eps`` drawn ``n_samples`` times per step. Images are optimised
    jointly but independently (each image's loss only reaches its own ``alpha``; Adam is element-wise).
    Only ``alpha`` receives gradients (the encoders are left untouched). Returns the per-element capacity
    ``[B, N, C]`` of the final mask (no gradient).
    """
    b, n, c = tokens.shape
    x = tokens.detach().float()
    t = F.normalize(text_emb.detach().float(), dim=-1)
    sigma = float(noise_var) ** 0.5
    alpha = torch.full((b, n, c), float(alpha_init), device=x.device, requires_grad=True)
    opt = torch.optim.Adam([alpha], lr=lr)
    s = max(1, int(n_samples))
    with torch.enable_grad():
        for _ in range(int(steps)):
            lam = torch.sigmoid(alpha)
            cap = _capacity(lam, x)
            if generators is None:
                eps = torch.randn(b, s, n, c, device=x.device)
            else:
                eps = torch.stack([torch.randn(s, n, c, generator=g).to(x.device) for g in generators])
            z = lam[:, None] * x[:, None] + (1.0 - lam[:, None]) * sigma * eps  # [B, S, N, C]
            emb = embed_fn(z.reshape(b * s, n, c).to(tokens.dtype)).float().reshape(b, s, -1)
            fit = F.cosine_similarity(emb, t[:, None], dim=-1)  # [B, S]
            # per-image mean capacity and fit; summed over images so each image keeps its own objective
            loss = (beta * cap.mean(dim=(1, 2)) - fit.mean(dim=1)).sum()
            (grad,) = torch.autograd.grad(loss, [alpha])
            alpha.grad = grad
            opt.step()
    with torch.no_grad():
        return _capacity(torch.sigmoid(alpha), x)


def _capacity(lam: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Element-wise KL(N(lambda x, (1 - lambda)^2) || N(0, 1)) = 0.5 (mu^2 + var - 1 - log var)."""
    var = (1.0 - lam).pow(2).clamp_min(1e-12)
    mu = lam * x
    return 0.5 * (mu.pow(2) + var - 1.0 - torch.log(var))


def saliency_from_capacity(capacity: torch.Tensor, grid: tuple[int, int], num_prefix: int = 1,
                           out_size: tuple[int, int] | None = None) -> torch.Tensor:
    """Capacity ``[B, N, C]`` -> attribution map ``[B, 1, h, w]`` in [0, 1].

    Sum over channels, drop the class (prefix) token(s), reshape to the patch ``grid``, resize bilinearly to
    ``out_size`` and min-max normalise per image (a flat map becomes all zeros).
    """
    sal = torch.nan_to_num(capacity.float(), nan=0.0, posinf=0.0).sum(dim=-1)[:, num_prefix:]
    sal = sal.reshape(sal.shape[0], 1, grid[0], grid[1])
    if out_size is not None and tuple(out_size) != tuple(grid):
        sal = F.interpolate(sal, size=tuple(out_size), mode="bilinear", align_corners=False)
    lo = sal.amin(dim=(2, 3), keepdim=True)
    hi = sal.amax(dim=(2, 3), keepdim=True)
    return (sal - lo) / (hi - lo).clamp_min(1e-8)


class M2IBPrompter(nn.Module):
    """Initial attribution map ``A_init`` from CLIP + M2IB, with caching.

    Args:
        clip: :class:`CLIPTowers`.
        layer: vision block after which the bottleneck sits (7 upstream, 0-based like the public code).
        beta, noise_var, steps, lr, n_samples, alpha_init: M2IB settings (upstream 2, 2, 10, 1, 10, 5).
        cache_size: entries of the in-memory LRU cache (0 disables it).
        cache_dir: optional folder for an on-disk cache (one small ``.pt`` per map).
        seed: seeds the per-image noise (derived from the cache key), so a map does not depend on the batch
            it is computed in, nor on the global random state.
    """

    def __init__(self, clip: CLIPTowers, layer: int = 7, beta: float = 2.0, noise_var: float = 2.0, steps: int = 10,
                 lr: float = 1.0, n_samples: int = 10, alpha_init: float = 5.0, cache_size: int = 4096,
                 cache_dir: str | None = None, seed: int = 0):
        super().__init__()
        if not 0 <= int(layer) < clip.depth:
            raise ValueError(f"m2ib layer {layer} outside the CLIP vision tower (depth {clip.depth})")
        self.clip = clip
        self.layer = int(layer)
        self.settings = dict(beta=float(beta), noise_var=float(noise_var), steps=int(steps), lr=float(lr),
                             n_samples=int(n_samples), alpha_init=float(alpha_init))
        self.cache_size = int(cache_size)
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.seed = int(seed)
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._fp_versions: int | None = None
        self._fp: str = ""
        self.stats = {"hits": 0, "misses": 0}

    # ------------------------------------------------------------------ cache keys
    def clip_fingerprint(self) -> str:
        """Content fingerprint of the CLIP weights; recomputed only when a parameter changed in place."""
        versions = sum(p._version for p in self.clip.parameters())
        if versions != self._fp_versions or not self._fp:
            h = hashlib.sha1()
            with torch.no_grad():
                for name, p in self.clip.named_parameters():
                    flat = p.detach().reshape(-1)
                    h.update(name.encode())
                    h.update(str(tuple(p.shape)).encode())
                    h.update(repr(float(flat.double().sum())).encode())
                    h.update(flat[:64].float().cpu().numpy().tobytes())
            self._fp, self._fp_versions = h.hexdigest()[:16], versions
        return self._fp

    def _keys(self, pix: torch.Tensor, ids: torch.Tensor) -> list[str]:
        fp = self.clip_fingerprint()
        conf = repr((self.layer, sorted(self.settings.items()), self.seed, tuple(pix.shape[1:])))
        keys = []
        for i in range(pix.shape[0]):
            h = hashlib.sha1()
            h.update(pix[i].detach().float().cpu().contiguous().numpy().tobytes())
            h.update(ids[i].detach().long().cpu().contiguous().numpy().tobytes())
            h.update(conf.encode())
            h.update(fp.encode())
            keys.append(h.hexdigest())
        return keys

    def _get(self, key: str) -> torch.Tensor | None:
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        if self.cache_dir is not None:
            f = self.cache_dir / f"{key}.pt"
            if f.is_file():
                try:
                    val = torch.load(str(f), map_location="cpu", weights_only=True)
                except Exception:  # a partly written or corrupt file: recompute
                    return None
                self._put(key, val, to_disk=False)
                return val
        return None

    def _put(self, key: str, val: torch.Tensor, to_disk: bool = True) -> None:
        if self.cache_size > 0:
            self._cache[key] = val
            self._cache.move_to_end(key)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        if to_disk and self.cache_dir is not None:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            tmp = self.cache_dir / f"{key}.tmp{id(val)}"
            torch.save(val, str(tmp))
            tmp.replace(self.cache_dir / f"{key}.pt")

    def clear_cache(self) -> None:
        self._cache.clear()

    # ------------------------------------------------------------------ maps
    def grid_saliency(self, pix: torch.Tensor, ids: torch.Tensor, tokens: torch.Tensor | None = None,
                      text_emb: torch.Tensor | None = None, use_cache: bool = True) -> torch.Tensor:
        """Saliency at the CLIP patch grid ``[B, 1, gh, gw]`` in [0, 1] for CLIP-preprocessed ``pix``.

        ``tokens`` / ``text_emb`` may be passed when already computed (they are detached here).
        """
        b = pix.shape[0]
        keys = self._keys(pix, ids)
        out: list[torch.Tensor | None] = [self._get(k) if use_cache else None for k in keys]
        todo = [i for i in range(b) if out[i] is None]
        self.stats["hits"] += b - len(todo)
        self.stats["misses"] += len(todo)
        if todo:
            was_training = self.clip.training
            self.clip.eval()
            try:
                with torch.no_grad():
                    tok = tokens[todo].detach() if tokens is not None else self.clip.tokens_at(pix[todo], self.layer)
                    temb = text_emb[todo].detach() if text_emb is not None else self.clip.encode_text(ids[todo])
                gens = []
                for i in todo:
                    g = torch.Generator()
                    g.manual_seed((int(keys[i][:12], 16) + self.seed) % (2**63 - 1))
                    gens.append(g)
                cap = m2ib_capacity(tok, lambda z: self.clip.embed_from(z, self.layer), temb,
                                    generators=gens, **self.settings)
                sal = saliency_from_capacity(cap, self.clip.grid, self.clip.num_prefix).cpu()
            finally:
                self.clip.train(was_training)
            for j, i in enumerate(todo):
                out[i] = sal[j]
                if use_cache:
                    self._put(keys[i], sal[j])
        return torch.stack([o for o in out]).to(pix.device)

    def forward(self, image: torch.Tensor, ids: torch.Tensor, out_size: tuple[int, int],
                use_cache: bool = True) -> torch.Tensor:
        """``image [B, 3, H, W]`` (0..255) + prompt token ids -> ``A_init [B, 1, *out_size]`` in [0, 1]."""
        pix = self.clip.preprocess(image)
        grid_map = self.grid_saliency(pix, ids, use_cache=use_cache)
        return _resize_minmax(grid_map, out_size)


def _resize_minmax(m: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(m.shape[-2:]) != tuple(size):
        m = F.interpolate(m, size=tuple(size), mode="bilinear", align_corners=False)
    lo = m.amin(dim=(2, 3), keepdim=True)
    hi = m.amax(dim=(2, 3), keepdim=True)
    return (m - lo) / (hi - lo).clamp_min(1e-8)
