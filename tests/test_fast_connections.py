"""When cloudio's own HTTP/1.1 client (cloudio._gcs.fast) may send its next request on a kept connection.

Against the real emulator behind ``tests/faultproxy.py``: a server that answers ``Connection: close`` closes the
connection after that answer, so a request still sent on it is lost (the proxy logs it as ``"after close"``
and resets it). RFC 9110 7.6.1: ``Connection`` holds a comma-separated, case-insensitive list of options, and a
repeated header adds to it.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

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


# -- a connection that failed over TLS is closed at once -------------------------------------------------------

#: a server that takes a request (over TLS when given its certificate and key) and then neither reads nor sends
_HUNG_SERVER = """
import socket, ssl, sys
srv = socket.create_server(("127.0.0.1", 0))
print(srv.getsockname()[1], flush=True)
held = []
while True:
    conn = srv.accept()[0]
    if len(sys.argv) > 1:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(sys.argv[1], sys.argv[2])
        conn = ctx.wrap_socket(conn, server_side=True)  # the handshake completes ...
    conn.recv(65536)  # ... the request arrives, and nothing is read or sent again
    held.append(conn)
"""


def _connections_to(port: int) -> int:
    """This process's TCP sockets still open to ``port`` on the loopback (the test's hung server).

    Why not a count of all open descriptors: other threads of a full run open and close theirs meanwhile
    (a kept connection of another test's loop let go, say), which moved the count by one either way."""
    import psutil

    return sum(1 for c in psutil.Process().net_connections(kind="tcp") if c.raddr and c.raddr.port == port)


@pytest.mark.parametrize("scheme", ["http", "https"], ids=["control-tcp", "tls"])
@pytest.mark.parametrize("how", ["silent", "cancelled"])
def test_a_connection_given_up_on_is_closed_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    scheme: str, how: str) -> None:
    """A request over TLS to a server that stopped answering fails at the time limit of a silence (the
    watchdog), or is cancelled (a call's time limit, the caller); its connection was then closed the
    graceful TLS way, which waits for the server's close_notify: a hung server never sends it, so the socket
    stayed open for asyncio's TLS shutdown timeout (30 s) on a running loop, and past ``asyncio.run``'s end
    until the garbage collector found it (a ResourceWarning). One such socket per request given up. (Over
    TCP a close is at once either way.)"""
    import gc
    import ssl
    import subprocess
    import sys

    from test_fast_framing import _certificate

    from cloudio._gcs import fast

    cert, key = _certificate(tmp_path)
    client = ssl.create_default_context(cafile=cert)
    monkeypatch.setattr(fast, "_tls", lambda: client)
    tls = [cert, key] if scheme == "https" else []
    server = subprocess.Popen([sys.executable, "-c", _HUNG_SERVER, *tls], stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        origin = (scheme, "127.0.0.1", int(server.stdout.readline()))

        async def main() -> tuple[BaseException | None, int]:
            silence = 0.3 if how == "silent" else 30.0
            try:
                async with asyncio.timeout(None if how == "silent" else 0.3):
                    await fast._exchange(origin, b"GET /o HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
                                         memoryview(bytearray(1000)), silence)
                error: BaseException | None = None
            except Exception as e:
                error = e
            await asyncio.sleep(1.0)  # (a close completes within a few turns of the loop)
            return error, _connections_to(origin[2])

        gc.disable()  # (the collector would close a socket left behind, at a time of its own)
        try:
            error, left_open = asyncio.run(main())
        finally:
            gc.enable()
        assert isinstance(error, TimeoutError), repr(error)
        assert left_open == 0
    finally:
        server.kill()
        server.wait()


# -- a read interrupted in the caller's hands ---------------------------------------------------------------------


def test_a_read_interrupted_while_the_caller_takes_a_piece_leaves_no_connection_half_read(
        gcs_emulator: Emulator, gcs_bucket: str, fault_proxy: FaultProxy) -> None:
    """Ctrl-C (a KeyboardInterrupt, no Exception) while ``fetch_pieces`` hands the caller a piece: the answer's
    rest is unread, so the connection is closed at once. It was kept: the thread's next request went out on
    it, ``http.client`` refused the answer (ResponseNotReady), and the request was sent again after a pause
    on a new connection."""
    from cloudio._gcs import fast

    bucket = gcs_bucket.removeprefix("gs://")
    data = np.random.default_rng(3).integers(0, 256, 1 << 20, dtype="u1").tobytes()
    gcs_emulator.client.bucket(bucket).blob("conn/big.bin").upload_from_string(data)
    path = GCSPath(bucket, "conn/big.bin")
    fs = _fs()

    def interrupted(i: int, piece: np.ndarray) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fast.fetch_pieces(fs, path, lambda n: [1 << 16] * (n >> 16), np.empty(1 << 16, dtype="u1"), interrupted,
                          lambda: np.empty(1 << 21, dtype="u1"))
    assert _connections_to(fault_proxy.server.server_address[1]) == 0
    view = fast.fetch_into(fs, path, np.empty(1 << 21, dtype="u1"))
    assert view is not None and bytes(view) == data
