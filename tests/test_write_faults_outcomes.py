"""Write paths under faults (the fault proxy in front of the real emulator): a delete that landed before its
retries failed is journaled (save_array's sweep, zarr's own deletes); an overwrite (GDAL, write_vrt) whose upload
landed with its answers lost is not left paired with the old version's sidecars; a shard never answered is
refused everywhere; a pipe of many paths journals every change. Found by a review; the failing ones failed before
their fixes. The promise: a refused or failed write leaves the previous data readable or says loudly that it is
not, the journal matches what the server holds, and every call is bounded in time.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable

import numpy as np
import pytest
from rasterio.transform import Affine

import cloudio
from cloudio._paths import parse_gcs

MARKER = ".cloudio-write-in-progress"
T1 = Affine(10, 0, 500000, 0, -10, 4000000)
T2 = Affine(20, 0, 600000, 0, -20, 4100000)


def _keys(emu, bucket: str, prefix: str = "") -> set[str]:
    return {b.name for b in emu.client.list_blobs(bucket.removeprefix("gs://"), prefix=prefix or None)}


def _marker_exists(emu, url: str) -> bool:
    p = parse_gcs(f"{url}/{MARKER}")
    return emu.client.bucket(p.bucket).get_blob(p.key) is not None


def _load_in_subprocess(emu, url: str, level: str = "session") -> str:
    """What ``cloudio.load_array(url)`` does in a new process: 'ok <sum>' or the error's class name."""
    code = textwrap.dedent(f"""
        import cloudio
        try:
            with cloudio.session({level!r}):
                a = cloudio.load_array({url!r})
            print("ok", int(a.sum()))
        except Exception as e:
            print(type(e).__name__)
    """)
    env = {**os.environ, "STORAGE_EMULATOR_HOST": emu.url}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout.strip().splitlines()[-1]


def _lost_then_refused(fault_proxy, method: str, path: str, seconds: float, body: bytes | None = None) -> None:
    """The first ``method`` request matching ``path`` (and ``body``) reaches the server, its answer held ``seconds``
    (past the time limit); every one after it, the retries, is refused (503)."""
    fault_proxy.add("late", method=method, path=path, body=body, seconds=seconds)
    fault_proxy.add("status", code=503, method=method, path=path, body=body, times=None)


def _refused_in_time(call: Callable[[], object]) -> pytest.ExceptionInfo[cloudio.CloudioError]:
    """``call()`` must raise a CloudioError, within 60 s: what it raised."""
    t0 = time.monotonic()
    with pytest.raises(cloudio.CloudioError) as info:
        call()
    assert time.monotonic() - t0 < 60
    return info


# ---------------------------------------------------------------------------------------------
# save_array: a delete of the sweep of old objects that landed, its answer lost, then refused
# ---------------------------------------------------------------------------------------------


# passes: pins the journal record (of the whole store) when the batched sweep of old shards fails part way
def test_a_sweep_delete_that_landed_before_its_retries_failed_is_journaled(
        gcs_emulator, gcs_bucket, fault_proxy, journal_records, quick_retries, monkeypatch):
    """save_array over an array of another grid deletes the old shards last. The first of those DELETEs reaches
    the server (the shard is gone) but its answer comes after the time limit, and every retry is refused: the
    journal must tell the caches that shard changed (the GDAL sidecar path does: test_gdal_write_refusals)."""
    monkeypatch.setenv("CLOUDIO_HTTP_TIMEOUT", "1")
    url = f"{gcs_bucket}/swept.zarr"
    cloudio.save_array(np.arange(40 * 40, dtype="i4").reshape(40, 40), url, chunks=(5, 5), shards=(10, 10))
    old = _keys(gcs_emulator, gcs_bucket, "swept.zarr/c/")
    assert len(old) == 16
    _lost_then_refused(fault_proxy, "DELETE", r"swept\.zarr%2Fc%2F", 4)
    journal_records.clear()
    info = _refused_in_time(lambda: cloudio.save_array(np.ones((40, 40), "i4"), url, chunks=(10, 10),
                                                       shards=(20, 20)))
    assert "swept.zarr" in str(info.value)
    fault_proxy.clear()
    gone = old - _keys(gcs_emulator, gcs_bucket, "swept.zarr/c/")
    new_names = {f"swept.zarr/c/{i}/{j}" for i in range(2) for j in range(2)}
    gone -= new_names
    assert gone, "no old shard was deleted: the fault did not hit as planned"
    missing = sorted(f"{gcs_bucket}/{k}" for k in gone if not _told(journal_records, f"{gcs_bucket}/{k}"))
    assert not missing, (f"the server deleted {missing} and the journal says nothing of them "
                         f"(journal heard {sorted(c.url for c in journal_records)})")
    assert _marker_exists(gcs_emulator, url)


def _told(records, url: str) -> bool:
    """A journal record covers ``url``: its own, or one of a prefix above it."""
    return any(c.url == url or (c.prefix and url.startswith(c.url.rstrip("/") + "/")) for c in records)


def test_a_single_delete_that_landed_before_its_retries_failed_is_journaled(
        gcs_emulator, gcs_bucket, fault_proxy, journal_records, quick_retries, monkeypatch):
    """zarr's resize of an array on cloudio's store deletes the chunks outside, one DELETE each: one that reached
    the server but was answered after the time limit, every retry refused, must be journaled (it was only when
    a failed write cancelled it)."""
    import zarr

    monkeypatch.setenv("CLOUDIO_HTTP_TIMEOUT", "1")
    url = f"{gcs_bucket}/resized.zarr"
    z = zarr.create_array(cloudio.zarr_store(url), shape=(4, 4), chunks=(2, 2), dtype="i4")
    z[...] = np.arange(16, dtype="i4").reshape(4, 4)
    _lost_then_refused(fault_proxy, "DELETE", r"resized\.zarr%2Fc%2F", 4)
    journal_records.clear()
    with pytest.raises(Exception):  # noqa: B017  # zarr's own error or cloudio's: the point is the journal
        z.resize((2, 2))
    # zarr's concurrent_map raises the first failure and leaves the other deletes running on its loop: the one
    # whose answer is late fails at the time limit, after its retries
    time.sleep(3)
    fault_proxy.clear()
    left = _keys(gcs_emulator, gcs_bucket, "resized.zarr/c/")
    gone = {f"resized.zarr/c/{i}/{j}" for i in range(2) for j in range(2)} - left
    assert gone, "no chunk was deleted: the fault did not hit as planned"
    missing = sorted(k for k in gone if not _told(journal_records, f"{gcs_bucket}/{k}"))
    assert not missing, f"the server deleted {missing} and the journal says nothing of them"


# ---------------------------------------------------------------------------------------------
# cloudio.open(url, "w"): the object's upload landed, its answer lost; the old sidecar stays
# ---------------------------------------------------------------------------------------------


def _png(transform: Affine) -> dict:
    return dict(driver="PNG", width=16, height=16, count=1, dtype="uint8", crs="EPSG:32633", transform=transform)


def test_an_overwrite_whose_upload_landed_unanswered_does_not_pair_new_pixels_with_old_georeferencing(
        gcs_emulator, gcs_bucket, fault_proxy, quick_retries, monkeypatch):
    """A georeferenced PNG keeps its transform in ``p.png.aux.xml``. The overwrite's PNG upload reaches the
    server every time but its answer comes after the time limit: the write raises (TransientError, "may or may
    not have been stored"), and the sidecar is never uploaded. Afterwards a read through cloudio must give
    the old dataset or refuse; it must not silently give the new pixels with the old version's transform
    (the module promises "a failed upload of the object leaves the old dataset as it was, sidecars
    included")."""
    monkeypatch.setenv("CLOUDIO_HTTP_TIMEOUT", "1")
    url = f"{gcs_bucket}/g/p.png"
    with cloudio.open(url, "w", **_png(T1)) as ds:
        ds.write(np.full((1, 16, 16), 1, "uint8"))
    assert {"g/p.png", "g/p.png.aux.xml"} <= _keys(gcs_emulator, gcs_bucket, "g/")
    fault_proxy.add("late", method="POST", path=r"/upload/", body=rb'"g/p\.png"', seconds=3, times=None)
    t0 = time.monotonic()
    said = "(no error: the server was asked, and held what was sent)"
    try:
        with cloudio.open(url, "w", **_png(T2)) as ds:
            ds.write(np.full((1, 16, 16), 2, "uint8"))
    except cloudio.CloudioError as e:
        assert url in str(e)
        said = str(e)
    assert time.monotonic() - t0 < 60
    fault_proxy.clear()
    monkeypatch.delenv("CLOUDIO_HTTP_TIMEOUT")
    try:
        with cloudio.open(url) as r:
            pixels, transform = int(r.read(1)[0, 0]), r.transform
    except cloudio.CloudioError:
        return  # refused loudly: acceptable
    assert (pixels, transform) in ((1, T1), (2, T2)), (
        f"read back pixels {pixels} with transform {tuple(transform)[:6]}: the new pixels with the old "
        f"version's .aux.xml; the error said only {said[:300]!r}")


def test_a_vrt_rewrite_whose_upload_landed_unanswered_is_not_read_with_the_old_sidecar(
        gcs_emulator, gcs_bucket, fault_proxy, quick_retries, monkeypatch):
    """write_vrt over a VRT with a .vrt.ovr beside it, every answer to its upload late: the new VRT must not be
    read with the old VRT's sidecar."""
    from rasters import mosaic_vrt, put, vrts_over

    src, url = f"{gcs_bucket}/g/src.tif", f"{gcs_bucket}/g/v.vrt"
    vrts_over(src, 3, url)
    from rasterio.io import MemoryFile

    with MemoryFile() as mem:  # the old VRT's external overview: 32 x 32 of 99s
        with mem.open(driver="GTiff", width=32, height=32, count=1, dtype="uint16") as ovr:
            ovr.write(np.full((1, 32, 32), 99, "uint16"))
        put(gcs_emulator, f"{url}.ovr", mem.read())
    with cloudio.open(url) as r:
        assert r.overviews(1) == [2]
    monkeypatch.setenv("CLOUDIO_HTTP_TIMEOUT", "1")
    fault_proxy.add("late", method="POST", path=r"/upload/", body=rb'"g/v\.vrt"', seconds=3, times=None)
    try:
        cloudio.write_vrt(mosaic_vrt([(src, 0, 0)], size=32), url)
    except cloudio.CloudioError as e:
        assert url in str(e)
    fault_proxy.clear()
    # what the server holds: the new VRT without the old sidecar, or the old VRT with it
    new = b'rasterXSize="32"' in gcs_emulator.client.bucket(gcs_bucket[5:]).blob("g/v.vrt").download_as_bytes()
    has_ovr = "g/v.vrt.ovr" in _keys(gcs_emulator, gcs_bucket, "g/")
    assert (new, has_ovr) in ((True, False), (False, True)), f"new VRT stored: {new}; old .vrt.ovr there: {has_ovr}"


# ---------------------------------------------------------------------------------------------
# save_array: one shard never answered; readers in this process, a new one, and at "strong" agree
# ---------------------------------------------------------------------------------------------


def test_save_array_with_a_shard_never_answered_is_refused_everywhere(
        gcs_emulator, gcs_bucket, fault_proxy, quick_retries, monkeypatch):
    # passes: pins bounded time and a store refused in this process, in a new one, and at "strong"
    monkeypatch.setenv("CLOUDIO_HTTP_TIMEOUT", "1")
    url = f"{gcs_bucket}/hang.zarr"
    old = np.arange(200 * 200, dtype="i4").reshape(200, 200)
    cloudio.save_array(old, url, chunks=(50, 50), shards=(100, 100))
    fault_proxy.add("hang", method="POST", path=r"/upload/.*hang\.zarr%2Fc%2F1%2F1", times=None)
    info = _refused_in_time(lambda: cloudio.save_array(-old, url, chunks=(50, 50), shards=(100, 100)))
    assert url in str(info.value) and info.value.__cause__ is not None
    fault_proxy.clear()
    monkeypatch.delenv("CLOUDIO_HTTP_TIMEOUT")
    assert _marker_exists(gcs_emulator, url)
    with pytest.raises(cloudio.IncompleteWriteError, match=re.escape(url)):
        cloudio.load_array(url)
    with cloudio.session("strong"):
        with pytest.raises(cloudio.IncompleteWriteError):
            cloudio.load_array(url)
    assert _load_in_subprocess(gcs_emulator, url) == "IncompleteWriteError"
    assert _load_in_subprocess(gcs_emulator, url, "strong") == "IncompleteWriteError"


# ---------------------------------------------------------------------------------------------
# to_zarr(mode="w"): emptying the store, one delete landed unanswered, its retries refused
# ---------------------------------------------------------------------------------------------


def test_to_zarr_mode_w_whose_emptying_delete_landed_unanswered_is_journaled(
        gcs_emulator, gcs_bucket, fault_proxy, journal_records, quick_retries, monkeypatch):
    """Same promise as the sweep above, through xarray: mode="w" empties the store first (cloudio deletes
    every key but the marker); a DELETE that reached the server, answered after the time limit and then
    refused on every retry, must not leave the object gone and the journal silent about it."""
    # passes: pins the journal record of an emptying delete that landed unanswered (contrast: the save_array sweep)
    import xarray as xr

    monkeypatch.setenv("CLOUDIO_HTTP_TIMEOUT", "1")
    url = f"{gcs_bucket}/emptied.zarr"
    ds = xr.Dataset({"x": (("t", "y"), np.arange(48, dtype="f8").reshape(8, 6))})
    cloudio.to_zarr(ds, url, mode="w", encoding={"x": {"chunks": (2, 6)}}, consolidated=False)
    before = _keys(gcs_emulator, gcs_bucket, "emptied.zarr/x/c/")
    assert len(before) == 4
    _lost_then_refused(fault_proxy, "DELETE", r"emptied\.zarr%2Fx%2Fc%2F", 4)
    journal_records.clear()
    info = _refused_in_time(lambda: cloudio.to_zarr(-ds, url, mode="w", encoding={"x": {"chunks": (4, 6)}},
                                                    consolidated=False))
    assert url in str(info.value)
    fault_proxy.clear()
    gone = before - _keys(gcs_emulator, gcs_bucket, "emptied.zarr/x/c/")
    assert gone, "no chunk was deleted: the fault did not hit as planned"
    told = {c.url for c in journal_records}
    missing = sorted(f"{gcs_bucket}/{k}" for k in gone if not _told(journal_records, f"{gcs_bucket}/{k}"))
    assert not missing, f"the server deleted {missing} and the journal says nothing of them ({sorted(told)})"
    assert _marker_exists(gcs_emulator, url)


# ---------------------------------------------------------------------------------------------
# filesystem().pipe of many paths, one answer lost and then refused: journal vs server
# ---------------------------------------------------------------------------------------------


def test_pipe_of_many_paths_with_one_answer_lost_journals_every_change(
        gcs_emulator, gcs_bucket, fault_proxy, journal_records, quick_retries, monkeypatch):
    # passes: pins that every object the server changed during a failed multi-path pipe has a journal record
    monkeypatch.setenv("CLOUDIO_HTTP_TIMEOUT", "1")
    b = gcs_bucket.removeprefix("gs://")
    fs = cloudio.filesystem(gcs_bucket)
    fs.pipe({f"{b}/m/{i}.bin": b"o" * 10 for i in range(6)})
    _lost_then_refused(fault_proxy, "POST", r"/upload/", 3, body=rb"m/3\.bin")
    journal_records.clear()
    info = _refused_in_time(lambda: fs.pipe({f"{b}/m/{i}.bin": b"n" * 20 for i in range(6)}))
    assert "m/3.bin" in str(info.value)
    fault_proxy.clear()
    changed = {f"{gcs_bucket}/{bl.name}" for bl in gcs_emulator.client.list_blobs(b, prefix="m/")
               if bl.size == 20}
    assert f"{gcs_bucket}/m/3.bin" in changed  # the first try landed
    told = {c.url for c in journal_records}
    assert changed <= told, sorted(changed - told)
