"""``cloudio.open``: ``rasterio.open`` that reads what was last written.

The flow of a read of a GCS object::

    journal changes ──(applied at write time)──► GDAL caches (cloudio._gdal)
    cloudio.open(url)
      1. normalise the URL; point /vsigs/<bucket> at the emulator if one is in force
      2. consistency "strong" / N seconds: one metadata request -> clear on a new generation
      3. plan: cloudio's listing of the directory (fetched once) says whether
         GDAL must list it (sidecars, VRT) or may skip it (EMPTY_DIR)
      4. rasterio.open("/vsigs/b/k") with the plan's options
      5. on failure only: diagnose (object / bucket missing) or retry once
         after clearing a directory listing GDAL held behind cloudio's back

Writes (``"w"``, ``"w+"``, ``"r+"``) go to :mod:`cloudio._rasterwrite`, which
renders locally and uploads on close. Local paths, file objects and other
inputs go straight to :func:`rasterio.open`.
"""

from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING, Any

import rasterio
from rasterio.errors import RasterioIOError

from . import _gdal, _session
from ._config import emulator_endpoint
from ._paths import GCSPath, is_gcs, parse_gcs
from ._session import count, current_consistency
from .errors import BucketNotFoundError, ObjectNotFoundError

if TYPE_CHECKING:
    from rasterio.io import DatasetReader

log = logging.getLogger(__name__)

__all__ = ["open"]

_WRITE_MODES = ("w", "w+", "r+")


def open(  # noqa: A001 - the public name mirrors rasterio.open
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
) -> "DatasetReader":
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

    Notes
    -----
    At the ``"session"`` level (default) a read sees every write journaled in
    this process (through cloudio, or announced with
    :func:`cloudio.invalidate`) and makes no extra request. ``"strong"`` adds
    one metadata request per open, which catches writes made anywhere to the
    object itself; a number of seconds makes that request only when the last
    check is older. Sidecar files (``.ovr``, ``.aux.xml``, ``.msk``) written
    elsewhere are seen after :func:`cloudio.invalidate` of the directory.
    """
    t = _parsed.get(fp) if type(fp) is str else None  # the fast path: a URL read before
    if t is None and opener is None:
        t = _target(fp)
    if t is None or opener is not None:
        return rasterio.open(
            fp, mode, driver=driver, width=width, height=height, count=count, crs=crs,
            transform=transform, dtype=dtype, nodata=nodata, sharing=sharing, opener=opener, **kwargs,
        )
    if mode == "r":
        c = _gdal.consumer
        if driver is None and not kwargs and _consistency() == "session" and c.unchanged(t):
            # the common case, kept cheap: read before, nothing written since, nothing to check
            epoch = c.epoch(t)  # see GdalConsumer.opened_dataset
            try:
                dataset = rasterio.open(t.vsi, "r", driver=driver, sharing=sharing)
            except RasterioIOError:
                dataset = _open_read(t, driver, sharing, kwargs)
            else:
                c.opened_dataset(t, dataset, epoch)
        else:
            dataset = _open_read(t, driver, sharing, kwargs)
        next(_session._opens)  # count("opens"), lock-free
        return dataset
    if mode in _WRITE_MODES:
        from ._rasterwrite import open_write

        return open_write(
            t.path, mode, driver, width=width, height=height, count=count, crs=crs,
            transform=transform, dtype=dtype, nodata=nodata, sharing=sharing, **kwargs,
        )
    # let rasterio phrase its own error for unknown modes
    return rasterio.open(t.vsi, mode, driver=driver, sharing=sharing, **kwargs)


# the public function shadows the builtin and the parameter `count` shadows the counter
_count = count


#: parsed gs:// and /vsigs/ spellings (their meaning never changes): a dict lookup per open
_parsed: dict[str, _gdal.Target] = {}
_PARSED_MAX = 10_000


def _target(fp: Any) -> _gdal.Target | None:
    """The object ``fp`` names, or None when ``fp`` is not a GCS URL (rasterio's business)."""
    if not isinstance(fp, (str, os.PathLike)) or not is_gcs(fp):
        return None
    s = os.fspath(fp)
    t = _gdal.target(parse_gcs(s, require_key=True))
    if s.startswith(("gs://", "/vsigs/")):  # http(s) spellings depend on the emulator in force
        if len(_parsed) >= _PARSED_MAX:
            _parsed.clear()
        _parsed[s] = t
    return t


def _consistency() -> Any:
    """:func:`cloudio._session.current_consistency`, without its environment lookup when it can't matter.

    The lookup of an unset variable costs a KeyError inside ``os.environ``,
    about 1 us, a fifth of cloudio's whole per-open budget.
    """
    s = _session._current.get()
    if s is not None:
        return s.consistency
    if not _session._open_sessions and _gdal.env_raw(b"CLOUDIO_CONSISTENCY") is None:
        return "session"
    return current_consistency()


def _open_read(t: _gdal.Target, driver: str | None, sharing: bool, kwargs: dict[str, Any]) -> "DatasetReader":
    _gdal.ensure_endpoint(t.path.bucket)
    level = _consistency()
    if level != "session":
        _revalidate(t.path, None if level == "strong" else float(level))
    try:
        return _gdal_open(t, driver, sharing, kwargs)
    except RasterioIOError as e:
        # off the happy path: now, and only now, ask the server what is wrong
        _raise_if_missing(t.path, e)
        # the object exists, so GDAL answered from a listing made behind cloudio's back
        _gdal.consumer.forget_listing(t.path)
        try:
            return _gdal_open(t, driver, sharing, kwargs)
        except RasterioIOError:
            raise e from None


def _gdal_open(t: _gdal.Target, driver: str | None, sharing: bool, kwargs: dict[str, Any]) -> "DatasetReader":
    c = _gdal.consumer
    epoch = c.epoch(t)
    ds = _gdal_open_planned(t, driver, sharing, kwargs)
    c.opened_dataset(t, ds, epoch)
    return ds


def _gdal_open_planned(t: _gdal.Target, driver: str | None, sharing: bool, kwargs: dict[str, Any]) -> "DatasetReader":
    c = _gdal.consumer
    if c.plan_read(t) is _gdal.NEEDS_LISTING:
        names = _list_names(t.path)
        if names is _NO_BUCKET:  # let GDAL fail; the failure is diagnosed by the caller
            return rasterio.open(t.vsi, "r", driver=driver, sharing=sharing, **kwargs)
        c.set_listing(t.path, names)
        c.plan_read(t)
    if t.vrt or (driver or "").upper() == "VRT":
        c.prepare_vrt(t.path)
        ds = rasterio.open(t.vsi, "r", driver=driver, sharing=sharing, **kwargs)
        c.opened(ds.files)
        return ds
    if kwargs:
        return rasterio.open(t.vsi, "r", driver=driver, sharing=sharing, **kwargs)
    return rasterio.open(t.vsi, "r", driver=driver, sharing=sharing)


# --------------------------------------------------------------------------------------------
# requests to the server (metadata, listings): one each, never from a cache
# --------------------------------------------------------------------------------------------


def _fs() -> Any:
    from ._gcs import gcs_filesystem

    return gcs_filesystem()


def _where() -> str:
    ep = emulator_endpoint()
    return f"the emulator at {ep.url}" if ep is not None else "Google Cloud Storage"


_NO_BUCKET: Any = object()


def _list_names(path: GCSPath) -> Any:
    """Names directly in ``path``'s directory: one listing request.

    None when they fill more than one page (GDAL then lists for itself);
    ``_NO_BUCKET`` when the bucket does not exist.
    """
    from ._gdal import LISTING_LIMIT

    prefix = path.parent.key
    try:
        out = _fs().call(
            "GET", "b/{}/o", path.bucket, json_out=True, prefix=prefix or None, delimiter="/",
            maxResults=LISTING_LIMIT,
        )
    except FileNotFoundError:
        return _NO_BUCKET
    except OSError as e:  # e.g. no permission to list: GDAL finds sidecars its own way
        log.debug("could not list gs://%s/%s: %s", path.bucket, prefix, e)
        return None
    if out.get("nextPageToken"):
        return None
    names = [item["name"][len(prefix):] for item in out.get("items", [])]
    names += [p[len(prefix):].rstrip("/") for p in out.get("prefixes", [])]
    return names


def _object_metadata(path: GCSPath) -> dict[str, Any]:
    """The object's JSON-API metadata: exactly one ``GET /storage/v1/b/<b>/o/<key>``."""
    return _fs().call("GET", "b/{}/o/{}", path.bucket, path.key, json_out=True)  # type: ignore[no-any-return]


def _revalidate(path: GCSPath, max_age: float | None) -> None:
    """Strong / bounded levels: compare the server's generation with what GDAL's cache holds."""
    last = _gdal.consumer.last_check(path.url)
    if max_age is not None and last is not None and time.monotonic() - last[1] <= max_age:
        return
    try:
        meta = _object_metadata(path)
    except FileNotFoundError as e:
        _count("revalidations")
        _gdal.consumer.mark_unknown(path)
        raise _not_found(path, e) from e
    _count("revalidations")
    if _gdal.consumer.revalidated(path, int(meta["generation"])):
        log.debug("%s changed on the server (generation %s); cleared GDAL's copy", path.url, meta["generation"])
    if max_age is not None:  # bounded staleness also covers cloudio's listing (sidecars)
        age = _gdal.consumer.listing_age(path)
        if age is not None and age > max_age:
            names = _list_names(path)
            if names is not _NO_BUCKET:
                _gdal.consumer.set_listing(path, names)


def _raise_if_missing(path: GCSPath, cause: BaseException) -> None:
    """Raise the not-found error that says why, unless the object exists."""
    try:
        _object_metadata(path)
    except FileNotFoundError:
        raise _not_found(path, cause) from cause
    except OSError as e:  # the server is unreachable or refuses: keep rasterio's error
        log.debug("could not diagnose %s: %s", path.url, e)
        raise cause from None


def _not_found(path: GCSPath, cause: BaseException) -> ObjectNotFoundError:
    try:
        _fs().call("GET", "b/{}", path.bucket, json_out=True)
    except FileNotFoundError:
        return BucketNotFoundError(
            f"{path.url}: bucket {path.bucket!r} does not exist on {_where()}. "
            "Check the bucket name, or create the bucket first."
        )
    except OSError:
        pass
    return ObjectNotFoundError(
        f"{path.url} does not exist on {_where()} (checked the object's metadata). Check the key; "
        f"list gs://{path.bucket}/{path.parent.key} with cloudio.filesystem(url).ls(...) to see what is there."
    )
