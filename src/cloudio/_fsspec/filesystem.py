"""The fsspec face of the journal: tracked filesystems, and fresh listings everywhere.

Two halves:

* :func:`filesystem` hands out a *tracked* filesystem, a subclass of gcsfs's
  ``GCSFileSystem`` (or of fsspec's ``LocalFileSystem`` for local paths)
  whose writes are recorded in the write journal once they have succeeded.
  The override points are the async primitives every public write method of
  gcsfs ends in (``pipe``/``put``/``cp``/``mv``/``rm`` run through
  ``_pipe_file``, ``_put_file``, ``_cp_file``, ``_mv_file``, ``_rm_file``,
  ``_rm_files``), plus the final chunk of a ``GCSFile`` opened for writing.
* :class:`FsspecConsumer` hears every change in the journal (from any
  writer: cloudio.open, zarr stores, :func:`cloudio.invalidate`, Dask
  workers) and at once drops the ``dircache`` entries that change made stale
  in every live gcsfs instance of the process: the user's own, the
  asynchronous one zarr's ``FsspecStore.from_url`` builds, and the tracked
  ones. gcsfs's own ``invalidate_cache(path)`` drops the path and its
  ancestors only; a prefix change here also drops every listing cached
  *below* the prefix. Listings unrelated to the change stay cached.

What gcsfs caches (2026.x, read from its source): only ``fs.dircache``,
keyed by ``bucket/dir`` without protocol or trailing '/', with the bucket
list under ``""``. ``info``, ``exists``, ``open("rb")`` (for the size) and
``cat`` consult the parent's cached listing, which is why a stale listing
silently truncates reads. Files already open keep the size they saw when
opened, like a POSIX reader; that is a snapshot, not a cache, and is left
alone. ``info`` of a bare bucket always asks the server. gcsfs's extended
(HNS/zonal) filesystem also keeps a per-bucket layout cache and, for zonal
buckets only, a pool of range readers keyed by object generation; neither
holds listings, and the emulator never uses them.

A listing in flight across an invalidation: the server may answer a listing
before a write and gcsfs store it after the consumer dropped the listings,
which would bring the old state back for good. Every invalidation therefore
bumps an epoch for the paths (and prefixes) it touched; each listing call
remembers the epoch it started at, and its ``dircache`` refuses to store a
listing whose path was invalidated since. Cache hits are untouched (no lock).
Instances cloudio makes (tracked ones, :func:`cloudio._gcs.client.gcs_filesystem`)
are guarded from birth; other live gcsfs instances from the first change the
consumer hands them, so a listing already in flight then is not covered.

The tracked filesystem also verifies bytes and names its failures: every
upload (``pipe``, ``put``, ``open("wb")``) is compared with the CRC32C and
size the server stored (a mismatch deletes the object, journals the delete
and raises :class:`~cloudio.IntegrityError`); a whole-object ``cat`` is
checked against the ``x-goog-hash`` CRC32C the server sends. Network trouble
that outlasts gcsfs's retries, or the time limit (``CLOUDIO_HTTP_TIMEOUT``,
see :mod:`cloudio._gcs.client`), raises :class:`~cloudio.TransientError`;
``FileNotFoundError`` stays what fsspec's contract says.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import os
import re
import sys
import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import unquote

import fsspec
import google_crc32c
from fsspec.asyn import sync, sync_wrapper
from fsspec.dircache import DirCache
from fsspec.implementations.local import LocalFileOpener, LocalFileSystem

from cloudio._config import emulator_endpoint, gcsfs_options, prepare_gcsfs_import, require_credentials
from cloudio._gcs.client import http_options, total_time_limit
from cloudio._journal import Change, Consumer, Kind, journal
from cloudio._paths import GCSPath, check_key, is_gcs, normalize, parse_gcs
from cloudio._gcs.transfer import (
    _check_stored,
    _crc_b64,
    _header_crc,
    _is_transient,
    _Mismatch,
    transient_error,
)
from cloudio.errors import IntegrityError, TransientError

__all__ = ["FsspecConsumer", "filesystem"]

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# finding live instances
# --------------------------------------------------------------------------------------------

#: tracked filesystems cloudio handed out, found even if made with skip_instance_cache=True
#: (keyed by id: fsspec hashes instances by a token only set after ``__init__``)
_tracked: weakref.WeakValueDictionary[int, fsspec.AbstractFileSystem] = weakref.WeakValueDictionary()


def _all_subclasses(cls: type) -> Iterator[type]:
    yield cls
    for sub in cls.__subclasses__():
        yield from _all_subclasses(sub)


def _live_gcs_filesystems() -> list[Any]:
    """Every live gcsfs filesystem instance of this process that can hold listings.

    fsspec hands out one instance per distinct set of constructor arguments (and,
    for asynchronous instances, per thread) and keeps it in ``cls._cache``, a
    dict ``token -> instance`` that its metaclass ``fsspec.spec._Cached`` gives
    every filesystem class, each subclass its own. That dict is private fsspec
    API; this function is the only place cloudio reads it, so a change there is
    fixed here alone. Instances made with ``skip_instance_cache=True`` are not in
    it: the user's are out of reach, cloudio's own are found through ``_tracked``.
    """
    core = sys.modules.get("gcsfs.core")
    if core is None:  # gcsfs never imported: no instance can hold a listing
        return []
    seen: dict[int, Any] = {}
    for cls in _all_subclasses(core.GCSFileSystem):
        cache = cls.__dict__.get("_cache")  # this class's own dict, not a parent's
        if not cache:
            continue
        for inst in list(cache.values()):
            seen.setdefault(id(inst), inst)
    for inst in list(_tracked.values()):
        if isinstance(inst, core.GCSFileSystem):
            seen.setdefault(id(inst), inst)
    return list(seen.values())


# --------------------------------------------------------------------------------------------
# epochs: a listing that started before an invalidation of its path never lands
# --------------------------------------------------------------------------------------------


class _Epochs:
    """The epoch of the last invalidation of each dircache key, and of each prefix.

    Bumped (under a lock) by the consumer *before* it drops listings; read
    without a lock when a listing is stored. Past ``limit`` entries everything
    is forgotten and a floor takes their place: fills that started before it
    are refused, as if every path had been invalidated.
    """

    def __init__(self, limit: int = 100_000) -> None:
        self.now = 0
        self._floor = 0
        self._paths: dict[str, int] = {}
        self._prefixes: dict[str, int] = {}
        self._limit = limit
        self._lock = threading.Lock()

    def bump(self, keys: list[str], prefixes: list[str]) -> None:
        with self._lock:
            self.now += 1
            if len(self._paths) + len(self._prefixes) > self._limit:
                self._floor = self.now  # before clearing: a reader never sees neither
                self._paths.clear()
                self._prefixes.clear()
            for k in keys:
                self._paths[k] = self.now
            for p in prefixes:
                self._prefixes[p] = self.now

    def stale(self, key: str, start: int) -> bool:
        """Was ``key`` (or a prefix holding it) invalidated after epoch ``start``?"""
        if self._floor > start or self._paths.get(key, 0) > start:
            return True
        if self._prefixes:
            for k in (key, *_ancestors(key)):
                if self._prefixes.get(k, 0) > start:
                    return True
        return False


_epochs = _Epochs()

#: the epoch at which the listing call running in this context started (None: not a guarded call)
_fill_start: contextvars.ContextVar[int | None] = contextvars.ContextVar("cloudio_fill_start", default=None)


class _EpochDirCache(DirCache):
    """fsspec's DirCache that refuses listings fetched before their path was invalidated.

    Checked before storing and again after (the consumer bumps, then drops):
    whichever of the two runs last sees the other, so a stale listing never stays.
    """

    def __setitem__(self, key: str, value: Any) -> None:
        start = _fill_start.get()
        if start is None:
            super().__setitem__(key, value)
            return
        if _epochs.stale(key, start):
            log.debug("fsspec: not caching the listing of %s: invalidated while it was fetched", key)
            return
        super().__setitem__(key, value)
        if _epochs.stale(key, start):
            try:
                if super().__getitem__(key) is value:
                    self.pop(key, None)
            except KeyError:
                pass


def _guarded(method: Any) -> Any:
    """``method`` (a listing coroutine) with the epoch it started at in the context."""

    @functools.wraps(method)
    async def run(*args: Any, **kwargs: Any) -> Any:
        token = _fill_start.set(_epochs.now)
        try:
            return await method(*args, **kwargs)
        finally:
            _fill_start.reset(token)

    return run


#: the gcsfs coroutines that store listings in ``dircache``
_FILLERS = ("_list_objects", "_list_buckets", "_find")


def guard_listings(fs: Any) -> None:
    """Make ``fs`` refuse listings that an invalidation overtook (idempotent, per instance).

    Instance attributes, not a subclass: the user's own instances keep their
    class (and so pickle as before). ``find`` is rebound because fsspec bound it
    to the unguarded ``_find`` when the instance was made.
    """
    if fs.__dict__.get("_cloudio_guarded"):
        return
    dircache = getattr(fs, "dircache", None)
    if type(dircache) is DirCache:
        dircache.__class__ = _EpochDirCache
    for name in _FILLERS:
        method = getattr(fs, name, None)
        if method is not None:
            setattr(fs, name, _guarded(method))
    if "find" in fs.__dict__:
        fs.find = sync_wrapper(fs._find, obj=fs)
    fs.__dict__["_cloudio_guarded"] = True


def _bump(change: Change, path: GCSPath) -> None:
    target = path.fs_path
    keys = [target, *_ancestors(target)]
    prefixes: list[str] = []
    if change.prefix:
        prefixes.append(target)
        if not path.key:
            keys.append("")
    _epochs.bump(keys, prefixes)


# --------------------------------------------------------------------------------------------
# the consumer: drop exactly the listings a change made stale
# --------------------------------------------------------------------------------------------


def _ancestors(fs_path: str) -> Iterator[str]:
    """``b/d/e`` -> ``b/d``, ``b`` (gcsfs dircache keys; never the bucket list ``""``)."""
    while "/" in fs_path:
        fs_path = fs_path.rsplit("/", 1)[0]
        yield fs_path


_GONE = object()


def _drop_stale(fs: Any, change: Change, path: GCSPath) -> bool:
    """Drop from ``fs.dircache`` the listings ``change`` made stale; True if any was cached.

    Mirrors gcsfs's bookkeeping for its own writes (``gcsfs._dircache``): a write
    drops the parent's listing, or every ancestor's when the parent was not
    listed (the write may have created it); a delete drops every ancestor's (it
    may have emptied them). A prefix change also drops every listing cached
    *below* the prefix, which gcsfs's ``invalidate_cache`` leaves. Object
    changes cost a few dict lookups; only prefix changes scan the keys.
    """
    dircache = getattr(fs, "dircache", None)
    if dircache is None or len(dircache) == 0:
        return False
    target = path.fs_path  # "b/d/a.bin"; "b/d" for a prefix "gs://b/d/"; "b" for a bucket
    keys = [target, *_ancestors(target)]
    if change.prefix:
        below = target + "/"
        keys += [k for k in list(dircache) if k.rstrip("/") == target or k.startswith(below)]
        if not path.key:
            keys.append("")  # a whole bucket: it may be new, or gone, in the bucket list
    elif change.kind == "write" and keys[1:2] and keys[1] in dircache:
        # the parent was listed, so it existed and its own parents already show it:
        # only its listing (names, sizes) and a listing of the path itself changed
        keys = keys[:2]
    dropped = False
    for key in keys:
        if dircache.pop(key, _GONE) is not _GONE:
            dropped = True
    return dropped


class FsspecConsumer(Consumer):
    """Acts at once on each change: fsspec listings are in memory, dropping them costs nothing.

    Nothing stays pending, so :meth:`take` always returns ``[]`` for this consumer.
    """

    name = "fsspec"

    def on_change(self, change: Change) -> None:
        path = change.path
        if path is None:  # local paths: LocalFileSystem keeps no listing cache
            return
        _bump(change, path)  # first: a fill storing after this sees it, one storing before is dropped
        touched = 0
        for fs in _live_gcs_filesystems():
            try:
                guard_listings(fs)
                if _drop_stale(fs, change, path):
                    touched += 1
            except Exception:  # one odd instance must not keep the others stale
                log.exception("fsspec: could not invalidate listings of %r for %s", fs, change.url)
        if touched:
            from cloudio._session import count

            count("invalidations", touched, cache="fsspec")
            log.debug("fsspec: %s %s -> dropped listings in %d instance(s)", change.kind, change.url, touched)


_consumer = journal().register(FsspecConsumer())


# --------------------------------------------------------------------------------------------
# recording writes
# --------------------------------------------------------------------------------------------

#: URLs recorded inside the current compound operation (mv), to know what its parts covered
_recorded: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar("cloudio_fsspec_recorded", default=None)


def _record(url: str, kind: Kind, *, generation: Any = None, size: Any = None, prefix: bool = False) -> None:
    journal().record(url, kind, generation=_int_or_none(generation), size=_int_or_none(size), prefix=prefix)
    acc = _recorded.get()
    if acc is not None:
        acc.append(url)


@contextmanager
def _collect() -> Iterator[list[str]]:
    """Collect the URLs recorded inside the block (and pass them on to an outer collector)."""
    outer = _recorded.get()
    acc: list[str] = []
    token = _recorded.set(acc)
    try:
        yield acc
    finally:
        _recorded.reset(token)
        if outer is not None:
            outer.extend(acc)


def _int_or_none(value: Any) -> int | None:
    try:
        return int(value) if value is not None else None
    except (TypeError, ValueError):
        return None


class _Crc32cChecker:
    """gcsfs's consistency-checker interface, fed every byte a ``GCSFile`` uploads.

    gcsfs's own ``"crc32c"`` checker needs crcmod; this one uses google-crc32c
    and only keeps the object resource the final response carried, so the
    comparison (and the delete of a corrupt object) happens in one place,
    :meth:`_JournalingGCSMixin._verify_stored`.
    """

    def __init__(self) -> None:
        self._sum = google_crc32c.Checksum()
        self.meta: dict[str, Any] | None = None

    def update(self, data: Any) -> None:
        self._sum.update(bytes(data))

    def validate_json_response(self, gcs_object: dict[str, Any]) -> None:
        self.meta = gcs_object

    def validate_headers(self, headers: Any) -> None:
        pass

    def validate_http_response(self, r: Any) -> None:
        pass

    def b64(self) -> str:
        return _crc_b64(self._sum)


def _crc_of(data: Any) -> str:
    checksum = google_crc32c.Checksum()
    checksum.update(bytes(data))
    return _crc_b64(checksum)


def _crc_of_file(local: str) -> str:
    checksum = google_crc32c.Checksum()
    with open(local, "rb") as f:
        for block in iter(lambda: f.read(2**22), b""):
            checksum.update(block)
    return _crc_b64(checksum)


_OBJECT_IN_URL = re.compile(r"/b/([^/?]+)(?:/o/([^?]+)|/o\?(?:.*&)?name=([^&]+))?")


def _request_url(fs: Any, path: str, args: tuple[Any, ...]) -> str:
    """The ``gs://`` URL a gcsfs request is about (its HTTP URL when none can be told)."""
    http = fs._format_path(path, args)
    m = _OBJECT_IN_URL.search(http)
    if m is None:
        return str(http.split("?", 1)[0])
    key = m.group(2) or m.group(3) or ""
    return f"gs://{unquote(m.group(1))}/{unquote(key)}"


class _JournalingGCSFileMixin:
    """Mixed into gcsfs's file class for write modes: journal once the upload is final.

    gcsfs finishes every write-mode file (``close``, a transaction's ``commit``,
    even a close deferred to its background thread) in ``_upload_chunk(final=True)``,
    so that is where a completed object is recorded. An exception inside a
    ``with fs.open(url, "wb")`` block uploads nothing (fsspec would commit the
    partial bytes): cloudio never leaves a partial object behind.
    """

    def _upload_chunk(self, final: bool = False) -> Any:
        done = super()._upload_chunk(final=final)  # type: ignore[misc]
        if final and done is not False and self.autocommit:  # type: ignore[attr-defined]
            url = _gcs_url(self.fs, self.path)  # type: ignore[attr-defined]
            checker: _Crc32cChecker = self.checker  # type: ignore[attr-defined]
            try:
                generation = sync(self.fs.loop, self.fs._verify_stored, url,  # type: ignore[attr-defined]
                                  checker.meta or {}, self.offset, checker.b64())  # type: ignore[attr-defined]
            except IntegrityError:
                self.closed = True  # type: ignore[attr-defined]  # nothing left to send: no retry from __del__
                raise
            _record(url, "write", generation=generation, size=self.offset)  # type: ignore[attr-defined]
        return done

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None and "r" not in self.mode and not self.closed:  # type: ignore[attr-defined]
            try:
                self.discard()  # type: ignore[attr-defined]  # cancels a started resumable upload
            except Exception:
                log.warning("could not cancel the upload of %s", self.path, exc_info=True)  # type: ignore[attr-defined]
            finally:
                self.closed = True  # type: ignore[attr-defined]
            return None
        return super().__exit__(exc_type, exc, tb)  # type: ignore[misc]


@functools.cache
def _journaling_file_class(cls: type) -> type:
    """``cls`` with :class:`_JournalingGCSFileMixin` in front (one subclass per file class)."""
    return type(f"Journaling{cls.__name__}", (_JournalingGCSFileMixin, cls), {"__module__": __name__})


def _gcs_url(fs: Any, path: str) -> str:
    bucket, key, _generation = fs.split_path(path)
    return parse_gcs(f"gs://{bucket}/{key}").url


class _JournalingGCSMixin:
    """Mixed in front of a gcsfs filesystem class: every successful write is journaled.

    Each override calls gcsfs first and records only when it returned, so a
    failed write journals nothing. Sync methods (``pipe``, ``put``, ``rm``...)
    run these same coroutines through fsspec's ``sync``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _tracked[id(self)] = self  # type: ignore[assignment]
        guard_listings(self)

    def _cloudio_url(self, path: str) -> str:
        return _gcs_url(self, path)

    def split_path(self, path: str) -> tuple[str, str, str | None]:
        """gcsfs's split, refusing keys GDAL would read as another object (``a//b``, ``./``)."""
        bucket, key, generation = super().split_path(path)  # type: ignore[misc]
        check_key(key, path if "://" in path else f"gs://{path}")
        return bucket, key, generation

    async def _call(self, method: str, path: str, *args: Any, **kwargs: Any) -> Any:
        """gcsfs's one request primitive, bounded in total time; transient failures become TransientError."""
        limit = total_time_limit(self.requests_timeout)  # type: ignore[attr-defined]
        try:
            call = super()._call(method, path, *args, **kwargs)  # type: ignore[misc]
            return await (call if limit is None else asyncio.wait_for(call, limit))
        except TransientError:
            raise
        except Exception as e:
            if isinstance(e, FileNotFoundError) or not _is_transient(e):
                raise
            raise transient_error(_request_url(self, path, args), f"{method} request", e) from e

    call = sync_wrapper(_call)  # GCSFile uploads through the sync ``call`` gcsfs bound to its own _call

    async def _verify_stored(self, url: str, meta: dict[str, Any], size: int, crc: str) -> int | None:
        """Compare the stored object with what was sent (the upload response serves when it has a
        CRC32C); on a mismatch the object is deleted (journaled) and IntegrityError raised."""
        path = parse_gcs(url, require_key=True)
        try:
            return await _check_stored(self, path, meta, size, crc)
        except _Mismatch as e:
            _record(url, "delete")
            raise IntegrityError(
                f"{url}: what the server stored differs from what was sent ({e}). The corrupt object was "
                "deleted, so nothing is stored there now (the delete is journaled; a previous object there "
                "is gone too). Check the network path to GCS (a proxy rewriting bodies?) and write again."
            ) from e

    async def _pipe_file(self, path: str, data: Any, *args: Any, **kwargs: Any) -> Any:
        out = await super()._pipe_file(path, data, *args, **kwargs)  # type: ignore[misc]
        # small uploads return the object resource (generation, size, crc32c): no extra request
        meta = out if isinstance(out, dict) else {}
        url = self._cloudio_url(path)
        generation = await self._verify_stored(url, meta, len(data), _crc_of(data))
        _record(url, "write", generation=generation, size=len(data))
        return out

    async def _put_file(self, lpath: str, rpath: str, *args: Any, **kwargs: Any) -> Any:
        out = await super()._put_file(lpath, rpath, *args, **kwargs)  # type: ignore[misc]
        if not os.path.isdir(lpath):  # gcsfs skips directories
            # gcsfs drops the upload's response here: one metadata request to verify
            url = self._cloudio_url(rpath)
            size = os.path.getsize(lpath)
            generation = await self._verify_stored(url, {}, size, _crc_of_file(lpath))
            _record(url, "write", generation=generation, size=size)
        return out

    async def _cat_file(self, path: str, start: Any = None, end: Any = None, **kwargs: Any) -> Any:
        """A whole object is checked against the CRC32C of the server's ``x-goog-hash``."""
        if start is not None or end is not None or kwargs.get("concurrency", 1) > 1:
            return await super()._cat_file(path, start=start, end=end, **kwargs)  # type: ignore[misc]
        u = self.url(path, generation=kwargs.get("generation"))  # type: ignore[attr-defined]
        headers, data = await self._call("GET", u)
        want = _header_crc(headers)
        if want is not None and _crc_of(data) != want:
            raise IntegrityError(
                f"{self._cloudio_url(path)}: the {len(data)} bytes received do not match the CRC32C the "
                f"server sent ({want}); they were corrupted on the way. Check the network path to GCS and "
                "read again."
            )
        return data

    async def _cp_file(self, path1: str, path2: str, *args: Any, **kwargs: Any) -> Any:
        out = await super()._cp_file(path1, path2, *args, **kwargs)  # type: ignore[misc]
        _record(self._cloudio_url(path2), "write")
        return out

    async def _merge(self, path: str, paths: Any, *args: Any, **kwargs: Any) -> Any:
        out = await super()._merge(path, paths, *args, **kwargs)  # type: ignore[misc]
        _record(self._cloudio_url(path), "write")
        return out

    async def _setxattrs(self, path: str, *args: Any, **kwargs: Any) -> Any:
        out = await super()._setxattrs(path, *args, **kwargs)  # type: ignore[misc]
        _record(self._cloudio_url(path), "write")  # metadata held in cached listings changed
        return out

    async def _mv_file(self, path1: str, path2: str, **kwargs: Any) -> Any:
        # gcsfs moves with one moveTo request, or falls back to copy + delete
        # (which record themselves); record what the parts did not.
        with _collect() as acc:
            out = await super()._mv_file(path1, path2, **kwargs)  # type: ignore[misc]
        u1, u2 = self._cloudio_url(path1), self._cloudio_url(path2)
        if u2 not in acc:
            _record(u2, "write")
        if u1 not in acc:
            _record(u1, "delete")
        return out

    async def _rm_file(self, path: str, **kwargs: Any) -> Any:
        out = await super()._rm_file(path, **kwargs)  # type: ignore[misc]
        if self.split_path(path)[1]:  # type: ignore[attr-defined]  # a bucket goes through _rmdir
            _record(self._cloudio_url(path), "delete")
        return out

    async def _rm_files(self, paths: list[str], *args: Any, **kwargs: Any) -> Any:
        out = await super()._rm_files(paths, *args, **kwargs)  # type: ignore[misc]
        for p in out or ():  # batch deletes: a path for each success, an exception otherwise
            if isinstance(p, str):
                _record(self._cloudio_url(p), "delete")
        return out

    async def _rmdir(self, path: str, *args: Any, **kwargs: Any) -> Any:
        out = await super()._rmdir(path, *args, **kwargs)  # type: ignore[misc]
        _record(self._cloudio_url(path), "delete", prefix=True)  # a bucket (or an HNS folder)
        return out

    async def _mkdir(self, path: str, *args: Any, **kwargs: Any) -> Any:
        out = await super()._mkdir(path, *args, **kwargs)  # type: ignore[misc]
        # a new bucket (or HNS folder): only listings of its parent can be stale
        _record(self._cloudio_url(path), "invalidate", prefix=True)
        return out

    # gcsfs binds these sync methods to its own coroutines in its class body
    # (``mv_file = sync_wrapper(_mv_file)``), which would bypass the overrides above;
    # fsspec derives the others (pipe_file, put_file, cp_file, rm_file...) per instance.
    mv_file = sync_wrapper(_mv_file)
    merge = sync_wrapper(_merge)
    setxattrs = sync_wrapper(_setxattrs)
    rmdir = sync_wrapper(_rmdir)
    mkdir = sync_wrapper(_mkdir)

    def _open(self, path: str, mode: str = "rb", *args: Any, **kwargs: Any) -> Any:
        f = super()._open(path, mode, *args, **kwargs)  # type: ignore[misc]
        if "r" not in mode:
            # gcsfs picks the file class (GCSFile, or ZonalFile for zonal buckets);
            # give that class the journaling mixin rather than re-implement the choice
            f.__class__ = _journaling_file_class(type(f))
            f.checker = _Crc32cChecker()
        return f


class _JournalingHNSMixin(_JournalingGCSMixin):
    """Extra for gcsfs's extended filesystem: HNS folder renames move a prefix in one call."""

    async def _mv(self, path1: Any, path2: Any, **kwargs: Any) -> Any:
        with _collect() as acc:
            out = await super()._mv(path1, path2, **kwargs)  # type: ignore[misc]
        if not acc and isinstance(path1, str) and isinstance(path2, str) and path1 != path2:
            from fsspec.utils import has_magic

            bucket = self.split_path(path1)[0]  # type: ignore[attr-defined]
            if not has_magic(path1) and await self._is_bucket_hns_enabled(bucket):  # type: ignore[attr-defined]
                # a folder rename moved a whole prefix and recorded nothing per object
                _record(self._cloudio_url(path1), "delete", prefix=True)
                _record(self._cloudio_url(path2), "write", prefix=True)
        return out

    mv = sync_wrapper(_mv)


_gcs_classes: dict[str, type] = {}


def _tracked_gcs_class(name: str) -> type:
    """Build ``TrackedGCSFileSystem`` / ``TrackedExtendedGCSFileSystem`` on first use.

    Built lazily because gcsfs must not be imported before
    :func:`cloudio._config.prepare_gcsfs_import`, and published as module
    attributes (see ``__getattr__``) so instances pickle by reference to Dask
    workers, which rebuild the class the same way.
    """
    cls = _gcs_classes.get(name)
    if cls is not None:
        return cls
    prepare_gcsfs_import()
    import gcsfs.core

    if name == "TrackedGCSFileSystem":
        base: type = gcsfs.core.GCSFileSystem
        mixin: type = _JournalingGCSMixin
    else:
        from gcsfs.extended_gcsfs import ExtendedGcsFileSystem

        base, mixin = ExtendedGcsFileSystem, _JournalingHNSMixin
    doc = f"A gcsfs ``{base.__name__}`` whose writes are recorded in cloudio's write journal."
    cls = type(name, (mixin, base), {"__module__": __name__, "__qualname__": name, "__doc__": doc})
    return _gcs_classes.setdefault(name, cls)


def __getattr__(name: str) -> Any:
    if name in ("TrackedGCSFileSystem", "TrackedExtendedGCSFileSystem"):
        return _tracked_gcs_class(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# --------------------------------------------------------------------------------------------
# local paths
# --------------------------------------------------------------------------------------------


class _JournalingLocalFile(LocalFileOpener):
    """A local file opened for writing, journaled when it is complete.

    Mode ``"w"`` writes to a temporary file that is moved in place at close (the
    move is the commit), so an exception inside the ``with`` block leaves the
    target untouched and journals nothing. ``"a"`` and ``"x"`` write in place
    and are journaled at a clean close.
    """

    def __init__(self, path: str, mode: str, autocommit: bool = True, **kwargs: Any) -> None:
        self._cloudio_autocommit = autocommit
        self._cloudio_staged = "w" in mode
        super().__init__(path, mode, autocommit=autocommit and not self._cloudio_staged, **kwargs)

    def close(self) -> None:
        if self.f is None or self.f.closed:
            return
        super().close()
        if not self._cloudio_staged:
            _record(normalize(self.path), "write", size=os.path.getsize(self.path))
        elif self._cloudio_autocommit:
            self.commit()

    def commit(self) -> None:
        super().commit()
        _record(normalize(self.path), "write", size=os.path.getsize(self.path))

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self._incontext = False
        if exc_type is not None and self._cloudio_staged and not self.f.closed:
            self.f.close()
            if self._cloudio_autocommit:
                self.discard()
            return None
        self.close()
        return None


class TrackedLocalFileSystem(LocalFileSystem):
    """fsspec's local filesystem whose writes are recorded in cloudio's write journal."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _tracked[id(self)] = self

    def _open(self, path: str, mode: str = "rb", block_size: Any = None, **kwargs: Any) -> Any:
        if "r" in mode:
            return super()._open(path, mode, block_size=block_size, **kwargs)
        path = self._strip_protocol(path)
        if self.auto_mkdir:
            self.makedirs(self._parent(path), exist_ok=True)
        return _JournalingLocalFile(path, mode, fs=self, **kwargs)

    def cp_file(self, path1: str, path2: str, **kwargs: Any) -> None:  # put_file is cp_file here
        super().cp_file(path1, path2, **kwargs)
        _record(normalize(self._strip_protocol(path2)), "write", prefix=self.isdir(path2))

    def mv(self, path1: Any, path2: Any, *args: Any, **kwargs: Any) -> None:
        super().mv(path1, path2, *args, **kwargs)
        for p in _as_list(path1):
            _record(normalize(self._strip_protocol(p)), "delete", prefix=True)
        for p in _as_list(path2):  # a file, a tree, or the directory the sources went into
            _record(normalize(self._strip_protocol(p)), "write", prefix=True)

    def rm_file(self, path: str) -> None:
        super().rm_file(path)
        _record(normalize(self._strip_protocol(path)), "delete")

    def rm(self, path: Any, recursive: bool = False, maxdepth: Any = None) -> None:
        super().rm(path, recursive=recursive, maxdepth=maxdepth)
        for p in _as_list(path):
            _record(normalize(self._strip_protocol(p)), "delete", prefix=recursive)

    def rmdir(self, path: str) -> None:
        super().rmdir(path)
        _record(normalize(self._strip_protocol(path)), "delete", prefix=True)

    def touch(self, path: str, truncate: bool = True, **kwargs: Any) -> None:
        super().touch(path, truncate=truncate, **kwargs)
        _record(normalize(self._strip_protocol(path)), "write")


def _as_list(p: Any) -> list[str]:
    return list(p) if isinstance(p, (list, tuple)) else [p]


# --------------------------------------------------------------------------------------------
# the public function
# --------------------------------------------------------------------------------------------


def filesystem(url: str | os.PathLike[str] = "gs://", **storage_options: Any) -> fsspec.AbstractFileSystem:
    """A tracked fsspec filesystem for ``url``: its writes are recorded in cloudio's journal.

    Every write through it (``pipe``, ``put``, ``open(..., "wb")``, ``cp``,
    ``mv``, ``rm``, ``touch``) is journaled once it succeeded, so GDAL, Zarr
    and every other fsspec instance of the process read it at once. The
    filesystem is a real subclass of gcsfs's ``GCSFileSystem`` (fsspec's
    ``LocalFileSystem`` for local paths), cached by fsspec like any other.

    Parameters
    ----------
    url
        ``gs://bucket[/key]`` (any spelling cloudio accepts) or a local path;
        only its scheme matters, one filesystem serves every bucket.
    **storage_options
        Passed to the filesystem (``asynchronous=True``, ``token=``...); they
        win over the emulator options cloudio derives from
        ``STORAGE_EMULATOR_HOST``.

    Raises
    ------
    InvalidURLError
        For a malformed GCS URL or an unsupported scheme.

    Examples
    --------
    >>> fs = cloudio.filesystem("gs://bucket")          # doctest: +SKIP
    >>> fs.pipe("gs://bucket/d/a.bin", b"x" * 100)      # doctest: +SKIP
    """
    if not is_gcs(url):
        normalize(url)  # raises InvalidURLError for s3:// and friends
        return TrackedLocalFileSystem(**storage_options)
    if os.fspath(url) not in ("gs://", "gcs://"):
        parse_gcs(os.fspath(url))  # validate now: a clear error rather than a 404 later
    prepare_gcsfs_import()
    import gcsfs
    import gcsfs.core

    name = "TrackedGCSFileSystem"
    if emulator_endpoint() is None and gcsfs.GCSFileSystem is not gcsfs.core.GCSFileSystem:
        name = "TrackedExtendedGCSFileSystem"  # keep gcsfs's zonal/HNS support on real GCS
    if "token" not in storage_options:
        require_credentials(os.fspath(url))  # fail now, not after minutes of retries against Google
    return _tracked_gcs_class(name)(**{**gcsfs_options(), **http_options(), **storage_options})
