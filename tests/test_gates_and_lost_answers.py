"""A VRT read holding its sources' gates, the eager load_array's re-reads, and lost answers of guarded writes
(found by a review of this stop's changes; each failed before its fix): a read waited for one source's change
while holding another, and a writer of both on one event loop stalled until the change gave up (readers now
enter all their gates at once); a nested leaf was not watched at the strong level; the strong level's own
listing records counted as a write overlapping the read (read twice); a guarded write_vrt whose answer was lost
raised ConflictError on gcsfs's retry (the server is now asked whether it holds what was sent).
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from affine import Affine
from rasterio.io import MemoryFile

import cloudio
from cloudio._gdal import gates as gates_module

N = 64
GRID = Affine(10, 0, 500000, 0, -10, 4000000)


def _tif_bytes(v: int, n: int = N) -> bytes:
    with MemoryFile() as mem:
        with mem.open(driver="GTiff", width=n, height=n, count=1, dtype="uint16", tiled=True, blockxsize=16,
                      blockysize=16, crs="EPSG:32633", transform=GRID) as ds:
            ds.write(np.full((1, n, n), v, "uint16"))
        return bytes(mem.read())


def _mosaic(sources: list[str], n: int = N) -> bytes:
    parts = "".join(
        f'<SimpleSource><SourceFilename relativeToVRT="0">{s}</SourceFilename><SourceBand>1</SourceBand>'
        f'<SrcRect xOff="0" yOff="0" xSize="{n}" ySize="{n}"/><DstRect xOff="{k * n}" yOff="0" xSize="{n}" '
        f'ySize="{n}"/></SimpleSource>' for k, s in enumerate(sources))
    return (f'<VRTDataset rasterXSize="{n * len(sources)}" rasterYSize="{n}">'
            f'<SRS>EPSG:32633</SRS><GeoTransform>500000, 10, 0, 4000000, 0, -10</GeoTransform>'
            f'<VRTRasterBand dataType="UInt16" band="1">{parts}</VRTRasterBand></VRTDataset>').encode()


def _vrt_over(gcs_bucket: str, folder: str, k: int) -> tuple[str, list[str], list[str]]:
    """``k`` GeoTIFF sources (value 1) and a mosaic VRT over them, all through cloudio's fsspec face:
    (VRT URL, source URLs, their /vsigs/ names)."""
    b = gcs_bucket[len("gs://"):]
    fs = cloudio.filesystem(gcs_bucket)
    urls = [f"{gcs_bucket}/{folder}/s{i:03d}.tif" for i in range(k)]
    fs.pipe({u: _tif_bytes(1) for u in urls})
    vsis = [f"/vsigs/{b}/{folder}/s{i:03d}.tif" for i in range(k)]
    vrt = f"{gcs_bucket}/{folder}/m.vrt"
    fs.pipe(vrt, _mosaic(vsis))
    return vrt, urls, vsis


# -------------------------------------------------------------------------------------------------
# 1. VRT reads holding their sources' gates vs writers holding several objects as changing
# -------------------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_pipe_of_two_sources_while_a_vrt_over_them_is_read_does_not_stall(gcs_bucket, monkeypatch, caplog):
    """One thread reads a mosaic VRT over s000, s001 in a loop (each read holds the gates of m.vrt, s000,
    s001 in that order); the main thread overwrites both sources with ``filesystem().pipe({s001: .., s000: ..})``
    (each source held as changing while its upload runs, on fsspec's event loop). Every pipe should take well
    under a second on the emulator, and no write should ever give up waiting for the readers (the warning
    "changing it anyway (that read may mix two versions)")."""
    monkeypatch.setattr(gates_module, "CHANGE_WAIT", 3.0)  # 30 s in the library: the stall, made shorter
    vrt, urls, _ = _vrt_over(gcs_bucket, "p", 2)
    fs = cloudio.filesystem(gcs_bucket)
    stop = threading.Event()
    reads = [0]

    def reader() -> None:
        with cloudio.open(vrt) as ds:
            while not stop.is_set():
                ds.read(1)
                reads[0] += 1

    slowest = 0.0
    with caplog.at_level(logging.WARNING, logger="cloudio"), ThreadPoolExecutor(2) as pool:
        futs = [pool.submit(reader), pool.submit(reader)]
        try:
            time.sleep(0.3)
            for v in range(2, 5):
                t0 = time.monotonic()
                fs.pipe({urls[1]: _tif_bytes(v), urls[0]: _tif_bytes(v)})
                slowest = max(slowest, time.monotonic() - t0)
        finally:
            stop.set()
        for f in futs:
            f.result(timeout=30)
    forced = [r.getMessage() for r in caplog.records if "changing it anyway" in r.getMessage()]
    assert reads[0] > 0
    assert forced == [] and slowest < 2.0, (
        f"slowest pipe of the two sources took {slowest:.1f} s; writes that gave up waiting: {forced[:2]}")


@pytest.mark.timeout(60)
def test_two_threads_each_writing_one_source_while_a_vrt_is_read_do_not_stall(
        gcs_bucket, fault_proxy, monkeypatch, caplog):
    """Two independent writers, one object each: thread W1 pipes s001 (its answer takes 1 s: the object is held
    as changing meanwhile); W2 pipes s000 a moment later; a reader reads the VRT over both in a loop. The reader
    enters s000's gate, then waits at s001 (W1's); W2's change of s000 waits for that reader, on fsspec's event
    loop, which W1's upload needs to finish: nothing moves until the change gives up (CHANGE_WAIT, 30 s in the
    library). Expected: W2 done about when W1 is (~1 s), no write giving up waiting."""
    monkeypatch.setattr(gates_module, "CHANGE_WAIT", 5.0)
    vrt, urls, _ = _vrt_over(gcs_bucket, "w", 2)
    fs = cloudio.filesystem(gcs_bucket)
    stop = threading.Event()

    def reader() -> None:
        with cloudio.open(vrt) as ds:
            while not stop.is_set():
                ds.read(1)

    def timed(fn, *args) -> float:
        t0 = time.monotonic()
        fn(*args)
        return time.monotonic() - t0

    fault_proxy.add("late", method="POST", path=r"/upload/", body=rb"w/s001\.tif|w%2Fs001\.tif", seconds=1.0)
    with caplog.at_level(logging.WARNING, logger="cloudio"), ThreadPoolExecutor(3) as pool:
        r = pool.submit(reader)
        try:
            time.sleep(0.2)
            w1 = pool.submit(timed, fs.pipe_file, urls[1], _tif_bytes(2))
            time.sleep(0.3)
            w2 = timed(fs.pipe_file, urls[0], _tif_bytes(2))
            w1_took = w1.result(timeout=30)
        finally:
            stop.set()
        r.result(timeout=30)
    forced = [x.getMessage() for x in caplog.records if "changing it anyway" in x.getMessage()]
    assert forced == [] and w2 < 3.0, (
        f"W1 (s001, answer 1 s late) took {w1_took:.1f} s, W2 (s000) took {w2:.1f} s; writes that gave up "
        f"waiting: {forced[:1]}")


@pytest.mark.parametrize("level", ["session", "strong"])
def test_nested_vrt_open_before_its_leaf_is_overwritten_reads_the_new_leaf(gcs_bucket, level):
    """outer.vrt -> inner.vrt -> leaf.tif, all written through cloudio. The outer VRT is opened and read, then
    the leaf is overwritten through cloudio (same layout, new pixels), then the open dataset reads again: it
    must read the new pixels (or refuse with StaleDatasetError), never the old ones (read-your-writes), at
    every level. At "strong" the open forgets the walk of the nested sources (``_walked.pop``) and
    ``_source_epochs`` keeps only the outer VRT's direct sources: the leaf is neither gated nor watched."""
    # passes at "session": pins the nested leaf watched there
    from rasters import seeded16, vrts_over, write16

    leaf, inner, outer = (f"{gcs_bucket}/n/leaf.tif", f"{gcs_bucket}/n/inner.vrt", f"{gcs_bucket}/n/outer.vrt")
    vrts_over(leaf, 1, inner, outer)
    with cloudio.session(level):
        with cloudio.open(outer) as ds:
            assert np.array_equal(ds.read(1), seeded16(1)[0])
            write16(leaf, seeded16(2))
            try:
                again = ds.read(1)
            except cloudio.StaleDatasetError:
                return
    assert np.array_equal(again, seeded16(2)[0]), (
        "the open outer VRT read the leaf's old pixels after the leaf was overwritten through cloudio "
        f"(old: {np.array_equal(again, seeded16(1)[0])})")


# -------------------------------------------------------------------------------------------------
# 2. load_array's re-reads
# -------------------------------------------------------------------------------------------------


def _chunk_gets(emu, since: int, store_key: str) -> int:
    return sum(1 for r in emu.requests()[since:]
               if r.method == "GET" and (f"{store_key}%2Fc%2F" in r.path or f"{store_key}/c/" in r.path))


def test_strong_load_array_after_another_writers_change_reads_the_array_once(gcs_emulator, gcs_bucket):
    """At "strong", load_array lists the store's metadata; a document another writer replaced since the last
    listing is journaled as an "invalidate" by that listing (``revalidate``), inside load_array's own read. The
    re-read check (``journal().since(seq, read=root)``) then takes the read's own record for an overlapping write
    in this process and reads the whole array a second time: twice the chunk GETs. Expected: one read (nothing
    was written in this process)."""
    from rasters import put

    url = f"{gcs_bucket}/once.zarr"
    a = np.arange(64 * 64, dtype="i4").reshape(64, 64)
    cloudio.save_array(a, url, chunks=(32, 32))
    with cloudio.session("strong"):
        assert np.array_equal(cloudio.load_array(url), a)
        meta = gcs_emulator.client.bucket(gcs_bucket[5:]).blob("once.zarr/zarr.json").download_as_bytes()
        put(gcs_emulator, f"{url}/zarr.json", meta)  # another writer: the same document, a new generation
        since = len(gcs_emulator.requests())
        assert np.array_equal(cloudio.load_array(url), a)
    gets = _chunk_gets(gcs_emulator, since, "once.zarr")
    assert gets == 4, f"{gets} chunk GETs for a 4-chunk array read once"


# -------------------------------------------------------------------------------------------------
# 3. A GDAL write / write_vrt whose upload landed, its answer lost
# -------------------------------------------------------------------------------------------------


def _generation(emu, url: str) -> int:
    bucket, key = url[len("gs://"):].split("/", 1)
    return int(emu.client.bucket(bucket).get_blob(key).generation)


@pytest.mark.timeout(90)
def test_guarded_write_vrt_whose_upload_landed_unanswered_is_not_a_conflict(
        gcs_emulator, gcs_bucket, fault_proxy, quick_retries, monkeypatch):
    """write_vrt(if_generation_match=<the generation held>): the upload reaches the server, its answer comes
    after the time limit (once). The retry's precondition then fails on this very write's own object (412):
    ConflictError, "another writer changed it", although the server holds exactly what was sent and no other
    writer exists. Expected (as without a guard, transfer.stored_as_sent): the write is known to have landed and
    returns; at the least, a reader in this process sees the VRT the server holds."""
    from rasters import mosaic_vrt, vrts_over

    src, url = f"{gcs_bucket}/g/src.tif", f"{gcs_bucket}/g/v.vrt"
    vrts_over(src, 3, url)
    with cloudio.open(url) as r:
        assert r.width == 64
    held = _generation(gcs_emulator, url)
    monkeypatch.setenv("CLOUDIO_HTTP_TIMEOUT", "1")
    fault_proxy.add("late", method="POST", path=r"/upload/", body=rb'"g/v\.vrt"', seconds=3, times=1)
    error = None
    try:
        cloudio.write_vrt(mosaic_vrt([(src, 0, 0)], size=32), url, if_generation_match=held)
    except cloudio.CloudioError as e:
        error = e
    fault_proxy.clear()
    monkeypatch.delenv("CLOUDIO_HTTP_TIMEOUT")
    stored_new = b'rasterXSize="32"' in gcs_emulator.client.bucket(gcs_bucket[5:]).blob("g/v.vrt").download_as_bytes()
    assert stored_new, "the fault did not hit as planned: the new VRT never landed"
    with cloudio.open(url) as r:
        width = r.width
    said = "nothing" if error is None else f"{type(error).__name__}: {str(error)[:300]}"
    assert width == 32, (f"the server holds the new VRT (32 wide); a read in this process gave {width} wide; "
                         f"write_vrt raised {said}")
    assert error is None, f"write_vrt raised {said}"
