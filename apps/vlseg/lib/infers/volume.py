"""Batched volume inference for :class:`lib.infers.text_bundle.TextBundleInferTask`: a windowed volume, cut into
slices, goes through the bundle's own preprocessing, network (in batches of slices) and postprocessing, with no
file per slice and no re-parsing of the bundle config per slice.

Per request: the bundle's preprocessing / inferer / postprocessing are built once (MONAI Label's
``pre_transforms`` / ``inferer`` / ``post_transforms`` of the task, so every transform instance is the one the
per-slice path uses). The preprocessing is split into its loader (``LoadImaged``), the image transforms and the
text transforms (``SelectPromptd``, ``TokenizeTextd``): each prompt is tokenized once; each slice is loaded from
memory with the bundle's own reader (``PILReader.get_data`` on an in-memory image: the array and metadata
``LoadImaged`` makes from a PNG of that slice) and preprocessed once for all prompts. Batches of ``batch_size``
slices then run through the bundle's inferer (:class:`vlseg.inferers.StochasticTextInferer`) per prompt, and
the bundle's postprocessing (inverse resize / pad, clamps) follows: once per batch with the slices stacked as
channels when every step after the channel split acts per channel (:func:`channel_stackable`), else per slice.

Stochastic passes: a network without its own sampler (UA-VLS: Monte-Carlo dropout) is wrapped by
:class:`FoldedPasses`: the first pass runs alone (networks that cache their deterministic, text-independent parts
per image then compute them once), the other passes are folded into the batch (``pass-major`` rows, at most
``max_rows`` per forward). Networks with a sampler of their own (MedCLIPSeg's batched fast path, ViLMedSAM's
encoders-once sampler) use it unchanged.

Seeds: the inferer seeds its private RNG with ``seed`` once per network batch, as it does once per image in the
per-slice path. Where one pass is deterministic (``num_samples = 1`` with Monte-Carlo dropout: UA-VLS,
ViLMedSAM) both paths give the same maps (up to float rounding of batched kernels) and the same mask. Stochastic
passes (and MedCLIPSeg's single pass, which samples its noise too) draw per batch, so a slice's noise depends on
its batch (size and position): the maps equal the per-slice path's in distribution, not draw for draw, and the
same volume, seed and ``batch_size`` give the same maps again (on one device). At ``batch_size = 1`` a bundle
with its own sampler draws exactly what the per-slice path draws.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch
from monai.data import MetaTensor
from monai.data.image_reader import PILReader
from monai.transforms import (AsDiscreted, CastToTyped, CopyItemsd, EnsureChannelFirst, EnsureTyped, Invertd, Lambdad,
                              LoadImaged, ScaleIntensityRanged, apply_transform)
from monai.utils import ImageMetaKey, convert_to_dst_type
from monai.transforms.io.array import switch_endianness
from PIL import Image

from monailabel.transform.pre import LoadImageTensord

from lib import imageio
from lib.infers.prediction import Prediction, prompt_stats
from lib.params import RequestError
from lib.window import VolumeWindow, window_volume
from monailabel.transform.post import Restored
from vlseg.bundle_support import OutputNamed
from vlseg.data.transforms import SelectPromptd, SplitPredUncertaintyd
from vlseg.inferers import logits_of, mc_dropout, sample_probabilities

logger = logging.getLogger(__name__)

__all__ = ["VolumeBatchError", "FoldedPasses", "split_preprocessing", "slice_item", "channel_stackable",
           "postprocess_batch", "VolumeResult", "segment_volume", "segment_volume_per_slice", "predict_volume",
           "volume_batch_from_conf", "DEFAULT_MAX_ROWS"]

#: Most images in one forward of :class:`FoldedPasses` (slices x folded passes).
DEFAULT_MAX_ROWS = 64
#: Postprocessing transforms that act on every channel alone (the bundles' ``Lambdad`` are element-wise clamps), so
#: the slices of a batch can go through them once, stacked as channels.
CHANNELWISE_POST = (Invertd, Lambdad, ScaleIntensityRanged, CopyItemsd, AsDiscreted, Restored, OutputNamed,
                    EnsureTyped, CastToTyped)


class VolumeBatchError(RuntimeError):
    """The bundle's preprocessing cannot be split for batching; ``--conf volume_batch 0`` serves it per slice."""


class FoldedPasses:
    """A Monte-Carlo-dropout network whose passes run as batches: ``sample_probabilities`` -> ``[S, B, 1, H, W]``.

    Pass 0 runs alone (its deterministic parts fill the network's per-image caches), passes 1.. are folded into the
    batch, ``max_rows // B`` passes per forward. Calling the wrapper calls the network.
    """

    def __init__(self, network: torch.nn.Module, max_rows: int = DEFAULT_MAX_ROWS):
        self.network = network
        self.max_rows = max(1, int(max_rows))

    def __call__(self, *args, **kwargs):
        return self.network(*args, **kwargs)

    def sample_probabilities(self, image: torch.Tensor, *args, num_samples: int = 1, **kwargs) -> torch.Tensor:
        if num_samples <= 1:
            return sample_probabilities(self.network, image, *args, num_samples=num_samples, **kwargs)
        b, per, done, out = image.shape[0], max(1, self.max_rows // max(image.shape[0], 1)), 0, []

        def rep(t, k):
            return t.repeat(k, *([1] * (t.ndim - 1))) if torch.is_tensor(t) and t.ndim and t.shape[0] == b else t

        with mc_dropout(self.network):
            while done < num_samples:
                k = 1 if done == 0 else min(per, num_samples - done)
                logits = logits_of(self.network(rep(image, k), *(rep(a, k) for a in args),
                                                **{n: rep(v, k) for n, v in kwargs.items()}))
                out.append(torch.sigmoid(logits).reshape(k, b, *logits.shape[1:]))
                done += k
        return torch.cat(out)


def split_preprocessing(pre: Sequence, image_key: str) -> tuple[LoadImaged, list, list]:
    """``(loader, image transforms, text transforms)`` of a bundle's preprocessing list (MONAI Label's
    ``LoadImageTensord`` unwrapped). Raises :class:`VolumeBatchError` for a transform that acts on the image and
    other keys together, or one without ``keys``."""
    loader, image_ts, text_ts = None, [], []
    for t in pre:
        t = t.load_image_d if isinstance(t, LoadImageTensord) and t.load_image_d is not None else t
        keys = set(getattr(t, "keys", None) or ())
        if isinstance(t, LoadImaged) and keys == {image_key}:
            loader = t
        elif keys == {image_key}:
            image_ts.append(t)
        elif keys and image_key not in keys:
            text_ts.append(t)
        else:
            raise VolumeBatchError(f"preprocessing transform {type(t).__name__} (keys {sorted(keys)}) is not an "
                                   f"image-only or text-only transform; serve volumes per slice: --conf volume_batch 0")
    readers = getattr(getattr(loader, "_loader", None), "readers", None)
    if loader is None or not readers or not isinstance(readers[-1], PILReader):
        raise VolumeBatchError("batched volumes need a bundle that loads its images with LoadImaged(reader="
                               "'PILReader'); serve volumes per slice: --conf volume_batch 0")
    return loader, image_ts, text_ts


def slice_item(loader: LoadImaged, slice_u8: np.ndarray, name: str) -> dict:
    """``{image, image_meta_dict}`` as ``loader`` (the bundle's ``LoadImaged``, ``image_only=False``) makes them from
    a grey PNG holding ``slice_u8``, without the file: its ``PILReader`` reads the in-memory image, then LoadImage's
    dtype, metadata and channel steps follow."""
    load = loader._loader
    arr, meta = load.readers[-1].get_data(Image.fromarray(np.ascontiguousarray(slice_u8), mode="L"))
    arr = convert_to_dst_type(arr, dst=arr, dtype=load.dtype)[0]
    meta = switch_endianness(meta, "<")
    meta[ImageMetaKey.FILENAME_OR_OBJ] = name
    img = MetaTensor.ensure_torch_and_prune_meta(arr, meta, load.simple_keys, pattern=load.pattern, sep=load.sep)
    if load.ensure_channel_first:
        img = EnsureChannelFirst()(img)
    key = loader.keys[0]
    meta_key = loader.meta_keys[0] or f"{key}_{loader.meta_key_postfix[0]}"
    return {key: img, meta_key: img.meta}


def _run(transforms: Sequence, data: dict) -> dict:
    for t in transforms:
        data = apply_transform(t, data)
    return data


def channel_stackable(post: Sequence) -> bool:
    """Whether a postprocessing list is ``SplitPredUncertaintyd`` followed only by per-channel transforms
    (:data:`CHANNELWISE_POST`; ``AsDiscreted`` without argmax / one-hot)."""
    if not post or not isinstance(post[0], SplitPredUncertaintyd):
        return False
    for t in post[1:]:
        if not isinstance(t, CHANNELWISE_POST):
            return False
        if isinstance(t, AsDiscreted) and (any(t.argmax) or any(x is not None for x in t.to_onehot)):
            return False
    return True


def postprocess_batch(post: Sequence, stack: bool, out_key: str, rows: Sequence[tuple[dict, dict, torch.Tensor]]
                      ) -> list[dict]:
    """The bundle's postprocessing of network outputs, one dict per ``(text data, slice data, output [C, h, w])``.

    ``stack``: after the channel split, every output key holds all rows (the batch's slices for every prompt) as
    channels and the rest of the list runs once (the slices of one volume share their preprocessing, so inverting
    it once inverts it for each); otherwise the whole list runs per row. Outputs are MetaTensors as in the per-slice
    path, where the network gets the MetaTensor image (``Invertd`` inverts only MetaTensors).
    """
    dicts = [{**text, **it, out_key: MetaTensor(o)} for text, it, o in rows]
    if not stack:
        return [_run(post, d) for d in dicts]
    split = [_run(post[:1], d) for d in dicts]
    keys = [k for k in split[0] if k not in dicts[0] or k == out_key]
    d = dict(split[0])
    d.update({k: MetaTensor(torch.cat([s[k].as_tensor() for s in split])) for k in keys})
    d = _run(post[1:], d)
    # the split keys and their copies (CopyItemsd): one channel per slice
    made = [k for k, v in d.items() if (k not in dicts[0] or k == out_key) and isinstance(v, torch.Tensor)]
    return [{**d, **{k: d[k][i:i + 1] for k in made}} for i in range(len(dicts))]


class VolumeResult:
    """Per-slice results of every prompt put together on the volume's grid: the mask gets each prompt's value where
    that prompt is foreground (later prompts win on overlaps), every map is the maximum over the prompts."""

    def __init__(self, shape: tuple[int, ...], axis: int, prompts: Sequence):
        self.axis = axis
        self.mask = np.zeros(shape, np.uint8)
        self.uncertainty = np.zeros(shape, np.float32)
        self.maps: dict[str, np.ndarray] = {}
        self.per_prompt = {p: (np.zeros(shape, bool), np.zeros(shape, np.float32)) for p in prompts}

    def add(self, p, k: int, fg: np.ndarray, u: np.ndarray, more: dict[str, np.ndarray]) -> None:
        index = [slice(None)] * self.mask.ndim
        index[self.axis] = k
        index = tuple(index)
        self.mask[index][fg] = p.value
        self.uncertainty[index] = np.maximum(self.uncertainty[index], u)
        for key, a in more.items():
            m = self.maps.setdefault(key, np.zeros(self.mask.shape, np.float32))
            m[index] = np.maximum(m[index], a)
        self.per_prompt[p][0][index], self.per_prompt[p][1][index] = fg, u


def segment_volume(task, vol8: np.ndarray, axis: int, prompts: Sequence, num_samples: int, seed, device: str,
                   batch_size: int, base: dict, name: str = "volume", log_every: int = 25,
                   progress: Callable[[int, int], None] | None = None, max_rows: int = DEFAULT_MAX_ROWS):
    """Segment the uint8 volume ``vol8`` slice-wise along ``axis`` for every prompt of ``prompts``.

    ``task``: the :class:`~lib.infers.text_bundle.TextBundleInferTask`; ``base``: the request data its transforms
    are built with (:meth:`~lib.infers.text_bundle.TextBundleInferTask.request_data`). Returns the results on the
    volume's grid (:class:`VolumeResult`). A log line (and ``progress(done, total)``) follows every ``log_every``
    slices x prompts.
    """
    n_slices, total = vol8.shape[axis], vol8.shape[axis] * len(prompts)
    result = VolumeResult(vol8.shape, axis, prompts)
    start, done, logged = time.perf_counter(), 0, 0
    with task.lock:  # transforms, inferer and network as the task's per-slice calls build them
        data0 = dict(base, text=prompts[0].prompt)
        pre = task.pre_transforms(data0)
        loader, image_ts, text_ts = split_preprocessing(pre, task.input_key)
        inferer, network = task.inferer(data0), task._get_network(device, data0)
        texts = {}
        for p in prompts:
            for t in text_ts:
                if isinstance(t, SelectPromptd):
                    t.override = p.prompt
            texts[p] = _run(text_ts, {"text": p.prompt})
    if not hasattr(network, "sample_probabilities"):
        network = FoldedPasses(network, max_rows)
    post = stack = None
    for b0 in range(0, n_slices, max(1, int(batch_size))):
        ks = range(b0, min(b0 + max(1, int(batch_size)), n_slices))
        items = [_run(image_ts, slice_item(loader, np.take(vol8, k, axis=axis), f"{name}#{k}")) for k in ks]
        images = torch.stack([torch.as_tensor(it[task.input_key]).as_subclass(torch.Tensor) for it in items])
        shape_hw = np.take(vol8, b0, axis=axis).shape
        rows, keys = [], []  # every prompt's outputs of this batch, postprocessed together
        for p in prompts:
            ids = torch.as_tensor(texts[p]["text_ids"]).long()
            tmask = texts[p].get("text_mask")
            tmask = torch.ones_like(ids) if tmask is None else torch.as_tensor(tmask).long()
            with task.lock:
                out = task.infer_batch(inferer, network, images, ids.expand(len(ks), -1), tmask.expand(len(ks), -1),
                                       num_samples, seed, device)
            rows += [(texts[p], it, o) for it, o in zip(items, out)]
            keys += [(p, k) for k in ks]
        with task.lock:
            if post is None:
                post = task.post_transforms({task.output_label_key: rows[0][2]})
                stack = channel_stackable(post)
            for (p, k), d in zip(keys, postprocess_batch(post, stack, task.output_label_key, rows)):
                result.add(p, k, *task.outputs_2d(d, shape_hw))
        done += len(keys)
        if done - logged >= log_every or done == total:
            logged = done
            _progress(task, name, done, total, start, progress)
    return result


def _progress(task, name: str, done: int, total: int, start: float, progress) -> None:
    logger.info("%s: %s: %d/%d slices x prompts in %.1fs", task.bundle_name, name, done, total,
                time.perf_counter() - start)
    if progress is not None:
        progress(done, total)


def segment_volume_per_slice(task, vol8: np.ndarray, axis: int, prompts: Sequence, num_samples: int, seed,
                             extra: dict, name: str = "volume", log_every: int = 25,
                             progress: Callable[[int, int], None] | None = None) -> VolumeResult:
    """The older path (``--conf volume_batch 0``): every slice written as a PNG and segmented by one full MONAI
    Label bundle run per prompt (config parsed, batch 1). Kept for bundles whose preprocessing cannot be split and
    as the reference the batched path is tested and timed against."""
    result = VolumeResult(vol8.shape, axis, prompts)
    total, start, done = vol8.shape[axis] * len(prompts), time.perf_counter(), 0
    extra = dict(extra, logging="WARNING")
    with tempfile.TemporaryDirectory(prefix="vlseg_slices_") as tmp:
        for k in range(vol8.shape[axis]):
            sl = np.take(vol8, k, axis=axis)
            png = imageio.write_slice_png(sl, os.path.join(tmp, f"slice_{k:04d}.png"))
            for p in prompts:
                result.add(p, k, *task._run_2d(png, p.prompt, num_samples, seed, extra, sl.shape))
                done += 1
                if done % log_every == 0 or done == total:
                    _progress(task, name, done, total, start, progress)
    return result


def predict_volume(task, image_path: str, prompts: Sequence, num_samples: int, seed, axis: int, extra: dict,
                   window: VolumeWindow, modality: str | None = None, progress=None) -> Prediction:
    """Load, check, window (``window`` for an image of ``modality``) and segment a NIfTI volume for ``task``:
    batches of ``task.volume_batch`` slices (:func:`segment_volume`), or per slice when it is 0."""
    try:
        ref, vol = imageio.load_volume(image_path, max_voxels=task.max_volume_voxels)
    except imageio.ImageFileError as e:
        raise RequestError(str(e), status=e.status) from None
    except (OSError, ValueError) as e:
        raise RequestError(f"cannot use the volume: {e}") from None
    if vol.shape[axis] > task.max_slices:
        raise RequestError(f"the volume has {vol.shape[axis]} slices along axis {axis}; at most "
                           f"{task.max_slices} are segmented per request (--conf max_slices)", status=413)
    vol8, window_info = window_volume(vol, window, modality)
    name = os.path.basename(str(image_path))
    if task.volume_batch > 0:
        data, device = task.request_data(extra)
        res = segment_volume(task, vol8, axis, prompts, num_samples, seed, device, task.volume_batch, data, name,
                             task.volume_log_every, progress)
    else:
        res = segment_volume_per_slice(task, vol8, axis, prompts, num_samples, seed, extra, name,
                                       task.volume_log_every, progress)
    per_prompt = [prompt_stats(p, *res.per_prompt[p]) for p in prompts]
    return Prediction("volume", res.mask, res.uncertainty, per_prompt, ref=ref, axis=axis, maps=res.maps,
                      window=window_info)


def volume_batch_from_conf(conf: dict | None, default: int = 8) -> int:
    """``--conf volume_batch``: slices per network batch (default 8); 0: the per-slice path."""
    value = (conf or {}).get("volume_batch", default)
    try:
        n = int(str(value).strip())
    except ValueError:
        n = -1
    if n < 0:
        raise ValueError(f"--conf volume_batch must be an integer >= 0 (slices per network batch; 0: one bundle "
                         f"run per slice), got {value!r}")
    return n
