"""The fsspec face's consumer: fresh listings in every live gcsfs instance of the process.

:class:`FsspecConsumer` hears every change in the journal (from any writer:
cloudio.open, zarr stores, :func:`cloudio.invalidate`, Dask workers) and at
once drops the ``dircache`` entries that change made stale in every live
gcsfs instance: the user's own, the asynchronous one zarr's
``FsspecStore.from_url`` builds, and the tracked ones. gcsfs's own
``invalidate_cache(path)`` drops the path and its ancestors only; a prefix
change here also drops every listing cached *below* the prefix. Listings
unrelated to the change stay cached.

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
are guarded from birth (:func:`guard_listings`); other live gcsfs instances
from the first change the consumer hands them, so a listing already in flight
then is not covered.

Other writers (the ``"strong"`` level and a bound of ``N`` seconds, see
:mod:`cloudio._session`): the guarded ``dircache`` hides the listings the level
may not trust (all of them, or those filled more than ``N`` seconds ago), so
gcsfs asks the server; ``_info`` asks for the object itself. What the server
answers is compared with what was kept (generation, metageneration), and a
difference is journaled as an ``"invalidate"``: other writers' changes then
reach every cache the way cloudio's own writes do.
"""

from __future__ import annotations

import contextvars
import functools
import logging
import sys
import threading
import time
import weakref
from collections.abc import Iterator
from typing import Any

import fsspec
from fsspec.asyn import sync_wrapper
from fsspec.dircache import DirCache

from cloudio._journal import Change, Consumer, journal
from cloudio._paths import GCSPath, parse_gcs
from cloudio._session import count, current_level
from cloudio._threads import hold_across_fork
from cloudio.errors import CloudioError

__all__ = ["FsspecConsumer", "guard_listings", "track"]

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# finding live instances
# --------------------------------------------------------------------------------------------

#: tracked filesystems cloudio handed out, found even if made with skip_instance_cache=True
#: (keyed by id: fsspec hashes instances by a token only set after ``__init__``)
_tracked: weakref.WeakValueDictionary[int, fsspec.AbstractFileSystem] = weakref.WeakValueDictionary()


def _all_subclasses(cls: type[Any]) -> Iterator[type[Any]]:
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


class _EpochDirCache(DirCache):  # type: ignore[misc]  # fsspec ships no type information
    """fsspec's DirCache that refuses listings fetched before their path was invalidated,
    and shows only the listings the consistency level in force may trust.

    Checked before storing and again after (the consumer bumps, then drops):
    whichever of the two runs last sees the other, so a stale listing never stays.

    Levels (see :mod:`cloudio._session`): at ``"session"`` every listing kept is
    shown, at no cost beyond reading the level. At ``"strong"`` none is (gcsfs
    then asks the server, as an uncached gcsfs would); at ``N`` seconds, those
    filled less than ``N`` seconds ago. Hidden listings stay stored: dropping is
    the consumer's business (``pop``, ``__iter__`` and ``len`` see every one).
    A listing refetched over one still stored is compared, name by name, on
    generation and metageneration; what another writer changed becomes an
    ``"invalidate"`` change in the journal, so every other cache forgets it too.
    """

    def _fill_times(self) -> dict[str, float]:
        # instances get this class by a __class__ swap, never through __init__
        times: dict[str, float] | None = self.__dict__.get("_filled")
        if times is None:
            times = self.__dict__.setdefault("_filled", {})
        return times

    def __getitem__(self, item: str) -> Any:
        level = current_level()
        if level != "session":
            filled = self._fill_times().get(item)
            if level == "strong" or filled is None or time.monotonic() - filled > level:
                raise KeyError(item)
        return super().__getitem__(item)

    def __setitem__(self, key: str, value: Any) -> None:
        start = _fill_start.get()
        if start is not None and _epochs.stale(key, start):
            log.debug("fsspec: not caching the listing of %s: invalidated while it was fetched", key)
            return
        before = self._cache.get(key)
        super().__setitem__(key, value)
        if key in self._cache:  # not with use_listings_cache=False
            self._fill_times()[key] = time.monotonic()
        if start is not None and _epochs.stale(key, start):
            try:
                if self._cache[key] is value:
                    self.pop(key, None)
            except KeyError:
                pass
        if before is not None and before is not value:
            _invalidate_changed(key, before, value)

    def pop(self, key: str, default: Any = None) -> Any:  # type: ignore[override]
        """Remove ``key`` whatever the level: a write or a consumer must drop hidden listings too."""
        self._fill_times().pop(key, None)
        return self._cache.pop(key, default)

    def __delitem__(self, key: str) -> None:
        self._fill_times().pop(key, None)
        super().__delitem__(key)

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._cache))

    def clear(self) -> None:
        self._fill_times().clear()
        super().clear()


def _versions(listing: Any) -> dict[str, tuple[Any, Any, Any]]:
    """name -> (type, generation, metageneration) of each entry of a gcsfs listing."""
    out: dict[str, tuple[Any, Any, Any]] = {}
    for entry in listing if isinstance(listing, list) else ():
        if isinstance(entry, dict) and "name" in entry:
            out[str(entry["name"]).rstrip("/")] = (entry.get("type"), entry.get("generation"),
                                                    entry.get("metageneration"))
    return out


def _invalidate_changed(key: str, before: Any, after: Any) -> None:
    """Journal an ``"invalidate"`` for each entry another writer changed between two listings of ``key``.

    The one revalidation model of every face: a changed generation becomes the
    targeted invalidation the journal drives for cloudio's own writes (GDAL's
    caches of the object, other instances' listings). New or vanished
    "directories" are invalidated as prefixes.
    """
    old, new = _versions(before), _versions(after)
    changed = [name for name in old.keys() | new.keys() if old.get(name) != new.get(name)]
    for name in sorted(changed):
        kind = (new.get(name) or old[name])[0]
        try:
            url = parse_gcs(f"gs://{name}").url
        except CloudioError:  # a name cloudio refuses (``a//b``): forget the whole listing instead
            url, kind = parse_gcs(f"gs://{key}").url, "directory"
        log.debug("fsspec: %s changed on the server (listing of %s)", url, key)
        journal().record(url, "invalidate", prefix=kind == "directory")


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


def _counted(method: Any) -> Any:
    """gcsfs's one request for a page of a listing, counted as a revalidation at the strong and bounded
    levels (the listings they do not trust are asked for again; where gcsfs looks in its cache is not
    where it asks the server)."""

    @functools.wraps(method)
    async def run(*args: Any, **kwargs: Any) -> Any:
        if current_level() != "session":
            count("revalidations")
        return await method(*args, **kwargs)

    return run


def _revalidating_info(fs: Any, method: Any) -> Any:
    """``fs._info`` that, at the strong and bounded levels, asks for the object itself first.

    gcsfs's own ``_info`` without a trusted listing sends an object GET and a
    directory listing at once (and sometimes a second object GET): at most one
    request here when the path is an object, as for every file ``info``,
    ``exists``, ``size`` and ``open(..., "rb")``. What the server answers is
    compared with the parent's cached listing (generation and metageneration):
    a difference is journaled as an ``"invalidate"`` of the object.
    """

    @functools.wraps(method)
    async def run(path: str, generation: Any = None, **kwargs: Any) -> Any:
        directory_info = getattr(fs, "_get_directory_info", None)
        if generation is not None or directory_info is None or current_level() == "session":
            return await method(path, generation=generation, **kwargs)
        bucket, key, path_generation = fs.split_path(path)
        if not key or path_generation:
            return await method(path, generation=generation, **kwargs)
        name = f"{bucket}/{key}".rstrip("/")
        count("revalidations")
        try:
            found = await fs._get_object(path)
        except FileNotFoundError:
            found = None
        if found is not None and not (found.get("size") == 0 and str(found.get("name", "")).endswith("/")):
            _compare_with_listing(fs, name, found)
            return found
        _compare_with_listing(fs, name, None)
        try:
            return await directory_info(name, bucket, key.rstrip("/"), None)
        except FileNotFoundError:  # named as at the session level (gcsfs's names an HTTP path), in its words
            from cloudio._fsspec.filesystem import _named_missing  # (that module imports this one)

            with _named_missing(parse_gcs(f"gs://{name}").url):
                raise

    return run


def _compare_with_listing(fs: Any, name: str, found: dict[str, Any] | None) -> None:
    """Journal an ``"invalidate"`` of ``name`` when the parent's stored listing disagrees with ``found``."""
    cache = getattr(getattr(fs, "dircache", None), "_cache", None)
    if not isinstance(cache, dict) or "/" not in name:
        return
    listing = cache.get(name.rsplit("/", 1)[0])
    if listing is None:
        return
    seen = _versions(listing).get(name)
    now = None if found is None else (found.get("type"), found.get("generation"), found.get("metageneration"))
    if seen != now and not (found is None and seen is not None and seen[0] == "directory"):
        url = parse_gcs(f"gs://{name}").url
        log.debug("fsspec: %s changed on the server (info)", url)
        journal().record(url, "invalidate")


#: the gcsfs coroutines that store listings in ``dircache``
_FILLERS = ("_list_objects", "_list_buckets", "_find")


def guard_listings(fs: Any) -> None:
    """Make ``fs`` refuse listings that an invalidation overtook (idempotent, per instance).

    Instance attributes, not a subclass: the user's own instances keep their
    class (and so pickle as before). ``find`` and ``info`` are rebound because
    fsspec bound them to the unwrapped coroutines when the instance was made.
    ``_info`` also revalidates at the strong and bounded levels
    (:func:`_revalidating_info`), and each page of a listing asked for then is
    counted (:func:`_counted`).
    """
    if fs.__dict__.get("_cloudio_guarded"):
        return
    with _guarding:  # two writers' changes may reach one instance at once: wrapped once
        if not fs.__dict__.get("_cloudio_guarded"):
            _guard(fs)


_guarding = threading.Lock()


def _guard(fs: Any) -> None:
    """:func:`guard_listings`, once per instance (under :data:`_guarding`)."""
    dircache = getattr(fs, "dircache", None)
    if type(dircache) is DirCache:
        dircache.__class__ = _EpochDirCache
    for name in _FILLERS:
        method = getattr(fs, name, None)
        if method is not None:
            setattr(fs, name, _guarded(method))
    if getattr(fs, "_info", None) is not None:
        fs._info = _revalidating_info(fs, fs._info)
    if getattr(fs, "_call_list_objects", None) is not None:
        fs._call_list_objects = _counted(fs._call_list_objects)
    for name in ("find", "info"):  # fsspec bound these to the unwrapped coroutines
        if name in fs.__dict__:
            setattr(fs, name, sync_wrapper(getattr(fs, f"_{name}"), obj=fs))
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
    elif change.kind == "write" and keys[1:2] and keys[1] in getattr(dircache, "_cache", dircache):
        # the parent was listed, so it existed and its own parents already show it:
        # only its listing (names, sizes) and a listing of the path itself changed
        keys = keys[:2]
    dropped = False
    for key in keys:
        if dircache.pop(key, _GONE) is not _GONE:
            dropped = True
    return dropped


class FsspecConsumer(Consumer):
    """Acts at once on each change: fsspec listings are in memory, dropping them costs nothing."""

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


def _renew_locks() -> None:
    global _guarding
    _epochs._lock = threading.Lock()
    _guarding = threading.Lock()


# held across a fork: a thread bumping an invalidation's epochs or guarding an instance then is not in the child, and
# a lock copied held by it would stop the child's next write or invalidation (every change reaches this consumer)
# for good (in-memory work under each: epochs, an instance's methods wrapped)
hold_across_fork("fsspec consumer", lambda: (_epochs._lock, _guarding), _renew_locks)

_consumer = journal().register(FsspecConsumer())


def track(fs: fsspec.AbstractFileSystem) -> None:
    """Keep ``fs`` (a tracked filesystem cloudio handed out) findable, even with ``skip_instance_cache``."""
    _tracked[id(fs)] = fs


def reset() -> None:
    """Forget listing epochs and tracked instances (:func:`cloudio._state.reset`); listings are dropped."""
    global _epochs
    for fs in _live_gcs_filesystems():
        fs.invalidate_cache()
    _tracked.clear()
    _epochs = _Epochs()
