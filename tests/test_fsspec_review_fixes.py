"""The fsspec face, from a review: writes whose last answer gcsfs drops, downloads named and bounded."""

from __future__ import annotations

import http.client
import os
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import pytest
from test_fsspec_edges import _write_across

import cloudio
from cloudio import _config

_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "host", "proxy-connection"}
#: a chunk's Content-Range when it ends the upload (the total size known): ``bytes */N`` or ``bytes a-b/N``
_FINAL = re.compile(r"^bytes (\*|\d+-\d+)/\d+$")


@contextmanager
def _final_answers_as_gcs_gives_them(upstream: str, *, bodies: bool = True) -> Iterator[None]:
    """cloudio's endpoint a forwarder in front of ``upstream`` (the fault proxy) answering a resumable upload's
    final chunk as GCS does: 200 and the object resource, without the ``Range`` header fake-gcs-server adds
    (with it, gcsfs reads the generation from that answer; without it, as on GCS, it drops an empty chunk's
    answer). ``bodies=False``: the final answer without its body too (what it stored untold). Everything else
    passes unchanged."""
    up = urlsplit(upstream)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def _answer(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            conn = http.client.HTTPConnection(up.hostname, up.port, timeout=60)
            try:
                conn.request(self.command, self.path, body=body,
                             headers={k: v for k, v in self.headers.items() if k.lower() not in _HOP})
                r = conn.getresponse()
                data, status, headers = r.read(), r.status, r.getheaders()
            finally:
                conn.close()
            final = self.command in ("POST", "PUT") and _FINAL.match(self.headers.get("Content-Range", ""))
            if final and status == 200 and not bodies:
                data = b""
            self.send_response(status)
            for k, v in headers:
                if k.lower() == "location" and v.startswith(upstream):
                    v = url + v[len(upstream):]  # the upload's chunks come through here too
                if k.lower() not in _HOP and not (final and status == 200 and k.lower() == "range"):
                    self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _answer

    class Server(ThreadingHTTPServer):
        daemon_threads = True

    server = Server(("127.0.0.1", 0), Handler)
    url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _config.push_endpoint(url)
    try:
        yield
    finally:
        _config.pop_endpoint()
        server.shutdown()
        server.server_close()

# ---------------------------------------------------------------------------------------------
# an empty final chunk: gcsfs never reads its answer, so the check must not read the live object
# ---------------------------------------------------------------------------------------------


def test_touch_does_not_delete_an_object_another_writer_stored_right_after_it(fault_proxy, gcs_emulator, b):
    with _final_answers_as_gcs_gives_them(fault_proxy.url):
        fs = cloudio.filesystem(f"gs://{b}")
        errors = _write_across(fault_proxy, gcs_emulator, b, "t.bin", r"upload_id=",
                               lambda: fs.touch(f"{b}/t.bin"))
    blob = gcs_emulator.client.bucket(b).get_blob("t.bin")
    assert blob is not None, f"cloudio deleted the other writer's object ({errors!r})"
    assert blob.download_as_bytes() == b"theirs" and errors == []


def test_open_wb_ending_in_an_empty_chunk_does_not_delete_an_object_another_writer_stored_right_after_it(
        fault_proxy, gcs_emulator, b):
    def write() -> None:
        with cloudio.filesystem(f"gs://{b}").open(f"{b}/e.bin", "wb", block_size=2**18) as f:
            f.write(b"m" * 2**18)  # sent as a full chunk: the close sends an empty final one

    with _final_answers_as_gcs_gives_them(fault_proxy.url):
        errors = _write_across(fault_proxy, gcs_emulator, b, "e.bin", r"upload_id=", write, skip=1)
    blob = gcs_emulator.client.bucket(b).get_blob("e.bin")
    assert blob is not None, f"cloudio deleted the other writer's object ({errors!r})"
    assert blob.download_as_bytes() == b"theirs" and errors == []


def test_touch_and_an_empty_final_chunk_still_journal_the_generation_stored(fault_proxy, gcs_emulator, b,
                                                                             journal_records):
    with _final_answers_as_gcs_gives_them(fault_proxy.url):
        fs = cloudio.filesystem(f"gs://{b}")
        fs.touch(f"{b}/t0.bin")
        with fs.open(f"{b}/e0.bin", "wb", block_size=2**18) as f:
            f.write(b"m" * 2**18)
    bucket = gcs_emulator.client.bucket(b)
    want = [(f"gs://{b}/t0.bin", bucket.get_blob("t0.bin").generation, 0),
            (f"gs://{b}/e0.bin", bucket.get_blob("e0.bin").generation, 2**18)]
    assert [(c.url, c.generation, c.size) for c in journal_records if c.kind == "write"] == want


def test_a_write_whose_answer_names_no_generation_never_deletes_what_is_there(fault_proxy, gcs_emulator, b,
                                                                             journal_records):
    """Nothing in the answer says what this write stored: the live object is read, and another writer's,
    stored since, is not this write's to delete."""
    with _final_answers_as_gcs_gives_them(fault_proxy.url, bodies=False):
        fs = cloudio.filesystem(f"gs://{b}")
        errors = _write_across(fault_proxy, gcs_emulator, b, "n.bin", r"upload_id=",
                               lambda: fs.touch(f"{b}/n.bin"))
    blob = gcs_emulator.client.bucket(b).get_blob("n.bin")
    assert blob is not None, f"cloudio deleted the other writer's object ({errors!r})"
    assert blob.download_as_bytes() == b"theirs"
    assert len(errors) == 1 and isinstance(errors[0], cloudio.IntegrityError), errors
    assert f"gs://{b}/n.bin" in str(errors[0]) and "Nothing was deleted" in str(errors[0])
    assert [(c.url, c.kind) for c in journal_records] == [(f"gs://{b}/n.bin", "invalidate")]


# ---------------------------------------------------------------------------------------------
# errors that escaped raw: a refused download, a missing object at the strong and bounded levels
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("code", [403, 400, 409])
def test_a_refused_get_is_a_read_error_naming_the_url(fault_proxy, b, tmp_path, code):
    fs = cloudio.filesystem(f"gs://{b}")
    fs.pipe(f"{b}/g.bin", b"g")
    fault_proxy.add("status", code=code, method="GET", path=r"alt=media", times=None)
    with pytest.raises(cloudio.ReadError, match=f"gs://{b}/g.bin") as e:
        fs.get(f"{b}/g.bin", str(tmp_path / "g.bin"))
    assert e.value.__cause__ is not None and not (tmp_path / "g.bin").exists()


@pytest.mark.parametrize("code", [403, 400])
def test_a_refused_download_is_a_read_error_naming_the_url(fault_proxy, b, tmp_path, code):
    from cloudio._gcs.transfer import download

    cloudio.filesystem(f"gs://{b}").pipe(f"{b}/g.bin", b"g")
    fault_proxy.add("status", code=code, method="GET", path=r"alt=media", times=None)
    with pytest.raises(cloudio.ReadError, match=f"gs://{b}/g.bin"):
        download(f"gs://{b}/g.bin", tmp_path / "g.bin")


@pytest.mark.parametrize("level", ["strong", 5])
def test_a_missing_object_at_the_strong_and_bounded_levels_is_object_not_found(b, level):
    fs = cloudio.filesystem(f"gs://{b}")
    fs.pipe(f"{b}/x/there.bin", b"t")
    with cloudio.session(level):
        for op in (lambda: fs.info(f"{b}/x/nope"), lambda: fs.open(f"{b}/x/nope", "rb")):
            with pytest.raises(cloudio.ObjectNotFoundError, match=f"gs://{b}/x/nope"):
                op()


def test_setxattrs_of_a_missing_object_is_object_not_found(b):
    """(A merge of a missing source would be too on GCS, a 404; fake-gcs-server answers it 500.)"""
    fs = cloudio.filesystem(f"gs://{b}")
    with pytest.raises(cloudio.ObjectNotFoundError, match=f"gs://{b}/m/nope.bin"):
        fs.setxattrs(f"{b}/m/nope.bin", custom="x")


# ---------------------------------------------------------------------------------------------
# a download in ranges: the local file has its final size from the start, yet bytes keep arriving
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def ranged_downloads(monkeypatch):
    """Every gcsfs download of an object over 5 MiB in 1 MiB ranges, two at a time (gcsfs does so from
    100 MiB on, in 16 MiB ranges: the same path, smaller), each range 1.5 s late; time limit 2 s."""
    import gcsfs.core

    async def no_threshold(self, bucket):
        return 0

    get_file = gcsfs.core.GCSFileSystem._get_file

    async def in_ranges(self, rpath, lpath, **kwargs):
        kwargs = {"concurrency": 2, "chunk_size": 2**20, "max_prefetch_size": 4 * 2**20, **kwargs}
        return await get_file(self, rpath, lpath, **kwargs)

    monkeypatch.setenv("CLOUDIO_HTTP_TIMEOUT", "2")
    monkeypatch.setattr(gcsfs.core.GCSFileSystem, "_get_threshold_for_disk_reads", no_threshold)
    monkeypatch.setattr(gcsfs.core.GCSFileSystem, "_get_file", in_ranges)


def test_a_get_in_ranges_that_keeps_arriving_is_not_cut_short(fault_proxy, b, tmp_path, ranged_downloads):
    fs = cloudio.filesystem(f"gs://{b}")
    data = os.urandom(16 * 2**20)
    fs.pipe(f"{b}/big.bin", data)
    fault_proxy.add("delay", method="GET", path=r"alt=media", seconds=1.5, times=None)
    fs.get(f"{b}/big.bin", str(tmp_path / "big.bin"))  # about 12 s: past the 6 s of no change allowed
    assert (tmp_path / "big.bin").read_bytes() == data
    assert len(fault_proxy.requests(r"alt=media")) >= 16


def test_a_download_in_ranges_that_keeps_arriving_is_not_cut_short(fault_proxy, b, tmp_path, ranged_downloads):
    from cloudio._gcs.transfer import download

    data = os.urandom(16 * 2**20)
    cloudio.filesystem(f"gs://{b}").pipe(f"{b}/big.bin", data)
    fault_proxy.add("delay", method="GET", path=r"alt=media", seconds=1.5, times=None)
    download(f"gs://{b}/big.bin", tmp_path / "big.bin")
    assert (tmp_path / "big.bin").read_bytes() == data


@pytest.mark.parametrize("through", ["get", "download"])
def test_a_download_in_ranges_that_stops_arriving_is_given_up(fault_proxy, b, tmp_path, ranged_downloads, through):
    from cloudio._gcs.transfer import download

    fs = cloudio.filesystem(f"gs://{b}")
    fs.pipe(f"{b}/big.bin", os.urandom(16 * 2**20))
    fault_proxy.add("hang", method="GET", path=r"alt=media", skip=3, times=None)  # a few ranges, then silence
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            if through == "get":
                fs.get(f"{b}/big.bin", str(tmp_path / "big.bin"))
            else:
                download(f"gs://{b}/big.bin", tmp_path / "big.bin")
            outcome.append(None)
        except BaseException as e:
            outcome.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(40)  # no change for 8 s (3 x 2 s, and gcsfs's first wait) is given up, sampled every 2 s
    assert outcome, "still downloading 40 s after the last range arrived"
    assert isinstance(outcome[0], cloudio.TransientError), repr(outcome[0])
    assert f"gs://{b}/big.bin" in str(outcome[0]) and not (tmp_path / "big.bin").exists()


@pytest.mark.parametrize("change", ["merge", "setxattrs"])
def test_a_change_of_an_object_gdal_is_reading_waits_off_the_event_loop(
        fault_proxy, gcs_emulator, gcs_bucket: str, b: str, change: str) -> None:
    """``merge`` and ``setxattrs`` of an object a GDAL read of it is in flight for wait for that read, as every
    other write does, in a thread: every call of every gcsfs instance shares fsspec's one event loop. They
    waited on the loop (their journal record waited for the read's gate there), and other calls stalled."""
    import time

    from rasters import noise_tif, put

    fs = cloudio.filesystem(gcs_bucket)
    put(gcs_emulator, f"{gcs_bucket}/g/a.tif", noise_tif(1024))
    fs.pipe({f"{b}/g/part": b"p", f"{b}/g/o.bin": b"o"})
    ds = cloudio.open(f"{gcs_bucket}/g/a.tif")
    release = threading.Event()
    held = fault_proxy.add("delay", method="GET", path=r"/g/a\.tif$", release=release, seconds=20, times=None)
    reading = threading.Thread(target=lambda: ds.read(1))
    reading.start()
    deadline = time.monotonic() + 10
    while not held.hits and time.monotonic() < deadline:
        time.sleep(0.01)
    assert held.hits, "GDAL's read did not reach the server"
    act = ((lambda: fs.merge(f"{b}/g/a.tif", [f"{b}/g/part"])) if change == "merge"
           else (lambda: fs.setxattrs(f"{b}/g/a.tif", color="red")))
    changing = threading.Thread(target=act)
    changing.start()
    timer = threading.Timer(5, release.set)
    timer.start()
    try:
        time.sleep(0.5)
        t0 = time.monotonic()
        assert fs.cat(f"{b}/g/o.bin") == b"o"
        took = time.monotonic() - t0
    finally:
        release.set()
        timer.cancel()
        reading.join(30)
        changing.join(30)
        ds.close()
    assert took < 2, f"another call waited {took:.1f} s for the GDAL read"


def test_a_download_given_up_has_ended_before_its_caller_hears(monkeypatch) -> None:
    """``bounded_while_arriving`` gives a download up once no byte arrived for the call limit: it cancelled
    the download's task and raised at once, while the task still ran its own ending (gcsfs removes the
    partial local file as the cancel reaches it). The caller could find the partial file after the error
    (``test_a_download_in_ranges_that_stops_arriving_is_given_up`` failed about one run in eight)."""
    import asyncio
    import types

    from cloudio._gcs import client

    monkeypatch.setattr(client, "gcsfs_call_limit", lambda _timeout: 0.2)
    ended: list[str] = []

    async def download() -> None:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            await asyncio.sleep(0.3)  # its own ending takes a while (removing a partial file, say)
            ended.append("removed")
            raise

    async def main() -> None:
        with pytest.raises(TimeoutError):
            await client.bounded_while_arriving(types.SimpleNamespace(requests_timeout=1), download(), lambda: 0)
        assert ended == ["removed"]

    asyncio.run(main())
