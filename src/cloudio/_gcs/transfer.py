"""Verified transfers: one upload (or download) through gcsfs, checked against the server.

Every byte cloudio writes to GCS goes through one primitive, :func:`put_verified`
(async; :func:`upload` is its synchronous front for local files and bytes): the
data is sent once through gcsfs (a multipart upload below :data:`SIMPLE_LIMIT`,
a resumable one above it, a local file read chunk by chunk so a multi-gigabyte
file never sits in memory), and the size and CRC32C in the object resource the
server answers the upload with are compared with the bytes sent: no extra
request. gcsfs's own ``consistency="crc32c"`` is not used: it needs ``crcmod``,
raises only after the bad object is stored, and leaves it there.

An object that does not match what was sent is deleted again; on a bucket
without object versioning the previous object is then gone too. Whatever the
outcome, the journal ends up matching the server: a verified upload is
journaled as a write, a failure that deleted the object as a delete, a
failure that never stored anything as nothing.

Retries happen at two levels. gcsfs retries each HTTP request that fails
with 408/429/5xx or a connection error (up to six times, with back-off); the
whole upload is then retried, at most ``attempts`` times with back-off, only
when what the server stored did not match what was sent (a byte flipped in
transit) or a resumable session vanished. A failure that outlasted gcsfs's
retries is a :class:`~cloudio.errors.TransientError` (retry later), anything
else an :class:`~cloudio.errors.UploadError`.

:func:`download` (``cloudio.open(url, "r+")``) and :func:`cloudio._gcs.fast.fetch_into`
(whole shard reads) are the counterparts: the bytes are checked against the
CRC32C the server reports for the object they came from.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import mimetypes
import os
import stat
import threading
from collections.abc import Awaitable, Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import quote

from cloudio import _state
from cloudio._gcs import checksums, fast
from cloudio._gcs.client import (
    ATTEMPTS,
    BACKOFF,
    bounded,
    bucket_missing,
    forget_bucket,
    gcs_filesystem,
    is_transient,
    object_metadata,
    transient_error,
)
from cloudio._gcs.fast import put_media
from cloudio._journal import Change, Consumer, journal
from cloudio._paths import GCSPath, parse_gcs
from cloudio._session import count
from cloudio._tables import drop_oldest, touch
from cloudio._threads import hold_across_fork, run_to_the_end
from cloudio.errors import (
    CloudioError,
    ConfigurationError,
    ConflictError,
    IntegrityError,
    LocalFileNotFoundError,
    TransientError,
    UploadError,
)

if TYPE_CHECKING:
    import gcsfs

log = logging.getLogger(__name__)

T = TypeVar("T")

#: below this size the bytes go in one multipart request (read into memory, as gcsfs does)
SIMPLE_LIMIT = 8 * 2**20
#: resumable uploads send the file in chunks of this size (a multiple of 256 KiB, as GCS requires)
CHUNK_SIZE = 32 * 2**20

Source = str | os.PathLike[str] | bytes | bytearray | memoryview

#: a plain upload of an object this process knows nothing of goes at once as a new object below this size
#: (an object there then costs the body twice and a GET), from it up after asking its generation (a GET)
ASK_FIRST_FROM = 1 << 20
#: other writers' objects a plain upload writes over before it gives up (ConflictError)
RACES = 5


class _LastGenerations(Consumer):
    """The generation the objects changed last in this process hold, as the journal last said (0: deleted).

    Why: a plain upload needs the generation it replaces on each of its requests
    (:func:`last_writer_wins`); this is its first guess. A wrong one (another process wrote) costs a
    refused request, never a write.
    """

    name = "last generations"
    keep = 10_000

    def __init__(self) -> None:
        self._table: dict[str, int] = {}
        self._lock = threading.Lock()

    def on_change(self, change: Change) -> None:
        with self._lock:
            if change.prefix:
                for url in [u for u in self._table if change.touches(u)]:
                    del self._table[url]
            elif change.kind == "write" and change.generation is not None:
                touch(self._table, change.url, change.generation)
            elif change.kind == "delete":
                touch(self._table, change.url, 0)
            else:
                self._table.pop(change.url, None)
            drop_oldest(self._table, self.keep)

    def get(self, url: str) -> int | None:
        with self._lock:
            return self._table.get(url)


_last_generations = _LastGenerations()
journal().register(_last_generations)


class _GivenUp:
    """The bodies (size, CRC32C) of this process's upload requests that got no answer, by URL: given up at the
    time limit, their connection lost, or cancelled on their way (in-memory bodies: chunks, documents).

    Why: such a request may still reach the server, late, and land where its guard still holds: after zarr
    deleted the object to write it again (the guard 0, "no object", holds once more). An upload of this
    process refused by an object holding one of these bodies was refused by its own late copy: under
    cloudio's own guard, :func:`put_verified` writes over it instead of raising ConflictError, and forgets
    the body. (Another writer's object holding exactly that body would be written over too.)
    """

    keep = 10_000

    def __init__(self) -> None:
        self._table: dict[str, frozenset[tuple[int, str]]] = {}
        self._lock = threading.Lock()

    def add(self, url: str, size: int, crc: str) -> None:
        with self._lock:
            touch(self._table, url, self._table.get(url, frozenset()) | {(size, crc)})
            drop_oldest(self._table, self.keep)

    def under(self, prefix: str) -> bool:
        """Whether a request given up (its body unconfirmed) may still land under the URL ``prefix``."""
        with self._lock:
            return any(url.startswith(prefix) for url in self._table)

    def take(self, url: str, meta: dict[str, Any]) -> bool:
        """Whether the object resource ``meta`` stored at ``url`` holds a body given up there; that body is
        then forgotten (its late copy has landed)."""
        body = (_int(meta.get("size")), meta.get("crc32c"))
        with self._lock:
            bodies = self._table.get(url, frozenset())
            if body not in bodies:
                return False
            if bodies - {body}:
                self._table[url] = bodies - {body}
            else:
                del self._table[url]
            return True


_given_up = _GivenUp()


def _renew_locks() -> None:
    _last_generations._lock = threading.Lock()
    _given_up._lock = threading.Lock()


# held across a fork: a thread noting a generation or a body given up then is not in the child, and a lock copied
# held by it would stop the child's first write for good (in-memory work under them, nothing else taken)
hold_across_fork("transfer", lambda: (_last_generations._lock, _given_up._lock), _renew_locks)


def given_up_under(prefix: str) -> bool:
    """Whether an upload request this process gave up on (its outcome unknown) may still land under the URL
    ``prefix``: a write that deletes first then stores every chunk, even one of only the fill value, since a
    late copy needing "no object" would land where it left none."""
    return _given_up.under(prefix)


async def last_writer_wins(fs: gcsfs.GCSFileSystem, path: GCSPath, size: int,
                           send: Callable[[int], Awaitable[T]], *, first: int | None = None,
                           races: int = RACES) -> T:
    """``send(generation)``: a plain write (the last writer wins) of ``size`` bytes, whose every request needs
    the generation it replaces (``ifGenerationMatch``), so that a try given up at the time limit and reaching
    the server after a later write is refused there instead of landing over it.

    That generation is ``first``, or the one this process last heard of at ``path``; unknown, 0 ("no
    object") for a small object and the server's for a larger one. An object another writer stored
    instead (``send`` raises ConflictError) is written over at its generation, up to ``races`` times.
    """
    replacing = first if first is not None else _last_generations.get(path.url)
    if replacing is None:
        replacing = 0 if size < ASK_FIRST_FROM else await _generation(fs, path)
    for race in range(1, races + 1):
        try:
            return await send(replacing)
        except ConflictError as e:
            if race == races:
                raise ConflictError(path.url, e.expected, e.actual, outcome=e.outcome, next_step=(
                    f"Other writers replaced it {races} times as this write was sent; write again.")) from e
            log.info("%s: another writer stored generation %d; writing over it", path.url, e.actual)
            replacing = e.actual
    raise AssertionError("unreachable")


def source_size(source: Source, url: str) -> int:
    """The bytes ``source`` holds, to be uploaded to ``url``: raises LocalFileNotFoundError when it is a
    local path that is not a file (the OS's error as its cause)."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return memoryview(source).nbytes
    cause: OSError | None = None
    try:
        found = os.stat(source)
        if stat.S_ISREG(found.st_mode):
            return found.st_size
    except (FileNotFoundError, NotADirectoryError) as e:
        cause = e
    raise LocalFileNotFoundError(f"{os.fspath(source)!r} is not a local file, so nothing was sent to {url}: "
                                 "check the path (a file, not a directory) and upload again.") from cause


@dataclass(frozen=True, slots=True)
class Uploaded:
    """What the server holds after a verified upload."""

    url: str  #: journal key ``gs://bucket/key``
    generation: int | None
    size: int
    crc32c: str  #: base64 of the big-endian CRC32C, as the JSON API reports it
    change: Change | None  #: the journal record made for this upload (None when the caller journals)


class _Mismatch(Exception):
    """The server stored (or sent) something other than the bytes it should have."""


class _CorruptKept(Exception):
    """A stored copy differs from what was sent, and deleting it failed: the server holds it."""


def _as_path(url: GCSPath | str | os.PathLike[str]) -> GCSPath:
    return url if isinstance(url, GCSPath) else parse_gcs(os.fspath(url), require_key=True)


def _filesystem(fs: gcsfs.GCSFileSystem | None) -> gcsfs.GCSFileSystem:
    return fs if fs is not None else gcs_filesystem()


# -- bucket existence ------------------------------------------------------------------------


async def _ensure_bucket(path: GCSPath, fs: gcsfs.GCSFileSystem) -> None:
    with _state.buckets_lock:
        if path.bucket in _state.known_buckets:
            return
    try:
        await bounded(fs, fs._call("GET", "b/{}", path.bucket, json_out=True))
    except FileNotFoundError as e:
        raise bucket_missing(path) from e
    except Exception as e:  # permissions may forbid bucket metadata; let the upload decide
        log.debug("could not read metadata of bucket %s (%s); assuming it exists", path.bucket, e)
        return
    with _state.buckets_lock:
        _state.known_buckets.add(path.bucket)


def ensure_bucket(path: GCSPath, fs: gcsfs.GCSFileSystem | None = None) -> None:
    """Raise :class:`BucketNotFoundError` unless ``path``'s bucket exists.

    One metadata request per bucket per process: a bucket seen once is
    remembered (if it is deleted later, the upload itself fails with the
    same error).
    """
    from fsspec.asyn import sync

    fs = _filesystem(fs)
    sync(fs.loop, _ensure_bucket, path, fs)


# -- upload ----------------------------------------------------------------------------------


def checked_guard(url: str, guard: object) -> int | None:
    """``if_generation_match`` as given (None, or a generation: an int, 0 for "no object yet"); anything else
    raises ConfigurationError naming ``url``, before any request."""
    if guard is None:
        return None
    if isinstance(guard, bool) or not isinstance(guard, int) or guard < 0:
        raise ConfigurationError(f"{url}: if_generation_match={guard!r} is not a generation; pass the "
                                 "object's generation (an int), or 0 to write only if it does not exist.")
    return guard


async def put_verified(
    fs: gcsfs.GCSFileSystem,
    url: GCSPath | str | os.PathLike[str],
    source: Source,
    *,
    content_type: str | None = None,
    record: bool = True,
    attempts: int = ATTEMPTS,
    chunk_size: int = CHUNK_SIZE,
    simple_limit: int = SIMPLE_LIMIT,
    media: bool = False,
    if_generation_match: int | None = None,
    expected_generation: int | None = None,
    plain: bool = False,
) -> Uploaded:
    """Upload ``source`` to ``url`` and verify it against the server's answer: THE way cloudio writes.

    Use this (on an asynchronous gcsfs, inside its loop) or :func:`upload`
    (synchronous) for every object cloudio or a tracked filesystem writes.
    The size and CRC32C in the object resource the upload request itself
    returns are compared with the bytes sent, so verifying costs no request.

    Parameters
    ----------
    fs
        The gcsfs filesystem to send through (asynchronous or not; awaited on its loop).
    url
        The destination object (``gs://b/k``, ``/vsigs/b/k``, a gcsfs path ``b/k`` is not accepted).
    source
        Bytes (a memoryview is sent without a copy of its own) or a local file path.
    content_type
        Defaults to a guess from the key's extension.
    record
        Journal the successful write here. Pass False when the caller journals
        it itself (``JournaledStore``); failures are journaled here either way.
    attempts
        Whole uploads tried when the stored object does not match what was sent.
    chunk_size, simple_limit
        Resumable chunk size (a multiple of 256 KiB) and the size from which
        a resumable upload is used.
    media
        Send in-memory bytes below ``simple_limit`` as one ``uploadType=media``
        request (:mod:`cloudio._gcs.fast`: no multipart body is built, so no copy).
    if_generation_match
        Write only if the object is at this generation (0: only if it does not
        exist). Sent as GCS's ``ifGenerationMatch`` precondition on every upload
        path; small uploads then go as one multipart request, the one path
        fake-gcs-server enforces it on, and resumable ones check the generation
        first as well (the emulator ignores it there; real GCS enforces it).
    expected_generation
        ``if_generation_match`` against a late copy of an earlier write (see
        :meth:`cloudio._zarr.store.JournaledStore.expecting`): sent with the
        upload, which stays a media upload (:data:`cloudio._gcs.fast.EXPECTED_AS_MULTIPART`).
    plain
        A plain write (:func:`last_writer_wins`): an object refusing the first
        request of the upload is another writer's, even when it holds the same
        bytes (its content type may differ, and a late copy could land over it).

    Raises
    ------
    IntegrityError
        What the server stored never matched what was sent. That object was
        deleted, and on a bucket without versioning the previous object with
        it: the message says so and the delete is journaled. When deleting a
        corrupt copy failed, the message says the object IS CORRUPT, and an
        invalidation is journaled.
    TransientError
        The server or network failed past gcsfs's retries (timeout, 5xx, reset),
        and the server, asked, does not hold what was sent (when it does, the
        upload's answers were lost after it landed: that is a success).
    BucketNotFoundError
        The bucket does not exist.
    ConflictError
        ``if_generation_match`` did not hold: nothing was stored or journaled
        (unless an earlier try's corrupt copy was deleted: the message says so,
        and an invalidation is journaled).
        (A retry that fails it because an earlier try, its answer lost, stored
        the object is no conflict: the server is asked whether it holds what
        was sent.)
    UploadError
        Any other refusal (403, 400...).
    """
    path = _as_path(url)
    if chunk_size % (256 * 1024):
        raise ValueError(f"chunk_size={chunk_size} must be a multiple of 256 KiB")
    if content_type is None:
        content_type = mimetypes.guess_type(path.key)[0] or "application/octet-stream"
    source_size(source, path.url)  # a local file that is not there is named before anything is sent
    last: BaseException | None = None
    deleted = False  # a corrupt copy was stored and deleted: the server holds nothing at path now
    guard, everywhere = ((if_generation_match, True) if if_generation_match is not None
                         else (expected_generation, fast.EXPECTED_AS_MULTIPART))
    changing = await journal().changing_async(path.url)  # GDAL reads of it wait until the outcome is recorded
    sent = False  # a request went out: cancelled from here on, the upload may have landed
    sums = _Sums(source)
    try:
        for attempt in range(max(1, attempts)):
            if attempt:
                delay = BACKOFF * 2 ** (attempt - 1)
                log.info("upload of %s: attempt %d of %d in %.2f s (%s)", path.url, attempt + 1, attempts, delay, last)
                await asyncio.sleep(delay)
            tried: list[int] = []
            counting = fast.tries.set(tried)
            try:
                sent = True
                meta = await _send(fs, path, sums, content_type, chunk_size, simple_limit, media, guard, everywhere)
                size, sent_crc = sums()
                generation = await _check_stored(fs, path, meta, size, sent_crc)
            except _Mismatch as e:
                deleted, last = True, e
                guard = 0 if guard is not None else None  # the copy that passed the guard is deleted
                continue
            except FileExistsError as e:  # gcsfs's mapping of 412: the precondition failed
                if guard is None:
                    raise
                # or a try whose answer was lost stored it, and its retry (the same precondition) found the
                # generation it made
                found = await _stored_now(fs, path)
                held = found if (not plain or len(tried) > 1) and _is(found, sums) else None
                if held is None:
                    if (if_generation_match is None and not plain and attempt + 1 < attempts
                            and _given_up.take(path.url, found)):  # cloudio's own guard (an explicit one stands)
                        log.info("%s: a late copy of this process's own upload, given up earlier, holds it; "
                                 "writing over it", path.url)
                        guard, last = _int(found.get("generation")), e
                        continue
                    raise ConflictError(path.url, guard, _int(found.get("generation"))) from e
                generation, size, sent_crc = int(held["generation"]), int(held["size"]), held["crc32c"]
                log.info("%s: a retry's precondition failed on the generation an earlier try stored", path.url)
            except FileNotFoundError as e:  # 404: no bucket, or a resumable session that vanished
                forget_bucket(path.bucket)
                await _ensure_bucket(path, fs)  # raises BucketNotFoundError when that is the reason
                last = e
                continue
            finally:
                fast.tries.reset(counting)
                if fast.UNANSWERED in tried and sums.in_memory:
                    _given_up.add(path.url, *sums())  # a try given up with no answer: it may land late
            return _uploaded(fs, path, generation, size, sent_crc, record)
        assert last is not None
        raise _failure(path, last, attempts, deleted) from last
    except BaseException as e:
        # in this order, also after an earlier try's corrupt copy was deleted: a corrupt copy kept, what a
        # try whose answer was lost stored, an outcome not known, and only then what the server no longer holds
        if isinstance(e, _CorruptKept):
            fs.invalidate_cache(path.fs_path)
            journal().record(path.url, "invalidate")
            raise IntegrityError(f"{path.url}: what the server stored differs from what was sent ({e}), and "
                                 f"deleting it failed ({e.__cause__}): THE OBJECT AT {path.url} IS CORRUPT. "
                                 "Delete it, or write it again (check the network path to GCS).") from e
        if (sent and isinstance(e, Exception) and not isinstance(e, ConflictError)  # (asked already)
                and (held := await _holds(fs, path, sums)) is not None):
            # a try whose answer was lost stored it (the error is a later try's, or the last answer's loss)
            log.info("%s: the upload's answers were lost, and the object holds what was sent", path.url)
            return _uploaded(fs, path, int(held["generation"]), int(held["size"]), held["crc32c"], record)
        if _outcome_unknown(e) or (sent and not isinstance(e, Exception)):
            # the upload may have landed and its answer been lost, or been cancelled on its way
            fs.invalidate_cache(path.fs_path)
            journal().record(path.url, "invalidate")
            if not isinstance(e, Exception) and sums.in_memory:
                _given_up.add(path.url, *sums())  # cancelled on its way (a failure was counted above)
        elif deleted:  # whatever else ended the upload, the server no longer holds the object ...
            fs.invalidate_cache(path.fs_path)
            if isinstance(e, ConflictError):  # ... but another writer's, stored since
                journal().record(path.url, "invalidate")
                raise ConflictError(path.url, e.expected, e.actual, outcome=(
                    "An earlier try of this write stored a corrupt copy, which was deleted (on a bucket without "
                    "versioning, with the object it replaced, if any); the object there now is the other "
                    "writer's.")) from e
            journal().record(path.url, "delete")
        if isinstance(e, CloudioError) or not isinstance(e, Exception):
            raise
        raise _failure(path, e, attempts, deleted) from e
    finally:
        changing.close()


def _uploaded(fs: gcsfs.GCSFileSystem, path: GCSPath, generation: int | None, size: int, crc: str,
              record: bool) -> Uploaded:
    """A confirmed upload: the cached listing dropped, the write journaled (``record``), counted."""
    fs.invalidate_cache(path.fs_path)
    change = journal().record(path.url, "write", generation=generation, size=size) if record else None
    count("uploads")
    count("bytes_uploaded", size)
    log.debug("uploaded %s (%d bytes, generation %s)", path.url, size, generation)
    return Uploaded(path.url, generation, size, crc, change)


async def put_verified_each(
    fs: gcsfs.GCSFileSystem,
    count_: int,
    body: Callable[[int], tuple[GCSPath, memoryview, int | None] | None],
    wrote: Callable[[int, GCSPath, int, int], None],
    concurrency: int,
) -> None:
    """:func:`put_verified` (``media=True``, ``record=False``) for many small objects at once.

    ``body(i)`` gives object ``i``'s path, bytes and ``expected_generation``
    (None: no precondition), or None: nothing to write; it may be called twice
    for one ``i`` and must then give the same.
    ``wrote(i, path, size, generation)`` is called once the server's answer matched the size
    and CRC32C sent: the caller journals it (which drops stale listings). The happy path goes out in one
    batch (:func:`cloudio._gcs.fast.put_each`); an object whose upload failed,
    timed out or was stored differently goes again through
    :func:`put_verified`, with its retries and errors. When this raises, every
    object whose outcome is not known (a request on its way, an upload not
    confirmed) is journaled as invalidated, as :func:`put_verified` does for one.
    """
    from cloudio._gcs.fast import put_each

    gates: dict[int, ExitStack] = {}
    unsure: dict[int, GCSPath] = {}  # sent, not confirmed
    waiting: list[int] = []  # a GDAL read of the object in flight: sent the careful way, which waits for it
    damaged: dict[int, int] = {}  # stored differently from what was sent: the generation of that copy

    def send(i: int) -> tuple[GCSPath, memoryview, int | None] | None:
        got = body(i)
        if got is None:
            return None
        gate = journal().changing(got[0].url, wait=False)  # GDAL reads of it wait until the outcome is recorded
        if gate is None:  # (not here: this runs on the event loop)
            waiting.append(i)
            return None
        gates[i] = gate
        unsure[i] = got[0]
        return got

    def stored(i: int, path: GCSPath, meta: dict[str, Any], size: int, crc: str) -> bool:
        # no fs.invalidate_cache here: on success the journal record wrote() makes drops the listings; on
        # a mismatch put_verified sends the object again and invalidates, and so does the finally below
        with gates.pop(i):
            if int(meta.get("size", -1)) != size or meta.get("crc32c") != crc:
                log.warning("%s: stored object differs from what was sent (size %s vs %s, crc32c %s vs %s); "
                            "writing it again", path.url, meta.get("size"), size, meta.get("crc32c"), crc)
                damaged[i] = int(meta.get("generation") or 0)  # a guarded write again replaces this copy
                return False
            del unsure[i]
            wrote(i, path, size, int(meta.get("generation") or 0))
            count("uploads")
            count("bytes_uploaded", size)
            return True

    abandoned: list[int] = []
    try:
        again = await put_each(fs, count_, send, stored, concurrency, abandoned,
                               lambda path, size, crc: _given_up.add(path.url, size, crc))
        for i in sorted(again + waiting):
            gate = gates.pop(i, None)
            if gate is not None:
                gate.close()
            got = body(i)
            if got is not None:
                expected = got[2] if got[2] is None else damaged.get(i, got[2])
                done = await put_verified(fs, got[0], got[1], content_type="application/octet-stream", record=False,
                                          media=True, expected_generation=expected)
                wrote(i, got[0], len(got[1]), done.generation or 0)
            unsure.pop(i, None)  # (one never sent is not there)
    finally:
        for gate in gates.values():
            gate.close()
        for path in unsure.values():  # the server may hold the new bytes or the old ones
            fs.invalidate_cache(path.fs_path)
            journal().record(path.url, "invalidate")


def _outcome_unknown(exc: BaseException) -> bool:
    """A failure after which the server may hold the new object or the old one (a lost answer)."""
    return isinstance(exc, TransientError) or (isinstance(exc, Exception) and is_transient(exc))


def _failure(path: GCSPath, exc: BaseException, attempts: int, deleted: bool) -> CloudioError:
    if deleted and _outcome_unknown(exc):
        gone = (f" THE PREVIOUS OBJECT AT {path.url} IS GONE: a corrupt upload replaced it and was deleted, and "
                "a later try's answer was lost: the object may now hold what was sent, or nothing. cloudio "
                "dropped what it had cached of it, so the next read asks the server.")
    elif deleted:
        gone = (f" THE PREVIOUS OBJECT AT {path.url} IS GONE: a corrupt upload replaced it and was deleted, "
                "so nothing is stored there now (the delete is journaled).")
    elif _outcome_unknown(exc):
        gone = (" The upload may or may not have been stored (its answer was lost): cloudio dropped what it "
                "had cached of the object, so the next read asks the server.")
    else:
        gone = " The server's object was not changed. Nothing was journaled."
    if isinstance(exc, _Mismatch):
        return IntegrityError(
            f"{path.url}: what the server stored differs from what was sent ({exc}) in all {attempts} "
            f"attempts.{gone} Check the network path to GCS (a proxy rewriting bodies?) and write again."
        )
    if is_transient(exc):
        err = transient_error(path.url, "upload", exc)
        return TransientError(f"{err}{gone}")
    return UploadError(
        f"{path.url}: upload failed ({type(exc).__name__}: {exc}).{gone} Check that the bucket is "
        "writable and GCS (or STORAGE_EMULATOR_HOST) is reachable, then write again."
    )


def upload(
    source: Source,
    url: GCSPath | str | os.PathLike[str],
    *,
    content_type: str | None = None,
    fs: gcsfs.GCSFileSystem | None = None,
    attempts: int = ATTEMPTS,
    chunk_size: int = CHUNK_SIZE,
    simple_limit: int = SIMPLE_LIMIT,
    if_generation_match: int | None = None,
) -> Uploaded:
    """:func:`put_verified` for synchronous callers: upload a local file or bytes, verify, journal; without
    ``if_generation_match``, the last writer wins, guarded against a late copy (:func:`last_writer_wins`).

    ``fs`` defaults to :func:`cloudio._gcs.client.gcs_filesystem` (plain, untracked:
    this function journals the write itself, exactly once). Raises what
    :func:`put_verified` raises; ``InvalidURLError`` when ``url`` names no object.
    """
    path = _as_path(url)
    fs = _filesystem(fs)
    put = functools.partial(put_verified, fs, path, source, content_type=content_type, attempts=attempts,
                            chunk_size=chunk_size, simple_limit=simple_limit)
    # interrupted (Ctrl-C): cancelled and ended before the interrupt is raised (fsspec's sync goes on sending)
    if if_generation_match is not None:
        return run_to_the_end(fs.loop, put(if_generation_match=if_generation_match))
    return run_to_the_end(fs.loop, last_writer_wins(fs, path, source_size(source, path.url),
                                                    lambda replacing: put(expected_generation=replacing, plain=True)))


async def _generation(fs: gcsfs.GCSFileSystem, path: GCSPath) -> int:
    """The generation the server holds at ``path`` now (0: no object), for a guard or a conflict's message."""
    return _int((await _stored_now(fs, path, fields="generation")).get("generation"))


async def _stored_now(fs: gcsfs.GCSFileSystem, path: GCSPath, fields: str = "generation,size,crc32c") -> dict[str, Any]:
    """``fields`` of the object the server holds at ``path`` now (empty: no object)."""
    try:
        return await bounded(fs, fs._call("GET", "b/{}/o/{}", path.bucket, path.key, json_out=True,  # type: ignore[no-any-return]
                                          fields=fields))
    except FileNotFoundError:
        return {}


def _int(value: Any) -> int:
    return int(value or 0)


async def _initiate(fs: gcsfs.GCSFileSystem, path: GCSPath, content_type: str, generation: int | None,
                    everywhere: bool) -> str:
    """A resumable upload session (gcsfs's ``initiate_upload``, with ``ifGenerationMatch`` when guarded;
    ``everywhere``: checked first too, as the emulator ignores it on this path)."""
    if generation is None:
        from gcsfs.core import initiate_upload

        return await initiate_upload(fs, path.bucket, path.key, content_type)  # type: ignore[no-any-return]
    if everywhere and await _generation(fs, path) != generation:
        raise FileExistsError(path.url)
    headers, _ = await fs._call("POST", f"{fs._location}/upload/storage/v1/b/{quote(path.bucket, safe='')}/o",
                                uploadType="resumable", name=path.key, ifGenerationMatch=str(generation),
                                json={"name": path.key}, headers={"X-Upload-Content-Type": content_type})
    location = headers["Location"]
    return str(location[0] if isinstance(location, list) else location)


async def _send(
    fs: gcsfs.GCSFileSystem,
    path: GCSPath,
    sums: _Sums,
    content_type: str,
    chunk_size: int,
    simple_limit: int,
    media: bool = False,
    guard: int | None = None,
    everywhere: bool = True,
) -> dict[str, Any]:
    """One upload of ``sums.source``; returns the server's object resource. The size and CRC32C of the
    bytes sent are put in ``sums`` as soon as all of them were read: a try whose last answer is lost
    can then be compared with what the server holds even when a local file has changed or gone since.

    ``guard``: the ``ifGenerationMatch`` precondition, or None; ``everywhere``: sent so that the emulator
    enforces it too (a multipart upload, see :func:`cloudio._gcs.fast.upload_form`).
    """
    # gcsfs's module-level upload helpers return the object resource the server
    # answered with (generation, size, crc32c): verification needs no extra request,
    # and cannot read a concurrent writer's object by mistake. fs._pipe_file drops it.
    from gcsfs.core import simple_upload, upload_chunk

    checksum = checksums.Running()
    # bytes in memory as one flat view; a local file by its path
    source = sums.source
    body: memoryview | str | os.PathLike[str] = (
        memoryview(source).cast("B") if isinstance(source, (bytes, bytearray, memoryview)) else source
    )
    size = body.nbytes if isinstance(body, memoryview) else os.path.getsize(body)
    if size < simple_limit:
        data: bytes | memoryview = body if isinstance(body, memoryview) else _read_all(body)
        checksum.update(data)
        sums.known = len(data), checksum.text()
        if guard is not None or (media and isinstance(body, memoryview)):
            meta = await bounded(fs, put_media(fs, path, data, content_type, guard, guard is not None and everywhere))
        else:
            meta = await bounded(fs, simple_upload(fs, path.bucket, path.key, data, None, "none", content_type))
        return meta  # type: ignore[no-any-return]
    location = await bounded(fs, _initiate(fs, path, content_type, guard, everywhere))
    last: dict[str, Any] | None = None  # the object resource, answered to the final chunk
    offset = 0
    try:
        for block in _chunks(body, chunk_size):
            checksum.update(block)
            if offset + len(block) == size:  # the last chunk: what the object holds if it lands
                sums.known = size, checksum.text()
            last = await bounded(fs, upload_chunk(fs, location, block, offset, size, content_type))
            offset += len(block)
    except BaseException:
        try:  # cancel the session: an unfinished resumable upload never becomes an object
            await bounded(fs, fs._call("DELETE", location))
        except Exception:  # the session expires on its own anyway
            log.debug("could not cancel resumable upload of %s", path.url, exc_info=True)
        raise
    if offset != size:
        raise UploadError(
            f"{path.url}: the local file changed size while uploading ({size} -> {offset} bytes); "
            "nothing was stored. Write again once the file is complete."
        )
    return last or {}


def _chunks(source: memoryview | str | os.PathLike[str], chunk_size: int) -> Iterator[bytes | memoryview]:
    if isinstance(source, memoryview):
        for offset in range(0, max(source.nbytes, 1), chunk_size):
            yield source[offset: offset + chunk_size]
        return
    with open(source, "rb") as f:
        while block := f.read(chunk_size):
            yield block


def _read_all(source: str | os.PathLike[str]) -> bytes:
    with open(source, "rb") as f:
        return f.read()


async def _check_stored(
    fs: gcsfs.GCSFileSystem, path: GCSPath, meta: dict[str, Any], size: int, sent_crc: str
) -> int | None:
    """Compare the stored object with what was sent; delete it and raise _Mismatch if it differs.

    ``meta`` is the upload's answer. When it lacks the size or CRC32C, the metadata of the
    generation it names is fetched (not the live object's: another writer may have stored
    one since, and it must not be checked, or deleted, as ours). When that generation is
    already gone (replaced), there is nothing of ours left to check: None is returned. An
    answer naming no generation leaves only the live object to read, maybe another writer's:
    it verifies when it holds what was sent, and otherwise is never deleted (IntegrityError,
    journaled as an invalidation).
    """
    sent = meta.get("generation")
    pin = {"generation": str(sent)} if sent not in (None, "", "0") else {}
    if "crc32c" not in meta or "size" not in meta:
        try:
            meta = await bounded(fs, fs._call("GET", "b/{}/o/{}", path.bucket, path.key, json_out=True, **pin))
        except FileNotFoundError:
            if not pin:
                raise
            log.info("%s: generation %s was replaced before it could be verified; nothing of it is left",
                     path.url, sent)
            return None
    generation = int(meta["generation"]) if meta.get("generation") not in (None, "", "0") else None
    got_size = int(meta.get("size", -1))
    got_crc = meta.get("crc32c")
    if got_size == size and got_crc == sent_crc:
        return generation
    if not pin:  # the live object, read for want of the generation this upload made: maybe another writer's
        fs.invalidate_cache(path.fs_path)
        journal().record(path.url, "invalidate")
        raise IntegrityError(
            f"{path.url}: the upload was stored, but its answer did not say which generation it made, and the "
            f"object there now differs from what was sent (server reports size {got_size} and CRC32C {got_crc}, "
            f"sent {size} bytes with CRC32C {sent_crc}): another writer may have stored it since, or the bytes "
            "were changed on the way. Nothing was deleted, and cloudio dropped what it had cached of the object. "
            "Read it to know which, or write again.")
    log.warning("%s: stored object differs from what was sent (size %s vs %s, crc32c %s vs %s); deleting it",
                path.url, got_size, size, got_crc, sent_crc)
    params = {"generation": str(generation)} if generation is not None else {}
    try:  # naming the generation: on real GCS a concurrent newer write is never removed
        await bounded(fs, fs._call("DELETE", "b/{}/o/{}", path.bucket, path.key, **params))
    except FileNotFoundError:
        pass
    except Exception as e:
        raise _CorruptKept(f"server reports size {got_size} and CRC32C {got_crc}, sent {size} bytes with CRC32C "
                           f"{sent_crc}") from e
    finally:
        fs.invalidate_cache(path.fs_path)
    raise _Mismatch(f"server reports size {got_size} and CRC32C {got_crc}, sent {size} bytes with CRC32C {sent_crc}")


# -- download --------------------------------------------------------------------------------


def object_generation(url: GCSPath | str | os.PathLike[str], fs: gcsfs.GCSFileSystem | None = None) -> int:
    """The generation the server holds at ``url`` now, 0 when there is no object (one metadata request)."""
    from fsspec.asyn import sync

    fs = _filesystem(fs)
    return sync(fs.loop, _generation, fs, _as_path(url))  # type: ignore[no-any-return]


async def _holds(fs: gcsfs.GCSFileSystem, path: GCSPath, sums: _Sums) -> dict[str, Any] | None:
    """The object's resource when the server holds exactly the source of ``sums`` (size and CRC32C; one
    metadata request); None when it holds something else, or cannot be asked, or the local file sent is
    gone and cannot be summed to compare."""
    try:
        meta = await bounded(fs, fs._call("GET", "b/{}/o/{}", path.bucket, path.key, json_out=True))
        return meta if _is(meta, sums) else None
    except Exception as e:  # gone, refused, or still no answer: not known to hold it
        log.debug("%s: could not tell what the server holds after the upload (%s)", path.url, e)
        return None


def _is(meta: dict[str, Any], sums: _Sums) -> bool:
    """Whether the object resource ``meta`` holds exactly the source of ``sums`` (size and CRC32C)."""
    if not meta:
        return False
    size, crc = sums()
    return str(meta.get("size")) == str(size) and meta.get("crc32c") == crc


class _Sums:
    """The size and CRC32C (as the JSON API reports it) of what uploading ``source`` sends, summed at most
    once: a try's :func:`_send` puts them in once it has read all of the source, and the paths of a failed
    try ask for them (summing the source only when no try read it all)."""

    def __init__(self, source: Source) -> None:
        self.source = source
        self.in_memory = isinstance(source, (bytes, bytearray, memoryview))
        self.known: tuple[int, str] | None = None

    def __call__(self) -> tuple[int, str]:
        if self.known is None:
            if isinstance(self.source, (bytes, bytearray, memoryview)):
                data = memoryview(self.source).cast("B")
                self.known = data.nbytes, checksums.of(data)
            else:
                self.known = os.path.getsize(self.source), checksums.of_file(self.source)
        return self.known


def download(
    url: GCSPath | str | os.PathLike[str],
    local: str | os.PathLike[str],
    *,
    fs: gcsfs.GCSFileSystem | None = None,
    attempts: int = ATTEMPTS,
) -> dict[str, Any]:
    """Copy the current object at ``url`` to the local file ``local``; return its metadata.

    The object's metadata is fetched first and the file's size and CRC32C
    are checked against it, so an object overwritten during the download is
    fetched again rather than torn. The bytes' request is bounded as a tracked
    filesystem's ``get`` is (:func:`cloudio._gcs.client.bounded_while_arriving`):
    given up when nothing arrives for the time limit of one call, not while
    bytes keep arriving (gcsfs reports a large object's bytes a range at a
    time: a range taking longer than that limit is given up).

    Raises
    ------
    ObjectNotFoundError, BucketNotFoundError, IntegrityError, TransientError, ReadError (refused)
    """
    import time

    from fsspec.asyn import sync

    from cloudio._gcs.client import Arrivals, bounded_while_arriving, is_refusal, read_refused

    path = _as_path(url)
    fs = _filesystem(fs)
    target = os.fspath(local)
    last = ""
    for attempt in range(max(1, attempts)):
        if attempt:
            time.sleep(BACKOFF * 2 ** (attempt - 1))
        meta = object_metadata(path, fs, diagnose=True)  # its failures are cloudio's (a refusal: ReadError)
        fs.invalidate_cache(path.fs_path)  # gcsfs takes sizes from its listing cache; make it ask
        try:  # gcsfs retries a download never answered for minutes: given up once nothing arrives in time
            arrivals = Arrivals()
            sync(fs.loop, bounded_while_arriving, fs, fs._get_file(path.fs_path, target, callback=arrivals),
                 arrivals.progress)
        except FileNotFoundError:
            last = "the object disappeared during the download"
            continue  # deleted in between: the next metadata request says so
        except Exception as e:
            if is_transient(e):  # (fsspec's sync hides the idle limit's TimeoutError behind an empty FSTimeoutError)
                why = e.__cause__ if isinstance(e, TimeoutError) and isinstance(e.__cause__, TimeoutError) else e
                raise transient_error(path.url, "download", why) from e
            if is_refusal(e):
                raise read_refused(path.url, e) from e
            raise
        got, crc = os.path.getsize(local), checksums.of_file(local)
        if got == int(meta.get("size", -1)) and crc == meta.get("crc32c"):
            return meta
        last = (f"got {got} bytes with CRC32C {crc}, "
                f"metadata says {meta.get('size')} / {meta.get('crc32c')}")
        log.info("download of %s did not match its metadata (%s); retrying", path.url, last)
    raise IntegrityError(
        f"{path.url}: downloaded bytes never matched the object's metadata ({last}); is it being "
        "overwritten continuously? Retry when writes to it have stopped."
    )
