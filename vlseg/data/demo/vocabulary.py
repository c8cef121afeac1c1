"""The words of the demo set: object categories and their attribute words, and the prompt keys.

Every word here is part of the data: it is written into the datalist and the prompts, so changing one changes
the generated set (bump :data:`GENERATOR_VERSION`).
"""

from __future__ import annotations

#: Bump when the generated content changes; cached sets are then regenerated.
GENERATOR_VERSION = 3

CATEGORIES = ("polyp", "cyst", "lesion")
SHAPE_WORDS = {"polyp": "round", "cyst": "oval", "lesion": "irregular"}
#: Brightness variants per category; every variant keeps the category's look.
BRIGHTNESS_WORDS = {"polyp": ("bright", "pale"), "cyst": ("dark", "faint"), "lesion": ("dark", "pale")}
SIZES = ("small", "medium", "large")
#: Area-equivalent radius ranges as fractions of the (in-plane) image side.
#: The gaps between ranges keep the size words unambiguous.
SIZE_RADIUS_FRACTION = {"small": (0.040, 0.055), "medium": (0.068, 0.085), "large": (0.100, 0.120)}
POSITION_GRID = (
    ("top left", "top", "top right"),
    ("left", "center", "right"),
    ("bottom left", "bottom", "bottom right"),
)
POSITIONS = tuple(word for row in POSITION_GRID for word in row)

PROMPT_KEYS = (
    "p1", "p2", "p3", "p4", "p5", "p6", "p7", "p8", "p9",
    "original", "missing_location", "underdescriptive", "overdescriptive", "contradictory", "other_object",
)  # fmt: skip

#: Extra plausible clauses for the ``overdescriptive`` prompt, per category.
OVERDESCRIPTIVE_CLAUSES = {
    "polyp": (
        "with a smooth well-defined border, clearly visible against the surrounding tissue",
        "with a glistening dome-shaped surface, clearly raised above the surrounding mucosa",
    ),
    "cyst": (
        "with a thin smooth wall and homogeneous dark content, clearly separated from the surrounding tissue",
        "with a sharp smooth outline and no internal structure, clearly visible against the surrounding tissue",
    ),
    "lesion": (
        "with an ill-defined jagged border and a speckled heterogeneous texture, clearly visible against the surrounding tissue",
        "with an uneven mottled surface and irregular margins, clearly standing out from the surrounding tissue",
    ),
}
