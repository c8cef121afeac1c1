"""Support code shared by the MONAI Label app (``apps/vlseg``), its tests and the demo scripts.

* :mod:`vlseg.app_support.bundles`: find contract-keeping bundles, resolve size-variant config files, checkpoint
  identity (path, mtime, sha256): the shared :mod:`vlseg.bundles`, re-exported.
* :mod:`vlseg.app_support.checkpoints`: ``ensure_checkpoint(bundle_dir, variant)`` trains a bundle's variant
  briefly when it has no ``models/model.pt`` (CLI: ``python -m vlseg.app_support.checkpoints --help``).
"""
