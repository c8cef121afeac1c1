"""Text prompts: the descriptions of one object at every level of detail, and the datalist items that carry them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from vlseg.data.demo.layout import SceneObject
from vlseg.data.demo.vocabulary import OVERDESCRIPTIVE_CLAUSES, POSITIONS, SIZES


def _full_description(attrs: Mapping[str, str], location: bool = True) -> str:
    text = f"one {attrs['size']} {attrs['brightness']} {attrs['shape']} {attrs['category']}"
    return f"{text} in the {attrs['position']} of the image" if location else text


def build_prompts(
    attrs: Mapping[str, str],
    other_attrs: Mapping[str, str],
    rng: np.random.Generator,
    occupied_positions: Sequence[str] = (),
) -> dict[str, str]:
    """All prompt variants (:data:`PROMPT_KEYS`) for the object described by ``attrs``.

    ``attrs`` / ``other_attrs`` hold ``category``, ``size``, ``brightness``,
    ``shape`` and ``position`` of the target and of another object of the same
    image.  The contradictory prompt keeps the category but takes a wrong size
    and a position where *no* object lies (``occupied_positions``), so it
    contradicts the image instead of silently naming a different object.
    """
    c, s, b, sh, pos = (attrs[k] for k in ("category", "size", "brightness", "shape", "position"))
    full = _full_description(attrs)
    free = [p for p in POSITIONS if p != pos and p not in occupied_positions]
    wrong = dict(attrs)
    wrong["position"] = free[rng.integers(len(free))]
    wrong_sizes = [x for x in SIZES if x != s]
    wrong["size"] = wrong_sizes[rng.integers(len(wrong_sizes))]
    clauses = OVERDESCRIPTIVE_CLAUSES[c]
    return {
        "p1": c,
        "p2": f"{s} {c}",
        "p3": f"{b} {c}",
        "p4": f"{sh} {c}",
        "p5": f"{s} {b} {c}",
        "p6": f"{c} in the {pos}",
        "p7": f"{s} {sh} {c} in the {pos}",
        "p8": f"{s} {b} {sh} {c} in the {pos}",
        "p9": full,
        "original": full,
        "missing_location": _full_description(attrs, location=False),
        "underdescriptive": f"{c.capitalize()} visible.",
        "overdescriptive": f"{full}, {clauses[rng.integers(len(clauses))]}",
        "contradictory": _full_description(wrong),
        "other_object": _full_description(other_attrs),
    }


def sample_records(
    rng: np.random.Generator, image_id: str, image_rel: str, label_rels: Sequence[str], objects: Sequence[SceneObject]
) -> list[dict[str, Any]]:
    """Datalist items, one per object of an image (or volume)."""
    positions = [o.position for o in objects]
    items = []
    for k, obj in enumerate(objects):
        other = (k + 1) % len(objects)
        prompts = build_prompts(obj.attributes(), objects[other].attributes(), rng, positions)
        items.append(
            {
                "image": image_rel,
                "label": label_rels[k],
                "text": prompts["p9"],
                "prompts": prompts,
                **obj.attributes(),
                "object_index": k,
                "image_id": image_id,
                "n_objects": len(objects),
                "other_object_index": other,
                "other_label": label_rels[other],
            }
        )
    return items
