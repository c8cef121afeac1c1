"""Converters from public dataset layouts to the project's canonical datalist.

Canonical form: a MONAI (Decathlon-style) datalist JSON::

    {
      "name": ..., "description": ..., "source_layout": "medclipseg" | "medvlsm" | "lvit",
      "match_report": {...},
      "training": [item, ...], "validation": [...], "test": [...],
      "subsets": {"10": {"training": [...], "validation": [...]}, "25": ..., "50": ...}   # optional
    }

with items ``{"id", "image", "label", "text", "prompts": {name: str, ...}}`` (+ ``bbox`` for MedVLSM).
``image``/``label`` are relative to the datalist file's folder when the data lies under that folder,
absolute otherwise, so ``monai.data.load_decathlon_datalist(path)`` resolves them either way.

Supported layouts:

* MedCLIPSeg: ``<root>/{Train,Val,Test}_Folder/{img,label}/`` + ``<root>/Prompts_Folder/*.xlsx``
  (columns ``Image``, ``Description``, ``Ground Truth``), or a flat layout given by
  ``images_dir``/``masks_dir``/``prompts_dir`` where the split comes from the xlsx a row is in.
* MedVLSM: ``{train,val,test}.json`` (entries with ``img_name``, ``mask_name``, ``bbox`` and prompts
  ``p0..p9``, either top-level or under ``"prompts"``) + ``images_dir``/``masks_dir``.
* LViT: ``<root>/{Train,Val,Test}_Folder/{img,labelcol}/`` + ``{Split}_text.xlsx`` in each split folder.

Names are matched by file stem, exactly (case-sensitive, no fuzzy matching): the xlsx files may say
``x.png`` while the file on disk is ``x.jpg``. Every converter builds a match report (what matched and
every row/file that did not) and stores it in the datalist; ``strict=True`` turns any problem into a
:class:`ConversionError`.
"""

from __future__ import annotations

# One module per idea: common (split keys, ConversionError), matching (rows -> files), report (match report),
# xlsx (prompt tables), output (writing the datalist), medclipseg / medvlsm / lvit (one per layout),
# load (reading a datalist back), cli (prepare_* options). Every name this module offered before is re-exported.
from vlseg.data.transforms import BinarizeLabeld  # re-exported: masks are binarised on load
from vlseg.data.convert.cli import add_output_arguments, run_converter
from vlseg.data.convert.common import SPLITS, SUBSET_KEYS, ConversionError
from vlseg.data.convert.load import load_datalist
from vlseg.data.convert.lvit import convert_lvit
from vlseg.data.convert.matching import IMAGE_EXTENSIONS
from vlseg.data.convert.matching import image_stem as _stem  # tests import the old private name
from vlseg.data.convert.medclipseg import MEDCLIPSEG_TEST_VARIANTS, convert_medclipseg
from vlseg.data.convert.medvlsm import convert_medvlsm
from vlseg.data.convert.output import write_datalist
from vlseg.data.convert.report import format_report


__all__ = [
    "SPLITS",
    "SUBSET_KEYS",
    "MEDCLIPSEG_TEST_VARIANTS",
    "ConversionError",
    "BinarizeLabeld",
    "convert_medclipseg",
    "convert_medvlsm",
    "convert_lvit",
    "load_datalist",
    "write_datalist",
    "format_report",
    "add_output_arguments",
    "run_converter",
]
