"""Tokenizers follow from the text encoder: a vocabulary fingerprint on both sides, compared when a network is built.

Two WordPiece vocabularies of the same size (CXR-BERT's and MiniLM's both have 30,522 entries) give token ids that
an encoder happily embeds: nothing fails, the features are just wrong. So every text encoder states the vocabulary
it was trained with (:func:`encoder_vocab_fingerprint`), every tokenizer states the one it uses
(:func:`tokenizer_fingerprint`), and :func:`check_tokenizer_matches` refuses a pair that differs.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path

__all__ = ["TokenizerMismatchError", "vocab_fingerprint", "vocab_file_fingerprint", "tokenizer_fingerprint",
           "encoder_vocab_file", "encoder_vocab_fingerprint", "default_tokenizer", "check_tokenizer_matches"]


class TokenizerMismatchError(ValueError):
    """The tokenizer's vocabulary is not the one the text encoder was trained with."""


def vocab_fingerprint(vocab: Mapping[str, int]) -> str:
    """16 hex digits of SHA-256 over the tokens in id order (same tokens at the same ids -> same fingerprint)."""
    ordered = sorted(vocab.items(), key=lambda kv: (int(kv[1]), kv[0]))
    return hashlib.sha256("\n".join(tok for tok, _ in ordered).encode("utf-8")).hexdigest()[:16]


def vocab_file_fingerprint(path) -> str:
    """Fingerprint of a WordPiece ``vocab.txt`` (one token per line, the line number is the id)."""
    lines = Path(str(path)).read_text(encoding="utf-8").splitlines()
    return vocab_fingerprint({tok: i for i, tok in enumerate(lines)})


def tokenizer_fingerprint(tokenizer) -> str | None:
    """Fingerprint of a :class:`vlseg.text.tokenizers.TextTokenizer` (None for open_clip's BPE tokenizers, whose
    vocabulary is fixed by the model name and checked by :func:`check_tokenizer_matches` through the spec)."""
    hf = getattr(tokenizer, "_hf", None)
    if hf is None:
        return None
    return vocab_fingerprint(hf.get_vocab())


def encoder_vocab_file(spec: str, weights=None) -> Path | None:
    """The ``vocab.txt`` a text encoder spec was trained with: the weights folder's own file when it has one (a
    Hugging Face download), else the vocabulary vlseg ships for that encoder."""
    if weights and Path(str(weights)).is_dir() and (Path(str(weights)) / "vocab.txt").is_file():
        return Path(str(weights)) / "vocab.txt"
    if spec == "minilm":
        from vlseg.text.tokenizers import minilm_dir

        return minilm_dir() / "vocab.txt"
    if spec == "cxr-bert":
        from vlseg.text.tokenizers import ASSETS

        return ASSETS / "cxr_bert" / "vocab.txt"
    if spec.startswith("hf:") and (Path(spec[3:]) / "vocab.txt").is_file():
        return Path(spec[3:]) / "vocab.txt"
    return None


def encoder_vocab_fingerprint(spec: str, weights=None) -> str | None:
    path = encoder_vocab_file(spec, weights)
    return vocab_file_fingerprint(path) if path is not None else None


def default_tokenizer(encoder_spec: str) -> str:
    """The tokenizer spec that belongs to a text encoder spec (``minilm`` -> ``minilm``, ``cxr-bert`` ->
    ``cxr-bert``, ``hf:DIR`` -> ``hf:DIR``)."""
    if encoder_spec in ("minilm", "cxr-bert") or encoder_spec.startswith(("hf:", "open_clip:")):
        return encoder_spec
    raise ValueError(f"no tokenizer is known for text encoder {encoder_spec!r}")


def check_tokenizer_matches(tokenizer, expected_fingerprint: str | None, encoder: str) -> None:
    """Raise :class:`TokenizerMismatchError` when ``tokenizer`` (a TextTokenizer or its spec string) does not use
    the vocabulary ``expected_fingerprint`` of text encoder ``encoder``. Nothing to compare (None) passes."""
    if expected_fingerprint is None:
        return
    if isinstance(tokenizer, str):
        from vlseg.text.tokenizers import build_tokenizer

        spec, tokenizer = tokenizer, build_tokenizer(tokenizer)
    else:
        spec = getattr(tokenizer, "spec", repr(tokenizer))
    got = tokenizer_fingerprint(tokenizer)
    if got is not None and got != expected_fingerprint:
        raise TokenizerMismatchError(
            f"tokenizer {spec!r} (vocabulary {got}) does not belong to text encoder {encoder!r} (vocabulary "
            f"{expected_fingerprint}): its token ids would index the wrong embeddings. Set `tokenizer` to "
            f"{default_tokenizer(encoder) if not encoder.startswith('open_clip') else encoder!r}, or leave it at "
            f"its default, which follows `text_encoder`.")
