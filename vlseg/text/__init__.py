"""Text side shared by the bundles: prompt validation, tokenizers and offline-capable text encoders."""

from vlseg.text.prompts import PromptError, validate_prompt
from vlseg.text.tokenizers import TextTokenizer, build_tokenizer

__all__ = ["PromptError", "validate_prompt", "TextTokenizer", "build_tokenizer"]
