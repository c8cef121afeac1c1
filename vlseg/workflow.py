"""Entry points of the main job's bundle and server steps (used by ``scripts/demo.py``).

* :func:`ensure_bundle_checkpoints`: the ``small`` (or other variant) checkpoint of every bundle, trained briefly
  where absent;
* :func:`run_server_round_trip`: the MONAI Label round trip with the real client (see
  :mod:`vlseg.app_support.roundtrip`).
"""

from vlseg.app_support.roundtrip import ensure_bundle_checkpoints, make_studies, run_server_round_trip

__all__ = ["ensure_bundle_checkpoints", "make_studies", "run_server_round_trip"]
