"""The write journal: every write, delete and invalidation cloudio saw, in order.

Writers (``cloudio.open(..., "w")``, tracked fsspec filesystems, Zarr stores,
``write_vrt``, :func:`cloudio.invalidate`, records arriving from other Dask
workers) call :meth:`WriteJournal.record`. Each cache that must hear about
changes registers a :class:`Consumer`; the journal hands it every change at
once, and the consumer either acts at once (fsspec's in-memory listings) or
keeps it pending until a read under that prefix asks (:meth:`Consumer.take`),
so nothing is cleared when nothing was written.

Memory is bounded: the journal keeps the last ``max_records`` changes and the
last change per URL in an LRU of the same size; a consumer whose pending set
overflows collapses it into one whole-bucket invalidation.
"""

from __future__ import annotations

import importlib
import itertools
import logging
import os
import socket
import sys
import threading
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Literal

from cloudio._paths import GCSPath, is_gcs, parse_gcs

log = logging.getLogger(__name__)

Kind = Literal["write", "delete", "invalidate"]

#: caches that register a consumer when their library is loaded in this process:
#: (library whose import means the cache may hold state, cloudio module that registers it).
#: A library not yet imported holds no cache, so nothing can be stale there.
_CONSUMER_MODULES = (("rasterio", "cloudio._gdal.cache"), ("fsspec", "cloudio._fsspec.filesystem"))
ORIGIN = f"{os.getpid()}@{socket.gethostname()}"


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
    origin: str = ORIGIN

    @property
    def path(self) -> GCSPath | None:
        return parse_gcs(self.url) if is_gcs(self.url) else None

    def touches(self, read: str) -> bool:
        """Could this change make a cached view of ``read`` (object or prefix) stale?

        True when the change lies at or below ``read``, or, for prefix
        changes, when ``read`` lies below the change.
        """
        return _under(self.url, read) or (self.prefix and _under(read, self.url))


#: the URL of a change that covers everything (see :meth:`WriteJournal.since`)
EVERYTHING = ""


def _under(url: str, prefix: str) -> bool:
    """``url`` equals ``prefix`` or lies below it as a path ('/'-separated)."""
    if prefix == EVERYTHING:
        return True
    p = prefix.rstrip("/")
    u = url.rstrip("/")
    if p.endswith(":/"):  # "gs://" style roots never occur; guard anyway
        return u.startswith(p)
    return u == p or u.startswith(p + "/")


class Consumer:
    """A cache's view of the journal: the changes it has not acted on yet.

    Subclasses override :meth:`on_change` to act at once, or leave it and
    call :meth:`take` before each read.
    """

    name = "cache"

    def __init__(self, max_pending: int = 20_000) -> None:
        self._pending: OrderedDict[str, Change] = OrderedDict()
        self._overflowed: set[str] = set()  # buckets (or "" for local) whose pending set overflowed
        self._max = max_pending
        self._lock = threading.RLock()

    def on_change(self, change: Change) -> None:
        """Called by the journal for every change (outside its lock). Default: keep it pending."""
        with self._lock:
            old = self._pending.pop(change.url, None)
            # writers notify outside the journal's lock, so two changes to one URL may
            # arrive out of order: keep the newer one
            self._pending[change.url] = old if old is not None and old.seq > change.seq else change
            if len(self._pending) > self._max:
                for c in self._pending.values():
                    p = c.path
                    self._overflowed.add(f"gs://{p.bucket}/" if p is not None else "/")
                log.warning("%s: more than %d pending changes; invalidating whole buckets instead", self.name, self._max)
                self._pending.clear()

    def take(self, read: str) -> list[Change]:
        """Remove and return the pending changes that touch ``read``, oldest first.

        After an overflow, a whole-bucket prefix change is returned instead.
        """
        with self._lock:
            out = [c for c in self._pending.values() if c.touches(read)]
            for c in out:
                del self._pending[c.url]
            for root in [r for r in self._overflowed if _under(read, r) or _under(r, read)]:
                self._overflowed.discard(root)
                out.append(Change(seq=-1, url=root, kind="invalidate", prefix=True))
            return out

    def peek(self, read: str) -> list[Change]:
        """The pending changes touching ``read``, left pending."""
        with self._lock:
            return [c for c in self._pending.values() if c.touches(read)]

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._pending)


class WriteJournal:
    """Thread-safe, bounded, ordered record of writes; see the module docstring."""

    def __init__(self, max_records: int = 100_000) -> None:
        self._lock = threading.Lock()
        self._seq = itertools.count(1)
        self._last_seq = 0
        self._records: deque[Change] = deque(maxlen=max_records)
        self._latest: OrderedDict[str, Change] = OrderedDict()
        self._max = max_records
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
    ) -> Change:
        """Record that ``url`` (already normalised) was written, deleted or invalidated."""
        _ensure_consumers()
        with self._lock:
            seq = next(self._seq)
            change = Change(seq, url, kind, generation, size, prefix, origin if origin is not None else ORIGIN)
            self._records.append(change)
            self._latest.pop(url, None)
            self._latest[url] = change
            if len(self._latest) > self._max:
                self._latest.popitem(last=False)
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
        with self._lock:
            records = [c for c in self._records if c.seq > seq]
            dropped = self._last_seq > seq and (not records or records[0].seq > seq + 1)
        out = [c for c in records if read is None or c.touches(read)]
        if dropped:
            out.insert(0, Change(seq=-1, url=EVERYTHING, kind="invalidate", prefix=True))
        return out

    def latest(self, url: str) -> Change | None:
        """The newest change recorded for exactly ``url``, if still remembered."""
        with self._lock:
            return self._latest.get(url)

    def __len__(self) -> int:
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


def _ensure_consumers() -> None:
    for lib, module in _CONSUMER_MODULES:
        if lib in sys.modules and module not in sys.modules:
            try:
                importlib.import_module(module)  # registers its consumer with journal()
            except ModuleNotFoundError as e:
                if e.name != module:
                    raise
                # this build of cloudio has no consumer for that library: nothing to tell


_journal = WriteJournal()


def journal() -> WriteJournal:
    """The process-wide journal."""
    return _journal
