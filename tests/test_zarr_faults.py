"""Zarr writes that fail half way: readers through cloudio refuse the store instead of mixing old and new.

Faults come from the proxy in front of the real emulator (tests/faultproxy.py).
"""

from __future__ import annotations

import json
import threading
import time
from urllib.parse import unquote

import dask
import numpy as np
import pytest
import xarray as xr
import zarr

import cloudio
from cloudio._paths import parse_gcs
from cloudio._zarr import last_seen

MARKER = ".cloudio-write-in-progress"  # the documented name (docs/consistency.md)

def _uploads_fail_after(fault_proxy, n: int):
    return fault_proxy.add("status", code=503, method="POST", path=r"/upload/", times=None, skip=n)


def _marker_exists(emu, url: str) -> bool:
    p = parse_gcs(f"{url}/{MARKER}")
    return emu.client.bucket(p.bucket).get_blob(p.key) is not None


def test_save_array_failing_half_way_is_refused_until_rewritten(gcs_emulator, gcs_bucket, fault_proxy,
                                                                 quick_retries):
    url = f"{gcs_bucket}/half.zarr"
    old = np.arange(200 * 200, dtype="i4").reshape(200, 200)
    new = -old
    cloudio.save_array(old, url, chunks=(50, 50), shards=(100, 100))  # 4 shards
    assert not _marker_exists(gcs_emulator, url)  # removed on commit

    _uploads_fail_after(fault_proxy, 3)  # the marker, zarr.json and one shard go through
    t0 = time.monotonic()
    with pytest.raises((cloudio.TransientError, cloudio.UploadError)) as info:
        cloudio.save_array(new, url, chunks=(50, 50), shards=(100, 100))
    assert time.monotonic() - t0 < 30  # generous: does not wait out gcsfs's default back-off
    assert url in str(info.value) and info.value.__cause__ is not None
    assert _marker_exists(gcs_emulator, url)

    fault_proxy.clear()
    with pytest.raises(cloudio.IncompleteWriteError) as info:
        cloudio.load_array(url)
    msg = str(info.value)
    assert url in msg and "save_array" in msg and MARKER in msg
    with pytest.raises(cloudio.IncompleteWriteError):
        cloudio.load_array(url, lazy=True)

    cloudio.save_array(new, url, chunks=(50, 50), shards=(100, 100))  # a rewrite clears it
    np.testing.assert_array_equal(cloudio.load_array(url), new)
    assert not _marker_exists(gcs_emulator, url)


def test_marker_can_be_removed_by_hand(gcs_emulator, gcs_bucket, fault_proxy, quick_retries):
    """The call the error message names removes the marker, and the store reads again."""
    url = f"{gcs_bucket}/byhand.zarr"
    # marker and zarr.json go up, no shard does (zarr.json goes up alongside the shards: count no uploads)
    fault_proxy.add("status", code=503, method="POST", path=r"/upload/.*name=[^&]*%2Fc%2F", times=None)
    with pytest.raises((cloudio.TransientError, cloudio.UploadError)):
        cloudio.save_array(np.ones((100, 100), "u1"), url, chunks=(50, 50), shards=(50, 50))
    fault_proxy.clear()
    with pytest.raises(cloudio.IncompleteWriteError):
        cloudio.load_array(url)
    cloudio.filesystem(url).rm(f"{url}/{MARKER}")
    assert cloudio.load_array(url).shape == (100, 100)


def test_a_failed_write_gives_no_shard_buffer_back(gcs_emulator, gcs_bucket, fault_proxy, quick_retries):
    """Shard buffers of a write go back to the pool only once every upload was answered: after a failure
    an upload cancelled part way may still be sent from its buffer, which must then be no one else's."""
    from cloudio._zarr.buffers import shard_buffers

    a = np.random.default_rng(3).standard_normal((1024, 1024)).astype("f4")  # shards of 1 MiB: one upload each
    shard_buffers.clear()
    cloudio.save_array(a, f"{gcs_bucket}/kept.zarr", chunks=(256, 256), shards=(512, 512), compressors=None)
    assert shard_buffers.kept() >= 1 << 20  # a write that went through gives its buffers back
    shard_buffers.clear()
    fault_proxy.add("status", code=503, method="POST", path=r"/upload/.*name=lost\.zarr%2Fc%2F", times=None)
    with pytest.raises((cloudio.TransientError, cloudio.UploadError)):
        cloudio.save_array(a, f"{gcs_bucket}/lost.zarr", chunks=(256, 256), shards=(512, 512), compressors=None)
    assert shard_buffers.kept() == 0


def test_no_shard_goes_up_after_a_failed_write_raised(gcs_emulator, gcs_bucket, fault_proxy):
    """When one shard's upload fails for good, the write's other workers stop: only the uploads then in
    flight are still answered, no shard is sent after save_array raised (they went on encoding and
    sending every remaining shard in the background)."""
    import zarr

    a = np.random.default_rng(4).standard_normal((8192, 512)).astype("f4")  # 16 shards of 1 MiB
    fault_proxy.add("status", code=403, method="POST", path=r"/upload/.*name=stops\.zarr%2Fc%2F15%2F", times=None)
    # the other shards' uploads reach the emulator, and their answers are held until the test lets them go,
    # after save_array raised: no worker can move on to a next shard before the refusal was taken in, however
    # slowly that happens (a wall-clock hold, one second and then three, was overtaken under load: all 16 went up)
    release = threading.Event()
    held = fault_proxy.add("late", method="POST", path=r"/upload/.*name=stops\.zarr%2Fc%2F", release=release,
                           seconds=25, times=None)  # under the 30 s request limit: nothing is sent again meanwhile
    try:
        with pytest.raises(cloudio.CloudioError) as info:
            cloudio.save_array(a, f"{gcs_bucket}/stops.zarr", chunks=(256, 256), shards=(512, 512),
                               compressors=None)
    finally:
        release.set()
    assert f"{gcs_bucket}/stops.zarr" in str(info.value) and info.value.__cause__ is not None

    def answered() -> int:  # held uploads the proxy answered (it logs a held request once answered)
        return sum(1 for m, p, _ in fault_proxy.requests(r"name=stops\.zarr%2Fc%2F")
                   if m == "POST" and "name=stops.zarr%2Fc%2F15%2F" not in p)

    def all_answered(what: str) -> None:
        deadline = time.monotonic() + 30
        while answered() < held.hits:
            assert time.monotonic() < deadline, f"{held.hits - answered()} held uploads never answered ({what})"
            time.sleep(0.01)

    all_answered("released")
    # a worker still running after the raise now has its answer and would send its next shard at once
    time.sleep(2.0)
    all_answered("sent after the release")
    sent = {unquote(p.rpartition("name=")[2].partition("&")[0]) for m, p, _ in fault_proxy.requests()
            if m == "POST" and "name=stops.zarr%2Fc%2F" in p}
    workers = int(zarr.config.get("async.concurrency"))
    assert "stops.zarr/c/15/0" in sent and len(sent) <= workers < 16, sorted(sent)


def test_no_zstd_shard_goes_up_after_a_failed_write_raised(gcs_emulator, gcs_bucket, fault_proxy):
    """Shards of zstd chunks are encoded by coder threads that do not wait for uploads: when the first
    shard's upload is refused, they stop, and no shard encoded after save_array raised is sent."""
    import zarr

    a = np.round(np.random.default_rng(4).standard_normal((8192, 512)).astype("f4") * 8) / 8  # 16 shards of 1 MiB
    fault_proxy.add("status", code=403, method="POST", path=r"/upload/.*name=zstops\.zarr%2Fc%2F0%2F", times=None)
    release = threading.Event()  # every other shard's upload is held until save_array raised
    held = fault_proxy.add("late", method="POST", path=r"/upload/.*name=zstops\.zarr%2Fc%2F", release=release,
                           seconds=25, times=None)
    try:
        with pytest.raises(cloudio.CloudioError) as info:
            cloudio.save_array(a, f"{gcs_bucket}/zstops.zarr", chunks=(128, 128), shards=(512, 512),
                               compressors=zarr.codecs.ZstdCodec(level=3))
    finally:
        release.set()
    assert f"{gcs_bucket}/zstops.zarr/c/0/0" in str(info.value) and info.value.__cause__ is not None
    time.sleep(2.0)  # a coder thread still running would have encoded and sent its next shards by now
    # an upload already handed to a sender thread may still arrive; none encoded after the raise does
    assert held.hits <= int(zarr.config.get("async.concurrency")) < 15


def test_a_write_that_stopped_before_its_metadata_is_refused_as_incomplete(gcs_emulator, gcs_bucket, fault_proxy,
                                                                            quick_retries):
    """The marker's GET runs alongside the metadata's: a marker found wins over the missing zarr.json."""
    url = f"{gcs_bucket}/nometa.zarr"
    _uploads_fail_after(fault_proxy, 1)  # the marker only
    with pytest.raises((cloudio.TransientError, cloudio.UploadError)):
        cloudio.save_array(np.ones((100, 100), "u1"), url, chunks=(50, 50), shards=(50, 50))
    fault_proxy.clear()
    with pytest.raises(cloudio.IncompleteWriteError, match="nometa.zarr"):
        cloudio.load_array(url)


def _ds(scale: float) -> xr.Dataset:
    x = np.arange(8 * 6, dtype="f8").reshape(8, 6) * scale
    return xr.Dataset({"x": (("t", "y"), x)}, coords={"t": np.arange(8), "y": np.arange(6)})


@pytest.mark.parametrize("mode", ["w", "a"])
def test_to_zarr_failing_half_way_is_refused_until_rewritten(gcs_emulator, gcs_bucket, fault_proxy, quick_retries,
                                                             mode):
    url = f"{gcs_bucket}/half-ds.zarr"
    enc = {"x": {"chunks": (2, 6)}}
    cloudio.to_zarr(_ds(1.0), url, mode="w", encoding=enc, consolidated=False)
    assert not _marker_exists(gcs_emulator, url)

    _uploads_fail_after(fault_proxy, 3)
    new = _ds(-1.0) if mode == "w" else _ds(-1.0).assign(z=_ds(2.0).x)
    with pytest.raises((cloudio.TransientError, cloudio.UploadError)) as info:
        cloudio.to_zarr(new, url, mode=mode, **({"encoding": enc} if mode == "w" else {}), consolidated=False)
    assert url in str(info.value)
    fault_proxy.clear()
    with pytest.raises(cloudio.IncompleteWriteError, match=url):
        cloudio.open_zarr(url, consolidated=False)

    cloudio.to_zarr(_ds(-1.0), url, mode="w", encoding=enc, consolidated=False)
    np.testing.assert_array_equal(cloudio.open_zarr(url, consolidated=False).x.values, _ds(-1.0).x.values)
    assert not _marker_exists(gcs_emulator, url)


def test_to_zarr_compute_false_removes_marker_after_the_graph(gcs_emulator, gcs_bucket):
    import dask

    url = f"{gcs_bucket}/delayed.zarr"
    ds = _ds(1.0).chunk({"t": 2})
    delayed = cloudio.to_zarr(ds, url, mode="w", compute=False, consolidated=False)
    assert _marker_exists(gcs_emulator, url)  # metadata written, chunks not yet
    with pytest.raises(cloudio.IncompleteWriteError):
        cloudio.open_zarr(url, consolidated=False)
    with dask.config.set(scheduler="threads"):
        delayed.compute()
    assert not _marker_exists(gcs_emulator, url)
    np.testing.assert_array_equal(cloudio.open_zarr(url, consolidated=False).x.values, ds.x.values)


def test_refused_write_leaves_no_marker(gcs_emulator, gcs_bucket):
    """A write refused before it changed anything (mode="w-" on an existing store) leaves the store readable."""
    url = f"{gcs_bucket}/exists.zarr"
    cloudio.to_zarr(_ds(1.0), url, mode="w", consolidated=False)
    with pytest.raises(Exception) as info:
        cloudio.to_zarr(_ds(2.0), url, mode="w-", consolidated=False)
    assert not isinstance(info.value, cloudio.IncompleteWriteError)
    assert not _marker_exists(gcs_emulator, url)
    np.testing.assert_array_equal(cloudio.open_zarr(url, consolidated=False).x.values, _ds(1.0).x.values)


@pytest.mark.parametrize("name", ["zarr.json", MARKER])
def test_a_document_flipped_on_the_way_down_is_read_again(gcs_emulator, gcs_bucket, fault_proxy, name) -> None:
    """Metadata documents and the write marker are CRC32C-checked like chunks: a byte changed on the
    way is noticed and the document read again, not parsed as a broken (or, worse, a different) array."""
    url = f"{gcs_bucket}/doc.zarr"
    a = np.arange(100 * 100, dtype="f4").reshape(100, 100)
    cloudio.save_array(a, url, chunks=(50, 50))
    if name == MARKER:  # a marker left by a writer still at work: refused, from the bytes as stored
        gcs_emulator.client.bucket(parse_gcs(url).bucket).blob(f"{parse_gcs(url).key}/{MARKER}").upload_from_string(
            b'{"host": "elsewhere", "pid": 1, "operation": "save_array", "time": "2026-12-03T10:00:00Z"}')
    rule = fault_proxy.add("flip", method="GET", path=f"doc.zarr%2F{name}", times=1)
    last_seen.forget_all()  # the array opened first, its documents read (not guessed: tests/test_zarr_last_seen.py)
    if name == MARKER:
        with pytest.raises(cloudio.IncompleteWriteError, match=r"by elsewhere \(pid 1, save_array\)"):
            cloudio.load_array(url)
    else:
        assert cloudio.load_array(url).tobytes() == a.tobytes()
    assert rule.hits == 1


def test_a_process_whose_write_failed_exits_quietly() -> None:
    """gcsfs closes an asynchronous session at exit on fsspec's loop, not on zarr's that owns it; after
    a failed write that printed "attached to a different loop" tracebacks. cloudio closes its sessions
    on their own loop first. Run in a child process: it is the exit that is under test."""
    import os
    import subprocess
    import sys

    here = os.path.dirname(__file__)
    test = f"{os.path.join(here, 'test_zarr_faults.py')}::test_marker_can_be_removed_by_hand"
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test],
                       capture_output=True, text=True, timeout=300, cwd=os.path.dirname(here))
    assert r.returncode == 0, r.stdout[-2000:]
    out = r.stdout + r.stderr
    assert "1 passed" in out
    assert "attached to a different loop" not in out and "Task was destroyed" not in out, out[-3000:]


def _store_requests(fault_proxy, name: str) -> list[tuple[str, str]]:
    """The requests that named ``name`` in their path (the marker's upload names it in its body: its
    entry is the one create-only upload, ``ifGenerationMatch=0``)."""
    return [(m, p) for m, p, _ in fault_proxy.log if name in p or "ifGenerationMatch=0" in p]


def test_nothing_in_the_store_changes_before_the_marker_is_up(gcs_emulator, gcs_bucket, fault_proxy):
    """save_array encodes its first shards while the marker goes up, but deletes nothing and uploads
    nothing before the server confirmed the marker: a reader meanwhile sees the old array whole."""
    url = f"{gcs_bucket}/ordered.zarr"
    old = np.full((1024, 1024), 1.0, "f4")  # shards of 1 MiB: encoded in threads while the marker goes up
    new = np.random.default_rng(5).standard_normal((1024, 1024)).astype("f4")
    cloudio.save_array(old, url, chunks=(256, 256), shards=(512, 512), compressors=None)
    fault_proxy.log.clear()
    rule = fault_proxy.add("delay", method="POST", body=MARKER.encode(), seconds=0.5)
    cloudio.save_array(new, url, chunks=(256, 256), shards=(512, 512), compressors=None)
    assert rule.hits == 1
    sent = _store_requests(fault_proxy, "ordered.zarr")
    first_change = next(i for i, (m, p) in enumerate(sent) if m in ("POST", "DELETE"))
    assert "ifGenerationMatch=0" in sent[first_change][1], sent  # the marker, answered before any other change
    assert sum("name=ordered.zarr%2Fc%2F" in p for _, p in sent) == 4
    np.testing.assert_array_equal(cloudio.load_array(url), new)


def test_a_write_whose_marker_could_not_go_up_changes_nothing(gcs_emulator, gcs_bucket, fault_proxy):
    """The marker's upload refused: save_array raises naming the store, nothing was deleted or uploaded,
    and the old array reads as it was (no incomplete-write mark either)."""
    url = f"{gcs_bucket}/unmarked.zarr"
    old = np.full((1024, 1024), 2.0, "f4")
    cloudio.save_array(old, url, chunks=(256, 256), shards=(512, 512), compressors=None)
    fault_proxy.log.clear()
    fault_proxy.add("status", code=403, method="POST", body=MARKER.encode(), times=None)
    with pytest.raises(cloudio.CloudioError) as info:
        cloudio.save_array(np.zeros((1024, 1024), "f4"), url, chunks=(256, 256), shards=(512, 512), compressors=None)
    assert "unmarked.zarr" in str(info.value) and info.value.__cause__ is not None
    time.sleep(0.5)  # anything sent in the background would be logged by now
    changes = [(m, p) for m, p in _store_requests(fault_proxy, "unmarked.zarr") if m in ("POST", "DELETE")]
    assert all("ifGenerationMatch=0" in p for _, p in changes), changes
    fault_proxy.clear()
    assert not _marker_exists(gcs_emulator, url)
    np.testing.assert_array_equal(cloudio.load_array(url), old)


def test_the_old_objects_are_listed_alongside_the_marker_and_only_those_not_overwritten_deleted_last(
        gcs_emulator, gcs_bucket, fault_proxy):
    """The listing of what the store held goes out alongside the marker, and both are answered before the
    first chunk goes up (a store of objects that are not Zarr's is refused before anything is written:
    tests/test_replacing_writes.py); what the new array did not overwrite is deleted after the last
    upload, nothing else is."""
    url = f"{gcs_bucket}/listed.zarr"
    old = np.arange(300 * 200, dtype="i4").reshape(300, 200)  # chunks c/0/0 .. c/5/3
    new = -old[:100]  # c/0/0 .. c/1/3 overwritten, the rest stale
    cloudio.save_array(old, url, chunks=(50, 50), shards=None, compressors=None)
    fault_proxy.log.clear()
    # the marker's upload held until the listing went out: the listing does not wait for the marker
    release = threading.Event()
    marker = fault_proxy.add("late", method="POST", path=r"/upload/.*ifGenerationMatch", release=release,
                             seconds=10)
    rule = fault_proxy.add("delay", method="GET", path=r"/o\?.*prefix=listed\.zarr", seconds=0)

    def release_once_listed() -> None:
        while not release.is_set() and not rule.hits:
            time.sleep(0.01)
        release.set()

    watcher = threading.Thread(target=release_once_listed, daemon=True)
    watcher.start()
    try:
        cloudio.save_array(new, url, chunks=(50, 50), shards=None, compressors=None)
    finally:
        release.set()
        watcher.join(5)
    assert marker.hits == 1
    assert rule.hits == 1
    sent = _store_requests(fault_proxy, "listed.zarr")
    listing = next(i for i, (m, p) in enumerate(sent) if m == "GET" and "prefix=listed.zarr" in p)
    uploads = [i for i, (_, p) in enumerate(sent) if "name=listed.zarr%2Fc%2F" in p]
    assert len(uploads) == 8 and listing < min(uploads), sent  # the listing answered before any chunk went up
    gone = {unquote(p.rpartition("/o/")[2].partition("?")[0]) for m, p in sent if m == "DELETE"}
    stale = {f"listed.zarr/c/{i}/{j}" for i in range(2, 6) for j in range(4)}
    assert gone - {f"listed.zarr/{MARKER}"} <= stale  # batched deletes are not DELETEs: no more than these
    assert {f"c/{i}/{j}" for i in range(2) for j in range(4)} == {
        b.name.removeprefix("listed.zarr/") for b in gcs_emulator.client.list_blobs(gcs_bucket.removeprefix("gs://"),
                                                                                  prefix="listed.zarr/c/")}
    np.testing.assert_array_equal(cloudio.load_array(url), new)


def test_a_rewrite_of_the_same_grid_deletes_nothing(gcs_emulator, gcs_bucket, fault_proxy):
    """Every old chunk is overwritten: the only delete is the marker's, where zarr deletes every chunk first."""
    url = f"{gcs_bucket}/same.zarr"
    old = np.arange(200 * 200, dtype="f4").reshape(200, 200)
    cloudio.save_array(old, url, chunks=(50, 50), shards=None, compressors=None)
    fault_proxy.log.clear()
    cloudio.save_array(-old, url, chunks=(50, 50), shards=None, compressors=None)
    deletes = [p for m, p, _ in fault_proxy.log if m == "DELETE" or "/batch/" in p]
    assert len(deletes) == 1 and MARKER in deletes[0], deletes
    np.testing.assert_array_equal(cloudio.load_array(url), -old)


def test_a_write_whose_uploads_may_have_landed_stays_marked(gcs_emulator, gcs_bucket, fault_proxy, quick_retries):
    """No upload of the write was confirmed, but one landed with its answer lost (reset after the server
    took it) and another was refused: the store mixes old and new chunks, so it stays marked incomplete
    rather than read as the old array."""
    import zarr

    url = f"{gcs_bucket}/landed.zarr"
    old = np.arange(100 * 200, dtype="i4").reshape(100, 200)  # shards c/0/0 and c/0/1
    cloudio.save_array(old, url, chunks=(50, 50), shards=(100, 100))
    fault_proxy.add("reset", method="POST", path=r"name=landed\.zarr%2F(zarr\.json|c%2F0%2F0)", times=None)
    fault_proxy.add("status", code=503, method="POST", path=r"name=landed\.zarr%2Fc%2F0%2F1", times=None)
    with pytest.raises(cloudio.TransientError):
        cloudio.save_array(-old, url, chunks=(50, 50), shards=(100, 100))
    # the faults stay: they touch uploads only, and a retry still on its way must not land now
    mixed = zarr.open_array(cloudio.zarr_store(url), mode="r")[...]  # zarr, which knows no marker
    assert (mixed[:, :100] == -old[:, :100]).all() and (mixed[:, 100:] == old[:, 100:]).all()
    with pytest.raises(cloudio.IncompleteWriteError, match="landed.zarr"):
        cloudio.load_array(url)


def test_a_region_write_whose_upload_may_have_landed_stays_marked(gcs_emulator, gcs_bucket, fault_proxy,
                                                                   quick_retries):
    """to_zarr(region=...) writes chunks only: one lands with its answer lost, the other is refused. Nothing
    was confirmed, yet the store mixes old and new chunks: it stays marked incomplete."""
    url = f"{gcs_bucket}/lands.zarr"
    enc = {"x": {"chunks": (2, 6)}}
    cloudio.to_zarr(_ds(1.0), url, mode="w", encoding=enc, consolidated=False)
    fault_proxy.add("reset", method="POST", path=r"name=lands\.zarr%2Fx%2Fc%2F0%2F0", times=None)
    fault_proxy.add("status", code=503, method="POST", path=r"name=lands\.zarr%2Fx%2Fc%2F1%2F0", times=None)
    part = _ds(-1.0).isel(t=slice(0, 4)).drop_vars(["t", "y"])  # x's chunks c/0/0 and c/1/0
    with pytest.raises(cloudio.TransientError):
        cloudio.to_zarr(part, url, region={"t": slice(0, 4)}, consolidated=False)
    # the faults stay: they touch uploads only (and a retry going out late would be refused too)
    mixed = xr.open_zarr(cloudio.zarr_store(url), consolidated=False).x.values  # xarray, which knows no marker
    assert (mixed[:2] == -_ds(1.0).x.values[:2]).all() and (mixed[2:] == _ds(1.0).x.values[2:]).all()
    with pytest.raises(cloudio.IncompleteWriteError, match="lands.zarr"):
        cloudio.open_zarr(url)


def test_no_upload_of_a_region_write_goes_out_after_it_raised(gcs_emulator, gcs_bucket, fault_proxy, monkeypatch):
    """zarr gathers a region's chunk writes and raises the first failure while the others still run. One
    chunk is refused for good while the other waits to retry: that retry must not go out after to_zarr
    raised, where it could land on a store the caller has since rewritten."""
    import cloudio._gcs.fast

    url = f"{gcs_bucket}/late.zarr"
    enc = {"x": {"chunks": (2, 6)}}
    cloudio.to_zarr(_ds(1.0), url, mode="w", encoding=enc, consolidated=False)
    monkeypatch.setattr(cloudio._gcs.fast, "BACKOFF", 2.0)  # c/1/0's retry comes 2 s after its 503
    fault_proxy.add("status", code=403, method="POST", path=r"name=late\.zarr%2Fx%2Fc%2F0%2F0", times=None)
    fault_proxy.add("status", code=503, method="POST", path=r"name=late\.zarr%2Fx%2Fc%2F1%2F0", times=1)
    part = _ds(-1.0).isel(t=slice(0, 4)).drop_vars(["t", "y"])  # x's chunks c/0/0 and c/1/0
    c10 = r"name=late\.zarr%2Fx%2Fc%2F1%2F0"
    before = len(fault_proxy.requests(c10))
    with pytest.raises(cloudio.CloudioError, match="late.zarr"):
        cloudio.to_zarr(part, url, region={"t": slice(0, 4)}, consolidated=False)
    time.sleep(3.0)  # past the retry's back-off
    # the 503 only (or nothing, when the refusal came back before c/1/0 went out): never the retry
    assert [status for *_, status in fault_proxy.requests(c10)[before:]] in ([], [503])
    stored = xr.open_zarr(cloudio.zarr_store(url), consolidated=False).x.values  # xarray, which knows no marker
    assert (stored == _ds(1.0).x.values).all()


def test_a_region_write_stopped_with_an_upload_on_its_way_stays_marked(gcs_emulator, gcs_bucket, fault_proxy,
                                                                       monkeypatch):
    """One chunk is refused; the other's upload has reached the server, but its answer has not come back when
    the write stops it. That chunk may have landed (here it has): the store stays marked incomplete."""
    import cloudio._gcs.fast

    url = f"{gcs_bucket}/onway.zarr"
    enc = {"x": {"chunks": (2, 6)}}
    cloudio.to_zarr(_ds(1.0), url, mode="w", encoding=enc, consolidated=False)
    monkeypatch.setattr(cloudio._gcs.fast, "BACKOFF", 1.0)
    fault_proxy.add("late", method="POST", path=r"name=onway\.zarr%2Fx%2Fc%2F1%2F0", seconds=3.0)
    # c/0/0 is refused after a retry a second later: by then c/1/0 is on its way
    fault_proxy.add("status", code=503, method="POST", path=r"name=onway\.zarr%2Fx%2Fc%2F0%2F0", times=1)
    fault_proxy.add("status", code=403, method="POST", path=r"name=onway\.zarr%2Fx%2Fc%2F0%2F0", times=None)
    part = _ds(-1.0).isel(t=slice(0, 4)).drop_vars(["t", "y"])  # x's chunks c/0/0 and c/1/0
    with pytest.raises(cloudio.CloudioError, match="onway.zarr"):
        cloudio.to_zarr(part, url, region={"t": slice(0, 4)}, consolidated=False)
    mixed = xr.open_zarr(cloudio.zarr_store(url), consolidated=False).x.values  # xarray, which knows no marker
    assert (mixed[2:4] == -_ds(1.0).x.values[2:4]).all() and (mixed[:2] == _ds(1.0).x.values[:2]).all()
    with pytest.raises(cloudio.IncompleteWriteError, match="onway.zarr"):
        cloudio.open_zarr(url)


def test_no_shard_of_a_dask_write_goes_out_after_it_raised(gcs_emulator, gcs_bucket, fault_proxy, monkeypatch):
    """Dask raises the first failed task while the others still run, each in a thread waiting for its own
    upload: a shard's retry must not go out after save_array raised."""
    import dask.array as da

    import cloudio._gcs.fast

    url = f"{gcs_bucket}/late-dask.zarr"
    old = np.arange(100 * 200, dtype="i4").reshape(100, 200)
    cloudio.save_array(old, url, chunks=(50, 50), shards=(100, 100))  # 2 shards
    monkeypatch.setattr(cloudio._gcs.fast, "BACKOFF", 2.0)  # c/0/1's retry comes 2 s after its 503
    fault_proxy.add("status", code=403, method="POST", path=r"name=late-dask\.zarr%2Fc%2F0%2F0", times=None)
    fault_proxy.add("status", code=503, method="POST", path=r"name=late-dask\.zarr%2Fc%2F0%2F1", times=1)
    c01 = r"name=late-dask\.zarr%2Fc%2F0%2F1"
    before = len(fault_proxy.requests(c01))
    with dask.config.set(scheduler="threads", num_workers=2), pytest.raises(cloudio.CloudioError, match="late-dask"):
        cloudio.save_array(da.from_array(-old, chunks=(100, 100)), url, shards=(100, 100))
    time.sleep(3.0)  # past the retry's back-off
    # the 503 only (or nothing, when the refusal came back before c/0/1 went out): never the retry
    assert [status for *_, status in fault_proxy.requests(c01)[before:]] in ([], [503])
    with pytest.raises(cloudio.IncompleteWriteError, match="late-dask"):  # the old shards were deleted first
        cloudio.load_array(url)



def test_a_region_write_stopped_with_a_delete_on_its_way_stays_marked(gcs_emulator, gcs_bucket, fault_proxy,
                                                                      monkeypatch):
    """A chunk of nothing but the fill value is deleted, not written: that delete has reached the server when
    the other chunk's refusal stops the write. The store stays marked incomplete."""
    import cloudio._gcs.fast

    url = f"{gcs_bucket}/gone.zarr"
    enc = {"x": {"chunks": (2, 6)}}
    cloudio.to_zarr(_ds(1.0), url, mode="w", encoding=enc, consolidated=False)
    monkeypatch.setattr(cloudio._gcs.fast, "BACKOFF", 1.0)
    held = fault_proxy.add("late", method="DELETE", path=r"/o/gone\.zarr%2Fx%2Fc%2F1%2F0", seconds=3.0)
    # c/0/0 is refused after a retry a second later: by then the delete is on its way
    fault_proxy.add("status", code=503, method="POST", path=r"name=gone\.zarr%2Fx%2Fc%2F0%2F0", times=1)
    fault_proxy.add("status", code=403, method="POST", path=r"name=gone\.zarr%2Fx%2Fc%2F0%2F0", times=None)
    part = _ds(-1.0).isel(t=slice(0, 4)).drop_vars(["t", "y"])
    part["x"][2:4] = np.nan  # chunk c/1/0: the fill value only
    with pytest.raises(cloudio.CloudioError, match="gone.zarr"):
        cloudio.to_zarr(part, url, region={"t": slice(0, 4)}, consolidated=False, write_empty_chunks=False)
    assert held.hits == 1 and held.answered.wait(5)  # it went out, and the server carried it out
    with pytest.raises(cloudio.IncompleteWriteError, match="gone.zarr"):
        cloudio.open_zarr(url)


def _mark_as_another_writer(emu, url: str) -> None:
    """The marker another process's write under way leaves at ``url`` (a dataset's root)."""
    entry = {"host": "elsewhere", "pid": 3, "time": "2026-12-05T00:00:00+00:00", "operation": "to_zarr mode='r+'"}
    p = parse_gcs(f"{url}/{MARKER}")
    emu.client.bucket(p.bucket).blob(p.key).upload_from_string(json.dumps({**entry, "writers": [entry]}))


@pytest.mark.parametrize("level", ["session", "strong"])
@pytest.mark.parametrize("lazy", [False, True])
def test_an_array_of_a_dataset_under_another_write_is_refused(gcs_emulator, gcs_bucket, level, lazy):
    """Another process writes into a dataset (its marker at the dataset's root, the arrays' zarr.json as they
    were, as a region write leaves them): a load of one of its arrays refuses it too, naming the dataset's
    marker, even of an array this process wrote itself (whose zarr.json it knows)."""
    ds = f"{gcs_bucket}/nested/ds.zarr"
    cloudio.save_array(np.zeros((200, 300), "f4"), f"{ds}/temp", chunks=(100, 100), compressors=None)
    _mark_as_another_writer(gcs_emulator, ds)
    with cloudio.session(level), pytest.raises(cloudio.IncompleteWriteError) as info:
        cloudio.load_array(f"{ds}/temp", lazy=lazy)
    msg = str(info.value)
    assert f"{ds}/temp" in msg and "by elsewhere (pid 3" in msg and f"{ds}/{MARKER}" in msg, msg


def test_a_subgroup_of_a_dataset_under_another_write_is_refused(gcs_emulator, gcs_bucket):
    ds = f"{gcs_bucket}/outer.zarr"
    cloudio.to_zarr(_ds(1.0), f"{ds}/inner", mode="w", consolidated=False)
    _mark_as_another_writer(gcs_emulator, ds)
    with pytest.raises(cloudio.IncompleteWriteError, match="outer.zarr"):
        cloudio.open_zarr(f"{ds}/inner", consolidated=False)


def test_an_enclosing_marker_the_credentials_may_not_read_does_not_refuse_the_store(gcs_bucket, fault_proxy):
    """Credentials limited to the store's own prefix (403 on the enclosing level's marker): the store is read
    as before, its own marker checked."""
    ds = f"{gcs_bucket}/team/ds.zarr"
    data = np.arange(12.0).reshape(3, 4)
    cloudio.save_array(data, ds)
    fault_proxy.add("status", code=403, method="GET", path=r"/o/team%2F\.cloudio-write-in-progress", times=None)
    np.testing.assert_array_equal(cloudio.load_array(ds), data)


@pytest.mark.parametrize("code", [403, 502])
def test_a_rewrite_whose_sweep_of_old_objects_fails_raises_a_cloudio_error(gcs_emulator, gcs_bucket, fault_proxy,
                                                                         quick_retries, code):
    """save_array over an array of another grid deletes the old shards last (arrays._created_like's sweep);
    when those deletes are refused, the error should be cloudio's, naming the store, and the store stays
    marked."""
    url = f"{gcs_bucket}/sweep.zarr"
    cloudio.save_array(np.arange(40 * 40, dtype="i4").reshape(40, 40), url, chunks=(5, 5), shards=(10, 10))
    fault_proxy.add("status", code=code, method="DELETE", path=r"sweep\.zarr%2Fc%2F", times=None)
    with pytest.raises(cloudio.CloudioError) as info:  # 16 old shards, 4 new: 12 to delete
        cloudio.save_array(np.ones((40, 40), "i4"), url, chunks=(10, 10), shards=(20, 20))
    assert "sweep.zarr" in str(info.value)
    fault_proxy.clear()
    assert _marker_exists(gcs_emulator, url)
    with pytest.raises(cloudio.IncompleteWriteError):
        cloudio.load_array(url)


def test_a_rewrite_whose_listing_of_old_objects_is_refused_raises_a_cloudio_error(gcs_emulator, gcs_bucket,
                                                                                 fault_proxy, quick_retries):
    url = f"{gcs_bucket}/listed.zarr"
    cloudio.save_array(np.arange(40 * 40, dtype="i4").reshape(40, 40), url, chunks=(10, 10), shards=(20, 20))
    """The listing goes out with the marker and is answered before the first chunk goes up: refused, nothing
    but the marker was written, which goes again, and the old array is still there, whole."""
    fault_proxy.add("status", code=403, method="GET", path=r"/o\?prefix=listed\.zarr", times=None)
    with pytest.raises(cloudio.CloudioError) as info:
        cloudio.save_array(np.ones((40, 40), "i4"), url, chunks=(5, 5), shards=(10, 10))
    assert "listed.zarr" in str(info.value)
    fault_proxy.clear()
    assert not _marker_exists(gcs_emulator, url)
    np.testing.assert_array_equal(cloudio.load_array(url), np.arange(40 * 40, dtype="i4").reshape(40, 40))


def test_a_commit_whose_marker_delete_is_refused_raises_a_cloudio_error(gcs_emulator, gcs_bucket, fault_proxy,
                                                                        quick_retries):
    url = f"{gcs_bucket}/commit.zarr"
    fault_proxy.add("status", code=403, method="DELETE", path=r"commit\.zarr%2F\.cloudio", times=None)
    with pytest.raises(cloudio.CloudioError) as info:
        cloudio.save_array(np.ones((40, 40), "i4"), url, chunks=(10, 10), shards=(20, 20))
    assert "commit.zarr" in str(info.value)
    fault_proxy.clear()
    assert _marker_exists(gcs_emulator, url)  # left up: loud


def test_a_load_of_a_zarr_codec_layout_failing_with_502_is_a_transient_error(gcs_bucket, fault_proxy, quick_retries):
    """A layout cloudio leaves to zarr (gzip inside shards) reads edge shards by range through gcsfs; a server
    answering 502 past the retries should be cloudio's TransientError, as 503 is."""
    url = f"{gcs_bucket}/gz.zarr"
    a = np.arange(15 * 15, dtype="f4").reshape(15, 15)  # one shard, 3x3 of its 4x4 chunks: read by range
    cloudio.save_array(a, url, chunks=(5, 5), shards=(20, 20), compressors=zarr.codecs.GzipCodec())
    last_seen.forget_all()
    fault_proxy.add("status", code=502, method="GET", path=r"gz\.zarr%2Fc%2F", times=None)
    with pytest.raises(cloudio.TransientError, match="gz.zarr"):
        cloudio.load_array(url)
