"""``cloudio.zarr_store``: a Zarr store whose writes and deletes are journaled.

The store is zarr's own :class:`~zarr.storage.FsspecStore` (on an async gcsfs
configured for the endpoint in force) or :class:`~zarr.storage.LocalStore`,
wrapped in a :class:`~zarr.storage.WrapperStore` that overrides only what
writes. Each write is recorded in the journal *after* the wrapped store
returned, so a failed write leaves no record, and recording adds no request:
one string join and one in-memory append per chunk or shard.

The journal lets the other caches of the process (GDAL, every fsspec
instance's listings) forget what these writes made stale. One cache lives
here: *consolidated metadata*. A store consolidated once and later changed
without consolidating again (``to_zarr(..., consolidated=False)``, plain
``zarr`` calls) still carries the old consolidated copy, and readers that
trust it see the old shapes and variables. :func:`consolidated_is_stale`
answers, from the metadata writes seen in this process, whether that copy
is older than the metadata it summarises; :func:`cloudio.open_zarr` then
reads the metadata documents themselves.

A write of many objects is not atomic on GCS. :class:`WriteMark` puts a small
marker object at the store's root for the duration of ``save_array`` and
``to_zarr``; :func:`check_complete` makes their readers refuse a store whose
write never committed (docs/consistency.md says what this does and does not
guarantee). The store hides the marker from zarr's listings.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import json
import logging
import os
import posixpath
import re
import threading
import time
from collections.abc import AsyncIterator, Callable, Collection, Coroutine, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol, Self, TypeVar, cast

import numpy as np
import zarr
from zarr.abc.buffer import Buffer
from zarr.storage import FsspecStore, LocalStore, WrapperStore

from cloudio._gcs.client import bounded, is_refusal
from cloudio._gcs.fast import list_objects
from cloudio._gcs.transfer import given_up_under, last_writer_wins, put_verified, put_verified_each
from cloudio._journal import journal
from cloudio._paths import GCSPath, is_gcs, normalize, parse_gcs
from cloudio._paths import is_under as _under
from cloudio._tables import drop_oldest, touch
from cloudio._threads import (
    SYNC_REFUSED,
    hold_across_fork,
    resolving_at_exit,
    run_to_the_end,
    runs_soon,
    shutting_down,
)
from cloudio._zarr import consumer as announcements
from cloudio._zarr import last_seen
from cloudio._zarr.changes import stops_with_its_write
from cloudio.errors import BucketNotFoundError, CloudioError, ConflictError, LoopNotRunningError, UploadError

if TYPE_CHECKING:
    from zarr.abc.store import ByteRequest, Store
    from zarr.core.buffer import BufferPrototype

log = logging.getLogger(__name__)

T = TypeVar("T")

__all__ = ["JournaledStore", "MetadataCheck", "consolidated_is_stale", "revalidate", "store_url", "zarr_store"]

#: values below this go up in one request, as gcsfs's own pipe does (a shard is already in memory)
_ONE_REQUEST_LIMIT = 50 * 2**20
_ZARR_VERSION = tuple(int(p) for p in zarr.__version__.split(".")[:2] if p.isdigit())

#: names of the documents that describe a node (v3) or an array/group (v2)
_META_NAMES = frozenset({"zarr.json", ".zarray", ".zgroup", ".zattrs"})
_V2_CONSOLIDATED = ".zmetadata"


#: node directories the metadata log keeps apart, per table; past that the oldest fold into their bucket's entry
_NODES_MAX = 10_000


class _MetadataLog:
    """Per node directory: journal seq of the last metadata write and of the last consolidation.

    Only metadata documents pass through here (a few per array), never chunks.
    Each table keeps at most :data:`_NODES_MAX` directories, the least
    recently changed dropped first. Why: a long-running process that writes a
    new store per job would otherwise grow them without end, and every
    ``open_zarr`` scans them. What is dropped errs on the side of reading the
    documents: a metadata write dropped counts as one made under every store
    of its bucket (:attr:`_folded`), a consolidated copy dropped is no longer
    trusted, and a distrusted copy dropped distrusts its whole bucket.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._meta: dict[str, int] = {}  # node dir url -> seq of its last metadata write, oldest first
        self._consolidated: dict[str, int] = {}  # group dir url -> seq of its last consolidated copy, oldest first
        # group dir urls whose consolidated copy a listing announced changes led to found older than its members
        self._distrusted: dict[str, None] = {}
        self._folded: dict[str, int] = {}  # bucket -> latest seq of a metadata write dropped from _meta
        self._distrusted_buckets: set[str] = set()  # buckets a distrusted copy was dropped from

    def wrote(self, dir_url: str, name: str, value: Buffer, seq: int) -> None:
        consolidated = False
        if name == _V2_CONSOLIDATED:
            consolidated = True
        elif name == "zarr.json":
            raw = value.to_bytes()
            if b'"consolidated_metadata"' in raw:
                try:
                    consolidated = json.loads(raw).get("consolidated_metadata") is not None
                except ValueError:  # not our business to validate zarr's documents
                    consolidated = False
        with self._lock:
            if consolidated:
                touch(self._consolidated, dir_url, seq)
                self._distrusted.pop(dir_url, None)  # the copy is this process's now
                if name == "zarr.json":  # the same document is also the group's own metadata
                    touch(self._meta, dir_url, seq)
            else:
                touch(self._meta, dir_url, seq)
                if name == "zarr.json":  # a v3 group document without a consolidated copy replaces it
                    self._consolidated.pop(dir_url, None)
            self._bound()

    def deleted(self, url: str, *, prefix: bool, seq: int) -> None:
        with self._lock:
            if prefix:
                # a whole node or store is gone, and what we knew about it with it; but a consolidated copy of
                # a group enclosing it still lists it: a metadata change there (seen by stale())
                for table in (self._meta, self._consolidated, self._distrusted):
                    for k in [k for k in table if _under(k, url)]:
                        del table[k]
                touch(self._meta, url, seq)
                self._bound()
                return
            dir_url, name = posixpath.split(url)
            if name == _V2_CONSOLIDATED or name == "zarr.json":
                self._consolidated.pop(dir_url, None)
                self._distrusted.pop(dir_url, None)
            if name in _META_NAMES:
                touch(self._meta, dir_url, seq)
                self._bound()

    def unsure(self, url: str, *, prefix: bool, seq: int) -> None:
        """A delete of ``url`` (of everything under it, ``prefix``) that failed, which may have removed some of
        it: what is known of the rest stays, a consolidated copy under it is no longer trusted, and the copies
        of the groups enclosing it are stale (a metadata change at ``url``)."""
        if not prefix:
            self.deleted(url, prefix=False, seq=seq)
            return
        with self._lock:
            for k in [k for k in self._consolidated if _under(k, url)]:
                del self._consolidated[k]
            touch(self._meta, url, seq)
            self._bound()

    def stale(self, root: str) -> bool:
        with self._lock:
            bucket = announcements.bucket_of(root)
            if root in self._distrusted or bucket in self._distrusted_buckets:
                return True
            folded = self._folded.get(bucket)
            cons = self._consolidated.get(root)
            if cons is None:
                # consolidated copy never written here: stale if metadata was written here at all
                # (a copy written by someone else before cannot know about it)
                return folded is not None or any(_under(k, root) for k in self._meta)
            return (folded is not None and folded > cons) or any(
                seq > cons for k, seq in self._meta.items() if _under(k, root))

    def knows(self, root: str) -> bool:
        with self._lock:
            bucket = announcements.bucket_of(root)
            return (any(_under(k, root) for k in self._meta) or root in self._consolidated
                    or root in self._distrusted or bucket in self._folded or bucket in self._distrusted_buckets)

    def seen(self, root: str, stale: bool) -> None:
        with self._lock:
            if stale:
                touch(self._distrusted, root, None)
                self._bound()
            else:
                self._distrusted.pop(root, None)

    def changed_since(self, root: str, seq: int) -> bool:
        """Whether this process wrote or deleted metadata under ``root`` after journal position ``seq``."""
        with self._lock:
            folded = self._folded.get(announcements.bucket_of(root), 0)
            return folded > seq or any(s > seq for table in (self._meta, self._consolidated)
                                       for k, s in table.items() if _under(k, root))

    def forget_writes(self) -> None:
        with self._lock:
            self._meta.clear()
            self._consolidated.clear()
            self._folded.clear()

    def _bound(self) -> None:
        """Drop the oldest directories past :data:`_NODES_MAX` from each table, on the side of reading."""
        for url, seq in drop_oldest(self._meta, _NODES_MAX):
            bucket = announcements.bucket_of(url)
            self._folded[bucket] = max(seq, self._folded.get(bucket, 0))
        drop_oldest(self._consolidated, _NODES_MAX)
        self._distrusted_buckets |= {announcements.bucket_of(url) for url, _ in drop_oldest(self._distrusted,
                                                                                             _NODES_MAX)}


_metadata = _MetadataLog()


def consolidated_is_stale(root_url: str) -> bool:
    """True when metadata under ``root_url`` changed in this process after its consolidated copy.

    ``root_url`` is a journal key (see :func:`store_url`). False when nothing
    was written there in this process: then nothing is known to be stale.
    """
    return _metadata.stale(root_url.rstrip("/"))


def written_here(root_url: str) -> bool:
    """True when this process wrote metadata under ``root_url`` (a journal key), or listed it after another
    writer's change was announced there (:func:`consolidated_seen`)."""
    return _metadata.knows(root_url.rstrip("/"))


def consolidated_seen(root_url: str, stale: bool) -> None:
    """A listing of the server found the consolidated copy of ``root_url`` older than its members (``stale``),
    or not.

    Why: once another writer's change was announced there and a listing showed
    the copy out of date, every later open at the session level reads the
    documents, as after this process's own writes, until this process
    consolidates there or a listing finds the copy current again.
    """
    _metadata.seen(root_url.rstrip("/"), stale)


async def _collected(keys: AsyncIterator[str]) -> list[str]:
    """Every key ``keys`` yields: an async listing as one awaitable, to bound in time as a whole."""
    return [key async for key in keys]


def _joined(root: GCSPath, key: str) -> GCSPath:
    """The object of store key ``key`` under the store's root ``root``."""
    return GCSPath(root.bucket, f"{root.key}/{key}" if root.key else key)


class Listed(Protocol):
    """What :meth:`JournaledStore.expecting` yields: give it the generations listed under a prefix."""

    def __call__(self, prefix: str, generations: dict[str, int], whole: bool = False) -> None: ...


class JournaledStore(WrapperStore):  # type: ignore[type-arg]
    """A wrapper store that records every successful write and delete in the journal.

    Parameters
    ----------
    store
        The store doing the work (``FsspecStore`` or ``LocalStore``).
    root_url
        The journal key of the store's root (``gs://bucket/prefix`` or an
        absolute local path); keys are joined to it with ``/``. Derived from
        the wrapped store when None (zarr's ``WrapperStore.open`` passes none).

    Notes
    -----
    Reads, listings and everything else are delegated untouched. Writes are
    journaled after the wrapped store returned; a write that raised is not
    recorded. ``set_sync``/``delete_sync`` exist only when the wrapped store
    has them: zarr checks for them (``SupportsSetSync``) and would otherwise
    call methods that cannot work.
    """

    # zarr >= 3.4's WrapperStore defines the synchronous methods whatever it wraps, so zarr's runtime
    # protocol checks (SupportsGetSync, ...) would claim them for a store that cannot: a member set to
    # None reads as "not implemented" there. _SyncJournaledStore has them when the wrapped store does.
    get_sync = None
    get_ranges_sync = None
    set_sync = None
    delete_sync = None

    def __new__(cls, store: Store, root_url: str | None = None) -> Self:
        sync_capable = hasattr(store, "set_sync") and hasattr(store, "delete_sync")
        chosen = _SyncJournaledStore if cls is JournaledStore and sync_capable else cls
        return cast(Self, super().__new__(chosen))  # a subclass of cls when the store can sync

    def __init__(self, store: Store, root_url: str | None = None) -> None:
        super().__init__(store)
        self._root_url = (root_url if root_url is not None else _root_of(store)).rstrip("/")
        # zarr's FsspecStore.set copies each value into a new bytes object before gcsfs copies it
        # again into the request body; for gcsfs we hand over a view and save the first copy
        # (a 16 MB shard is a 16 MB memcpy: about 10% of the client's CPU on a sharded write).
        # Checked against zarr 3.1 to 3.4; a newer zarr gets its own set() until checked again.
        fs = getattr(store, "fs", None)
        self._guards: dict[str, int] = {}  # key -> generation its next write needs (see guarding)
        self._listed: dict[str, dict[str, int]] = {}  # prefix -> the generations listed under it (see expecting)
        self._whole: set[str] = set()  # prefixes of _listed rewritten whole, where the last writer wins (expecting)
        self._kept = False  # the generations listed stay for a graph computed later (see with_own_expectations)
        self._held: dict[str, tuple[bytes, int]] = {}  # zarr.json written by a marked write under way
        gcs = type(store) is FsspecStore and type(fs).__module__.startswith("gcsfs")
        self._direct = gcs and _ZARR_VERSION < (3, 5)
        # whole objects are read over cloudio's own kept connections (see get)
        self._gcs_root = parse_gcs(self._root_url) if gcs and is_gcs(self._root_url) else None

    @property
    def root_url(self) -> str:
        """The journal key of the store's root."""
        return self._root_url

    def _with_store(self, store: Store) -> JournaledStore:
        return type(self)(store, self._root_url)

    def at(self, root_url: str) -> JournaledStore:
        """A store at ``root_url`` (one enclosing this store) over the same filesystem, credentials and all."""
        if self._gcs_root is not None:
            return JournaledStore(FsspecStore(fs=self._store.fs, path=parse_gcs(root_url).fs_path), root_url)
        return JournaledStore(LocalStore(root_url), root_url)

    def __repr__(self) -> str:
        return f"JournaledStore({self._root_url!r}, read_only={self.read_only})"

    def __str__(self) -> str:
        return self._root_url

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickled with the generations :meth:`expecting` listed, up to :data:`SHIPPED_GENERATIONS`: a Dask chunk
        task on a ``dask.distributed`` worker writes through such a copy, and its uploads need them too. Past
        that, those of what is rewritten whole (where the last writer wins) are left out first."""
        listed, whole = self._listed, self._whole
        if sum(map(len, listed.values())) > SHIPPED_GENERATIONS:
            listed, whole = {p: g for p, g in listed.items() if p not in whole}, set()
        if not listed or sum(map(len, listed.values())) > SHIPPED_GENERATIONS:
            return (type(self), (self._store, self._root_url))
        return (type(self), (self._store, self._root_url), {"_listed": listed, "_whole": whole, "_kept": self._kept})

    async def get(self, key: str, prototype: BufferPrototype, byte_range: ByteRequest | None = None) -> Buffer | None:
        """The wrapped store's ``get``; a whole object of GCS is read over kept connections of cloudio's own.

        Why: metadata documents and the write marker are read before
        anything else, one round trip each; through gcsfs's aiohttp session
        one such GET took 1.06 ms on the emulator, over
        :func:`cloudio._gcs.fast.get_into` 0.35 ms, CRC32C-checked, with
        gcsfs's credentials, retries and error mapping (the open of a small
        array is most of its load: ``benchmarks/bench_peers.py`` layout c).
        """
        root = self._gcs_root
        try:
            if byte_range is not None or root is None:
                if root is None:
                    return await super().get(key, prototype, byte_range)

                # a part of a shard, through gcsfs: within the time limit one call may take, retries included
                return await bounded(self._store.fs, super().get(key, prototype, byte_range))
            from cloudio._gcs.fast import get_into

            body = await get_into(self._store.fs, _joined(root, key), None)
        except Exception as e:
            err = self._read_failed(key, e)
            if err is None:
                raise
            raise err from e
        return None if body is None else prototype.buffer.from_bytes(body.data)

    def _read_failed(self, key: str, e: Exception, doing: str = "a read") -> CloudioError | None:
        """cloudio's error, naming the object, for a read (or ``doing``) of ``key`` that failed past the retries or
        was refused (None: already cloudio's, or not the server's answer). Why here: zarr reads through the store
        long after ``open_zarr`` or a lazy ``load_array`` returned, outside any call of cloudio's."""
        from cloudio._gcs.client import read_refused, transient_error

        url = self._url(key.rstrip("/"))
        if isinstance(e, CloudioError) or self._gcs_root is None:
            return None
        how = _how_failed(e)
        if how == "transient":
            return transient_error(url, doing, e)
        return read_refused(url, e, doing) if how == "refused" else None

    # -- recording ---------------------------------------------------------------------------

    def _url(self, key: str) -> str:
        return f"{self._root_url}/{key}" if key else self._root_url

    def _wrote(self, key: str, value: Buffer, generation: int | None = None) -> None:
        url = self._url(key)
        if generation:
            _stored_here_as(url, generation)
        with announcements.logged_by_the_store():
            change = journal().record(url, "write", size=len(value))
        slash = key.rfind("/")
        name = key[slash + 1:]
        if name in _META_NAMES or name == _V2_CONSOLIDATED:
            _metadata.wrote(self._url(key[:slash]) if slash >= 0 else self._root_url, name, value, change.seq)

    def _deleted(self, key: str, *, prefix: bool) -> None:
        self._stored_as(key, 0, prefix=prefix)
        url = self._url(key.rstrip("/"))
        with announcements.logged_by_the_store():
            change = journal().record(url, "delete", prefix=prefix)
        _metadata.deleted(url, prefix=prefix, seq=change.seq)

    def _unsure(self, key: str, *, prefix: bool) -> None:
        """A delete of ``key`` (of the keys under it, ``prefix``) that failed and may have been carried out,
        in part: journaled as an invalidation (caches ask the server again; a write's marker stays), and
        the metadata log no longer trusts what it may have changed."""
        url = self._url(key.rstrip("/"))
        change = journal().record(url, "invalidate", prefix=prefix)
        _metadata.unsure(url, prefix=prefix, seq=change.seq)

    # -- what writes -------------------------------------------------------------------------

    @stops_with_its_write
    async def set(self, key: str, value: Buffer) -> None:
        generation: int | None = None
        guard, expected = self._guards.get(key), self._expected(key)
        try:
            if (guard, expected) != (None, None) and is_gcs(self._root_url) and isinstance(self._store, FsspecStore):
                with self._changed_meanwhile(guard is None):
                    try:
                        generation = await self._pipe(key, value, guard, expected)
                    except ConflictError as e:
                        if expected is not None and any(key.startswith(p) for p in self._whole):
                            generation = await last_writer_wins(  # rewritten whole: the last writer wins
                                self._store.fs, parse_gcs(self._url(key)), len(value),  # type: ignore[attr-defined]
                                lambda g: self._pipe(key, value, guard, g), first=e.actual, races=_WHOLE_RACES)
                        elif not self._kept or expected is None or _stored_here.get(self._url(key)) != e.actual:
                            raise
                        else:  # a graph made before this process's own later write of the object: it is
                            # that write's (a late copy of an upload given up is never one this process stored)
                            generation = await self._pipe(key, value, guard, e.actual)
                if expected is not None:
                    self._stored_as(key, generation or 0)
            elif self._direct:
                generation = await self._pipe(key, value)
            else:
                await self._store.set(key, value)
        except FileNotFoundError as e:  # an upload answered 404: the bucket is not there
            if isinstance(e, CloudioError) or not is_gcs(self._root_url):
                raise
            bucket = parse_gcs(self._root_url).bucket
            raise BucketNotFoundError(
                f"{self._url(key)}: the upload was refused because bucket {bucket!r} does not exist; "
                "create it first (or check the URL)"
            ) from e
        self._wrote(key, value, generation)
        if key == "zarr.json" or key.endswith("/zarr.json"):
            url = self._url(key)
            last_seen.forget(url)  # what was kept no longer holds
            if generation and _marked(self._root_url):  # kept once the write is over (WriteMark.commit)
                self._held[url] = (value.to_bytes(), generation)

    @property
    def on_gcs(self) -> bool:
        """The store's objects are on GCS (or the emulator), not on a local disk."""
        return self._gcs_root is not None

    @property
    def uploads_in_batches(self) -> bool:
        """Chunks may go up through :meth:`set_each`: a GCS store on zarr's FsspecStore, no guard in force."""
        return self._gcs_root is not None and self._direct and not self._guards

    @stops_with_its_write
    async def set_each(self, count: int, body: Callable[[int], tuple[str, memoryview] | None],
                       concurrency: int) -> None:
        """``set(key, value)`` for each ``(key, value) = body(i)`` below ``count`` (None: nothing to write):
        chunks, not metadata documents, of a store whose :attr:`uploads_in_batches`.

        Small chunks go up in one batch (:func:`cloudio._gcs.transfer.put_verified_each`),
        each verified and journaled as :meth:`set` does it; ``body(i)`` may be
        called again for a chunk sent again, and must give the same bytes.
        """
        root = self._gcs_root
        assert root is not None
        store: FsspecStore = self._store  # type: ignore[assignment]
        if not store._is_open:
            await store._open()
        store._check_writable()
        keys: dict[int, str] = {}

        def path_body(i: int) -> tuple[GCSPath, memoryview, int | None] | None:
            got = body(i)
            if got is None:
                return None
            key, data = got
            if key.rsplit("/", 1)[-1] in _META_NAMES:
                raise ValueError(f"set_each writes chunks, not the metadata document {key!r}: use set")
            keys[i] = key
            return _joined(root, key), data, self._expected(key)

        def wrote(i: int, path: GCSPath, size: int, generation: int) -> None:
            journal().record(self._url(keys[i]), "write", size=size, parsed=path)
            _stored_here_as(self._url(keys[i]), generation)
            self._stored_as(keys[i], generation)

        with self._changed_meanwhile(bool(self._listed)):
            await put_verified_each(store.fs, count, path_body, wrote, concurrency)

    async def _pipe(self, key: str, value: Buffer, guard: int | None = None,
                    expected: int | None = None) -> int | None:
        """``FsspecStore.set`` (zarr 3.1 to 3.4) without its ``to_bytes`` copy, CRC32C-verified; the
        generation stored. ``guard``, ``expected``: see :meth:`guarding`, :meth:`expecting`.

        Raises IntegrityError, TransientError or UploadError (see
        :func:`cloudio._gcs.transfer.put_verified`) naming the object's URL.
        """
        store: FsspecStore = self._store  # type: ignore[assignment]
        if not store._is_open:
            await store._open()
        store._check_writable()
        if not isinstance(value, Buffer):
            raise TypeError(f"JournaledStore.set(): `value` must be a Buffer instance, got {type(value)}")
        arr = value.as_numpy_array()  # a view for host buffers
        view = memoryview(np.ascontiguousarray(arr)).cast("B")  # type: ignore[arg-type]  # numpy declares __buffer__ for Python >= 3.12 only
        # verified against the CRC32C the server answers with; the store journals a success itself
        done = await put_verified(store.fs, self._url(key), view, content_type="application/octet-stream",
                                  record=False, simple_limit=_ONE_REQUEST_LIMIT, media=True,
                                  if_generation_match=guard, expected_generation=expected)
        return done.generation

    # -- guarded read-modify-write: metadata two writers may change at once ------------------

    @contextmanager
    def guarding(self, key: str, generation: int) -> Iterator[None]:
        """Inside the block, a write of ``key`` needs the object at ``generation`` (0: absent).

        A write that finds another generation raises :class:`~cloudio.ConflictError`
        and stores nothing; the caller reads again and retries. Local stores
        have no generations: there the guard is not checked.
        """
        self._guards[key] = generation
        try:
            yield
        finally:
            self._guards.pop(key, None)

    def late_copies_may_land(self, prefix: str) -> bool:
        """Whether an upload this process gave up on (its outcome unknown) may still land under key ``prefix``
        ("": the whole store): see :func:`~cloudio._gcs.transfer.given_up_under`."""
        return self.on_gcs and given_up_under(self._url(prefix).rstrip("/") + "/")

    @contextmanager
    def expecting(self, *, kept: bool = False) -> Iterator[Listed]:
        """Inside the block, once the generations stored under a prefix are given (``listed(prefix, generations)``,
        from :meth:`list_generations` or :meth:`generations_from`), each write of a key starting with it needs
        the object at the generation listed (0: not listed): another generation raises
        :class:`~cloudio.ConflictError`. Keys under no prefix given are written unguarded. ``kept``: the
        generations stay after the block, for uploads that run later (a store of :meth:`with_own_expectations`).
        ``listed(prefix, generations, whole=True)``: what every writer rewrites whole alike (an append's
        coordinates), where the last writer wins: an object another writer stored there is written over at
        its generation (:func:`~cloudio._gcs.transfer.last_writer_wins`), a late copy still refused.

        Why: a write given up after its time limit is sent again, but the abandoned request may still reach
        the server later, after this write and the next one committed, and put the old bytes back. Sent
        with the generation the write found, it then fails its precondition instead. GCS enforces it; the
        emulator only when :data:`cloudio._gcs.fast.EXPECTED_AS_MULTIPART` is set.
        """
        given: list[str] = []
        self._kept = self._kept or kept

        def listed(prefix: str, generations: dict[str, int], whole: bool = False) -> None:
            self._listed[prefix] = generations
            if whole:
                self._whole.add(prefix)
            given.append(prefix)

        try:
            yield listed
        finally:
            for prefix in given if not kept else ():
                self._listed.pop(prefix, None)
                self._whole.discard(prefix)

    def with_own_expectations(self) -> Self:
        """This store, its state shared but for the generations :meth:`expecting` lists, which are its own.

        Why: writes at once through one store object (threads writing regions) must not take each other's
        generations, nor drop them when the first ends. And the chunks of ``to_zarr(..., compute=False)`` go
        up when its graph is computed, after the call returned: their guards stay with that graph
        (``expecting(kept=True)``), never reaching another write through this store object, whether the graph
        is computed or not. Its uploads then take an object this process stored after the listing (another
        graph computed first, a write of the same rows) as this process's own, not as another writer's.
        """
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        new._listed, new._whole = {}, set()
        return new

    @contextmanager
    def _changed_meanwhile(self, listed: bool) -> Iterator[None]:
        """A write refused by the generation :meth:`expecting` listed is another writer's doing: the
        :class:`~cloudio.ConflictError` then says what became of the store and what to do."""
        try:
            yield
        except ConflictError as e:
            if not listed:
                raise
            raise ConflictError(e.url, e.expected, e.actual, outcome=e.outcome, next_step=(
                f"It changed while a write of {self._root_url} was under way, and the write stopped there; if it "
                "had already changed part of the store, the store stays marked incomplete until a write of it "
                "succeeds. Check what else writes it, then write again.")) from e

    def _stored_as(self, key: str, generation: int, *, prefix: bool = False) -> None:
        """``key`` (every key under it, ``prefix``) now at ``generation`` (0: gone), for :meth:`expecting`: a key
        written twice in one write (a metadata document) needs the generation it stored the first time."""
        if prefix:
            base = key.rstrip("/")
            for generations in self._listed.values():
                for k in [k for k in generations if not base or k == base or k.startswith(f"{base}/")]:
                    del generations[k]
            return
        listed = self._listing_of(key)
        if listed is not None and generation:
            listed[key] = generation
        elif listed is not None:
            listed.pop(key, None)

    def _listing_of(self, key: str) -> dict[str, int] | None:
        """The generations :meth:`expecting` listed under the prefix holding ``key`` (None: no such prefix)."""
        if key == MARKER:
            return None
        return next((generations for prefix, generations in self._listed.items() if key.startswith(prefix)), None)

    def was_listed(self, key: str) -> bool:
        """``key`` was listed, with a generation, for the write :meth:`expecting` it."""
        return key in (self._listing_of(key) or ())

    def _expected(self, key: str) -> int | None:
        """The generation a write of ``key`` needs against a late copy (None: any): see :meth:`expecting`."""
        generations = None if key in self._guards else self._listing_of(key)
        return None if generations is None else generations.get(key, 0)

    async def list_generations(self, prefix: str) -> dict[str, int]:
        """Each key under ``prefix`` (a "directory", as :meth:`list_prefix` takes it) with its generation,
        the write marker left out: one listing of a GCS store's objects."""
        return {key: generation async for key, generation in self._listed_under(prefix) if key != MARKER}

    async def generations_from(self, starts: Collection[str]) -> dict[str, dict[str, int]]:
        """For each of ``starts`` (the beginning of a key: ``"v/c/2/"``, ``"v/2."``), each key beginning with it
        and its generation, the write marker left out: one listing of a GCS store's objects each, at once."""
        async def listed(start: str) -> dict[str, int]:
            return {key: generation for key, generation in await self._keys_from(start) if key != MARKER}

        found = await asyncio.gather(*(listed(start) for start in starts))
        return dict(zip(starts, found, strict=True))

    async def _keys_from(self, start: str) -> list[tuple[str, int]]:
        """The keys of a GCS store beginning with ``start``, with their generations (one listing)."""
        root = self._gcs_root
        assert root is not None
        base = f"{root.key.rstrip('/')}/" if root.key else ""
        try:
            items = await list_objects(self._store.fs, root.bucket, "name,generation", prefix=base + start)
        except Exception as e:  # a missing bucket stays gcsfs's FileNotFoundError, for the callers' own mapping
            err = self._read_failed(start, e, "a listing")
            if err is None:
                raise
            raise err from e
        keys = ((str(item["name"])[len(base):], int(item.get("generation") or 0)) for item in items)
        return [(key, generation) for key, generation in keys if key and not key.endswith("/")]  # no placeholders

    async def get_generation(self, key: str) -> tuple[bytes | None, int]:
        """The object at ``key`` and its generation in one GET: (None, 0) when it does not exist."""
        inner = self._store
        if not isinstance(inner, FsspecStore) or not is_gcs(self._root_url):
            from zarr.core.buffer import default_buffer_prototype

            buf = await inner.get(key, prototype=default_buffer_prototype())
            return (None if buf is None else buf.to_bytes()), 0
        from cloudio._gcs.fast import get_with_generation

        got = await get_with_generation(inner.fs, parse_gcs(self._url(key)))
        return (None, 0) if got is None else (got[0].tobytes(), got[1])

    @stops_with_its_write
    async def delete_guarded(self, key: str, generation: int) -> None:
        """Delete ``key`` only if it is at ``generation`` (``ifGenerationMatch``, enforced by GCS).

        fake-gcs-server ignores the precondition on deletes; the caller read
        the generation just before, which leaves the emulator a window of one request.
        """
        await self._delete(key, generation)

    async def _delete(self, key: str, generation: int | None) -> None:
        """Delete ``key`` (at ``generation``, when given); an object already gone is no error."""
        try:
            if isinstance(self._store, FsspecStore) and is_gcs(self._root_url):
                await self._delete_object(key, generation)
            else:
                await self._store.delete(key)
        except BaseException as e:
            # unless refused (nothing was deleted): stopped on its way by a failed write (cloudio._zarr.changes),
            # or failed past the retries after a try whose answer was lost: the server may have carried it out,
            # so caches ask again (the write's marker stays)
            if not _not_deleted(e):
                self._unsure(key, prefix=False)
            raise
        self._deleted(key, prefix=False)

    async def _delete_object(self, key: str, generation: int | None) -> None:
        """One DELETE over a kept connection (:func:`cloudio._gcs.fast.delete_object`), which a failed write
        can cancel: gcsfs's delete runs in tasks of its own that go on after the caller is cancelled."""
        from cloudio._gcs import fast

        inner = cast(FsspecStore, self._store)
        inner._check_writable()
        path = parse_gcs(self._url(key))
        tried: list[int] = []  # the tries of the DELETE (fast.UNANSWERED after one whose answer was lost)
        counting = fast.tries.set(tried)
        try:
            await fast.delete_object(inner.fs, path, generation)
        except FileNotFoundError:
            pass
        except FileExistsError as e:  # 412
            from cloudio._gcs.transfer import _generation

            assert generation is not None  # no precondition, no 412
            raise ConflictError(path.url, generation, await _generation(inner.fs, path)) from e
        except Exception as e:
            err = _delete_failed(path.url, e, unanswered=fast.UNANSWERED in tried)
            if err is None:
                raise
            raise err from e
        finally:
            fast.tries.reset(counting)
            inner.fs.invalidate_cache(path.fs_path)

    async def exists(self, key: str) -> bool:
        """Whether the object ``key`` is stored; on GCS one metadata GET within the time limit of one call, its
        failures named as the store's reads are.

        Why not the wrapped store's: gcsfs's ``_info`` retries a GET never answered for about 40 s and raises
        aiohttp's bare timeout, and races a listing that answers a refused GET (403) with "not there".
        """
        root = self._gcs_root
        if root is None:
            found: bool = await self._store.exists(key)
            return found
        fs = self._store.fs  # type: ignore[attr-defined]
        path = _joined(root, key)
        try:
            await bounded(fs, fs._call("GET", "b/{}/o/{}", path.bucket, path.key, json_out=True, fields="name"))
        except FileNotFoundError:
            return False
        except Exception as e:
            err = self._read_failed(key, e, "a look up")
            if err is None:
                raise
            raise err from e
        return True

    @stops_with_its_write
    async def set_if_not_exists(self, key: str, value: Buffer) -> None:
        # zarr calls this for every parent group of a node it creates: journaled only when it wrote, since a
        # recorded write keeps a failed write's marker up (and tells every cache the document changed)
        if await self.exists(key):
            return
        if isinstance(self._store, FsspecStore):
            await self.set(key, value)  # as FsspecStore's own (zarr's default): no write after a look
            return
        await self._store.set_if_not_exists(key, value)  # a local file is created exclusively
        self._wrote(key, value)

    async def _set_many(self, values: Iterable[tuple[str, Buffer]]) -> None:
        import asyncio

        await asyncio.gather(*(self.set(k, v) for k, v in values))

    @stops_with_its_write
    async def delete(self, key: str) -> None:
        await self._delete(key, self._expected(key) or None)  # (a chunk of nothing but the fill value)

    @stops_with_its_write
    async def delete_dir(self, prefix: str) -> None:
        if not prefix.strip("/") and _marked(self._root_url):
            await self._delete_all_but_marker()
        elif self._gcs_root is not None:
            await self._delete_listed(prefix)
        else:
            await self._store.delete_dir(prefix)
        self._deleted(prefix, prefix=True)

    @stops_with_its_write
    async def clear(self) -> None:
        if _marked(self._root_url):
            await self._delete_all_but_marker()
        elif self._gcs_root is not None:
            await self._delete_listed("")
        else:
            await self._store.clear()
        self._deleted("", prefix=True)

    async def _delete_listed(self, prefix: str) -> None:
        """Delete every key at or below ``prefix`` (the marker too), by name: zarr's ``FsspecStore`` deletes
        with fsspec's ``rm``, which reads ``[``, ``*``, ``?`` in the store's path as a glob and would delete
        a neighbour's keys (``z/a[1]`` matching ``z/a1``)."""
        self._store._check_writable()
        if self._gcs_root is None:
            await self._delete_keys([k async for k in self._keys_under(prefix)], under=prefix)
            return
        listed = {k: generation async for k, generation in self._listed_under(prefix)}
        await self._delete_keys(listed, listed, under=prefix)

    # -- what lists: the write-in-progress marker is cloudio's, not a node of the hierarchy --

    async def list(self) -> AsyncIterator[str]:
        async for key in self.list_prefix(""):
            yield key

    async def list_prefix(self, prefix: str) -> AsyncIterator[str]:
        """The wrapped store's ``list_prefix``; on GCS one listing over cloudio's kept connections
        (:func:`cloudio._gcs.fast.list_objects`, names only), which a ``save_array`` runs alongside
        its marker's upload."""
        async for key in self._keys_under(prefix):
            if key != MARKER:
                yield key

    async def _keys_under(self, prefix: str) -> AsyncIterator[str]:
        """:meth:`list_prefix` with the write marker."""
        if self._gcs_root is None:
            async for key in self._store.list_prefix(prefix):
                yield key
            return
        async for key, _ in self._listed_under(prefix):
            yield key

    async def _listed_under(self, prefix: str) -> AsyncIterator[tuple[str, int]]:
        """The keys under ``prefix`` in a GCS store, with their generations (one listing)."""
        under = prefix.rstrip("/")  # as gcsfs's find: the key itself, or keys below it as a directory
        for key, generation in await self._keys_from(under):
            if not under or key == under or key.startswith(f"{under}/"):  # "a" does not list "ab/..."
                yield key, generation

    async def list_dir(self, prefix: str) -> AsyncIterator[str]:
        """The wrapped store's ``list_dir`` without the write marker; on GCS within the time limit of one call.

        Why: zarr's ``FsspecStore.list_dir`` is one gcsfs ``_ls``, whose retries of a listing never answered
        (or of a server gone) take minutes; ended in time, it fails as a read does, naming the store.
        """
        if self._gcs_root is None:
            async for key in self._store.list_dir(prefix):
                if key != MARKER:
                    yield key
            return
        try:
            keys = await bounded(self._store.fs, _collected(self._store.list_dir(prefix)))
        except Exception as e:
            err = self._read_failed(prefix, e, "a listing")
            if err is None:
                raise
            raise err from e
        for key in keys:
            if key != MARKER:  # a group's own marker too (a write to url/group): never a node
                yield key

    async def is_empty(self, prefix: str) -> bool:
        # the wrapped store would count the marker: mode="w-" into a fresh store must not fail
        if prefix and not prefix.endswith("/"):
            prefix += "/"
        async for _ in self.list_prefix(prefix):
            return False
        return True

    async def _delete_all_but_marker(self) -> None:
        """Empty the store but keep the write-in-progress marker (``mode="w"`` inside a marked write).

        Why: zarr empties the store before writing a new node; taking the marker with it
        would leave a half-deleted old array that readers take as complete.
        """
        self._store._check_writable()
        if self._gcs_root is None:
            await self._delete_keys([k async for k in self._store.list_prefix("") if k != MARKER], under="")
        else:
            listed = {k: generation async for k, generation in self._listed_under("") if k != MARKER}
            await self._delete_keys(listed, listed, under="")
        self._prune_folders()

    def _prune_folders(self) -> None:
        """On a local disk, remove the folders left empty under the store (not the store's own).

        Why: a file cannot take a folder's name there; zarr's own ``clear`` removes
        the whole tree, and a store rewritten with fewer dimensions writes its chunk
        ``c/0`` where the old array's folder ``c/0/`` was.
        """
        root = getattr(self._store, "root", None)
        if self._gcs_root is not None or root is None:
            return
        for folder, _, _ in sorted(os.walk(root), key=lambda w: -len(w[0])):  # deepest first
            if os.path.normpath(folder) != os.path.normpath(root):
                try:
                    os.rmdir(folder)
                except OSError:  # not empty
                    pass

    @stops_with_its_write
    async def delete_each(self, keys: Collection[str]) -> None:
        """Delete ``keys``, each at the generation :meth:`expecting` listed (see :meth:`_delete_keys`); each is
        journaled. A key already gone is no error."""
        self._store._check_writable()
        await self._delete_keys(keys, {key: self._expected(key) or 0 for key in keys})
        self._prune_folders()
        for key in keys:
            self._deleted(key, prefix=False)

    async def _delete_keys(self, keys: Collection[str], generations: Mapping[str, int] | None = None, *,
                           under: str | None = None) -> None:
        """Delete ``keys``; on GCS each needs the generation ``generations`` gives it (``ifGenerationMatch``;
        0 or none: by name), and one found at another raises :class:`~cloudio.ConflictError`.

        When one fails, what may have changed is journaled before the error is raised: the prefix ``under``
        (the keys are those listed there) as invalidated, or else each key deleted as deleted and each whose
        outcome is not known as invalidated. The caller journals a success.

        Why: a DELETE given up at its time limit and sent again may still reach the server later, after
        the write stored that object again, and remove it; with the generation it was listed at, GCS refuses
        it then (fake-gcs-server ignores the precondition on deletes). One request per object over kept
        connections, :data:`_DELETES_AT_ONCE` at a time: gcsfs's batches take no preconditions (and against
        an emulator gcsfs sends one request per object too).
        """
        if not keys:
            return
        store = self._store
        gone: set[str] = set()  # deleted, or not there
        kept: set[str] = set()  # refused: not deleted
        try:
            if self._gcs_root is not None:
                limit = asyncio.Semaphore(_DELETES_AT_ONCE)

                async def one(key: str) -> None:
                    async with limit:
                        try:
                            await self._delete_object(key, (generations or {}).get(key) or None)
                        except Exception as e:
                            if _not_deleted(e):
                                kept.add(key)
                            raise
                    gone.add(key)

                with self._changed_meanwhile(bool(generations)):
                    failed = [e for e in await asyncio.gather(*map(one, keys), return_exceptions=True) if e]
                    if failed:
                        raise failed[0]
            else:
                async def local(key: str) -> None:
                    await store.delete(key)
                    gone.add(key)

                await asyncio.gather(*map(local, keys))
        except BaseException:
            # some may be gone: caches and the write's marker must know, and only of what may have changed
            if under is not None:
                if len(kept) < len(keys):
                    self._unsure(under, prefix=True)
            else:
                for key in keys:
                    if key in gone:
                        self._deleted(key, prefix=False)
                    elif key not in kept:
                        self._unsure(key, prefix=False)
            raise



class _RefusedDelete(UploadError):
    """A DELETE the server refused (403, 400...) with no earlier try whose answer was lost: the object is there."""


def _not_deleted(e: BaseException) -> bool:
    """Whether a delete that raised ``e`` certainly left the object there: refused, by the server or by its
    precondition."""
    return isinstance(e, ConflictError | _RefusedDelete)


def _delete_failed(url: str, e: Exception, *, unanswered: bool) -> CloudioError | None:
    """cloudio's error, naming the object at ``url``, for its DELETE that failed past the retries or was refused
    (None: already cloudio's, or not the server's answer). ``unanswered``: a try's answer was lost, so the server
    may have deleted it all the same. Why: zarr deletes through the store (a chunk of nothing but the fill value,
    a member deleted) outside any call of cloudio's, and gcsfs's errors name no gs:// URL."""
    from cloudio._gcs.client import transient_error
    from cloudio.errors import TransientError

    if isinstance(e, CloudioError):
        return None
    how = _how_failed(e)
    if how == "transient":
        return TransientError(f"{transient_error(url, 'a delete', e)} The object may or may not have been "
                              "deleted: cloudio dropped what it had cached of it, so the next read asks the server.")
    if how == "refused":
        if unanswered:
            return UploadError(f"{url}: the server refused its delete ({e}) after an earlier try's answer was "
                               "lost, so it may have been deleted all the same: cloudio dropped what it had "
                               "cached of it. Check that the credentials in use may delete objects in this "
                               "bucket, then try again.")
        return _RefusedDelete(f"{url}: the server refused its delete ({e}); nothing was deleted. Check that the "
                              "credentials in use may delete objects in this bucket, then try again.")
    return None


def _how_failed(e: BaseException) -> Literal["transient", "refused"] | None:
    """How a request through the store failed: past the retries or the time limit ("transient"), refused by
    the server (gcsfs's mapping of a refusal: 403 "Forbidden"; 400, 409: "refused"), or neither (None)."""
    if _transient(e) or isinstance(e, TimeoutError):
        return "transient"
    # gcsfs's refusal is a bare OSError ("Forbidden: ..."); one with an errno is this machine's own (a local
    # store's file the OS cannot open), not the server's answer
    return "refused" if (type(e) is OSError and e.errno is None) or is_refusal(e) else None


class _SyncJournaledStore(JournaledStore):
    """A :class:`JournaledStore` over a store with synchronous writes (``LocalStore``, zarr >= 3.2)."""

    # zarr's own forwarding, where this zarr has it (3.4): the wrapped store reads synchronously too
    get_sync = getattr(WrapperStore, "get_sync", None)
    get_ranges_sync = getattr(WrapperStore, "get_ranges_sync", None)

    def set_sync(self, key: str, value: Buffer) -> None:  # type: ignore[override]
        self._store.set_sync(key, value)  # type: ignore[attr-defined]
        self._wrote(key, value)

    def delete_sync(self, key: str) -> None:  # type: ignore[override]
        self._store.delete_sync(key)  # type: ignore[attr-defined]
        self._deleted(key, prefix=False)


#: object URL -> the generation this process last stored there through a JournaledStore (the most recent
#: STORED_HERE_KEPT): a graph made before this process's own later write of an object takes it as that
#: write's, not another writer's (JournaledStore.set)
_stored_here: dict[str, int] = {}
STORED_HERE_KEPT = 65_536
_stored_here_lock = threading.Lock()


def _stored_here_as(url: str, generation: int) -> None:
    with _stored_here_lock:
        touch(_stored_here, url, generation)
        if len(_stored_here) > STORED_HERE_KEPT:
            drop_oldest(_stored_here, STORED_HERE_KEPT)


#: DELETEs of one write in flight at once (JournaledStore._delete_keys)
_DELETES_AT_ONCE = 32

#: the most generations a pickled store carries to a worker (see JournaledStore.__reduce__): each Dask task
#: may carry its own copy; a write that listed more goes unguarded there (docs/consistency.md)
SHIPPED_GENERATIONS = 256
#: rounds in which an upload of what an append rewrites whole (the group's documents, coordinates) writes over
#: other writers' objects before its ConflictError (the group's zarr.json is what writers appending at once
#: all rewrite; their consolidation takes as many rounds)
_WHOLE_RACES = 20


def key_prefix(path: str) -> str:
    """The keys under an array or group at ``path`` in its store start with this ("" at the root)."""
    return f"{path}/" if path else ""


def _root_of(store: Store) -> str:
    """The journal key of a store's root, from the store itself."""
    fs = getattr(store, "fs", None)
    path = getattr(store, "path", None)
    if fs is not None and isinstance(path, str):
        protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
        scheme = "gs" if protocol in ("gs", "gcs") else protocol
        return f"{scheme}://{path.strip('/')}"
    root = getattr(store, "root", None)
    if root is not None:
        return store_url(os.fspath(root))
    raise TypeError(f"JournaledStore: cannot tell the root URL of {store!r}; pass root_url")


def store_url(url: str | os.PathLike[str]) -> str:
    """The journal key of a store root: ``gs://bucket/prefix`` or an absolute local path."""
    return normalize(url).rstrip("/")


def zarr_store(url: str | os.PathLike[str], read_only: bool = False, **storage_options: Any) -> JournaledStore:
    """A Zarr store at ``url`` whose writes and deletes are journaled.

    Use it wherever zarr or xarray take a store (``zarr.open_group(store)``,
    ``zarr.create_array(store, ...)``, ``xarray.open_zarr(store)``): every
    chunk, shard and metadata document it writes becomes visible at once to
    the other readers of this process (GDAL, tracked fsspec filesystems,
    :func:`cloudio.open_zarr`).

    Parameters
    ----------
    url
        ``gs://bucket/prefix``, ``/vsigs/bucket/prefix`` or a local path.
    read_only
        Open the store read-only (zarr refuses writes through it).
    **storage_options
        Extra gcsfs options; the emulator's (or real GCS defaults) otherwise.

    Returns
    -------
    JournaledStore
        A :class:`zarr.storage.WrapperStore` over zarr's ``FsspecStore`` (GCS)
        or ``LocalStore`` (local paths).

    Raises
    ------
    InvalidURLError
        When ``url`` is neither a GCS URL nor a local path.
    """
    root = store_url(url)
    inner: Store
    if is_gcs(url):
        from cloudio._gcs.client import gcs_filesystem

        path = parse_gcs(os.fspath(url))
        fs = gcs_filesystem(asynchronous=True, **storage_options)
        inner = FsspecStore(fs=fs, path=path.fs_path, read_only=read_only)
    else:
        if storage_options:
            log.debug("zarr_store(%r): storage options ignored for a local path", root)
        if not read_only:
            try:
                os.makedirs(root, exist_ok=True)
            except (FileExistsError, NotADirectoryError) as e:  # a file where the store (or a folder above) goes
                from cloudio.errors import ConfigurationError

                raise ConfigurationError(f"{root}: a file is there (or in its path), not a Zarr store's folder; "
                                         "nothing was written. Write the store to another path.") from e
        inner = LocalStore(root, read_only=read_only)
    return JournaledStore(inner, root)


# -- the write-in-progress marker ------------------------------------------------------------

#: object at a store's root while a multi-object write (save_array, to_zarr) is under way
MARKER = ".cloudio-write-in-progress"

_marks_lock = threading.Lock()
_marks: dict[str, int] = {}  # store root -> writes of this process under way there


def reset() -> None:
    """Forget the metadata writes this process made (:func:`cloudio._state.reset`); marks under way stay."""
    _metadata.forget_writes()
    with _checked_lock:
        _checked.clear()
    announcements.reset()


def _marked(root_url: str) -> bool:
    with _marks_lock:
        return _marks.get(root_url, 0) > 0


class WriteMark:
    """The marker of one multi-object write (``save_array``, ``to_zarr``) at a store's root.

    :meth:`begin` adds this write to ``<store>/.cloudio-write-in-progress``
    (JSON: the writers under way, each with host, pid, time, uuid, operation;
    the latest also at the top level) before the first object of the write;
    readers through cloudio refuse the store while it is there
    (:func:`check_complete`). :meth:`commit` takes this write off the list and
    removes the marker when no writer is left. A write that ``replaces`` the
    store (``mode="w"``, ``save_array(overwrite=True)``) also takes off the writers listed
    before it began: a failed write's mark goes with a rewrite. A write of one
    ``group`` (``to_zarr(..., group=)``, its entry names the group) replaces
    only that group: it takes off the earlier writers of that group and of
    groups inside it, and leaves those of the root and of other groups
    listed (an enclosing writer's entry then names the group as ``rewritten``:
    readers of that group no longer count it, :func:`check_complete`). :meth:`fail`
    leaves this write listed when it changed anything in the store, since the
    store may then mix old and new objects; it takes it off when nothing but
    the marker was written (the write was refused before it started).

    A write of ``to_zarr(..., compute=False)`` that is not a region write
    writes the metadata now and leaves its chunks to a graph computed later,
    or never: xarray's template, filled by region writes. Once its own part
    is done (:meth:`handed_to_graph`) its entry says ``"deferred": true``,
    and the writers it replaced come off, until a task every chunk of the
    graph waits for (:meth:`computing`) makes it an ordinary entry again,
    re-added if it was taken off; the graph's last task commits. A write
    that ``fills`` (a region write) takes the deferred entries of its group
    off as it commits: the template is then what the region writes made of
    it, and opens, the regions not written yet reading as the fill value.

    Two processes writing one store at once share the marker: each change of
    the list is a read-modify-write guarded by the marker's generation and
    retried on conflict, so a writer's commit never removes the mark of a
    writer that began after it, or of any writer when it does not replace
    the store. A replacing write cannot tell a failed writer listed before
    it (a process killed on another machine) from one still running, and
    takes both off: two rewrites of one store at once leave a mix of both
    whatever the marker says, and a job retried after its worker was lost
    must not find its own rewrite refused.
    """

    def __init__(self, store: JournaledStore, operation: str, *, replaces: bool = True, group: str = "",
                 fills: bool = False) -> None:
        self.store = store
        self.operation = operation
        self.replaces = replaces
        self.group = group.strip("/")  # the group of the store this write replaces or changes ("": the root)
        self.fills = fills
        self.token = ""
        self._entry: dict[str, Any] = {}
        self._counted = False  # this write counts in _marks (from begin to commit, or to handed_to_graph)
        self._seq = 0
        self._before: list[dict[str, Any]] = []  # the writers listed when this one began
        self._maybe_up = False  # begin failed: its entry may be in the marker all the same
        self._begun = False
        self._going = False  # begun is under way (a write's shards wait for it; fail may come first)
        self._failed = False  # fail ran (begun ending and fail see each other's outcome under _marks_lock)

    def begin(self) -> Self:
        run_sync(self.begun())
        return self

    async def begun(self) -> None:
        """:meth:`begin` on zarr's event loop, for a write that prepares its first objects meanwhile."""
        import datetime
        import socket
        import uuid

        self.token = uuid.uuid4().hex
        entry = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "uuid": self.token,
            "operation": self.operation,
            "group": self.group,
        }
        self._entry = entry
        root = self.store.root_url
        with _marks_lock:
            _marks[root] = _marks.get(root, 0) + 1
        self._counted = True

        def add(writers: list[dict[str, Any]]) -> list[dict[str, Any]]:
            # this write's own entry is there when an earlier try landed and its answer was lost
            self._before = [w for w in writers if w.get("uuid") != self.token]
            return [*self._before, entry]

        self._going = True
        try:
            # on GCS the marker is usually absent: one create-only request, read only when it is not
            await _update_marker(self.store, add, read_first=not is_gcs(root))
        except BaseException:
            with _marks_lock:
                self._maybe_up = True  # sent, its answer not taken in (a refusal, or cancelled on its way)
                self._going = False
            self._release()
            raise
        seq = journal().seq
        with _marks_lock:
            self._going = False
            failed = self._failed
            if not failed:
                self._seq, self._begun = seq, True
        if failed:  # the write failed (an interrupt that did not wait for this): nothing of it went up
            try:
                await _update_marker(self.store, lambda writers: [w for w in writers if w.get("uuid") != self.token],
                                     read_first=True)
            except Exception as e:  # a marker left behind errs on the safe side
                log.warning("%s: could not take the write marker off after %s was stopped: %s", root,
                            self.operation, e)
            finally:
                self._release()

    @property
    def follows_others(self) -> bool:
        """Writes of this store were listed in its marker when this one began (one may have failed part way)."""
        return bool(self._before)

    def handed_to_graph(self) -> None:
        """The deferred write's own part is done: its entry says so from now on (a region write that succeeds
        takes it off), and a replacing write takes off the writers it replaced, whose leftovers it deleted.
        Its graph (:meth:`computing`) needs no count in ``_marks``, which keeps a marker through the emptying
        of a store by a write under way and the ``zarr.json`` documents such a write stored (no graph empties
        a store or writes metadata). If the marker cannot be changed, the entry stays an ordinary one: the
        graph is as good, but only computing it opens the store."""
        try:
            self._taken_off(self.replaces, then={**self._entry, "deferred": True})
        except Exception as e:
            log.warning("%s: could not mark %s as deferred to its graph (%s); the store stays refused until the "
                        "graph is computed", self.store.root_url, self.operation, e)
        finally:
            self._release()

    def computing(self) -> None:
        """As the deferred write's graph starts (in a task every chunk of it waits for, once per computation): its
        entry in the marker, no longer deferred (a region write that commits meanwhile leaves it), added again
        if a region write took it off."""
        self._taken_off(False, then=self._entry)

    def commit(self, *, replacing: bool | None = None, filled: bool | None = None) -> None:
        """Take this write (and, when it replaces the store or its group, the writers listed before it that it
        replaced; when it ``filled`` a region, the deferred writes of its group) off the marker."""
        try:
            left = self._taken_off(self.replaces if replacing is None else replacing,
                                   self.fills if filled is None else filled)
            if not left:  # the marker is down: what this write stored is the array, for load_array's guess
                for url, (doc, generation) in self.store._held.items():
                    last_seen.remember(url, doc, generation)
        finally:
            self.store._held.clear()
            self._release()

    def _release(self) -> None:
        if self._counted:
            self._counted = False
            _release(self.store.root_url)

    def _taken_off(self, replacing: bool, filled: bool = False,
                   then: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """Take this write (and, ``replacing``, the writers it replaced; ``filled``, the deferred writes of its
        group) off the marker, and put its entry ``then`` back last, if given; the other writers left."""
        before = {_identity(w) for w in self._before} if replacing else set()
        left: list[dict[str, Any]] = []

        def remove(writers: list[dict[str, Any]]) -> list[dict[str, Any]]:
            left[:] = []
            for w in writers:
                if w.get("uuid") == self.token or (filled and _deferred_of(w, self.group)):
                    continue
                kept = self._replaced(w) if _identity(w) in before else w
                if kept is not None:
                    left.append(kept)
            return [*left, then] if then else list(left)

        async def both() -> None:
            await asyncio.gather(_update_marker(self.store, remove, read_first=True),
                                 self._enclosing_templates_filled() if filled else _nothing())

        run_sync(both())
        return left

    async def _enclosing_templates_filled(self) -> None:
        """A region write through a group's own URL (``<store>/g``) fills a template written with ``group="g"``
        at ``<store>`` too: the deferred entries of that group come off the markers of the stores enclosing
        this one (their GETs go alongside the update of this store's marker). A failure here leaves the
        template refused, and the region write, which is done, does not fail for it."""
        try:
            for root, marker in await _enclosing_marker(self.store):
                group = _path_inside(self.store, root, self.group)
                if any(_deferred_of(w, group) for w in _writers(marker.to_bytes())):
                    await _update_marker(self.store.at(root), lambda writers, group=group: [
                        w for w in writers if not _deferred_of(w, group)], read_first=True)
        except Exception as e:
            log.warning("%s: could not take the filled template off the markers of the stores enclosing it: %s",
                        self.store.root_url, e)

    def _replaced(self, writer: dict[str, Any]) -> dict[str, Any] | None:
        """An earlier writer's entry once this replacing write committed: None when this write replaced all it
        wrote (its group is this write's or inside it); with this group ``rewritten`` when its write encloses
        this one's (the root's: what it left in the group is gone); as it was for another group.

        Why: ``mode="w"`` with ``group=`` empties and rewrites that group only; a root write that failed
        still left the rest of the store half written.
        """
        group = _writer_group(writer)
        if not self.group or (group is not None and _within(group, self.group)):
            return None
        if group is None or _within(self.group, group):
            return {**writer, "rewritten": sorted({*_rewritten(writer), self.group})}
        return writer

    def fail(self, unheard: bool = False) -> bool:
        """The write failed: its entry stays listed when it changed (or may have changed) the store, taken off
        when not. ``unheard``: other processes may have changed the store for it without this process
        hearing (:meth:`cloudio._zarr.changes._Changes.unheard`): it stays. Returns whether the store stays
        marked by this write (its entry left, or not known to be gone), which the write's error then says."""
        with _marks_lock:
            self._failed = True
            going = self._going
        if going:  # begun, still under way, takes the entry off when it ends (no shard went up before it)
            log.warning("%s: %s was stopped while its write marker was on its way; it is taken off once its "
                        "request ends", self.store.root_url, self.operation)
            return True
        if not self._begun:  # the marker never went up (begin released its count), or may have, unanswered
            if self._maybe_up:
                try:
                    self._taken_off(False)
                except Exception as e:  # a marker left behind errs on the safe side
                    log.warning("%s: could not check the write marker after %s was stopped: %s",
                                self.store.root_url, self.operation, e)
                    return True
            return False
        if unheard or self._changed():
            log.warning("%s: %s failed part way; the store stays marked incomplete", self.store.root_url,
                        self.operation)
            self.store._held.clear()
            self._release()
            return True
        try:
            self.commit(replacing=False, filled=False)
        except Exception as e:  # any failure: a marker left behind errs on the safe side
            log.warning("%s: could not remove the write marker after a refused %s: %s", self.store.root_url,
                        self.operation, e)
            return True
        return False

    def changed(self) -> bool:
        """Whether the write began and changed (or may have changed) the store: see :meth:`_changed`."""
        return self._begun and self._changed()

    def _changed(self) -> bool:
        """Whether anything but the marker was written or deleted in the store since :meth:`begin`, or may
        have been: an upload whose answer was lost is journaled as an invalidation, and may have landed."""
        marker = self.store._url(MARKER)  # any other change counts (records dropped too: EVERYTHING)
        return any(c.url != marker for c in journal().since(self._seq, read=self.store.root_url))

    def __enter__(self) -> Self:
        return self.begin()

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.fail()


#: read-modify-write rounds of the marker before a ConflictError is given up on (each loses to a writer that
#: changed the marker in between; a handful of writers settle in a few rounds)
_MARK_ATTEMPTS = 20


def _writers(data: bytes | None) -> list[dict[str, Any]]:
    """The writers a marker document lists (one anonymous writer for a marker cloudio did not write)."""
    if data is None:
        return []
    try:
        doc = json.loads(data)
    except ValueError:
        doc = {}
    if not isinstance(doc, dict):
        doc = {}
    listed = doc.get("writers")
    return [w for w in listed if isinstance(w, dict)] if isinstance(listed, list) else [doc]


def _identity(writer: dict[str, Any]) -> str:
    """What tells one marker entry from another: its UUID (the whole entry for one cloudio did not write)."""
    token = writer.get("uuid")
    return token if isinstance(token, str) else json.dumps(writer, sort_keys=True, default=str)


def _writer_group(writer: dict[str, Any]) -> str | None:
    """The group a marker entry's write changed ("": the root); None when the entry does not say (a cloudio
    that did not record it, or a marker not cloudio's): the whole store, to be safe."""
    group = writer.get("group")
    return group.strip("/") if isinstance(group, str) else None


def _rewritten(writer: dict[str, Any]) -> list[str]:
    """The groups written again whole since the entry's write (:meth:`WriteMark._replaced`)."""
    groups = writer.get("rewritten")
    return [g.strip("/") for g in groups if isinstance(g, str)] if isinstance(groups, list) else []


def _deferred_of(writer: dict[str, Any], group: str) -> bool:
    """Whether a marker entry is that of a template of ``group`` (a deferred ``compute=False`` write)."""
    return writer.get("deferred") is True and _writer_group(writer) == group


def _path_inside(store: JournaledStore, where: str, group: str = "") -> str:
    """The path of ``group`` of ``store`` relative to the root ``where`` of a store enclosing it."""
    path = store.root_url[len(where) + 1:]
    return f"{path}/{group}" if group else path


def _within(path: str, group: str) -> bool:
    """Whether ``path`` (relative to a store's root, "" the root) is ``group`` or inside it."""
    return not group or path == group or path.startswith(f"{group}/")


def _refusing(doc: dict[str, Any], path: str) -> list[dict[str, Any]]:
    """The writers of the marker document ``doc`` that make a read of ``path`` in its store incomplete: all
    but those whose leftovers there a later rewrite of a group holding ``path`` replaced."""
    listed = doc.get("writers")
    writers = [w for w in listed if isinstance(w, dict)] if isinstance(listed, list) else []
    return [w for w in writers or [doc] if not any(_within(path, g) for g in _rewritten(w))]


async def _update_marker(store: JournaledStore, change: Any, *, read_first: bool) -> None:
    """Apply ``change`` (writers -> writers) to the marker: write it, or delete it when no writer is left."""
    from zarr.core.buffer import default_buffer_prototype

    data, generation = await store.get_generation(MARKER) if read_first else (None, 0)
    for _ in range(_MARK_ATTEMPTS):
        writers = change(_writers(data))
        if data is not None and writers == _writers(data):  # nothing to change
            return
        try:
            if writers:
                doc = {**writers[-1], "writers": writers}
                with store.guarding(MARKER, generation):
                    await store.set(MARKER, default_buffer_prototype().buffer.from_bytes(json.dumps(doc).encode()))
            elif data is not None:
                await store.delete_guarded(MARKER, generation)
            return
        except ConflictError as e:
            log.debug("%s: the write marker changed meanwhile (%s); reading it again", store.root_url, e)
            data, generation = await store.get_generation(MARKER)
    raise ConflictError(store._url(MARKER), generation, (await store.get_generation(MARKER))[1],
                        next_step=f"{_MARK_ATTEMPTS} writers changed it in turn; retry the write.")


def _release(root_url: str) -> None:
    with _marks_lock:
        n = _marks.get(root_url, 0) - 1
        if n > 0:
            _marks[root_url] = n
        else:
            _marks.pop(root_url, None)


def _marker_doc(buf: Buffer | None) -> dict[str, Any] | None:
    """The write marker's document from its GET (None: no marker; {}: a marker that is not JSON)."""
    if buf is None:
        return None
    try:
        doc = json.loads(buf.to_bytes())
    except ValueError:
        doc = None
    return doc if isinstance(doc, dict) else {}


def check_complete(store: JournaledStore, *, own: bool = True, group: str = "") -> None:
    """Raise :class:`~cloudio.IncompleteWriteError` when a write to ``store`` (unless not ``own``), to a
    store that encloses it (:func:`enclosing_markers`), or to a store at a level of its ``group`` path
    (``to_zarr(url + "/a", group="b")`` read as group ``a/b`` of ``url``), started and never committed.

    Costs one GET of each marker, all at once (404s when all is well): one more per level of ``group``.
    """
    from zarr.core.buffer import default_buffer_prototype

    proto = default_buffer_prototype()
    group = group.strip("/")
    parts = group.split("/") if group else []
    levels = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]  # "a", "a/b": each may be a store's root

    async def markers() -> list[Any]:
        return await asyncio.gather(store.get(MARKER, prototype=proto) if own else _nothing(),
                                    _enclosing_marker(store),
                                    *(store.get(f"{level}/{MARKER}", prototype=proto) for level in levels))

    mine, outer, *inner = run_sync(markers())
    _refuse_marked(store, mine, path=group)
    _refuse_enclosed(store, outer, group)
    for level, marker in zip(levels, inner, strict=True):
        _refuse_marked(store, marker, f"{store.root_url}/{level}", path=group[len(level) + 1:])


def enclosing_markers(store: JournaledStore) -> list[GCSPath]:
    """Where the write markers of the stores enclosing ``store`` in its bucket would be, outermost first:
    ``a/.cloudio-write-in-progress`` for ``gs://b/a/x.zarr`` (a dataset's, when ``store`` is one of its
    arrays or groups). Not the bucket's root, which every store would have to ask for; none off GCS."""
    root = store._gcs_root
    if root is None:
        return []
    parts = root.key.strip("/").split("/")
    return [GCSPath(root.bucket, "/".join([*parts[:n], MARKER])) for n in range(1, len(parts))]


async def _enclosing_marker(store: JournaledStore) -> list[tuple[str, Buffer]]:
    """The root URL and marker of each store enclosing ``store`` that is marked, outermost first (GETs at
    once)."""
    from zarr.core.buffer import default_buffer_prototype

    from cloudio._gcs.fast import get_into

    if store._gcs_root is None:
        return _enclosing_local_markers(store.root_url)
    paths = enclosing_markers(store)
    if not paths:
        return []

    async def marker(path: GCSPath) -> np.ndarray | None:
        try:
            return await get_into(store._store.fs, path, None)
        except OSError as e:  # gcsfs's 403: credentials for the store's own prefix only, as before
            if type(e) is not OSError or not str(e).startswith("Forbidden"):
                raise
            log.debug("%s: may not read %s; not taken as marked", store.root_url, path.url)
            return None

    bodies = await asyncio.gather(*(marker(path) for path in paths))
    return [(path.url.rsplit("/", 1)[0], default_buffer_prototype().buffer.from_bytes(body.data))
            for path, body in zip(paths, bodies, strict=True) if body is not None]


def _enclosing_local_markers(root: str) -> list[tuple[str, Buffer]]:
    """:func:`_enclosing_marker` for a store on a local disk: a marker file in a folder above it (a stat each)."""
    from zarr.core.buffer import default_buffer_prototype

    found = []
    folder = os.path.dirname(os.path.normpath(root))
    while True:
        try:
            with open(os.path.join(folder, MARKER), "rb") as f:
                found.append((folder, default_buffer_prototype().buffer.from_bytes(f.read())))
        except OSError:  # none there (or not readable): not marked
            pass
        parent = os.path.dirname(folder)
        if parent == folder:
            return found[::-1]  # outermost first
        folder = parent


def _refuse_enclosed(store: JournaledStore, enclosing: list[tuple[str, Buffer]], group: str = "") -> None:
    """:func:`_refuse_marked` for each marked store that encloses ``store`` (:func:`_enclosing_marker`), as a
    read of ``group`` of ``store``."""
    for where, marker in enclosing:
        _refuse_marked(store, marker, where, path=_path_inside(store, where, group))


def _refuse_marked(store: JournaledStore, marker: Buffer | None, where: str | None = None, *,
                   path: str = "") -> None:
    """Raise :class:`~cloudio.IncompleteWriteError` when the GET of ``store``'s write marker (or of the
    store at ``where`` that encloses it) found one with a writer that makes a read of ``path`` (relative to
    the marked store) incomplete (:func:`_refusing`)."""
    from cloudio.errors import IncompleteWriteError

    doc = _marker_doc(marker)
    if doc is None:
        return
    url = where or store.root_url
    refusing = _refusing(doc, path)
    if not refusing:
        log.debug("%s: %s is marked, but %r was written again whole since", store.root_url, url, path)
        return
    writer = refusing[-1]  # the latest, as the marker's top level names it
    what = f"a write to {url}" if where else "a write"
    who = f"by {writer.get('host', '?')} (pid {writer.get('pid', '?')}, {writer.get('operation', 'a write')})"
    group = _writer_group(writer)
    again = (f"cloudio.to_zarr with mode='w', group={group!r}" if group
             else "cloudio.save_array / cloudio.to_zarr with mode='w'")
    when = writer.get("time", "an unknown time")
    by_hand = f"cloudio.filesystem({url!r}).rm({url + '/' + MARKER!r})"
    if writer.get("deferred") is True:
        raise IncompleteWriteError(
            f"{store.root_url}: {what} made at {when} {who} with compute=False wrote the metadata of {url} but "
            "none of the chunks of its graph: compute that graph (its .compute() or dask.compute), or, if it is a "
            "template, write its regions (cloudio.to_zarr with region=...): the store opens once either "
            f"finished. If you know the data is complete, remove the mark with {by_hand}."
        )
    raise IncompleteWriteError(
        f"{store.root_url}: {what} started at {when} {who} never finished, so {url} may mix old and new objects. "
        f"Write it again ({again}); if you know the data is complete, remove the mark with {by_hand}."
    )


def open_complete_array(store: JournaledStore, check_marker: bool,
                        zarr_format: Literal[2, 3] | None = None) -> zarr.Array[Any]:
    """``zarr.open_array(store, mode="r")``, refused like :func:`check_complete` (its own marker only when
    ``check_marker``).

    The marker's GET goes out alongside zarr's metadata GETs, not before
    them: one round trip to open instead of two (a load of a small array
    is mostly round trips). A marker found wins over whatever the open
    raised: a write that stopped part way explains a missing document.
    """
    from zarr.api.asynchronous import open_array
    from zarr.core.buffer import default_buffer_prototype

    async def open_it() -> Any:
        if zarr_format is not None:
            return await open_array(store=store, mode="r", zarr_format=zarr_format)
        try:  # Zarr v3 first: one GET; zarr's own probe of both formats makes three
            return await open_array(store=store, mode="r", zarr_format=3)
        except FileNotFoundError:  # zarr's ArrayNotFoundError is one: a v2 array, or nothing there
            return await open_array(store=store, mode="r", zarr_format=None)

    async def all_three() -> tuple[Any, Any, Any]:
        marker = store.get(MARKER, prototype=default_buffer_prototype()) if check_marker else _nothing()
        return await asyncio.gather(marker, _enclosing_marker(store), open_it(), return_exceptions=True)

    marker, enclosing, opened = run_sync(all_three())
    for got in (marker, enclosing):
        if isinstance(got, BaseException):
            raise got
    _refuse_marked(store, marker)
    _refuse_enclosed(store, enclosing)
    if isinstance(opened, BaseException):
        raise opened
    return zarr.Array(opened)


async def _nothing() -> None:
    return None


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run a store coroutine on zarr's event loop, as zarr's own synchronous API does; when the wait is
    interrupted (Ctrl-C: ``KeyboardInterrupt``), the coroutine is cancelled and has ended before the
    interrupt is raised (:func:`~cloudio._threads.run_to_the_end`; zarr's ``sync`` leaves it running)."""
    from zarr.core import sync as zsync

    loop_of = getattr(zsync, "_get_loop", None)
    if loop_of is None:  # another zarr: its own sync
        return zsync.sync(coro)
    return run_to_the_end(loop_of(), coro)


# -- the strong and bounded levels: what another writer changed -------------------------------


@dataclass(frozen=True)
class MetadataCheck:
    """What one listing of a store's metadata documents told (see :func:`revalidate`)."""

    #: the write-in-progress marker is there (:func:`check_complete` then says by whom)
    marked: bool
    #: metadata documents, by URL: (generation, metageneration, updated)
    documents: dict[str, tuple[str, str, datetime.datetime]]
    #: listed because another writer's change under the store was announced (:mod:`cloudio._zarr.consumer`)
    announced: bool = False

    def zarr_format(self, group_url: str) -> Literal[2, 3] | None:
        """The Zarr format of the node at ``group_url`` as listed (None: no document there)."""
        group_url = group_url.rstrip("/")
        if any(f"{group_url}/{name}" in self.documents for name in (".zgroup", ".zarray", _V2_CONSOLIDATED)):
            return 2
        return 3 if f"{group_url}/zarr.json" in self.documents else None

    def consolidated_is_stale(self, group_url: str) -> bool:
        """True when a metadata document under ``group_url`` is newer than the group's consolidated copy.

        The copy is ``.zmetadata`` (Zarr v2) or the group's ``zarr.json`` (v3,
        which carries it); when neither is there, reading the documents
        themselves is what zarr would fall back to anyway.
        """
        group_url = group_url.rstrip("/")
        for name in (_V2_CONSOLIDATED, "zarr.json"):
            copy_url = f"{group_url}/{name}"
            if copy_url in self.documents:
                break
        else:
            return True
        written = self.documents[copy_url][2]
        return any(doc[2] > written for url, doc in self.documents.items()
                   if url != copy_url and _under(url, group_url))


#: per store root: the metadata documents the last revalidation saw, when (monotonic seconds), and the journal's
#: position when it began; at most
#: :data:`_NODES_MAX` stores, the least recently listed dropped first (a store dropped is listed as if for the
#: first time: at a bound of seconds it is listed again, and what changed before that listing is not told apart)
_checked_lock = threading.Lock()
_checked: dict[str, tuple[float, MetadataCheck, int]] = {}


def _fork_locks() -> tuple[threading.Lock, ...]:
    return _metadata._lock, _stored_here_lock, _marks_lock, _checked_lock


def _renew_locks() -> None:
    """In a forked child: the locks anew. The child keeps the parent's counts of writes under way (``_marks``),
    which no thread of the child ends but the forking one's own: a clear of such a store there keeps its marker
    (the side that tells readers a write may be under way), and its documents wait for a marker taken down."""
    global _stored_here_lock, _marks_lock, _checked_lock
    _metadata._lock = threading.Lock()
    _stored_here_lock = threading.Lock()
    _marks_lock = threading.Lock()
    _checked_lock = threading.Lock()


# held across a fork: a thread logging a metadata write, noting a generation stored, counting a write under way or
# keeping a listing then is not in the child, and a lock copied held by it would stop the child's next write, open
# or revalidation of a store for good (in-memory work under each, none taken under another)
hold_across_fork("zarr store", _fork_locks, _renew_locks)


def revalidate(store: JournaledStore) -> MetadataCheck | None:
    """At the strong and bounded levels, list the store's metadata documents from the server.

    None at the ``"session"`` level, for local stores, and at a bound of ``N``
    seconds when the store was listed less than ``N`` seconds ago (the caller
    then does what the session level does; but when that listing found a
    consolidated copy stale, it is returned again, the marker to be asked
    for, so that the documents are read), unless another writer's change
    under the store was announced since its last listing
    (:func:`cloudio.invalidate`, :mod:`cloudio._zarr.consumer`): then it is
    listed once, whatever the level. One listing request per 1000
    documents (``matchGlob`` keeps chunks out of it on GCS, but for a store
    whose key holds a glob character; the emulator ignores it, so names are
    filtered here as well). A document whose
    generation changed since the last listing is journaled as an
    ``"invalidate"``: the same targeted invalidation cloudio's own writes
    drive, so GDAL's and every fsspec instance's caches of it are dropped.
    """
    from cloudio._session import count, current_level

    level = current_level()
    root = store.root_url
    if not is_gcs(root):
        return None
    announced = announcements.pending(root)
    if level == "session" and not announced:
        return None
    now = time.monotonic()
    with _checked_lock:
        last = _checked.get(root)
    if isinstance(level, float | int) and not announced and last is not None and now - last[0] <= level:
        # within the bound what that listing found still holds: a consolidated copy it found older than the
        # documents is not trusted again (that would read back behind a change it saw, older than the bound),
        # unless this process changed the store's metadata since (the session level's log knows what it wrote)
        listing, listed_at = last[1], last[2]
        if listing.consolidated_is_stale(root) and not _metadata.changed_since(root, listed_at):
            return dataclasses.replace(listing, marked=True)  # the marker asked for again, as at the session level
        return None
    upto = journal().seq  # what was announced until now, the listing covers
    try:
        check: MetadataCheck = run_sync(_list_metadata(store))
    except OSError as e:
        if level != "session" or type(e) is not OSError:  # gcsfs's refusal (403...): credentials that may not list
            raise
        # the session level never needed a listing: the announcement stays, and the documents are read instead
        log.info("%s: may not list it (%s); its consolidated metadata is not trusted after the announcement", root, e)
        return None
    count("revalidations")
    if announced:
        check = dataclasses.replace(check, announced=True)
        log.info("%s: another writer's change was announced here; listed its metadata documents", root)
    before = last[1].documents if last is not None else {}
    with announcements.own_records():  # what this listing saw needs no second one
        for url, doc in check.documents.items():
            old = before.get(url)
            if old is not None and old[:2] != doc[:2]:
                journal().record(url, "invalidate")
        for url in before.keys() - check.documents.keys():
            journal().record(url, "invalidate")
    announcements.checked(root, upto)
    for url, doc in check.documents.items():  # a load_array guess another writer's zarr.json replaced: a read saved
        seen = last_seen.guess(url) if url.endswith("/zarr.json") else None
        if seen is not None and str(seen[1]) != doc[0]:
            last_seen.forget(url, seen)
    with _checked_lock:
        touch(_checked, root, (now, check, upto))
        drop_oldest(_checked, _NODES_MAX)
    return check


#: what GCS's ``matchGlob`` reads as a pattern (its escape syntax is not documented: such keys go without it)
_GLOB_CHARACTERS = frozenset("[]*?{}\\")


async def _list_metadata(store: JournaledStore) -> MetadataCheck:
    inner = store._store
    fs = getattr(inner, "fs", None)
    if fs is None:
        raise TypeError(f"{store.root_url}: revalidation needs an fsspec store")
    path = parse_gcs(store.root_url)
    prefix = f"{path.key.rstrip('/')}/" if path.key else ""
    names = "{" + ",".join(sorted(_META_NAMES | {_V2_CONSOLIDATED, MARKER})) + "}"
    # a key with a glob character ("run[1].zarr") would be a pattern there, and the listing match nothing on GCS
    # (the write marker missed): listed whole instead, and its names filtered below as the emulator's are
    glob = None if _GLOB_CHARACTERS & set(prefix) else f"{prefix}**{names}"
    documents: dict[str, tuple[str, str, datetime.datetime]] = {}
    marked = False
    for item in await list_objects(fs, path.bucket, "name,generation,metageneration,updated",
                                   prefix=prefix or None, matchGlob=glob):
        name = str(item["name"])
        base = name.rsplit("/", 1)[-1]
        if name == f"{prefix}{MARKER}":
            marked = True
        elif base in _META_NAMES or base == _V2_CONSOLIDATED:
            updated = datetime.datetime.fromisoformat(str(item["updated"]).replace("Z", "+00:00"))
            documents[f"gs://{path.bucket}/{name}"] = (str(item.get("generation")),
                                                      str(item.get("metageneration")), updated)
    return MetadataCheck(marked, documents)


# -- errors of the Zarr entry points -----------------------------------------------------------


def _transient(e: BaseException) -> bool:
    """Whether ``e`` is a server or network failure that outlasted gcsfs's retries (a metadata document
    that is not JSON is not one: :func:`cloudio_error` calls it damaged)."""
    from cloudio._gcs.client import is_transient

    if isinstance(e, CloudioError | json.JSONDecodeError | UnicodeDecodeError):
        return False
    return isinstance(e, Exception) and is_transient(e)


def sync_refused(e: BaseException | None) -> BaseException | None:
    """The refusal of a synchronous call made on the event loop it would wait for (zarr's ``SyncError``;
    fsspec's, or cloudio's, ``NotImplementedError``): ``e`` itself, or the cause of a cloudio error that took it
    for something else (a write rehearsed in memory says its input was refused); None when ``e`` is none.

    Why: the call cannot work there, whatever its arguments; only calling it from another thread helps."""
    from zarr.core import sync as zsync

    refusal: tuple[type[BaseException], ...] = tuple(t for t in (getattr(zsync, "SyncError", None),)
                                                     if t is not None)
    for err in (e, e.__cause__ if isinstance(e, CloudioError) else None):
        if isinstance(err, refusal) or (isinstance(err, NotImplementedError) and str(err).startswith(SYNC_REFUSED)):
            return err
    return None


def called_on_its_loop(url: str, call: str, refusal: BaseException) -> CloudioError:
    """The error for ``call`` (``cloudio.save_array``...) of ``url`` made from a coroutine on the event loop its
    requests run on (raise it ``from refusal``, :func:`sync_refused`'s)."""
    from cloudio.errors import ConfigurationError

    return ConfigurationError(
        f"{url}: {call} was called from a coroutine running on the event loop its requests run on (zarr's, or "
        f"fsspec's), where a synchronous call would wait for itself for good, so it was refused "
        f"({type(refusal).__name__}: {refusal}). Call it from another thread: await asyncio.to_thread({call}, ...) "
        "in a coroutine, or from a thread of your own."
    )


def refuse_on_zarrs_loop(url: str, call: str) -> None:
    """Raise :func:`called_on_its_loop`'s error, before anything is done, when the caller runs on zarr's own
    event loop; its cause is zarr's refusal, asked of zarr's ``sync`` (a coroutine that does nothing, closed).

    Why before: zarr's refusal comes at the first synchronous call, which cloudio's checks of the arguments
    (an array made in memory) took for a refusal of the arguments, and every such call leaves a coroutine
    never awaited. At interpreter shutdown, also when zarr's loop cannot run (:func:`_refuse_without_zarrs_loop`)."""
    from zarr.core import sync as zsync

    if shutting_down():
        _refuse_without_zarrs_loop(url, call)
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        return
    loops = getattr(zsync, "loop", None)
    if not loops or running is not loops[0]:  # (zarr's loop is not made here when it is not there yet)
        return
    coro = _nothing()
    try:
        zsync.sync(coro)
    except Exception as e:
        refusal = sync_refused(e)
        if refusal is None:
            raise
        raise called_on_its_loop(url, call, refusal) from refusal
    finally:
        coro.close()


def _refuse_without_zarrs_loop(url: str, call: str) -> None:
    """At interpreter shutdown: raise LoopNotRunningError, before anything is read or written, when no thread runs
    zarr's event loop (nor can: Python 3.12 starts no thread then). Why: an ``atexit`` handler registered before
    cloudio was imported runs after zarr's own clean-up closed its loop; zarr's next synchronous call makes a new
    loop and fails to start its thread (RuntimeError, taken for a refusal of the arguments), and every call after
    it waited for good on that loop, which zarr keeps."""
    from zarr.core import sync as zsync

    loop_of = getattr(zsync, "_get_loop", None)
    if loop_of is None:  # another zarr: its own sync
        return
    cause: BaseException | None = None
    try:
        loop = loop_of()
        threads = getattr(zsync, "iothread", None)
        runs = runs_soon(loop, threads[0] if isinstance(threads, list) and threads else None)
    except RuntimeError as e:  # zarr's new loop's thread cannot start
        runs, cause = False, e
    if runs:
        resolving_at_exit(loop)  # zarr's own synchronous calls run there too, not through run_to_the_end
    else:
        raise LoopNotRunningError(
            f"{url}: {call} was called as the interpreter shuts down, and no thread runs zarr's event loop (zarr's "
            "own atexit clean-up closed it, or it was never started) nor can start now: nothing was read or "
            "written. Save and read before the interpreter shuts down; from an atexit handler, register it after "
            "importing cloudio (it then runs before zarr's clean-up) and make a first Zarr call through cloudio "
            "before exit (zarr starts its loop at its first call).") from cause


def _call_named(writing: bool, node: str, writer: str) -> str:
    """The public call :func:`cloudio_errors` guards, as its caller's arguments tell it."""
    if writing:
        return writer
    return {"array": "cloudio.load_array", "store": "cloudio.open_zarr"}.get(node, "the read")


@dataclass
class Failed:
    """What a write guarded by :func:`cloudio_errors` left when it failed, set by the write: its error says it."""

    marked: bool = False  #: the store stays marked incomplete by this write (:meth:`WriteMark.fail`)


@contextmanager
def cloudio_errors(store: JournaledStore, *, writing: bool, node: str = "store",
                   writer: str = "cloudio.to_zarr", group: str = "", mode: str = "w-",
                   zarr_format: int | None = None) -> Iterator[Failed]:
    """Re-raise what zarr, xarray or gcsfs raise inside as :func:`cloudio_error` says, with it as the cause.

    Called from a coroutine on zarr's event loop, refuses before anything is done (:func:`refuse_on_zarrs_loop`);
    a ``MemoryError`` is raised as it is (catchable as such), with a note naming the store unless one does. A
    write sets what it left in the :class:`Failed` yielded."""
    call = _call_named(writing, node, writer)
    refuse_on_zarrs_loop(store.root_url, call)
    failed = Failed()
    try:
        yield failed
    except Exception as e:
        refusal = sync_refused(e)
        if refusal is not None:
            raise called_on_its_loop(store.root_url, call, refusal) from refusal
        try:
            err = cloudio_error(store, e, writing=writing, node=node, writer=writer, group=group, mode=mode,
                                zarr_format=zarr_format)
        except Exception as naming:  # what naming ``e`` asked of the server was refused on this loop (fsspec's)
            refusal = sync_refused(naming)
            if refusal is None:
                raise
            raise called_on_its_loop(store.root_url, call, refusal) from refusal
        if err is not None:
            raise err from e
        if isinstance(e, MemoryError) and not any(store.root_url in n for n in getattr(e, "__notes__", ())):
            e.add_note(_out_of_memory(store.root_url, writing, writer, node, failed.marked))
        raise


def _out_of_memory(url: str, writing: bool, writer: str, node: str, marked: bool) -> str:
    """The note a ``MemoryError`` of a read or write of ``url`` gets: what to do instead."""
    if writing:
        left = (f"the store stays marked incomplete (cloudio's readers refuse it) until it is written again whole "
                f"with {writer}" if marked else
                "it stored nothing, and the store is as it was. Write it again")
        return f"{url}: this process ran out of memory writing it; {left}, with more memory, or from a Dask " \
               "array (one task per shard)."
    instead = ("cloudio.load_array(url, lazy=True) (one Dask task per shard), then a slice of it" if node == "array"
               else "cloudio.open_zarr(url, chunks={}) (Dask arrays), then a selection of it")
    return (f"{url}: this process could not allocate the memory to read it whole; nothing was read. Read it "
            f"lazily and in parts: {instead}.")


def cloudio_error(store: JournaledStore, e: BaseException, *, writing: bool, node: str = "store",
                  writer: str = "cloudio.to_zarr", group: str = "", mode: str = "w-",
                  zarr_format: int | None = None) -> CloudioError | None:
    """The :class:`~cloudio.CloudioError` a user should see for ``e`` raised by zarr, xarray or gcsfs.

    None when ``e`` is already cloudio's, raised by a Dask computation (the user's own graph: a chunk's
    task; the server's failures on the way are still named), or no error cloudio can name (a wrong
    argument that zarr or xarray raises as a ValueError becomes a ConfigurationError naming the store).
    ``group``: the group a read or write asked for (zarr says a missing one is a
    ``KeyError`` of the consolidated metadata, or a ``FileNotFoundError``);
    ``mode``: a write's mode; ``zarr_format``: the format a read asked for (a node of the other one is
    named as such, not as missing).
    """
    from cloudio.errors import ConfigurationError, IntegrityError, TransientError

    url = store.root_url
    if (refusal := sync_refused(e)) is not None and refusal is e:
        return called_on_its_loop(url, _call_named(writing, node, writer), e)
    if isinstance(e, CloudioError):
        return None
    if _transient(e):
        then = ("the store stays marked incomplete (cloudio's readers refuse it) until it is written again "
                "whole (cloudio.save_array, or cloudio.to_zarr with mode='w'): an append or region write that "
                "succeeds later cannot know what this one left" if writing else "try again later")
        return TransientError(f"{url}: the server or network kept failing past the retries "
                              f"({type(e).__name__}: {e}); {then}.")
    if raised_computing(e) and _how_failed(e) is None:
        return None  # the user's own graph failed (a ValueError is not input zarr refused): raised as it is
    if isinstance(e, json.JSONDecodeError | UnicodeDecodeError):
        return IntegrityError(f"{url}: a Zarr metadata document there is not valid JSON ({e}); the store is "
                              f"damaged: write it again with {writer}.")
    if writing and isinstance(e, STORED_ALREADY):
        return _already_there(url, e, writer, mode, group)
    wrong_type = tuple(t for t in (getattr(zarr.errors, "NodeTypeValidationError", None),
                                   getattr(zarr.errors, "ContainsGroupError", None)) if t is not None)
    if node == "store" and not writing and isinstance(e, zarr.errors.ContainsArrayError):  # open_zarr of an array
        at = f"{url}/{group.strip('/')}" if group else url
        return ConfigurationError(f"{at} is a Zarr array, not a group or dataset; load it with "
                                  f"cloudio.load_array({at!r}) (or zarr.open_array).")
    if node == "array" and wrong_type and isinstance(e, wrong_type):
        return ConfigurationError(f"{url} is a Zarr group, not an array; open it with cloudio.open_zarr or "
                                  f"zarr.open_group, or load one of its arrays (cloudio.load_array({url!r} + "
                                  "'/<name>')).")
    missing_member = isinstance(e, KeyError) and "not found in consolidated metadata" in str(e)
    if isinstance(e, FileNotFoundError) or (group and missing_member):
        return _not_found(store, node, writer, group, zarr_format)
    if _how_failed(e) == "refused":
        from cloudio.errors import UploadError

        if writing:
            return UploadError(f"{url}: the server refused a change ({e}); check that the credentials in use "
                               "may write to this bucket (a write stopped part way leaves the store refused as "
                               "incomplete until it is written again whole).")
        from cloudio._gcs.client import read_refused

        return read_refused(url, e)
    if isinstance(e, ValueError):  # the caller's arguments, as zarr or xarray explain them: named with the store
        return ConfigurationError(f"{url}: {writer if writing else 'the read'} refused its arguments "
                                  f"({type(e).__name__}: {e}). Change them and try again.")
    return None


def raised_computing(e: BaseException) -> bool:
    """Whether ``e`` came out of a Dask computation (the user's own graph, a chunk's task), not out of the
    checks zarr, xarray or Dask make of their input before: a frame of Dask's ``compute``/``persist``, or of
    distributed's, is on its way. Why not any of Dask's frames: opening with Dask chunks runs Dask's own
    checks (``normalize_chunks``), whose ValueError is a wrong argument. Dask shortens the traceback of a
    computation's failure (``admin.traceback.shorten``), but keeps the frame that computed."""
    tb = e.__traceback__
    while tb is not None:
        module = str(tb.tb_frame.f_globals.get("__name__", ""))
        if module.startswith("distributed.") or (module == "dask.base" and tb.tb_frame.f_code.co_name in _COMPUTING):
            return True
        tb = tb.tb_next
    return False


#: the functions of ``dask.base`` that run a graph (each computation of a collection goes through one)
_COMPUTING = frozenset({"compute", "persist", "compute_as_if_collection"})


def holds_a_node(url: str) -> bool:
    """Is there a Zarr node (v3 ``zarr.json``, v2 ``.zgroup``/``.zarray``) right at ``url``? (failures only)"""
    names = NODE_DOCUMENTS
    if not is_gcs(url):
        return any(os.path.exists(os.path.join(url, n)) for n in names)
    from cloudio._gcs.client import gcs_filesystem

    fs, root = gcs_filesystem(), parse_gcs(url).fs_path.rstrip("/")
    try:
        return any(fs.exists(f"{root}/{n}") for n in names)
    except OSError:
        return False


#: what zarr and xarray raise for a write asked not to replace a stored node (gcsfs's 412 is a ConflictError first)
#: zarr's errors for a node already stored where a write asked for another
STORED_ALREADY = (zarr.errors.ContainsArrayError, zarr.errors.ContainsGroupError, FileExistsError)


#: the documents that make a Zarr node (v3, v2 group, v2 array) at a store's root
NODE_DOCUMENTS = ("zarr.json", ".zgroup", ".zarray")


def in_the_way(url: str, keys: Iterable[str]) -> CloudioError | None:
    """The refusal of a write that would replace the store at ``url``, whose objects (keys relative to it)
    are not a Zarr node's: zarr's overwrite deletes everything under the store, and a forgotten ``.zarr``
    (or key) must not empty a folder or a bucket. None when there is nothing there, a node, or the marker
    of a cloudio write (one that failed before its metadata went up leaves chunks alone with it)."""
    from cloudio.errors import AlreadyExistsError

    held = sorted(keys)
    if not held or any(k in NODE_DOCUMENTS or k == MARKER for k in held):
        return None
    shown = ", ".join(repr(k) for k in held[:3]) + (", ..." if len(held) > 3 else "")
    base = url.rstrip("/")
    return AlreadyExistsError(
        f"{url}: holds {len(held)} object(s) that are not a Zarr store ({shown}); writing a Zarr store there "
        f"would delete them, so nothing was written. Write to a new URL (such as {base}/data.zarr), or delete "
        "those objects first."
    )


def refuse_replacing_others(store: JournaledStore, path: str = "") -> None:
    """Raise :func:`in_the_way`'s refusal for a write that replaces the node at ``path`` in ``store``."""
    prefix = f"{path.strip('/')}/" if path.strip("/") else ""

    async def listed() -> list[str]:  # the write marker included
        return [key.removeprefix(prefix) async for key in store._keys_under(prefix)]

    url = "/".join(p for p in (store.root_url.rstrip("/"), path.strip("/")) if p)
    refusal = in_the_way(url, run_sync(listed()))
    if refusal is not None:
        raise refusal


def _already_there(url: str, e: BaseException, writer: str, mode: str = "w-", group: str = "") -> CloudioError:
    """The :class:`~cloudio.AlreadyExistsError` for a write that was asked not to replace a stored node; the
    :class:`~cloudio.ConfigurationError` for a dataset written (appended, or into a region) where an array is."""
    from cloudio.errors import AlreadyExistsError, ConfigurationError

    at = f"{url}/{group.strip('/')}" if group else url
    kind = ("an array" if isinstance(e, zarr.errors.ContainsArrayError)
            else "a group" if isinstance(e, zarr.errors.ContainsGroupError) else "a store")
    clash = re.search(r"at path '([^']*)'", str(e))  # zarr names the node it found
    member = clash.group(1).strip("/") if clash else ""
    if writer != "cloudio.save_array" and mode in ("a", "a-", "r+"):
        if member and member != group.strip("/"):  # a variable's place, found during the write
            return ConfigurationError(
                f"{url}/{member}: Zarr holds {kind} there, where the dataset's variable "
                f"{member.rsplit('/', 1)[-1]!r} would go (mode={mode!r}); the write stopped part way, so the store "
                "stays marked incomplete (cloudio's readers refuse it) until it is written again whole "
                "(cloudio.to_zarr with mode='w'). Rename the variable, or write to another group or URL."
            )
        return ConfigurationError(f"{at}: Zarr holds {kind} there, not a group a dataset can be written into "
                                  f"(mode={mode!r}); nothing was written. Write the dataset to another group "
                                  "or URL.")
    if writer == "cloudio.save_array":
        asked, then = "overwrite=False asks", "Pass overwrite=True to replace it"
    else:
        asked, then = "mode='w-' asks", "Use mode='w' to replace it, mode='a' to append to it"
    return AlreadyExistsError(f"{at}: Zarr holds {kind} there and {asked} not to replace it; nothing was "
                              f"written. {then}, or write to another URL.")


def _not_found(store: JournaledStore, node: str, writer: str, group: str = "",
               zarr_format: int | None = None) -> CloudioError:
    """Why there is no Zarr node at the store's root (or no ``group`` in it): a node of the other Zarr format
    than ``zarr_format`` asked, no bucket, an object in its place, no such group, or nothing."""
    from cloudio.errors import ConfigurationError, ObjectNotFoundError

    url = store.root_url
    other = _other_format(store, zarr_format, group)
    if other is not None:
        at = f"{url}/{group.strip('/')}" if group.strip("/") else url
        fmt, document = other
        return ConfigurationError(f"{at}: holds a Zarr format {fmt} {node if not group.strip('/') else 'group'} "
                                  f"({document}), not format {zarr_format}; pass zarr_format={fmt} or leave it "
                                  "out.")
    if group and holds_a_node(url):
        return ObjectNotFoundError(f"{url}: the Zarr store there has no group {group!r}; check the group name "
                                   f"(and its path from the store's root), or write it with {writer}(..., "
                                   f"group={group!r}).")
    if is_gcs(url):
        from cloudio._gcs.client import call_bounded, gcs_filesystem

        path = parse_gcs(url)
        fs = gcs_filesystem()
        try:
            call_bounded(fs, fs._call("GET", "b/{}", path.bucket, json_out=True))
        except FileNotFoundError:
            return BucketNotFoundError(f"{url}: bucket {path.bucket!r} does not exist; check the bucket name, "
                                       "or create the bucket first.")
        except OSError as e:  # cannot tell: say what is known
            log.debug("could not check bucket %s: %s", path.bucket, e)
        try:
            is_object = call_bounded(fs, fs._info(path.fs_path)).get("type") == "file"
        except OSError:
            is_object = False
    else:
        is_object = os.path.isfile(url)
    if is_object:
        return ConfigurationError(f"{url} is a single object, not a Zarr store; open rasters with "
                                  f"cloudio.open({url!r}), or point at the store's directory.")
    return ObjectNotFoundError(f"{url}: no Zarr {node} there (no zarr.json, .zgroup or .zarray); check the URL, "
                               f"or write one with {writer}.")


def _other_format(store: JournaledStore, zarr_format: int | None, group: str = "") -> tuple[int, str] | None:
    """The other Zarr format than ``zarr_format`` (2 or 3) and its document, when one stands where the read
    looked (the store's root, or ``group``), read through the store as its reads are; None when there is
    none, or it cannot be told (the caller then says what else it finds)."""
    if zarr_format not in (2, 3):
        return None
    prefix = key_prefix(group.strip("/"))
    other, documents = (2, (".zgroup", ".zarray")) if zarr_format == 3 else (3, ("zarr.json",))
    for document in documents:
        try:
            if run_sync(store.exists(prefix + document)):
                return other, document
        except (CloudioError, OSError) as e:  # cannot tell: said as not found
            log.debug("%s: could not look for %s: %s", store.root_url, prefix + document, e)
            return None
    return None
