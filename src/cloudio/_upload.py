"""Verified transfers: one upload (or download) through gcsfs, checked against the server.

Every byte cloudio writes to GCS goes through :func:`upload`: the data is sent
once through the plain gcsfs filesystem of :func:`cloudio._gcs.gcs_filesystem`
(a multipart upload below :data:`SIMPLE_LIMIT`, a resumable one above it, read
from disk chunk by chunk so a multi-gigabyte file never sits in memory), and
the size and CRC32C the server reports for the stored object are compared
with the bytes sent. Only a verified upload is journaled; an object that does
not match what was sent is deleted again and reported as
:class:`~cloudio.errors.IntegrityError`. GDAL's own ``/vsigs/`` writer is never
used (the emulator rejects its XML-API ``PUT`` and GDAL 3.12 may fail
silently there; see DESIGN.md).

Retries happen at two levels. gcsfs retries each HTTP request that fails
with 408/429/5xx or a connection error (up to six times, with back-off);
:func:`upload` then retries the whole upload, at most ``attempts`` times with
back-off, when a resumable session broke or what the server stored did not
match what was sent (a byte flipped in transit). Nothing else is retried.

:func:`download` is the counterpart for ``cloudio.open(url, "r+")``: a fresh
copy of the current object, checked against the CRC32C of the object's
metadata fetched first.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import mimetypes
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import google_crc32c

from ._journal import Change, journal
from ._paths import GCSPath, parse_gcs
from ._session import count
from .errors import BucketNotFoundError, IntegrityError, ObjectNotFoundError, UploadError

if TYPE_CHECKING:
    import gcsfs

log = logging.getLogger(__name__)

#: below this size the bytes go in one multipart request (read into memory, as gcsfs does)
SIMPLE_LIMIT = 8 * 2**20
#: resumable uploads send the file in chunks of this size (a multiple of 256 KiB, as GCS requires)
CHUNK_SIZE = 32 * 2**20
#: whole-upload attempts, on top of the per-request retries of gcsfs
ATTEMPTS = 3
_BACKOFF = 0.25  # seconds before the 2nd attempt; doubles each time

Source = str | os.PathLike[str] | bytes | bytearray | memoryview

_known_buckets: set[str] = set()
_buckets_lock = threading.Lock()


@dataclass(frozen=True, slots=True)
class Uploaded:
    """What the server holds after a verified :func:`upload`."""

    url: str  #: journal key ``gs://bucket/key``
    generation: int | None
    size: int
    crc32c: str  #: base64 of the big-endian CRC32C, as the JSON API reports it
    change: Change  #: the journal record made for this upload


class _Mismatch(Exception):
    """The server stored something other than what was sent (retried, then IntegrityError)."""


def _crc_b64(checksum: "google_crc32c.Checksum") -> str:
    return base64.b64encode(checksum.digest()).decode("ascii")


def _as_path(url: GCSPath | str | os.PathLike[str]) -> GCSPath:
    return url if isinstance(url, GCSPath) else parse_gcs(os.fspath(url), require_key=True)


def _filesystem(fs: "gcsfs.GCSFileSystem | None") -> "gcsfs.GCSFileSystem":
    if fs is not None:
        return fs
    from ._gcs import gcs_filesystem

    return gcs_filesystem()


def _is_transient(exc: BaseException) -> bool:
    """Worth another whole-upload attempt: network trouble or a 408/429/5xx answer."""
    if isinstance(exc, (_Mismatch, asyncio.TimeoutError, ConnectionError, TimeoutError)):
        return True
    try:
        import aiohttp
        from gcsfs.retry import is_retriable
    except ImportError:  # pragma: no cover - both are gcsfs dependencies
        return False
    return isinstance(exc, aiohttp.ClientError) or is_retriable(exc)


# -- bucket existence ------------------------------------------------------------------------


def ensure_bucket(path: GCSPath, fs: "gcsfs.GCSFileSystem | None" = None) -> None:
    """Raise :class:`BucketNotFoundError` unless ``path``'s bucket exists.

    One metadata request per bucket per process: a bucket seen once is
    remembered (if it is deleted later, the upload itself fails with the
    same error).
    """
    with _buckets_lock:
        if path.bucket in _known_buckets:
            return
    fs = _filesystem(fs)
    try:
        fs.call("GET", "b/{}", path.bucket, json_out=True)
    except FileNotFoundError as e:
        raise _bucket_missing(path) from e
    except Exception as e:  # noqa: BLE001 - permissions may forbid bucket metadata; let the upload decide
        log.debug("could not read metadata of bucket %s (%s); assuming it exists", path.bucket, e)
        return
    with _buckets_lock:
        _known_buckets.add(path.bucket)


def _bucket_missing(path: GCSPath) -> BucketNotFoundError:
    return BucketNotFoundError(
        f"{path.url}: bucket gs://{path.bucket} does not exist. Create it first "
        f"(gcloud storage buckets create gs://{path.bucket}, or Emulator.create_bucket("
        f"{path.bucket!r}) against the emulator), or check the bucket name."
    )


def _forget_bucket(bucket: str) -> None:
    with _buckets_lock:
        _known_buckets.discard(bucket)


# -- upload ----------------------------------------------------------------------------------


def upload(
    source: Source,
    url: GCSPath | str | os.PathLike[str],
    *,
    content_type: str | None = None,
    fs: "gcsfs.GCSFileSystem | None" = None,
    attempts: int = ATTEMPTS,
    chunk_size: int = CHUNK_SIZE,
    simple_limit: int = SIMPLE_LIMIT,
) -> Uploaded:
    """Upload a local file or bytes to ``url``, verify it, then journal it.

    Parameters
    ----------
    source
        A local file path (streamed from disk) or the bytes themselves.
    url
        The destination object (``gs://b/k``, ``/vsigs/b/k`` or a parsed path).
    content_type
        Defaults to a guess from the key's extension.
    fs
        The gcsfs filesystem to send through; default
        :func:`cloudio._gcs.gcs_filesystem` (plain, untracked: this function
        journals the write itself, exactly once).
    attempts
        Whole-upload attempts (each request inside is retried by gcsfs too).
    chunk_size, simple_limit
        Resumable chunk size (a multiple of 256 KiB) and the size from which
        a resumable upload is used.

    Returns
    -------
    Uploaded
        Generation, size and CRC32C of the stored object, and the journal record.

    Raises
    ------
    InvalidURLError
        ``url`` does not name a GCS object.
    BucketNotFoundError
        The bucket does not exist.
    IntegrityError
        The server kept reporting a size or CRC32C other than what was sent;
        the mismatching object was deleted.
    UploadError
        The upload failed after its retries. Nothing was journaled.

    Notes
    -----
    On a bucket without object versioning an overwrite replaces the old
    object when the upload completes; if that new object is then found
    corrupt and deleted, the old one is gone too. The delete names the
    generation just written, so on real GCS a concurrent newer write is
    never removed (the emulator ignores ``generation`` on delete).
    """
    path = _as_path(url)
    if chunk_size % (256 * 1024):
        raise ValueError(f"chunk_size={chunk_size} must be a multiple of 256 KiB")
    fs = _filesystem(fs)
    if content_type is None:
        content_type = mimetypes.guess_type(path.key)[0] or "application/octet-stream"
    if not isinstance(source, (bytes, bytearray, memoryview)) and not os.path.isfile(source):
        raise FileNotFoundError(f"{os.fspath(source)!r}: no such local file to upload to {path.url}")
    last: BaseException | None = None
    size = 0
    for attempt in range(max(1, attempts)):
        if attempt:
            delay = _BACKOFF * 2 ** (attempt - 1)
            log.info("upload of %s: attempt %d of %d in %.2f s (%s)", path.url, attempt + 1, attempts, delay, last)
            time.sleep(delay)
        try:
            meta, sent_crc, size = _send(fs, path, source, content_type, chunk_size, simple_limit)
            generation = _check_stored(fs, path, meta, size, sent_crc)
        except FileNotFoundError as e:  # 404: no bucket, or a resumable session that vanished
            _forget_bucket(path.bucket)
            ensure_bucket(path, fs)  # raises BucketNotFoundError when that is the reason
            last = e
            continue
        except Exception as e:
            if not _is_transient(e):
                raise UploadError(
                    f"{path.url}: upload failed ({type(e).__name__}: {e}). Nothing was journaled. "
                    "Check that the bucket is writable and GCS (or STORAGE_EMULATOR_HOST) is reachable, "
                    "then write again."
                ) from e
            last = e
            continue
        break
    else:
        if isinstance(last, _Mismatch):
            raise IntegrityError(
                f"{path.url}: what the server stored differs from what was sent ({last}) in all "
                f"{attempts} attempts; the stored object was deleted and nothing was journaled. "
                "Check the network path to GCS (a proxy rewriting bodies?) and write again."
            ) from last
        raise UploadError(
            f"{path.url}: upload failed after {attempts} attempts ({type(last).__name__}: {last}). "
            "Nothing was journaled. Check that GCS (or STORAGE_EMULATOR_HOST) is reachable, then write again."
        ) from last
    fs.invalidate_cache(path.fs_path)
    change = journal().record(path.url, "write", generation=generation, size=size)
    count("uploads")
    count("bytes_uploaded", size)
    log.debug("uploaded %s (%d bytes, generation %s)", path.url, size, generation)
    return Uploaded(path.url, generation, size, sent_crc, change)


def _chunks(source: Source, size: int, chunk_size: int) -> Iterator[bytes | memoryview]:
    if isinstance(source, (bytes, bytearray, memoryview)):
        view = memoryview(source)
        for offset in range(0, max(size, 1), chunk_size):
            yield view[offset: offset + chunk_size]
        return
    with open(source, "rb") as f:
        while True:
            block = f.read(chunk_size)
            if not block:
                return
            yield block


def _send(
    fs: "gcsfs.GCSFileSystem",
    path: GCSPath,
    source: Source,
    content_type: str,
    chunk_size: int,
    simple_limit: int,
) -> tuple[dict[str, Any], str, int]:
    """One upload; returns the server's object resource, the CRC32C and the size of the bytes sent."""
    from fsspec.asyn import sync

    # gcsfs's module-level upload helpers return the object resource the server
    # answered with (generation, size, crc32c): verification needs no extra request,
    # and cannot read a concurrent writer's object by mistake. fs.put_file drops it.
    from gcsfs.core import initiate_upload, simple_upload, upload_chunk

    checksum = google_crc32c.Checksum()
    in_memory = isinstance(source, (bytes, bytearray, memoryview))
    size = len(source) if in_memory else os.path.getsize(source)  # type: ignore[arg-type]
    if size < simple_limit:
        data = bytes(source) if in_memory else _read_all(source)  # type: ignore[arg-type]
        checksum.update(data)
        meta = sync(fs.loop, simple_upload, fs, path.bucket, path.key, data, None, "none", content_type)
        return meta, _crc_b64(checksum), len(data)
    location = sync(fs.loop, initiate_upload, fs, path.bucket, path.key, content_type)
    meta = None
    offset = 0
    try:
        for block in _chunks(source, size, chunk_size):
            checksum.update(bytes(block))
            meta = sync(fs.loop, upload_chunk, fs, location, block, offset, size, content_type)
            offset += len(block)
    except BaseException:
        try:  # cancel the session: an unfinished resumable upload never becomes an object
            sync(fs.loop, fs._call, "DELETE", location)
        except Exception:  # noqa: BLE001 - the session expires on its own anyway
            log.debug("could not cancel resumable upload of %s", path.url, exc_info=True)
        raise
    if offset != size:
        raise _Mismatch(f"the local file changed size while uploading ({size} -> {offset} bytes)")
    return meta or {}, _crc_b64(checksum), size


def _read_all(source: str | os.PathLike[str]) -> bytes:
    with open(source, "rb") as f:
        return f.read()


def _check_stored(
    fs: "gcsfs.GCSFileSystem", path: GCSPath, meta: dict[str, Any], size: int, sent_crc: str
) -> int | None:
    """Compare the stored object with what was sent; delete it and raise _Mismatch if it differs."""
    if "crc32c" not in meta or "size" not in meta:
        meta = fs.call("GET", "b/{}/o/{}", path.bucket, path.key, json_out=True)
    generation = int(meta["generation"]) if meta.get("generation") not in (None, "", "0") else None
    got_size = int(meta.get("size", -1))
    got_crc = meta.get("crc32c")
    if got_size == size and got_crc == sent_crc:
        return generation
    log.warning("%s: stored object differs from what was sent (size %s vs %s, crc32c %s vs %s); deleting it",
                path.url, got_size, size, got_crc, sent_crc)
    _delete(fs, path, generation)
    raise _Mismatch(f"server reports size {got_size} and CRC32C {got_crc}, sent {size} bytes with CRC32C {sent_crc}")


def _delete(fs: "gcsfs.GCSFileSystem", path: GCSPath, generation: int | None) -> None:
    params = {"generation": str(generation)} if generation is not None else {}
    try:
        fs.call("DELETE", "b/{}/o/{}", path.bucket, path.key, **params)
    except FileNotFoundError:
        pass
    finally:
        fs.invalidate_cache(path.fs_path)


# -- download --------------------------------------------------------------------------------


def object_metadata(path: GCSPath, fs: "gcsfs.GCSFileSystem | None" = None) -> dict[str, Any]:
    """The object's JSON-API resource, fetched now (never from a listing cache).

    Raises
    ------
    ObjectNotFoundError, BucketNotFoundError
    """
    fs = _filesystem(fs)
    try:
        return fs.call("GET", "b/{}/o/{}", path.bucket, path.key, json_out=True)
    except FileNotFoundError as e:
        _forget_bucket(path.bucket)
        ensure_bucket(path, fs)  # raises BucketNotFoundError when that is the reason
        raise ObjectNotFoundError(
            f"{path.url}: no such object. Check the key (list the prefix gs://{path.bucket}/"
            f"{path.parent.key}), or open with mode 'w' to create it."
        ) from e


def download(
    url: GCSPath | str | os.PathLike[str],
    local: str | os.PathLike[str],
    *,
    fs: "gcsfs.GCSFileSystem | None" = None,
    attempts: int = ATTEMPTS,
) -> dict[str, Any]:
    """Copy the current object at ``url`` to the local file ``local``; return its metadata.

    The object's metadata is fetched first and the file's size and CRC32C
    are checked against it, so an object overwritten during the download is
    fetched again rather than torn.

    Raises
    ------
    ObjectNotFoundError, BucketNotFoundError, IntegrityError
    """
    path = _as_path(url)
    fs = _filesystem(fs)
    last = ""
    for attempt in range(max(1, attempts)):
        if attempt:
            time.sleep(_BACKOFF * 2 ** (attempt - 1))
        meta = object_metadata(path, fs)
        fs.invalidate_cache(path.fs_path)  # gcsfs takes sizes from its listing cache; make it ask
        try:
            fs.get_file(path.fs_path, os.fspath(local))
        except FileNotFoundError:
            last = "the object disappeared during the download"
            continue  # deleted in between: the next metadata request says so
        checksum = google_crc32c.Checksum()
        got = 0
        with open(local, "rb") as f:
            while block := f.read(8 * 2**20):
                checksum.update(block)
                got += len(block)
        if got == int(meta.get("size", -1)) and _crc_b64(checksum) == meta.get("crc32c"):
            return meta
        last = f"got {got} bytes with CRC32C {_crc_b64(checksum)}, metadata says {meta.get('size')} / {meta.get('crc32c')}"
        log.info("download of %s did not match its metadata (%s); retrying", path.url, last)
    raise IntegrityError(
        f"{path.url}: downloaded bytes never matched the object's metadata ({last}); is it being "
        "overwritten continuously? Retry when writes to it have stopped."
    )
