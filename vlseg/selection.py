"""Choosing images to annotate: seeded random subsets and diversity-aware batches.

* :func:`random_subset` -- a seeded random sample (the app's ``scoring_max_images``: which images get scored).
* :func:`thumbnail_embedding` -- a cheap image embedding: the image averaged down to ``size x size`` RGB cells. It is
  *not* a feature of the bundles' encoders (each bundle's encoder has its own interface and none is exposed through
  the bundle contract), but it separates images by colour, brightness and layout, which is what keeps a batch from
  being several near-copies of one image.
* :func:`kmeans` -- k-means with k-means++ seeding (seeded, numpy).
* :func:`diverse_batch` -- cluster the candidates' embeddings into ``k`` groups and take the most uncertain image of
  each group (the batch is then ordered by score, highest first).
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence

import numpy as np

__all__ = ["random_subset", "thumbnail_embedding", "kmeans", "diverse_batch"]


def random_subset(ids: Sequence[str], n: int, seed: int = 0) -> list[str]:
    """``n`` of ``ids`` drawn without replacement by ``random.Random(seed)`` from their sorted order (all when ``n``
    is 0 or at least their number); the same ids and seed give the same subset."""
    ids = sorted(ids)
    if n <= 0 or n >= len(ids):
        return ids
    return sorted(random.Random(seed).sample(ids, n))


def thumbnail_embedding(image, size: int = 6, digits: int = 3) -> list[float]:
    """``image`` ([H, W], [H, W, C] channel-last or [C, H, W] with C <= 4; any numeric range) averaged to
    ``size x size`` cells of 3 channels (grey is repeated), scaled to [0, 1] by the image's own range; a flat list
    of ``3 * size * size`` floats rounded to ``digits`` (small enough for the datastore's JSON)."""
    import torch

    a = np.asarray(image, dtype=np.float32)
    if a.ndim == 3 and a.shape[0] <= 4 and a.shape[-1] > 4:
        a = np.moveaxis(a, 0, -1)
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3 or a.shape[0] < 1 or a.shape[1] < 1:
        raise ValueError(f"expected a 2D image, got shape {np.shape(image)}")
    a = a[..., :3] if a.shape[-1] >= 3 else np.repeat(a[..., :1], 3, axis=-1)
    lo, hi = float(a.min()), float(a.max())
    a = (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)
    t = torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1)))[None]
    cells = torch.nn.functional.adaptive_avg_pool2d(t, (size, size))[0]
    return [round(float(v), digits) for v in cells.reshape(-1)]


def kmeans(x, k: int, seed: int = 0, iters: int = 50) -> np.ndarray:
    """Cluster index of every row of ``x`` ([N, D]) into ``min(k, N)`` clusters: k-means++ seeding with
    ``numpy.random.default_rng(seed)``, then Lloyd iterations until the assignment stops changing."""
    x = np.asarray(x, dtype=np.float64)
    n = x.shape[0]
    k = min(int(k), n)
    if k < 1:
        raise ValueError("k-means needs at least one point and k >= 1")
    rng = np.random.default_rng(seed)
    centres = [x[rng.integers(n)]]
    for _ in range(1, k):
        d2 = np.min(((x[:, None, :] - np.asarray(centres)[None]) ** 2).sum(-1), axis=1)
        total = d2.sum()
        centres.append(x[rng.choice(n, p=d2 / total)] if total > 0 else x[rng.integers(n)])
    c = np.asarray(centres)
    assign = np.full(n, -1)
    for _ in range(iters):
        new = np.argmin(((x[:, None, :] - c[None]) ** 2).sum(-1), axis=1)
        if np.array_equal(new, assign):
            break
        assign = new
        for j in range(k):
            if (assign == j).any():
                c[j] = x[assign == j].mean(axis=0)
    return assign


def diverse_batch(scores: Mapping[str, float], embeddings: Mapping[str, Sequence[float]], k: int,
                  seed: int = 0) -> list[str]:
    """The most uncertain image of each of ``k`` k-means clusters of ``embeddings`` (ids with a score and an
    embedding of the common length), ordered by score (highest first; ties by id)."""
    ids = sorted(i for i in scores if i in embeddings)
    if not ids or k < 1:
        return []
    dims = {len(embeddings[i]) for i in ids}
    if len(dims) != 1:
        raise ValueError(f"embeddings of different lengths {sorted(dims)}: re-run the scoring with force")
    assign = kmeans(np.asarray([embeddings[i] for i in ids]), k, seed)
    best: dict[int, str] = {}
    for i, c in zip(ids, assign):
        if c not in best or scores[i] > scores[best[c]]:  # ids ascend: a tie keeps the smaller id
            best[c] = i
    return sorted(best.values(), key=lambda i: (-scores[i], i))
