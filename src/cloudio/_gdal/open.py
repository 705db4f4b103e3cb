"""``cloudio.open``: ``rasterio.open`` that reads what was last written.

The flow of a read of a GCS object::

    journal changes ──(applied at write time)──► GDAL caches (cloudio._gdal.consumer)
    cloudio.open(url)
      1. normalise the URL; point /vsigs/<bucket> at the emulator if one is in force
      2. consistency "strong" / N seconds: one listing of the object and its sidecars -> clear
         what changed (a VRT's sources are checked after it opened: one listing each, and the
         sources of a source that is itself a VRT, to a bounded depth)
      3. plan: cloudio's listing of the directory (fetched once) says whether
         GDAL must list it (sidecars, VRT) or may skip it (EMPTY_DIR)
      4. rasterio.open("/vsigs/b/k") with the plan's options
      5. on failure only: diagnose (object / bucket missing) or retry once
         after clearing a directory listing GDAL held behind cloudio's back
         (and the object's own cache: a reset mid-download leaves part of a
         range there, which GDAL would serve to every later open)

The dataset returned reads lazily; its ``read``/``read_masks``/``dataset_mask``
do the same on failure: clear the object's GDAL cache, retry once, and raise
a :class:`~cloudio.errors.CloudioError` naming the URL (``TransientError``
for 5xx/429, resets and timeouts, which GDAL itself already retried, see
:func:`cloudio._config.gdal_http_options`), with GDAL's error as the cause.
These errors are also :class:`rasterio.errors.RasterioIOError`, so code written
for :func:`rasterio.open` keeps catching them.

Its GDAL I/O (open, reads, ``files``, ``overviews``, close) runs on the shared
side of the object's gate (:data:`cloudio._gdal.gates.gates`), so that no write
of the object through cloudio changes it on the server meanwhile (GDAL 3.10
and 3.12 corrupt their heap when handles of one URL see two versions). A read
through a dataset opened before such a write never touches the old handle: it
is done from a fresh open of the object (the new version) when the layout is
the same, and raises :class:`~cloudio.errors.StaleDatasetError` otherwise.
Never a torn read, never a crash.

Writes (``"w"``, ``"w+"``, ``"r+"``) go to :mod:`cloudio._gdal.write`, which
renders locally and uploads on close. Local paths, file objects and other
inputs go straight to :func:`rasterio.open`.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import time
from typing import Any

import rasterio
import rasterio.env
from fsspec.asyn import sync
from rasterio.errors import RasterioIOError
from rasterio.io import DatasetReader

from cloudio import _config, _state
from cloudio._gcs.client import (
    bounded,
    gcs_filesystem,
    is_http_error,
    is_transient,
    not_found,
    object_metadata,
    transient_error,
    where,
)
from cloudio._gcs.fast import list_objects, range_status
from cloudio._gdal import bindings, endpoint, generation
from cloudio._gdal.consumer import LISTING_LIMIT, NEEDS_LISTING, consumer
from cloudio._gdal.endpoint import ensure_endpoint
from cloudio._gdal.gates import gates as _gates
from cloudio._gdal.targets import Target, is_sidecar, may_reference, target
from cloudio._journal import journal
from cloudio._paths import GCSPath, is_gcs, parse_gcs
from cloudio._session import Consistency, count, current_level
from cloudio.errors import (
    CloudioError,
    ConfigurationError,
    InvalidURLError,
    ObjectNotFoundError,
    ReadError,
    StaleDatasetError,
    TransientError,
)

log = logging.getLogger(__name__)

__all__ = ["open"]

_WRITE_MODES = ("w", "w+", "r+")
#: what GDAL says when the server or the network failed (after GDAL's own retries)
_TRANSIENT = re.compile(
    r"HTTP (?:response )?code:? *(?:429|5\d\d)|timed? ?out|timeout|reset|transfer closed|Connection|"
    r"Could(?:n't| not) (?:connect|resolve)|Recv failure|Send failure|Empty reply|SSL",
    re.IGNORECASE,
)


class TransientReadError(TransientError, RasterioIOError):  # type: ignore[misc]
    """A :class:`TransientError` that code catching rasterio's own read errors also catches."""


class DatasetReadError(ReadError, RasterioIOError):  # type: ignore[misc]
    """A :class:`ReadError` that code catching rasterio's own read errors also catches."""


class StaleDatasetReadError(StaleDatasetError, RasterioIOError):  # type: ignore[misc]
    """A :class:`StaleDatasetError` that code catching rasterio's own read errors also catches."""


#: the consumer's object epochs, read directly on the per-open fast path
_epochs = consumer._epoch
#: reads of a dataset whose object keeps changing under them, before giving up
_READ_ATTEMPTS = 4


def _through_io(method: Any) -> Any:
    """``method`` of rasterio's reader, run through :func:`_io`."""

    @functools.wraps(method)
    def run(self: Any, *args: Any, **kwargs: Any) -> Any:
        return _io(self, method, args, kwargs)

    return run


def _through_io_property(name: str) -> Any:
    """The property ``name`` of rasterio's reader, read through :func:`_io`."""
    getter = getattr(DatasetReader, name).__get__
    return property(lambda self: _io(self, getter, (), {}), doc=getattr(DatasetReader, name).__doc__)


class _Reader(DatasetReader):  # type: ignore[misc]
    """What cloudio.open returns for reading: rasterio's reader, made safe against writes in this process.

    GDAL I/O runs inside the object's gate (shared). A read after an overwrite
    goes to a fresh open (see :func:`_io`).
    A failed read clears the object's GDAL cache (where a reset or a timeout
    may have left part of a range) and is retried once; a second failure
    raises cloudio's error naming the URL.
    """

    _cloudio_target: Target
    #: the object's epoch when the open began, or RACED: an invalidation reached it meanwhile (see
    #: GdalConsumer.opened_dataset)
    _cloudio_epoch: int
    _cloudio_open: tuple[str | None, dict[str, Any]] = (None, {})  #: driver and options it was opened with
    _cloudio_fresh: _Reader | None = None  #: a later open of the object that reads go to

    @property  # type: ignore[override]
    def name(self) -> str:
        """As rasterio names the user's spelling (GDAL itself opened the ``/vsigs/`` path: cheaper)."""
        return self._cloudio_target.shown

    files = _through_io_property("files")
    # every method that makes GDAL read the object goes through _io (the object's gate, a retry of a
    # poisoned read, a fresh open when the object changed since this dataset was opened)
    read = _through_io(DatasetReader.read)
    read_masks = _through_io(DatasetReader.read_masks)
    dataset_mask = _through_io(DatasetReader.dataset_mask)
    checksum = _through_io(DatasetReader.checksum)
    statistics = _through_io(DatasetReader.statistics)
    stats = _through_io(DatasetReader.stats)
    overviews = _through_io(DatasetReader.overviews)  # GDAL reads overview IFDs, .ovr on first use
    # metadata GDAL holds per handle: after an overwrite, the new version's with its pixels
    tags = _through_io(DatasetReader.tags)
    get_tag_item = _through_io(DatasetReader.get_tag_item)
    tag_namespaces = _through_io(DatasetReader.tag_namespaces)
    colormap = _through_io(DatasetReader.colormap)
    descriptions = _through_io_property("descriptions")
    units = _through_io_property("units")
    colorinterp = _through_io_property("colorinterp")
    mask_flag_enums = _through_io_property("mask_flag_enums")
    gcps = _through_io_property("gcps")  # georeferencing _layout does not compare: the new pixels' own
    get_gcps = _through_io(DatasetReader.get_gcps)
    rpcs = _through_io_property("rpcs")
    # rasterio's compression, interleaving, photometric, subdatasets and profile ask self.tags()

    # close is rasterio's own, outside the gate: GDAL's close of a reader does no I/O of the object
    # (checked in the emulator's log, tests/test_open_read.py); at most it uploads a .aux.xml
    # sidecar that statistics() made (PAM), which is another object and never was gated.


class _RenewedReader(_Reader):
    """A :class:`_Reader` whose reads go to a fresh open (see :func:`_renew`), closed with it."""

    def close(self) -> None:
        fresh, self._cloudio_fresh = self._cloudio_fresh, None
        if fresh is not None:
            fresh.close()
        DatasetReader.close(self)


def _reader(ds: Any, t: Target, epoch: int, driver: str | None = None, kwargs: dict[str, Any] | None = None) -> Any:
    """Make a plain DatasetReader a :class:`_Reader` (same object, same layout: a class swap)."""
    if type(ds) is DatasetReader:
        ds.__class__ = _Reader
        d = ds.__dict__  # item by item: no keyword dict built on the per-open path
        d["_cloudio_target"] = t
        d["_cloudio_epoch"] = epoch
        if t.vrt:
            d["_cloudio_sources"] = sources = _source_epochs(ds, t)
            d["_cloudio_gated"] = sorted({t.vsi, *(f for f, _ in sources)})  # the gates its reads hold (_io)
        if driver is not None or kwargs:
            ds._cloudio_open = (driver, kwargs or {})
    return ds


def _source_epochs(ds: Any, t: Target) -> tuple[tuple[str, int], ...]:
    """The epochs of the GCS sources of the VRT ``ds`` as it opens: a write of one through cloudio changes its
    epoch, and :func:`_io` then reads through a fresh open (GDAL keeps a VRT's sources open with it)."""
    epochs = consumer._epoch
    walked = _walked.get(t.vsi)  # nested VRTs' sources too, as the open walked them
    named = walked if walked is not None else [f for f in _files(ds, t) if f != t.vsi and f.startswith("/vsigs/")]
    return tuple((f, epochs.get(f, 0)) for f in named)


def _sources_changed(src: Any) -> bool:
    epochs = consumer._epoch
    return any(epochs.get(f, 0) != e for f, e in src.__dict__.get("_cloudio_sources", ()))


def _io(ds: _Reader, fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """``fn(ds, ...)`` inside the object's gate, through a handle opened since the object's last change.

    The object's epoch (:class:`cloudio._gdal.consumer.GdalConsumer`) is compared
    inside the gate, where no write through cloudio can change it: a handle
    opened before a change never does I/O again (GDAL would mix two versions
    in its cache, and crash); the read goes to a fresh open instead. The
    epoch is compared once more after the read, for a write that gave up
    waiting for it (:data:`cloudio._gdal.gates.CHANGE_WAIT`).
    """
    epochs = consumer._epoch
    vsi = ds._cloudio_target.vsi
    src = ds._cloudio_fresh or ds
    if ds.closed:  # rasterio's own error: a closed dataset reads nothing, not a fresh open kept open
        return fn(ds, *args, **kwargs)
    for _ in range(_READ_ATTEMPTS):
        gated = src.__dict__.get("_cloudio_gated") or [vsi]  # a VRT's: its GCS sources' too (_reader)
        _gates.enter_all(gated)
        try:
            before = epochs.get(vsi, 0)
            if before != src._cloudio_epoch or before & 1 or _sources_changed(src):
                out, failed, current = None, None, False
            else:
                current = True
                try:
                    out = fn(src, *args, **kwargs)
                except RasterioIOError as e:
                    failed = e
                else:
                    failed = None
        finally:
            _gates.exit_all(gated)
        if not current:
            src = _renew(ds)  # outside the gate: it may list the directory and waits for writes
            continue
        if failed is not None:
            out = _retry_read(src, failed, fn, args, kwargs)
        if out is not _CHANGED and epochs.get(vsi, 0) == before and not _sources_changed(src):
            return out
    raise _stale(ds._cloudio_target, f"it kept changing during each of {_READ_ATTEMPTS} reads")


def _renew(ds: _Reader) -> _Reader:
    """A fresh open of ``ds``'s object, kept to close with ``ds``; the same layout, or StaleDatasetError."""
    t = ds._cloudio_target
    driver, kwargs = ds._cloudio_open
    fresh: _Reader = _open_read(t, driver, False, kwargs)
    try:
        same = _layout(fresh) == _layout(ds)
    except BaseException:
        fresh.close()
        raise
    if not same:
        fresh.close()
        raise _stale(t, "the new version's size, bands, data types, blocks or georeferencing differ from the "
                        "dataset's")
    old, ds._cloudio_fresh = ds._cloudio_fresh, fresh
    ds.__class__ = _RenewedReader  # only such datasets pay for a close of their own
    if old is not None:
        old.close()
    log.debug("%s: overwritten while open; reading from a fresh open of it", t.path.url)
    return fresh


def _layout(ds: DatasetReader) -> tuple[Any, ...]:
    """What a dataset reports without reading pixels: a fresh open must match it, or new pixels would
    come with the old georeferencing (NaN nodata compared as equal)."""
    nodata = tuple("nan" if v != v else v for v in ds.nodatavals)
    return (ds.width, ds.height, ds.count, ds.dtypes, ds.block_shapes, ds.transform, ds.crs, nodata,
            ds.scales, ds.offsets)


def _stale(t: Target, why: str) -> StaleDatasetReadError:
    return StaleDatasetReadError(
        f"{t.path.url}: changed on the server while this dataset was open (a write through cloudio, or "
        f"another writer's change cloudio learnt of; {why}); reopen it with cloudio.open."
    )


#: what :func:`_retry_read` returns when the object changed before the retry (read from a fresh open)
_CHANGED: Any = object()


def _retry_read(ds: _Reader, first: RasterioIOError, fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Clear what the failed read left in GDAL's cache, then read once more; :data:`_CHANGED` if overwritten.

    A VRT's pixels come from its sources: a download cut short leaves its part of a range under the source's
    path, not the VRT's, so the sources are cleared too (else the retry, and every later open, reads the same
    short range), and the retry holds their gates as the first read did (:func:`_io`).
    """
    t = ds._cloudio_target
    gated = ds.__dict__.get("_cloudio_gated") or [t.vsi]  # a VRT's: its GCS sources' too (_reader)
    log.info("%s: read failed (%s); clearing GDAL's cache of it and retrying once", t.path.url, first)
    _gates.enter_all(gated)
    try:
        if consumer._epoch.get(t.vsi, 0) != ds._cloudio_epoch or _sources_changed(ds):
            return _CHANGED  # meanwhile: this handle must not read again
        for vsi in gated:
            bindings.clear(vsi)
        return fn(ds, *args, **kwargs)
    except RasterioIOError as e:
        raise _read_error(t, e, ds=ds) from e
    finally:
        _gates.exit_all(gated)


def _messages(e: BaseException) -> str:
    """The text of ``e`` and of the errors it was raised from (rasterio chains GDAL's own there)."""
    out: list[str] = []
    cur: BaseException | None = e
    for _ in range(8):
        if cur is None:
            break
        text = str(cur)
        if text not in out:  # rasterio chains GDAL's one message several times
            out.append(text)
        cur = cur.__cause__ or cur.__context__
    return " <- ".join(out)


#: a block GDAL could not fetch whole, even after clearing its cache and retrying
_SHORT_READ = re.compile(r"got \d+ bytes, expected \d+")


def _said(e: BaseException, t: Target) -> str:
    """GDAL's messages with the object's own path cut out: ``preset.tif`` is not a reset."""
    text = _messages(e)
    for p in (t.vsi, t.path.url, t.shown):
        text = text.replace(p, "")
    # rasterio names a block's failure by the bare name: cut where it stands alone ("t" is no word of "timeout")
    return re.sub(rf"(?<![\w.-]){re.escape(t.path.name)}(?![\w.-])", "", text)


def _is_transient(e: BaseException, t: Target) -> bool:
    """Did the server or network fail (after GDAL's own retries)?"""
    text = _said(e, t)
    return _TRANSIENT.search(text) is not None or _SHORT_READ.search(text) is not None


def _asked(t: Target, e: BaseException) -> tuple[int | None, int | None]:
    """For a read GDAL reports only as short (no status in its message): the status with which the server
    answers a one-byte GET of the object now, and the object's size (one request, within the per-request time
    limit); (None, None) for any other failure, or when the server did not answer."""
    text = _said(e, t)
    if _SHORT_READ.search(text) is None or _TRANSIENT.search(text) is not None:
        return None, None
    try:
        return range_status(gcs_filesystem(), t.path)
    except Exception as oe:  # the network itself: transient, as the message says
        log.debug("could not ask %s for its first byte: %s", t.path.url, oe)
        return None, None


#: rasterio's name for the block a read failed at
_FAILED_BLOCK = re.compile(r"band (\d+): IReadBlock failed at X offset (\d+), Y offset (\d+)")


def _cut_short(t: Target, e: BaseException, ds: DatasetReader | None, stored: int | None) -> str | None:
    """For a short read of a GeoTIFF's block (as a broken download reads): where the header places that block,
    when it lies past the end of the object the server holds (``stored`` bytes), which no retry mends;
    otherwise None."""
    block = _FAILED_BLOCK.search(_said(e, t))
    if ds is None or block is None or stored is None:
        return None
    band, x, y = (int(g) for g in block.groups())
    try:
        offset = DatasetReader.get_tag_item(ds, f"BLOCK_OFFSET_{x}_{y}", "TIFF", bidx=band)
        size = DatasetReader.get_tag_item(ds, f"BLOCK_SIZE_{x}_{y}", "TIFF", bidx=band)
    except Exception as oe:  # not a GeoTIFF's block: the caller's diagnosis stands
        log.debug("could not place the block %s of %s: %s", (band, x, y), t.path.url, oe)
        return None
    if offset is None or size is None or int(offset) + int(size) <= stored:
        return None
    return (f"its header places band {band}'s block ({x}, {y}) at bytes {offset}-{int(offset) + int(size) - 1}, "
            f"but {where()} holds {stored} bytes of it")


def _transient(t: Target, e: BaseException) -> TransientReadError:
    return TransientReadError(
        f"{t.path.url}: {where()} did not answer in time or failed (HTTP 5xx/429, reset or timeout), "
        f"even after GDAL's retries and one more after clearing its cache: {_messages(e)}. "
        "Retry later; if the server is slow rather than down, raise CLOUDIO_HTTP_TIMEOUT (seconds)."
    )


def _read_error(t: Target, e: RasterioIOError, driver: str | None = None,
                ds: DatasetReader | None = None) -> CloudioError:
    """cloudio's error for a GDAL failure that survived a clear and a retry (``e`` becomes its cause); an open
    with ``driver`` given names it; a read of the dataset ``ds`` may show the object cut short."""
    status, stored = _asked(t, e)
    if status in (401, 403):
        return DatasetReadError(
            f"{t.path.url}: {where()} refused to read it (HTTP {status}) while GDAL read its bytes: "
            f"{_messages(e)}. Check that your credentials may read it, then read again."
        )
    cut = _cut_short(t, e, ds, stored)
    if cut is not None:
        return DatasetReadError(
            f"{t.path.url} is truncated: {cut}. No retry will read it (an interrupted upload or copy stored "
            "it cut short?): write it again."
        )
    if _is_transient(e, t):
        return _transient(t, e)
    try:
        object_metadata(t.path)
    except FileNotFoundError:
        return not_found(t.path)
    except Exception as oe:  # the server is unreachable or refuses (gcsfs's HttpError too)
        if not failed_request(oe):
            raise
        log.debug("could not diagnose %s: %s", t.path.url, oe)
        return _transient(t, e)
    if driver is not None:
        return DatasetReadError(
            f"{t.path.url} exists on {where()} but GDAL could not open it with driver={driver!r}: {_messages(e)}. "
            "Check the driver (leave it out to let GDAL choose), or that it is a complete raster."
        )
    return DatasetReadError(
        f"{t.path.url} exists on {where()} but GDAL could not read it: {_messages(e)}. "
        "Check that it is a complete raster in a format GDAL reads (download it and open it locally)."
    )


def open(
    fp: Any,
    mode: str = "r",
    driver: str | None = None,
    width: int | None = None,
    height: int | None = None,
    count: int | None = None,
    crs: Any = None,
    transform: Any = None,
    dtype: Any = None,
    nodata: Any = None,
    sharing: bool = False,
    opener: Any = None,
    **kwargs: Any,
) -> DatasetReader:
    """Open a dataset for reading or writing, like :func:`rasterio.open`, fresh.

    Parameters
    ----------
    fp
        ``gs://bucket/key``, ``/vsigs/bucket/key``, an ``https://storage.googleapis.com``
        URL, or anything :func:`rasterio.open` accepts (local paths, file
        objects), which is passed to it unchanged.
    mode, driver, width, height, count, crs, transform, dtype, nodata, sharing, opener, **kwargs
        As for :func:`rasterio.open` (``thread_safe`` with rasterio >= 1.5
        travels in ``kwargs``).

    Returns
    -------
    rasterio.io.DatasetReader or DatasetWriter
        What :func:`rasterio.open` returns. A dataset read lazily, after this
        call returned and in any thread, still reads from the same server.

    Raises
    ------
    ObjectNotFoundError
        The object does not exist (also a ``FileNotFoundError``); the message
        names the URL. The error from rasterio is the ``__cause__``.
    BucketNotFoundError
        The bucket does not exist.
    InvalidURLError
        A malformed GCS URL.
    TransientError
        The server or network kept failing (5xx, 429, resets, timeouts) past
        GDAL's retries and one more of cloudio's; also raised by the dataset's
        reads. Retry later.
    ReadError
        The object exists but GDAL cannot read it (not a raster, truncated).
    ConfigurationError
        A mode that does not exist, or a VRT opened for writing (use
        :func:`cloudio.write_vrt`).

    Notes
    -----
    At the ``"session"`` level (default) a read sees every write journaled in
    this process (through cloudio, or announced with
    :func:`cloudio.invalidate`) and makes no extra request. ``"strong"`` adds
    one listing request per open, which catches writes made anywhere to the
    object and to its sidecars (``.ovr``, ``.aux.xml``, ``.msk``), and one
    per source of a VRT (also of the VRTs among its sources); a number of seconds makes those requests only when
    the last check is older.
    """
    if mode != "r" and mode not in _WRITE_MODES:
        raise ConfigurationError(
            f"{fp!r}: mode {mode!r} does not exist; rasterio's modes are 'r' (read), 'w' (write a new "
            "dataset), 'w+' (write, then read back) and 'r+' (update). There is no 'b': datasets are binary."
        )
    if driver and not isinstance(driver, str):
        raise TypeError(f"invalid driver: {driver!r}")  # rasterio.open's own refusal, before cloudio reads it
    if type(fp) is str and not fp.strip():
        raise InvalidURLError(f"the URL is empty ({fp!r}); give gs://bucket/key (or a local path)")
    t = _parsed.get(fp) if type(fp) is str else None  # the fast path: a URL read before
    if t is None and opener is None:
        t = _target(fp)
    if t is None or opener is not None:
        _configure_wrapped(fp)
        return rasterio.open(
            fp, mode, driver=driver, width=width, height=height, count=count, crs=crs,
            transform=transform, dtype=dtype, nodata=nodata, sharing=sharing, opener=opener, **kwargs,
        )
    if mode == "r":
        c = consumer
        vsi = t.vsi
        if driver is None and not kwargs and (
            (_memo.get(vsi) == _generation[0] and _as_before()) or _unchanged(t)
        ):
            # the common case, kept cheap: read before, nothing written since, nothing to check
            epoch = _epochs.get(vsi, 0)  # see GdalConsumer.opened_dataset
            since = c._prefix_seq
            _gates.enter(vsi)
            try:
                dataset = rasterio.open(vsi, sharing=True) if sharing else rasterio.open(vsi)
            except RasterioIOError:
                dataset = None
            finally:
                _gates.exit(vsi)
            if dataset is None:
                dataset = _open_read(t, driver, sharing, kwargs)
            else:
                epoch = c.opened_dataset(t, dataset, epoch, since)
                if type(dataset) is DatasetReader:  # _reader(), inlined
                    dataset.__class__ = _Reader
                    d = dataset.__dict__
                    d["_cloudio_target"] = t
                    d["_cloudio_epoch"] = epoch
        else:
            dataset = _open_read(t, driver, sharing, kwargs)
        next(_state.opens)  # count("opens"), lock-free
        return dataset
    if t.name.lower().endswith(".vrt") or (driver or "").upper() == "VRT":
        raise ConfigurationError(
            f"{t.path.url}: GDAL cannot write or update a VRT on GCS (mode {mode!r}). Build the VRT "
            "with rasterio (e.g. rasterio.vrt.WarpedVRT, or locally) and save it with "
            "cloudio.write_vrt(dataset_or_vrt, url), which also makes its sources absolute /vsigs/ paths."
        )
    from cloudio._gdal.write import open_write

    return open_write(
        t.path, mode, driver, width=width, height=height, count=count, crs=crs,
        transform=transform, dtype=dtype, nodata=nodata, sharing=sharing, **kwargs,
    )



# the public function shadows the builtin and the parameter `count` shadows the counter
_count = count

#: os.environ's own mapping (None off POSIX: then every open takes :func:`_unchanged`)
_ENV: dict[bytes, bytes] | None = _config._ENV_DATA
_stack = _state.endpoints
_session = _state.current_session
_sessions = _state.open_sessions
_rio_local = rasterio.env.local
#: vsi path -> the generation (:mod:`cloudio._gdal.generation`) at which it was last found unchanged
_memo: dict[str, int] = {}
_generation = generation.current


def _as_before() -> bool:
    """Is everything outside cloudio's bookkeeping as when the memo was made? (the per-open fast path)

    The level is "session", no ``rasterio.Env`` is entered, and the endpoint
    state (:func:`cloudio._config.endpoint_state`, inlined: no calls) is the
    one applied last. Anything else, or a state this does not spell like
    ``endpoint_state``, takes :func:`_unchanged`, which is always right.
    """
    env = _ENV
    if env is None or _rio_local._env is not None:
        return False
    s = _session.get()
    if s is None:
        if _sessions or env.get(b"CLOUDIO_CONSISTENCY") is not None:
            return False
    elif s.consistency != "session":
        return False
    return (  # type: ignore[no-any-return]
        ((_stack[-1] if _stack else None), env.get(b"STORAGE_EMULATOR_HOST"), env.get(b"CLOUDIO_HTTP_TIMEOUT")),
        (),
    ) == endpoint.last_applied[0]


def _unchanged(t: Target) -> bool:
    """The full check that ``t`` may be opened as last time; remembers a yes for :func:`_as_before`."""
    g = _generation[0]  # read before the check: a change during it bumps the generation after
    if not (consumer.unchanged(t) and current_level() == "session"):
        return False
    if _as_before():
        if len(_memo) >= _PARSED_MAX:
            _memo.clear()
        _memo[t.vsi] = g
    return True


#: parsed gs:// and /vsigs/ spellings (their meaning never changes): a dict lookup per open
_parsed: dict[str, Target] = {}
_PARSED_MAX = 10_000


#: a GCS object inside another GDAL path (``/vsizip//vsigs/b/a.zip/x.tif``, rasterio's ``zip+gs://b/a.zip!x.tif``)
_WRAPPED_BUCKET = re.compile(r"(?:/vsigs(?:_streaming)?/|\+gs://)([^/!]+)/")


def _configure_wrapped(fp: Any) -> None:
    """Set the GDAL options of the bucket of a GCS object wrapped in another GDAL path (an archive member),
    or named as a source by a local VRT: without them GDAL would ask Google for it, unsigned. Such paths go
    to rasterio as they are."""
    if isinstance(fp, (str, os.PathLike)):
        s = os.fspath(fp)
        m = _WRAPPED_BUCKET.search(s)
        if m is not None:
            ensure_endpoint(m.group(1))
        elif may_reference(s) and os.path.isfile(s):
            _configure_buckets(_local_vrt_sources(s))


def _local_vrt_sources(local: str, depth: int = 0) -> list[GCSPath]:
    """The GCS objects a local VRT names as its sources, and those of the local VRTs among them
    (:data:`_VRT_DEPTH` levels at most; [] when it is not VRT XML)."""
    import xml.etree.ElementTree as ET

    from cloudio._gdal.vrt import source_elements

    try:
        root = ET.parse(local).getroot()
    except (ET.ParseError, OSError):  # not a VRT: GDAL says what it is
        return []
    found: list[GCSPath] = []
    for el in source_elements(root):
        name = (el.text or "").strip()
        if is_gcs(name):
            found.append(parse_gcs(name))
        elif depth < _VRT_DEPTH and may_reference(name):
            inner = os.path.join(os.path.dirname(local), name) if el.get("relativeToVRT") == "1" else name
            found += _local_vrt_sources(inner, depth + 1)
    return found


_VSICURL = "/vsicurl/"


def _target(fp: Any) -> Target | None:
    """The object ``fp`` names, or None when ``fp`` is not a GCS URL (rasterio's business). GDAL's ``/vsicurl/``
    of a GCS object's HTTP URL (Google's, or the emulator's) names that object: read as such, not left to GDAL's
    own caches (stale after an overwrite) and endpoint (Google's, with an emulator in force)."""
    if not isinstance(fp, (str, os.PathLike)):
        return None
    s = os.fspath(fp)
    if s.startswith(_VSICURL) and s[len(_VSICURL):].startswith(("http://", "https://")) and is_gcs(s[len(_VSICURL):]):
        return target(parse_gcs(s[len(_VSICURL):], require_key=True), s)
    if not is_gcs(s):
        return None
    t = target(parse_gcs(s, require_key=True), s)
    if s.startswith(("gs://", "/vsigs/")):  # http(s) spellings depend on the emulator in force
        if len(_parsed) >= _PARSED_MAX:
            _parsed.clear()
        _parsed[s] = t
    return t


def _open_read(t: Target, driver: str | None, sharing: bool, kwargs: dict[str, Any]) -> DatasetReader:
    _config.require_credentials(t.path.url)  # named here: the first request may be a listing, made elsewhere
    ensure_endpoint(t.path.bucket)
    level = current_level()
    if level != "session":
        _revalidate(t.path, _max_age(level))
    try:
        return _gdal_open(t, driver, sharing, kwargs, level)
    except RasterioIOError as e:
        vrt = t.vrt or (driver or "").upper() == "VRT"
        if _is_transient(e, t):  # GDAL retried already; what it cached of the object may be partial
            bindings.clear(t.vsi)
            if vrt:  # or of a source it opened (no request here: the server is failing)
                _clear_sources(t, ())
        else:
            # off the happy path: now, and only now, ask the server what is wrong
            _raise_if_missing(t, e)
            # the object exists: GDAL answered from a listing made behind cloudio's back, or
            # from part of a range a broken download left (the directory clear drops both)
            consumer.forget_listing(t.path)
            if vrt:  # a range of a source cut short, as a warped VRT opens its source with it
                _clear_sources(t, _configure_from_xml(t))
        try:
            return _gdal_open(t, driver, sharing, kwargs, level)
        except RasterioIOError as e2:
            raise _read_error(t, e2, driver) from e2


def _gdal_open(t: Target, driver: str | None, sharing: bool, kwargs: dict[str, Any],
               level: Consistency = "session") -> DatasetReader:
    c = consumer
    epoch, since = c.epoch(t), c.prefix_seq()
    ds = _gdal_open_planned(t, driver, sharing, kwargs, level)
    epoch = c.opened_dataset(t, ds, epoch, since)  # RACED: an invalidation reached it meanwhile
    return _reader(ds, t, epoch, driver, kwargs)


def _rio_open(t: Target, driver: str | None, sharing: bool, kwargs: dict[str, Any]) -> DatasetReader:
    """``rasterio.open`` of the ``/vsigs/`` path inside its gate (no write through cloudio meanwhile).

    Shared only while no dataset of the object opened before its last change
    is still open: GDAL would hand that one's handle back, the old version.
    """
    sharing = sharing and not consumer.has_stale_datasets(t.vsi)
    _gates.enter(t.vsi)
    try:
        if kwargs:
            return rasterio.open(t.vsi, "r", driver=driver, sharing=sharing, **kwargs)
        return rasterio.open(t.vsi, "r", driver=driver, sharing=sharing)
    finally:
        _gates.exit(t.vsi)


def _gdal_open_planned(t: Target, driver: str | None, sharing: bool, kwargs: dict[str, Any],
                       level: Consistency = "session") -> DatasetReader:
    c = consumer
    if c.plan_read(t) is NEEDS_LISTING:
        seq = journal().seq
        names = _list_names(t.path)
        if names is _NO_BUCKET:  # let GDAL fail; the failure is diagnosed by the caller
            return _rio_open(t, driver, sharing, kwargs)
        c.set_listing(t.path, names, listed_after=seq)
        if c.plan_read(t) is NEEDS_LISTING:  # dropped meanwhile (other threads listed many directories)
            c.opened([t.path.url])  # GDAL lists for itself: counted as a directory it may hold a listing of
    if t.vrt or (driver or "").upper() == "VRT":
        c.prepare_vrt()
        ds = _rio_open(t, driver, sharing, kwargs)
        files = _files(ds, t)
        # GDAL may have opened a source with another bucket's options; at the strong and bounded levels
        # _sources_current configures the buckets on its own walk of the sources (and asks for the reopen)
        if level == "session":
            sources, configured = _walk_sources(t, files)
            gone = c.gone([p.vsi for p in sources])
            if gone:  # deleted through cloudio: GDAL may read it as zeros
                _close(ds, t)
                raise _missing_source(t, parse_gcs(gone[0]).url)
            _remember_sources(t, sources)
            if configured:
                _close(ds, t)
                ds = _rio_open(t, driver, sharing, kwargs)
                files = _files(ds, t)
        else:  # _sources_current walks them below: the handle follows the direct sources GDAL names
            _walked.pop(t.vsi, None)
        c.opened(files)
        if level != "session" and not _sources_current(ds, t, files, _max_age(level)):
            ds = _rio_open(t, driver, sharing, kwargs)  # the sources' stale copies are gone now
        return ds
    return _rio_open(t, driver, sharing, kwargs)


def _missing_source(t: Target, source: str) -> ObjectNotFoundError:
    return ObjectNotFoundError(
        f"{t.path.url}: its source {source} does not exist on {where()} (deleted or never written); "
        "write the source again, or save the VRT without it (cloudio.write_vrt)"
    )


def _files(ds: DatasetReader, t: Target) -> list[str]:
    """GDAL's names for a VRT just opened: itself and its own sources (no I/O: read inside its gate anyway)."""
    _gates.enter(t.vsi)
    try:
        files: list[str] = ds.files
    finally:
        _gates.exit(t.vsi)
    return files


def _close(ds: DatasetReader, t: Target) -> None:
    _gates.enter(t.vsi)
    try:
        ds.close()
    finally:
        _gates.exit(t.vsi)


def _source_paths(level: list[str], seen: set[str]) -> list[GCSPath]:
    """The GCS objects among ``level`` not in ``seen`` (which they are added to)."""
    sources = []
    for f in level:
        p = parse_gcs(f) if is_gcs(f) else None
        if p is not None and p.key and p.vsi not in seen:
            seen.add(p.vsi)
            sources.append(p)
    return sources


def _configure_buckets(sources: list[GCSPath]) -> bool:
    """Set the GDAL options of the buckets of ``sources`` that lack them; True when any did."""
    new = False
    for bucket in {p.bucket for p in sources}:
        if not endpoint.in_force(bucket):
            ensure_endpoint(bucket)
            new = True
    return new


def _walk_sources(t: Target, files: list[str]) -> tuple[list[GCSPath], bool]:
    """The GCS sources the VRT ``t`` reads from, at every level, with the GDAL options (emulator endpoint,
    timeouts) of their buckets set; and whether a bucket was newly configured (the caller reopens ``t``).

    GDAL opens a VRT's sources with the options of their own buckets, which
    cloudio sets only for buckets it opened: a source in any other bucket
    would be asked of Google and read as nodata. A source that is itself a
    VRT is opened for its sources in turn (:data:`_VRT_DEPTH` levels at most;
    GDAL would open it to read anyway, so its bytes are then in its cache).
    """
    seen = {t.vsi}
    level, configured, walked = files, False, []
    for depth in range(_VRT_DEPTH + 1):
        sources = _source_paths(level, seen)
        walked += sources
        configured = _configure_buckets(sources) or configured
        vrts = [target(p) for p in sources if may_reference(p.vsi)]
        if not vrts or depth == _VRT_DEPTH:
            break
        level = [f for v in vrts for f in _vrt_files(v)]
    return walked, configured


#: per VRT (its /vsigs/ path): the sources of every level the last session-level open walked (:func:`_walk_sources`)
_walked: dict[str, tuple[str, ...]] = {}


def _remember_sources(t: Target, sources: list[GCSPath]) -> None:
    if len(_walked) >= _PARSED_MAX:
        _walked.clear()
    _walked[t.vsi] = tuple(p.vsi for p in sources)


def _configure_from_xml(t: Target) -> list[GCSPath]:
    """A VRT GDAL could not open: set the options of the buckets its XML names (one request, failures only);
    its GCS sources (none when it cannot be read).

    GDAL opens a warped VRT's source with the VRT itself, so a source in a
    bucket without options fails the open and ``files`` is never reached.
    Relative sources are in the VRT's own bucket, which has its options.
    """
    import xml.etree.ElementTree as ET

    from cloudio._gdal.vrt import _resolved, source_elements

    fs = gcs_filesystem()
    try:
        root = ET.fromstring(sync(fs.loop, bounded, fs, fs._cat_file(t.path.fs_path)))
    except Exception as e:
        if not (isinstance(e, ET.ParseError) or failed_request(e)):
            raise
        log.debug("%s: could not read it for its sources' buckets: %s", t.path.url, e)  # the reopen fails and says
        return []
    level = []
    for el in source_elements(root):
        try:
            level.append(_resolved(el, t.path.parent, t.path.url))  # relative ones too: their ranges may be cut
        except CloudioError:  # a local file GDAL reads (or not) for itself
            continue
    sources = _source_paths(level, {t.vsi})
    if _configure_buckets(sources):
        log.info("%s: set GDAL's options of its sources' buckets; opening it again", t.path.url)
    return sources


def _clear_sources(t: Target, named: list[GCSPath] | tuple[()]) -> None:
    """A VRT GDAL could not open: clear what GDAL cached of its sources (``named``, and those of every level an
    earlier open walked), where a download cut short leaves part of a range that every later open would read
    (GDAL does not fetch a range it holds again), as :func:`_retry_read` does for a read."""
    for vsi in {*(p.vsi for p in named), *_walked.get(t.vsi, ())}:
        bindings.clear(vsi)


# --------------------------------------------------------------------------------------------
# requests to the server (metadata, listings): one each, never from a cache
# --------------------------------------------------------------------------------------------


_NO_BUCKET: Any = object()


def failed_request(e: BaseException) -> bool:
    """Did a gcsfs request fail at the server or on the way? Not only OSErrors: gcsfs's ``HttpError`` (a 5xx or
    429 past its retries, a 400, a 409) and aiohttp's errors are plain Exceptions, which must not escape a read
    uncaught (a bug of cloudio's own, or an argument it got wrong, still does)."""
    return isinstance(e, OSError) or is_transient(e) or is_http_error(e)


def _list_names(path: GCSPath) -> Any:
    """Names directly in ``path``'s directory: one listing request.

    None when they fill more than one page (GDAL then lists for itself);
    ``_NO_BUCKET`` when the bucket does not exist.
    """
    prefix = path.parent.key
    fs = gcs_filesystem()
    try:  # bounded as every tracked call is: gcsfs alone retries a refused connection for half a minute
        out = sync(fs.loop, bounded, fs, fs._call(
            "GET", "b/{}/o", path.bucket, json_out=True, prefix=prefix or None, delimiter="/",
            maxResults=LISTING_LIMIT,
        ))
    except FileNotFoundError:
        return _NO_BUCKET
    except Exception as e:  # gcsfs's HttpError (5xx/429 past its retries, 400...) is no OSError
        if is_transient(e):  # the server is not answering: GDAL would wait too
            raise transient_error(path.url, "listing of its folder", e) from e
        if not failed_request(e):
            raise
        log.debug("could not list gs://%s/%s: %s", path.bucket, prefix, e)  # e.g. no permission: GDAL lists
        return None
    if out.get("nextPageToken"):
        return None
    names = [item["name"][len(prefix):] for item in out.get("items", [])]
    names += [p[len(prefix):].rstrip("/") for p in out.get("prefixes", [])]
    return names


def _revalidate(path: GCSPath, max_age: float | None) -> None:
    """Strong / bounded levels: compare the server's generations with what GDAL's cache holds.

    One listing request covers the object and its sidecars (:func:`_related`),
    so an ``.ovr``, ``.aux.xml`` or ``.msk`` written, replaced or deleted
    elsewhere is seen at the cost of the one metadata request the object
    alone would take.
    """
    if _checked_recently(path, max_age):
        return
    related = _related(path)
    _count("revalidations")
    if path.name not in related:
        consumer.mark_unknown(path)
        raise not_found(path)
    if consumer.revalidated(path, related):
        log.debug("%s or a sidecar changed on the server (%s); cleared GDAL's copy", path.url, related)


def _max_age(level: Consistency) -> float | None:
    """How old a check may be at ``level`` (None: none is young enough, ``"strong"``)."""
    return None if level == "strong" else float(level)


def _checked_recently(path: GCSPath, max_age: float | None) -> bool:
    last = consumer.last_check(path.url)
    return max_age is not None and last is not None and time.monotonic() - last[1] <= max_age


def _related(path: GCSPath) -> dict[str, int]:
    """The object and the names next to it GDAL may read with it (its sidecars), by generation.

    One listing request (per 1000 names) of the names that start with the
    object's stem: ``a.tif`` lists ``a.tif``, ``a.tif.ovr``, ``a.tif.aux.xml``,
    ``a.tif.msk``, ``a.aux.xml``... Empty when the bucket does not exist.
    """
    from fsspec.asyn import sync

    directory, name = path.parent.key, path.name
    fs = gcs_filesystem()
    try:
        items = sync(fs.loop, list_objects, fs, path.bucket, "name,generation",
                     prefix=directory + name.rsplit(".", 1)[0], delimiter="/")
    except FileNotFoundError:  # no such bucket: nothing is there
        return {}
    related = ((str(item["name"])[len(directory):], int(item["generation"])) for item in items)
    return {n: gen for n, gen in related if n == name or is_sidecar(n, name)}


#: how many levels of VRTs inside a VRT the strong / bounded check opens to find their sources
_VRT_DEPTH = 8


def _sources_current(ds: DatasetReader, t: Target, files: list[str], max_age: float | None) -> bool:
    """Strong / bounded levels, a VRT just opened: are its sources (and their sidecars) as GDAL holds them?

    One listing request per source. GDAL names only a VRT's own sources in
    ``files``, so a source that is itself a VRT is opened, once checked, for
    its sources in turn (:data:`_VRT_DEPTH` levels at most, each object once):
    the pixels come from the leaves. When one changed, the VRT is closed
    before GDAL's copies are cleared (a dataset must not see two versions),
    and the caller opens it again.
    """
    seen = {t.vsi}
    level, current = files, True
    missing: list[str] = []
    walked: list[GCSPath] = []
    for depth in range(_VRT_DEPTH + 1):
        sources = _source_paths(level, seen)
        walked += sources
        listed = [(p, _related(p)) for p in sources if not _checked_recently(p, max_age)]
        _count("revalidations", len(listed))
        new_bucket = _configure_buckets(sources)  # a checked VRT may name a bucket the older version did not
        if current and (new_bucket or not all(p.name in r and consumer.is_current(p, r) for p, r in listed)):
            _close(ds, t)
            current = False
        gone = set()
        for p, r in listed:
            if p.name in r:
                consumer.revalidated(p, r)  # clears what changed (ds is closed); else records the check
            else:
                consumer.mark_unknown(p)
                bindings.clear(p.vsi)
                gone.add(p.vsi)
                missing.append(p.url)
        if missing:  # GDAL would read 0 in its place, or fail, depending on what its own state holds
            if current:
                _close(ds, t)
            raise _missing_source(t, missing[0])
        vrts = [target(p) for p in sources if p.vsi not in gone and may_reference(p.vsi)]
        if not vrts:
            break
        if depth == _VRT_DEPTH:
            log.debug("%s: VRTs nested deeper than %d levels; their sources are not checked", t.path.url, depth)
            break
        consumer.prepare_vrt()  # their sources may be new names in any folder GDAL listed
        level = [f for v in vrts for f in _vrt_files(v)]
    _remember_sources(t, walked)  # the handle watches (and its reads hold) the sources of every level
    return current


def _vrt_files(t: Target) -> list[str]:
    """The files GDAL names for the VRT ``t`` (itself and its own sources), opened inside its gate.

    Called after ``t`` was checked (and cleared if it changed), so the names
    are those of the version checked; [] when GDAL cannot open it (the
    caller's reopen of the VRT that references it meets the same failure).
    """
    _gates.enter(t.vsi)
    try:
        with rasterio.open(t.vsi) as vrt:
            files: list[str] = vrt.files
    except RasterioIOError as e:
        log.debug("%s: could not open it to check its sources: %s", t.path.url, e)
        return []
    finally:
        _gates.exit(t.vsi)
    consumer.opened(files)
    return files


def _not_an_object(path: GCSPath) -> CloudioError:
    """Why there is no object at ``path``: a Zarr store or a folder is there, the bucket is missing, or nothing
    (one listing of what is under it, then :func:`not_found`'s bucket request)."""
    from fsspec.asyn import sync

    from cloudio._gcs.fast import list_page
    from cloudio._zarr.store import NODE_DOCUMENTS

    fs = gcs_filesystem()
    try:
        page = sync(fs.loop, list_page, fs, path.bucket, "items(name),prefixes", prefix=f"{path.key}/",
                    delimiter="/", maxResults=1000)
    except OSError as e:  # no bucket (FileNotFoundError), or the listing refused: say what is certain
        log.debug("could not list under %s: %s", path.url, e)
        page = {}
    names = {str(item["name"]).rsplit("/", 1)[-1] for item in page.get("items", [])}
    if names & set(NODE_DOCUMENTS):
        return ConfigurationError(
            f"{path.url} is a Zarr store, not one object GDAL can open; read it with "
            f"cloudio.open_zarr({path.url!r}) (a dataset or group) or cloudio.load_array (an array)"
        )
    if names or page.get("prefixes"):
        return ObjectNotFoundError(
            f"{path.url} is a folder, not an object: nothing is stored at that key, objects are stored under "
            f"it. Open one of them (cloudio.filesystem({path.url!r}).ls({path.url!r}) lists them)."
        )
    return not_found(path, fs)


def _raise_if_missing(t: Target, cause: RasterioIOError) -> None:
    """Raise the not-found error that says why, unless the object exists."""
    try:
        object_metadata(t.path)
    except FileNotFoundError:
        raise _not_an_object(t.path) from cause
    except Exception as e:  # the server is unreachable or refuses (gcsfs's HttpError too)
        if not failed_request(e):
            raise
        log.debug("could not diagnose %s: %s", t.path.url, e)
        raise _transient(t, cause) from cause

