"""vlseg MONAI Label app: text-prompted, uncertainty-aware segmentation with every bundle of a folder.

    monailabel start_server --app apps/vlseg --studies <images folder> --host 127.0.0.1 --conf variant small

(``--host 127.0.0.1``: MONAI Label's own default is every interface; see README "Security notes".)

Configuration (``--conf key value``):

============================  ==========================================================================
``bundles_dir``               folder of bundles (default ``<repo>/bundles``); only bundles found there load
``models``                    comma-separated subset of bundle folder names (default: all)
``variant``                   size variant override file merged after the main configs: ``''``, ``small``,
                              ``tiny`` (default ``''``: the paper-faithful default config)
``labels``                    label words for class prompts, ids 1.. in order (default ``polyp,cyst,lesion``)
``default_prompt``            prompt used when a request has none (default: the bundle's ``text``, else the
                              first label word)
``max_samples``               largest ``num_samples`` a request may ask for (default 64)
``max_image_pixels``          largest 2D image (width x height, read from the header before decoding) a
                              request may send (default 25000000; larger: 413)
``max_volume_voxels``         largest NIfTI volume in voxels (default 256000000; larger: 413)
``max_slices``                most slices of a volume segmented in one request (default 1024; more: 413)
``max_upload_bytes``          largest request body (an uploaded file with its form), checked before anything
                              is written (default 1073741824 = 1 GiB; also ``512M``, ``2G``; 0: no limit;
                              larger: 413)
``volume_axis``               axis along which NIfTI volumes are cut into 2D slices (default 2)
``volume_batch``              volume slices per network batch (default 8; 0: one full bundle run per slice and
                              prompt from a PNG, the older and much slower path; lib/infers/volume.py)
``volume_window``             how volumes become 8-bit slices, for inference and training: ``auto`` (default: the
                              CT window for CT series, known from DICOMweb; else the 0.5..99.5 percentile window),
                              ``percentile``, ``ct``, or a fixed ``lo,hi``; a request's ``window`` overrides it
``ct_window``                 the CT window in HU, ``lo,hi`` (default ``-160,240``: soft tissue, L 40 / W 400)
``uncertainty_tag``           datastore label tag of stored uncertainty maps (default ``uncertainty``)
``store_uncertainty``         store each uncertainty map in the datastore (default true)
``uncertain_segments``        extra label segments where the uncertainty is at or above a threshold, so OHIF and
                              Slicer draw it over the image (``true`` = 0.5, a number in (0, 1], default off;
                              stripped again by name when the label is saved; see lib/uncertain_segments.py)
``scoring_model``             bundle used for active-learning scoring (default: the first one loaded)
``scoring_samples``           stochastic passes per image when scoring (default 8)
``scoring_prompts``           ``labels`` | ``default`` | ``caption`` (default ``labels``)
``scoring_max_images``        score at most this many unlabelled images per run, drawn at random (seeded) from
                              those not yet scored by the current model (default 0 = all)
``scoring_seed``              seed of that random draw and of the ``diverse`` strategy's k-means (default 0)
``scoring_score``             image score the strategies rank by (``vlseg.scores``: ``top5``, ``mean``, ``max``,
                              ``boundary``, ``mi_mean``, ``mi_top5``, ``std_mean``; default ``top5``, see README)
``scoring_max_workers``       threads scoring images side by side (default 2)
``strategy_batch_size``       images per batch of the ``diverse`` strategy (default 5)
``train_epochs``              default ``max_epochs`` of the train tasks (default 10)
``skip_trainers``             do not create train tasks (default false)
``dicomweb_search_filter``    DICOMweb studies: QIDO series filter, JSON (default ``{}``: every image series)
``dicomweb_uncertainty_series`` DICOMweb studies: publish each uncertainty map as a derived series (default true)
``ohif_next_sample``          strategy answering requests for ``random`` (OHIF's panel only sends that): default
                              ``uncertainty`` for DICOMweb studies, ``random`` (MONAI Label's) for folders
``cache_dir``                 app working files: training masks and datalists, train records
                              (default ``<app>/model/vlseg/<hash of studies path>``)
``infer_workers``             threads running ``/infer`` requests off the event loop (default 1: the bundles and their
                              caches are not promised to be thread-safe); 0: MONAI Label's own synchronous endpoint,
                              which stops every other request while one is segmented
``infer_queue``               ``/infer`` requests that may wait for a worker (default 64); more: 503 + Retry-After
``infer_retry_after``         seconds in the 503's ``Retry-After`` header (default 5)
============================  ==========================================================================

A bundle that cannot be loaded (no checkpoint, a checkpoint of another variant, a broken config) is logged with
the reason and the fix, listed under ``/info`` -> ``vlseg`` -> ``skipped`` and left out; the others load.
"""

from __future__ import annotations

import hashlib
import logging
import os
from typing import Dict

import vlseg
from monailabel.config import settings
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.scoring import ScoringMethod
from monailabel.interfaces.tasks.strategy import Strategy
from monailabel.interfaces.tasks.train import TrainTask
from monailabel.tasks.activelearning.first import First
from monailabel.tasks.activelearning.random import Random
from monailabel.utils.others.generic import strtobool

from lib.activelearning.diverse import DiverseUncertain
from lib.activelearning.uncertainty import MostUncertain
from lib.datastore import PromptCheckingDatastore
from lib.errors import install_request_error_handlers
from lib.imageio import discard_upload, is_upload
from lib.infers.text_bundle import TextBundleInferTask
from lib.infers.volume import volume_batch_from_conf
from lib.params import RequestError, parse_label_names, parse_score_name
from lib.scoring.uncertainty import UncertaintyScoring
from lib.trainers.text_bundle import TextBundleTrainTask
from lib.uncertain_segments import parse_threshold
from lib.web import install_annotation_page
from lib.window import window_from_conf
from vlseg.app_support.infer_queue import install_infer_queue, queue_from_conf
from vlseg.app_support.upload_limit import DEFAULT_MAX_UPLOAD_BYTES, install_body_size_limit, parse_size
from vlseg.app_support.bundles import BundleError, checkpoint_path, discover_bundles

logger = logging.getLogger(__name__)

APP_DIR = os.path.dirname(os.path.abspath(__file__))
DEFAULT_BUNDLES_DIR = os.path.normpath(os.path.join(APP_DIR, "..", "..", "bundles"))


def _inside(path: str, folder: str) -> bool:
    """``path`` (symlinks resolved) lies inside ``folder`` (symlinks resolved)."""
    real, root = os.path.realpath(path), os.path.realpath(folder)
    return os.path.commonpath([real, root]) == root


class MyApp(MONAILabelApp):
    def __init__(self, app_dir, studies, conf):
        conf = conf or {}
        self.bundles_dir = os.path.abspath(os.path.expanduser(conf.get("bundles_dir") or DEFAULT_BUNDLES_DIR))
        self.variant = conf.get("variant", "") or ""
        self.label_names = parse_label_names(conf.get("labels"))
        self.uncertainty_tag = conf.get("uncertainty_tag", "uncertainty")
        # bad values stop the start-up with a message naming the key (lib/window.py, lib/infers/volume.py)
        self.volume_window = window_from_conf(conf)
        self.volume_batch = volume_batch_from_conf(conf)
        key = hashlib.sha1(os.path.realpath(studies).encode()).hexdigest()[:10] if not studies.startswith("http") else "remote"
        self.cache_dir = os.path.abspath(conf.get("cache_dir") or os.path.join(app_dir, "model", "vlseg", key))
        self.skipped: Dict[str, str] = {}
        try:
            self.bundles = discover_bundles(self.bundles_dir, conf.get("models"))
        except BundleError as e:
            logger.error("vlseg: %s", e)
            self.bundles = {}
        logger.info("vlseg: bundles in %s: %s (variant %r)", self.bundles_dir, list(self.bundles), self.variant)
        install_request_error_handlers()
        install_body_size_limit(parse_size(conf.get("max_upload_bytes", DEFAULT_MAX_UPLOAD_BYTES)))
        # inference in a bounded worker pool, off the event loop (vlseg/app_support/infer_queue.py)
        self.infer_queue = queue_from_conf(conf)
        if self.infer_queue is not None and not install_infer_queue(self.infer_queue):
            self.infer_queue = None
        install_annotation_page()  # the 2D annotation page at /vlseg/ (lib/web.py)
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="vlseg - text-prompted segmentation with uncertainty",
            description="Text-prompted, uncertainty-aware segmentation served from MONAI bundles "
            "(UA-VLS, MedCLIPSeg, Simple-ViLMedSAM re-implementations).",
            version=vlseg.__version__,
            # a list ordered by id: OHIF's MONAI Label panel appends the models' labels to it (a dict breaks it)
            labels=[k for k, _ in sorted(self.label_names.items(), key=lambda kv: kv[1])],
        )

    # ------------------------------------------------------------------ tasks
    def init_datastore(self):
        if self.studies.startswith("http://") or self.studies.startswith("https://"):
            if settings.MONAI_LABEL_DATASTORE.lower() in ("xnat", "dsa"):
                return super().init_datastore()
            return self._init_vlseg_dicomweb()
        return PromptCheckingDatastore(
            self.studies,
            extensions=settings.MONAI_LABEL_DATASTORE_FILE_EXT,
            auto_reload=settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD,
            read_only=settings.MONAI_LABEL_DATASTORE_READ_ONLY,
        )

    def _init_vlseg_dicomweb(self):
        """DICOMweb studies (OHIF / PACS): see lib/dicomweb.py. Unlike MONAI Label's own DICOMweb set-up this
        downloads nothing at start-up (final labels are written as DICOM SEG with pydicom-seg, not dcmqi)."""
        from monailabel.datastore.dicom import DICOMwebClientX
        from dicomweb_client.session_utils import create_session_from_user_pass

        from lib.dicomweb import VlsegDICOMWebDatastore, search_filter_from

        user, password = settings.MONAI_LABEL_DICOMWEB_USERNAME, settings.MONAI_LABEL_DICOMWEB_PASSWORD
        session = create_session_from_user_pass(user, password) if user and password else None
        client = DICOMwebClientX(url=self.studies, session=session,
                                 qido_url_prefix=settings.MONAI_LABEL_QIDO_PREFIX,
                                 wado_url_prefix=settings.MONAI_LABEL_WADO_PREFIX,
                                 stow_url_prefix=settings.MONAI_LABEL_STOW_PREFIX)
        cache = (settings.MONAI_LABEL_DICOMWEB_CACHE_PATH or "").strip() or None
        logger.info("vlseg: DICOMweb studies %s (cache %s)", self.studies, cache or "~/.cache/monailabel/dicom")
        return VlsegDICOMWebDatastore(
            client=client,
            search_filter=search_filter_from(self.conf.get("dicomweb_search_filter")),
            cache_path=cache,
            fetch_by_frame=settings.MONAI_LABEL_DICOMWEB_FETCH_BY_FRAME,
            convert_to_nifti=True,
            uncertainty_tag=self.uncertainty_tag,
            publish_uncertainty=strtobool(self.conf.get("dicomweb_uncertainty_series", "true")),
        )

    def _skip(self, name: str, reason: str) -> None:
        self.skipped[name] = reason
        logger.error("vlseg: bundle %r skipped: %s", name, reason)

    def init_infers(self) -> Dict[str, InferTask]:
        infers: Dict[str, InferTask] = {}
        for name, path in self.bundles.items():
            if not checkpoint_path(path).is_file():
                self._skip(name, f"no checkpoint {checkpoint_path(path)}; make one with: python -m "
                                 f"vlseg.app_support.checkpoints --bundle {path} --variant {self.variant!r}")
                continue
            try:
                task = TextBundleInferTask(
                    str(path),
                    self.conf,
                    variant=self.variant,
                    label_names=self.label_names,
                    default_prompt=self.conf.get("default_prompt") or None,
                    max_samples=int(self.conf.get("max_samples", 64)),
                    max_image_pixels=int(self.conf.get("max_image_pixels", 25_000_000)),
                    max_volume_voxels=int(self.conf.get("max_volume_voxels", 256_000_000)),
                    max_slices=int(self.conf.get("max_slices", 1024)),
                    volume_axis=int(self.conf.get("volume_axis", 2)),
                    volume_batch=self.volume_batch,
                    volume_window=self.volume_window,
                    datastore=self.datastore(),
                    uncertainty_tag=self.uncertainty_tag,
                    store_uncertainty=strtobool(self.conf.get("store_uncertainty", "true")),
                    uncertain_segments=parse_threshold(self.conf.get("uncertain_segments")),
                )
            except Exception as e:  # one broken bundle must not stop the others
                logger.exception("vlseg: loading bundle %r failed", name)
                self._skip(name, f"{type(e).__name__}: {e}")
                continue
            if not task.is_valid():
                self._skip(name, "MONAI Label's BundleInferTask rejected it (see the log above)")
                continue
            infers[name] = task
            logger.info("vlseg: +++ infer task %r (variant %r, default prompt %r)", name, self.variant,
                        task.default_prompt)
        return infers

    def init_trainers(self) -> Dict[str, TrainTask]:
        trainers: Dict[str, TrainTask] = {}
        if strtobool(self.conf.get("skip_trainers", "false")):
            return trainers
        for name in self._infers:
            try:
                t = TextBundleTrainTask(str(self.bundles[name]), self.conf, variant=self.variant,
                                        cache_dir=os.path.join(self.cache_dir, "train"),
                                        default_epochs=int(self.conf.get("train_epochs", 10)),
                                        volume_axis=int(self.conf.get("volume_axis", 2)))
            except Exception as e:
                logger.exception("vlseg: train task for %r failed", name)
                self.skipped[f"{name} (training)"] = f"{type(e).__name__}: {e}"
                continue
            if t.is_valid():
                trainers[name] = t
        return trainers

    def init_strategies(self) -> Dict[str, Strategy]:
        score = self._scoring_score()
        strategies: Dict[str, Strategy] = {
            "uncertainty": MostUncertain(score=score), "random": Random(), "first": First(),
            "diverse": DiverseUncertain(score=score, batch_size=int(self.conf.get("strategy_batch_size", 5)),
                                        seed=int(self.conf.get("scoring_seed", 0))),
        }
        # OHIF v3's MONAI Label panel (the build in monailabel 0.8.5) always asks for strategy "random": its
        # strategy selector has no change handler. For DICOMweb studies (the OHIF set-up) "random" therefore
        # serves the chosen strategy (default: the most uncertain image); MONAI Label's random stays available as
        # "monai_random". --conf ohif_next_sample random keeps MONAI Label's behaviour.
        default = "uncertainty" if self.studies.startswith(("http://", "https://")) else "random"
        alias = (self.conf.get("ohif_next_sample") or default).strip()
        if alias not in strategies:
            logger.error("vlseg: ohif_next_sample %r is not a strategy (%s); keeping 'random'", alias, list(strategies))
            alias = "random"
        if alias != "random":
            if alias == "uncertainty":
                strategies["random"] = MostUncertain(score=score, description="Most uncertain unlabelled image (the "
                                                     "OHIF v3 panel always requests 'random'; MONAI Label's random: "
                                                     "'monai_random')")
            else:
                strategies["random"] = strategies[alias]
            strategies["monai_random"] = Random()
            logger.info("vlseg: strategy 'random' serves %r (OHIF's Next Sample); MONAI Label's random is "
                        "'monai_random'", alias)
        return strategies

    def init_scoring_methods(self) -> Dict[str, ScoringMethod]:
        if not self._infers:
            return {}
        model = self.conf.get("scoring_model") or next(iter(self._infers))
        if model not in self._infers:
            logger.error("vlseg: scoring_model %r is not loaded; using %r", model, next(iter(self._infers)))
            model = next(iter(self._infers))
        return {
            "uncertainty": UncertaintyScoring(
                self._infers,
                model=model,
                num_samples=int(self.conf.get("scoring_samples", 8)),
                prompts=self.conf.get("scoring_prompts", "labels"),
                max_images=int(self.conf.get("scoring_max_images", 0)),
                label_names=self.label_names,
                score=self._scoring_score(),
                max_workers=int(self.conf.get("scoring_max_workers", 2)),
                seed=int(self.conf.get("scoring_seed", 0)),
            )
        }

    def _scoring_score(self) -> str:
        """``--conf scoring_score`` (an image score of vlseg.scores); an unknown name is logged and the default used."""
        try:
            return parse_score_name(self.conf, "scoring_score", "top5")
        except RequestError as e:
            logger.error("vlseg: %s; using 'top5'", e)
            return "top5"

    # ------------------------------------------------------------------ requests
    def info(self):
        i = super().info()
        i["vlseg"] = {
            "bundles_dir": self.bundles_dir,
            "variant": self.variant,
            "label_names": self.label_names,
            "skipped": self.skipped,
            "uncertainty_tag": self.uncertainty_tag,
            "uncertainty_url": f"/datastore/label?label=<image id>&tag={self.uncertainty_tag}",
            "infer_queue": self.infer_queue.stats() if self.infer_queue is not None else None,
        }
        return i

    def infer(self, request, datastore=None):
        from fastapi import HTTPException

        model = request.get("model")
        if model and model not in self._infers:
            why = f" ({self.skipped[model]})" if model in self.skipped else ""
            raise HTTPException(status_code=404, detail=f"unknown model {model!r}{why}; available: {sorted(self._infers)}")
        request = dict(request)
        request.pop("vlseg_image_id", None)
        image = request.get("image")
        if isinstance(image, str) and image and not is_upload(image):
            # an image id of the datastore; never a path of the server's file system (absolute, ../, symlinks
            # leading out of the studies folder)
            ds = datastore if datastore else self.datastore()
            uri = ds.get_image_uri(image) if not os.path.isabs(image) and ".." not in image.split("/") else ""
            if not uri:
                raise HTTPException(status_code=404, detail=f"image {image!r} is not in the datastore")
            if not self.studies.startswith("http") and os.path.exists(uri) and not _inside(uri, self.studies):
                logger.warning("vlseg: image %r resolves outside the studies folder (%s); refused", image, uri)
                raise HTTPException(status_code=404, detail=f"image {image!r} is not in the datastore "
                                                            "(it resolves outside the studies folder)")
            request["vlseg_image_id"] = image
        try:
            return super().infer(request, datastore)
        except BaseException:
            # MONAI Label removes an uploaded file in a background task that runs only after a successful answer
            discard_upload(image)
            raise

    def on_save_label(self, image_id, label_id):
        info = self.datastore().get_label_info(label_id, "final") if hasattr(self.datastore(), "get_label_info") else {}
        logger.info("vlseg: label saved for %s (prompt %r)", image_id, (info or {}).get("text"))
        return {}
