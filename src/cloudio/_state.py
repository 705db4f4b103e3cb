"""cloudio's process-wide state, in one place (as rasterio keeps its in ``rasterio.env.local``).

What lives here is plain data with no behaviour: the modules that own the
behaviour (:mod:`cloudio._config`, :mod:`cloudio._session`,
:mod:`cloudio._gcs`) read and write it through named accessors, and nothing
else touches it. State that belongs to one cache's implementation (the
journal, GDAL's per-bucket path options, fsspec's listing epochs, Zarr's
write marks...) stays in its module; docs/design.md ("Process-wide state")
lists every piece, and :func:`reset` reaches each through its module's own
``reset`` hook.

:func:`reset` returns the process to a fresh state: for tests (the
``cloudio_reset`` fixture of the pytest plugin calls it), never needed in
production code.
"""

from __future__ import annotations

import contextvars
import itertools
import sys
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from cloudio._threads import hold_globals_across_fork

if TYPE_CHECKING:
    from cloudio._session import session

#: explicit emulator endpoints (``push_endpoint``: the pytest fixture, ``Emulator``), innermost last
endpoints: list[str] = []

#: the innermost :class:`cloudio.session` of this context
current_session: contextvars.ContextVar[session | None] = contextvars.ContextVar("cloudio_session", default=None)
#: every session open in the process, oldest first (worker threads take the level of the newest)
open_sessions: list[session] = []
#: the block that entered each element of ``open_sessions`` (its token), in the same order: one session object may
#: be entered in several blocks at once, and leaving one must take off that block's entry, not another's
open_blocks: list[object] = []
#: guards ``open_sessions`` and the session counters
sessions_lock = threading.Lock()
#: datasets opened, process-wide: ``next()`` on a count is atomic and lock-free (the open fast path)
opens: itertools.count[int] = itertools.count()

#: buckets an upload found to exist (one metadata request per bucket per process)
known_buckets: set[str] = set()
buckets_lock = threading.Lock()
#: asynchronous gcsfs instances cloudio made, kept alive (see :mod:`cloudio._gcs.client`)
keep_async: list[Any] = []


# held across a fork: a thread counting an upload (or entering a session) then is not in the child, and a lock
# copied held by it would stop the child's first upload or session for good (read as ``_state.<name>`` everywhere)
hold_globals_across_fork("state", __name__, "sessions_lock", "buckets_lock")

#: modules owning state elsewhere, and the name of their reset function (called when loaded)
_RESET_HOOKS = (
    ("cloudio._journal", "reset"),
    ("cloudio._gdal.consumer", "reset"),
    ("cloudio._fsspec.consumer", "reset"),
    ("cloudio._zarr.store", "reset"),
)


def opens_total() -> int:
    """The value of :data:`opens` without advancing it."""
    return int(repr(opens)[len("count("):-1])


def reset() -> None:
    """Return the process to a fresh state: for tests.

    Closes every open session (their stats are frozen), empties the
    endpoint stack (``STORAGE_EMULATOR_HOST`` is left alone: the environment
    is the caller's), forgets the buckets seen, and calls the ``reset`` of
    every loaded module that owns state (journal emptied, consumers' maps
    cleared, GDAL path options cloudio set removed and GDAL's cache of
    those buckets cleared, ...). A module not imported yet has nothing to reset.
    """
    with sessions_lock:  # frozen under it, as when a session is left: a reader of their counts waits meanwhile
        for s in dict.fromkeys(open_sessions):
            s.stats._freeze()
        open_sessions.clear()
        open_blocks.clear()
    current_session.set(None)
    endpoints.clear()
    with buckets_lock:
        known_buckets.clear()
    for name, attr in _RESET_HOOKS:
        module = sys.modules.get(name)
        if module is not None:
            hook: Callable[[], None] = getattr(module, attr)
            hook()
