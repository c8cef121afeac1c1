"""vlseg: text-prompted, uncertainty-aware medical image segmentation for MONAI.

Shared code for the bundles under ``bundles/`` and the MONAI Label app under ``apps/``.
"""

__version__ = "0.1.0"
