"""Hangs, and a server that dies, across the faces (GDAL reads and writes, write_vrt, the fsspec face,
save_array/load_array, open_zarr/to_zarr). Requests the proxy never answers, an emulator killed in the middle of
a transfer (and restarted from its filesystem root: what a restarted server holds), and the per-object gates of
the GDAL face after such failures.

Every operation that might hang runs in a daemon thread joined with a time limit: a hang fails the test instead
of blocking the run. Limits use CLOUDIO_HTTP_TIMEOUT=1 (a tracked gcsfs call: 3 x 1 s, retries included, and
the 2 s gcsfs may wait before its first retry; a GDAL
request: about 4 x 1 + 8 s, docs/guide.md "Timeouts and retries").

Written by a review; its failures were fixed at their causes, and the tests marked xfail name what is still
open.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import pytest
from faultproxy import FaultProxy
from outcomes import Outcome
from rasterio.io import MemoryFile
from rasters import mosaic_vrt, noise, noise_tif, pixel, profile8, tif, vrts_over, write8

import cloudio
from cloudio import _config
from cloudio._gcs.client import GCSFS_FIRST_RETRY_WAIT, TOTAL_FACTOR
from cloudio._gdal.gates import gates
from cloudio._journal import journal
from cloudio.emulator import Emulator

#: a tracked gcsfs call may take 3 x CLOUDIO_HTTP_TIMEOUT (1 s here) and the 2 s gcsfs may wait before its first
#: retry; a GDAL request 4 x 1 + 8 s
CALL_LIMIT = TOTAL_FACTOR * 1.0 + GCSFS_FIRST_RETRY_WAIT
GDAL_LIMIT = 12.0


def _wait_for(cond: Callable[[], bool], seconds: float) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


def _under_fault(proxy: FaultProxy, fn: Callable[[], Any], limit: float, fault: str = "hang",
                 **rule: Any) -> tuple[Outcome, bool, str, int]:
    """``fn()`` in a daemon thread while ``proxy`` applies one rule (``fault``, ``rule`` its matching and budget),
    waited for at most ``limit`` s; the proxy's rules are cleared after. Returns the outcome, whether it finished
    in time, what it said then, and how many requests the rule met."""
    r = proxy.add(fault, **rule)
    o = Outcome(fn).start()
    done = o.finished(limit)
    said = o.said()
    proxy.clear()
    return o, done, said, r.hits


def _done_or_a_cloudio_error_naming(url: str, o: Outcome, said: str) -> None:
    """The call ended with its work done, or with a CloudioError naming ``url``."""
    if o.error is not None:
        assert isinstance(o.error, cloudio.CloudioError) and url in str(o.error), said


def _first_pixel(url: str) -> int:
    with cloudio.open(url) as ds:
        return int(ds.read(1)[0, 0])


def _kinds(url: str, seq: int) -> list[str]:
    return [c.kind for c in journal().since(seq) if c.touches(url)]


@pytest.fixture
def quick(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLOUDIO_HTTP_TIMEOUT", "1")


# -------------------------------------------------------------------------------------------------
# a server of the test's own, killed and restarted from its filesystem root
# -------------------------------------------------------------------------------------------------


class Server:
    """fake-gcs-server with the filesystem backend: killed with SIGKILL, restarted on the same port and root."""

    def __init__(self, root: os.PathLike[str]) -> None:
        self.root = root
        self.emu = Emulator(mode="binary", backend="filesystem", root=root).start()
        self.port = urlsplit(self.emu.url).port
        self.killed = threading.Event()

    def kill(self) -> None:
        pid = self.emu.pid
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
        self.emu.stop()
        self.killed.set()

    def restart(self) -> None:
        self.emu = Emulator(mode="binary", backend="filesystem", root=self.root, port=self.port).start()

    def blob(self, url: str) -> tuple[bytes | None, int | None]:
        bucket, key = url[len("gs://"):].split("/", 1)
        b = self.emu.client.bucket(bucket).get_blob(key)
        if b is None:
            return None, None
        return b.download_as_bytes(), int(b.generation)


@pytest.fixture
def own(tmp_path: Any, quick: None) -> Iterator[tuple[Server, FaultProxy]]:
    """A server of this test's own behind a fault proxy, cloudio's endpoint while the test runs."""
    srv = Server(tmp_path / "gcs")
    try:
        with FaultProxy(srv.emu.url) as proxy:
            _config.push_endpoint(proxy.url)
            try:
                yield srv, proxy
            finally:
                _config.pop_endpoint()
    finally:
        srv.emu.stop()


# -------------------------------------------------------------------------------------------------
# 1. gates: a write interrupted while it waits for a read; a write waiting on the event loop
# -------------------------------------------------------------------------------------------------


def _reader_in_its_gate(url: str, fault_proxy: FaultProxy, bucket: str, key_re: str) -> tuple[Outcome, Any]:
    """A thread reading ``url`` through an open dataset whose GDAL range GETs the proxy never answers: it holds
    the object's gate (shared) for the whole of GDAL's retries. Returns it once its first GET hangs."""
    opened, go = threading.Event(), threading.Event()

    def read() -> Any:
        with cloudio.open(url) as ds:
            opened.set()
            go.wait(30)
            return ds.read(1)[0, 0]

    r = Outcome(read).start()
    assert opened.wait(30), r.said()
    rule = fault_proxy.add("hang", method="GET", path=rf"^/{bucket}/{key_re}$", times=None)
    go.set()
    assert _wait_for(lambda: rule.hits >= 1, 10), "the reader's GET never reached the proxy"
    time.sleep(0.2)
    return r, rule


@pytest.mark.usefixtures("python_sigint")
def test_a_gdal_write_interrupted_while_it_waits_for_a_read_leaves_the_object_readable(gcs_bucket, fault_proxy,
                                                                                        quick):
    """A notebook user presses Ctrl-C while ``cloudio.open(url, "w")``'s close waits for another thread's read of
    the object (a read stuck on a silent server). The write raises KeyboardInterrupt, nothing was uploaded; the
    next read of the object in the process must not wait forever for a change that will never come."""
    b = gcs_bucket[len("gs://"):]
    url = f"{gcs_bucket}/i/x.tif"
    cloudio.filesystem(gcs_bucket).pipe(url, noise_tif())  # reads of its blocks need range GETs
    r, _ = _reader_in_its_gate(url, fault_proxy, b, r"i/x\.tif")
    main = threading.main_thread().ident
    assert main is not None
    vsi = f"/vsigs/{b}/i/x.tif"
    in_write = threading.Event()

    def interrupt() -> None:  # Ctrl-C once the write's close waits in the object's gate for the reader
        if _wait_for(lambda: vsi in gates._changing, 10) and in_write.is_set():
            time.sleep(0.3)
            if in_write.is_set():
                signal.pthread_kill(main, signal.SIGINT)

    in_write.set()
    threading.Thread(target=interrupt, daemon=True).start()
    try:
        with pytest.raises(KeyboardInterrupt):
            with cloudio.open(url, "w", **profile8()) as dst:
                dst.write(np.full((1, 64, 64), 2, "uint8"))
    finally:
        in_write.clear()
    fault_proxy.clear()
    leaked = dict(gates._changing)
    after = Outcome(lambda: _first_pixel(url)).start()
    done = after.finished(GDAL_LIMIT)
    r.finished(0)
    assert done, (f"a read of {url} after the interrupted write: {after.said()} (gates still held as changing: "
                  f"{leaked}; the stuck reader: {r.said()})")
    assert after.error is None and after.value == int(noise()[0, 0, 0]), after.said()


def test_an_fsspec_write_waiting_for_a_stalled_gdal_read_does_not_stall_other_fsspec_calls(gcs_bucket,
                                                                                           fault_proxy,
                                                                                           monkeypatch):
    """Thread R reads x.tif through GDAL, its GETs unanswered (CLOUDIO_HTTP_TIMEOUT=3: GDAL gives up after about
    15 s). Thread W pipes x.tif through cloudio.filesystem: it waits, by design, for R's read (the object's gate).
    Thread C cats another object through a filesystem with requests_timeout=1 (one call: 5 s at most). C has
    nothing to do with x.tif and must end within its own limit; W must not hold fsspec's event loop while it
    waits."""
    monkeypatch.setenv("CLOUDIO_HTTP_TIMEOUT", "3")
    b = gcs_bucket[len("gs://"):]
    url, other = f"{gcs_bucket}/f/x.tif", f"{gcs_bucket}/f/other.bin"
    cloudio.filesystem(gcs_bucket).pipe(url, noise_tif())
    quick_fs = cloudio.filesystem(gcs_bucket, requests_timeout=1)
    quick_fs.pipe(other, b"o" * 100)
    r, _ = _reader_in_its_gate(url, fault_proxy, b, r"f/x\.tif")
    w = Outcome(lambda: cloudio.filesystem(gcs_bucket).pipe(url, tif(5))).start()
    time.sleep(0.5)
    c = Outcome(lambda: quick_fs.cat(other)).start()
    done = c.finished(CALL_LIMIT + 3)
    said = c.said()
    fault_proxy.clear()
    w.finished(60)  # (let the event loop go before the next test)
    r.finished(60)
    c.finished(30)
    assert done, (f"cat of an unrelated object with a 1 s limit: {said} (in the end: {c.said()}); the pipe of "
                  f"x.tif, waiting for the read: {w.said()}")
    assert c.error is None and c.value == b"o" * 100, said


def test_a_batch_of_small_uploads_waiting_for_a_read_of_one_does_not_stall_other_zarr_calls(gcs_bucket):
    """save_array of small chunks sends them in one batch from zarr's event loop. One chunk object has GDAL I/O
    in flight (held by another thread for 3 s): that chunk waits for it, off the loop, and goes up after; a
    load_array of another array meanwhile (the same loop) ends at once, and the array reads back whole."""
    url, other = f"{gcs_bucket}/g/a.zarr", f"{gcs_bucket}/g/other.zarr"
    a = np.arange(64 * 64, dtype="i4").reshape(64, 64)
    cloudio.save_array(a, url, chunks=(16, 16), compressors=None)
    cloudio.save_array(a[:8, :8], other, compressors=None)
    vsi = f"/vsigs/{gcs_bucket[len('gs://'):]}/g/a.zarr/c/1/1"
    held, release = threading.Event(), threading.Event()

    def read() -> None:
        gates.enter(vsi)
        held.set()
        try:
            release.wait(30)
        finally:
            gates.exit(vsi)

    r = Outcome(read).start()
    assert held.wait(10)
    w = Outcome(lambda: cloudio.save_array(a + 1, url, chunks=(16, 16), compressors=None)).start()
    time.sleep(0.5)
    c = Outcome(lambda: cloudio.load_array(other)).start()
    done = c.finished(CALL_LIMIT)
    said, writing = c.said(), w.thread.is_alive()
    release.set()
    r.finished(10)
    assert w.finished(30) and w.error is None, w.said()
    assert done and c.error is None, f"load_array of another array while a chunk waited for a read: {said}"
    np.testing.assert_array_equal(c.value, a[:8, :8])
    assert writing, "save_array did not wait for the read of its chunk"
    np.testing.assert_array_equal(cloudio.load_array(url), a + 1)


# -------------------------------------------------------------------------------------------------
# 2. GDAL writes: every request of theirs bounded
# -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("face", ["open_w", "write_vrt"])
def test_a_gdal_write_whose_sidecar_listing_is_never_answered_ends_in_time(gcs_bucket, fault_proxy, quick, face):
    """After the object's upload, a replacing write lists its folder for the old version's sidecars. That
    listing never answered: the write must end (or raise a CloudioError naming the URL) within the limits, not
    after gcsfs's six tries and half a minute of back-off, the object held as changing all along."""
    b = gcs_bucket[len("gs://"):]
    if face == "open_w":
        url, stem = f"{gcs_bucket}/s/x.tif", "x"
        write8(url, 1)

        def write() -> None:
            write8(url, 2)
    else:
        src, url, stem = f"{gcs_bucket}/s/src.tif", f"{gcs_bucket}/s/v.vrt", "v"
        vrts_over(src, 1, url)

        def write() -> None:
            cloudio.write_vrt(mosaic_vrt([(src, 0, 0)], size=32), url)
    w, done, said, hits = _under_fault(fault_proxy, write, 2 * CALL_LIMIT + 4, method="GET",
                                       path=rf"/b/{b}/o\?.*prefix=s(%2F|/){stem}(&|$)", times=None)
    assert hits >= 1, f"the sidecar listing never reached the proxy ({w.said()}): {fault_proxy.requests()[-5:]}"
    assert done, f"{face} of {url}: {said} ({hits} listings unanswered)"
    _done_or_a_cloudio_error_naming(url, w, said)


def test_a_first_gdal_write_to_a_bucket_whose_lookup_is_never_answered_ends_in_time(gcs_bucket, fault_proxy, quick):
    """cloudio.open(url, "w") asks for the bucket's metadata once per bucket. That request never answered: the
    open must end within a call's limit (5 s here), with the write or a CloudioError naming the URL."""
    b = gcs_bucket[len("gs://"):]
    url = f"{gcs_bucket}/e/x.tif"
    w, done, said, hits = _under_fault(fault_proxy, lambda: write8(url, 3), CALL_LIMIT + 6, method="GET",
                                       path=rf"^/storage/v1/b/{b}(\?|$)", times=None)
    assert hits >= 1, f"the bucket lookup never reached the proxy ({said})"
    assert done, f"cloudio.open({url!r}, 'w') ... close(): {said}"
    _done_or_a_cloudio_error_naming(url, w, said)


def test_an_update_whose_download_is_never_answered_ends_in_time(gcs_bucket, fault_proxy, quick):
    """cloudio.open(url, "r+") downloads the object first (its metadata, then its bytes). The download of the bytes
    never answered: TransientError naming the URL within the limits (a tracked filesystem's get gives up after
    3 s without a byte), the object unchanged."""
    url = f"{gcs_bucket}/u/x.tif"
    write8(url, 4)

    def update() -> None:
        with cloudio.open(url, "r+") as ds:
            ds.write(np.full((1, 64, 64), 5, "uint8"))

    w, done, said, hits = _under_fault(fault_proxy, update, 2 * CALL_LIMIT + 4, method="GET", path=r"alt=media",
                                       times=None)
    assert hits >= 1, f"the download never reached the proxy ({said})"
    assert done, f"cloudio.open({url!r}, 'r+'): {said} ({hits} downloads unanswered)"
    assert isinstance(w.error, cloudio.TransientError) and url in str(w.error), said
    assert w.error.__cause__ is not None
    assert _first_pixel(url) == 4


@pytest.mark.parametrize("face", ["gdal_open", "open_zarr"])
def test_a_missing_object_is_reported_in_time_when_a_lookup_of_its_diagnosis_is_never_answered(
        gcs_bucket, fault_proxy, quick, face):
    """Opening something that is not there: cloudio asks the server why (the object's metadata for
    cloudio.open, the bucket's for open_zarr). That request never answered: the open must still end within the
    limits, with a CloudioError naming the URL (not found, or transient)."""
    b = gcs_bucket[len("gs://"):]
    cloudio.filesystem(gcs_bucket).pipe(f"{gcs_bucket}/m/other.bin", b"x")  # the bucket is not empty
    if face == "gdal_open":
        url = f"{gcs_bucket}/m/missing.tif"
        path = rf"^/storage/v1/b/{b}/o/m(%2F|/)missing\.tif(\?|$)"

        def run() -> Any:
            return cloudio.open(url)
    else:
        url = f"{gcs_bucket}/m/missing.zarr"
        path = rf"^/storage/v1/b/{b}(\?|$)"

        def run() -> Any:
            return cloudio.open_zarr(url)
    o, done, said, hits = _under_fault(fault_proxy, run, 2 * CALL_LIMIT + 4, method="GET", path=path, times=None)
    assert hits >= 1, f"the lookup never reached the proxy ({said}): {fault_proxy.requests()[-6:]}"
    assert done, f"{face} of {url}: {said} ({hits} lookups unanswered)"
    assert isinstance(o.error, cloudio.CloudioError) and url in str(o.error), said


def test_a_write_vrt_never_answered_fails_in_time_and_lets_a_waiting_reader_through(gcs_emulator, gcs_bucket,
                                                                                    fault_proxy, quick):
    """write_vrt's upload never answered: TransientError naming the URL within the limits. A reader of the VRT
    in another thread, waiting at the VRT's gate meanwhile, gets through once the write failed and reads the VRT
    the server still holds; the journal says nothing was written."""
    src, url = f"{gcs_bucket}/g/src.tif", f"{gcs_bucket}/g/v.vrt"
    vrts_over(src, 3, url)
    with cloudio.open(url) as r0:
        assert r0.width == 64
    seq = journal().seq
    rule = fault_proxy.add("hang", method="POST", path=r"/upload/", times=None)
    w = Outcome(lambda: cloudio.write_vrt(mosaic_vrt([(src, 0, 0)], size=32), url)).start()
    assert _wait_for(lambda: rule.hits >= 1, 10), w.said()

    def width() -> int:
        with cloudio.open(url) as ds:
            return int(ds.width)

    r = Outcome(width).start()
    w_done = w.finished(2 * CALL_LIMIT + 6)
    r_done = r.finished(5)
    fault_proxy.clear()
    assert w_done, f"write_vrt: {w.said()}"
    assert isinstance(w.error, cloudio.CloudioError) and url in str(w.error), w.said()
    assert w.error.__cause__ is not None
    assert r_done, f"the reader waiting at the VRT's gate: {r.said()}"
    assert r.error is None and r.value == 64, r.said()
    assert "write" not in _kinds(url, seq), _kinds(url, seq)
    stored = gcs_emulator.client.bucket(gcs_bucket[5:]).blob("g/v.vrt").download_as_bytes()
    assert b'rasterXSize="64"' in stored


# -------------------------------------------------------------------------------------------------
# 3. the fsspec face against a silent server
# -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("op", ["ls", "info", "open_rb", "open_wb", "put"])
def test_fsspec_calls_against_a_silent_server_end_in_time(gcs_bucket, fault_proxy, quick, tmp_path, op):
    """Every request unanswered: each call ends within its limit with a TransientError naming the gs:// URL."""
    b = gcs_bucket[len("gs://"):]
    fs = cloudio.filesystem(gcs_bucket)
    url = f"{gcs_bucket}/q/a.bin"
    fs.pipe(url, b"a" * 1000)
    local = tmp_path / "up.bin"
    local.write_bytes(b"u" * 1000)
    fs.invalidate_cache()

    def run() -> Any:
        if op == "ls":
            return fs.ls(f"{b}/q")
        if op == "info":
            return fs.info(url)
        if op == "open_rb":
            with fs.open(url, "rb") as f:
                return f.read()
        if op == "open_wb":
            with fs.open(f"{gcs_bucket}/q/w.bin", "wb") as f:
                f.write(b"w" * 1000)
            return None
        return fs.put(str(local), f"{gcs_bucket}/q/up.bin")

    o, done, said, _ = _under_fault(fault_proxy, run, 2 * CALL_LIMIT + 4, times=None)
    assert done, f"{op}: {said}"
    assert isinstance(o.error, cloudio.TransientError), said
    named = {"ls": f"{gcs_bucket}/q", "info": url, "open_rb": url, "open_wb": f"{gcs_bucket}/q/w.bin",
             "put": f"{gcs_bucket}/q/up.bin"}[op]
    assert named in str(o.error), said


# -------------------------------------------------------------------------------------------------
# 4. the Zarr face: a listing zarr makes itself, stalled or cut by a dying server
# -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fault", ["stalled", "killed"])
def test_open_zarr_whose_member_listing_fails_ends_in_time_with_a_cloudio_error(own, fault):
    """open_zarr(consolidated=False) lists the group's members (zarr's own listing, delimiter "/"). That listing
    never answered, or the server died on it: the call must end within the limits with a CloudioError naming
    the store, not after gcsfs's half minute of retries with aiohttp's own error."""
    import xarray as xr

    srv, proxy = own
    bucket = srv.emu.create_bucket(f"z-{uuid.uuid4().hex[:10]}")
    b = bucket[len("gs://"):]
    url = f"{bucket}/m.zarr"
    cloudio.to_zarr(xr.Dataset({"v": (("y", "x"), np.arange(16.0).reshape(4, 4))}), url, mode="w",
                    consolidated=False)
    kw: dict[str, Any] = {"action": srv.kill} if fault == "killed" else {}
    o, done, said, hits = _under_fault(proxy, lambda: cloudio.open_zarr(url, consolidated=False)["v"].values,
                                       2 * CALL_LIMIT + 4, "hang" if fault == "stalled" else "kill", method="GET",
                                       path=rf"/b/{b}/o\?(?=.*delimiter=(%2F|/))(?=.*prefix=m\.zarr)",
                                       times=None if fault == "stalled" else 1, **kw)
    assert hits >= 1, f"zarr's member listing never reached the proxy ({said}): {proxy.requests()[-6:]}"
    assert done, f"open_zarr({url!r}): {said}"
    assert isinstance(o.error, cloudio.CloudioError) and url in str(o.error), said


@pytest.mark.parametrize("op", ["to_zarr", "open_zarr", "save_array"])
def test_zarr_calls_against_a_silent_server_end_in_time(gcs_bucket, fault_proxy, quick, op):
    """Every request unanswered: each call ends within its limits with a CloudioError naming the store."""
    import xarray as xr

    url = f"{gcs_bucket}/s.zarr"
    ds = xr.Dataset({"v": (("y", "x"), np.arange(16.0).reshape(4, 4))})
    if op == "open_zarr":
        cloudio.to_zarr(ds, url, mode="w", consolidated=False)

    def run() -> Any:
        if op == "to_zarr":
            return cloudio.to_zarr(ds, url, mode="w", consolidated=False)
        if op == "open_zarr":
            return cloudio.open_zarr(url)["v"].values
        return cloudio.save_array(np.arange(16.0).reshape(4, 4), url)

    o, done, said, _ = _under_fault(fault_proxy, run, 2 * CALL_LIMIT + 4, times=None)
    assert done, f"{op}: {said}"
    assert isinstance(o.error, cloudio.CloudioError) and url in str(o.error), said


# -------------------------------------------------------------------------------------------------
# 5. a server killed mid-transfer, restarted from its root: the journal matches what it holds
# -------------------------------------------------------------------------------------------------


def test_a_file_write_killed_mid_resumable_upload_fails_in_time_and_the_journal_matches_the_restarted_server(own):
    """fs.open(url, "wb") sends the file in resumable chunks; the server dies on the first chunk. The write must
    end with a CloudioError naming the object's URL within the limits; after a restart from the same root the
    server holds the old object, the journal records no write of it, and cat reads the old bytes."""
    srv, proxy = own
    bucket = srv.emu.create_bucket(f"k-{uuid.uuid4().hex[:10]}")
    url = f"{bucket}/k/obj.bin"
    fs = cloudio.filesystem(bucket)
    old = b"old!" * 1000
    fs.pipe(url, old)
    rule = proxy.add("kill", method="POST", path=r"/upload/", action=srv.kill, times=1, skip=1)  # 1st: the session
    seq = journal().seq

    def write() -> None:
        with fs.open(url, "wb", block_size=256 * 1024) as f:
            f.write(b"n" * (700 * 1024))

    w = Outcome(write).start()
    done = w.finished(3 * CALL_LIMIT + 6)
    said = w.said()
    assert rule.hits == 1, f"the server was not killed mid-upload ({said}): {proxy.requests()[-6:]}"
    assert done, f"fs.open({url!r}, 'wb') after the server died: {said}"
    srv.restart()
    held, _ = srv.blob(url)
    assert held == old, "the restarted server does not hold the old object"
    kinds = _kinds(url, seq)
    assert "write" not in kinds and "delete" not in kinds, kinds
    assert fs.cat(url) == old
    assert isinstance(w.error, cloudio.CloudioError), said
    assert url in str(w.error), f"the error does not name {url}: {said}"


def test_a_gdal_write_whose_server_dies_after_the_upload_landed_journals_what_the_restarted_server_holds(own):
    """The server dies right after it answered the upload of cloudio.open(url, "w") (on the listing for old
    sidecars) and comes back 1.5 s later from its root. The write ends (done, or a CloudioError naming the URL);
    the journal's last word on the object matches what the restarted server holds, and a read in this process
    sees it."""
    srv, proxy = own
    bucket = srv.emu.create_bucket(f"g-{uuid.uuid4().hex[:10]}")
    b = bucket[len("gs://"):]
    url, control = f"{bucket}/d/x.tif", f"{bucket}/d/control.bin"
    write8(url, 1)
    cloudio.filesystem(bucket).pipe(control, b"c")
    _, control_generation = srv.blob(control)
    restarted = threading.Event()

    def die_and_come_back() -> None:
        srv.kill()

        def back() -> None:
            time.sleep(1.5)
            srv.restart()
            restarted.set()

        threading.Thread(target=back, daemon=True).start()

    rule = proxy.add("kill", method="GET", path=rf"/b/{b}/o\?.*prefix=d(%2F|/)x(&|$)", action=die_and_come_back,
                     times=1)
    seq = journal().seq
    w = Outcome(lambda: write8(url, 2)).start()
    done = w.finished(60)
    assert rule.hits == 1, f"the server was not killed after the upload ({w.said()})"
    assert restarted.wait(30)
    assert done, w.said()
    _done_or_a_cloudio_error_naming(url, w, w.said())
    held, generation = srv.blob(url)
    assert held is not None and pixel(held) == 2, "the upload had landed before the server died"
    records = [c for c in journal().since(seq) if c.touches(url)]
    assert records, "nothing journaled for a write the server holds"
    last = records[-1]
    kept_generations = srv.blob(control)[1] == control_generation  # (else the emulator renumbers on restart)
    assert last.kind == "invalidate" or (last.kind == "write" and (
        last.generation == generation or not kept_generations)), (
        f"journal's last record {last.kind} generation {last.generation}; the server holds generation {generation}")
    assert _first_pixel(url) == 2
    assert w.elapsed is not None and w.elapsed <= GDAL_LIMIT, w.said()


@pytest.mark.xfail(strict=False, reason=(
    "the emulator killed mid-write sometimes comes back without the test's bucket (a 404 listing it after the "
    "restart: fake-gcs-server had not yet stored the bucket on disk); seen once in five runs"))
def test_save_array_killed_mid_way_is_refused_after_a_restart_and_the_journal_matches(own):
    """The server dies at save_array's third shard upload (and comes back from its root). The call ends with a
    CloudioError naming the store within the limits; the restarted server holds the write marker, so
    load_array refuses the store (IncompleteWriteError) rather than read a mix; every shard the restarted server
    holds from this write is journaled (written or invalidated)."""
    srv, proxy = own
    bucket = srv.emu.create_bucket(f"s-{uuid.uuid4().hex[:10]}")
    url = f"{bucket}/a.zarr"
    old = np.arange(64 * 64, dtype="i4").reshape(64, 64)
    cloudio.save_array(old, url, chunks=(16, 16), shards=(32, 32))
    b = bucket[len("gs://"):]
    before = {bl.name: int(bl.generation) for bl in srv.emu.client.list_blobs(b, prefix="a.zarr/")}
    rule = proxy.add("kill", method="POST", path=r"/upload/.*a\.zarr%2Fc%2F", action=srv.kill, times=1, skip=2)
    seq = journal().seq
    o = Outcome(lambda: cloudio.save_array(-old, url, chunks=(16, 16), shards=(32, 32))).start()
    done = o.finished(3 * CALL_LIMIT + 6)
    said = o.said()
    assert rule.hits == 1, f"the server was not killed mid-write ({said}): {proxy.requests()[-6:]}"
    assert done, f"save_array after the server died: {said}"
    assert isinstance(o.error, cloudio.CloudioError) and url in str(o.error), said
    proxy.clear()
    srv.restart()
    told = {c.url for c in journal().since(seq)}
    after = {bl.name: int(bl.generation) for bl in srv.emu.client.list_blobs(b, prefix="a.zarr/")}
    changed = sorted(f"gs://{b}/{n}" for n, g in after.items() if before.get(n) != g)
    assert changed, "the restarted server holds nothing of the write (its marker at least went up)"
    untold = [u for u in changed if u not in told and not any(c.touches(u) for c in journal().since(seq))]
    assert not untold, f"changed on the server, not in the journal: {untold}"
    with pytest.raises(cloudio.IncompleteWriteError, match=re.escape(url)):
        cloudio.load_array(url)


def test_a_gdal_read_whose_server_dies_mid_download_ends_in_time_and_reads_right_after_a_restart(own):
    """An open dataset reads its one block; the server dies on that GET. The read ends within GDAL's limits (one
    request: 4 x 1 + 8 s, retried once by cloudio) and one call's, with a TransientError naming the URL (its
    cause GDAL's); once the server is back, a new open reads the object whole and right."""
    srv, proxy = own
    bucket = srv.emu.create_bucket(f"r-{uuid.uuid4().hex[:10]}")
    b = bucket[len("gs://"):]
    url = f"{bucket}/d/n.tif"
    with MemoryFile() as mem:
        with mem.open(driver="GTiff", width=256, height=256, count=1, dtype="uint8", tiled=True, blockxsize=256,
                      blockysize=256) as one:
            one.write(noise(256))
        cloudio.filesystem(bucket).pipe(url, bytes(mem.read()))
    opened, go = threading.Event(), threading.Event()

    def read() -> Any:
        with cloudio.open(url) as ds:  # opened, read and closed in one thread
            opened.set()
            go.wait(30)
            return ds.read(1)

    o = Outcome(read).start()
    assert opened.wait(30), o.said()
    rule = proxy.add("kill", method="GET", path=rf"^/{b}/d/n\.tif$", action=srv.kill, times=1)
    go.set()
    done = o.finished(2 * GDAL_LIMIT + CALL_LIMIT + 3)
    said = o.said()
    assert rule.hits == 1, f"the server was not killed mid-read ({said})"
    assert done, f"a read after the server died: {said}"
    assert isinstance(o.error, cloudio.TransientError) and url in str(o.error), said
    assert o.error.__cause__ is not None

    srv.restart()
    with cloudio.open(url) as ds:
        np.testing.assert_array_equal(ds.read(1), noise(256)[0])
