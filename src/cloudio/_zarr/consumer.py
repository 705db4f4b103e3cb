"""The Zarr face's consumer of the journal: the announcements of other writers' changes.

Why: at the session level :func:`cloudio.open_zarr` trusts a store's
consolidated metadata unless this process's own metadata writes made it
stale (:func:`cloudio._zarr.store.consolidated_is_stale`). A change made by
someone else (plain zarr, another process) reaches this process only as an
``"invalidate"`` in the journal (:func:`cloudio.invalidate`, one relayed from
a Dask worker, or a difference another cache saw) or as a metadata write a
Dask worker relayed; so does a metadata document this process wrote or
deleted other than through a Zarr store (``cloudio.filesystem().rm`` of a
variable). This consumer keeps them, so that the next open of a
store one of them covers (the store, a prefix above it, or a path inside it)
lists its metadata documents once, as the strong level does
(:func:`cloudio._zarr.store.revalidate`), and drops a consolidated copy
older than what it summarises.

Registered whatever library is loaded (:data:`cloudio._journal._CONSUMER_MODULES`):
the stale copy is on the server, not in a cache of this process, so an
announcement made before zarr was imported counts too. Costs nothing when
nothing was announced: one length check per open.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from cloudio import _journal
from cloudio._journal import Change, Consumer, journal
from cloudio._paths import is_under
from cloudio._session import count
from cloudio._tables import drop_oldest, touch
from cloudio._threads import hold_globals_across_fork

#: announcements kept per bucket; past that, the bucket's fold into one of the whole bucket
_KEEP = 1024

_lock = threading.Lock()
#: bucket ("gs://b"; "" for local paths) -> announced URL -> (journal seq of its last announcement, prefix)
_announced: dict[str, dict[str, tuple[int, bool]]] = {}
#: store roots kept in :data:`_checked`; past that the least recently listed are dropped (their next open lists
#: once more when an announcement under them is kept)
_CHECKED_MAX = 10_000
_checked: dict[str, int] = {}  # store root -> journal seq its last metadata listing covered, oldest first
_own = threading.local()  # set while a revalidation journals what its own listing found
#: set while a Zarr store of this process journals a write it also puts in the metadata log; other writes of
#: metadata documents in this process (through cloudio.filesystem, a thread of a Dask cluster) are announced
_logged = threading.local()


#: the names of the documents whose change by another process (relayed from a Dask worker) a consolidated copy
#: may not know
_METADATA = ("/zarr.json", "/.zarray", "/.zgroup", "/.zattrs", "/.zmetadata")


def _structural(change: Change) -> bool:
    """Could this write or delete change a store's hierarchy or metadata (not one chunk)?"""
    return change.prefix or change.url.endswith(_METADATA)


def bucket_of(url: str) -> str:
    """``gs://b`` for any journal key in bucket ``b``; "" for local paths (all of them one "bucket")."""
    return "gs://" + url[len("gs://"):].split("/", 1)[0] if url.startswith("gs://") else ""


def lasting(change: Change) -> bool:
    """Whether ``change`` may leave a store's consolidated metadata stale on the server (an invalidation, a
    metadata write or delete): what a process whose caches are all empty still needs to hear."""
    return change.kind == "invalidate" or _structural(change)


class ZarrConsumer(Consumer):
    """Keeps every ``"invalidate"`` but those a revalidation records of what it saw itself, and the metadata
    writes and deletes relayed from other processes."""

    name = "zarr consolidated metadata"

    def on_change(self, change: Change) -> None:
        if not lasting(change) or (change.kind != "invalidate" and change.origin == _journal.ORIGIN
                                   and getattr(_logged, "active", False)):
            return  # a chunk; or a Zarr store's own write: in the metadata log (cloudio._zarr.store)
        if getattr(_own, "active", False):
            return
        bucket = bucket_of(change.url)
        with _lock:
            kept = _announced.setdefault(bucket, {})
            old = kept.get(change.url)
            kept[change.url] = (max(change.seq, old[0] if old else 0), change.prefix or bool(old and old[1]))
            if len(kept) > _KEEP:  # bounded: coarser, never lost
                _announced[bucket] = {bucket: (max(seq for seq, _ in kept.values()), True)}
        count("invalidations", cache="zarr")  # the stores it covers list their documents at their next open


def pending(root: str) -> bool:
    """Was a change under the store at ``root`` (a journal key) announced since its last metadata listing?"""
    if not _announced:  # the open without announcements: no lock, no scan
        return False
    with _lock:
        kept = _announced.get(bucket_of(root))
        if not kept:
            return False
        done = _checked.get(root, 0)
        return any(seq > done and (is_under(url, root) or (prefix and is_under(root, url)))
                   for url, (seq, prefix) in kept.items())


def checked(root: str, upto: int) -> None:
    """A listing of the store at ``root`` that began when the journal stood at ``upto`` covers what was
    announced until then."""
    with _lock:
        touch(_checked, root, max(_checked.get(root, 0), upto))
        drop_oldest(_checked, _CHECKED_MAX)


@contextmanager
def logged_by_the_store() -> Iterator[None]:
    """Around a Zarr store's record of its own write, which the store's metadata log holds: no announcement."""
    _logged.active = True
    try:
        yield
    finally:
        _logged.active = False


@contextmanager
def own_records() -> Iterator[None]:
    """Around a revalidation journaling the documents its listing found changed: no announcement, since
    the listing already read them (else every strong-level check would make the next open list again)."""
    _own.active = True
    try:
        yield
    finally:
        _own.active = False


def reset() -> None:
    """Forget every announcement (:func:`cloudio._zarr.store.reset`)."""
    with _lock:
        _announced.clear()
        _checked.clear()


# held across a fork: a thread keeping an announcement then is not in the child, and a lock copied held by it would
# stop the child's first invalidation (and open of a store announced) for good
hold_globals_across_fork("zarr consumer", __name__, "_lock")

_consumer = journal().register(ZarrConsumer())
