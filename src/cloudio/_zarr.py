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
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import threading
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import numpy as np
import zarr
from zarr.abc.buffer import Buffer
from zarr.storage import FsspecStore, LocalStore, WrapperStore

from ._journal import journal
from ._paths import is_gcs, normalize, parse_gcs
from .errors import BucketNotFoundError, CloudioError

if TYPE_CHECKING:
    from zarr.abc.store import Store

log = logging.getLogger(__name__)

__all__ = ["JournaledStore", "consolidated_is_stale", "store_url", "zarr_store"]

_ZARR_VERSION = tuple(int(p) for p in zarr.__version__.split(".")[:2] if p.isdigit())

#: names of the documents that describe a node (v3) or an array/group (v2)
_META_NAMES = frozenset({"zarr.json", ".zarray", ".zgroup", ".zattrs"})
_V2_CONSOLIDATED = ".zmetadata"


class _MetadataLog:
    """Per node directory: journal seq of the last metadata write and of the last consolidation.

    Only metadata documents pass through here (a few per array), never chunks.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._meta: dict[str, int] = {}  # node dir url -> seq of its last metadata write
        self._consolidated: dict[str, int] = {}  # group dir url -> seq of its last consolidated copy

    def wrote(self, dir_url: str, name: str, value: "Buffer", seq: int) -> None:
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
                self._consolidated[dir_url] = seq
                if name == "zarr.json":  # the same document is also the group's own metadata
                    self._meta[dir_url] = seq
            else:
                self._meta[dir_url] = seq
                if name == "zarr.json":  # a v3 group document without a consolidated copy replaces it
                    self._consolidated.pop(dir_url, None)

    def deleted(self, url: str, *, prefix: bool, seq: int) -> None:
        with self._lock:
            if prefix:  # a whole node or store is gone, and what we knew about it with it
                for table in (self._meta, self._consolidated):
                    for k in [k for k in table if _under(k, url)]:
                        del table[k]
                return
            dir_url, name = posixpath.split(url)
            if name == _V2_CONSOLIDATED or name == "zarr.json":
                self._consolidated.pop(dir_url, None)
            if name in _META_NAMES:
                self._meta[dir_url] = seq

    def stale(self, root: str) -> bool:
        with self._lock:
            cons = self._consolidated.get(root)
            if cons is None:
                # consolidated copy never written here: stale if metadata was written here at all
                # (a copy written by someone else before cannot know about it)
                return any(_under(k, root) for k in self._meta)
            return any(seq > cons for k, seq in self._meta.items() if _under(k, root))

    def knows(self, root: str) -> bool:
        with self._lock:
            return any(_under(k, root) for k in self._meta) or root in self._consolidated


def _under(url: str, root: str) -> bool:
    return url == root or url.startswith(root + "/")


_metadata = _MetadataLog()


def consolidated_is_stale(root_url: str) -> bool:
    """True when metadata under ``root_url`` changed in this process after its consolidated copy.

    ``root_url`` is a journal key (see :func:`store_url`). False when nothing
    was written there in this process: then nothing is known to be stale.
    """
    return _metadata.stale(root_url.rstrip("/"))


def written_here(root_url: str) -> bool:
    """True when this process wrote metadata under ``root_url`` (a journal key)."""
    return _metadata.knows(root_url.rstrip("/"))


class JournaledStore(WrapperStore):  # type: ignore[type-arg]
    """A wrapper store that records every successful write and delete in the journal.

    Parameters
    ----------
    store
        The store doing the work (``FsspecStore`` or ``LocalStore``).
    root_url
        The journal key of the store's root (``gs://bucket/prefix`` or an
        absolute local path); keys are joined to it with ``/``.

    Notes
    -----
    Reads, listings and everything else are delegated untouched. Writes are
    journaled after the wrapped store returned; a write that raised is not
    recorded.
    """

    def __init__(self, store: "Store", root_url: str) -> None:
        super().__init__(store)
        self._root_url = root_url.rstrip("/")
        # zarr's FsspecStore.set copies each value into a new bytes object before gcsfs copies it
        # again into the request body; for gcsfs we hand over a view and save the first copy
        # (a 16 MB shard is a 16 MB memcpy: about 10% of the client's CPU on a sharded write).
        # Checked against zarr 3.1 to 3.4; a newer zarr gets its own set() until checked again.
        fs = getattr(store, "fs", None)
        self._direct = (type(store) is FsspecStore and type(fs).__module__.startswith("gcsfs")
                        and _ZARR_VERSION < (3, 5))

    @property
    def root_url(self) -> str:
        """The journal key of the store's root."""
        return self._root_url

    def _with_store(self, store: "Store") -> "JournaledStore":
        return type(self)(store, self._root_url)

    def __repr__(self) -> str:
        return f"JournaledStore({self._root_url!r}, read_only={self.read_only})"

    def __str__(self) -> str:
        return self._root_url

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self._store, self._root_url))

    # -- recording ---------------------------------------------------------------------------

    def _url(self, key: str) -> str:
        return f"{self._root_url}/{key}" if key else self._root_url

    def _wrote(self, key: str, value: "Buffer") -> None:
        url = self._url(key)
        change = journal().record(url, "write", size=len(value))
        slash = key.rfind("/")
        name = key[slash + 1:]
        if name in _META_NAMES or name == _V2_CONSOLIDATED:
            _metadata.wrote(self._url(key[:slash]) if slash >= 0 else self._root_url, name, value, change.seq)

    def _deleted(self, key: str, *, prefix: bool) -> None:
        url = self._url(key.rstrip("/"))
        change = journal().record(url, "delete", prefix=prefix)
        _metadata.deleted(url, prefix=prefix, seq=change.seq)

    # -- what writes -------------------------------------------------------------------------

    async def set(self, key: str, value: "Buffer") -> None:
        try:
            if self._direct:
                await self._pipe(key, value)
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
        self._wrote(key, value)

    async def _pipe(self, key: str, value: "Buffer") -> None:
        """``FsspecStore.set`` (zarr 3.1 to 3.4) without its ``to_bytes`` copy."""
        store: FsspecStore = self._store  # type: ignore[assignment]
        if not store._is_open:
            await store._open()
        store._check_writable()
        if not isinstance(value, Buffer):
            raise TypeError(f"JournaledStore.set(): `value` must be a Buffer instance, got {type(value)}")
        arr = value.as_numpy_array()  # a view for host buffers
        view = memoryview(np.ascontiguousarray(arr)).cast("B")
        root = store.path.rstrip("/")  # as zarr's _dereference_path
        await store.fs._pipe_file((f"{root}/{key}" if root else key).rstrip("/"), view)

    async def set_if_not_exists(self, key: str, value: "Buffer") -> None:
        # Whether the wrapped store wrote is not reported; recording a write that did not
        # happen only costs a cache a refetch, missing one would leave it stale.
        await self._store.set_if_not_exists(key, value)
        self._wrote(key, value)

    async def _set_many(self, values: Iterable[tuple[str, "Buffer"]]) -> None:
        import asyncio

        await asyncio.gather(*(self.set(k, v) for k, v in values))

    async def delete(self, key: str) -> None:
        await self._store.delete(key)
        self._deleted(key, prefix=False)

    async def delete_dir(self, prefix: str) -> None:
        await self._store.delete_dir(prefix)
        self._deleted(prefix, prefix=True)

    async def clear(self) -> None:
        await self._store.clear()
        self._deleted("", prefix=True)

    # zarr >= 3.2 writes through these when the wrapped store can (LocalStore)
    def set_sync(self, key: str, value: "Buffer") -> None:
        self._store.set_sync(key, value)  # type: ignore[attr-defined]
        self._wrote(key, value)

    def delete_sync(self, key: str) -> None:
        self._store.delete_sync(key)  # type: ignore[attr-defined]
        self._deleted(key, prefix=False)


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
        from ._gcs import gcs_filesystem

        path = parse_gcs(os.fspath(url))
        fs = gcs_filesystem(asynchronous=True, **storage_options)
        inner = FsspecStore(fs=fs, path=path.fs_path, read_only=read_only)
    else:
        if storage_options:
            log.debug("zarr_store(%r): storage options ignored for a local path", root)
        if not read_only:
            os.makedirs(root, exist_ok=True)
        inner = LocalStore(root, read_only=read_only)
    return JournaledStore(inner, root)
