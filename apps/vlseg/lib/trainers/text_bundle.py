"""One MONAI Label train task for every contract-keeping bundle.

``TextBundleTrainTask`` is MONAI Label's ``BundleTrainTask`` with:

* ``configs/train.json`` merged with the size-variant override file (the variant the app serves);
* image / label / **text** triples from the datastore (:mod:`lib.trainset`): the prompt saved with each label, or
  the segment names 3D Slicer sends, or the image caption; the bundle's own preprocessing tokenizes them;
* the datalists handed to the bundle through a JSON file read by an expression the app writes (user text never
  becomes bundle config, which is code);
* single-process training in MONAI Label's train subprocess (``monai.bundle.run``), or multi-process training with
  ``torchrun`` + the bundle's ``multi_gpu_train.json`` exactly as MONAI Label launches it, also on CPU
  (``num_processes`` >= 2, gloo);
* a check that a new ``models/model.pt`` was written (the next infer reloads it: MONAI Label reloads a model whose
  file time changed) and a small record of the run shown in ``/info`` ``train_stats``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time

import monai.bundle
import torch
from monai.bundle import ConfigParser
from monai.data import partition_dataset

from monailabel.tasks.train.bundle import BundleTrainTask

from lib.params import RequestError, check_config_values, check_device, check_model_filename, parse_float, parse_int
from lib.trainset import build_text_datalist
from lib.window import window_from_conf
from vlseg.app_support.bundles import checkpoint_identity, config_files
from vlseg.data.demo import PROMPT_KEYS

logger = logging.getLogger(__name__)

__all__ = ["TextBundleTrainTask"]


class TextBundleTrainTask(BundleTrainTask):
    def __init__(self, path: str, conf: dict, variant: str = "", cache_dir: str | None = None, default_epochs: int = 10,
                 volume_axis: int = 2, max_processes: int | None = None, **kwargs):
        self.variant = variant or ""
        self.default_epochs = int(default_epochs)
        self.volume_axis = int(volume_axis)
        self.max_processes = int(max_processes or max(2, os.cpu_count() or 1))
        self.name = os.path.basename(os.path.normpath(path))
        self.cache_dir = os.path.join(cache_dir or os.path.join(path, "runs", "monailabel"), self.name)
        self._nproc = 0
        self._counts = (0, 0)
        super().__init__(path, conf, **kwargs)

    def _load_bundle_config(self, path, config):
        parser = ConfigParser()
        parser.read_config([str(f) for f in config_files(path, "train", self.variant)])
        parser.config.update({self.const.key_bundle_root(): path})
        return parser

    # ------------------------------------------------------------------ info
    def config(self):
        c = super().config()
        c.update({"max_epochs": self.default_epochs, "num_processes": 1})
        c.pop("tracking", None)
        c.pop("tracking_uri", None)
        c.pop("tracking_experiment_name", None)
        return c

    def _stats_path(self) -> str:
        return os.path.join(self.cache_dir, "train_stats.json")

    def stats(self):
        try:
            with open(self._stats_path()) as f:
                return json.load(f)
        except (OSError, ValueError):
            return {}

    # ------------------------------------------------------------------ request
    def _validate(self, request: dict) -> dict:
        try:
            check_device(request)
            check_model_filename(request, os.path.join(self.bundle_path, "models"))
            displayable = {}
            for k in self.const.key_displayable_configs():
                if self.bundle_config.get(k):
                    displayable.update(self.bundle_config.get(k))
            check_config_values(request, list(displayable))
            req = dict(request)
            req["max_epochs"] = parse_int(request, "max_epochs", self.default_epochs, 1, 100000)
            req["val_split"] = parse_float(request, "val_split", 0.2, -1.0, 0.9)
            nproc = parse_int(request, "num_processes", 1, 1, self.max_processes)
            run_id = request.get("run_id") or "run"
            if not isinstance(run_id, str) or run_id not in self.bundle_config.config:
                raise RequestError(f"run_id {run_id!r} is not a section of {self.name}'s train config")
            req["run_id"] = run_id
        except RequestError as e:
            raise RuntimeError(f"{self.name}: invalid train request: {e}") from None
        self._nproc = nproc if nproc > 1 else 0
        if self._nproc and not torch.cuda.is_available():
            req["force_multi_gpu"] = True  # MONAI Label's switch for the torchrun path
        elif not self._nproc:
            req["multi_gpu"] = False
        return req

    def __call__(self, request, datastore):
        start = time.time()
        request = self._validate(request)
        ckpt_before = checkpoint_identity(os.path.join(self.bundle_path, "models", "model.pt"))
        super().__call__(request, datastore)
        ckpt = checkpoint_identity(os.path.join(self.bundle_path, "models", "model.pt"))
        if ckpt.get("missing") or ckpt.get("mtime") == ckpt_before.get("mtime"):
            raise RuntimeError(f"{self.name}: training ended without writing a new models/model.pt (the bundle saves "
                               "on validation: is max_epochs >= its validation interval? see the training log above)")
        stats = {
            "model": self.name,
            "variant": self.variant,
            "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
            "seconds": round(time.time() - start, 1),
            "max_epochs": request["max_epochs"],
            "processes": self._nproc or 1,
            "train_items": self._counts[0],
            "val_items": self._counts[1],
            "checkpoint": ckpt,
        }
        os.makedirs(self.cache_dir, exist_ok=True)
        with open(self._stats_path(), "w") as f:
            json.dump(stats, f, indent=2)
        logger.info("%s: training finished: %s", self.name, stats)
        return stats

    # ------------------------------------------------------------------ data
    def _fetch_datalist(self, request, datastore):
        items, warnings = build_text_datalist(datastore, os.path.join(self.cache_dir, "masks"), self.volume_axis,
                                              window=window_from_conf(self.conf))  # the window inference uses
        if not items:
            detail = "; ".join(warnings[:5]) or "no image has a final label"
            raise RuntimeError(f"{self.name}: nothing to train on: {detail}. Save labels with a prompt, e.g. "
                               "client.save_label(image_id, mask, params={'text': 'polyp'})")
        logger.info("%s: %d training samples from %d labelled images", self.name, len(items),
                    len({i['image_id'] for i in items}))
        # bundles that pick a named prompt variant (prompt_key / random prompt keys of the demo set) find the
        # saved prompt under every name
        return [{"image": i["image"], "label": i["label"], "text": i["text"],
                 "prompts": {k: i["text"] for k in PROMPT_KEYS}} for i in items]

    def _partition_datalist(self, datalist, request, shuffle=False):
        val_split = request.get("val_split", 0.2)
        if val_split > 0.0 and len(datalist) >= 2:
            train, val = partition_dataset(datalist, ratios=[1 - val_split, val_split], shuffle=True, seed=0)
        else:
            train, val = list(datalist), []
        nproc = self._nproc or 1
        if len(train) < nproc:
            raise RuntimeError(f"{self.name}: {len(datalist)} samples cannot feed {nproc} training processes; "
                               "label more images or use fewer processes")
        if len(val) < nproc:  # every process needs a validation sample (DistributedSampler)
            logger.warning("%s: too few samples for a validation split (%d for %d process(es)); validating on the "
                           "training samples", self.name, len(val), nproc)
            val = list(train)
        batch = self._train_batch_size() * nproc
        if len(train) < batch:  # a bundle loader with drop_last would otherwise yield no batch at all
            logger.warning("%s: %d training samples < one batch (%d); repeating them to fill a batch", self.name,
                           len(train), batch)
            train = (train * (batch // len(train) + 1))[:batch]
        self._counts = (len(train), len(val))
        return train, val

    def _train_batch_size(self) -> int:
        try:
            b = self.bundle_config.get_parsed_content("train#dataloader#batch_size", instantiate=False)
            return max(1, int(b))
        except Exception:  # not a plain number in this bundle: leave the list as it is
            return 1

    def _update_overrides(self, overrides):
        """Replace the inline datalists by an expression reading them from a JSON file written here."""
        os.makedirs(self.cache_dir, exist_ok=True)
        path = os.path.join(self.cache_dir, "datalist.json")
        train_key, val_key = self.const.key_train_dataset_data(), self.const.key_validate_dataset_data()
        with open(path, "w") as f:
            json.dump({"training": overrides.get(train_key, []), "validation": overrides.get(val_key, [])}, f, indent=1)
        overrides[train_key] = f"$__import__('json').load(open({path!r}))['training']"
        if val_key in overrides:
            overrides[val_key] = f"$__import__('json').load(open({path!r}))['validation']"
        top = self.bundle_config.config
        if "datalist" in top:  # items other config entries derive from @datalist (sizes, reports) match too
            overrides["datalist"] = path
        if "prompt_key" in top:  # the saved prompt itself (the item's "text"), not a named variant
            overrides["prompt_key"] = None
        return overrides

    # ------------------------------------------------------------------ running
    def run_single_gpu(self, request, overrides):
        monai.bundle.run(
            run_id=request.get("run_id", "run"),
            init_id=None,
            final_id=None,
            meta_file=self.bundle_metadata_path,
            config_file=[str(f) for f in config_files(self.bundle_path, "train", self.variant)],
            **overrides,
        )

    def run_multi_gpu(self, request, cmd, env):
        """MONAI Label's torchrun command, made to work on CPU-only machines and kept out of the bundle folder."""
        nproc = self._nproc or (torch.cuda.device_count() or 1)
        exported = os.path.join(self.bundle_path, "configs", "monailabel_train.json")
        moved = os.path.join(self.cache_dir, "monailabel_train.json")
        os.makedirs(self.cache_dir, exist_ok=True)
        if os.path.isfile(exported):
            shutil.move(exported, moved)
        multi = [os.path.join(self.bundle_path, "configs", c) for c in self.const.multi_gpu_configs()
                 if os.path.exists(os.path.join(self.bundle_path, "configs", c))][:1]
        new = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1",
               f"--nproc_per_node={nproc}", "-m", "monai.bundle", "run", request.get("run_id", "run"),
               "--meta_file", self.bundle_metadata_path, "--config_file", json.dumps([moved] + multi).replace('"', "'")]
        logging_file = os.path.join(self.bundle_path, "configs", "logging.conf")
        if os.path.isfile(logging_file):
            new += ["--logging_file", logging_file]
        env = dict(env)
        if not torch.cuda.is_available():
            env["CUDA_VISIBLE_DEVICES"] = ""
        env["PYTHONPATH"] = os.pathsep.join(p for p in (self.bundle_path, env.get("PYTHONPATH", "")) if p)
        logger.info("%s: multi-process training: %s", self.name, " ".join(new))
        proc = subprocess.Popen(new, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        for line in proc.stdout:
            print(line.rstrip(), flush=True)
        rc = proc.wait()
        if rc != 0:
            raise RuntimeError(f"{self.name}: torchrun training failed with exit code {rc}")
