"""Request parameters of the vlseg infer / train / scoring tasks: parsing, validation and prompt resolution.

Every check raises :class:`RequestError` with a message meant for the person at the viewer; the tasks turn it
into an HTTP 4xx (``fastapi.HTTPException``), never a 500 with a stack trace.

Why some checks exist at all: MONAI bundle configs are code. A string starting with ``$`` is evaluated as Python,
``@`` is a reference and ``%`` a macro. MONAI Label writes some request values (``device``, a bundle's
``displayable_configs``) into the bundle config before parsing it, so those values are restricted here, and no
user text (prompts, paths) is ever put into a config: prompts travel in the data dictionary, and the training
datalist is loaded from a JSON file by an expression the app writes itself.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass
from typing import Any

from vlseg.text.prompts import PromptError, validate_prompt

__all__ = [
    "RequestError",
    "PromptSpec",
    "DEFAULT_LABELS",
    "RESERVED_PREFIXES",
    "parse_label_names",
    "check_prompt",
    "resolve_prompts",
    "parse_int",
    "parse_float",
    "parse_bool",
    "parse_map_names",
    "parse_score_name",
    "check_device",
    "check_model_filename",
    "check_config_values",
    "http_error",
]

DEFAULT_LABELS = "polyp,cyst,lesion"
RESERVED_PREFIXES = ("$", "@", "%")
_LABEL_NAME_RE = re.compile(r"^[^\x00-\x1f$@%]{1,100}$")


class RequestError(ValueError):
    """A request the server refuses; ``status`` is the HTTP status to answer with (4xx)."""

    def __init__(self, message: str, status: int = 422):
        super().__init__(message)
        self.status = int(status)


def http_error(err: Exception, status: int | None = None):
    """``fastapi.HTTPException`` for ``err`` (imported lazily: the tasks also run outside the server)."""
    from fastapi import HTTPException

    return HTTPException(status_code=status or getattr(err, "status", 422), detail=str(err))


@dataclass(frozen=True)
class PromptSpec:
    """One prompt to segment: the text, the value its pixels get in the returned mask, where it came from."""

    prompt: str
    value: int = 1
    source: str = "text"  # "text" | "label_prompt" | "default" | "caption" | "labels"

    def as_dict(self) -> dict:
        return asdict(self)


def parse_label_names(value: Any = None) -> dict[str, int]:
    """App label names -> integer ids (1-based), from ``"polyp,cyst,lesion"`` or a JSON object ``{"polyp": 1}``."""
    value = DEFAULT_LABELS if value in (None, "") else value
    if isinstance(value, str) and value.strip().startswith("{"):
        value = json.loads(value)
    if isinstance(value, dict):
        names = {str(k).strip(): int(v) for k, v in value.items() if str(k).strip().lower() != "background"}
    else:
        items = value.split(",") if isinstance(value, str) else list(value)
        names = {str(n).strip(): i for i, n in enumerate((s for s in items if str(s).strip()), start=1)}
    for name, idx in names.items():
        if not _LABEL_NAME_RE.match(name) or not 1 <= idx <= 255:
            raise ValueError(f"invalid label {name!r} => {idx} (names: printable, no $@%; ids 1..255)")
    if len(set(names.values())) != len(names):
        raise ValueError(f"label ids must be unique: {names}")
    return names


def check_prompt(text, max_chars: int | None = None) -> str:
    """:func:`vlseg.text.validate_prompt` plus the MONAI-config prefixes; raises :class:`RequestError`."""
    try:
        cleaned = validate_prompt(text, max_chars=max_chars)
    except PromptError as e:
        raise RequestError(f"invalid text prompt: {e}") from None
    if cleaned.startswith(RESERVED_PREFIXES):
        raise RequestError("invalid text prompt: it may not start with '$', '@' or '%' "
                           "(reserved by MONAI bundle configs)")
    return cleaned


def _label_for_value(label_names: dict[str, int], text: str) -> int:
    lowered = {k.lower(): v for k, v in label_names.items()}
    return lowered.get(text.lower(), 1)


def resolve_prompts(request: dict, label_names: dict[str, int], default_prompt: str | None,
                    max_chars: int | None = None) -> list[PromptSpec]:
    """Which prompt(s) to segment, in this order: a non-empty ``label_prompt`` (OHIF v3 class prompts: label ids, or
    label names, mapped to the app's label words) -> request ``text`` (free text) -> the task's default prompt.

    ``label_prompt`` comes first because OHIF's panel sends the model's whole config with every request: a ``text``
    typed once into its Options dialog (or left there) would otherwise silently override every class the user ticks.
    Free text from OHIF therefore goes through Options -> ``text`` with *Auto-Segmentation* (which sends no classes).
    A free-text prompt that equals an app label name gets that label's id as mask value, any other gets 1; each
    ``label_prompt`` entry gets its own id, so a multi-class request returns one labelled mask.
    """
    lp = request.get("label_prompt")
    if lp not in (None, "", []):
        if isinstance(lp, str) and lp.strip().startswith("["):
            try:
                lp = json.loads(lp)
            except ValueError:
                raise RequestError(f"label_prompt {lp!r} is not a JSON list") from None
        entries = lp if isinstance(lp, (list, tuple)) else [lp]
        by_id = {v: k for k, v in label_names.items()}
        by_name = {k.lower(): (k, v) for k, v in label_names.items()}
        known = ", ".join(f"{v} {k}" for k, v in sorted(label_names.items(), key=lambda kv: kv[1]))
        specs: list[PromptSpec] = []
        for e in entries:
            if isinstance(e, bool):
                raise RequestError(f"label_prompt entries must be label ids or names, got {e!r}; known: {known}")
            if isinstance(e, str) and e.strip().lower() in by_name:
                name, idx = by_name[e.strip().lower()]
            else:
                try:
                    idx = int(e) if not isinstance(e, float) or float(e).is_integer() else None
                except (TypeError, ValueError):
                    idx = None
                if idx not in by_id:
                    raise RequestError(f"unknown label in label_prompt: {e!r}; known labels: {known}")
                name = by_id[idx]
            if all(s.value != idx for s in specs):
                specs.append(PromptSpec(check_prompt(name, max_chars), idx, "label_prompt"))
        return specs

    text = request.get("text")
    if text is not None:
        cleaned = check_prompt(text, max_chars)
        return [PromptSpec(cleaned, _label_for_value(label_names, cleaned), "text")]

    if default_prompt is None:
        raise RequestError("no prompt: send params {\"text\": \"...\"} or {\"label_prompt\": [1]}")
    cleaned = check_prompt(default_prompt, max_chars)
    return [PromptSpec(cleaned, _label_for_value(label_names, cleaned), "default")]


def parse_int(request: dict, key: str, default: int | None, lo: int | None = None, hi: int | None = None) -> int | None:
    """``request[key]`` as an int (ints or digit strings; not bools or fractions) within ``[lo, hi]``."""
    value = request.get(key, default)
    if value is None or value == "":
        return default
    ok = not isinstance(value, bool)
    if ok and isinstance(value, float):
        ok = value.is_integer()
    if ok:
        try:
            value = int(str(value).strip()) if isinstance(value, str) else int(value)
        except (TypeError, ValueError):
            ok = False
    if not ok:
        raise RequestError(f"{key} must be an integer, got {request.get(key)!r}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        rng = f"between {lo} and {hi}" if lo is not None and hi is not None else (f">= {lo}" if lo is not None else f"<= {hi}")
        raise RequestError(f"{key} must be {rng}, got {value}")
    return value


def parse_float(request: dict, key: str, default: float | None, lo: float | None = None, hi: float | None = None):
    value = request.get(key, default)
    if value is None or value == "":
        return default
    try:
        if isinstance(value, bool):
            raise ValueError
        value = float(value)
    except (TypeError, ValueError):
        raise RequestError(f"{key} must be a number, got {request.get(key)!r}") from None
    if value != value or (lo is not None and value < lo) or (hi is not None and value > hi):
        raise RequestError(f"{key} must be between {lo} and {hi}, got {value}")
    return value


def parse_bool(request: dict, key: str, default: bool = False) -> bool:
    value = request.get(key, default)
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "1", "yes", "on", "false", "0", "no", "off", ""):
        return value.strip().lower() in ("true", "1", "yes", "on")
    raise RequestError(f"{key} must be true or false, got {value!r}")


def parse_map_names(request: dict, key: str, available) -> list[str]:
    """Which of the bundle's decomposed uncertainty maps (``available``, e.g. ``mutual_information``, ``std``) to
    deliver: a list or comma-separated names, ``all`` (the default) or ``none``."""
    available = list(available)
    value = request.get(key)
    if value in (None, "", "all"):
        return available
    if value in ("none", []):
        return []
    names = [v.strip() for v in value.split(",")] if isinstance(value, str) else value
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise RequestError(f"{key} must be a list of map names, 'all' or 'none', got {value!r}")
    unknown = [n for n in names if n not in available]
    if unknown:
        raise RequestError(f"{key}: unknown map(s) {unknown}; this model outputs {available or 'no extra maps'} "
                           "(or use 'all' / 'none')")
    return list(dict.fromkeys(names))


def parse_score_name(request: dict, key: str, default: str) -> str:
    """An image score of :data:`vlseg.scores.SCORES` (``top5``, ``mean``, ``boundary``, ``mi_mean``, ...)."""
    from vlseg.scores import SCORES

    value = request.get(key) or default
    if value not in SCORES:
        raise RequestError(f"{key} must be one of {list(SCORES)}, got {value!r}")
    return value


_DEVICE_RE = re.compile(r"^(cpu|cuda(:\d{1,2})?)$")


def check_device(request: dict) -> None:
    """``device`` is written into the bundle config by MONAI Label: only device names are accepted."""
    if "device" not in request or request["device"] in (None, ""):
        return
    from monailabel.utils.others.generic import device_map

    value = request["device"]
    values = value if isinstance(value, (list, tuple)) else [value]
    allowed = set(device_map())
    for v in values:
        if not isinstance(v, str) or not (v in allowed or _DEVICE_RE.match(v)):
            raise RequestError(f"unknown device {v!r}; use one of {sorted(allowed)} (or cpu / cuda:N)")


def check_model_filename(request: dict, models_dir: str) -> None:
    """``model_filename`` must name a ``.pt`` file that exists in the bundle's ``models/`` folder."""
    value = request.get("model_filename")
    if value in (None, "", []):
        return
    value = value[0] if isinstance(value, (list, tuple)) and value else value
    allowed = sorted(f for f in os.listdir(models_dir) if f.endswith(".pt")) if os.path.isdir(models_dir) else []
    if not isinstance(value, str) or value not in allowed:
        raise RequestError(f"model_filename must be one of {allowed}, got {value!r}")


def check_config_values(request: dict, keys) -> None:
    """Values that MONAI Label copies into a bundle config (``displayable_configs``) must be plain data."""

    def bad(v) -> bool:
        if isinstance(v, str):
            return v.lstrip().startswith(RESERVED_PREFIXES)
        if isinstance(v, dict):
            return any(bad(k) or bad(x) for k, x in v.items())
        if isinstance(v, (list, tuple)):
            return any(bad(x) for x in v)
        return not (v is None or isinstance(v, (bool, int, float)))

    for k in keys:
        if k in request and bad(request[k]):
            raise RequestError(f"{k}: values starting with '$', '@' or '%' (bundle config code) are not accepted")
