"""When cloudio's own HTTP/1.1 client (cloudio._gcs.fast) may send its next request on a kept connection.

Against the real emulator behind ``tests/faultproxy.py``: a server that answers ``Connection: close`` closes the
connection after that answer, so a request still sent on it is lost (the proxy logs it as ``"after close"``
and resets it). RFC 9110 7.6.1: ``Connection`` holds a comma-separated, case-insensitive list of options, and a
repeated header adds to it.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from faultproxy import FaultProxy

from cloudio._paths import GCSPath
from cloudio.emulator import Emulator

#: the ``Connection`` header lines of an answer: each says the server closes the connection after it
_CLOSING = {
    "close": ("close",),  # (the form every path already read)
    "listed": ("keep-alive, close",),
    "repeated": ("keep-alive", "close"),
    "capitalised": ("Close",),
}


def _fs():  # type: ignore[no-untyped-def]
    from cloudio._gcs.client import gcs_filesystem

    return gcs_filesystem()


def _objects(emu: Emulator, bucket_url: str, n: int) -> dict[GCSPath, bytes]:
    bucket = bucket_url.removeprefix("gs://")
    rng = np.random.default_rng(7)
    out = {}
    for i in range(n):
        data = rng.integers(0, 256, 5000 + i, dtype="u1").tobytes()
        emu.client.bucket(bucket).blob(f"conn/{i}.bin").upload_from_string(data)
        out[GCSPath(bucket, f"conn/{i}.bin")] = data
    return out


def _sent_after_close(proxy: FaultProxy) -> list[tuple[str, str, object]]:
    return [r for r in proxy.requests() if r[2] == "after close"]


@pytest.mark.parametrize("connection", list(_CLOSING.values()), ids=list(_CLOSING))
@pytest.mark.parametrize("way", ["loop", "batch", "thread"])
def test_no_request_goes_on_a_connection_its_answer_said_closes(
        gcs_emulator: Emulator, gcs_bucket: str, fault_proxy: FaultProxy, monkeypatch: pytest.MonkeyPatch,
        way: str, connection: tuple[str, ...]) -> None:
    """Reads one after another: get_into on the event loop (:class:`fast._Answers`), a get_each batch on one
    connection, fetch_into on this thread's ``http.client`` connection. The loop's connection was kept
    unless the header was exactly ``close`` (any case), and ``http.client`` read only the first of two
    Connection headers: the next request went out on a closed connection, and was sent again (a lost
    request; for an upload, a try ``put_verified`` counts)."""
    from cloudio._gcs import fast

    monkeypatch.setattr(fast, "BACKOFF", 0.01)
    objects = _objects(gcs_emulator, gcs_bucket, 4)
    fault_proxy.add("closes", method="GET", connection=connection, times=None)
    fs = _fs()
    got: dict[GCSPath, bytes | None] = {}
    if way == "thread":
        for path in objects:
            view = fast.fetch_into(fs, path, np.empty(1 << 16, dtype="u1"))
            got[path] = None if view is None else bytes(view)
    elif way == "loop":
        async def reads() -> None:
            for path in objects:
                body = await fast.get_into(fs, path, np.empty(1 << 16, dtype="u1"))
                got[path] = None if body is None else body.tobytes()

        asyncio.run(reads())
    else:
        paths = list(objects)

        def take(i: int, body: np.ndarray | None) -> None:
            got[paths[i]] = None if body is None else body.tobytes()

        asyncio.run(fast.get_each(fs, paths, 1 << 16, take, 1))
    assert got == objects
    assert _sent_after_close(fault_proxy) == []
