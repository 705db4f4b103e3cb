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

Download (:func:`get_into`): gcsfs's ``cat`` joins a response into a new
``bytes`` object, a fresh 16 MiB per shard whose pages are all first-touched;
here the body is copied as it arrives into a buffer the caller reuses for
every shard, and its CRC32C is computed on the same, still cache-warm pieces
and compared with the response's X-Goog-Hash. gcsfs's session,
credentials, time limits and retries are used. obstore's GET, the fastest
plain transport measured (``benchmarks/bench_peers.py --transports``), was not
taken: it does not expose the X-Goog-Hash header, so checking each shard would
cost a metadata request per object.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import logging
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import google_crc32c
import numpy as np

from cloudio._gcs.client import ATTEMPTS, BACKOFF, bounded, header_crc, is_transient, transient_error
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


async def _get_once(fs: gcsfs.GCSFileSystem, url: str, buf: np.ndarray) -> tuple[int, str | None, str]:
    """One GET of ``url`` into ``buf``: bytes received, the server's CRC32C (base64) or None, ours."""
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
    """The whole object at ``path``, read into ``buf`` and checked against the response's CRC32C.

    Returns a view of ``buf`` (valid until the buffer is reused), or None
    when the object does not exist. A response without a CRC32C (a
    composite or gzip-stored object) is returned unchecked.

    Raises
    ------
    IntegrityError
        The bytes never matched the server's CRC32C, or the object is larger than ``buf``.
    TransientError
        The server or network failed past gcsfs's retries.
    """
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
            raise IntegrityError(f"{path.url}: the object holds {e}, more than any shard or chunk of this array "
                                 "can take; it is not part of the array. Rewrite the array.") from e
        except Exception as e:
            if is_transient(e):
                raise transient_error(path.url, "read", e) from e
            raise
        if want is None or got == want:
            return memoryview(buf[:n])  # type: ignore[arg-type]  # numpy declares __buffer__ for Python >= 3.12 only
        last = f"got {n} bytes with CRC32C {got}, the server says {want}"
        log.warning("%s: read bytes differ from the server's CRC32C (%s); reading again", path.url, last)
    raise IntegrityError(
        f"{path.url}: the bytes received never matched the CRC32C the server sent ({last}) in "
        f"{attempts} attempts. Check the network path to GCS (a proxy rewriting bodies?) and read again."
    )
