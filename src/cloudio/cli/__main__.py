"""``python -m cloudio.cli``: the same as the ``cloudio`` console script."""

from . import main

raise SystemExit(main())
