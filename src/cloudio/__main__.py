"""``python -m cloudio``: the same as the ``cloudio`` console script (and ``python -m cloudio.cli``)."""

from cloudio.cli import main

raise SystemExit(main())
