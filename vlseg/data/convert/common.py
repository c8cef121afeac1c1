"""What every converter shares: the datalist's split keys, the split folder names of the folder layouts, and
:class:`ConversionError`."""

from __future__ import annotations

#: canonical split keys of the datalist
SPLITS = ("training", "validation", "test")
#: data-efficiency subsets of MedCLIPSeg (percent of the training / validation split)
SUBSET_KEYS = ("10", "25", "50")

# folder-layout names (MedCLIPSeg and LViT share them)
SPLIT_FOLDERS = {"training": "Train_Folder", "validation": "Val_Folder", "test": "Test_Folder"}
SPLIT_PREFIX = {"training": "Train", "validation": "Val", "test": "Test"}


class ConversionError(ValueError):
    """Raised for unusable inputs, and in strict mode for any unmatched row or file."""
