"""A TCP relay in front of the emulator for tests of slow links: bytes pass at a set rate, a piece at a time."""

from __future__ import annotations

import re
import socket
import threading
import time
from typing import Any
from urllib.parse import urlsplit

from cloudio import _config
from cloudio._gcs.client import GCSFS_FIRST_RETRY_WAIT, TOTAL_FACTOR

#: CLOUDIO_HTTP_TIMEOUT in tests of long uploads over a slow link (the ``slow_link`` fixture), and the limit of one
#: call then: nothing moved for 3 x 2 s + gcsfs's wait
SLOW_TIMEOUT = 2.0
CALL_LIMIT = TOTAL_FACTOR * SLOW_TIMEOUT + GCSFS_FIRST_RETRY_WAIT
#: 48 MiB at 4 MiB/s: 12 s in all, about twice the limit, never still for long. Why so much: this machine's kernel
#: takes up to 4 MiB of a connection's bytes at once (loopback), which then reach the server within 1 s, under the
#: 2 s aiohttp waits for an answer once the last byte left; the rest is sent while the kernel takes it.
UP = 4 << 20
BIG = 48 << 20


class Relay:
    """A TCP relay in front of the emulator (cloudio's endpoint while it runs). Bytes go up (client to server) and
    down at ``up`` and ``down`` bytes a second at most, a piece at a time: never silent for long. ``needle``: a
    request holding it is counted in :attr:`seen`; with ``stall_after``, the answer to it stops after that many
    bytes and its connection stays open and silent until the relay closes (a server stopped mid-body). ``deaf_to``:
    a request whose start matches this pattern is not forwarded, and its connection no longer read (a server that
    takes no more of an upload), counted in :attr:`deafened`."""

    def __init__(self, upstream: str, *, up: float | None = None, down: float | None = None,
                 needle: bytes | None = None, stall_after: int | None = None, piece: int = 16 << 10,
                 deaf_to: bytes | None = None) -> None:
        u = urlsplit(upstream)
        self._to = (u.hostname, u.port)
        self._up, self._down, self._piece = up, down, piece
        self.needle, self.stall_after = needle, stall_after
        self.seen = 0
        self.stalled = 0
        self.deaf_to = re.compile(deaf_to) if deaf_to is not None else None
        self.deafened = 0
        self._closing = threading.Event()
        self._srv = socket.socket()
        self._srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._srv.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)  # little buffered on the way up
        self._srv.bind(("127.0.0.1", 0))
        self._srv.listen(128)
        self.url = f"http://127.0.0.1:{self._srv.getsockname()[1]}"
        self._socks: list[socket.socket] = []
        self._lock = threading.Lock()

    def __enter__(self) -> Relay:
        threading.Thread(target=self._accept, daemon=True).start()
        _config.push_endpoint(self.url)
        return self

    def __exit__(self, *exc: object) -> None:
        _config.pop_endpoint()
        self._closing.set()
        self._srv.close()
        for s in list(self._socks):
            try:
                s.close()
            except OSError:
                pass

    def _accept(self) -> None:
        while not self._closing.is_set():
            try:
                c, _ = self._srv.accept()
            except OSError:
                return
            s = socket.create_connection(self._to)
            self._socks += [c, s]
            state = {"hit": False, "sent": 0}
            threading.Thread(target=self._pump, args=(c, s, self._up, state, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(s, c, self._down, state, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, rate: float | None, state: dict[str, Any],
              upward: bool) -> None:
        tail = b""
        try:
            while True:
                data = src.recv(self._piece)
                if not data:
                    break
                if upward and self.deaf_to is not None and self.deaf_to.match(data):  # (a request starts a piece)
                    with self._lock:
                        self.deafened += 1
                    self._closing.wait()
                    return
                if upward and self.needle is not None:
                    window = tail + data
                    if self.needle in window:
                        with self._lock:
                            self.seen += window.count(self.needle)
                        state["hit"], state["sent"] = True, 0
                    tail = window[-len(self.needle):]
                if not upward and state["hit"] and self.stall_after is not None:
                    room = self.stall_after - state["sent"]
                    if len(data) >= room:
                        dst.sendall(data[:max(room, 0)])
                        with self._lock:
                            self.stalled += 1
                        self._closing.wait()  # silent, the connection open
                        return
                    state["sent"] += len(data)
                dst.sendall(data)
                if rate:
                    time.sleep(len(data) / rate)
        except OSError:
            pass
        finally:
            try:
                dst.shutdown(socket.SHUT_WR)
            except OSError:
                pass
