"""One MONAI Label infer task for every bundle that keeps the vlseg bundle contract.

``TextBundleInferTask`` is MONAI Label's ``BundleInferTask`` with what a text-prompted, uncertainty-aware bundle
needs on top:

* the bundle config is ``configs/inference.json`` merged with the size-variant override file (``tiny`` / ``small``);
* the prompt comes from the request (``text``, else ``label_prompt`` ids mapped to the app's label words, else the
  task's default prompt, which is in the task config and therefore editable in 3D Slicer's options panel); it is
  validated and given to the bundle's own ``SelectPromptd`` / ``TokenizeTextd`` through the data dictionary (never
  through the config: configs are code);
* ``run_inferer`` calls the bundle inferer (``vlseg.inferers.StochasticTextInferer``) with the token tensors and the
  requested ``num_samples`` / ``seed``;
* the answer is the binary (or class-valued) mask as the label file, the uncertainty map stored as a second file
  (datastore label tag ``uncertainty``, fetched with ``GET /datastore/label?label=<image>&tag=uncertainty``), the
  bundle's decomposed maps (``mutual_information``, ``std``; tags ``uncertainty_mutual_information`` /
  ``uncertainty_std``; request ``uncertainty_maps`` picks which, see :mod:`lib.infers.outputs`) and a JSON block with
  model, prompt, samples, latency, uncertainty statistics and image scores (:mod:`vlseg.scores`) and the
  checkpoint's identity;
* NIfTI volumes are segmented slice by slice along ``axis`` with the 2D bundle; mask and uncertainty come back as
  volumes on the input's grid and affine (uncertainty as float32).

Bad requests raise ``fastapi.HTTPException`` with a 4xx status and a readable message.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from monai.bundle import ConfigParser
from monai.transforms import Compose, LoadImaged, SaveImaged

from monailabel.interfaces.tasks.infer_v2 import InferType
from monailabel.tasks.infer.bundle import BundleInferTask
from monailabel.transform.post import Restored
from monailabel.transform.pre import LoadImageTensord

from lib import imageio
from lib.infers.outputs import deliver_map, map_tag, write_label, write_map
from lib.uncertain_segments import OFFSET, add_uncertain_segments, parse_threshold, uncertain_labels
from lib.params import (
    PromptSpec,
    RequestError,
    check_config_values,
    check_device,
    check_model_filename,
    check_prompt,
    http_error,
    parse_bool,
    parse_int,
    parse_map_names,
    resolve_prompts,
)
from vlseg.app_support.bundles import BundleError, checkpoint_identity, config_files, read_checkpoint_record
from vlseg.app_support.checkpoints import checkpoint_mismatch
from vlseg.data.transforms import ImageInputError, SelectPromptd
from vlseg.text.prompts import PromptError
from vlseg.scores import compute_scores
from vlseg.uncertainty import EXTRA_MAP_NAMES, uncertainty_scores

logger = logging.getLogger(__name__)

__all__ = ["TextBundleInferTask", "Prediction"]

#: Request keys this task reads (others that MONAI Label or the viewers send are passed through unused).
VLSEG_PARAMS = ("text", "label_prompt", "num_samples", "seed", "axis", "uncertainty_inline", "uncertainty_maps",
                "result_extension", "uncertain_segments")


@dataclass
class Prediction:
    """Mask (label values of the prompts), uncertainty map in [0, 1], the bundle's other maps and per-prompt
    statistics."""

    kind: str  # "2d" | "volume"
    mask: np.ndarray  # uint8, row-major 2D [H, W] or the volume's voxel grid
    uncertainty: np.ndarray  # float32, same shape
    prompts: list[dict] = field(default_factory=list)
    ref: Any = None  # nibabel image of a volume input
    axis: int | None = None
    maps: dict[str, np.ndarray] = field(default_factory=dict)  # "mutual_information", "std" (float32, same shape)

    def all_maps(self) -> dict[str, np.ndarray]:
        return {"uncertainty": self.uncertainty, **self.maps}


def _walk(transforms):
    for t in transforms:
        yield t
        if isinstance(t, LoadImageTensord) and t.load_image_d is not None:
            yield t.load_image_d
        if isinstance(t, Compose):
            yield from _walk(t.transforms)


def _user_error(e: BaseException | None) -> BaseException | None:
    """The prompt / image error inside ``e`` (MONAI's Compose wraps transform errors in RuntimeError)."""
    seen = 0
    while e is not None and seen < 10:
        if isinstance(e, (PromptError, ImageInputError)):
            return e
        e, seen = e.__cause__ or e.__context__, seen + 1
    return None


def _to_numpy_2d(x) -> np.ndarray:
    a = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    a = np.squeeze(a)
    if a.ndim != 2:
        raise RuntimeError(f"bundle output has shape {a.shape}; expected a single 2D map")
    return a


class TextBundleInferTask(BundleInferTask):
    """Text-prompted inference with an uncertainty map for one contract-keeping bundle (see module doc)."""

    def __init__(
        self,
        path: str,
        conf: dict,
        variant: str = "",
        label_names: dict[str, int] | None = None,
        default_prompt: str | None = None,
        max_samples: int = 64,
        max_image_pixels: int = 25_000_000,
        max_volume_voxels: int = 256_000_000,
        max_slices: int = 1024,
        volume_axis: int = 2,
        datastore=None,
        uncertainty_tag: str = "uncertainty",
        store_uncertainty: bool = True,
        uncertain_segments: float | None = None,
        **kwargs,
    ):
        self.variant = variant or ""
        self.label_names = dict(label_names or {})
        self.max_samples = int(max_samples)
        self.max_image_pixels = int(max_image_pixels)
        self.max_volume_voxels = int(max_volume_voxels)
        self.max_slices = int(max_slices)
        self.volume_axis = int(volume_axis)
        self.datastore = datastore
        self.uncertainty_tag = uncertainty_tag
        self.store_uncertainty = bool(store_uncertainty)
        self.uncertain_segments = uncertain_segments  # threshold of the extra "uncertain" label segments, or None
        self._reversed_axes = True
        # MONAI Label's bundle task re-parses the config and reloads the bundle's ``scripts`` on every call, and the
        # stochastic passes switch dropout modes and seed the global RNG: one call at a time per task (the scoring's
        # worker threads overlap everything else)
        self.lock = threading.RLock()
        super().__init__(path, conf, post_filter=[SaveImaged], load_strict=True, **kwargs)
        if not self.valid:
            return

        with open(os.path.join(path, "configs", "metadata.json")) as fp:
            outputs = list(json.load(fp)["network_data_format"]["outputs"])
        self.key_uncertainty = outputs[1] if len(outputs) > 1 else "uncertainty"
        self.map_keys = tuple(k for k in EXTRA_MAP_NAMES if k in outputs)  # decomposed maps the bundle declares
        self.bundle_name = os.path.basename(os.path.normpath(path))
        self.bundle_labels = dict(self.labels) if isinstance(self.labels, dict) else {}
        # viewers (OHIF class prompts) list the app's label words for this model
        if self.label_names:
            self.labels = dict(self.label_names)
            if self.uncertain_segments is not None:  # viewers create, name and colour these segments too
                self.labels.update(uncertain_labels(self.label_names))
        if self.type != InferType.SEGMENTATION:
            self.type = InferType.SEGMENTATION

        bundle_text = self.bundle_config.get("text")
        try:
            bundle_text = check_prompt(bundle_text) if isinstance(bundle_text, str) and bundle_text.strip() else None
        except RequestError:  # e.g. an expression: not a usable default prompt
            bundle_text = None
        first_label = next(iter(self.label_names), None)
        self.default_prompt = check_prompt(default_prompt or bundle_text or first_label or "lesion")
        ns = self.bundle_config.get("num_samples")
        self.default_samples = min(int(ns) if isinstance(ns, int) and ns >= 1 else 8, self.max_samples)
        self._config.update({"text": self.default_prompt, "num_samples": self.default_samples})
        self._check_checkpoint()

    # ------------------------------------------------------------------ config / checkpoint
    def _load_bundle_config(self, path, config):
        parser = ConfigParser()
        parser.read_config([str(f) for f in config_files(path, "inference", self.variant)])
        parser.config.update({self.const.key_bundle_root(): path})
        return parser

    def _check_checkpoint(self) -> None:
        """Fail at start-up (bundle skipped with a clear log) when ``models/model.pt`` does not fit this variant."""
        path = self.get_path()
        record = read_checkpoint_record(self.bundle_path)
        if record and record.get("variant", "") != self.variant:
            raise BundleError(
                f"models/model.pt was made for variant {record.get('variant') or 'default'!r}, the app serves "
                f"{self.variant or 'default'!r}; run: python -m vlseg.app_support.checkpoints --bundle "
                f"{self.bundle_path} --variant {self.variant or ''!r} --force")
        if self.network is None or not path or not path.endswith(".pt"):
            return
        why = checkpoint_mismatch(self.bundle_path, self.variant, network=self.network)
        if why:
            raise BundleError(
                f"models/model.pt does not fit the {self.variant or 'default'!r} variant's network ({why}); "
                f"retrain it: python -m vlseg.app_support.checkpoints --bundle {self.bundle_path} "
                f"--variant {self.variant or ''!r} --force")

    def checkpoint(self) -> dict:
        ident = checkpoint_identity(self.get_path()) if self.get_path() else {"missing": True}
        ident["variant"] = self.variant
        return ident

    def info(self) -> dict[str, Any]:
        i = super().info()
        i["vlseg"] = {
            "bundle": self.bundle_path,
            "variant": self.variant,
            "default_prompt": self.default_prompt,
            "max_samples": self.max_samples,
            "volume_axis": self.volume_axis,
            "bundle_labels": self.bundle_labels,
            "uncertainty_tag": self.uncertainty_tag,
            "maps": {k: map_tag(self.uncertainty_tag, k) for k in ("uncertainty",) + self.map_keys},
            "checkpoint": self.checkpoint(),
        }
        return i

    # ------------------------------------------------------------------ transforms / inferer
    def pre_transforms(self, data=None) -> Sequence:
        pre = super().pre_transforms(data)
        prompt = data.get("text") if data else None
        for t in _walk(pre):
            if isinstance(t, SelectPromptd) and prompt is not None:
                t.override = prompt  # the validated request prompt wins over the config's `text`
            if isinstance(t, LoadImaged):
                readers = getattr(t._loader, "readers", [])
                self._reversed_axes = bool(getattr(readers[-1], "reverse_indexing", True)) if readers else True
        return pre

    def post_transforms(self, data=None) -> Sequence:
        post = [t for t in super().post_transforms(data)
                if not any(w in type(t).__name__ for w in ("Save", "Overlay", "Writer", "Write"))]
        # the bundle inverts its resizing; Restored is a no-op then and a safety net otherwise
        # the maps split off the inferer's output: 2 channels, or 4 when the bundle's inferer decomposes
        out = (data or {}).get(self.output_label_key)
        decomposed = out is None or getattr(out, "shape", (0,))[0] > 2
        keys = [self.key_uncertainty, *(self.map_keys if decomposed else ())]
        post.append(Restored(keys=keys, ref_image=self.key_image, mode="bilinear"))
        return post

    def run_inferer(self, data: dict[str, Any], convert_to_batch=True, device="cuda"):
        inferer = self.inferer(data)
        network = self._get_network(device, data)
        dev = torch.device(device)
        image = data[self.input_key]
        image = image if torch.is_tensor(image) else torch.from_numpy(np.asarray(image))
        ids, mask = data.get("text_ids"), data.get("text_mask")
        if ids is None:
            raise RuntimeError(f"{self.bundle_name}: preprocessing produced no text_ids (TokenizeTextd missing?)")
        ids = torch.as_tensor(ids).long()
        mask = torch.ones_like(ids) if mask is None else torch.as_tensor(mask).long()
        if convert_to_batch:
            image, ids, mask = image[None], ids[None], mask[None]
        num_samples = int(data.get("num_samples") or self.default_samples)
        seed = data.get("seed")
        old_seed = getattr(inferer, "seed", None)
        if seed is not None and hasattr(inferer, "seed"):
            inferer.seed = int(seed)
        try:
            with torch.no_grad():
                out = inferer(image.to(dev), network, ids.to(dev), mask.to(dev), num_samples=num_samples)
        finally:
            if hasattr(inferer, "seed"):
                inferer.seed = old_seed
        if isinstance(out, dict):
            raise RuntimeError(f"{self.bundle_name}: inferer returned a dict; the contract asks for [B,2,H,W]")
        data[self.output_label_key] = out[0] if convert_to_batch else out
        return data

    # ------------------------------------------------------------------ request handling
    def parse_request(self, request: dict) -> dict:
        """Validated vlseg parameters of ``request``; raises :class:`RequestError` (-> HTTP 4xx)."""
        check_device(request)
        check_model_filename(request, os.path.join(self.bundle_path, "models"))
        check_config_values(request, list(getattr(self, "displayable_configs", {}) or {}))
        prompts = resolve_prompts(request, self.label_names, self._config.get("text") or self.default_prompt)
        ext = request.get("result_extension")
        if ext not in (None, "", ".png", ".nii", ".nii.gz", ".nrrd"):
            raise RequestError(f"result_extension must be .png, .nii, .nii.gz or .nrrd, got {ext!r}")
        return {
            "prompts": prompts,
            "num_samples": parse_int(request, "num_samples", self.default_samples, 1, self.max_samples),
            "seed": parse_int(request, "seed", None, 0, 2**31 - 1),
            "axis": parse_int(request, "axis", self.volume_axis, 0, 2),
            "inline": parse_bool(request, "uncertainty_inline", False),
            "maps": parse_map_names(request, "uncertainty_maps", self.map_keys),
            "result_extension": ext or None,
            "uncertain_threshold": self._uncertain_threshold(request),
        }

    def _uncertain_threshold(self, request: dict) -> float | None:
        """Request ``uncertain_segments`` (true / false / a threshold in (0, 1]) over ``--conf uncertain_segments``;
        ``true`` takes the configured threshold when there is one."""
        value = request.get("uncertain_segments")
        if value in (None, ""):
            return self.uncertain_segments
        try:
            threshold = parse_threshold(value)
        except ValueError as e:
            raise RequestError(str(e)) from None
        if threshold is not None and str(value).strip().lower() in ("true", "yes", "on"):
            return self.uncertain_segments or threshold
        return threshold

    def _run_2d(self, png_path: str, prompt: str, num_samples: int, seed, extra: dict,
                shape_hw: tuple[int, int], callbacks=None) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        """One 2D image, one prompt -> (foreground mask bool [H,W], uncertainty float32 [H,W], the bundle's other
        maps by name), row-major."""
        req = dict(extra)
        req.update({"image": png_path, "text": prompt, "num_samples": num_samples, "seed": seed, "skip_writer": True})
        with self.lock:
            _, data = BundleInferTask.__call__(self, req, callbacks)
        keys = {"pred": self.output_label_key, "uncertainty": self.key_uncertainty,
                **{k: k for k in self.map_keys if data.get(k) is not None}}
        h, w = shape_hw
        out = {}
        for name, key in keys.items():
            a = _to_numpy_2d(data[key])
            if a.shape == (w, h) and (h != w or self._reversed_axes):
                a = a.T
            if a.shape != (h, w):
                raise RuntimeError(f"{self.bundle_name}: output {name} {a.shape} does not match the input {(h, w)}")
            out[name] = a if name == "pred" else np.clip(a, 0.0, 1.0).astype(np.float32)
        return out.pop("pred") > 0.5, out.pop("uncertainty"), out

    def predict(self, image_path: str, prompts: list[PromptSpec], num_samples: int, seed=None, axis: int | None = None,
                extra: dict | None = None, callbacks=None) -> Prediction:
        """Segment a 2D image or a NIfTI volume (slice by slice) for each prompt and combine the results.

        The mask gets each prompt's value where that prompt is foreground (later prompts win on overlaps); every
        uncertainty map is the element-wise maximum over the prompts.
        """
        extra = {k: v for k, v in (extra or {}).items() if k in ("device", "model_filename", "logging")}
        kind = imageio.image_kind(image_path)
        per_prompt = []
        if kind == "2d":
            try:
                shape_hw = imageio.check_image_2d(image_path, self.max_image_pixels)
            except imageio.ImageFileError as e:
                raise RequestError(str(e), status=e.status) from None
            mask = np.zeros(shape_hw, np.uint8)
            unc = np.zeros(shape_hw, np.float32)
            maps: dict[str, np.ndarray] = {}
            for p in prompts:
                fg, u, more = self._run_2d(image_path, p.prompt, num_samples, seed, extra, shape_hw, callbacks)
                mask[fg] = p.value
                np.maximum(unc, u, out=unc)
                for k, a in more.items():
                    np.maximum(maps.setdefault(k, np.zeros(shape_hw, np.float32)), a, out=maps[k])
                per_prompt.append(self._prompt_stats(p, fg, u))
            return Prediction("2d", mask, unc, per_prompt, maps=maps)
        if kind == "volume":
            axis = self.volume_axis if axis is None else int(axis)
            try:
                ref, vol = imageio.load_volume(image_path, max_voxels=self.max_volume_voxels)
            except imageio.ImageFileError as e:
                raise RequestError(str(e), status=e.status) from None
            except (OSError, ValueError) as e:
                raise RequestError(f"cannot use the volume: {e}") from None
            if vol.shape[axis] > self.max_slices:
                raise RequestError(f"the volume has {vol.shape[axis]} slices along axis {axis}; at most "
                                   f"{self.max_slices} are segmented per request (--conf max_slices)", status=413)
            vol8 = imageio.window_to_uint8(vol)
            mask = np.zeros(vol.shape, np.uint8)
            unc = np.zeros(vol.shape, np.float32)
            maps = {}
            stats = {p: [np.zeros(vol.shape, bool), np.zeros(vol.shape, np.float32)] for p in prompts}
            extra = dict(extra, logging="WARNING")
            with tempfile.TemporaryDirectory(prefix="vlseg_slices_") as tmp:
                for k in range(vol.shape[axis]):
                    sl = np.take(vol8, k, axis=axis)
                    png = imageio.write_slice_png(sl, os.path.join(tmp, f"slice_{k:04d}.png"))
                    index = [slice(None)] * 3
                    index[axis] = k
                    index = tuple(index)
                    for p in prompts:
                        fg, u, more = self._run_2d(png, p.prompt, num_samples, seed, extra, sl.shape)
                        mask[index][fg] = p.value
                        unc[index] = np.maximum(unc[index], u)
                        for name, a in more.items():
                            m = maps.setdefault(name, np.zeros(vol.shape, np.float32))
                            m[index] = np.maximum(m[index], a)
                        stats[p][0][index], stats[p][1][index] = fg, u
            per_prompt = [self._prompt_stats(p, *stats[p]) for p in prompts]
            return Prediction("volume", mask, unc, per_prompt, ref=ref, axis=axis, maps=maps)
        raise RequestError(f"unsupported image type {os.path.basename(image_path)!r}: use a 2D image "
                           f"({', '.join(imageio.IMAGE_2D_EXT)}) or a NIfTI volume (.nii, .nii.gz)", status=415)

    @staticmethod
    def _prompt_stats(p: PromptSpec, fg: np.ndarray, u: np.ndarray) -> dict:
        s = uncertainty_scores(torch.from_numpy(np.ascontiguousarray(u)))
        return {**p.as_dict(), "foreground_pixels": int(fg.sum()), "uncertainty_mean": round(s["mean"], 6),
                "uncertainty_top5": round(s["top5"], 6), "uncertainty_max": round(s["max"], 6)}

    def __call__(self, request, callbacks=None):
        start = time.perf_counter()
        image = request.get("image")
        try:
            params = self.parse_request(request)
            if not isinstance(image, str) or not image:
                raise RequestError("no image: give an image id of the datastore or upload a file", status=404)
            if not os.path.isfile(image):
                raise RequestError(f"image {request.get('vlseg_image_id') or image!r} not found", status=404)
            pred = self.predict(image, params["prompts"], params["num_samples"], params["seed"], params["axis"],
                                extra=request, callbacks=callbacks)
        except RequestError as e:
            logger.warning("%s: refused request: %s", getattr(self, "bundle_name", "?"), e)
            raise http_error(e) from None
        except Exception as e:
            user = _user_error(e)
            if user is None:
                raise
            logger.warning("%s: refused input: %s", getattr(self, "bundle_name", "?"), user)
            raise http_error(user, 422) from None
        infer_s = time.perf_counter() - start
        scores = uncertainty_scores(torch.from_numpy(pred.uncertainty))
        info: dict[str, Any] = {
            "model": self.bundle_name,
            "variant": self.variant,
            "prompt": " | ".join(p.prompt for p in params["prompts"]),
            "prompt_source": params["prompts"][0].source,
            "prompts": pred.prompts,
            "num_samples": params["num_samples"],
            "seed": params["seed"],
            "kind": pred.kind,
            "shape": list(pred.mask.shape),
            "axis": pred.axis,
            "foreground_pixels": int((pred.mask > 0).sum()),
            "uncertainty_mean": round(scores["mean"], 6),
            "uncertainty_top5": round(scores["top5"], 6),
            "uncertainty_max": round(scores["max"], 6),
            "scores": {k: round(v, 6) for k, v in compute_scores(pred.all_maps(), mask=pred.mask > 0).items()},
            "checkpoint": self.checkpoint(),
            "label_names": {p.prompt: p.value for p in params["prompts"]},
        }
        if params["uncertain_threshold"] is not None:  # drawn in any labelmap viewer (lib.uncertain_segments)
            pred.mask = add_uncertain_segments(pred.mask, pred.uncertainty, params["uncertain_threshold"])
            extra = {n: v for n, v in uncertain_labels(info["label_names"]).items() if (pred.mask == v).any()}
            info["label_names"].update(extra)
            info["uncertain_segments"] = {"threshold": params["uncertain_threshold"], "segments": extra,
                                          "pixels": int((pred.mask > OFFSET).sum())}
        label_file = write_label(pred, params)
        info["uncertainty"] = self._deliver(request, "uncertainty", pred.uncertainty, pred, params, info)
        info["maps"] = {name: self._deliver(request, name, pred.maps[name], pred, params, info)
                        for name in params["maps"] if name in pred.maps}
        total = time.perf_counter() - start
        info["latency_s"] = round(total, 4)
        info["latencies"] = {"infer": round(infer_s, 4), "write": round(total - infer_s, 4), "total": round(total, 4)}
        logger.info("%s: prompt=%r samples=%d %s mask=%s fg=%d unc_mean=%.4f unc_max=%.4f in %.2fs", self.bundle_name,
                    info["prompt"], params["num_samples"], pred.kind, info["shape"], info["foreground_pixels"],
                    info["uncertainty_mean"], info["uncertainty_max"], total)
        return label_file, info

    # ------------------------------------------------------------------ outputs
    def _deliver(self, request: dict, name: str, array: np.ndarray, pred: Prediction, params: dict, info: dict) -> dict:
        """Write the map ``name``, store it under its tag (:func:`lib.infers.outputs.map_tag`), inline on request."""
        path, meta = write_map(pred, array)
        label_info = {k: info[k] for k in ("model", "variant", "prompt", "num_samples", "kind")}
        if name == "uncertainty":
            label_info.update({k: info[k] for k in ("uncertainty_mean", "uncertainty_max", "uncertainty_top5")})
        else:
            label_info.update(map=name, mean=round(float(np.mean(array, dtype=np.float64)), 6))
        out = deliver_map(self, request, map_tag(self.uncertainty_tag, name), path, meta, label_info)
        if params["inline"]:
            out["npy_base64"] = imageio.npy_base64(array)
        return out
