"""``cloudio.save_array`` / ``cloudio.load_array``: NumPy and Dask arrays to Zarr and back.

One array per store, on a journaled :func:`cloudio.zarr_store`. Dask arrays
are written through the shard-safe path (:mod:`cloudio._zarr.shard_safety`): each shard
is written by one task.

Lazy loading returns a Dask array chunked **by shard** (by chunk when the
array is unsharded): a shard is the unit zarr writes and the unit one
request fetches whole, so one task per shard makes one GET per task and
writing the array back to a store with the same shards needs no rechunk.
Pass ``chunks=`` to :func:`load_array` for another layout.

``save_array`` checks its arguments against an in-memory copy of the array's
metadata before the first request, then writes under a write-in-progress
marker (:class:`cloudio._zarr.store.WriteMark`) that ``load_array`` checks: a write
that failed part way reads as :class:`~cloudio.IncompleteWriteError`, never as
a mix of old values, new values and fill values.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Literal, cast

import numpy as np

from cloudio import _config
from cloudio._journal import journal
from cloudio._session import current_level
from cloudio._threads import hold_globals_across_fork
from cloudio._zarr import last_seen
from cloudio._zarr import shard_codec as _shardio
from cloudio._zarr.buffers import lend, outputs
from cloudio._zarr.changes import stopped_on_failure
from cloudio._zarr.shard_codec import plain_layout
from cloudio._zarr.shard_safety import align, whole, write_grid
from cloudio._zarr.shard_safety import is_dask as _is_dask
from cloudio._zarr.store import (
    MARKER,
    JournaledStore,
    WriteMark,
    cloudio_errors,
    enclosing_markers,
    in_the_way,
    key_prefix,
    open_complete_array,
    refuse_on_zarrs_loop,
    refuse_replacing_others,
    revalidate,
    zarr_store,
)
from cloudio.errors import ConfigurationError, StaleDatasetError, TransientError

if TYPE_CHECKING:
    import dask.array
    import gcsfs
    import zarr

log = logging.getLogger(__name__)

__all__ = ["load_array", "save_array"]


def save_array(
    array: np.ndarray | dask.array.Array,
    url: str | os.PathLike[str] | JournaledStore,
    chunks: tuple[int, ...] | int | str | None = None,
    shards: tuple[int, ...] | int | str | None = None,
    *,
    rechunk: bool = True,
    overwrite: bool = True,
    **kwargs: Any,
) -> zarr.Array[Any]:
    """Write a NumPy or Dask array to a new Zarr array at ``url``.

    Parameters
    ----------
    array
        The data. Dask arrays are computed with the scheduler in force, one
        task per shard at most.
    url
        ``gs://bucket/a.zarr``, ``/vsigs/...``, a local path, or a
        :func:`cloudio.zarr_store`.
    chunks
        Zarr chunk shape (the unit of reading). Default: a Dask array's
        largest chunk per dimension, capped by ``shards``; zarr's automatic
        choice for NumPy arrays.
    shards
        Zarr v3 shard shape (the unit of writing: one object per shard), or
        None for an unsharded array.
    rechunk
        False: raise :class:`~cloudio.UnsafeChunkingError` instead of
        rechunking Dask chunks that split shards.
    overwrite
        Replace whatever is stored at ``url`` (default), like ``numpy.save``.
    **kwargs
        Passed to :func:`zarr.create_array` (``compressors``, ``filters``,
        ``serializer``, ``zarr_format``, ``fill_value``, ``attributes``,
        ``dimension_names``...).

    Returns
    -------
    zarr.Array
        The array written, open on the journaled store.

    Raises
    ------
    UnsafeChunkingError
        With ``rechunk=False``, when Dask chunks split a shard; nothing is written then.
    AlreadyExistsError
        With ``overwrite=False``, when an array or group is stored at ``url``; nothing is written then.
    TransientError
        When the server or network kept failing past the retries. The store
        stays marked as an incomplete write (readers through cloudio get
        :class:`~cloudio.IncompleteWriteError`) until a ``save_array`` succeeds.
    """
    import zarr

    current_level()  # an unusable CLOUDIO_CONSISTENCY is named before anything is written
    store = url if isinstance(url, JournaledStore) else zarr_store(url)
    if kwargs.get("zarr_format") not in (None, 2, 3):  # (some zarr releases write anything else as 3)
        raise ConfigurationError(f"{store.root_url}: zarr_format={kwargs['zarr_format']!r} is no Zarr format; "
                                 "pass 3 (the default) or 2. Nothing was written.")
    dask_input = _is_dask(array)
    if not dask_input:
        array = np.asarray(array)
    # the array's own: zarr would say "got multiple values for keyword argument", which reads as a bug
    if "dtype" in kwargs:
        asked = repr(str(np.dtype(kwargs["dtype"]))) if _a_dtype(kwargs["dtype"]) else "..."
        raise ConfigurationError(f"{store.root_url}: save_array stores the array's own dtype ({array.dtype}); "
                                 f"nothing was written. Convert the array first: cloudio.save_array(array.astype("
                                 f"{asked}), url).")
    if "shape" in kwargs:
        raise ConfigurationError(f"{store.root_url}: save_array stores the array's own shape {array.shape}; "
                                 "nothing was written. Reshape the array first: cloudio.save_array(array.reshape("
                                 "...), url).")
    if chunks is None:
        if dask_input:
            chunks = tuple(max(c) if c else 1 for c in cast("dask.array.Array", array).chunks)
            if isinstance(shards, tuple | list):
                chunks = tuple(_divisor_at_most(s, c) for s, c in zip(shards, chunks, strict=True))
            elif (n := whole(shards)) is not None:
                chunks = tuple(_divisor_at_most(n, c) for c in chunks)
        else:
            chunks = "auto"
    if (n := whole(shards)) is not None:
        shards = (n,) * array.ndim
    if (n := whole(chunks)) is not None:
        chunks = (n,) * array.ndim
    # Validate everything before touching anything: the array zarr would create, made in memory
    # (no request), settles the grid the Dask chunks must fit and rejects bad arguments.
    # any other value is the user's, passed on for zarr to refuse
    zarr_chunks = cast("tuple[int, ...] | Literal['auto']", chunks)
    zarr_shards = cast("tuple[int, ...] | Literal['auto'] | None", shards)
    refuse_on_zarrs_loop(store.root_url, "cloudio.save_array")  # (zarr's refusal is no refusal of the arguments)
    try:
        probe = zarr.create_array(zarr.storage.MemoryStore(), shape=array.shape, dtype=array.dtype,
                                  chunks=zarr_chunks, shards=zarr_shards, **kwargs)
    except Exception as e:  # made in memory: whatever zarr raised (ValueError, TypeError...) is about the arguments
        raise ConfigurationError(f"{store.root_url}: zarr refuses these arguments for a {array.dtype} array of "
                                 f"shape {array.shape} ({type(e).__name__}: {e}); nothing was written. Change them "
                                 "(chunks must divide shards) and write again.") from e
    if store.read_only:
        raise ConfigurationError(f"{store.root_url}: the store was opened read-only; nothing was written. "
                                 "Pass the URL, or a store opened with cloudio.zarr_store(url) (writable).")
    if dask_input:
        grid, sharded = write_grid(probe)
        array = align(cast("dask.array.Array", array), grid, name="array", url=store.root_url, sharded=sharded,
                      rechunk=rechunk)
    with cloudio_errors(store, writing=True, node="array", writer="cloudio.save_array") as failed:
        mark = WriteMark(store, "save_array", replaces=overwrite)  # overwrite=False deletes nothing of a failed write
        try:
            # on GCS (where a file may share a folder's name: the new chunks go up before the old are deleted)
            layout = plain_layout(probe) if overwrite and not dask_input and array.size and store.on_gcs else None
            if layout is not None:
                # zarr's create and overwrite, its documents alongside the chunks, the marker's round trip
                # while the first shards are encoded, the old objects not overwritten deleted last
                with store.expecting() as expect:
                    z, replacing = _created_like(probe, store, mark, expect)
                    _shardio.write(z, layout, cast(np.ndarray, array), replacing)
            else:
                if overwrite:
                    refuse_replacing_others(store, probe.store_path.path)
                mark.begin()
                # zarr's (or Dask's) other chunk writes end before the failure is raised
                with stopped_on_failure() as changes, store.expecting() as expect:
                    if overwrite:  # zarr deletes what is stored first: every upload then needs no object there
                        expect(key_prefix(probe.store_path.path), {})
                        kwargs = _fenced(store, key_prefix(probe.store_path.path), kwargs)
                    # Dask tasks write through the store wherever they run: on a cluster's workers, it names the write
                    target = changes.carried(store) if dask_input else store
                    z = zarr.create_array(target, shape=array.shape, dtype=array.dtype, chunks=zarr_chunks,
                                          shards=zarr_shards, overwrite=overwrite, **kwargs)
                    if dask_input:
                        import dask.array as da

                        # dask types its targets as arrays; a zarr array takes __setitem__, all store needs
                        da.store(array, z, lock=False, compute=True)  # type: ignore[arg-type]
                    elif (layout := plain_layout(z)) is not None and array.size:
                        # one copy per chunk, straight into a reused shard buffer
                        _shardio.write(z, layout, cast(np.ndarray, array))
                    else:
                        with _no_hugepage_advice():  # zarr encodes into fresh buffers; see _no_hugepage_advice
                            z[...] = array
        except BaseException:
            failed.marked = mark.fail()
            raise
        mark.commit()
    return z


def _a_dtype(value: Any) -> bool:
    """Whether NumPy takes ``value`` for a dtype (the error of :func:`save_array` then names it)."""
    try:
        np.dtype(value)
    except (TypeError, ValueError):
        return False
    return True


def _fenced(store: JournaledStore, prefix: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` of a write that deletes first, storing every chunk, even one of only the fill value, when
    an upload this process gave up on may still land under ``prefix``: needing "no object", its late copy
    would land where the write left none (unless the caller's ``config`` says otherwise)."""
    config = kwargs.get("config")
    if not isinstance(config, dict | None) or not store.late_copies_may_land(prefix):  # (an ArrayConfig stands)
        return kwargs
    return {**kwargs, "config": {"write_empty_chunks": True, **(config or {})}}


def _created_like(probe: zarr.Array[Any], store: JournaledStore, mark: WriteMark,
                  expect: Callable[[str, dict[str, int]], None]) -> tuple[zarr.Array[Any], _shardio.Replacing]:
    """The array ``zarr.create_array(store, ..., overwrite=True)`` makes with the arguments that made
    ``probe`` (in memory), and the steps that make it on ``store`` in place of what was there: begin
    ``mark`` (the objects stored under the array listed meanwhile, with their generations, given to
    ``expect``: each upload then needs the object it replaces, see :meth:`JournaledStore.expecting`),
    write the probe's metadata documents, which zarr made for the same arguments, and once every chunk
    is up delete the objects listed that the new array did not overwrite.

    Why: zarr's create_array on the store builds and checks the array once
    more, and its documents then go up before the first chunk; for a small
    array of many chunks (``benchmarks/bench_peers.py`` layout c) that was a
    millisecond and a round trip of a 40 ms write. zarr also deletes the old
    objects before the first chunk goes up: here the listing runs alongside
    the marker's request (a listing changes nothing) and the deletes come
    last, the objects the new array overwrites left out. A rewrite of the
    same grid deletes nothing: rewriting ``benchmarks/bench_peers.py``'s
    layout c in place took 18.2-18.8 ms and 105 requests on the emulator,
    against 35.3-36.8 ms and 206 requests deleting first (layout b: 126-130
    against 136-140 ms; medians of 20 rewrites, three runs and two). The
    first upload waits for the marker and the listing, sent together: what
    is listed may be objects that are not Zarr's (a forgotten ``.zarr``),
    and then nothing is written (:func:`~cloudio._zarr.store.in_the_way`);
    large shards are encoded meanwhile. Readers refuse the store while the
    marker is up, so they see neither order.
    """
    import zarr
    from zarr.core.array import AsyncArray
    from zarr.core.buffer import default_buffer_prototype
    from zarr.storage import StorePath

    where = StorePath(store, probe.store_path.path)
    z = zarr.Array(AsyncArray(probe.metadata, where, probe._async_array.config))  # type: ignore[type-var]  # the probe's own metadata type
    listing: asyncio.Task[dict[str, int]] | None = None  # what the store held, listed as the write begins
    documents: set[str] = set()
    prefix = key_prefix(where.path)

    async def begin() -> None:
        nonlocal listing
        listing = asyncio.ensure_future(store.list_generations(prefix))
        listing.add_done_callback(lambda t: t.cancelled() or t.exception())  # a failed write never asks
        try:
            await mark.begun()  # before anything in the store changes
        except BaseException:
            listing.cancel()
            raise
        generations = await listing
        expect(prefix, generations)
        held = [k.removeprefix(prefix) for k in generations]  # the marker left out: this write's own may be up
        refusal = None if mark.follows_others else in_the_way(
            f"{store.root_url.rstrip('/')}/{where.path}".rstrip("/"), held)
        if refusal is not None:  # before any object of the write: the marker alone goes again (mark.fail)
            raise refusal

    async def create() -> None:
        memory = probe.store_path.store
        proto = default_buffer_prototype()
        for key in [key async for key in memory.list()]:
            value = await memory.get(key, prototype=proto)
            if value is not None:
                await store.set(key, value)
                documents.add(key)

    async def sweep(kept: set[str]) -> None:
        assert listing is not None  # begin ran
        await store.delete_each(sorted(set(await listing) - kept - documents))

    return z, _shardio.Replacing(begin, create, sweep)


def _divisor_at_most(shard: int, chunk: int) -> int:
    """The largest divisor of ``shard`` not above ``chunk`` (inner chunks must tile a shard)."""
    c = max(1, min(shard, chunk))
    while shard % c:
        c -= 1
    return c


_advice_lock = threading.Lock()
_advice_users = 0
_advice_saved: bool | None = None


@contextmanager
def _no_hugepage_advice() -> Iterator[None]:
    """NumPy's transparent-huge-page advice off while zarr decodes a whole array.

    Why: NumPy asks the kernel for huge pages on every large allocation
    (``madvise(MADV_HUGEPAGE)``). Where the kernel then defragments on the
    first touch (``/sys/kernel/mm/transparent_hugepage/defrag`` = ``madvise``,
    a common default), a read that fills a fresh 256 MiB array plus one
    fresh buffer per shard stalls in direct compaction: measured 0.2 s to
    0.9 s per 256 MiB read here, against a steady 0.3 s without the advice
    (``benchmarks/bench_zarr.py``). The advice is a hint only; turning it off
    changes no result. It is a process-wide NumPy flag, so it is turned off
    once for all overlapping reads and restored when the last one ends.
    ``NUMPY_MADVISE_HUGEPAGE`` set by the user wins: then nothing is touched.
    """
    global _advice_users, _advice_saved
    try:
        from numpy._core.multiarray import _set_madvise_hugepage  # type: ignore[attr-defined]  # private: not in NumPy's stubs
    except ImportError:  # another NumPy layout: leave NumPy's default alone
        yield
        return
    if _config.env("NUMPY_MADVISE_HUGEPAGE") is not None:
        yield
        return
    with _advice_lock:
        if _advice_users == 0:
            _advice_saved = bool(_set_madvise_hugepage(False))
        _advice_users += 1
    try:
        yield
    finally:
        with _advice_lock:
            _advice_users -= 1
            if _advice_users == 0 and _advice_saved is not None:
                _set_madvise_hugepage(_advice_saved)
                _advice_saved = None


# held across a fork: a thread starting or ending a whole-array read then is not in the child, and a lock copied held
# by it would stop the child's next load_array for good (nothing but NumPy's flag set under it)
# (a forked child keeps the parent's count of reads under way, which none of its threads but the forking one ends:
# NumPy's advice stays off there, a hint only)
hold_globals_across_fork("zarr arrays", __name__, "_advice_lock")


_PREFAULT_MIN_BYTES = 64 << 20


def _output(shape: tuple[int, ...], dtype: Any) -> tuple[np.ndarray, Callable[[], None]] | None:
    """A writable array for a whole read, and the call that maps its pages up front, as transparent
    huge pages where the kernel can.

    Why: a read fills a fresh output array, and every first touch of a
    4 KiB page is a fault (65,536 for 256 MiB). In a VM each of those may
    also be a fault of the host: populating 256 MiB of 4 KiB pages up front
    (``MAP_POPULATE``) took 0.24 s here, most of a 0.3 s read. The same
    mapping advised as huge pages (``MADV_HUGEPAGE``, then populated with
    ``MADV_POPULATE_WRITE``: 128 faults of 2 MiB) read layout a of
    ``benchmarks/bench_peers.py`` in 0.19 s against 0.27 s, and layout b
    in 0.10 s against 0.12 s. One huge mapping populated at once, unlike
    zarr's many fresh buffers, does not leave the kernel compacting memory
    under the read (see :func:`_no_hugepage_advice`). Better still, the
    memory of an earlier output its caller has dropped, already mapped
    (:func:`cloudio._zarr.buffers.lend`): then there is nothing to map.

    The populating call leaves what was written alone, so it may run while
    the read fills the array (:func:`cloudio._zarr.shard_codec.read` runs
    it while the first objects are on their way). Where the kernel has no
    ``MADV_POPULATE_WRITE`` (before Linux 5.14) the pages are touched one by
    one here instead, and the call does nothing. ``NUMPY_MADVISE_HUGEPAGE=0``
    keeps 4 KiB pages. Small arrays, object dtypes and systems without
    anonymous mappings get None: the caller lets NumPy allocate. Every
    element of the array is written by the read (a kept one holds an
    earlier array's values).
    """
    import mmap

    dt = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
    if dt.hasobject or nbytes < _PREFAULT_MIN_BYTES or not hasattr(mmap, "MAP_ANONYMOUS"):
        return None
    kept = outputs.take_kept(nbytes)
    if kept is not None:
        return lend(kept, shape, dt), _nothing
    try:
        buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    except (OSError, OverflowError) as e:  # ENOMEM, or more than a size_t: what NumPy's allocation would say
        raise MemoryError(f"Unable to allocate {nbytes / 2**30:.4g} GiB for an array with shape {shape} and data "
                          f"type {dt}") from e
    huge = getattr(mmap, "MADV_HUGEPAGE", None)
    if huge is not None and _config.env("NUMPY_MADVISE_HUGEPAGE") != "0":
        buf.madvise(huge)
    raw = np.frombuffer(buf, dtype="u1")
    out = lend(raw, shape, dt)
    madvise = _libc_madvise()
    address = out.ctypes.data
    # supported? (one page: no time spent)
    if madvise is None or madvise(address, mmap.PAGESIZE, _MADV_POPULATE_WRITE) != 0:
        raw[::mmap.PAGESIZE] = 0  # one write per page, before anything is read
        return out, _nothing

    def populate() -> None:
        # through ctypes, which lets go of the GIL (mmap.madvise holds it), and a slice at a time,
        # so the readers' own allocations (which wait for the process's memory map) go on meanwhile
        for start in range(0, nbytes, _POPULATE_SLICE):
            madvise(address + start, min(_POPULATE_SLICE, nbytes - start), _MADV_POPULATE_WRITE)

    return out, populate


#: bytes mapped per call by the populating call of :func:`_output`
_POPULATE_SLICE = 8 << 20


@functools.cache
def _libc_madvise() -> Any:
    """The C library's ``madvise``, or None where there is none to load."""
    import ctypes

    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    fn.restype = ctypes.c_int
    return fn


def _nothing() -> None:
    pass


#: Linux's madvise advice that maps (and zeroes) every page of a range now (Python's mmap lacks the name)
_MADV_POPULATE_WRITE = 23


def load_array(
    url: str | os.PathLike[str] | JournaledStore,
    lazy: bool = False,
    *,
    chunks: Any = None,
) -> np.ndarray | dask.array.Array:
    """Read the Zarr array at ``url`` as a NumPy array, or a Dask array when ``lazy``.

    Parameters
    ----------
    url
        ``gs://bucket/a.zarr``, ``/vsigs/...``, a local path, or a
        :func:`cloudio.zarr_store`.
    lazy
        Return a Dask array chunked by shard (by chunk when unsharded).
    chunks
        Dask chunks for the lazy array instead of the shard shape.

    Raises
    ------
    ObjectNotFoundError
        When no array is stored at ``url`` (:class:`~cloudio.BucketNotFoundError`: no such bucket).
    ConfigurationError
        When ``url`` holds a Zarr group or a single object (a GeoTIFF) instead of an array.
    IncompleteWriteError
        When a write to ``url`` started and never committed (see docs/consistency.md).
    IntegrityError
        When the array's metadata is not valid JSON.
    TransientError
        When the server or network kept failing past the retries.
    StaleDatasetError
        When a write in this process overlapped each of three reads (an eager
        read that one overlapped is read again: it returns one version).

    Notes
    -----
    At the ``"strong"`` level (and past a bound of ``N`` seconds) one listing
    of the store's metadata documents replaces the GET of the write marker
    (see docs/consistency.md).
    """
    store = url if isinstance(url, JournaledStore) else zarr_store(url, read_only=True)
    if chunks is not None and not lazy:  # (they were dropped: the whole array read into memory at once)
        raise ConfigurationError(f"{store.root_url}: chunks={chunks!r} are a Dask array's, and this read is eager "
                                 "(lazy=False); nothing was read. Pass lazy=True with them, or leave them out.")
    if lazy:
        return _load_once(store, True, chunks)[0]
    for _ in range(_READ_ATTEMPTS):
        out, seq = _load_once(store, False, chunks)
        if not journal().since(seq, read=store.root_url):
            return out
        log.debug("%s: written in this process while it was read; reading it again", store.root_url)
    raise StaleDatasetError(f"{store.root_url}: written in this process during each of {_READ_ATTEMPTS} reads, "
                            "so each may hold two versions; read it again once the writes are over.")


#: reads of an array a write in this process overlapped, before load_array gives up (:func:`load_array`)
_READ_ATTEMPTS = 3


def _load_once(store: JournaledStore, lazy: bool, chunks: Any) -> tuple[np.ndarray | dask.array.Array, int]:
    """:func:`load_array`'s read of the store, once; and the journal's sequence number when it began to read
    (after the strong level's listing, whose own records of what it found are not writes)."""
    with cloudio_errors(store, writing=False, node="array", writer="cloudio.save_array"):
        check = revalidate(store)  # None at the session level: the marker's GET says what is needed
        seq = journal().seq
        if check is None and not lazy:
            out = _load_as_last_seen(store)
            if out is not None:
                return out, seq
        # a format known from the server's listing spares zarr its probes for the other one's documents
        z = open_complete_array(store, check is None or check.marked,
                                None if check is None else check.zarr_format(store.root_url))
        return _load(z, lazy, chunks), seq


class _NotAsLastSeen(Exception):
    """The array's write marker is up, or its ``zarr.json`` is not the one :func:`_load_as_last_seen` guessed."""


def _load_as_last_seen(store: JournaledStore) -> np.ndarray | None:
    """The whole array, its chunks read as though it still were as this process last wrote it
    (:mod:`cloudio._zarr.last_seen`), with one listing beside their GETs that shows the write marker
    and the generation of ``zarr.json``.

    None, to read it the usual way, when nothing was seen, the store is
    inside another (whose marker the listing would not show), the array is
    not read in one batch (:func:`cloudio._zarr.shard_codec.reads_in_one_batch`),
    or the listing shows the marker or another generation of ``zarr.json``
    (or fails but for the server's repeated failure): the usual way then
    refuses, or raises, what it would have, and the guess is forgotten, so
    the next load does not read the chunks twice. A read that fails under a
    guess the listing confirmed raises its own error, read once.

    Why the listing is enough: every write that puts the marker up on an
    array (``save_array``) writes its ``zarr.json`` again, a new generation,
    before it takes the marker down. One listing tells both at one moment:
    if it came while such a write was under way it shows the marker, if
    after, the new generation; only a write that began after it may mix
    into the chunks read, as with a read that opened the array first
    (docs/consistency.md). Two GETs, the marker's and the document's, may
    be answered far apart, with a whole write between them. Measured on
    ``benchmarks/bench_peers.py`` layout c (100 chunks of 40 KB, two runs
    of 100 interleaved rounds in one process): 8.82 and 9.25 ms a load,
    against 9.11 and 10.52 ms opened first, 10.68 and 12.07 ms through
    tensorstore's ``zarr3`` driver.
    """
    import zarr
    from zarr.core.array import AsyncArray
    from zarr.storage import StorePath

    from cloudio._gcs.fast import list_objects
    from cloudio._paths import parse_gcs

    url = f"{store.root_url}/zarr.json"
    seen = last_seen.guess(url)
    if seen is None or enclosing_markers(store):  # a dataset's array: its marker would not be in the listing
        return None
    doc, generation = seen
    try:
        meta = json.loads(doc)
        if meta.get("node_type") != "array":
            return None
        z = zarr.Array(AsyncArray(metadata=meta, store_path=StorePath(store)))
    except Exception:  # zarr's own validation decides what it accepts; the usual way then says why
        log.debug("%s: the zarr.json last seen does not open", store.root_url, exc_info=True)
        return None
    layout = plain_layout(z) if z.size else None
    if layout is None or not _shardio.reads_in_one_batch(z, layout):
        return None
    root = parse_gcs(store.root_url)
    base = f"{root.key.rstrip('/')}/" if root.key else ""

    async def check(fs: gcsfs.GCSFileSystem) -> None:
        # the objects right under the store, its chunks' "directories" folded into one prefix each
        try:
            listed = await list_objects(fs, root.bucket, "name,generation", prefix=base, delimiter="/")
        except TransientError:
            raise
        except Exception as e:  # not confirmed (a 403 on listing): the usual way, which needs no listing
            raise _NotAsLastSeen(store.root_url) from e
        now = {str(item["name"]): str(item.get("generation")) for item in listed}
        if f"{base}{MARKER}" in now or now.get(f"{base}zarr.json") != str(generation):
            raise _NotAsLastSeen(store.root_url)

    out, populate = _output(z.shape, z.dtype) or (np.empty(z.shape, dtype=layout.dtype), _nothing)
    populate()
    try:
        _shardio.read_checked(z, layout, out, check)
    except _NotAsLastSeen:
        # the guess never holds again: a marked write leaves another generation, and so does every write
        # of zarr.json; a refused listing is refused the next time too
        last_seen.forget(url, seen)
        return None
    return out


def _load(z: zarr.Array[Any], lazy: bool, chunks: Any) -> np.ndarray | dask.array.Array:
    if not lazy:
        fresh = _output(z.shape, z.dtype)
        layout = plain_layout(z) if z.size else None
        if layout is not None:
            out, populate = fresh or (np.empty(z.shape, dtype=layout.dtype), _nothing)
            _shardio.read(z, layout, out, populate)  # one copy per chunk, straight from the shard's bytes
            return out
        if fresh is None:
            with _no_hugepage_advice():
                return np.asarray(z[...])  # a host (CPU) array: zarr answers with NumPy (a scalar for 0-d)
        from zarr.core.buffer.cpu import NDBuffer

        out, populate = fresh
        populate()
        z.get_basic_selection(Ellipsis, out=NDBuffer.from_numpy_array(out))
        return out
    import dask.array as da

    if chunks is None:
        chunks, _ = write_grid(z)
    return cast("dask.array.Array", da.from_zarr(z, chunks=chunks))
