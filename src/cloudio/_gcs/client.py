"""THE GCS client module: plain (untracked) gcsfs filesystems for the endpoint in force,
and the one object-metadata request with its not-found diagnosis.

cloudio's own uploads and metadata requests go through these; user-facing
tracked filesystems live in :mod:`cloudio._fsspec.filesystem`. Every "no such
object" and "no such bucket" error of the GDAL face and of transfers is made
by :func:`not_found` (one bucket-missing message, :func:`bucket_missing`).

Time limits. gcsfs waits forever by default: a server that accepts and never
answers hangs ``cat`` for good. Every filesystem cloudio makes (these, and
:func:`cloudio.filesystem`) passes gcsfs ``requests_timeout`` as an
``aiohttp.ClientTimeout`` with connect and read limits of
``CLOUDIO_HTTP_TIMEOUT`` seconds (default 30, :func:`cloudio._config.http_timeout`,
shared with GDAL): a request may take as long as
bytes keep arriving, but no step may stay silent longer. gcsfs retries such a
failure up to 6 times with backoff; a tracked filesystem also gives up one
whole call, retries included, once no byte of an answer has arrived for
``TOTAL_FACTOR`` times the limit, plus the longest wait gcsfs makes before
its first retry (2 s: at a limit of a second, a request given up would
otherwise leave its retry no time), and raises :class:`~cloudio.TransientError`
then; cloudio's own requests through :func:`bounded` are given up once
nothing moved for that time (the bytes of its uploads going out count:
:class:`Sent`). An explicit ``requests_timeout``
storage option wins over the environment variable.
"""

from __future__ import annotations

import asyncio
import atexit
import contextvars
import json
import logging
import sys
import threading
import time
import weakref
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

from fsspec.callbacks import Callback, NoOpCallback

from cloudio import _state
from cloudio._config import (
    connect_timeout,
    emulator_endpoint,
    gcsfs_options,
    http_timeout,
    prepare_gcsfs_import,
    require_credentials,
)
from cloudio._paths import GCSPath
from cloudio.errors import BucketNotFoundError, ObjectNotFoundError, ReadError, TransientError

if TYPE_CHECKING:
    import gcsfs

log = logging.getLogger(__name__)

#: one tracked call, retries included, may take this many times the limit (and gcsfs's first wait: below)
TOTAL_FACTOR = 3
#: the longest gcsfs waits before its first retry (``random() + 1`` seconds, ``gcsfs.retry.retry_request``)
GCSFS_FIRST_RETRY_WAIT = 2.0


def http_options() -> dict[str, Any]:
    """gcsfs options bounding every request (see the module docstring)."""
    import aiohttp

    return {"requests_timeout": aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout(),
                                                      sock_read=http_timeout())}


def total_time_limit(requests_timeout: Any) -> float | None:
    """How long one call of a filesystem with this ``requests_timeout`` may take, retries included."""
    if isinstance(requests_timeout, (int, float)):
        return TOTAL_FACTOR * float(requests_timeout)
    limits = [getattr(requests_timeout, a, None) for a in ("total", "sock_read", "sock_connect", "connect")]
    known = [float(v) for v in limits if v]
    return TOTAL_FACTOR * max(known) if known else None


def gcsfs_call_limit(requests_timeout: Any) -> float | None:
    """How long one call through gcsfs's own requests (its retries inside) may take: :func:`total_time_limit`
    and gcsfs's longest wait before its first retry, so that a request given up at the limit is always tried
    again once (cloudio's own requests wait a quarter of a second first, :mod:`cloudio._gcs.fast`)."""
    limit = total_time_limit(requests_timeout)
    return None if limit is None else limit + GCSFS_FIRST_RETRY_WAIT


def gcs_filesystem(*, asynchronous: bool = False, **kwargs: Any) -> gcsfs.GCSFileSystem:
    """A gcsfs filesystem for the emulator in force (or real GCS), fsspec-cached as usual.

    Explicit ``kwargs`` win over the emulator's options and the time limits.
    Its listings are guarded against fills an invalidation overtook.
    """
    prepare_gcsfs_import()
    import gcsfs

    from cloudio._fsspec.consumer import guard_listings

    opts: dict[str, Any] = {**gcsfs_options(), **http_options(), **kwargs}
    if "token" not in opts:
        require_credentials("gs:// URLs")  # fail now, not after minutes of retries against Google
    if not asynchronous:
        fs = gcsfs.GCSFileSystem(**opts)
        guard_listings(fs)
        return fs
    fs = gcsfs.GCSFileSystem(**opts, asynchronous=True)
    guard_listings(fs)
    # Kept for the life of the process (cloudio._state.keep_async). gcsfs's finalizer closes
    # an asynchronous instance's session on fsspec's own loop, not the loop (zarr's) that
    # owns it, and raises "attached to a different loop" from the garbage collector
    # (fsspec/gcsfs#606 fixed the synchronous case only). They live as long as fsspec's
    # instance cache would keep them anyway; this only stops ``clear_instance_cache()``
    # from handing them to that finalizer.
    keep_alive(fs)
    return fs


def keep_alive(fs: gcsfs.GCSFileSystem) -> None:
    """Keep the asynchronous ``fs`` from gcsfs's finalizer for the life of the process (see above)."""
    if not any(k is fs for k in _state.keep_async):
        if not _state.keep_async:
            # gcsfs's finalizer still runs at exit, after this (finalizers run at exit before the
            # exit functions registered after them: one made first makes sure of the order)
            weakref.finalize(keep_alive, lambda: None)
            atexit.register(_close_kept)
        _state.keep_async.append(fs)


def _close_kept() -> None:
    """At exit, close the kept instances' sessions on the loop that owns them, while it still runs
    (else their connections directly), a second at most for all: gcsfs's finalizer then finds them
    closed and does nothing, instead of printing "attached to a different loop" and "Task was
    destroyed but it is pending"."""
    sessions = [s for s in (getattr(fs, "_session", None) for fs in _state.keep_async) if s is not None]
    closing = []
    for session in sessions:
        loop = getattr(session, "_loop", None)
        if not session.closed and loop is not None and loop.is_running():
            closing.append(asyncio.run_coroutine_threadsafe(session.close(), loop))
    deadline = time.monotonic() + 1.0
    for future in closing:
        try:
            future.result(timeout=max(0.0, deadline - time.monotonic()))
        except Exception as e:  # at exit: the direct close below is the fallback
            log.debug("closing a gcsfs session at exit: %s: %s", type(e).__name__, e)
    for session in sessions:
        connector = getattr(session, "_connector", None)
        if not session.closed and connector is not None:
            connector._close()


def where() -> str:
    """The server in force, for messages."""
    ep = emulator_endpoint()
    return f"the emulator at {ep.url}" if ep is not None else "Google Cloud Storage"


def object_metadata(path: GCSPath, fs: gcsfs.GCSFileSystem | None = None, *,
                    diagnose: bool = False) -> dict[str, Any]:
    """The object's JSON-API resource: exactly one ``GET /storage/v1/b/<b>/o/<key>``, never cached.

    Its failures are cloudio's, naming the URL: every caller (a download, GDAL's diagnosis of a failed open)
    would otherwise name gcsfs's HTTP path, or let its HttpError (no OSError) out. A missing object is an
    :class:`ObjectNotFoundError` that does not tell a missing bucket from a missing object unless
    ``diagnose`` (:func:`not_found`: one bucket request more); GDAL's callers tell it themselves (a listing
    first: a folder, a Zarr store), and would otherwise ask for the bucket twice.

    Raises
    ------
    ObjectNotFoundError, BucketNotFoundError (``diagnose``), TransientError, ReadError (refused)
    """
    fs = fs if fs is not None else gcs_filesystem()
    try:
        return call_bounded(fs, fs._call("GET", "b/{}/o/{}", path.bucket, path.key, json_out=True))
    except FileNotFoundError as e:
        forget_bucket(path.bucket)  # the bucket may be gone: an upload asks again
        if diagnose:
            raise not_found(path, fs) from e
        raise ObjectNotFoundError(
            f"{path.url} does not exist on {where()}: its metadata request was answered 404 (no such object, "
            "or no such bucket). Check the URL, or write the object first."
        ) from e
    except Exception as e:
        if is_transient(e):
            raise transient_error(path.url, "reading the object's metadata", e) from e
        if is_refusal(e):
            raise read_refused(path.url, e, "a read of its metadata") from e
        raise


def forget_bucket(bucket: str) -> None:
    """Forget that ``bucket`` exists: the next upload to it asks again (a 404 may mean it was deleted)."""
    with _state.buckets_lock:
        _state.known_buckets.discard(bucket)


def bucket_missing(path: GCSPath) -> BucketNotFoundError:
    """THE error for a bucket that does not exist (raise it ``from`` the library's error)."""
    return BucketNotFoundError(
        f"{path.url}: bucket gs://{path.bucket} does not exist on {where()}. Check the bucket name, or "
        f"create the bucket first (gcloud storage buckets create gs://{path.bucket}, or "
        f"Emulator.create_bucket({path.bucket!r}) against the emulator)."
    )


def not_found(path: GCSPath, fs: gcsfs.GCSFileSystem | None = None) -> ObjectNotFoundError:
    """Why ``path`` was not found: its bucket is missing, or the object (one bucket request to tell).

    Raises :class:`TransientError` (gcsfs's error as its cause) when that request fails past the retries or
    gets no answer in time: which of the two is missing is then not known. Refused (no permission to read
    bucket metadata, a 400...), it says what is certain: the object is missing.
    """
    fs = fs if fs is not None else gcs_filesystem()
    try:
        call_bounded(fs, fs._call("GET", "b/{}", path.bucket, json_out=True))
    except FileNotFoundError:
        return bucket_missing(path)
    except Exception as e:  # gcsfs's HttpError (a 5xx or 429 past its retries, a 400) is no OSError
        if is_transient(e):
            raise transient_error(path.url, "checking whether its bucket exists (the object was not found)",
                                  e) from e
        if not (isinstance(e, OSError) or is_refusal(e)):
            raise
        log.debug("could not read metadata of bucket %s: %s", path.bucket, e)
    return ObjectNotFoundError(
        f"{path.url} does not exist on {where()} (checked the object's metadata). Check the key (list "
        f"gs://{path.bucket}/{path.parent.key} with cloudio.filesystem(url).ls(...)), or open it with "
        "mode 'w' to create it."
    )


# -- failures and time limits shared by every transfer ---------------------------------------

T = TypeVar("T")

#: whole-upload (or whole-read) attempts after a CRC32C mismatch, on top of gcsfs's per-request retries
ATTEMPTS = 3
BACKOFF = 0.25  # seconds before the 2nd attempt; doubles each time


def is_transient(exc: BaseException) -> bool:
    """Network trouble or a 408/429/5xx answer that outlasted gcsfs's retries: worth retrying later."""
    if isinstance(exc, (asyncio.TimeoutError, ConnectionError, TimeoutError)):
        return True
    if isinstance(exc, (UnicodeDecodeError, json.JSONDecodeError)):  # an answer garbled on the way
        return True
    try:
        import aiohttp
        from gcsfs.retry import is_retriable
    except ImportError:  # pragma: no cover - both are gcsfs dependencies
        return False
    return isinstance(exc, aiohttp.ClientError) or is_retriable(exc)


def is_http_error(exc: BaseException) -> bool:
    """gcsfs's ``HttpError``: what its ``validate_response`` raises for an answer other than 403, 404 and 412
    (a 400, a 409, a 5xx or 429 past its retries; cloudio's own transport maps answers with it too). Not an
    OSError: caught as one, it escapes."""
    retry = sys.modules.get("gcsfs.retry")  # imported with gcsfs, which raised it
    return retry is not None and isinstance(exc, retry.HttpError)


def is_refusal(exc: BaseException) -> bool:
    """gcsfs's error for a request the server refused (403, 400, 409...; not 404 or 412, not a transient
    one): its HttpError, or the bare OSError ("Forbidden: ...") and ValueError ("Bad Request: ...") it raises
    for some. Why: its downloads bypass a tracked filesystem's ``_call``, which names the others."""
    if is_http_error(exc):
        return not is_transient(exc)
    return type(exc) in (OSError, ValueError) and str(exc).startswith(("Forbidden", "Bad Request"))


def read_refused(url: str, exc: BaseException, doing: str = "a read") -> ReadError:
    """THE error for a read (or ``doing``: "a listing"...) the server refused (raise it ``from exc``), on every
    face: a tracked filesystem's ``_call`` and downloads, the Zarr store, object metadata. A 403 keeps gcsfs's
    "Forbidden" prefix: gcsfs's ``_get_object`` falls back to a listing on it."""
    forbidden = "Forbidden: " if str(exc).startswith("Forbidden") else ""
    return ReadError(f"{forbidden}{url}: the server refused {doing} ({type(exc).__name__}: {exc}). Check the "
                     "URL and that your credentials may read it, then read again.")


def transient_error(url: str, doing: str, exc: BaseException) -> TransientError:
    """The :class:`TransientError` for ``exc`` (raise it ``from exc``): ``doing`` failed past the retries."""
    if isinstance(exc, (UnicodeDecodeError, json.JSONDecodeError)):
        return TransientError(
            f"{url}: {doing} failed: the server's answer arrived garbled ({type(exc).__name__}: {exc}); "
            "something between here and GCS changed it. Retry; if it persists, check proxies on the way."
        )
    return TransientError(
        f"{url}: {doing} failed past the retries ({type(exc).__name__}: {str(exc) or 'no answer'}). "
        "GCS (or STORAGE_EMULATOR_HOST) is unreachable, overloaded or too slow; retry later "
        "(CLOUDIO_HTTP_TIMEOUT sets how long one request may stay silent)."
    )


class Sent:
    """The bytes of an upload's body the server took so far, told by the try sending it (:meth:`reached`), what
    :func:`bounded` watches: a long upload is not given up while its bytes go out.

    Only whole steps of :data:`STEP` bytes beyond what an earlier try of the call sent count: a body sent again
    and again to a server that never answers (or takes no more of it) must not put off giving it up for good, and
    the few bytes more a peer's window takes on each try did (16 s where 8 were the limit). Told from sender
    threads too: an abandoned try's and its retry's at once."""

    #: the bytes one step of progress takes (at the default limit, a link slower than 3 KiB/s is given up)
    STEP = 1 << 18

    def __init__(self) -> None:
        self.steps = 0
        self._lock = threading.Lock()  # (a check and a set: never a step back)

    def reached(self, taken: int) -> None:
        """This try's body has been taken up to ``taken`` bytes."""
        steps = taken // self.STEP
        if steps > self.steps:
            with self._lock:
                self.steps = max(self.steps, steps)

    def progress(self) -> int:
        return self.steps


#: inside :func:`bounded`: the progress of the call's upload, which the try sending it tells
sending: contextvars.ContextVar[Sent | None] = contextvars.ContextVar("cloudio_gcs_sending", default=None)


async def bounded(fs: gcsfs.GCSFileSystem, call: Awaitable[T]) -> T:
    """Await one gcsfs call (its retries included), given up once nothing moved for the time limit of ``fs``:
    an upload of cloudio's own transport tells the bytes it sent (:data:`sending`), and a call that tells
    nothing is bounded in total to that time.

    gcsfs's per-request timeout does not bound its six retries and their
    back-off; a server that accepts and never answers would hold a write for
    minutes. The limit is the one tracked filesystems use
    (:func:`gcsfs_call_limit`, from ``CLOUDIO_HTTP_TIMEOUT``). Why not a limit in total: a large shard over a
    slow uplink takes longer than that while its bytes still go out (48 MiB at 4 MiB/s was given up at 7 s
    with ``CLOUDIO_HTTP_TIMEOUT=2``).
    """
    sent = Sent()
    token = sending.set(sent)  # (the call's task, made in while_arriving, copies it)
    try:
        return await bounded_while_arriving(fs, call, sent.progress)
    finally:
        sending.reset(token)


def call_bounded(fs: gcsfs.GCSFileSystem, call: Awaitable[T]) -> T:
    """:func:`bounded` from a thread outside ``fs``'s loop (blocking): a gcsfs call that ends within the time
    limit, or raises TimeoutError (an OSError). ``call`` is closed when it never ran (fsspec's ``sync`` refuses a
    call made on that loop, or a closed loop, and leaves it never awaited)."""
    import inspect

    from fsspec.asyn import sync

    try:
        return sync(fs.loop, bounded, fs, call)  # type: ignore[no-any-return]
    finally:
        if inspect.iscoroutine(call) and inspect.getcoroutinestate(call) == inspect.CORO_CREATED:
            call.close()  # (one that ran is the loop's to end)


async def bounded_while_arriving(fs: gcsfs.GCSFileSystem, call: Awaitable[T], arrived: Callable[[], int]) -> T:
    """Await one gcsfs download for as long as its bytes keep arriving (:func:`while_arriving`, ``arrived``: an
    :class:`Arrivals`' ``progress``) within the time limit of one call (:func:`gcsfs_call_limit`: a range of a
    download in ranges, read through a tracked filesystem's ``_call``, takes at most that long before it
    arrives whole).

    Why not :func:`bounded`: a large download may take longer than that limit in all and must not be cut short,
    but gcsfs retries a download that never answers for minutes (its request bypasses ``_call``).
    """
    limit = gcsfs_call_limit(getattr(fs, "requests_timeout", None))
    return await (call if limit is None else while_arriving(call, limit, arrived))


async def while_arriving(call: Awaitable[T], limit: float, progress: Callable[[], int],
                         first: float | None = None) -> T:
    """Await ``call`` for as long as ``progress()`` keeps changing: given up (TimeoutError, an OSError) once it
    has not changed for ``limit`` seconds (``first`` seconds from the start, when given), or from the last change
    seen (looked at every quarter of ``limit`` at least). The call has ended before the caller hears, as
    ``asyncio.wait_for``'s does: gcsfs removes a partial local file as the cancel reaches it."""
    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(call)
    try:
        seen = progress()
        deadline = loop.time() + (limit if first is None else first)
        while True:
            done, _ = await asyncio.wait({task}, timeout=max(min(limit / 4, deadline - loop.time()), 0))
            if done:
                return task.result()
            now = progress()
            if now != seen:
                seen, deadline = now, loop.time() + limit
            elif loop.time() >= deadline:
                raise TimeoutError(f"no byte arrived for {limit:g} s")
    finally:
        if not task.done():
            task.cancel()
            await asyncio.wait({task})
            if not task.cancelled():
                task.exception()  # (its own failure, if it failed meanwhile: retrieved, the caller's error stands)


class Arrivals(Callback):  # type: ignore[misc]  # fsspec ships no type information
    """The callback a download is given to tell its progress: every report gcsfs makes of bytes received, passed
    on to the caller's callback (``inner``).

    Why not the local file's size: gcsfs downloads a large object in ranges into a file it first sizes in full,
    so the size never changes while the bytes arrive; both its download paths report each piece received here.
    """

    def __init__(self, inner: Any = None) -> None:
        super().__init__()
        self.inner = inner if inner is not None else NoOpCallback()
        self.reports = 0

    def progress(self) -> int:
        """How many reports arrived so far: what :func:`bounded_while_arriving` watches."""
        return self.reports

    def set_size(self, size: Any) -> None:
        self.inner.set_size(size)

    def relative_update(self, inc: int = 1) -> None:
        self.reports += 1
        self.inner.relative_update(inc)

    def absolute_update(self, value: Any) -> None:
        self.reports += 1
        self.inner.absolute_update(value)
