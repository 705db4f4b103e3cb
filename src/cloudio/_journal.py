"""The write journal: every write, delete and invalidation cloudio saw, in order.

What is live, and who uses it:

* :meth:`WriteJournal.record`: every writer (``cloudio.open(..., "w")``,
  tracked fsspec filesystems, Zarr stores, ``write_vrt``,
  :func:`cloudio.invalidate`) and :meth:`WriteJournal.replay` (records from
  other Dask workers, :mod:`cloudio.dask`).
* :class:`Consumer`: each cache that can go stale (GDAL's, every gcsfs
  instance's listings) registers one and hears every change at once, in the
  writer's thread, so nothing is cleared when nothing was written.
* :meth:`WriteJournal.changing`: writers wrap sending a write in it, so a
  consumer with ``before_change``/``after_change`` hooks (GDAL's) keeps its
  own I/O off the object while its content changes.
* listeners (:meth:`WriteJournal.add_listener`): the Dask relay forwards
  local changes to the other processes.
* :attr:`WriteJournal.seq` and :meth:`WriteJournal.since`: "did anything
  under this store change since then?" (the Zarr write-in-progress mark,
  :mod:`cloudio._zarr.store`); ``seq`` also stamps a session's start.

Memory is bounded: the journal keeps the last ``max_records`` changes, and
:meth:`~WriteJournal.since` says so (a leading invalidation of everything)
when some of the changes asked for are no longer kept.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import importlib
import itertools
import logging
import os
import socket
import sys
import threading
import uuid
import weakref
from collections import deque
from collections.abc import Callable, Iterable
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Literal, overload

from cloudio._paths import GCSPath, is_gcs, parse_gcs
from cloudio._paths import is_under as _under
from cloudio._threads import KeptPool, hold_across_fork

log = logging.getLogger(__name__)

Kind = Literal["write", "delete", "invalidate"]

#: caches that register a consumer when their library is loaded in this process:
#: (library whose import means the cache may hold state, cloudio module that registers it).
#: A library not yet imported holds no cache, so nothing can be stale there. Zarr's consumer is keyed on
#: cloudio itself: the consolidated copy it distrusts is on the server, announced before zarr is loaded or not.
_CONSUMER_MODULES = (("rasterio", "cloudio._gdal.consumer"), ("fsspec", "cloudio._fsspec.consumer"),
                     ("cloudio", "cloudio._zarr.consumer"))


def _new_origin() -> str:
    """This process's name on the changes it relays (Dask): its pid and host, and a random part, so that
    a worker forked from the client (its pid in a copy of this module) or a container whose pid and
    host repeat another's never takes that process's changes for its own echo."""
    return f"{os.getpid()}@{socket.gethostname()}/{uuid.uuid4().hex[:12]}"


ORIGIN = _new_origin()


def _forked() -> None:
    global ORIGIN
    ORIGIN = _new_origin()


@dataclass(frozen=True, slots=True)
class Change:
    """One thing that happened to ``url`` (a journal key, see :mod:`cloudio._paths`).

    ``prefix`` changes cover ``url`` and everything below it (an
    invalidation of a "directory" or a bucket, or a recursive delete).
    """

    seq: int
    url: str
    kind: Kind
    generation: int | None = None
    size: int | None = None
    prefix: bool = False
    origin: str = field(default_factory=lambda: ORIGIN)
    #: ``url`` parsed, once for every consumer (parsing is most of what some of them do)
    parsed: GCSPath | None = field(default=None, compare=False, repr=False)

    @property
    def path(self) -> GCSPath | None:
        if self.parsed is not None:
            return self.parsed
        return parse_gcs(self.url) if is_gcs(self.url) else None

    def touches(self, read: str) -> bool:
        """Could this change make a cached view of ``read`` (object or prefix) stale?

        True when the change lies at or below ``read``, or, for prefix
        changes, when ``read`` lies below the change.
        """
        return _under(self.url, read) or (self.prefix and _under(read, self.url))


#: the URL of a change that covers everything (see :meth:`WriteJournal.since`)
EVERYTHING = ""




class Consumer:
    """A cache that must hear about changes: it acts on each one as it is recorded.

    Writers notify outside the journal's lock, so two changes to one URL may
    arrive out of order (compare ``seq`` where that matters).
    """

    name = "cache"

    def on_change(self, change: Change) -> None:
        """Called by the journal for every change, in the writer's thread, outside its lock."""
        raise NotImplementedError


class WriteJournal:
    """Thread-safe, bounded, ordered record of writes; see the module docstring."""

    def __init__(self, max_records: int = 100_000) -> None:
        self._lock = threading.Lock()
        _journals.add(self)
        self._seq = itertools.count(1)
        self._last_seq = 0
        self._records: deque[Change] = deque(maxlen=max_records)
        self._consumers: list[Consumer] = []
        self._listeners: list[Callable[[Change], None]] = []

    # -- writing -----------------------------------------------------------------------------

    def record(
        self,
        url: str,
        kind: Kind = "write",
        *,
        generation: int | None = None,
        size: int | None = None,
        prefix: bool = False,
        origin: str | None = None,
        notify_listeners: bool = True,
        parsed: GCSPath | None = None,
    ) -> Change:
        """Record that ``url`` (already normalised; ``parsed``: the same as a GCSPath) was written, deleted or
        invalidated."""
        _ensure_consumers()
        if parsed is None and is_gcs(url):
            try:
                parsed = parse_gcs(url)
            except Exception:  # a consumer reading .path meets the error, as before: the record is kept
                parsed = None
        with self._lock:
            seq = next(self._seq)
            change = Change(seq, url, kind, generation, size, prefix, origin if origin is not None else ORIGIN,
                            parsed)
            self._records.append(change)
            self._last_seq = seq
            consumers = list(self._consumers)
            listeners = list(self._listeners) if notify_listeners else []
        log.debug("journal: %s %s (seq %d, generation %s)", kind, url, seq, generation)
        for consumer in consumers:
            try:
                consumer.on_change(change)
            except Exception:  # a broken cache must not lose the record for the others
                log.exception("journal: %s failed to take change %s", consumer.name, url)
        for fn in listeners:
            try:
                fn(change)
            except Exception:
                log.exception("journal: listener failed on %s", url)
        return change

    # -- reading -----------------------------------------------------------------------------

    @property
    def seq(self) -> int:
        """The sequence number of the newest change (0 when empty)."""
        return self._last_seq

    def since(self, seq: int, read: str | None = None) -> list[Change]:
        """Changes newer than ``seq`` (touching ``read`` when given), oldest first.

        When some of them are no longer kept (more than ``max_records`` since
        ``seq``), the list starts with an invalidation of everything
        (``url == EVERYTHING``, ``seq == -1``), never a silently partial answer.
        """
        if seq >= self._last_seq:  # nothing newer: the common answer, without a scan
            return []
        with self._lock:
            records = [c for c in self._records if c.seq > seq]
            dropped = self._last_seq > seq and (not records or records[0].seq > seq + 1)
        out = [c for c in records if read is None or c.touches(read)]
        if dropped:
            out.insert(0, Change(seq=-1, url=EVERYTHING, kind="invalidate", prefix=True))
        return out

    def __len__(self) -> int:
        """How many changes are kept (at most ``max_records``: the load benchmark reports it)."""
        with self._lock:
            return len(self._records)

    # -- wiring ------------------------------------------------------------------------------

    def register(self, consumer: Consumer) -> Consumer:
        with self._lock:
            if consumer not in self._consumers:
                self._consumers.append(consumer)
        return consumer

    def unregister(self, consumer: Consumer) -> None:
        with self._lock:
            if consumer in self._consumers:
                self._consumers.remove(consumer)

    @overload
    def changing(self, url: str) -> ExitStack: ...

    @overload
    def changing(self, url: str, wait: bool) -> ExitStack | None: ...

    def changing(self, url: str, wait: bool = True) -> ExitStack | None:
        """``with journal().changing(url):`` around sending a write of ``url`` until it is recorded.

        Consumers with ``before_change(url, wait)`` / ``after_change(url)`` (GDAL's)
        keep their own I/O of the object off it while its content changes on
        the server: that I/O in flight finishes first. The hooks run when this
        is called, before the ``with``. ``wait=False``: None instead of waiting
        for I/O in flight. On an event loop use :meth:`changing_async`.
        """
        with self._lock:
            hooked = [c for c in self._consumers if hasattr(c, "before_change")]
        with ExitStack() as stack:  # a hook that fails (or would wait) releases those before it
            for c in hooked:
                if not c.before_change(url, wait):  # type: ignore[attr-defined]
                    return None
                stack.callback(c.after_change, url)  # type: ignore[attr-defined]
            return stack.pop_all()

    async def changing_async(self, url: str) -> ExitStack:
        """:meth:`changing` from a coroutine: when it has to wait for a GDAL read of ``url`` in flight (up to
        its limit), it waits in a worker thread. Why: waiting on the event loop would stop every other call
        of the filesystem (fsspec runs them all on one loop) for as long as that read takes."""
        held = self.changing(url, wait=False)
        if held is not None:
            return held
        # threads of its own: the loop's default pool also resolves host names (aiohttp), which waits meanwhile
        waiting = _waiting_threads().submit(self.changing, url)
        try:
            return await asyncio.shield(asyncio.wrap_future(waiting))
        except BaseException:  # cancelled while waiting: what the thread goes on to hold is let go at once,
            waiting.add_done_callback(_let_go)  # by the thread itself (the loop may be closed by then)
            raise

    def add_listener(self, fn: Callable[[Change], None]) -> None:
        with self._lock:
            self._listeners.append(fn)

    def remove_listener(self, fn: Callable[[Change], None]) -> None:
        with self._lock:
            if fn in self._listeners:
                self._listeners.remove(fn)

    def replay(self, changes: Iterable[Change]) -> None:
        """Record changes made in another process (Dask), without echoing them back."""
        for c in changes:
            if c.origin == ORIGIN:
                continue
            self.record(c.url, c.kind, generation=c.generation, size=c.size, prefix=c.prefix,
                        origin=c.origin, notify_listeners=False)


#: the threads writes wait for GDAL reads in (:meth:`WriteJournal.changing_async`); more wait in turn
_waiting_threads = KeptPool(lambda: 64, "cloudio-change-wait")


def _let_go(held: concurrent.futures.Future[ExitStack]) -> None:
    """Release what a wait nobody takes any more came to hold."""
    if not held.cancelled() and held.exception() is None:
        held.result().close()


#: the modules of :data:`_CONSUMER_MODULES` whose consumer is registered (or that this build lacks)
_loaded: set[str] = set()
#: held while one of them is imported: a fork waits for that import to end (held across it), or the child
#: would wait for good for the lock of a module a thread it does not have was importing
_loading = threading.RLock()


def _ensure_consumers() -> None:
    """Register the consumer of each library loaded, before the change is recorded.

    Why not "is the module in ``sys.modules``": it is there from the moment another thread starts importing
    it, before its consumer is registered; a change recorded meanwhile reached no consumer (a
    ``cloudio.invalidate`` lost for Zarr). ``import_module`` waits for that import to end.
    """
    if len(_loaded) == len(_CONSUMER_MODULES):
        return
    for lib, module in _CONSUMER_MODULES:
        if module in _loaded or lib not in sys.modules:
            continue
        with _loading:  # one import at a time; another thread's is over when this is taken
            try:
                importlib.import_module(module)  # registers its consumer with journal()
            except ModuleNotFoundError as e:
                if e.name != module:
                    raise
                _loaded.add(module)  # this build of cloudio has no consumer for that library: nothing to tell
                continue
            # this thread's own import of it, not over yet (a change it records while loading), is not the end
            if any(type(c).__module__ == module for c in list(_journal._consumers)):
                _loaded.add(module)


#: every journal of this process, whose lock a fork must not copy held (:func:`cloudio._threads.hold_across_fork`):
#: a thread recording at that moment is not in the child, and the child's first write would wait for good; held,
#: it is copied with the records whole (an append and ``seq`` agree) and made anew in the child
_journals: weakref.WeakSet[WriteJournal] = weakref.WeakSet()


def _renew_loading() -> None:
    global _loading
    _loading = threading.RLock()


def _renew_journals() -> None:
    _forked()
    for j in list(_journals):
        j._lock = threading.Lock()


# the imports' lock before every other (an import under way registers with a journal, and may record)
hold_across_fork("journal imports", lambda: (_loading,), _renew_loading)
hold_across_fork("journals", lambda: [j._lock for j in list(_journals)], _renew_journals)


_journal = WriteJournal()


def journal() -> WriteJournal:
    """The process-wide journal."""
    return _journal


def reset() -> None:
    """Forget every change recorded (the sequence keeps counting): :func:`cloudio._state.reset`."""
    with _journal._lock:
        _journal._records.clear()
