"""Run a bundle (or a baseline with the same interface) over data items: probabilities, uncertainty, metrics.

Images go through the bundle's own inference ``preprocessing`` (loading, prompt selection, tokenization, resizing,
normalisation) and its ``StochasticTextInferer``; the prompt is handed to the bundle's ``SelectPromptd`` as its
``override`` (what the MONAI Label app does with a request's prompt). The probability and uncertainty maps are
resized (bilinear) back to the label's own size -- 224 x 224 for the prepared Kvasir-SEG -- so models with different
input sizes are scored on the same pixels, against the label read by the same image reader (same axis order).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from vlseg.bench.bundles import BundleModel, find_transform
from vlseg.metrics import segmentation_metrics, summarize
from vlseg.uncertainty import EXTRA_MAP_NAMES, MAP_NAMES

__all__ = ["Prediction", "predict_items", "evaluate_items", "load_label"]


@dataclass
class Prediction:
    item: dict
    text: str
    prob: np.ndarray  # [H, W] mean foreground probability
    uncertainty: np.ndarray  # [H, W] normalised binary entropy of prob
    label: np.ndarray  # [H, W] bool
    #: ``mutual_information`` / ``std`` [H, W] when the inferer decomposes (the bundles' inference configs do)
    maps: dict = field(default_factory=dict)

    @property
    def mask(self) -> np.ndarray:
        return self.prob > 0.5


def load_label(bm: BundleModel, path: str, size: Sequence[int] | None = None) -> np.ndarray:
    """The label read like the bundle reads images (same reader, hence the same axis order), optionally resized
    (nearest) to ``size``."""
    from monai.transforms import LoadImage

    load = find_transform(bm.preprocessing, "LoadImaged")
    loader = getattr(load, "_loader", None) or LoadImage(reader="PILReader", image_only=True)
    lab = loader(path)
    lab = lab[0] if isinstance(lab, tuple) else lab
    t = torch.as_tensor(np.asarray(lab), dtype=torch.float32)
    if t.ndim == 3:  # channel-last colour mask (JPEG masks are 3-channel)
        t = t.max(dim=-1).values
    thr = 127.0 if float(t.max()) > 1.0 else 0.5
    t = (t > thr).float()[None, None]
    if size is not None and tuple(t.shape[-2:]) != tuple(size):
        t = torch.nn.functional.interpolate(t, size=tuple(size), mode="nearest")
    return t[0, 0].numpy() > 0.5


def _inferer(bm: BundleModel, num_samples: int | None, seed: int | None):
    from vlseg.inferers import StochasticTextInferer

    n = int(num_samples or bm.num_samples or 1)
    inf = bm.inferer
    if inf is None or not hasattr(inf, "num_samples"):
        inf = StochasticTextInferer(num_samples=n, seed=seed)
    return inf, n


def predict_items(bm: BundleModel, items: Sequence[dict], prompt_key: str | None = None, num_samples: int | None = None,
                  batch_size: int = 8, seed: int | None = 0, text_override: str | None = None) -> Iterator[Prediction]:
    """Yield one :class:`Prediction` per item; the prompt is ``prompts[prompt_key]`` (or the item's ``text``)."""
    inferer, n = _inferer(bm, num_samples, seed)
    old_seed = getattr(inferer, "seed", None)
    if hasattr(inferer, "seed"):
        inferer.seed = seed
    net = bm.network.eval()
    select = find_transform(bm.preprocessing, "SelectPromptd")
    old_override = getattr(select, "override", None)
    try:
        for start in range(0, len(items), batch_size):
            chunk = items[start:start + batch_size]
            datas, texts = [], []
            for it in chunk:
                text = text_override if text_override is not None else (
                    (it.get("prompts") or {}).get(prompt_key) if prompt_key else it.get("text"))
                if not isinstance(text, str):
                    raise ValueError(f"item {it.get('id', it.get('image'))} has no prompt {prompt_key!r}")
                if select is not None:
                    select.override = text
                d = bm.preprocessing({"image": it["image"], "text": text, "prompts": dict(it.get("prompts") or {})})
                datas.append(d)
                texts.append(text)
            images = torch.stack([torch.as_tensor(d["image"]).float() for d in datas])
            if "text_ids" in datas[0]:
                ids = torch.stack([torch.as_tensor(d["text_ids"]).long() for d in datas])
                mask = torch.stack([torch.as_tensor(d["text_mask"]).long() for d in datas])
            else:
                ids, mask = bm.tokenize(texts)
            with torch.no_grad():
                out = inferer(images, net, ids, mask, num_samples=n)
            out = out.detach().cpu().float()
            for it, text, o in zip(chunk, texts, out):
                label = load_label(bm, it["label"]) if it.get("label") else np.zeros(tuple(o.shape[-2:]), bool)
                if tuple(label.shape) != tuple(o.shape[-2:]):
                    o = torch.nn.functional.interpolate(o[None], size=label.shape, mode="bilinear", align_corners=False)[0]
                o = o.clamp(0.0, 1.0).numpy()
                extra = dict(zip(EXTRA_MAP_NAMES, o[2:])) if o.shape[0] == len(MAP_NAMES) else {}
                yield Prediction(it, text, o[0], o[1], label, extra)
    finally:
        if hasattr(inferer, "seed"):
            inferer.seed = old_seed
        if select is not None:
            select.override = old_override


def evaluate_items(bm: BundleModel, items: Sequence[dict], prompt_key: str | None = None, num_samples: int | None = 1,
                   batch_size: int = 8, seed: int | None = 0, nsd_tolerance: float = 2.0) -> dict:
    """Mean (and std) Dice / IoU / NSD over ``items`` plus the per-image rows."""
    rows = []
    for p in predict_items(bm, items, prompt_key, num_samples, batch_size, seed):
        m = segmentation_metrics(p.mask, p.label, nsd_tolerance=nsd_tolerance)
        m["id"] = p.item.get("id", p.item.get("image"))
        rows.append(m)
    return {"summary": summarize(rows), "rows": rows}
