"""Pool scoring / batch inference as a torchrun job: chunk, shard, infer in batches, gather on rank 0.

:func:`run_pool` is the distributed part of ``scripts/score_pool.py``; what is done with each image's prediction
(scores, files in the app's label layout) is the caller's ``handle`` function, and only rank 0 gets the gathered
results (it alone writes the datastore).

* Chunks: the work list (the same, in the same order, on every rank) is cut into chunks of ``images_per_batch``
  images; all prompts of a chunk's images go through the network in one forward (:mod:`vlseg.distributed.batch_infer`).
* Sharding: chunk ``k`` goes to rank ``k % world_size`` (:func:`vlseg.distributed.context.shard` over the chunks).
  Chunks are formed before sharding, so a chunk and its seed are the same for any number of processes and the
  scores equal a single-process run's.
* Preprocessing of the next chunks overlaps the forward passes when ``num_workers`` > 0 (a ``DataLoader`` over
  chunks).
* Progress: a tqdm bar on rank 0 (its own shard; the others run at the same pace); the result reports images/s of
  the whole job (all ranks' images over the wall-clock time from the start barrier to the gather).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from vlseg.distributed.batch_infer import BatchedBundleInference, ImagePrediction, error_message
from vlseg.distributed.context import DistContext, barrier, gather_to_main, shard

logger = logging.getLogger(__name__)

__all__ = ["PoolItem", "make_chunks", "run_pool", "PoolResult"]


@dataclass(frozen=True)
class PoolItem:
    image_id: str
    path: str


@dataclass
class PoolResult:
    """On rank 0: ``results`` / ``failed`` of every rank by image id, and the job's speed."""

    results: dict[str, dict]
    failed: dict[str, str]
    ranks: dict[str, int]  # image id -> rank that did it
    seconds: float
    images_per_s: float
    world_size: int


def make_chunks(items: Sequence[PoolItem], images_per_batch: int) -> list[list[PoolItem]]:
    """Consecutive chunks of ``images_per_batch`` items (the last one may be shorter)."""
    n = int(images_per_batch)
    if n < 1:
        raise ValueError(f"images per batch must be >= 1, got {images_per_batch}")
    return [list(items[i:i + n]) for i in range(0, len(items), n)]


class _ChunkDataset:
    """Dataset of chunks: item ``k`` = the preprocessed (image, prompt) items of chunk ``k`` (errors kept)."""

    def __init__(self, chunks, engine: BatchedBundleInference, prompts):
        self.chunks, self.engine, self.prompts = chunks, engine, prompts

    def __len__(self):
        return len(self.chunks)

    def __getitem__(self, k):
        prepared = {}
        for it in self.chunks[k]:
            for text, _ in self.prompts:
                try:
                    prepared[(it.image_id, text)] = self.engine.preprocess(it.path, text)
                except Exception as e:  # noqa: BLE001 - reported per image by predict_chunk
                    prepared[(it.image_id, text)] = RuntimeError(error_message(e))  # picklable, cause kept
        return k, prepared


def _loader(dataset: _ChunkDataset, num_workers: int):
    if num_workers <= 0:
        return (dataset[k] for k in range(len(dataset)))
    from torch.utils.data import DataLoader

    return DataLoader(dataset, batch_size=None, shuffle=False, num_workers=num_workers, collate_fn=lambda x: x,
                      prefetch_factor=2, persistent_workers=False)


def run_pool(ctx: DistContext, engine: BatchedBundleInference, items: Sequence[PoolItem],
             prompts: Sequence[tuple[str, int]], num_samples: int,
             handle: Callable[[PoolItem, ImagePrediction], dict], seed: int | None = None,
             images_per_batch: int = 4, num_workers: int = 0, progress: bool = True) -> PoolResult | None:
    """Run ``engine`` over this rank's chunks of ``items``, ``handle`` each image, gather to rank 0.

    ``items`` must be identical on every rank (broadcast it from rank 0). ``handle(item, prediction)`` returns a
    small picklable dict (it may write files); an exception in it fails that image only. Returns the gathered
    :class:`PoolResult` on rank 0 and None elsewhere.
    """
    if not prompts:
        raise ValueError("no prompts: give at least one")
    chunks = make_chunks(list(items), images_per_batch)
    mine = shard(chunks, ctx)
    n_mine = sum(len(c) for c in mine)
    results: dict[str, dict] = {}
    failed: dict[str, str] = {}
    barrier(ctx)
    t0 = time.perf_counter()
    bar = None
    if progress and ctx.is_main:
        from tqdm.auto import tqdm

        bar = tqdm(total=n_mine, unit="img", desc=f"scoring (rank 0 of {ctx.world_size})")
    try:
        for k, prepared in _loader(_ChunkDataset(mine, engine, prompts), num_workers):
            chunk = mine[k]
            try:
                preds, errors = engine.predict_chunk([(it.image_id, it.path) for it in chunk], prompts, num_samples,
                                                     seed=seed, prepared=prepared)
            except Exception as e:  # noqa: BLE001 - a broken chunk fails its images, not the job
                logger.warning("pool: chunk of %s failed: %s", [it.image_id for it in chunk], e)
                preds, errors = {}, {it.image_id: error_message(e) for it in chunk}
            failed.update(errors)
            for it in chunk:
                if it.image_id in preds:
                    try:
                        results[it.image_id] = handle(it, preds[it.image_id])
                    except Exception as e:  # noqa: BLE001
                        logger.warning("pool: %s failed: %s", it.image_id, e)
                        failed[it.image_id] = error_message(e)
            if bar is not None:
                bar.update(len(chunk))
    finally:
        if bar is not None:
            bar.close()
    gathered = gather_to_main({"results": results, "failed": failed, "rank": ctx.rank}, ctx)
    seconds = time.perf_counter() - t0
    if gathered is None:
        return None
    merged, merged_failed, ranks = {}, {}, {}
    for part in gathered:
        for image_id in list(part["results"]) + list(part["failed"]):
            if image_id in ranks:
                raise RuntimeError(f"image {image_id!r} was done by ranks {ranks[image_id]} and {part['rank']}: "
                                   "the work list differed between ranks")
            ranks[image_id] = part["rank"]
        merged.update(part["results"])
        merged_failed.update(part["failed"])
    rate = len(merged) / seconds if merged and seconds > 0 else 0.0
    return PoolResult(merged, merged_failed, ranks, seconds, rate, ctx.world_size)
