"""``python -m cloudio.cli``: the same as the ``cloudio`` console script."""

from cloudio.cli import main

raise SystemExit(main())
