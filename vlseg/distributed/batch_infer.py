"""A bundle's inference on many 2D images at once: its own preprocessing, network, inferer and postprocessing.

What the MONAI Label app does for one image and one prompt per call (``apps/vlseg/lib/infers/text_bundle.py``),
done for a chunk of (image, prompt) items per forward pass:

1. the bundle's ``preprocessing`` on ``{"image": path, "text": prompt}`` per item (its ``SelectPromptd`` takes the
   item's prompt: a ``text`` set in the config is not applied, as the app's request prompt wins over it);
2. items of equal preprocessed shape are collated (``list_data_collate``) and go through the bundle's ``inferer``
   (:class:`vlseg.inferers.StochasticTextInferer`) in one call with ``num_samples`` passes and the chunk's seed;
3. the bundle's ``postprocessing`` per item (``decollate_batch``; ``Invertd`` maps back to the image grid) without
   the transforms that write files (the app drops the same ones);
4. per image, the prompts are combined as the app combines them: the mask takes each prompt's value where that
   prompt is foreground (later prompts win), every map is the pixel-wise maximum over the prompts.

Seeding: the stochastic passes of a forward draw their dropout masks / noise for the whole batch tensor, so an
image's maps depend on the other items of its batch and on the seed. :meth:`BatchedBundleInference.predict_chunk`
seeds every chunk with the same seed (the inferer's configured one unless given, as the app's scoring does for
each image), and the pool job forms the chunks before it shards them, so a chunk gives the same numbers on any rank
and with any number of processes.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from vlseg.bench.bundles import BundleModel, find_transform
from vlseg.bundles import bundle_context
from vlseg.uncertainty import EXTRA_MAP_NAMES

__all__ = ["ImagePrediction", "BatchedBundleInference", "FILE_WRITING_TRANSFORMS", "error_message"]

#: class-name fragments of postprocessing transforms that write files (dropped, as the app's infer task does)
FILE_WRITING_TRANSFORMS = ("Save", "Overlay", "Writer", "Write")


@dataclass
class ImagePrediction:
    """One image, all prompts combined: mask (uint8, prompt values) and maps (float32 in [0, 1]), row-major [H, W]."""

    mask: np.ndarray
    maps: dict[str, np.ndarray]
    prompts: list[dict] = field(default_factory=list)  # per prompt: prompt, value, foreground_pixels


def error_message(e: BaseException) -> str:
    """``Type: message`` of the innermost cause (MONAI's Compose wraps a transform's error in "applying transform
    ..."), its first line, with the transform named when there was one."""
    outer, seen = e, 0
    while (e.__cause__ or e.__context__) is not None and seen < 10:
        e, seen = e.__cause__ or e.__context__, seen + 1
    text = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:300]  # no tracebacks
    where = str(outer).split(" object at ")[0].rsplit(".", 1)[-1] if "applying transform" in str(outer) else ""
    return f"{where}: {text}" if where else text


def _image_size_hw(path: str) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as im:
        return im.size[1], im.size[0]


class BatchedBundleInference:
    """Batched inference of one loaded bundle (:func:`vlseg.bench.bundles.load_bundle_model`) on ``device``."""

    def __init__(self, model: BundleModel, device: torch.device | str = "cpu"):
        if model.preprocessing is None or model.inferer is None:
            raise ValueError(f"{model.name}: load the bundle with its preprocessing and inferer "
                             "(load_bundle_model(..., with_preprocessing=True))")
        self.model = model
        self.device = torch.device(device)
        self.network = model.network.to(self.device).eval()
        self.preprocessing = model.preprocessing
        self.inferer = model.inferer
        select = find_transform(self.preprocessing, "SelectPromptd")
        if select is None:
            raise ValueError(f"{model.name}: its preprocessing has no SelectPromptd; it does not keep the vlseg bundle "
                             "contract (text-prompted inputs)")
        select.override = None  # the item's prompt wins over a ``text`` of the config, as in the app
        load = find_transform(self.preprocessing, "LoadImaged")
        readers = getattr(getattr(load, "_loader", None), "readers", []) or []
        self.reversed_axes = bool(getattr(readers[-1], "reverse_indexing", True)) if readers else True
        with bundle_context(model.root):
            post = model.parser.get_parsed_content("postprocessing", instantiate=True)
        from monai.transforms import Compose

        kept = [t for t in getattr(post, "transforms", [post])
                if not any(w in type(t).__name__ for w in FILE_WRITING_TRANSFORMS)]
        self.postprocessing = Compose(kept)
        self.default_seed = getattr(self.inferer, "seed", None)

    # ------------------------------------------------------------------ per item
    def preprocess(self, path: str, prompt: str) -> dict:
        """The bundle's preprocessing of one (image, prompt) item."""
        return self.preprocessing({"image": path, "text": prompt})

    def _forward(self, items: list[dict], num_samples: int, seed: int | None) -> list[dict]:
        from monai.data import decollate_batch, list_data_collate

        batch = list_data_collate(items)
        image = batch["image"]
        ids = torch.as_tensor(batch["text_ids"]).long()
        mask = batch.get("text_mask")
        mask = torch.ones_like(ids) if mask is None else torch.as_tensor(mask).long()
        old_seed = getattr(self.inferer, "seed", None)
        if hasattr(self.inferer, "seed"):
            self.inferer.seed = seed
        try:
            with torch.no_grad():
                out = self.inferer(image.to(self.device), self.network, ids.to(self.device), mask.to(self.device),
                                   num_samples=num_samples)
        finally:
            if hasattr(self.inferer, "seed"):
                self.inferer.seed = old_seed
        if isinstance(out, dict):
            raise RuntimeError(f"{self.model.name}: inferer returned a dict; the contract asks for [B,2,H,W]")
        batch["pred"] = out.detach().cpu()
        return [self.postprocessing(d) for d in decollate_batch(batch)]

    def _to_hw(self, x, shape_hw: tuple[int, int], what: str) -> np.ndarray:
        a = np.squeeze(x.detach().cpu().numpy() if torch.is_tensor(x) else np.asarray(x))
        h, w = shape_hw
        if a.ndim == 2 and a.shape == (w, h) and (h != w or self.reversed_axes):
            a = a.T
        if a.shape != (h, w):
            raise RuntimeError(f"{self.model.name}: output {what} {a.shape} does not match the input {(h, w)}")
        return a

    # ------------------------------------------------------------------ per chunk
    def predict_chunk(self, images: Sequence[tuple[str, str]], prompts: Sequence[tuple[str, int]],
                      num_samples: int, seed: int | None = None,
                      prepared: dict | None = None) -> tuple[dict[str, ImagePrediction], dict[str, str]]:
        """``images``: (image id, path); ``prompts``: (text, mask value). Returns predictions and errors by image id.

        ``prepared``: ``{(image id, prompt): preprocessed item or Exception}`` made ahead (e.g. in a data loader
        worker); missing items are preprocessed here. One image's failure does not stop the others.
        """
        seed = self.default_seed if seed is None else int(seed)
        prepared = prepared or {}
        errors: dict[str, str] = {}
        ready: list[tuple[str, str, int, dict]] = []
        for image_id, path in images:
            for text, value in prompts:
                item = prepared.get((image_id, text))
                if item is None:
                    try:
                        item = self.preprocess(path, text)
                    except Exception as e:  # noqa: BLE001 - reported per image
                        item = e
                if isinstance(item, Exception):  # a data-loader worker's error arrives as its message
                    why = error_message(item) if (item.__cause__ or item.__context__) else str(item)
                    errors.setdefault(image_id, f"preprocessing failed for prompt {text!r}: {why}")
                else:
                    ready.append((image_id, text, value, item))
        ready = [r for r in ready if r[0] not in errors]
        groups: dict[tuple, list[int]] = defaultdict(list)  # same preprocessed shape -> one forward
        for i, r in enumerate(ready):
            groups[tuple(r[3]["image"].shape)].append(i)
        outputs: dict[int, dict] = {}
        for idx in groups.values():
            for i, o in zip(idx, self._forward([ready[i][3] for i in idx], num_samples, seed)):
                outputs[i] = o
        paths = dict(images)
        per_image: dict[str, ImagePrediction] = {}
        for i, (image_id, text, value, _) in enumerate(ready):
            if image_id in errors:
                continue
            try:
                self._add_prompt(per_image, image_id, paths[image_id], text, value, outputs[i])
            except Exception as e:  # noqa: BLE001
                errors[image_id] = f"postprocessing failed for prompt {text!r}: {error_message(e)}"
                per_image.pop(image_id, None)
        return per_image, errors

    def _add_prompt(self, per_image: dict, image_id: str, path: str, text: str, value: int, out: dict) -> None:
        shape = _image_size_hw(path)
        fg = self._to_hw(out["pred"], shape, "pred") > 0.5
        maps = {"uncertainty": out["uncertainty"], **{k: out[k] for k in EXTRA_MAP_NAMES if out.get(k) is not None}}
        maps = {k: np.clip(self._to_hw(v, shape, k), 0.0, 1.0).astype(np.float32) for k, v in maps.items()}
        pred = per_image.get(image_id)
        if pred is None:
            pred = per_image[image_id] = ImagePrediction(np.zeros(shape, np.uint8),
                                                         {k: np.zeros(shape, np.float32) for k in maps})
        pred.mask[fg] = value
        for k, a in maps.items():
            np.maximum(pred.maps.setdefault(k, np.zeros(shape, np.float32)), a, out=pred.maps[k])
        pred.prompts.append({"prompt": text, "value": int(value), "foreground_pixels": int(fg.sum())})
