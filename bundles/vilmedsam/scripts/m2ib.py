"""The M2IB attribution map of the Implicit Position Prompter (the CLIP towers are in :mod:`scripts.clip`).

Paper Eq. (2): ``max MI(Z_IC, F_T) - beta MI(Z_IC, I)``, optimised per image through the variational bound
``beta * KL(N(lambda x, (1 - lambda)^2) || N(0, 1)) - cos(F_T, Psi_img(Z_IC))`` (M2IB, Wang et al. 2023).
Paper Eq. (3): ``Z_IC = h(I; alpha) * F^l_IC + sigma (1 - h(I; alpha)) * eps``, ``h = sigmoid(alpha)``.

The public code (M2IB's ``InformationBottleneck``, used as is) draws ``eps`` with standard deviation ``1 - h``: its
``vvar`` (noise variance 2) only reaches an estimator the bottleneck never reads, so ``sigma = 1``. It takes ONE
noise sample per Adam step (batch size 1; M2IB's own default is 10) and builds the map from the capacity of the LAST
forward pass (before the last Adam update). These are the defaults here (``noise_var None``, ``n_samples 1``,
``map_from "last_forward"``); ``noise_var`` (a number: ``sigma = sqrt(noise_var)``, used consistently in the noise
AND the KL term), more samples and ``map_from "final"`` (capacity after all updates) are documented options.

:func:`m2ib_capacity` is the per-image optimisation (10 Adam steps at lr 1, alpha initialised to 5),
:func:`saliency_from_capacity` turns the capacity into the initial attribution map ``A_init`` (channels summed,
class token dropped, reshaped to the patch grid, resized, min-max normalised), and :class:`M2IBPrompter` runs both
on a CLIP model, with an in-memory LRU cache bounded in entries and bytes (and an optional on-disk cache) keyed by
image content, prompt tokens, the M2IB settings and a fingerprint of the CLIP weights (the only part of the checkpoint
a map depends on), so repeated epochs / inference do not recompute maps. With a ``feature_cache`` (the network's
:class:`vlseg.nets.feature_cache.TensorLRU`) CLIP's vision tokens (per image) and text embedding (per prompt) are
cached too, so a new prompt on a seen image only pays for the optimisation itself.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from vlseg.nets.feature_cache import TensorLRU, cached_rows

from .clip import CLIPTowers

logger = logging.getLogger("vlseg.vilmedsam")

__all__ = ["m2ib_capacity", "capacity", "saliency_from_capacity", "resize_minmax", "M2IBPrompter", "MAP_FROM"]

MAP_FROM = ("last_forward", "final")

def m2ib_capacity(tokens: torch.Tensor, embed_fn: Callable[[torch.Tensor], torch.Tensor], text_emb: torch.Tensor,
                  beta: float = 2.0, noise_var: float | None = None, steps: int = 10, lr: float = 1.0,
                  n_samples: int = 1, alpha_init: float = 5.0, map_from: str = "last_forward",
                  generators: list[torch.Generator] | None = None) -> torch.Tensor:
    """Paper Eq. (2)-(3), M2IB: per-image information bottleneck on the token states ``tokens [B, N, C]``.

    For each image a mask ``lambda = sigmoid(alpha)`` (one value per token and channel, ``alpha`` initialised to
    ``alpha_init``) is optimised with Adam (``steps`` steps, learning rate ``lr``) to minimise
    ``beta * mean KL(N(lambda x, sigma^2 (1 - lambda)^2) || N(0, 1)) - mean cos(text_emb, embed_fn(z))``, with
    ``z = lambda x + sigma (1 - lambda) eps`` drawn ``n_samples`` times per step and ``sigma = sqrt(noise_var)``
    (``noise_var None``: ``sigma = 1``, the public code). Images are optimised jointly but independently (each
    image's loss only reaches its own ``alpha``; Adam is element-wise). Only ``alpha`` receives gradients.
    Returns the per-element capacity ``[B, N, C]`` (no gradient) of the last forward pass (``map_from
    "last_forward"``, the public code) or of the mask after the last update (``"final"``).
    """
    if map_from not in MAP_FROM:
        raise ValueError(f"m2ib map_from must be one of {MAP_FROM}, got {map_from!r}")
    b, n, c = tokens.shape
    x = tokens.detach().float()
    t = F.normalize(text_emb.detach().float(), dim=-1)
    sigma = 1.0 if noise_var is None else float(noise_var) ** 0.5
    alpha = torch.full((b, n, c), float(alpha_init), device=x.device, requires_grad=True)
    opt = torch.optim.Adam([alpha], lr=lr)
    s = max(1, int(n_samples))
    cap = None
    with torch.enable_grad():
        for _ in range(int(steps)):
            lam = torch.sigmoid(alpha)
            cap = capacity(lam, x, sigma)
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
        if map_from == "last_forward" and cap is not None:
            return cap.detach()
        return capacity(torch.sigmoid(alpha), x, sigma)


def capacity(lam: torch.Tensor, x: torch.Tensor, sigma: float = 1.0) -> torch.Tensor:
    """Paper Eq. (2), compression term: element-wise ``KL(N(lambda x, sigma^2 (1 - lambda)^2) || N(0, 1)) =
    0.5 (mu^2 + var - 1 - log var)``."""
    var = (sigma * (1.0 - lam)).pow(2).clamp_min(1e-12)
    mu = lam * x
    return 0.5 * (mu.pow(2) + var - 1.0 - torch.log(var))


def saliency_from_capacity(cap: torch.Tensor, grid: tuple[int, int], num_prefix: int = 1,
                           out_size: tuple[int, int] | None = None) -> torch.Tensor:
    """Capacity ``[B, N, C]`` -> attribution map ``[B, 1, h, w]`` in [0, 1].

    Sum over channels, drop the class (prefix) token(s), reshape to the patch ``grid``, resize bilinearly to
    ``out_size`` and min-max normalise per image (a flat map becomes all zeros).
    """
    sal = torch.nan_to_num(cap.float(), nan=0.0, posinf=0.0).sum(dim=-1)[:, num_prefix:]
    sal = sal.reshape(sal.shape[0], 1, grid[0], grid[1])
    if out_size is not None and tuple(out_size) != tuple(grid):
        sal = F.interpolate(sal, size=tuple(out_size), mode="bilinear", align_corners=False)
    lo = sal.amin(dim=(2, 3), keepdim=True)
    hi = sal.amax(dim=(2, 3), keepdim=True)
    return (sal - lo) / (hi - lo).clamp_min(1e-8)


class M2IBPrompter:
    """Initial attribution map ``A_init`` from CLIP + M2IB, with caching. A plain object, not a module: it holds no
    tensors of its own, and the CLIP it uses belongs to the network (one copy in the state dict).

    Args:
        clip: :class:`CLIPTowers`.
        layer: vision block after which the bottleneck sits (7 upstream, 0-based like the public code).
        beta, noise_var, steps, lr, n_samples, alpha_init, map_from: M2IB settings (public code: 2, None, 10, 1,
            1, 5, "last_forward"; see :func:`m2ib_capacity`).
        cache_size / cache_mb: entries / MiB of the in-memory LRU cache of maps (either 0 disables it).
        feature_cache: optional :class:`TensorLRU` for CLIP's vision tokens and text embeddings (deterministic,
            prompt- resp. image-independent parts), keyed by content and the CLIP weights' version.
        cache_dir: optional folder for an on-disk cache (one small ``.pt`` per map).
        seed: seeds the per-image noise (derived from the cache key), so a map does not depend on the batch
            it is computed in, nor on the global random state.
    """

    def __init__(self, clip: CLIPTowers, layer: int = 7, beta: float = 2.0, noise_var: float | None = None,
                 steps: int = 10, lr: float = 1.0, n_samples: int = 1, alpha_init: float = 5.0,
                 map_from: str = "last_forward", cache_size: int = 4096,
                 cache_dir: str | None = None, seed: int = 0, cache_mb: float = 64.0,
                 feature_cache: TensorLRU | None = None):
        if not 0 <= int(layer) < clip.depth:
            raise ValueError(f"m2ib layer {layer} outside the CLIP vision tower (depth {clip.depth})")
        self.clip = clip
        self.layer = int(layer)
        if map_from not in MAP_FROM:
            raise ValueError(f"m2ib map_from must be one of {MAP_FROM}, got {map_from!r}")
        self.settings = dict(beta=float(beta), noise_var=None if noise_var is None else float(noise_var),
                             steps=int(steps), lr=float(lr), n_samples=int(n_samples), alpha_init=float(alpha_init),
                             map_from=str(map_from))
        self.cache_size = int(cache_size)
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.seed = int(seed)
        self._cache = TensorLRU(cache_mb, max_entries=self.cache_size, name="m2ib maps")
        self.feature_cache = feature_cache
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
        conf = repr((self.layer, sorted(self.settings.items(), key=lambda kv: kv[0]), self.seed, tuple(pix.shape[1:])))
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
        val = self._cache.get(key)
        if val is not None:
            return val
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
        self._cache.put(key, val)
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
                    tok = tokens[todo].detach() if tokens is not None else cached_rows(
                        self.feature_cache, ("clip_tokens", self.layer), lambda p: self.clip.tokens_at(p, self.layer),
                        pix[todo], self.clip)
                    temb = text_emb[todo].detach() if text_emb is not None else cached_rows(
                        self.feature_cache, "clip_text", self.clip.encode_text, ids[todo], self.clip)
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


def resize_minmax(m: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``A_init`` at the SAM feature grid: bilinear resize of a ``[B, 1, h, w]`` map, min-max normalised per image."""
    if tuple(m.shape[-2:]) != tuple(size):
        m = F.interpolate(m, size=tuple(size), mode="bilinear", align_corners=False)
    lo = m.amin(dim=(2, 3), keepdim=True)
    hi = m.amax(dim=(2, 3), keepdim=True)
    return (m - lo) / (hi - lo).clamp_min(1e-8)
