"""The GDAL face of the journal: what GDAL's ``/vsigs/`` caches hold, and clearing just that.

What GDAL caches (measured with GDAL 3.10.3 and 3.12.2 against fake-gcs-server)
--------------------------------------------------------------------------------
* **Byte ranges and file properties** (size, exists / does-not-exist), keyed
  by the object's URL. ``VSICurlPartialClearCache(p)`` drops every entry whose
  URL *starts with* ``p``'s URL: clearing ``/vsigs/b/d/a.tif`` also drops
  ``a.tif.ovr`` and ``a.tif.aux.xml`` (its sidecars, which is what we want),
  and nothing else. That is the *file-level clear*.
* **Directory listings**, keyed by the directory's path without a trailing
  '/' (``/vsigs/b/d``). GDAL lists a directory when it opens a file there
  (to find sidecars), and afterwards answers every ``stat`` in that directory
  from the listing: a name written later "does not exist" (GDAL issue 11351)
  even with ``GDAL_DISABLE_READDIR_ON_OPEN`` set, and only clearing
  ``/vsigs/b/d`` fixes it. That string prefix also matches the URL of every
  object below ``d`` (and ``d2/``...), so a listing clear throws away every
  cached byte range under the directory: the *directory clear*, the expensive
  one.

* **Path-specific options** (``VSISetPathSpecificOption``, GDAL >= 3.6) are
  looked up by string prefix; for listings GDAL looks up the directory path,
  so options for a bucket must be set on ``/vsigs/<bucket>`` (no '/').
  ``GDAL_DISABLE_READDIR_ON_OPEN`` is honoured per path too.
* A dataset keeps the size and offsets it read at open. Read after its
  object was overwritten, it puts new bytes cut at the old size into the
  shared cache (or old bytes, from downloads in flight at the write): every
  later open of the URL reads a torn file until the next clear. With several
  threads, two versions of one URL in GDAL's caches corrupt its heap (GDAL
  3.10 and 3.12 abort: "free(): invalid pointer"); a clear while *other*
  objects are read is harmless.

The strategy
------------
Writes are applied at once (:meth:`GdalConsumer.on_change`) with file-level
clears, so a read does no bookkeeping beyond a few dictionary lookups.
Directory clears are avoided by keeping GDAL from listing directories at all:
cloudio keeps its own listing of each directory it reads from (one request,
the same one GDAL would have made, then kept current from the journal) and
sets ``GDAL_DISABLE_READDIR_ON_OPEN=EMPTY_DIR`` on the path of each object
whose listing shows no sidecar (a path-specific option: no ``rasterio.Env``
per open). A new name then needs nothing but its file-level clear. Only when
a file has sidecars, or is a VRT (whose sources GDAL opens normally, listing
their directories), does GDAL list; those directories are remembered, and a
change to their set of names turns into a directory clear the next time a
read could see the difference (the new name itself, a sidecar, a VRT, a
listing through cloudio). A directory GDAL listed behind cloudio's back (a
raw ``rasterio.open``) is caught when an open of an object that exists
fails: :mod:`cloudio._gdal.open` then clears the directory and retries.

Datasets cloudio opened are remembered weakly. A write of an object with
datasets still open (or being opened: a seqlock on a per-object epoch tells)
marks the object, and every open of it clears it again until those datasets
are closed, and once more after. Datasets opened with plain rasterio are
out of reach: close them before overwriting their objects.

Threads
-------
Guaranteed: cloudio's own writes (``cloudio.open(..., "w")``, every upload
through :func:`cloudio._gcs.transfer.put_verified`, a tracked filesystem's
``pipe``/``put``/``cp``/``rm``) and reads of datasets ``cloudio.open``
returned, in any threads of one process, never crash GDAL and never return
pixels from two versions. Each object has a readers-writer gate
(:mod:`cloudio._gdal.gates`): a writer holds it exclusively from before its bytes
are sent until the change is recorded and cleared
(:meth:`cloudio._journal.WriteJournal.changing`), cloudio's GDAL I/O of the
object (open, each read, close) holds it shared, and a dataset opened before
a change reads only through a fresh open (:mod:`cloudio._gdal.open`). Other
objects never wait; a write waits at most :data:`CHANGE_WAIT` seconds for a
read in flight, then goes ahead with a warning in the log. Not guaranteed:
writes by other processes (or with other clients) while a dataset is open or
being read, which is GDAL's own behaviour; datasets opened with plain
``rasterio.open``; the sources of a VRT, which GDAL opens itself.

The GDAL calls themselves (:mod:`cloudio._gdal.bindings`) are collaborators
(:class:`GdalCalls`), so that this logic is tested against a recording fake
(tests/test_gdal_consumer_unit.py) as well as against GDAL. Gates live in
:mod:`cloudio._gdal.gates`, per-bucket options in :mod:`cloudio._gdal.endpoint`,
path helpers in :mod:`cloudio._gdal.targets`.
"""

from __future__ import annotations

import itertools
import logging
import math
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field
from typing import Any

from cloudio._gdal import bindings, generation
from cloudio._gdal.endpoint import ensure_endpoint, in_force
from cloudio._gdal.endpoint import reset as reset_endpoints
from cloudio._gdal.gates import gates
from cloudio._gdal.targets import Target, dir_key, is_sidecar, split_vsi
from cloudio._journal import Change, Consumer, journal
from cloudio._paths import GCSPath, is_gcs, is_under, parse_gcs
from cloudio._tables import drop_oldest, touch
from cloudio._threads import hold_across_fork

log = logging.getLogger(__name__)

__all__ = ["NEEDS_LISTING", "GdalCalls", "GdalConsumer", "consumer", "listdir", "reset"]

#: cloudio's own listing is only trusted when it fits one page (GDAL's own limit is 1000)
LISTING_LIMIT = 1000
_RECLEAR_MAX = 10_000
_TRACK_MAX = 100_000
#: directories whose listing cloudio keeps, at most; past it the oldest quarter's names are dropped
#: (:meth:`GdalConsumer._bound_dirs`)
_DIRS_MAX = 10_000
#: datasets remembered per object before the closed ones are dropped (amortised over the opens)
_PRUNE_AT = 64
#: per-object EMPTY_DIR options kept in GDAL at once, oldest dropped first: GDAL looks a path's options
#: up through all of them, in every open and request (3,000 made a plain open of another object 1 ms slower)
_EMPTY_DIR_MAX = 256
#: the change of a directory listing whose new names are unknown (an external invalidation)
_ANY = "\0any"
#: prefix change events kept for the opens under way to compare with; an open older than them all counts as raced
_PREFIX_LOG = 1024
#: what :meth:`GdalConsumer.opened_dataset` gives a dataset opened across a prefix change of its object as
#: its epoch: no epoch is ever this, so its first read goes to a fresh open (:func:`cloudio._gdal.open._io`)
RACED = -2


@dataclass(frozen=True)
class GdalCalls:
    """What the consumer does to GDAL, as collaborators (the real bindings by default; a fake in unit tests)."""

    #: drop every cached entry whose path starts with the string (``VSICurlPartialClearCache``)
    clear: Callable[[str], None] = bindings.clear
    #: ``VSISetPathSpecificOption(prefix, key, value)``
    set_path_option: Callable[[str, str, str], None] = bindings.set_path_option
    #: ``VSIClearPathSpecificOptions(prefix)``
    clear_path_options: Callable[[str], None] = bindings.clear_path_options
    #: GDAL's listing of a directory (``VSIReadDir``), which GDAL then caches
    listdir: Callable[[str], list[str]] = bindings.vsi_readdir


@dataclass
class _Dir:
    """One directory, keyed like GDAL's listing (``/vsigs/b/d``)."""

    names: set[str] | None = None  #: cloudio's own listing (None: not fetched, or too long)
    listed_at: float = 0.0  #: when ``names`` was fetched from the server (0: never / dropped)
    gdal_listed: bool = False  #: GDAL may hold a listing of it
    changed: set[str] = field(default_factory=set)  #: names added/removed since GDAL listed it
    plans: dict[str, bool] = field(default_factory=dict)  #: name -> GDAL must list (memo of ``names``)
    empty_dir: set[str] = field(default_factory=set)  #: names opened with EMPTY_DIR set on their path
    forgot: bool = False  #: its names were dropped to keep the table bounded (:meth:`GdalConsumer._bound_dirs`)


#: returned by :meth:`GdalConsumer.plan_read` when cloudio's own listing must be fetched first
NEEDS_LISTING = None
_READDIR = "GDAL_DISABLE_READDIR_ON_OPEN"


class GdalConsumer(Consumer):
    """Applies journal changes to GDAL's caches; plans reads so that GDAL lists as little as possible."""

    name = "gdal"

    def __init__(self, calls: GdalCalls | None = None) -> None:
        super().__init__()
        self._dirs: dict[str, _Dir] = {}
        #: per journal key: (generation GDAL's cache holds, when checked)
        self._seen: dict[str, tuple[int, float]] = {}
        #: per object URL: the names (itself and its sidecars) its last strong/bounded check listed
        self._related: dict[str, frozenset[str]] = {}
        #: /vsigs/ paths deleted through cloudio and not written since (a VRT's source: GDAL reads one it cannot
        #: find as zeros once it has read a nested VRT)
        self._gone: dict[str, None] = {}
        #: objects written while datasets of them were open (vsi path -> those datasets, weakly).
        #: Such a dataset keeps the old size and offsets, and whatever it reads after the
        #: write lands in GDAL's shared cache under the object's URL: old bytes from downloads
        #: in flight, or new bytes cut at the old size. Each open of the object clears it
        #: again until those datasets are closed (and once more after that).
        self._reclear: dict[str, list[weakref.ref[Any]]] = {}
        #: vsi path -> changes applied to it: an open that saw the number change raced a write
        self._epoch: dict[str, int] = {}
        #: prefix changes (``cloudio.invalidate``) as a seqlock for the opens they reach, whose objects have no
        #: epoch yet: each one's start and end are numbered events; an open that saw the number move, or one
        #: under way, and is at or below its prefix raced it (:meth:`_prefix_raced`)
        self._prefix_seq = 0
        #: the last :data:`_PREFIX_LOG` events: (number, prefix's /vsigs/ path)
        self._prefix_log: deque[tuple[int, str]] = deque(maxlen=_PREFIX_LOG)
        #: prefix changes under way: their start event -> prefix
        self._prefix_active: dict[int, str] = {}
        #: vsi path -> datasets cloudio opened on it (weak): open ones may be downloading
        self._readers: dict[str, list[weakref.ref[Any]]] = {}
        #: the EMPTY_DIR options set, oldest first: (directory key, name), at most :data:`_EMPTY_DIR_MAX`
        self._empty_dirs: dict[tuple[str, str], None] = {}
        #: the directories whose names are kept, oldest listing first, at most :data:`_DIRS_MAX`
        self._listed: dict[str, None] = {}
        self._state = threading.RLock()
        self.calls = calls if calls is not None else GdalCalls()

    # -- changes (called by the journal, at once, in the writer's thread) ----------------------

    def before_change(self, url: str, wait: bool = True) -> bool:
        """A writer is about to change ``url`` on the server: hold its GDAL I/O off (see :class:`_ObjectGates`).
        ``wait=False``: only if none is in flight; whether it is held off."""
        return not is_gcs(url) or gates.begin_change(parse_gcs(url).vsi, wait)

    def after_change(self, url: str) -> None:
        """The change of ``url`` is recorded (and GDAL's cache of it cleared): let its I/O resume."""
        if is_gcs(url):
            gates.end_change(parse_gcs(url).vsi)

    def on_change(self, change: Change) -> None:
        path = change.path
        if path is None:  # a local path: GDAL reads local files afresh
            return
        if change.prefix:
            self._apply_prefix(path)
        else:
            self._apply_object(path, change)

    def _apply_object(self, path: GCSPath, change: Change) -> None:
        key, name = split_vsi(path)
        self._object_changed(path.vsi)
        with self._state:
            if change.kind == "delete":
                self._remember(self._gone, path.vsi, None)
            else:
                self._gone.pop(path.vsi, None)
            if change.generation is not None and change.kind == "write":
                # the generation GDAL may now hold; never a check (time -inf): the write says nothing of the
                # sidecars another writer may have put beside it, which a bounded open must list for
                self._remember(self._seen, change.url, (change.generation, -math.inf))
            else:
                self._seen.pop(change.url, None)
            if change.kind != "delete":
                self._unshadow(path.vsi)
            d = self._dirs.get(key)
            if d is None:
                return
            if change.kind == "invalidate" or d.names is None:
                # written elsewhere (or no listing): new, overwritten or deleted, who knows
                d.names, d.listed_at = None, 0.0
                self._names_changed(key, d, name)
                return
            if change.kind == "write":
                new = name not in d.names  # a writer can't tell new from overwritten; the listing can
                d.names.add(name)
            else:
                new = name in d.names
                d.names.discard(name)
            if new:
                self._names_changed(key, d, name)

    def _object_changed(self, vsi: str) -> None:
        """The file-level clear, the object held exclusively (at once inside its writer's :meth:`before_change`)."""
        gates.begin_change(vsi)
        try:
            self._objects_cleared(vsi, (vsi,))  # sizes, byte ranges, "does not exist"; also its sidecars'
        finally:
            gates.end_change(vsi)

    def _objects_cleared(self, top: str, changed: Collection[str], readers: Iterable[str] | None = None) -> None:
        """Epochs of ``changed``, their stale datasets and the clear of ``top``, as seen by readers that do not
        hold the objects (a seqlock); the callers hold the gates of ``changed``.

        ``readers``: the objects whose open datasets the clear makes stale (default ``changed``).
        """
        with self._state:
            # A seqlock: the epoch is odd while the clear runs. An open that overlaps any part
            # of this sees an odd or changed epoch, or has its dataset collected here as stale
            # (see opened_dataset, which registers before it reads the epoch). A read through an
            # open dataset (cloudio._gdal.open._io) sees the changed epoch and never uses its
            # handle again.
            for vsi in changed:
                self._epoch[vsi] = self._epoch.pop(vsi, 0) + 1  # re-inserted: in order of last write
            if len(self._epoch) > _TRACK_MAX:
                for old in list(self._epoch)[: _TRACK_MAX // 2]:
                    if not self._epoch[old] & 1:  # an odd one is mid-change (here or in another thread)
                        del self._epoch[old]
            for vsi in changed if readers is None else readers:
                stale = [r for r in list(self._readers.get(vsi, ())) if _is_open(r)]
                if stale:
                    self._mark_stale(vsi, stale)
        self.calls.clear(top)
        with self._state:
            for vsi in changed:
                self._epoch[vsi] = self._epoch.get(vsi, 0) + 1
        generation.bump()

    def _names_changed(self, key: str, d: _Dir, name: str) -> None:
        d.plans.clear()
        if d.gdal_listed:
            d.changed.add(name)
        for e in [e for e in d.empty_dir if e != name and name.startswith(e)]:
            self.calls.clear_path_options(f"{key}/{e}")  # EMPTY_DIR on e would also apply to the new name
            d.empty_dir.discard(e)
        generation.bump()

    def _unshadow(self, vsi: str) -> None:
        """Drop EMPTY_DIR options set on a name in a directory above ``vsi`` that is a string prefix of it.

        GDAL matches path options by string prefix: EMPTY_DIR on ``/vsigs/b/d/a`` also applies to
        ``/vsigs/b/d/ab/x.tif``, whose sidecars GDAL would then not see. The "directory" (``ab``) is a
        name in the listing above, so the plans made without it are dropped too.
        """
        i = vsi.rfind("/")
        while (i := vsi.rfind("/", 0, i)) > len("/vsigs"):
            key = vsi[:i]
            d = self._dirs.get(key)
            if d is None:
                continue
            seg = vsi[i + 1:vsi.index("/", i + 1)]
            if d.names is not None and seg not in d.names:
                d.names.add(seg)
                d.plans.clear()
            for e in [e for e in d.empty_dir if vsi.startswith(f"{key}/{e}")]:
                self.calls.clear_path_options(f"{key}/{e}")
                d.empty_dir.discard(e)

    def _apply_prefix(self, path: GCSPath) -> None:
        """Someone wrote at or below ``path`` (an object or a "directory"): forget all of it.

        Each object below with datasets open, GDAL I/O in flight (an open under way) or an epoch
        changes as for a write of it (:meth:`_object_changed`): its gate, its epoch, so that no
        dataset opened before reads through its old handle again (GDAL aborts on two versions of one
        URL). One clear of ``path`` then covers them and everything else below. An open of an object
        below that has none of these (never changed, no dataset registered yet) compares the prefix
        events instead (:meth:`_prefix_raced`): it may have read the old version from GDAL's cache
        before the clear, or put it back after.
        """
        top = path.vsi.rstrip("/")
        with self._state:
            start = self._prefix_event(top)
            self._prefix_active[start] = top
        try:
            self._prefix_cleared(top)
        finally:
            with self._state:
                del self._prefix_active[start]
                self._prefix_event(top)  # after the clear: an open that began before it sees this
        with self._state:
            for table in (self._seen, self._related):
                for url in [u for u in table if parse_gcs(u).is_under(path)]:
                    del table[url]
            for vsi in [v for v in self._gone if is_under(v, top)]:  # may be there again (cloudio.invalidate)
                del self._gone[vsi]
            for key in [k for k in self._dirs if is_under(k, top)]:
                for e in self._dirs.pop(key).empty_dir:
                    self.calls.clear_path_options(f"{key}/{e}")
            # the parent's set of names may have changed too (a new or deleted object at `path`)
            if path.key:
                pkey, _ = split_vsi(GCSPath(path.bucket, path.key.rstrip("/")))
                parent = self._dirs.get(pkey)
                if parent is not None:
                    parent.names = None
                    parent.listed_at = 0.0
                    self._names_changed(pkey, parent, _ANY)
        generation.bump()

    def _prefix_cleared(self, top: str) -> None:
        """The gates and epochs of the objects below ``top`` that readers may hold (:meth:`_apply_prefix`), and
        the clear of ``top``."""
        with self._state:
            below = [v for v in self._readers if v.startswith(top)]  # the clear's string prefix reaches these
            near = {*below, *(e for e in self._epoch if e.startswith(top))}
            changed = {v for v in near if is_under(v, top) and (
                v in self._epoch or any(_is_open(r) for r in list(self._readers.get(v, ()))))}
        changed.update(gates.in_flight(top))  # opens under way: not registered yet, maybe with no epoch
        ordered = sorted(changed)
        held: list[str] = []
        try:
            for vsi in ordered:
                gates.begin_change(vsi)
                held.append(vsi)
            # one clear: also drops GDAL's listings of top and below (an open that was under way registers its
            # dataset after its I/O: marked here if it did by now, else it sees the epoch moved)
            self._objects_cleared(top, ordered, readers=sorted({*below, *changed}))
        finally:
            for vsi in held:
                gates.end_change(vsi)

    def _prefix_event(self, top: str) -> int:
        """Number the start or the end of a prefix change of ``top`` (under ``_state``)."""
        self._prefix_seq += 1
        self._prefix_log.append((self._prefix_seq, top))
        return self._prefix_seq

    def prefix_seq(self) -> int:
        """Taken before an open, with :meth:`epoch`: see :meth:`opened_dataset`."""
        return self._prefix_seq

    def _prefix_raced(self, vsi: str, since: int) -> bool:
        """Did a prefix change at or above ``vsi`` start, end or run while an open that began at event ``since``
        ran? (Then what it read may be the old version, put back into GDAL's cache after the clear.)"""
        if self._prefix_seq == since and not self._prefix_active:  # the common case, lock-free
            return False
        with self._state:
            if any(is_under(vsi, top) for top in self._prefix_active.values()):
                return True
            log = self._prefix_log
            if log and log[0][0] > since + 1:  # events since then were dropped: any may have reached it
                return True
            for n, top in reversed(log):
                if n <= since:
                    return False
                if is_under(vsi, top):
                    return True
            return False

    # -- reads -----------------------------------------------------------------------------------

    def set_listing(self, path: GCSPath, names: Iterable[str] | None, listed_after: int | None = None) -> None:
        """Store cloudio's listing of ``path``'s directory (None: too long to use).

        ``listed_after``: the journal's ``seq`` before the listing was asked
        for. A change of the directory recorded since may be missing from it,
        and may have found no entry to update (the first listing of a
        directory): the names are then not kept, and GDAL lists for itself.
        """
        fresh = set(names) if names is not None else None
        key = dir_key(path)
        with self._state:  # a change recorded after this check finds the entry stored below
            if listed_after is not None and journal().seq != listed_after \
                    and journal().since(listed_after, path.parent.url):
                fresh = None
            d = self._dirs.setdefault(key, _Dir())
            if d.listed_at:  # a refresh (GDAL's own listing, gdal_listing) may find names ours lacks
                if d.names is None or fresh is None:
                    self._names_changed(key, d, _ANY)
                else:
                    for n in d.names ^ fresh:
                        self._names_changed(key, d, n)
            d.names = fresh
            d.plans.clear()
            d.listed_at = time.monotonic()
            d.forgot = False
            if fresh is not None:
                self._listed.pop(key, None)
                self._listed[key] = None
                if len(self._listed) > _DIRS_MAX:
                    self._bound_dirs()
        generation.bump()

    def _bound_dirs(self) -> None:
        """Drop the names of the directories listed longest ago, down to three quarters of :data:`_DIRS_MAX`
        (under ``_state``).

        A directory is forgotten, GDAL's listing of it cleared first; one with
        EMPTY_DIR options set keeps them, and what says so. Either way the next
        open there lists it again (one request), as after a change made
        elsewhere. (An open of that directory under way, which GDAL lets list,
        may put a listing back after the clear: cold directories, the oldest
        listed, are the ones dropped.)
        """
        # never the one just listed: the open that listed it plans with it next
        drop = min(len(self._listed) - 1, max(1, len(self._listed) - 3 * _DIRS_MAX // 4))
        for key in list(itertools.islice(self._listed, drop)):
            del self._listed[key]
            d = self._dirs.get(key)
            if d is None:
                continue
            if d.empty_dir:  # its options stay (at most _EMPTY_DIR_MAX of them), and what says so
                d.names, d.listed_at, d.forgot = None, 0.0, True
                d.plans.clear()
                if d.gdal_listed:
                    self._names_changed(key, d, _ANY)  # a change unseen meanwhile: GDAL lists it again
                continue
            if d.gdal_listed:  # GDAL's listing goes with it (and every byte cached below the directory)
                self.calls.clear(key)
            del self._dirs[key]

    @staticmethod
    def _remember(table: dict[str, Any], key: str, value: Any) -> None:
        """``table[key] = value``, the table kept in order of last change and to :data:`_TRACK_MAX` keys (the
        older half dropped: what was dropped is checked again, as if never seen)."""
        touch(table, key, value)
        if len(table) > _TRACK_MAX:
            drop_oldest(table, _TRACK_MAX // 2)

    def unchanged(self, t: Target) -> bool:
        """Can ``t`` be opened exactly as last time, with no bookkeeping? (the per-open fast path)

        True when it is not a VRT, its bucket's endpoint options are in force
        and nothing changed in its directory since it was last planned.
        """
        if t.vrt:
            return False
        d = self._dirs.get(t.dir)  # fast_plan, inlined: this runs on every open
        if d is None or d.changed or (self._reclear and t.vsi in self._reclear):
            return False
        planned = d.plans.get(t.name)
        if planned is False:
            ok = t.name in d.empty_dir
        elif planned is True:
            ok = d.gdal_listed and t.name not in d.empty_dir
        else:
            return False
        return ok and in_force(t.path.bucket)

    def fast_plan(self, t: Target) -> bool | None:
        """The plan of the last open of ``t`` when nothing changed in its directory since, else None.

        Lock-free (dictionary reads are atomic); a write racing with it
        completes after this read began, which may then miss it.
        """
        d = self._dirs.get(t.dir)
        if d is None or d.changed or (self._reclear and t.vsi in self._reclear):
            return None
        planned = d.plans.get(t.name)
        if planned is False and t.name in d.empty_dir:
            return False
        if planned is True and d.gdal_listed and t.name not in d.empty_dir:
            return True
        return None

    def plan_read(self, t: Target) -> bool | None:
        """Make GDAL's view of ``t``'s directory good enough to open ``t``.

        Returns whether GDAL will list the directory when opening ``t``
        (sidecars, a VRT, or a directory too long for cloudio to list), or
        :data:`NEEDS_LISTING` when cloudio's own listing must be fetched first
        (:meth:`set_listing`). When GDAL need not list, the path-specific option
        ``GDAL_DISABLE_READDIR_ON_OPEN=EMPTY_DIR`` is set on the object's path:
        it holds for this open without a ``rasterio.Env``, and GDAL never
        caches a listing of the directory.
        """
        planned = self.fast_plan(t)
        if planned is not None:
            return planned
        key, name = t.dir, t.name
        with self._state:
            d = self._dirs.get(key)
            if d is None or not d.listed_at:
                return NEEDS_LISTING
            gdal_lists = d.plans.get(name)
            if gdal_lists is None:
                gdal_lists = (
                    t.vrt
                    or d.names is None
                    or any(is_sidecar(n, name) for n in d.names)
                )
                d.plans[name] = gdal_lists
            if d.changed and d.gdal_listed and (gdal_lists or name in d.changed or _ANY in d.changed):
                self._clear_listing(key, d)
            stale = self._reclear.get(t.vsi)
            if stale is not None:
                self.calls.clear(t.vsi)  # whatever datasets older than the last write put back
                stale[:] = [r for r in stale if _is_open(r)]
                if not stale:  # all closed before this clear: nothing can put old bytes back
                    del self._reclear[t.vsi]
                generation.bump()
            if gdal_lists:
                d.gdal_listed = True
                if name in d.empty_dir:
                    self.calls.clear_path_options(f"{key}/{name}")
                    d.empty_dir.discard(name)
                self._unshadow(t.vsi)  # nor may EMPTY_DIR set on a shorter name above reach it
            elif name not in d.empty_dir:
                self.calls.set_path_option(f"{key}/{name}", _READDIR, "EMPTY_DIR")
                d.empty_dir.add(name)
                self._empty_dir_set(key, name)
            return gdal_lists

    def _empty_dir_set(self, key: str, name: str) -> None:
        """Count an EMPTY_DIR option just set; past :data:`_EMPTY_DIR_MAX`, the oldest still set is removed
        (its object's next open plans again: no request, its directory's names are kept).

        An open of that object planned with the option may be under way: GDAL,
        looking for sidecars once it read the header, then lists the directory.
        So the directory counts as one GDAL may have listed: a name added there
        later clears that listing at the next read that could see it.
        """
        self._empty_dirs.pop((key, name), None)
        self._empty_dirs[(key, name)] = None
        while len(self._empty_dirs) > _EMPTY_DIR_MAX:
            old_key, old_name = next(iter(self._empty_dirs))
            del self._empty_dirs[(old_key, old_name)]
            d = self._dirs.get(old_key)
            if d is not None and old_name in d.empty_dir:
                self.calls.clear_path_options(f"{old_key}/{old_name}")
                d.empty_dir.discard(old_name)
                d.plans.pop(old_name, None)
                d.gdal_listed = True
                generation.bump()

    # -- datasets that outlive the open ------------------------------------------------------------

    def epoch(self, t: Target) -> int:
        """Taken before an open; see :meth:`opened_dataset` (odd: a write is being applied)."""
        return self._epoch.get(t.vsi, 0)

    def opened_dataset(self, t: Target, ds: Any, epoch: int, since: int | None = None) -> int:
        """After an open: undo a race with a write, and remember the dataset while it lives; the epoch the
        dataset is to compare its reads with.

        If a write of the object was applied while GDAL was opening it, the
        bytes GDAL downloaded may be the old ones, now in its cache: clear
        them (the dataset keeps what it read). The dataset is kept by weak
        reference so that a later write knows it may still be downloading.
        ``since``: :meth:`prefix_seq` before the open; a prefix change of the
        object meanwhile is such a write, and the dataset's epoch is then
        :data:`RACED` (its object's epoch may not have moved).
        """
        vsi = t.vsi
        ref = weakref.ref(ds)
        readers = self._readers
        # registered before the epoch is compared (the write side does the reverse); lock-free:
        # a list is only ever replaced whole (by _prune_readers), so re-append if it was
        while True:
            refs = readers.get(vsi)
            if refs is None:
                with self._state:
                    refs = readers.setdefault(vsi, [])
                    if len(readers) > _TRACK_MAX:  # objects of many opens each: dropped when all are closed
                        self._drop_closed_readers(keep=vsi)
            refs.append(ref)
            if readers.get(vsi) is refs:
                break
        if len(refs) > _PRUNE_AT:
            self._prune_readers(vsi)
        if epoch & 1 or self._epoch.get(vsi, 0) != epoch:  # a write landed while GDAL was opening it
            raced = epoch
        elif since is not None and self._prefix_raced(vsi, since):  # or an invalidation reaching it
            raced = RACED
        else:
            return epoch
        with self._state:
            self._mark_stale(vsi, [ref])
        self.calls.clear(vsi)
        return raced

    def _prune_readers(self, vsi: str) -> None:
        with self._state:
            refs = self._readers.get(vsi)
            if refs is not None:
                self._readers[vsi] = [r for r in list(refs) if _is_open(r)]
            if len(self._readers) > _TRACK_MAX:
                self._drop_closed_readers()

    def _drop_closed_readers(self, keep: str = "") -> None:
        """Forget the objects whose datasets are all closed (under ``_state``)."""
        for key in [k for k, v in self._readers.items() if k != keep and not any(_is_open(r) for r in list(v))]:
            del self._readers[key]

    def has_stale_datasets(self, vsi: str) -> bool:
        """Is a dataset of ``vsi`` opened before its last change still open? (A shared open would get its
        handle.)"""
        return any(_is_open(r) for r in list(self._reclear.get(vsi, ())))

    def _mark_stale(self, vsi: str, refs: list[weakref.ref[Any]]) -> None:
        """Datasets of ``vsi`` that know an older version than the server now holds."""
        if vsi not in self._reclear and len(self._reclear) >= _RECLEAR_MAX:
            self._sweep()
        self._reclear.setdefault(vsi, []).extend(refs)
        generation.bump()

    def _sweep(self) -> None:
        """Forget objects whose stale datasets are all closed, clearing them one last time."""
        for vsi, refs in list(self._reclear.items()):
            if not any(_is_open(r) for r in refs):
                self.calls.clear(vsi)
                del self._reclear[vsi]
        generation.bump()

    def _clear_listing(self, key: str, d: _Dir) -> None:
        """The expensive one: GDAL's listing of ``key`` and every cached byte below it."""
        log.debug("gdal: listing of %s changed (%s); clearing the directory", key, sorted(d.changed)[:5])
        self.calls.clear(key)
        d.gdal_listed = False
        d.changed.clear()
        for k, other in self._dirs.items():  # the string prefix also matched these listings
            if k != key and k.startswith(key):
                other.gdal_listed = False
                other.changed.clear()
        generation.bump()

    def forget_listing(self, path: GCSPath) -> None:
        """GDAL holds a listing of ``path``'s directory we did not know about: clear it."""
        with self._state:
            key = dir_key(path)
            self._clear_listing(key, self._dirs.setdefault(key, _Dir()))

    def opened(self, files: Iterable[str]) -> None:
        """GDAL opened these files normally (VRT sources): it may have listed their directories."""
        with self._state:
            for f in files:
                if is_gcs(f):
                    p = parse_gcs(f)
                    if p.key:
                        self._dirs.setdefault(dir_key(p), _Dir()).gdal_listed = True
        generation.bump()

    def prepare_vrt(self) -> None:
        """Before GDAL opens a VRT: no GDAL listing in any bucket may be stale.

        Its sources may be new names anywhere, in any bucket; their directories
        are not known before GDAL opens them (lazily, while reading).
        """
        with self._state:
            for key, d in list(self._dirs.items()):
                if d.gdal_listed and d.changed:
                    self._clear_listing(key, d)

    # -- strong / bounded consistency ------------------------------------------------------------

    def last_check(self, url: str) -> tuple[int, float] | None:
        return self._seen.get(url)

    def revalidated(self, path: GCSPath, generations: dict[str, int]) -> bool:
        """The server lists ``generations`` for ``path``'s name and its sidecars: make GDAL's view match.

        An object or sidecar at another generation than GDAL's cache may hold
        is cleared (file-level); a sidecar that appeared or went away changes
        the directory's names, so that GDAL is told to look for it, or lists
        the directory again. Returns True when anything was cleared.
        """
        key = dir_key(path)
        with self._state:
            stale, added, removed, unknown = self._differences(path, generations)
            now = time.monotonic()
            for n, gen in generations.items():
                self._remember(self._seen, f"{path.parent.url}{n}", (gen, now))
            for n in removed:
                self._seen.pop(f"{path.parent.url}{n}", None)
            self._remember(self._related, path.url, frozenset(generations))
            d = self._dirs.get(key)
            if d is not None:
                if d.names is not None:
                    d.names |= added
                    d.names -= removed
                for n in added | removed:
                    self._names_changed(key, d, n)
                if unknown:
                    self._names_changed(key, d, _ANY)
        for n in sorted(stale | removed):
            self._object_changed(f"{key}/{n}")
        if unknown:  # sidecars gone since may be cached: whatever GDAL holds of names like the object's goes
            self._object_changed(f"{key}/{_stem(path.name)}")
        return bool(stale or added or removed or unknown)

    def is_current(self, path: GCSPath, generations: dict[str, int]) -> bool:
        """Would :meth:`revalidated` change nothing? (no side effect: a dataset may still be open)"""
        with self._state:
            return not any(self._differences(path, generations))  # names unknown: not current

    def _differences(self, path: GCSPath, generations: dict[str, int]) -> tuple[set[str], set[str], set[str], bool]:
        """(names at a generation GDAL may not hold, sidecars new, sidecars gone, whether the names before are
        unknown) since the last check.

        Unknown: the check of the object and the listing of its directory were
        both dropped (:meth:`_remember`, :meth:`_bound_dirs`), and GDAL may hold
        a sidecar gone since. (Never made, nothing of cloudio's making is in
        GDAL's cache to be wrong.)
        """
        key, name = split_vsi(path)
        parent = path.parent.url
        stale = set()
        for n, gen in generations.items():
            seen = self._seen.get(f"{parent}{n}")
            if seen is None or seen[0] != gen:
                stale.add(n)
        before = self._related.get(path.url)
        if before is None:
            d = self._dirs.get(key)
            if d is None or d.names is None:
                return stale, set(), set(), d is not None and d.forgot
            before = frozenset(n for n in d.names if n == name or is_sidecar(n, name))
        now = set(generations)
        return stale, now - before, set(before - now), False

    def gone(self, files: list[str]) -> list[str]:
        """Those of ``files`` (``/vsigs/`` paths) deleted through cloudio and not written since."""
        return [f for f in files if f in self._gone]

    def mark_unknown(self, path: GCSPath) -> None:
        """GDAL may now cache ``path`` at a generation we did not check."""
        with self._state:
            self._seen.pop(path.url, None)

    # -- listings through GDAL -------------------------------------------------------------------

    def gdal_listing(self, path: GCSPath) -> list[str]:
        """GDAL's listing of the directory ``path`` names, fresh with respect to the journal.

        What GDAL cached for the directory is cleared first when names were
        added or removed under it since GDAL last listed it, or when cloudio
        does not know whether GDAL holds an older listing.
        """
        probe = GCSPath(path.bucket, (path.key.rstrip("/") + "/x") if path.key else "x")
        key = dir_key(probe)
        with self._state:
            d = self._dirs.setdefault(key, _Dir())
            if d.changed or not d.gdal_listed:
                self._clear_listing(key, d)
            d.gdal_listed = True
        names = self.calls.listdir(key)
        self.set_listing(probe, names)
        with self._state:
            d.changed.clear()  # GDAL's listing was just made: nothing it lacks
        return names


def _stem(name: str) -> str:
    """``name`` without its extension: GDAL's sidecars of it start with this (``a.tif.ovr``, ``a.tfw``)."""
    return name.rsplit(".", 1)[0] if "." in name else name


def _is_open(ref: weakref.ref[Any]) -> bool:
    ds = ref()
    return ds is not None and not ds.closed


consumer: GdalConsumer = journal().register(GdalConsumer())  # type: ignore[assignment]


def _renew_lock() -> None:
    consumer._state = threading.RLock()


# held across a fork: a thread applying a change or planning an open then is not in the child, and the lock copied
# held by it would stop the child's first write and open through the GDAL face for good. Taken before the journals'
# (set_listing asks the journal under it): see cloudio._threads.FORK_ORDER
hold_across_fork("gdal consumer", lambda: (consumer._state,), _renew_lock)


def listdir(url: str) -> list[str]:
    """GDAL's listing of a directory (``VSIReadDir``), fresh with respect to the journal."""
    path = parse_gcs(url)
    ensure_endpoint(path.bucket)
    return consumer.gdal_listing(path)


def reset() -> None:
    """Remove every path option cloudio set, and what GDAL and cloudio cached of those buckets.

    For :func:`cloudio._state.reset`. Bookkeeping of datasets still open
    (epochs, readers) is kept: it guards their reads.
    """
    reset_endpoints()
    with consumer._state:
        for key, d in consumer._dirs.items():  # longer than the buckets' prefixes: not cleared with them
            for name in d.empty_dir:
                consumer.calls.clear_path_options(f"{key}/{name}")
        consumer._empty_dirs.clear()
        consumer._listed.clear()
        consumer._dirs.clear()
        consumer._seen.clear()
        consumer._related.clear()
        consumer._gone.clear()
    generation.bump()
