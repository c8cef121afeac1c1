"""Text side shared by the bundles: prompt validation, tokenizers and offline-capable text encoders."""

from vlseg.text.prompts import PromptError, is_generic_segment_name, validate_prompt, validate_segment_prompt
from vlseg.text.tokenizers import TextTokenizer, build_tokenizer

__all__ = ["PromptError", "validate_prompt", "validate_segment_prompt", "is_generic_segment_name", "TextTokenizer", "build_tokenizer"]
