"""Pretrained weights that load for real, or a run that stops and says why.

Every bundle loads its pretrained parts (CLIP, SAM, ConvNeXt, BERT towers) through this one module:

* :func:`read_state_dict` reads a LOCAL file in the upstream formats (``.safetensors``, ``.bin`` / ``.pt`` /
  ``.pth`` pickles, Hugging Face folders, checkpoints that nest the tensors under ``state_dict`` / ``model`` /
  ``network``). Nothing is ever downloaded.
* :func:`compare_state` compares a state dict with what a module expects (names and shapes; works on the meta
  device, so a 2.5 GB SAM ViT-H layout can be checked without its tensors).
* :func:`load_pretrained` loads a file **strictly**: every expected tensor present with its shape, nothing
  unexpected (beyond names a caller declares optional, e.g. the LoRA tensors that no upstream file has).
* ``require`` (the configs' ``require_pretrained``, true in every paper config): a missing file or one that does not
  fit stops the run with :class:`PretrainedWeightsError`, naming the config key, the file, the missing / unexpected /
  mismatched counts with the first names, and the command that fetches the file. ``require=False`` (the ``small``
  and ``tiny`` variants, or a user who sets it on purpose) keeps random weights and logs ONE warning with the same
  facts; a file that does not fit is then not loaded at all (never "half pretrained").
"""

from __future__ import annotations

import logging
import pickle
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

__all__ = ["as_flag", "PretrainedWeightsError", "StateReport", "WeightsTarget", "read_state_dict", "compare_state",
           "load_pretrained", "missing_weights", "fetch_command", "HF_WEIGHT_FILES"]

logger = logging.getLogger("vlseg")

#: file names looked for, in order, when a weights path is a folder (Hugging Face / open_clip layouts)
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_model.safetensors",
                   "open_clip_pytorch_model.bin")
_NESTED_KEYS = ("state_dict", "model", "network", "module")
_SHOW = 5


class PretrainedWeightsError(RuntimeError):
    """A required pretrained weights file is missing, unreadable or does not fit the network."""


def as_flag(value) -> bool:
    """A config switch as a bool. ``python -m monai.bundle run --require_pretrained false`` hands over the STRING
    ``"false"`` (Fire turns only ``False`` into a bool), which ``bool()`` would read as true: accept
    ``true/false/yes/no/1/0`` in any case, and refuse anything else with the reason."""
    if isinstance(value, str):
        word = value.strip().lower()
        if word in ("true", "yes", "1", "on"):
            return True
        if word in ("false", "no", "0", "off", ""):
            return False
        raise ValueError(f"expected true or false, got {value!r}")
    return bool(value)


def fetch_command(bundle: str) -> str:
    """The command that fetches a bundle's pretrained files (run from the repository root)."""
    return f"python -m monai.bundle download_large_files --bundle_path bundles/{bundle}"


@dataclass(frozen=True)
class WeightsTarget:
    """What a weights file is for, for the messages: ``what`` (a person's name for the part), ``config_key`` (the
    bundle config key that names the file), ``fetch`` (the command or URL that gets it)."""

    what: str
    config_key: str
    fetch: str


@dataclass
class StateReport:
    """Result of :func:`compare_state`: expected names absent from the file, names of the file the module does not
    have, and names whose shapes differ (``name: file shape != expected shape``)."""

    matched: int = 0
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)

    @property
    def exact(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def describe(self) -> str:
        parts = [f"{self.matched} tensors match"]
        for name, items in (("missing", self.missing), ("unexpected", self.unexpected),
                            ("with another shape", self.mismatched)):
            if items:
                more = f", ... (+{len(items) - _SHOW})" if len(items) > _SHOW else ""
                parts.append(f"{len(items)} {name} (e.g. {', '.join(items[:_SHOW])}{more})")
        return "; ".join(parts)


def _weights_file(path: Path) -> Path:
    if path.is_dir():
        for name in HF_WEIGHT_FILES:
            if (path / name).is_file():
                return path / name
        raise PretrainedWeightsError(f"no weights file ({', '.join(HF_WEIGHT_FILES)}) in folder {path}")
    return path


def read_state_dict(path, nested_keys: Iterable[str] = _NESTED_KEYS) -> dict[str, torch.Tensor]:
    """Tensors of a local weights file or Hugging Face folder, un-nested from ``state_dict`` / ``model`` / ...

    Pickles load with ``weights_only=True`` first; a file that holds other pickled objects (some released CLIP
    checkpoints do) is then read with ``weights_only=False`` after one warning: only load files you trust.
    """
    file = _weights_file(Path(str(path)).expanduser())
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(file))
    else:
        try:
            state = torch.load(str(file), map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, AttributeError, TypeError) as err:
            if "weights_only" not in str(err) and not isinstance(err, pickle.UnpicklingError):
                raise PretrainedWeightsError(f"cannot read weights file {file}: {err}") from err
            logger.warning("%s holds pickled objects besides tensors: loading it with weights_only=False "
                           "(only load files you trust)", file)
            state = torch.load(str(file), map_location="cpu", weights_only=False)
    if hasattr(state, "state_dict") and not isinstance(state, Mapping):  # a whole pickled module
        state = state.state_dict()
    nested = tuple(nested_keys)
    while isinstance(state, Mapping) and not any(isinstance(v, torch.Tensor) for v in state.values()):
        key = next((k for k in nested if isinstance(state.get(k), Mapping)), None)
        if key is None:
            break
        state = state[key]
    if not isinstance(state, Mapping) or not any(isinstance(v, torch.Tensor) for v in state.values()):
        raise PretrainedWeightsError(f"weights file {file} holds no state dict (looked under {', '.join(nested)})")
    return {str(k): v for k, v in state.items() if isinstance(v, torch.Tensor)}


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(re.search(p, name) for p in patterns)


def compare_state(expected: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor],
                  optional: Iterable[str] = (), ignore: Iterable[str] = ()) -> StateReport:
    """Names and shapes of ``state`` against ``expected`` (a module's ``state_dict()``, meta tensors allowed).

    ``optional``: regexes of expected names a file need not have (e.g. LoRA tensors, non-persistent buffers);
    ``ignore``: regexes of file names to drop before comparing (e.g. an upstream head this network has no use for).
    """
    optional, ignore = tuple(optional), tuple(ignore)
    report = StateReport()
    for k, v in state.items():
        if _matches(k, ignore):
            continue
        if k not in expected:
            report.unexpected.append(k)
        elif tuple(v.shape) != tuple(expected[k].shape):
            report.mismatched.append(f"{k}: {tuple(v.shape)} != {tuple(expected[k].shape)}")
        else:
            report.matched += 1
    report.missing = [k for k in expected if k not in state and not _matches(k, optional)]
    return report


def missing_weights(path, target: WeightsTarget, require: bool) -> None:
    """A configured weights file is absent (or none is configured): raise when ``require``, else one warning."""
    require = as_flag(require)
    where = f"file {str(path)!r}" if path else "no file"
    msg = (f"{target.what}: pretrained weights not found ({where}, config key `{target.config_key}`). "
           f"Fetch them with `{target.fetch}`")
    if require:
        raise PretrainedWeightsError(f"{msg}, or set `require_pretrained: false` to train from RANDOM weights on "
                                     f"purpose (e.g. `--require_pretrained False`).")
    logger.warning("%s. require_pretrained is false: continuing with RANDOM weights.", msg)


def load_pretrained(module: nn.Module, path, target: WeightsTarget, require: bool,
                    key_map: Callable[[dict], dict] | None = None, optional: Iterable[str] = (),
                    ignore: Iterable[str] = ()) -> bool:
    """Load a local weights file into ``module`` strictly; returns True when it was loaded.

    ``key_map`` turns the file's state dict into ``module``'s names (e.g. strip ``image_encoder.``); ``optional``
    and ``ignore`` as in :func:`compare_state`. A missing file, or one that does not fit exactly, raises
    :class:`PretrainedWeightsError` when ``require``; otherwise one warning and nothing is loaded (False).
    """
    require = as_flag(require)
    if not path or not Path(str(path)).expanduser().exists():
        missing_weights(path, target, require)
        return False
    try:
        state = read_state_dict(path)
        if key_map is not None:
            state = key_map(state)
    except PretrainedWeightsError as err:
        if require:
            raise PretrainedWeightsError(f"{target.what} (config key `{target.config_key}`): {err}") from err
        logger.warning("%s (config key `%s`): %s -> RANDOM weights", target.what, target.config_key, err)
        return False
    expected = module.state_dict()
    report = compare_state(expected, state, optional=optional, ignore=ignore)
    if not report.exact:
        msg = (f"{target.what}: weights file {str(path)!r} (config key `{target.config_key}`) does not fit the "
               f"network: {report.describe()}. Check that the file is the one `{target.fetch}` fetches and that "
               f"the config's architecture keys match it")
        if require:
            raise PretrainedWeightsError(msg + " (or set `require_pretrained: false` to use RANDOM weights).")
        logger.warning("%s. require_pretrained is false: the file is NOT loaded, RANDOM weights.", msg)
        return False
    keep = {k: v for k, v in state.items() if k in expected}
    module.load_state_dict(keep, strict=False)
    logger.info("%s: loaded %d tensors from %s", target.what, report.matched, path)
    return True
