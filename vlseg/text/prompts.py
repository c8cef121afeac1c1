"""Prompt validation: one place decides what a usable text prompt is (bundles and app alike)."""

from __future__ import annotations

import os
import re
import unicodedata

__all__ = ["PromptError", "validate_prompt", "validate_segment_prompt", "is_generic_segment_name",
           "DEFAULT_MAX_PROMPT_CHARS"]

#: Longest prompt accepted (characters). Configurable with the env var ``VLSEG_MAX_PROMPT_CHARS``.
DEFAULT_MAX_PROMPT_CHARS = int(os.environ.get("VLSEG_MAX_PROMPT_CHARS", "1000"))


class PromptError(ValueError):
    """A prompt that cannot be used; the message says why (safe to show to a user)."""


def validate_prompt(text, max_chars: int | None = None, allow_empty: bool = False) -> str:
    """Return the cleaned prompt (whitespace collapsed) or raise :class:`PromptError`.

    Rejects non-strings (bytes must be valid UTF-8), control characters other than whitespace, empty or
    whitespace-only prompts (unless ``allow_empty``) and prompts longer than ``max_chars``.
    """
    limit = DEFAULT_MAX_PROMPT_CHARS if max_chars is None else int(max_chars)
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as e:
            raise PromptError(f"prompt is not valid UTF-8 text ({e.reason} at byte {e.start})") from None
    if text is None:
        text = ""
    if not isinstance(text, str):
        raise PromptError(f"prompt must be a string, got {type(text).__name__}")
    bad = [c for c in text if unicodedata.category(c) in ("Cc", "Cf", "Cs", "Co") and not c.isspace()]
    if bad:
        raise PromptError(f"prompt contains {len(bad)} control or non-printable character(s), e.g. {bad[0]!r}")
    if len(text) > limit:
        raise PromptError(f"prompt is {len(text)} characters long; the limit is {limit}")
    cleaned = " ".join(text.split())
    if not cleaned and not allow_empty:
        raise PromptError("prompt is empty; give a text such as 'polyp'")
    return cleaned


#: names viewers give segments by default ("Segment_1" in 3D Slicer, "Label 2", "Unknown" in MONAI Label's SEG
#: writer): they say nothing about what the segment shows, so a model trained on them learns nothing
_GENERIC_SEGMENT = re.compile(
    r"^(segment|segmentation|label|labelmap|region|roi|mask|object|structure|annotation|class|layer|unknown|"
    r"untitled|unnamed|new\s*segment|default|foreground|background)?[\s_\-#:.]*\d*$", re.IGNORECASE)


def is_generic_segment_name(name: str) -> bool:
    """True for a viewer's default segment name (``Segment_1``, ``label 2``, ``Unknown``, ``3``, empty)."""
    return bool(_GENERIC_SEGMENT.match(" ".join(str(name).split())))


def validate_segment_prompt(name, max_chars: int | None = None) -> str:
    """A segment name or description used as a training prompt: :func:`validate_prompt`, and not a viewer's default
    name (raises :class:`PromptError` saying how to fix it)."""
    cleaned = validate_prompt(name, max_chars=max_chars)
    if is_generic_segment_name(cleaned):
        raise PromptError(f"segment name {cleaned!r} is a viewer's default name, not a description of what the "
                          f"segment shows: rename the segment (e.g. 'polyp' or 'small polyp at the top left') or "
                          f"send the prompt as the label's 'text' before submitting")
    return cleaned
