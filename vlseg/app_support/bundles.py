"""Bundle discovery, size-variant config files and checkpoint records for the MONAI Label app: the shared
:mod:`vlseg.bundles` (one module for the app, the benchmarks and the tests), under the name the app imports."""

from vlseg.bundles import *  # noqa: F401,F403 - re-exported
from vlseg.bundles import __all__  # noqa: F401
