"""A fault-injecting HTTP proxy in front of the real emulator.

Everything is forwarded to fake-gcs-server unchanged unless a :class:`Rule`
matches the request; the emulator itself is never bypassed or mocked. Faults:

``status``   answer ``code`` (503, 429, 403, ...) without forwarding (once ``release`` is set, when given)
``hang``     accept the request and never answer (until the proxy closes)
``delay``    forward after sleeping ``seconds`` (or until ``release`` is set)
``late``     forward at once, then hold the upstream's answer for ``seconds`` (or until ``release`` is set)
             before sending it: the server answered *before* whatever the test does meanwhile
``reset``    forward, send the headers and ``after`` bytes of the body, then reset the connection (RST)
``flip``     flip one byte: of the upload body (``where="request"``, the last data byte) or of the response body
``kill``     call ``action()`` (e.g. stop the emulator) and then reset the connection
``chunked``  forward, and send the answer's body in HTTP/1.1 chunks of ``after`` bytes (a trailer field at the end)
``unsized``  forward, and send the answer's body without a length, ended by closing the connection
``interim``  forward, and send the interim answer ``head`` (a 1xx: ``100 Continue``, ``103 Early Hints``) before
             the final one, as RFC 9110 15.2 lets any server do
``trickle``  forward, and send the answer's first 8 KiB (status line, headers, the body's start) in writes
             of ``after`` bytes, each its own TCP segment; ``chunked``/``unsized`` rules with ``piece`` too
``closes``   forward, and send the answer with a ``Connection`` header line for each of ``connection`` (e.g.
             ``("keep-alive, close",)``); the connection then ends as a server's that said "close" does: a
             request the client still sends on it (within ``seconds``, 5 when 0) is logged with the status
             ``"after close"`` and answered by a reset

Rules are tried in the order added; each has a ``times`` budget (None = forever).
``Rule.answered`` is set once the upstream answered a request the rule matched.
``log`` records ``(method, path, status_or_fault)`` for every request. A ``Location``
naming the emulator (a resumable upload's session) is rewritten to the proxy, so
the chunks of a resumable upload pass through it too.
"""

from __future__ import annotations

import http.client
import re
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "host", "proxy-connection"}
_TAIL = re.compile(rb"\r?\n--[^\r\n]*--\r?\n?$")  # the end of a multipart body


@dataclass
class Rule:
    fault: str
    method: str | None = None
    path: str | None = None  # a regular expression searched in the request path (with query)
    body: bytes | None = None  # a regular expression searched in the request body (e.g. an upload's object name)
    times: int | None = 1
    code: int = 503
    seconds: float = 0.0
    after: int = 0
    where: str = "response"
    action: Callable[[], None] | None = None
    release: threading.Event | None = None  # "late"/"delay"/"status": answer/forward when set (else after seconds)
    skip: int = 0  # let the first ``skip`` matching requests through untouched (not counted as hits)
    piece: int = 0  # send the answer in writes of this many bytes ("trickle" uses ``after``)
    head: bytes = b"HTTP/1.1 100 Continue\r\n\r\n"  # "interim": the 1xx answer sent first
    connection: tuple[str, ...] = ("close",)  # "closes": the answer's Connection header lines
    hits: int = field(default=0)
    skipped: int = field(default=0)
    answered: threading.Event = field(default_factory=threading.Event)

    def matches(self, method: str, path: str, body: bytes = b"") -> bool:
        if self.times is not None and self.hits >= self.times:
            return False
        if self.method is not None and method != self.method:
            return False
        if self.body is not None and re.search(self.body, body) is None:
            return False
        return self.path is None or re.search(self.path, path) is not None


#: bytes of an answer :class:`_Trickle` sends in pieces
_TRICKLED = 8192


class _Trickle:
    """A response stream that sends the first :data:`_TRICKLED` bytes of an answer a few bytes per TCP
    segment, pieces straddling what the handler wrote separately (the head's end and the body's start),
    and the rest at once."""

    def __init__(self, raw: object, piece: int) -> None:
        self._raw, self._piece, self._sent = raw, piece, 0
        self._pending = b""

    def write(self, data: bytes) -> int:
        self._pending += data
        while len(self._pending) >= self._piece and self._sent < _TRICKLED:
            self._send(self._pending[:self._piece])
            self._pending = self._pending[self._piece:]
            time.sleep(0.0001)  # lets each piece leave on its own
        if self._sent >= _TRICKLED:
            self._send(self._pending)
            self._pending = b""
        return len(data)

    def _send(self, data: bytes) -> None:
        self._raw.write(data)  # type: ignore[attr-defined]
        self._raw.flush()  # type: ignore[attr-defined]
        self._sent += len(data)

    def flush(self) -> None:
        self._send(self._pending)
        self._pending = b""


def _flip_request(body: bytes) -> bytes:
    m = _TAIL.search(body)
    i = (m.start() - 1) if m else len(body) // 2
    if i < 0 or not body:
        return body
    return body[:i] + bytes([body[i] ^ 0xFF]) + body[i + 1:]


class FaultProxy:
    def __init__(self, upstream: str) -> None:
        self.upstream = urlsplit(upstream)
        self.rules: list[Rule] = []
        self.log: list[tuple[str, str, object]] = []
        self._lock = threading.Lock()
        self._closing = threading.Event()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _body(self) -> bytes:
                if "chunked" in self.headers.get("Transfer-Encoding", ""):
                    out = b""
                    while True:
                        size = int(self.rfile.readline().strip(), 16)
                        if size == 0:
                            self.rfile.readline()
                            return out
                        out += self.rfile.read(size)
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _reset(self) -> None:
                self.wfile.flush()
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.connection.close()
                self.close_connection = True

            def _closed_after(self, seconds: float) -> None:
                """End a connection whose answer said it closes: a request the client sends on it anyway (within
                ``seconds``) is logged as ``"after close"`` and reset, as a closed socket's kernel answers it."""
                self.close_connection = True
                self.wfile.flush()
                self.connection.settimeout(seconds)
                try:
                    line = self.rfile.readline(65537)
                except OSError:  # no request within the time (or the client reset it)
                    return
                if line:
                    method, _, rest = line.decode("latin-1").partition(" ")
                    proxy._note(method, rest.rsplit(" ", 1)[0], "after close")
                    self._reset()

            def _handle(self) -> None:
                body = self._body()
                rule = proxy._take(self.command, self.path, body)
                fault = rule.fault if rule else None
                if rule is not None and fault == "status":
                    if rule.release is not None:  # answered once released
                        rule.release.wait(rule.seconds or None)
                    proxy._note(self.command, self.path, rule.code)
                    msg = b'{"error": {"code": %d, "message": "injected by the test proxy"}}' % rule.code
                    self.send_response(rule.code)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(msg)))
                    self.end_headers()
                    self.wfile.write(msg)
                    return
                if fault == "hang":
                    proxy._note(self.command, self.path, "hang")
                    proxy._closing.wait()
                    self._reset()
                    return
                if rule is not None and fault == "kill":
                    proxy._note(self.command, self.path, "kill")
                    if rule.action is not None:
                        rule.action()
                    self._reset()
                    return
                if rule is not None and fault == "delay":
                    if rule.release is not None:
                        rule.release.wait(rule.seconds or None)
                    else:
                        time.sleep(rule.seconds)
                if rule is not None and fault == "flip" and rule.where == "request":
                    body = _flip_request(body)
                conn = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=60)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
                    conn.request(self.command, self.path, body=body, headers=headers)
                    r = conn.getresponse()
                    data = r.read()
                    status = r.status
                    resp_headers = r.getheaders()
                finally:
                    conn.close()
                if rule is not None:
                    rule.answered.set()
                if rule is not None and fault == "late":
                    if rule.release is not None:
                        rule.release.wait(rule.seconds or None)
                    else:
                        time.sleep(rule.seconds)
                if rule is not None and fault == "flip" and rule.where == "response" and data:
                    i = len(data) // 2
                    data = data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1:]
                if fault == "chunked":
                    self.protocol_version = "HTTP/1.1"  # chunks are HTTP/1.1's
                piece = rule.after if fault == "trickle" else rule.piece if rule is not None else 0
                if piece:
                    self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    self.wfile = _Trickle(self.wfile, piece)  # type: ignore[assignment]
                    proxy._note(self.command, self.path, "trickle")
                if rule is not None and fault == "interim":
                    self.wfile.write(rule.head)
                self.send_response(status)
                upstream = f"{proxy.upstream.scheme}://{proxy.upstream.netloc}"
                for k, v in resp_headers:
                    if k.lower() == "location" and v.startswith(upstream):
                        v = proxy.url + v[len(upstream):]  # resumable uploads stay behind the proxy
                    if k.lower() not in _HOP:
                        self.send_header(k, v)
                if fault in ("chunked", "unsized"):
                    proxy._note(self.command, self.path, fault)
                    self.close_connection = True
                    if fault == "chunked":
                        self.send_header("Transfer-Encoding", "chunked")
                    self.end_headers()
                    if fault == "chunked":
                        step = rule.after if rule is not None and rule.after else 4096
                        for i in range(0, len(data), step):
                            piece = data[i:i + step]
                            self.wfile.write(b"%x;ext=1\r\n%s\r\n" % (len(piece), piece))
                        self.wfile.write(b"0\r\nX-Trailer: 1\r\n\r\n")
                    else:
                        self.wfile.write(data)
                    return
                if rule is not None and fault == "closes":
                    for value in rule.connection:
                        self.send_header("Connection", value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if rule is not None and fault == "reset":
                    proxy._note(self.command, self.path, "reset")
                    self.wfile.write(data[: min(rule.after, max(len(data) - 1, 0))])
                    self._reset()
                    return
                proxy._note(self.command, self.path, status)
                if self.command != "HEAD":
                    self.wfile.write(data)
                if rule is not None and fault == "closes":
                    self._closed_after(rule.seconds or 5.0)

            def _answer(self) -> None:
                try:
                    self._handle()
                except (BrokenPipeError, ConnectionResetError):  # the client gave up on the answer: its right
                    self.close_connection = True

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _answer

        class Server(ThreadingHTTPServer):
            daemon_threads = True

        self.server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def add(self, fault: str, **kw: object) -> Rule:
        rule = Rule(fault, **kw)  # type: ignore[arg-type]
        with self._lock:
            self.rules.append(rule)
        return rule

    def clear(self) -> None:
        with self._lock:
            self.rules.clear()

    def _take(self, method: str, path: str, body: bytes = b"") -> Rule | None:
        with self._lock:
            for rule in self.rules:
                if rule.matches(method, path, body):
                    if rule.skipped < rule.skip:
                        rule.skipped += 1
                        continue
                    rule.hits += 1
                    return rule
        return None

    def _note(self, method: str, path: str, status: object) -> None:
        with self._lock:
            self.log.append((method, path, status))

    def requests(self, path: str | None = None) -> list[tuple[str, str, object]]:
        with self._lock:
            return [e for e in self.log if path is None or re.search(path, e[1])]

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._closing.set()
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(timeout=5)
