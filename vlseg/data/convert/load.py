"""Reading one split of a canonical datalist, with absolute paths and a chosen prompt as ``text``."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path


def load_datalist(
    path: str | os.PathLike,
    split: str = "training",
    prompt_key: str | None = None,
    subset: str | int | None = None,
) -> list[dict]:
    """Items of one split of a canonical datalist, with absolute ``image``/``label`` paths.

    Args:
        path: the datalist JSON.
        split: ``"training"``, ``"validation"``, ``"test"`` (or another list key of the file).
        prompt_key: when given, ``text`` is replaced by ``prompts[prompt_key]`` (e.g. ``"p6"``,
            ``"contradictory"``); a ``ValueError`` lists the available keys when an item lacks it.
        subset: ``"10"``, ``"25"`` or ``"50"``: the items of ``datalist["subsets"][subset][split]``.
    """
    path = Path(path).expanduser().resolve()
    with open(path) as f:
        data = json.load(f)
    base = path.parent
    if subset is not None:
        subset = str(subset)
        subsets = data.get("subsets") or {}
        if subset not in subsets:
            raise ValueError(f"{path}: no subset {subset!r}; available subsets: {sorted(subsets)}")
        if split not in subsets[subset]:
            raise ValueError(f"{path}: subset {subset!r} has no split {split!r}; available: {sorted(subsets[subset])}")
        items = subsets[subset][split]
    else:
        if split not in data or not isinstance(data[split], list):
            avail = [k for k, v in data.items() if isinstance(v, list)]
            raise ValueError(f"{path}: no split {split!r}; available: {avail}")
        items = data[split]
    out = []
    for it in items:
        it = dict(it) if isinstance(it, Mapping) else {"image": it}
        for key in ("image", "label"):
            if key in it and isinstance(it[key], str) and not os.path.isabs(it[key]):
                it[key] = os.path.normpath(os.path.join(base, it[key]))
        if prompt_key is not None:
            prompts = it.get("prompts") or {}
            if prompt_key not in prompts:
                raise ValueError(
                    f"{path} [{split}] item {it.get('id', it.get('image'))!r} has no prompt {prompt_key!r}; "
                    f"available prompt keys: {sorted(prompts)}"
                )
            value = prompts[prompt_key]
            if not isinstance(value, str):
                raise ValueError(f"prompt {prompt_key!r} is a {type(value).__name__}, not a string; use a single-string key")
            it["text"] = value
        out.append(it)
    return out
