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
  checkpoint's identity (:mod:`lib.infers.answer`);
* NIfTI volumes are windowed (:mod:`lib.window`: ``--conf volume_window`` / ``ct_window``, request ``window``)
  and segmented slice-wise along ``axis`` with the 2D bundle, in batches of ``volume_batch`` slices
  (:mod:`lib.infers.volume`; ``volume_batch 0``: one bundle run per slice and prompt from a PNG, the older path);
  mask and uncertainty come back as volumes on the input's grid and affine (uncertainty as float32).

Bad requests raise ``fastapi.HTTPException`` with a 4xx status and a readable message.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from monai.bundle import ConfigParser
from monai.transforms import Compose, LoadImaged, SaveImaged

from monailabel.interfaces.tasks.infer_v2 import InferType
from monailabel.tasks.infer.bundle import BundleInferTask
from monailabel.transform.post import Restored
from monailabel.transform.pre import LoadImageTensord
from monailabel.utils.others.generic import name_to_device

from lib import imageio
from lib.infers import volume as volume_path
from lib.infers.outputs import map_tag
from lib.infers.prediction import Prediction, prompt_stats, to_numpy_2d
from lib.infers.request import parse_request, user_error
from lib.infers.answer import answer
from lib.window import VolumeWindow, image_modality
from lib.uncertain_segments import uncertain_labels
from lib.params import PromptSpec, RequestError, check_prompt, http_error
from vlseg.app_support.bundles import BundleError, checkpoint_identity, config_files, read_checkpoint_record
from vlseg.app_support.checkpoints import checkpoint_mismatch
from vlseg.data.transforms import SelectPromptd
from vlseg.uncertainty import EXTRA_MAP_NAMES

logger = logging.getLogger(__name__)

__all__ = ["TextBundleInferTask", "Prediction"]

#: Request keys this task reads (others that MONAI Label or the viewers send are passed through unused).
VLSEG_PARAMS = ("text", "label_prompt", "num_samples", "seed", "axis", "uncertainty_inline", "uncertainty_maps",
                "result_extension", "uncertain_segments", "window")


def _walk(transforms):
    for t in transforms:
        yield t
        if isinstance(t, LoadImageTensord) and t.load_image_d is not None:
            yield t.load_image_d
        if isinstance(t, Compose):
            yield from _walk(t.transforms)


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
        volume_batch: int = 8,
        volume_window: VolumeWindow | None = None,
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
        if int(volume_batch) < 0:
            raise ValueError(f"volume_batch must be >= 0 (0: one bundle run per slice), got {volume_batch}")
        self.volume_batch = int(volume_batch)  # slices per network batch; 0: the per-slice path
        self.volume_window = volume_window or VolumeWindow()
        self.volume_log_every = 25  # a progress line every this many slices x prompts
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
        if self.volume_batch:  # a bundle whose preprocessing cannot be split is served per slice, said at start-up
            try:
                volume_path.split_preprocessing(self.pre_transforms(self.request_data({})[0]), self.input_key)
            except volume_path.VolumeBatchError as e:
                logger.warning("%s: %s; its volumes are segmented per slice", self.bundle_name, e)
                self.volume_batch = 0

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
            "volume_batch": self.volume_batch,
            "volume_window": {"mode": self.volume_window.mode, "ct_window": list(self.volume_window.ct),
                              "fixed": list(self.volume_window.fixed) if self.volume_window.fixed else None},
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
        image = data[self.input_key]
        image = image if torch.is_tensor(image) else torch.from_numpy(np.asarray(image))
        ids, mask = data.get("text_ids"), data.get("text_mask")
        if ids is None:
            raise RuntimeError(f"{self.bundle_name}: preprocessing produced no text_ids (TokenizeTextd missing?)")
        ids = torch.as_tensor(ids).long()
        mask = torch.ones_like(ids) if mask is None else torch.as_tensor(mask).long()
        if convert_to_batch:
            image, ids, mask = image[None], ids[None], mask[None]
        out = self.infer_batch(inferer, network, image, ids, mask, int(data.get("num_samples") or self.default_samples),
                               data.get("seed"), device)
        data[self.output_label_key] = out[0] if convert_to_batch else out
        return data

    def infer_batch(self, inferer, network, image, ids, mask, num_samples: int, seed, device) -> torch.Tensor:
        """The bundle inferer on a batch ``[B, C, H, W]`` with token tensors ``[B, L]``; a request ``seed`` replaces
        the inferer's own for this call."""
        dev = torch.device(device)
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
        return out

    # ------------------------------------------------------------------ request handling
    def parse_request(self, request: dict) -> dict:
        """Validated vlseg parameters of ``request`` (:func:`lib.infers.request.parse_request`)."""
        return parse_request(self, request)

    def _run_2d(self, png_path: str, prompt: str, num_samples: int, seed, extra: dict,
                shape_hw: tuple[int, int], callbacks=None) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        """One 2D image, one prompt -> (foreground mask bool [H,W], uncertainty float32 [H,W], the bundle's other
        maps by name), row-major."""
        req = dict(extra)
        req.update({"image": png_path, "text": prompt, "num_samples": num_samples, "seed": seed, "skip_writer": True})
        with self.lock:
            _, data = BundleInferTask.__call__(self, req, callbacks)
        return self.outputs_2d(data, shape_hw)

    def outputs_2d(self, data: dict, shape_hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        """Postprocessed ``data`` of one image -> (foreground mask, uncertainty, other maps), row-major ``shape_hw``."""
        keys = {"pred": self.output_label_key, "uncertainty": self.key_uncertainty,
                **{k: k for k in self.map_keys if data.get(k) is not None}}
        h, w = shape_hw
        out = {}
        for name, key in keys.items():
            a = to_numpy_2d(data[key])
            if a.shape == (w, h) and (h != w or self._reversed_axes):
                a = a.T
            if a.shape != (h, w):
                raise RuntimeError(f"{self.bundle_name}: output {name} {a.shape} does not match the input {(h, w)}")
            out[name] = a if name == "pred" else np.clip(a, 0.0, 1.0).astype(np.float32)
        return out.pop("pred") > 0.5, out.pop("uncertainty"), out

    def predict(self, image_path: str, prompts: list[PromptSpec], num_samples: int, seed=None, axis: int | None = None,
                extra: dict | None = None, callbacks=None, window: VolumeWindow | None = None) -> Prediction:
        """Segment a 2D image or a NIfTI volume (slice-wise, :func:`lib.infers.volume.predict_volume`) for each
        prompt and combine the results.

        The mask gets each prompt's value where that prompt is foreground (later prompts win on overlaps); every
        uncertainty map is the element-wise maximum over the prompts. ``window``: the volume window (default the
        task's ``--conf`` one); the modality comes from the datastore's info of ``extra["vlseg_image_id"]``.
        """
        image_id = (extra or {}).get("vlseg_image_id")
        extra = {k: v for k, v in (extra or {}).items() if k in ("device", "model_filename", "logging")}
        kind = imageio.image_kind(image_path)
        if kind == "volume":
            return volume_path.predict_volume(self, image_path, prompts, num_samples, seed,
                                               self.volume_axis if axis is None else int(axis), extra,
                                               window or self.volume_window, image_modality(self.datastore, image_id))
        if kind != "2d":
            raise RequestError(f"unsupported image type {os.path.basename(image_path)!r}: use a 2D image "
                               f"({', '.join(imageio.IMAGE_2D_EXT)}) or a NIfTI volume (.nii, .nii.gz)", status=415)
        try:
            shape_hw = imageio.check_image_2d(image_path, self.max_image_pixels)
        except imageio.ImageFileError as e:
            raise RequestError(str(e), status=e.status) from None
        mask = np.zeros(shape_hw, np.uint8)
        unc = np.zeros(shape_hw, np.float32)
        maps: dict[str, np.ndarray] = {}
        per_prompt = []
        for p in prompts:
            fg, u, more = self._run_2d(image_path, p.prompt, num_samples, seed, extra, shape_hw, callbacks)
            mask[fg] = p.value
            np.maximum(unc, u, out=unc)
            for k, a in more.items():
                np.maximum(maps.setdefault(k, np.zeros(shape_hw, np.float32)), a, out=maps[k])
            per_prompt.append(prompt_stats(p, fg, u))
        return Prediction("2d", mask, unc, per_prompt, maps=maps)

    def request_data(self, extra: dict) -> tuple[dict, str]:
        """``(data, device)``: the task config updated with ``extra``, as MONAI Label's ``__call__`` builds it."""
        data = copy.deepcopy(self._config)
        data.update(extra)
        data["device"] = name_to_device(data.get("device", "cuda"))
        return data, data["device"]

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
                                extra=request, callbacks=callbacks, window=params["window"])
        except RequestError as e:
            logger.warning("%s: refused request: %s", getattr(self, "bundle_name", "?"), e)
            raise http_error(e) from None
        except Exception as e:
            user = user_error(e)
            if user is None:
                raise
            logger.warning("%s: refused input: %s", getattr(self, "bundle_name", "?"), user)
            raise http_error(user, 422) from None
        return answer(self, request, params, pred, start)
