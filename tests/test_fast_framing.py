"""The answers cloudio's own HTTP/1.1 client (cloudio._gcs.fast) refuses, over TCP and over TLS.

A server of the test's own on 127.0.0.1 sends crafted answers (the emulator
only sends well-formed ones). Over TLS, asyncio's transport hands bytes
already received to the protocol inside ``transport.close()``: the error an
answer failed with, and a batch's end, must survive that.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from cloudio._gcs import fast


def _certificate(where: Path) -> tuple[str, str]:
    """A self-signed certificate for 127.0.0.1 and its key, as PEM files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = where / "cert.pem", where / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_path), str(key_path)


@pytest.fixture(params=["tcp", "tls"])
def scheme(request: pytest.FixtureRequest, tmp_path: Path,
           monkeypatch: pytest.MonkeyPatch) -> tuple[str, ssl.SSLContext | None]:
    """``(scheme, the server's TLS context)``; over TLS the client trusts the test's certificate."""
    if request.param == "tcp":
        return "http", None
    cert, key = _certificate(tmp_path)
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert, key)
    client = ssl.create_default_context(cafile=cert)
    monkeypatch.setattr(fast, "_tls", lambda: client)
    return "https", server


def _serving(answer: Callable[[bytes], bytes], tls: ssl.SSLContext | None,
             test: Callable[[int], Awaitable[None]], ended: list[bytes] | None = None) -> None:
    """Run ``test(port)`` against a server that answers each request (its head) with ``answer(head)``;
    ``ended`` gets the last request of each connection the client closed."""
    writers: list[asyncio.StreamWriter] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        head = b""
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                writer.write(answer(head))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            if ended is not None:
                ended.append(head)
        finally:
            writer.close()

    async def main() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=tls)
        try:
            await test(server.sockets[0].getsockname()[1])
        finally:
            server.close()
            for writer in writers:
                writer.close()
            await server.wait_closed()

    asyncio.run(main())


def _ask(scheme: tuple[str, ssl.SSLContext | None], answer: bytes, room: int) -> BaseException | None:
    """The error one request to a server sending ``answer`` ends with (None: it was answered)."""
    caught: list[BaseException | None] = []

    async def test(port: int) -> None:
        conn, _ = await fast._connection_to((scheme[0], "127.0.0.1", port))
        try:
            await conn.send(b"GET /o HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", memoryview(bytearray(room)))
            caught.append(None)
        except Exception as e:
            caught.append(e)
        finally:
            conn.close()

    _serving(lambda head: answer, scheme[1], test)
    return caught[0]


def test_an_answer_larger_than_the_buffer_is_too_large_over_tls_too(scheme) -> None:
    """Over TLS, closing the connection handed the rest of the answer over, and "bytes between answers"
    took the place of the real error: a read then retried a wrong object as a network failure."""
    body = 300_000
    e = _ask(scheme, b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % body + b"z" * body, 100_000)
    assert isinstance(e, fast._TooLarge), repr(e)


@pytest.mark.parametrize("answer", [
    b"HTTP/1.1 2\xb20 OK\r\nContent-Length: 2\r\n\r\nab",  # a superscript two: str.isdigit() says yes
    b"HTTP/1.1 2000 OK\r\nContent-Length: 2\r\n\r\nab",  # read as 200
    b"HTTP/1.1 200 OK\r\nContent-Length: 1\xb2\r\n\r\nab",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n-1\r\nab\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0x2\r\nab\r\n0\r\n\r\n",
], ids=["status", "long status", "length", "negative chunk", "0x chunk"])
def test_a_number_that_is_not_ascii_digits_is_a_bad_answer(scheme, answer: bytes) -> None:
    """A garbled number is an answer garbled on the way (a ConnectionError: read again), not a ValueError
    raised to the caller, nor a size Python's int() reads some other way."""
    e = _ask(scheme, answer, 1000)
    assert isinstance(e, fast._BadAnswer), repr(e)


def test_a_batch_closes_a_connection_it_cannot_keep(scheme) -> None:
    """An answer followed by bytes nobody asked for leaves its connection out of step: the batch neither
    keeps it nor may leave it open (it stayed registered with the event loop, for as long as the server
    kept it open)."""
    ended: list[bytes] = []

    async def test(port: int) -> None:
        later, _ = await fast._each(_Fs(), (scheme[0], "127.0.0.1", port), 1,
                                    lambda i: b"GET /%d HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" % i, 1000,
                                    lambda i, status, headers, got: bytes(got) == b"ab", 1)
        assert later == []
        for _ in range(100):
            if ended:
                break
            await asyncio.sleep(0.01)
        assert ended == [b"GET /0 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"]  # (before the server closes it)

    _serving(lambda head: b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nabXX", scheme[1], test, ended)


class _HandsOverOnClose(asyncio.Transport):
    """A transport that, like asyncio's TLS transport (``SSLProtocol._do_flush`` reads what was decrypted
    before it shuts down), hands the bytes it still holds to the protocol inside :meth:`close`. Which
    bytes are held when a batch ends depends on the timing of TLS records: this one holds them on purpose."""

    def __init__(self, protocol: fast._Answers) -> None:
        super().__init__()
        self.protocol, self.held, self.closing = protocol, b"", False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0

    def get_extra_info(self, name: str, default: object = None) -> object:
        return default

    def is_closing(self) -> bool:
        return self.closing

    def deliver(self, data: bytes) -> None:
        while data:
            buf = self.protocol.get_buffer(-1)
            n = min(len(buf), len(data))
            buf[:n] = data[:n]
            data = data[n:]
            self.protocol.buffer_updated(n)

    def close(self) -> None:
        if not self.closing:
            self.closing = True
            self.deliver(self.held)


def test_a_batch_stopped_while_an_answer_is_held_raises_what_stopped_it(monkeypatch) -> None:
    """The first answer taken raises while the other connection's answer has arrived in part, the rest
    held by the transport. Closing that connection at the batch's end completes its answer, whose callback
    took it out of the batch's connections while the end went through them: RuntimeError ("dictionary
    changed size during iteration") took the place of the caller's error."""
    made: list[fast._Answers] = []

    async def connection_to(origin: tuple[str, str, int]) -> tuple[fast._Answers, bool]:
        conn = fast._Answers()
        conn.connection_made(_HandsOverOnClose(conn))
        made.append(conn)
        return conn, False

    monkeypatch.setattr(fast, "_connection_to", connection_to)
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"x" * 100

    class Stop(Exception):
        pass

    def answered(i: int, status: int, headers: object, got: object) -> bool:
        raise Stop(i)

    async def main() -> None:
        batch = asyncio.ensure_future(fast._each(_Fs(), ("https", "127.0.0.1", 443), 2,
                                                 lambda i: b"GET /%d HTTP/1.1\r\n\r\n" % i, 1000, answered, 2))
        while len(made) < 2 or any(c._state != fast._HEAD for c in made):
            await asyncio.sleep(0)
        first, second = made
        second.transport.deliver(answer[:60])  # type: ignore[attr-defined]  # its head, part of its body ...
        second.transport.held = answer[60:]  # type: ignore[attr-defined]  # ... and the rest held
        first.transport.deliver(answer)  # type: ignore[attr-defined]  # taking it raises
        with pytest.raises(Stop):
            await batch

    asyncio.run(main())


class _Fs:
    """What ``_each`` reads of a gcsfs filesystem: its time limit of one request."""

    requests_timeout = 10
    retries = 1
