"""The data path's transport: uploads and whole-object GETs without a fresh buffer per object.

Upload: one ``uploadType=media`` request with the caller's buffer as its body.
Why: gcsfs's ``simple_upload`` sends a multipart body it builds by
concatenating a JSON part, the data and a trailer: a fresh copy of every
shard (a 16 MiB memcpy into new, unfaulted memory per shard), and the
server then parses the multipart framing. A media upload names the object in
the query and sends the buffer as it is: aiohttp writes a memoryview to the
socket without copying it. Measured on the emulator (16 objects of 16 MiB,
10 in flight): 121-142 MiB/s through ``simple_upload`` against 179-272 MiB/s
as media uploads, the range tensorstore's kvstore reaches on the same objects
(``benchmarks/bench_peers.py``).

The request goes through gcsfs's ``_call``: its session, credentials, time
limits, retries of 408/429/5xx and error mapping all apply unchanged. The
answer is the object resource (size, CRC32C, generation) that
:func:`cloudio._gcs.transfer.put_verified` checks against the bytes sent, as
for every other upload.

Download (:func:`fetch_into`): gcsfs's ``cat`` joins a response into a new
``bytes`` object, a fresh 16 MiB per shard whose pages are all first-touched;
here a worker thread reads the body from the socket straight into a buffer
the caller reuses for every shard, and its CRC32C is compared with the
response's X-Goog-Hash. obstore's GET, the fastest plain transport among
the peers (``benchmarks/bench_peers.py --transports``), was not taken: it is
slower than this on the same objects, and it does not expose the
X-Goog-Hash header, so checking each shard would cost a metadata request
per object.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import http.client
import logging
import math
import socket
import ssl
import threading
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlsplit

import google_crc32c
import numpy as np

from cloudio._config import http_timeout
from cloudio._gcs.client import (
    ATTEMPTS,
    BACKOFF,
    TOTAL_FACTOR,
    bounded,
    header_crc,
    is_transient,
    total_time_limit,
    transient_error,
)
from cloudio._paths import GCSPath
from cloudio.errors import IntegrityError

if TYPE_CHECKING:
    import gcsfs

log = logging.getLogger(__name__)


async def put_media(
    fs: gcsfs.GCSFileSystem, path: GCSPath, data: bytes | memoryview, content_type: str
) -> dict[str, Any]:
    """Upload ``data`` to ``path`` in one media request; return the server's object resource."""
    url = f"{fs._location}/upload/storage/v1/b/{quote(path.bucket, safe='')}/o"
    meta = await fs._call("POST", url, uploadType="media", name=path.key,
                          headers={"Content-Type": content_type}, data=data, json_out=True)
    return meta  # type: ignore[no-any-return]


class _TooLarge(Exception):
    """The object does not fit the caller's buffer."""


# -- downloads: blocking GETs in worker threads, straight into the caller's buffer ------------------


class _Connections(threading.local):
    """Each thread's keep-alive connections, one per origin (scheme, host, port)."""

    def __init__(self) -> None:
        self.by_origin: dict[tuple[str, str, int], http.client.HTTPConnection] = {}


_connections = _Connections()


@functools.cache
def _tls() -> ssl.SSLContext:
    try:
        import certifi

        return ssl.create_default_context(cafile=certifi.where())
    except ImportError:  # pragma: no cover - certifi comes with google-auth's requests
        return ssl.create_default_context()


class _NoDelay:
    """Requests go out at once (``TCP_NODELAY``): Nagle's algorithm held each small GET back
    (0.82 against 0.58 ms per request on the emulator, where tensorstore takes 0.59)."""

    sock: socket.socket

    def connect(self) -> None:
        super().connect()  # type: ignore[misc]
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _HTTP(_NoDelay, http.client.HTTPConnection):
    pass


class _HTTPS(_NoDelay, http.client.HTTPSConnection):
    pass


def _connection(origin: tuple[str, str, int], timeout: float) -> http.client.HTTPConnection:
    conn = _connections.by_origin.get(origin)
    if conn is None:
        scheme, host, port = origin
        conn = (_HTTPS(host, port, timeout=timeout, context=_tls()) if scheme == "https"
                else _HTTP(host, port, timeout=timeout))
        _connections.by_origin[origin] = conn
    elif conn.timeout != timeout:  # another filesystem, with another time limit, kept this connection
        conn.timeout = timeout
        if conn.sock is not None:
            conn.sock.settimeout(timeout)
    return conn


def _drop(origin: tuple[str, str, int]) -> None:
    """Close this thread's connection to ``origin`` (after a failure its stream may be out of step)."""
    conn = _connections.by_origin.pop(origin, None)
    if conn is not None:
        conn.close()


def _socket_timeout(fs: gcsfs.GCSFileSystem) -> float:
    """Seconds one socket operation may wait: the filesystem's per-request limit, else ``CLOUDIO_HTTP_TIMEOUT``."""
    limit = total_time_limit(getattr(fs, "requests_timeout", None))
    return limit / TOTAL_FACTOR if limit else http_timeout()


def _fetch_once(fs: gcsfs.GCSFileSystem, url: str, buf: np.ndarray, deadline: float) -> tuple[int, str | None, str]:
    """One GET of ``url`` into ``buf``: bytes received, the server's CRC32C (base64) or None, ours."""
    from gcsfs.retry import validate_response

    parts = urlsplit(url)
    origin = (parts.scheme, parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80))
    conn = _connection(origin, _socket_timeout(fs))
    try:
        conn.request("GET", f"{parts.path}?{parts.query}", headers=fs._get_headers(None))
        r = conn.getresponse()
        if r.status >= 400:  # gcsfs's own mapping: 404 -> FileNotFoundError, 5xx/429 -> retriable HttpError
            validate_response(r.status, r.read(), url)
        if r.length is not None and r.length > len(buf):
            raise _TooLarge(f"{r.length} bytes, more than {len(buf)}")
        view = memoryview(buf)  # type: ignore[arg-type]  # numpy declares __buffer__ for Python >= 3.12 only
        n = 0
        while True:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the answer took longer than the time limit ({n} bytes received)")
            if n == len(buf):
                if r.read(1):
                    raise _TooLarge(f"more than {len(buf)} bytes")
                break
            got = r.readinto(view[n:])
            if not got:
                break
            n += got
        want = header_crc(r.headers)
    except BaseException:
        _drop(origin)
        raise
    crc = google_crc32c.value(buf[:n])
    return n, want, base64.b64encode(crc.to_bytes(4, "big")).decode("ascii")


def _failed_transiently(e: BaseException) -> bool:
    return isinstance(e, http.client.HTTPException) or (is_transient(e) and not isinstance(e, FileNotFoundError))


def fetch_into(fs: gcsfs.GCSFileSystem, path: GCSPath, buf: np.ndarray, *,
               attempts: int = ATTEMPTS) -> memoryview | None:
    """The whole object at ``path``, read into ``buf`` and checked against the response's CRC32C.

    Blocking: run it in worker threads (:func:`cloudio._zarr.shard_codec.read`),
    for objects of a MiB or more. Why not gcsfs's aiohttp session there: the
    body arrives as a new bytes object per 64 KiB, each copied again and
    handed through the event loop, all in Python; here ``http.client`` reads
    from the socket straight into ``buf`` with the GIL released. Measured on
    the emulator (16 objects of 16 MiB, 8 at once): 1,201 MiB/s through
    aiohttp, 2,084 MiB/s here, 1,600 MiB/s for obstore's GET. For many small
    objects the event loop is quicker (:func:`get_into`): there each request
    is a few hundred microseconds of Python either way, and threads add their
    hand-offs of the GIL. Each thread keeps one keep-alive connection per
    origin. gcsfs's URL, credentials and error mapping are used; failures
    worth retrying (resets, timeouts, 408/429/5xx) are retried up to the
    filesystem's ``retries`` with back-off, within the time limit of one call
    (:func:`cloudio._gcs.client.total_time_limit`).

    Returns a view of ``buf`` (valid until the buffer is reused), or None
    when the object does not exist. A response without a CRC32C (a
    composite or gzip-stored object) is returned unchecked.

    Raises
    ------
    IntegrityError
        The bytes never matched the server's CRC32C, or the object is larger than ``buf``.
    TransientError
        The server or network failed past the retries or the time limit.
    """
    url = fs.url(path.fs_path)
    limit = total_time_limit(getattr(fs, "requests_timeout", None)) or math.inf
    retries = max(1, int(getattr(fs, "retries", 6)))
    last = ""
    for attempt in range(max(1, attempts)):
        if attempt:
            time.sleep(BACKOFF * 2 ** (attempt - 1))
        deadline = time.monotonic() + limit
        for retry in range(retries):
            try:
                n, want, got = _fetch_once(fs, url, buf, deadline)
                break
            except FileNotFoundError:
                return None
            except _TooLarge as e:
                raise _too_large(path, e) from e
            except Exception as e:
                if not _failed_transiently(e):
                    raise
                pause = BACKOFF * 2 ** retry
                if retry == retries - 1 or time.monotonic() + pause >= deadline:
                    raise transient_error(path.url, "read", e) from e
                log.debug("%s: read failed (%s: %s); retrying in %.2f s", path.url, type(e).__name__, e, pause)
                time.sleep(pause)
        if want is None or got == want:
            return memoryview(buf[:n])  # type: ignore[arg-type]  # numpy declares __buffer__ for Python >= 3.12 only
        last = _mismatch(path, n, got, want)
    raise _never_matched(path, last, attempts)


async def _get_once(fs: gcsfs.GCSFileSystem, url: str, buf: np.ndarray) -> tuple[int, str | None, str]:
    """One GET of ``url`` into ``buf`` on gcsfs's session: bytes received, the server's CRC32C or None, ours."""
    from gcsfs.retry import validate_response

    await fs._set_session()
    async with fs.session.get(url, headers=fs._get_headers(None), timeout=fs.requests_timeout) as r:
        if r.status >= 400:  # gcsfs's own mapping: 404 -> FileNotFoundError, 5xx/429 -> retriable HttpError
            validate_response(r.status, await r.read(), url)
        checksum = google_crc32c.Checksum()
        n = 0
        async for piece in r.content.iter_any():
            end = n + len(piece)
            if end > len(buf):
                raise _TooLarge(f"more than {len(buf)} bytes")
            buf[n:end] = np.frombuffer(piece, dtype="u1")
            checksum.update(piece)
            n = end
        return n, header_crc(r.headers), base64.b64encode(checksum.digest()).decode("ascii")


@functools.cache
def _retrying(retries: int) -> Any:
    """:func:`_get_once` under gcsfs's retry policy (built once: ``decorator`` compiles a wrapper)."""
    from gcsfs.retry import retry_request

    return retry_request(retries=retries)(_get_once)


async def get_into(fs: gcsfs.GCSFileSystem, path: GCSPath, buf: np.ndarray, *,
                   attempts: int = ATTEMPTS) -> memoryview | None:
    """:func:`fetch_into` on gcsfs's event loop, for small objects (gcsfs's retries and time limits)."""
    url = fs.url(path.fs_path)
    get = _retrying(int(getattr(fs, "retries", 6)))
    last = ""
    for attempt in range(max(1, attempts)):
        if attempt:
            await asyncio.sleep(BACKOFF * 2 ** (attempt - 1))
        try:
            n, want, got = await bounded(fs, get(fs, url, buf))
        except FileNotFoundError:
            return None
        except _TooLarge as e:
            raise _too_large(path, e) from e
        except Exception as e:
            if is_transient(e):
                raise transient_error(path.url, "read", e) from e
            raise
        if want is None or got == want:
            return memoryview(buf[:n])  # type: ignore[arg-type]  # numpy declares __buffer__ for Python >= 3.12 only
        last = _mismatch(path, n, got, want)
    raise _never_matched(path, last, attempts)


def _too_large(path: GCSPath, e: _TooLarge) -> IntegrityError:
    return IntegrityError(f"{path.url}: the object holds {e}, more than any shard or chunk of this array "
                          "can take; it is not part of the array. Rewrite the array.")


def _mismatch(path: GCSPath, n: int, got: str, want: str) -> str:
    last = f"got {n} bytes with CRC32C {got}, the server says {want}"
    log.warning("%s: read bytes differ from the server's CRC32C (%s); reading again", path.url, last)
    return last


def _never_matched(path: GCSPath, last: str, attempts: int) -> IntegrityError:
    return IntegrityError(
        f"{path.url}: the bytes received never matched the CRC32C the server sent ({last}) in "
        f"{attempts} attempts. Check the network path to GCS (a proxy rewriting bodies?) and read again."
    )
