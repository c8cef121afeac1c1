"""Training batches: the M2IB map of the UN-augmented image, then the random transforms on image, mask and map together.

The M2IB map costs 10 Adam steps through the upper CLIP tower per image. Computed after random flips / rotations,
every epoch would see new pixels and miss the cache; computed before them (on the deterministic, cacheable image),
the map is cached across epochs and the SAME random transform moves the image, the mask and the map (at the CLIP
patch grid: flips and 90-degree rotations of a square grid commute with the network's bilinear resize of the map).

:class:`M2IBAugmentBatch` is the trainer's ``prepare_batch``: it runs in the main process, on the training device,
after the data loader. While the CLIP itself trains (joint mode, alignment stage) no map is precomputed: the network
computes it from the augmented image and the current CLIP, as before.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.transforms import Compose

__all__ = ["M2IBAugmentBatch"]


def _plain(x) -> torch.Tensor:
    return x.as_tensor() if hasattr(x, "as_tensor") else torch.as_tensor(x)


class M2IBAugmentBatch:
    """``prepare_batch(batchdata, device, non_blocking, **kwargs) -> (image, label, (), kwargs)`` for MONAI trainers.

    Args:
        network: the ``SimpleViLMedSAM`` (or a DDP wrapper of it).
        transforms: MONAI dictionary transforms applied per item to ``{"image", "label", map_key}`` (random flips /
            rotations; give them ``allow_missing_keys=True`` so they work without the map too).
        map_key: the map's key in the transforms (``"m2ib"``).
        seed: seeds the transforms' random state (reproducible augmentation).
    """

    def __init__(self, network, transforms: Sequence | Compose, map_key: str = "m2ib", seed: int = 0):
        self.network = network
        self.transform = transforms if isinstance(transforms, Compose) else Compose(list(transforms))
        self.transform.set_random_state(seed=int(seed))
        self.map_key = map_key

    def __call__(self, batchdata, device=None, non_blocking: bool = False, **kwargs):
        net = getattr(self.network, "module", self.network)
        image = _plain(batchdata["image"]).to(device=device, non_blocking=non_blocking)
        label = _plain(batchdata["label"]).to(device=device, non_blocking=non_blocking)
        ids = torch.as_tensor(batchdata["text_ids"]).to(device)
        mask = batchdata.get("text_mask")
        maps = None if net.clip_trains() else net.m2ib_grid_map(image, ids)
        images, labels, out_maps = [], [], []
        for i in range(image.shape[0]):
            item = {"image": image[i], "label": label[i]}
            if maps is not None:
                item[self.map_key] = maps[i]
            item = self.transform(item)
            images.append(_plain(item["image"]))
            labels.append(_plain(item["label"]))
            if maps is not None:
                out_maps.append(_plain(item[self.map_key]))
        image, label = torch.stack(images), torch.stack(labels)
        extra = {"text_ids": ids, "text_mask": None if mask is None else torch.as_tensor(mask).to(device),
                 "align_target": label}
        if maps is not None:
            extra["m2ib_map"] = torch.stack(out_maps)
        return image, label, (), extra
