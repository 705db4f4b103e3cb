"""Answers the hand-written HTTP/1.1 data path (cloudio._gcs.fast) must read right, against the real emulator.

Each test drives ``fast``'s functions directly against fake-gcs-server, with faults put in by
``tests/faultproxy.py`` (interim 1xx answers among them), or by a TCP listener that never completes
a handshake (a network that drops SYNs).
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator

import numpy as np
import pytest

import cloudio
from cloudio import _config
from cloudio._paths import GCSPath
from cloudio.emulator import Emulator


def _fs():  # type: ignore[no-untyped-def]
    from cloudio._gcs.client import gcs_filesystem

    return gcs_filesystem()


def _put(emu: Emulator, bucket_url: str, key: str, data: bytes) -> GCSPath:
    bucket = bucket_url.removeprefix("gs://")
    emu.client.bucket(bucket).blob(key).upload_from_string(data)
    return GCSPath(bucket, key)


_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_EARLY_HINTS = b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"


@pytest.mark.parametrize("interim", [b"", _CONTINUE, _EARLY_HINTS], ids=["control-none", "100", "103"])
def test_loop_get_reads_an_object_whose_answer_has_an_interim_1xx_before_it(
        gcs_emulator: Emulator, gcs_bucket: str, fault_proxy, monkeypatch: pytest.MonkeyPatch,
        interim: bytes) -> None:
    """get_into (metadata documents, small chunks' careful path) over :class:`fast._Answers`: a 1xx before
    the final answer must be skipped. Here the 1xx is parsed as a final answer without a length, the
    real answer is taken as its body until the connection closes, and the read fails."""
    from cloudio._gcs import fast

    monkeypatch.setenv("CLOUDIO_HTTP_TIMEOUT", "1")
    data = np.random.default_rng(1).integers(0, 256, 4000, dtype="u1").tobytes()
    path = _put(gcs_emulator, gcs_bucket, "interim/a.bin", data)
    if interim:
        fault_proxy.add("interim", head=interim, times=None)
    fs = _fs()

    async def go() -> bytes | None:
        got = await fast.get_into(fs, path, np.empty(1 << 16, dtype="u1"))
        return None if got is None else got.tobytes()

    assert asyncio.run(go()) == data


@pytest.mark.parametrize("interim", [b"", _CONTINUE], ids=["control-none", "100"])
def test_loop_upload_whose_answer_has_100_continue_before_it_succeeds(
        gcs_emulator: Emulator, gcs_bucket: str, fault_proxy, monkeypatch: pytest.MonkeyPatch,
        interim: bytes) -> None:
    """put_media of a small object (:func:`fast._post_small`): the same mis-parse on an upload's answer."""
    from cloudio._gcs import fast

    monkeypatch.setenv("CLOUDIO_HTTP_TIMEOUT", "1")
    data = b"x" * 1000
    path = GCSPath(gcs_bucket.removeprefix("gs://"), "interim/up.bin")
    if interim:
        fault_proxy.add("interim", head=interim, times=None)
    meta = asyncio.run(fast.put_media(_fs(), path, data, "application/octet-stream"))
    assert int(meta["size"]) == len(data)


@pytest.mark.parametrize("times", [0, 1], ids=["control-none", "once"])
def test_thread_get_after_an_early_hints_answer_returns_neither_empty_nor_another_objects_bytes(
        gcs_emulator: Emulator, gcs_bucket: str, fault_proxy, times: int) -> None:
    """fetch_into (large shards) over http.client: http.client skips only 100, so a 103 comes back as the
    answer (status 103, no body). fetch_into takes any status under 400 as the object: it returns 0
    bytes, unchecked (a 103 carries no X-Goog-Hash), and keeps the connection with the real answer
    unread in it; the next GET on the connection gets that answer: another object's bytes, whose
    CRC32C matches them."""
    from cloudio._gcs import fast

    a = np.random.default_rng(2).integers(0, 256, 3 << 20, dtype="u1").tobytes()
    b = np.random.default_rng(3).integers(0, 256, 3 << 20, dtype="u1").tobytes()
    pa = _put(gcs_emulator, gcs_bucket, "hints/a.bin", a)
    pb = _put(gcs_emulator, gcs_bucket, "hints/b.bin", b)
    if times:
        fault_proxy.add("interim", head=_EARLY_HINTS, times=times)
    fs = _fs()
    got_a = fast.fetch_into(fs, pa, np.empty(4 << 20, dtype="u1"))
    got_a = None if got_a is None else bytes(got_a)
    got_b = fast.fetch_into(fs, pb, np.empty(4 << 20, dtype="u1"))  # same thread: same kept connection
    got_b = None if got_b is None else bytes(got_b)
    summary = {"a": (len(got_a or b""), got_a == a), "b": (len(got_b or b""), got_b == b, got_b == a)}
    assert got_a == a and got_b == b, summary


# -- answers that are not the object: any status under 400 taken as the object's bytes ---------------


@pytest.mark.parametrize("code", [301, 307])
def test_a_redirect_answer_is_not_returned_as_the_objects_bytes(
        gcs_emulator: Emulator, gcs_bucket: str, fault_proxy, code: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """An endpoint that redirects (e.g. http:// to https://, or a proxy on the way) answers a GET with a 3xx
    and a body of its own. fetch_into, get_into (and get_each, which leaves a non-200 to get_into) take
    that body as the object's bytes: no X-Goog-Hash, so unchecked, and no error."""
    from cloudio._gcs import fast

    monkeypatch.setattr(fast, "BACKOFF", 0.01)  # each path tries again, then gives up: no need to wait
    data = np.random.default_rng(4).integers(0, 256, 2 << 20, dtype="u1").tobytes()
    path = _put(gcs_emulator, gcs_bucket, "moved/a.bin", data)
    fs = _fs()
    results: dict[str, object] = {}
    fault_proxy.add("status", code=code, method="GET", path=r"moved%2Fa\.bin", times=None)

    try:
        got = fast.fetch_into(fs, path, np.empty(4 << 20, dtype="u1"))
        results["fetch_into"] = None if got is None else bytes(got)
    except Exception as e:  # an error is a right answer here; wrong bytes are not
        results["fetch_into"] = e

    async def small() -> object:
        try:
            got = await fast.get_into(fs, path, None)
            return None if got is None else got.tobytes()
        except Exception as e:
            return e

    results["get_into"] = asyncio.run(small())

    async def batch() -> object:
        taken: dict[int, object] = {}

        def take(i: int, body: np.ndarray | None) -> None:
            taken[i] = None if body is None else body.tobytes()

        try:
            await fast.get_each(fs, [path], 4 << 20, take, 1)
        except Exception as e:
            return e
        return taken.get(0)

    results["get_each"] = asyncio.run(batch())
    wrong = {k: v[:80] for k, v in results.items() if isinstance(v, bytes) and v != data}
    assert not wrong, f"HTTP {code} body returned as the object: {wrong}"


# -- a listing garbled on the way is retried, as every other JSON answer of the module is ------------


def test_a_listing_garbled_once_is_read_again(gcs_emulator: Emulator, gcs_bucket: str, fault_proxy) -> None:
    """list_objects parses its JSON outside its retry loop: one garbled answer raises UnicodeDecodeError
    (json's) from the listing, where uploads' JSON answers (_changing) are retried and
    client.is_transient counts a garbled answer as transient."""
    from cloudio._gcs import fast

    bucket = gcs_bucket.removeprefix("gs://")
    for i in range(5):
        _put(gcs_emulator, gcs_bucket, f"listed/k{i}", b"v")
    fs = _fs()
    rule = fault_proxy.add("flip", method="GET", path=r"/storage/v1/b/[^/]+/o\?", times=1)
    items = asyncio.run(fast.list_objects(fs, bucket, "name", prefix="listed/"))
    assert rule.hits == 1
    assert sorted(i["name"] for i in items) == [f"listed/k{i}" for i in range(5)]


# -- a batch's connections are made within the time limit -------------------------------------------


@pytest.fixture
def blackhole() -> Iterator[str]:
    """An endpoint whose TCP handshakes never complete: a listener whose accept queue is full, so the
    kernel drops further SYNs (as a partitioned network does)."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(0)
    port = srv.getsockname()[1]
    fillers = []
    for _ in range(4):  # fill the accept queue (never accepted)
        s = socket.socket()
        s.setblocking(False)
        try:
            s.connect(("127.0.0.1", port))
        except BlockingIOError:
            pass
        fillers.append(s)
    time.sleep(0.2)
    probe = socket.socket()
    probe.settimeout(1.5)
    try:
        probe.connect(("127.0.0.1", port))
        pytest.skip("this kernel completes handshakes past a full accept queue")
    except TimeoutError:
        pass
    finally:
        probe.close()
    url = f"http://127.0.0.1:{port}"
    _config.push_endpoint(url)
    try:
        yield url
    finally:
        _config.pop_endpoint()
        for s in fillers:
            s.close()
        srv.close()


def test_a_batch_whose_connections_never_open_ends_within_the_time_limit(
        gcs_emulator: Emulator, blackhole: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """get_each with CLOUDIO_HTTP_TIMEOUT=1: get_into to the same endpoint raises TransientError in a few
    seconds (its connect is under _retrying's timeout); get_each's own connects (_each.start) have no
    time limit and wait for the kernel's connect timeout (minutes)."""
    from cloudio._gcs import fast

    monkeypatch.setenv("CLOUDIO_HTTP_TIMEOUT", "1")
    fs = _fs()
    paths = [GCSPath("nowhere", f"c/{i}") for i in range(3)]

    async def single() -> BaseException | None:
        try:
            await asyncio.wait_for(fast.get_into(fs, paths[0], None), 20)
        except BaseException as e:
            return e
        return None

    t0 = time.monotonic()
    e = asyncio.run(single())
    assert isinstance(e, cloudio.TransientError), e  # the careful path is bounded
    single_took = time.monotonic() - t0

    async def batch() -> BaseException | None:
        try:
            await asyncio.wait_for(fast.get_each(fs, paths, 1 << 16, lambda i, b: None, 3), 20)
        except BaseException as e:
            return e
        return None

    t0 = time.monotonic()
    e = asyncio.run(batch())
    took = time.monotonic() - t0
    assert isinstance(e, cloudio.TransientError), (
        f"get_each: {type(e).__name__} after {took:.1f} s (get_into: TransientError after {single_took:.1f} s)")
