"""One number for "nothing changed since": the per-open fast path compares it instead of re-planning.

Every change that could alter how an object must be opened bumps it: a
journal change applied to GDAL's caches, a new or cleared listing, a dataset
marked stale, a bucket's options (endpoint, timeouts) applied. An open that
planned an object at generation ``g`` and finds ``g`` again later may open it
exactly as before (:mod:`cloudio._gdal.open`). A change bumps after it has
mutated what it changes, so a plan read before the bump is never trusted after it.
"""

from __future__ import annotations

import threading

from cloudio._threads import hold_globals_across_fork

__all__ = ["bump", "current"]

#: the generation; read lock-free (one list item), written under the lock
current: list[int] = [0]
_lock = threading.Lock()


def bump() -> None:
    """Something changed: every plan made before now must be checked again."""
    with _lock:
        current[0] += 1


# held across a fork: a thread bumping then is not in the child, and a lock copied held by it would stop the child's
# first change applied to GDAL's caches (a write, under the GDAL consumer's lock) for good. Taken under the GDAL
# consumer's lock and the endpoints' (nothing under it): see cloudio._threads.FORK_ORDER
hold_globals_across_fork("gdal generation", __name__, "_lock")
