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
per object. Small objects (:func:`get_into`) are read on the event loop
instead, over keep-alive streams of this module's own: the same checks,
without aiohttp's per-request machinery, which was most of their cost.
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
import weakref
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlsplit

import google_crc32c
import numpy as np

from cloudio._config import http_timeout
from cloudio._gcs.client import (
    ATTEMPTS,
    BACKOFF,
    TOTAL_FACTOR,
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
    if isinstance(e, (http.client.HTTPException, _BadAnswer, asyncio.IncompleteReadError, asyncio.LimitOverrunError)):
        return True  # a reset mid-answer, or an answer that does not parse
    return is_transient(e) and not isinstance(e, FileNotFoundError)


def _backoff(path: GCSPath, e: Exception, retry: int, retries: int, deadline: float) -> float | None:
    """Seconds to wait before retry ``retry + 1`` of a read that failed with ``e``; None when ``e`` is
    not worth retrying. Raises :class:`~cloudio.TransientError` when out of retries or of time."""
    if not _failed_transiently(e):
        return None
    pause = float(BACKOFF * 2 ** retry)
    if retry == retries - 1 or time.monotonic() + pause >= deadline:
        raise transient_error(path.url, "read", e) from e
    log.debug("%s: read failed (%s: %s); retrying in %.2f s", path.url, type(e).__name__, e, pause)
    return pause


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
    objects the event loop is quicker (:func:`get_into`): threads add their
    hand-offs of the GIL to every request. Each thread keeps one keep-alive connection per
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
                pause = _backoff(path, e, retry, retries, deadline)
                if pause is None:
                    raise
                time.sleep(pause)
        if want is None or got == want:
            return memoryview(buf[:n])  # type: ignore[arg-type]  # numpy declares __buffer__ for Python >= 3.12 only
        last = _mismatch(path, n, got, want)
    raise _never_matched(path, last, attempts)


# -- small objects: GETs on the event loop, over keep-alive streams of our own ------------------------


class _BadAnswer(Exception):
    """The server's answer does not parse as HTTP/1.1 (garbled on the way, or not an HTTP server)."""


#: each event loop's idle keep-alive streams, per origin (streams belong to the loop that made them)
_idle: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[tuple[str, str, int], list[
    tuple[asyncio.StreamReader, asyncio.StreamWriter]]]] = weakref.WeakKeyDictionary()
#: idle streams kept per origin and loop (one per request in flight is all a read reuses)
_IDLE_MAX = 64


async def _stream(origin: tuple[str, str, int]) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bool]:
    """A kept stream to ``origin`` (and True), or a new one (and False)."""
    idle = _idle.setdefault(asyncio.get_running_loop(), {}).get(origin)
    while idle:
        r, w = idle.pop()
        if not w.is_closing() and not r.at_eof():
            return r, w, True
        w.close()
    scheme, host, port = origin
    tls = _tls() if scheme == "https" else None
    r, w = await asyncio.open_connection(host, port, ssl=tls, server_hostname=host if tls else None)
    return r, w, False  # asyncio sets TCP_NODELAY on its TCP streams


def _keep(origin: tuple[str, str, int], r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    idle = _idle.setdefault(asyncio.get_running_loop(), {}).setdefault(origin, [])
    if len(idle) < _IDLE_MAX:
        idle.append((r, w))
    else:
        w.close()


class _Headers(dict[str, str]):
    """Response headers by lower-cased name; a repeated header's values joined by ", " (RFC 9110)."""

    def get(self, key: str, default: Any = None) -> Any:  # type: ignore[override]
        return super().get(key.lower(), default)


async def _read_head(r: asyncio.StreamReader) -> tuple[int, _Headers]:
    lines = (await r.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
    version, _, rest = lines[0].partition(" ")
    if not version.startswith("HTTP/1.") or not rest[:3].isdigit():
        raise _BadAnswer(f"not an HTTP/1.1 status line: {lines[0][:80]!r}")
    headers = _Headers()
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            name, value = name.strip().lower(), value.strip()
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
    if version == "HTTP/1.0":
        headers["connection"] = "close"
    return int(rest[:3]), headers


async def _read_body(r: asyncio.StreamReader, headers: _Headers, room: int) -> bytes:
    """The body (chunked, sized, or up to the end of the stream); _TooLarge past ``room`` bytes."""
    if "chunked" in headers.get("transfer-encoding", "").lower():
        parts: list[bytes] = []
        n = 0
        while True:
            size_line = (await r.readuntil(b"\r\n")).split(b";")[0].strip()
            try:
                size = int(size_line, 16)
            except ValueError:
                raise _BadAnswer(f"not a chunk size: {size_line[:40]!r}") from None
            if size == 0:
                while await r.readuntil(b"\r\n") != b"\r\n":  # trailer fields, then the empty line
                    pass
                return b"".join(parts)
            n += size
            if n > room:
                raise _TooLarge(f"more than {room} bytes")
            parts.append(await r.readexactly(size))
            await r.readexactly(2)
    length = headers.get("content-length")
    if length is None:
        headers["connection"] = "close"  # the body ends where the stream does
        body = b""
        while len(body) <= room:
            piece = await r.read(room + 1 - len(body))
            if not piece:
                return body
            body += piece
        raise _TooLarge(f"more than {room} bytes")
    if not length.isdigit():
        raise _BadAnswer(f"not a Content-Length: {length[:40]!r}")
    if int(length) > room:
        raise _TooLarge(f"{length} bytes, more than {room}")
    return await r.readexactly(int(length))


async def _get_once(fs: gcsfs.GCSFileSystem, url: str, buf: np.ndarray) -> tuple[int, str | None, str]:
    """One GET of ``url`` into ``buf`` on a kept stream: bytes received, the server's CRC32C or None, ours."""
    from gcsfs.retry import validate_response

    parts = urlsplit(url)
    origin = (parts.scheme, parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80))
    lines = [f"GET {parts.path}?{parts.query} HTTP/1.1", f"Host: {parts.netloc}",
             *(f"{k}: {v}" for k, v in fs._get_headers(None).items()), "", ""]
    request = "\r\n".join(lines).encode("latin-1")
    while True:
        r, w, kept = await _stream(origin)
        try:
            w.write(request)
            try:
                status, headers = await _read_head(r)
            except (ConnectionError, asyncio.IncompleteReadError):
                if kept:  # the server closed a kept stream while it was idle: a new one, at no retry's cost
                    w.close()
                    continue
                raise
            body = await _read_body(r, headers, len(buf) if status < 400 else 1 << 20)
        except BaseException:
            w.close()
            raise
        if headers.get("connection", "").lower() == "close":
            w.close()
        else:
            _keep(origin, r, w)
        if status >= 400:  # gcsfs's own mapping: 404 -> FileNotFoundError, 5xx/429 -> retriable HttpError
            validate_response(status, body, url)
        n = len(body)
        buf[:n] = np.frombuffer(body, dtype="u1")
        crc = google_crc32c.value(body)
        return n, header_crc(headers), base64.b64encode(crc.to_bytes(4, "big")).decode("ascii")


async def get_into(fs: gcsfs.GCSFileSystem, path: GCSPath, buf: np.ndarray, *,
                   attempts: int = ATTEMPTS) -> memoryview | None:
    """:func:`fetch_into` on the event loop, for small objects: the same checks, retries and time limits.

    Why not gcsfs's aiohttp session: for a small object its request and
    response machinery is most of the cost, about 200 microseconds of Python
    per GET. Here one kept stream per request in flight sends a request
    line and gcsfs's headers, and reads the status line, headers and body;
    measured on the emulator (100 objects of 40 KB, 10 in flight), 15 ms
    against 30-40 ms through aiohttp and 18-20 ms for tensorstore's reads of
    the same array (``benchmarks/bench_peers.py`` layout c). gcsfs's URL,
    credentials and error mapping are used, as in :func:`fetch_into`.
    """
    url = fs.url(path.fs_path)
    limit = total_time_limit(getattr(fs, "requests_timeout", None)) or math.inf
    per_request = _socket_timeout(fs)
    retries = max(1, int(getattr(fs, "retries", 6)))
    last = ""
    for attempt in range(max(1, attempts)):
        if attempt:
            await asyncio.sleep(BACKOFF * 2 ** (attempt - 1))
        deadline = time.monotonic() + limit
        for retry in range(retries):
            try:
                async with asyncio.timeout(min(per_request, max(0.0, deadline - time.monotonic()))):
                    n, want, got = await _get_once(fs, url, buf)
                break
            except FileNotFoundError:
                return None
            except _TooLarge as e:
                raise _too_large(path, e) from e
            except Exception as e:
                pause = _backoff(path, e, retry, retries, deadline)
                if pause is None:
                    raise
                await asyncio.sleep(pause)
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
