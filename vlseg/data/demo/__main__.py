"""``python -m vlseg.data.demo``: see :mod:`vlseg.data.demo.cli`."""

from vlseg.data.demo.cli import main

raise SystemExit(main())
