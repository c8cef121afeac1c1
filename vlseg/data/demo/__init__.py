"""Deterministic synthetic demo data for text-prompted ("referring") segmentation.

Why this data set exists
------------------------
Real medical referring-segmentation data sets are large, licensed and slow to
download.  The demo set lets every bundle, the MONAI Label app and the test
suite run end to end on a laptop CPU in seconds, *and* it is built so that the
text prompt genuinely decides the answer: every image holds 2 or 3 objects and
each sample asks for exactly one of them.  A model that ignores the prompt can
at best guess; the guessing ceiling is measured by :func:`text_blind_ceiling`
and stored with the data.

Design
------
* **Objects.**  Three categories, each with a look that alone identifies it:

  - ``polyp``  -- bright, round, dome-shaded (smooth radial falloff) pinkish blob;
  - ``cyst``   -- dark, elongated oval with a smooth soft edge and flat content;
  - ``lesion`` -- irregular outline (radius modulated by a few random angular
    harmonics) filled with high-frequency speckle texture.

  Each object also has a *size* word (``small``/``medium``/``large``: disjoint
  ranges of the area-equivalent radius), a *brightness* word (a variant of the
  category's look, e.g. ``bright``/``pale`` polyps, ``dark``/``faint`` cysts)
  and a *position* word: the cell of a 3x3 grid holding the mask centroid.
  Within one image categories and position words are all distinct, so several
  prompt levels (category alone, position alone, ...) pick a unique object.

* **Background.**  Endoscopy-like tissue albedo with a smooth random
  low-frequency texture, lit by a random gain, a low-frequency illumination
  field and a vignette, plus Gaussian noise.  Lighting is applied *after* the
  objects are painted, so an object's absolute intensity depends on where it
  lies: no single global threshold separates the objects.

* **Samples.**  One sample per (image, object): the mask is that object only
  and the prompts (see :data:`PROMPT_KEYS` and :func:`build_prompts`) describe
  it at nine levels of detail plus robustness variants (missing location,
  under/over-description, contradictory size+position, and the description of
  another object of the same image).  Splits are by *image*.

* **Volumes.**  A few NIfTI volumes follow the same recipe in 3D (ellipsoid-ish
  blobs spanning several slices, one label volume per object, grey MR-like
  levels).  Position words refer to the in-plane slice ``vol[:, :, k]`` read
  like the PNGs: array axis 0 is top -> bottom and axis 1 is left -> right.
  Volumes have their own training / validation / test split.  The slices of the
  training and validation volumes, windowed to uint8 exactly as the MONAI Label
  app does before it runs a 2D bundle on a volume, are added to the 2D
  ``training`` / ``validation`` items (:mod:`vlseg.data.volume_slices`), so the
  bundles learn the grey slices; test volumes are held out whole.

* **Determinism.**  Every image / volume draws from its own
  ``numpy.random.Generator`` seeded by ``(seed, stream, index)``, so the same
  seed always gives byte-identical files (PNG and gzip headers carry no time
  stamps) and changing the number of images of one split leaves the others
  untouched.

Output layout (``root`` chosen by the caller)::

    root/images/{train,validation,test}/<image_id>.png       RGB uint8
    root/labels/{train,validation,test}/<image_id>_obj<k>.png  L, 0/255
    root/volumes/<vol_id>.nii.gz                              float32
    root/volume_labels/<vol_id>_obj<k>.nii.gz                 uint8, 0/1
    root/slices/{train,validation}/<vol_id>_s<k>.png          L uint8 (windowed slice)
    root/slice_labels/{train,validation}/<vol_id>_s<k>_obj<j>.png  L, 0/255
    root/datalist.json                                        MONAI datalist
    root/README.md

``datalist.json`` paths are relative to ``root``, so
``monai.data.load_decathlon_datalist(root / "datalist.json", data_list_key="training", base_dir=root)``
resolves them.

Command line::

    python -m vlseg.data.demo --out DIR [--seed 0] [--small] [--overwrite]
"""

# The generator is split by concept: vocabulary (words), layout (geometry, placement), render (pixels),
# prompts (descriptions, datalist items), splits (files of one split), dataset (the whole set, caching),
# ceiling (text-blind ceiling), readme, cli. Every name this module offered before the split is re-exported here.

from vlseg.data.demo.ceiling import text_blind_ceiling
from vlseg.data.demo.cli import main
from vlseg.data.demo.dataset import default_demo_root, ensure_demo_dataset, generate_demo_dataset
from vlseg.data.demo.layout import (
    BORDER_PIXELS,
    CENTER_MARGIN,
    CENTROID_MARGIN,
    GAP_PIXELS,
    MAX_LAYOUT_TRIES,
    MAX_OBJECT_TRIES,
    P_THREE_OBJECTS,
    Geometry,
    SceneObject,
    position_word,
)
from vlseg.data.demo.prompts import build_prompts
from vlseg.data.demo.splits import (
    DEFAULT_N_IMAGES,
    DEFAULT_N_VOLUMES,
    SMALL_N_IMAGES,
    SMALL_N_VOLUMES,
    SPLITS,
    VOLUME_SPACING,
    VOLUME_SPLITS,
    VOLUME_STREAM,
    volume_items,
)
from vlseg.data.demo.vocabulary import (
    BRIGHTNESS_WORDS,
    CATEGORIES,
    GENERATOR_VERSION,
    OVERDESCRIPTIVE_CLAUSES,
    POSITION_GRID,
    POSITIONS,
    PROMPT_KEYS,
    SHAPE_WORDS,
    SIZE_RADIUS_FRACTION,
    SIZES,
)

__all__ = [
    "CATEGORIES",
    "PROMPT_KEYS",
    "POSITIONS",
    "SIZES",
    "build_prompts",
    "ensure_demo_dataset",
    "generate_demo_dataset",
    "position_word",
    "text_blind_ceiling",
    "volume_items",
]
