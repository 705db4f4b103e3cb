"""Per-object readers-writer gates: no cloudio write changes an object while cloudio's GDAL I/O of it runs.

GDAL (3.10 and 3.12) corrupts its heap when ``/vsigs/`` handles of one URL
see two versions of the object: a handle that learnt the old size reads after
the content changed on the server (before or after the clear), and its bytes
meet those of handles that learnt the new size. So a writer holds the object
exclusively from before its bytes are sent until the change is recorded and
GDAL's cache of it cleared (:meth:`cloudio._gdal.consumer.GdalConsumer.before_change`,
:meth:`cloudio._journal.WriteJournal.changing`), and the object's I/O in
flight (open, each read, close: never a dataset's whole life) finishes first.
"""

from __future__ import annotations

import logging
import threading
import time

from cloudio._paths import is_under
from cloudio._threads import hold_across_fork

log = logging.getLogger(__name__)

__all__ = ["CHANGE_WAIT", "gates"]

#: seconds a change of an object waits for cloudio's GDAL I/O of it in flight before going ahead
CHANGE_WAIT = 30.0
#: how often a waiting change looks again at the readers (a safety net: readers leaving notify it)
_POLL = 0.05


class _ObjectGates:
    """Per object, a readers-writer lock: cloudio's GDAL I/O of it shared, a change of its content exclusive.

    Shared sections are lock-free (they run on every open, read and close):
    a reader marks the object in its own thread's table, then looks whether
    a change holds or waits for it; a writer marks the object as changing,
    then waits until no other thread's table holds it. Each side writes its
    mark before reading the other's, so at least one of them sees the other
    (with the GIL, dictionary operations are atomic and ordered). Other
    objects' I/O never waits, and a write of an object with no I/O in flight
    never waits either.

    Writers are preferred: shared sections starting while a change waits or
    runs wait for it. Reentrant: a thread inside a shared section of an
    object enters it again without waiting, and a change it makes of that
    object does not wait for itself. A change that waited
    :data:`CHANGE_WAIT` seconds for I/O in flight (a read stuck on the
    network) goes ahead with a warning: that read may then see two versions.
    """

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._turn = threading.Condition(self._mutex)
        self._changing: dict[str, int] = {}  #: vsi -> changes holding or waiting for it
        self._forced: set[str] = set()  #: vsi whose change gave up waiting: later ones don't wait again
        self._tables: dict[int, dict[str, int]] = {}  #: thread id -> that thread's shared sections (vsi -> depth)
        self._local = threading.local()

    def _table(self) -> dict[str, int]:
        """This thread's shared sections: vsi -> nesting depth (registered once per thread)."""
        try:
            return self._local.depth  # type: ignore[no-any-return]
        except AttributeError:
            table: dict[str, int] = {}
            with self._mutex:
                self._tables[threading.get_ident()] = table  # a reused id replaces a dead thread's table
            self._local.depth = table
            return table

    def enter(self, vsi: str) -> None:
        """Start GDAL I/O of ``vsi`` (shared)."""
        try:
            table = self._local.depth  # _table(), inlined: this runs on every open and read
        except AttributeError:
            table = self._table()
        depth = table.get(vsi)
        if depth:
            table[vsi] = depth + 1
            return
        table[vsi] = 1  # the mark first, then the look at writers (see the class docstring)
        if vsi in self._changing:
            del table[vsi]
            with self._mutex:
                while vsi in self._changing:
                    self._turn.wait()
                table[vsi] = 1

    def enter_all(self, vsis: list[str]) -> None:
        """Start GDAL I/O of each of ``vsis`` (shared: a VRT and its sources), all at once.

        Never holds some while it waits for a change of another: a writer
        holding that other one may be waiting for the objects this thread
        holds (two of its uploads on one event loop), and both would wait
        until the change gave up (:data:`CHANGE_WAIT`). While one of them
        changes, it holds none and waits, then tries again.
        """
        if len(vsis) == 1:
            self.enter(vsis[0])
            return
        table = self._table()
        while True:
            new = [v for v in vsis if not table.get(v)]  # (those this thread holds already never wait)
            for v in vsis:
                table[v] = table.get(v, 0) + 1  # the marks first, then the look at writers
            busy = [v for v in new if v in self._changing]
            if not busy:
                return
            self.exit_all(vsis)
            with self._mutex:
                while any(v in self._changing for v in busy):
                    self._turn.wait()

    def exit_all(self, vsis: list[str]) -> None:
        """End GDAL I/O of each of ``vsis`` (:meth:`enter_all`)."""
        for v in reversed(vsis):
            self.exit(v)

    def exit(self, vsi: str) -> None:
        """End GDAL I/O of ``vsi``."""
        table = self._local.depth
        depth = table[vsi] - 1
        if depth:
            table[vsi] = depth
            return
        del table[vsi]
        if self._changing:  # a change may be waiting for this section
            with self._mutex:
                self._turn.notify_all()

    def begin_change(self, vsi: str, wait: bool = True) -> bool:
        """Hold ``vsi`` exclusively: after its I/O in flight (at most :data:`CHANGE_WAIT` s), before any later.
        ``wait=False``: hold it only if no I/O of it is in flight; whether it is held."""
        mine = self._table()  # waiting for this thread's own I/O would deadlock
        deadline = time.monotonic() + CHANGE_WAIT
        with self._mutex:
            self._changing[vsi] = self._changing.get(vsi, 0) + 1
        try:
            with self._mutex:
                while vsi not in self._forced and any(
                    vsi in t for t in self._tables.values() if t is not mine
                ):
                    if not wait:
                        raise _Busy
                    left = deadline - time.monotonic()
                    if left <= 0:
                        log.warning("gdal: GDAL I/O of %s still running after %.0f s; changing it anyway (that "
                                    "read may mix two versions)", vsi, CHANGE_WAIT)
                        self._forced.add(vsi)
                        return True
                    self._turn.wait(min(left, _POLL))
        except _Busy:
            self.end_change(vsi)
            return False
        except BaseException:  # interrupted while waiting (Ctrl-C): no change is held, readers go on
            self.end_change(vsi)
            raise
        return True

    def in_flight(self, top: str) -> list[str]:
        """The objects at or below ``top`` (a ``/vsigs/`` path) whose GDAL I/O runs in other threads now.

        For a change of a whole prefix (``cloudio.invalidate``), whose objects are not known one by one: it
        holds these (:meth:`begin_change`), so that no open or read of one overlaps its clear. I/O starting
        later reads what the server holds after the change (the caller's epochs catch what it read from the
        cache before the clear).
        """
        mine = self._table()
        with self._mutex:
            tables = [t for t in self._tables.values() if t is not mine]
            # list(t): one C call under the GIL, so another thread's entering and leaving never interleave it
            return sorted({v for t in tables for v in list(t) if is_under(v, top)})

    def end_change(self, vsi: str) -> None:
        """Let ``vsi``'s I/O resume."""
        with self._mutex:
            n = self._changing.get(vsi, 0) - 1  # none: begun before a fork, in the parent (:func:`_renew_lock`)
            if n > 0:
                self._changing[vsi] = n
            else:
                self._changing.pop(vsi, None)
                self._forced.discard(vsi)
            self._turn.notify_all()


class _Busy(Exception):
    """I/O of the object is in flight, and the caller would rather not wait for it."""


gates = _ObjectGates()


def _renew_lock() -> None:
    """In a forked child: the mutex anew, and only the forking thread's I/O still holds objects. Why: the other
    threads are not here; their changes would hold their objects' opens off for good, their reads hold a write of
    them off :data:`CHANGE_WAIT` seconds. (A change the forking thread itself had begun no longer holds reads off
    in the child; its end is taken as such.)"""
    gates._mutex = threading.Lock()
    gates._turn = threading.Condition(gates._mutex)  # its waiters were the parent's threads
    own = getattr(gates._local, "depth", None)
    gates._tables = {threading.get_ident(): own} if own is not None else {}
    gates._changing.clear()
    gates._forced.clear()


# held across a fork: a thread entering a gate (every open and read) or changing an object then is not in the
# child, and the lock copied held by it would stop the child's first open or write through cloudio for good
hold_across_fork("gdal gates", lambda: (gates._mutex,), _renew_lock)
