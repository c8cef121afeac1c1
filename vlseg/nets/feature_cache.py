"""Bounded caches of deterministic, text-independent (or image-independent) network parts, shared by the bundles.

A second prompt on the same image should not recompute what does not depend on the prompt (the SAM image embedding
of Simple-ViLMedSAM, the ConvNeXt stages of UA-VLS), and a frozen text tower should not re-encode a prompt it has
seen (CLIP's text side in Simple-ViLMedSAM, UA-VLS's BERT). This module holds the one mechanism all of them use:

* :class:`TensorLRU` -- a thread-safe least-recently-used map of tensors (or tuples of tensors), bounded in BYTES
  (``max_mb``, 0 = off) and optionally in entries; every stored tensor is detached and owns its storage.
* :func:`tensor_digest` -- the content key of one tensor: sha1 of its bytes plus shape, dtype and device.
* :func:`weights_version` -- the weights key of a module: the sum of the in-place version counters of its
  parameters and buffers (an optimizer step or ``load_state_dict`` bumps them) plus their storage, dtype and device
  (``.to()``, ``load_state_dict(assign=True)`` and ``p.data = ...`` replace them).
* :func:`is_deterministic` -- a module may be served from a cache only under ``no_grad`` with every submodule in
  eval mode, except dropout / drop-path layers whose probability is 0 (Monte-Carlo dropout switches those on).
* :func:`cached_rows` -- run ``fn`` only on the batch rows whose (content, weights) key is not cached.
* :func:`module_caches` / :func:`caches_off` -- every cache a network holds, and a context that switches all of
  them off (benchmarks that time what a first prompt on a new image costs).
* :class:`FeatureCacheMixin` -- for a network (listed before ``nn.Module``): owns ``self.feature_cache`` and
  clears it on ``load_state_dict`` (pre-hook), on ``train(True)`` and on ``_apply`` (device / dtype moves).

Keys include the weights version, so stale entries can never be served; the explicit clears only release memory.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

__all__ = ["TensorLRU", "tensor_digest", "weights_version", "is_deterministic", "cached_rows", "module_caches",
           "caches_off", "FeatureCacheMixin"]

_MB = 1 << 20


def _nbytes(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    return sum(_nbytes(v) for v in value)


def _own(value):
    """Detached copy with its own storage (a cached row must not pin its whole batch)."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    return tuple(_own(v) for v in value)


class TensorLRU:
    """Least-recently-used cache of tensors / tuples of tensors, bounded by ``max_mb`` (MiB) and, when given,
    ``max_entries``. ``max_mb <= 0`` or ``max_entries == 0`` switches it off (nothing is stored). A value larger than
    the whole bound is not stored. ``stats``: hits, misses, evictions. Thread-safe; copies (``copy.deepcopy``,
    pickling) start empty."""

    def __init__(self, max_mb: float = 256.0, max_entries: int | None = None, name: str = "cache"):
        self.max_bytes = int(float(max_mb or 0) * _MB)
        self.max_entries = None if max_entries is None else int(max_entries)
        self.name = str(name)
        self._data: OrderedDict = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.stats = {"hits": 0, "misses": 0, "evictions": 0}

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0 and (self.max_entries is None or self.max_entries > 0)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key) -> bool:
        return key in self._data

    def get(self, key: Hashable):
        with self._lock:
            value = self._data.get(key)
            if value is None:
                self.stats["misses"] += 1
                return None
            self._data.move_to_end(key)
            self.stats["hits"] += 1
            return value

    def put(self, key: Hashable, value, copy: bool = True) -> None:
        if not self.enabled:
            return
        value = _own(value) if copy else value
        size = _nbytes(value)
        if size > self.max_bytes:
            return
        with self._lock:
            old = self._data.pop(key, None)
            if old is not None:
                self._bytes -= _nbytes(old)
            self._data[key] = value
            self._bytes += size
            while self._data and (self._bytes > self.max_bytes
                                  or (self.max_entries is not None and len(self._data) > self.max_entries)):
                _, dropped = self._data.popitem(last=False)
                self._bytes -= _nbytes(dropped)
                self.stats["evictions"] += 1

    def clear(self) -> None:
        with self._lock:
            self._data.clear()
            self._bytes = 0

    def __deepcopy__(self, memo):
        return TensorLRU(self.max_bytes / _MB, self.max_entries, self.name)

    def __getstate__(self):
        return {"max_bytes": self.max_bytes, "max_entries": self.max_entries, "name": self.name}

    def __setstate__(self, state):
        self.__init__(state["max_bytes"] / _MB, state["max_entries"], state["name"])

    def __repr__(self) -> str:
        return (f"TensorLRU({self.name!r}, {len(self)} entries, {self._bytes / _MB:.1f}/{self.max_bytes / _MB:.0f} "
                f"MiB, {self.stats})")


def tensor_digest(t: torch.Tensor) -> str:
    """sha1 of the tensor's bytes, its shape, dtype and device: equal only for the same content in the same form."""
    h = hashlib.sha1(f"{tuple(t.shape)}|{t.dtype}|{t.device}|".encode())
    h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def weights_version(module: nn.Module) -> tuple:
    """A key that changes whenever the module's weights may have changed: the sum of the in-place version counters
    of its parameters and buffers (``optimizer.step()``, ``load_state_dict``, any ``p.add_``) and a hash of their
    storage addresses, dtypes and devices (tensors replaced by ``.to()``, ``assign=True`` or ``p.data = ...``)."""
    tensors = list(module.parameters()) + list(module.buffers())
    version = sum(t._version for t in tensors)
    layout = hash(tuple((t.data_ptr(), t.dtype, t.device) for t in tensors))
    return version, layout, len(tensors)


def _is_identity_when_training(m: nn.Module) -> bool:
    """Dropout-like layers (PyTorch dropouts, timm ``DropPath``) with probability 0 compute the identity."""
    p = getattr(m, "p", None) if isinstance(m, nn.modules.dropout._DropoutNd) else getattr(m, "drop_prob", None)
    return p is not None and float(p) == 0.0


def is_deterministic(module: nn.Module) -> bool:
    """True when ``module`` is a fixed function of its input right now: autograd off and every submodule in eval
    mode, except probability-0 dropout / drop-path layers (which Monte-Carlo dropout may have switched on)."""
    if torch.is_grad_enabled():
        return False
    return all(not m.training or _is_identity_when_training(m) for m in module.modules())


def _split_rows(out) -> list:
    """Rows ``[1, ...]`` of a batch output (views; they keep the batch's strides, e.g. channels-last)."""
    if isinstance(out, torch.Tensor):
        return [out[i:i + 1] for i in range(out.shape[0])]
    if isinstance(out, (list, tuple)):
        return list(zip(*[_split_rows(o) for o in out]))
    raise TypeError(f"cached_rows: fn must return a tensor or a list/tuple of tensors, got {type(out).__name__}")


def _cat(rows: list[torch.Tensor]) -> torch.Tensor:
    out = torch.cat(rows)
    first = rows[0]
    for fmt, dim in ((torch.channels_last, 4), (torch.channels_last_3d, 5)):
        if first.dim() == dim and not first.is_contiguous() and first.is_contiguous(memory_format=fmt):
            return out.contiguous(memory_format=fmt)  # same layout as an uncached batch: same kernels, same numbers
    return out


def _stack_rows(rows: list, like):
    if isinstance(like, torch.Tensor):
        return _cat(rows)
    return type(like)(_stack_rows([r[i] for r in rows], like[i]) for i in range(len(like)))


def cached_rows(cache: TensorLRU | None, namespace: Hashable, fn: Callable, x: torch.Tensor, module: nn.Module):
    """``fn(x)`` for a batch ``x [B, ...]`` whose output (a tensor or a list/tuple of tensors, batch first) is
    computed row by row independently (eval-mode networks), served per row from ``cache``.

    Key of row ``i``: ``(namespace, tensor_digest(x[i]), weights_version(module))``. Only the missing rows go
    through ``fn`` (one batch), each distinct one once. Without a cache, with the cache off, or when ``module`` is not deterministic
    (:func:`is_deterministic`: training, autograd on, active dropout) this is exactly ``fn(x)``.
    """
    if cache is None or not cache.enabled or not is_deterministic(module):
        return fn(x)
    version = weights_version(module)
    keys = [(namespace, tensor_digest(row), version) for row in x]  # row: x[i]
    rows = [cache.get(k) for k in keys]
    todo = [i for i, r in enumerate(rows) if r is None]
    if not todo:
        return _stack_rows(rows, _as_like(rows[0]))
    unique: dict = {}  # key -> position among the computed rows (a repeated image, e.g. folded passes, runs once)
    first: list[int] = []
    for i in todo:
        if keys[i] not in unique:
            unique[keys[i]] = len(first)
            first.append(i)
    out = fn(x[first] if len(first) < len(keys) else x)
    computed = _split_rows(out)
    for k, j in unique.items():
        cache.put(k, computed[j])
    for i in todo:
        rows[i] = computed[unique[keys[i]]]
    return out if len(first) == len(keys) else _stack_rows(rows, out)


def _as_like(row):
    """Structure template of a cached row: a tensor, or a list of templates (networks index stage outputs)."""
    return row if isinstance(row, torch.Tensor) else [_as_like(r) for r in row]


def _holders(module: nn.Module) -> list:
    """``module``, its submodules, and the plain objects they hold as attributes (e.g. Simple-ViLMedSAM's M2IB
    prompter, which is not an ``nn.Module``)."""
    out: dict[int, object] = {}
    for m in module.modules():
        out[id(m)] = m
        for v in vars(m).values():
            if not isinstance(v, (nn.Module, torch.Tensor, TensorLRU)) and hasattr(v, "__dict__") \
                    and not isinstance(v, type):
                out.setdefault(id(v), v)
    return list(out.values())


def module_caches(module: nn.Module) -> list[TensorLRU]:
    """Every :class:`TensorLRU` held by ``module``, its submodules or the plain objects they hold (each once)."""
    found: dict[int, TensorLRU] = {}
    for h in _holders(module):
        for v in vars(h).values():
            if isinstance(v, TensorLRU):
                found[id(v)] = v
    return list(found.values())


@contextmanager
def caches_off(module: nn.Module) -> Iterator[list[TensorLRU]]:
    """Inside the block every cache of ``module`` (:func:`module_caches`) is empty and stores nothing, and an
    object that holds one of them and a disk folder ``cache_dir`` (Simple-ViLMedSAM's M2IB maps) has no folder:
    each call computes everything, as a first prompt on a new image does. Sizes and folders come back afterwards;
    what the caches held before is dropped."""
    caches = module_caches(module)
    held = {id(c) for c in caches}
    folders = [(h, h.cache_dir) for h in _holders(module)
               if getattr(h, "cache_dir", None) is not None and any(id(v) in held for v in vars(h).values())]
    sizes = [(c, c.max_bytes) for c in caches]
    for c in caches:
        c.clear()
        c.max_bytes = 0
    for h, _ in folders:
        h.cache_dir = None
    try:
        yield caches
    finally:
        for c, size in sizes:
            c.max_bytes = size
        for h, folder in folders:
            h.cache_dir = folder


class FeatureCacheMixin:
    """For a network class (``class Net(FeatureCacheMixin, nn.Module)``): call :meth:`init_feature_cache` in
    ``__init__``; ``self.feature_cache`` is cleared on ``load_state_dict`` (pre-hook), ``train(True)`` and
    ``_apply`` (``.to()``, ``.half()`` ...)."""

    def init_feature_cache(self, max_mb: float, name: str = "features") -> TensorLRU:
        self.feature_cache = TensorLRU(max_mb, name=name)
        self.register_load_state_dict_pre_hook(FeatureCacheMixin._clear_feature_cache)
        return self.feature_cache

    @staticmethod
    def _clear_feature_cache(module, *args, **kwargs) -> None:
        module.feature_cache.clear()

    def train(self, mode: bool = True):
        if mode and getattr(self, "feature_cache", None) is not None:
            self.feature_cache.clear()
        return super().train(mode)

    def _apply(self, fn, *args, **kwargs):
        if getattr(self, "feature_cache", None) is not None:
            self.feature_cache.clear()
        return super()._apply(fn, *args, **kwargs)
