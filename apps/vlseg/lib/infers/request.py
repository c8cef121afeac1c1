"""The vlseg parameters of an infer request, validated for one :class:`~lib.infers.text_bundle.TextBundleInferTask`
(bad values raise :class:`lib.params.RequestError`, answered with a 4xx), and the user error inside a bundle's
exception."""

from __future__ import annotations

import os

from lib.params import (
    RequestError,
    check_config_values,
    check_device,
    check_model_filename,
    parse_bool,
    parse_int,
    parse_map_names,
    resolve_prompts,
)
from lib.uncertain_segments import parse_threshold
from lib.window import WindowError
from vlseg.data.transforms import ImageInputError
from vlseg.text.prompts import PromptError

__all__ = ["parse_request", "uncertain_threshold", "user_error"]


def parse_request(task, request: dict) -> dict:
    """Validated vlseg parameters of ``request`` for ``task``; raises :class:`RequestError` (-> HTTP 4xx)."""
    check_device(request)
    check_model_filename(request, os.path.join(task.bundle_path, "models"))
    check_config_values(request, list(getattr(task, "displayable_configs", {}) or {}))
    prompts = resolve_prompts(request, task.label_names, task._config.get("text") or task.default_prompt)
    ext = request.get("result_extension")
    if ext not in (None, "", ".png", ".nii", ".nii.gz", ".nrrd"):
        raise RequestError(f"result_extension must be .png, .nii, .nii.gz or .nrrd, got {ext!r}")
    try:
        window = task.volume_window.with_request(request.get("window"))
    except WindowError as e:
        raise RequestError(str(e)) from None
    return {
        "prompts": prompts,
        "num_samples": parse_int(request, "num_samples", task.default_samples, 1, task.max_samples),
        "seed": parse_int(request, "seed", None, 0, 2**31 - 1),
        "axis": parse_int(request, "axis", task.volume_axis, 0, 2),
        "window": window,
        "inline": parse_bool(request, "uncertainty_inline", False),
        "maps": parse_map_names(request, "uncertainty_maps", task.map_keys),
        "result_extension": ext or None,
        "uncertain_threshold": uncertain_threshold(request, task.uncertain_segments),
    }


def uncertain_threshold(request: dict, configured: float | None) -> float | None:
    """Request ``uncertain_segments`` (true / false / a threshold in (0, 1]) over ``--conf uncertain_segments``
    (``configured``); ``true`` takes the configured threshold when there is one."""
    value = request.get("uncertain_segments")
    if value in (None, ""):
        return configured
    try:
        threshold = parse_threshold(value)
    except ValueError as e:
        raise RequestError(str(e)) from None
    if threshold is not None and str(value).strip().lower() in ("true", "yes", "on"):
        return configured or threshold
    return threshold


def user_error(e: BaseException | None) -> BaseException | None:
    """The prompt / image error inside ``e`` (MONAI's Compose wraps transform errors in RuntimeError)."""
    seen = 0
    while e is not None and seen < 10:
        if isinstance(e, (PromptError, ImageInputError)):
            return e
        e, seen = e.__cause__ or e.__context__, seen + 1
    return None


