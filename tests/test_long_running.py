"""Long-running processes (a tile server, an ETL worker): what cloudio keeps per object, loop or directory stays
bounded. Each test failed before its fix (found by a review); the quantities asserted are counts.
"""

from __future__ import annotations

import asyncio
import gc
import os
import uuid

import numpy as np
from rasters import tif

import cloudio
from cloudio.emulator import Emulator


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _objects(emu: Emulator, n: int, per_bucket: int = 500) -> list[str]:
    """``n`` tiny GeoTIFFs, each in its own "directory", spread over fresh buckets.

    Spread because fake-gcs-server's uploads slow down with the size of the bucket (not cloudio's doing:
    plain gcsfs shows it too), and a tracked filesystem's ``pipe`` is used so the writes are journaled.
    """
    data = tif(1, 8)
    urls: list[str] = []
    for start in range(0, n, per_bucket):
        bucket = emu.create_bucket(f"leak-{uuid.uuid4().hex[:12]}")
        batch = {f"{bucket[5:]}/d{i}/a.tif": data for i in range(start, min(n, start + per_bucket))}
        cloudio.filesystem(bucket).pipe(batch)
        urls += [f"gs://{k}" for k in batch]
    return urls


def _open_close(urls: list[str]) -> None:
    for u in urls:
        with cloudio.open(u):
            pass



def test_zarr_store_get_leaks_a_socket_and_the_event_loop_per_asyncio_run(gcs_bucket):
    """``JournaledStore.get`` (zarr's async API over ``cloudio.zarr_store``) reads through
    ``cloudio._gcs.fast.get_into``, which parks the connection in ``fast._idle[loop]``, a
    ``WeakKeyDictionary`` keyed by the running loop. The parked ``_Answers`` holds its transport, and
    the transport holds the loop: the weak key can never die, and nothing closes the connection when
    the loop closes. Rate: one open socket (fd) and one dead event loop per ``asyncio.run`` that read
    anything (an async worker that runs each job in ``asyncio.run`` exhausts its fd limit after ~1000
    jobs).
    """
    from zarr.core.buffer import default_buffer_prototype

    from cloudio._gcs import fast

    cloudio.save_array(np.arange(16, dtype="u1"), f"{gcs_bucket}/arr")
    store = cloudio.zarr_store(f"{gcs_bucket}/arr", read_only=True)

    async def job() -> None:
        assert await store.get("zarr.json", default_buffer_prototype()) is not None

    asyncio.run(job())
    gc.collect()
    fds0, loops0 = _fds(), len(fast._idle)
    n = 100
    for _ in range(n):
        asyncio.run(job())
    gc.collect()
    grew_fds, grew_loops = _fds() - fds0, len(fast._idle) - loops0
    assert grew_fds < 10, f"{grew_fds} file descriptors left open by {n} asyncio.run jobs"
    assert grew_loops < 10, f"{grew_loops} closed event loops still referenced by fast._idle after {n} jobs"


def test_gdal_empty_dir_path_options_stay_bounded(gcs_emulator):
    """Regression: each object ``cloudio.open`` read without sidecars kept a GDAL path-specific option
    (``GDAL_DISABLE_READDIR_ON_OPEN=EMPTY_DIR`` on ``/vsigs/b/d/name``) until its directory's names
    changed. GDAL looks a path's options up through all of them, in every open and request of the
    process: after 3,000 objects a plain ``rasterio.open`` of another object took 1.2 ms, not 0.18.
    At most ``_EMPTY_DIR_MAX`` are kept now, the oldest dropped; an object whose option was dropped
    is planned again at its next open (no request) and reads the same.
    """
    from cloudio._gdal import consumer as gdal_consumer

    urls = _objects(gcs_emulator, 3 * gdal_consumer._EMPTY_DIR_MAX)
    _open_close(urls)
    options = sum(len(d.empty_dir) for d in gdal_consumer.consumer._dirs.values())
    assert options <= gdal_consumer._EMPTY_DIR_MAX, f"{options} EMPTY_DIR path options after {len(urls)} opens"
    before = gcs_emulator.count(("GET",))
    with cloudio.open(urls[0]) as ds:  # its option was dropped long ago
        assert int(ds.read(1)[0, 0]) == 1
    assert gcs_emulator.count(("GET",)) - before <= 2  # the object's header, no listing


def test_gdal_readers_table_exceeds_its_track_max_bound(gcs_emulator, monkeypatch):
    """``GdalConsumer._readers`` (vsi path -> weakrefs of datasets opened) is meant to be bounded by
    ``_TRACK_MAX`` like ``_epoch``, but it is only swept inside ``_prune_readers``, which runs only
    when a *single* object collects more than ``_PRUNE_AT`` (64) datasets. A process that opens many
    distinct objects a few times each never triggers it: one key + list + dead weakref (~300 B) per
    distinct object ever opened, forever. Shown with the bound lowered to 300 (the same code path as
    the real 100,000): ``_epoch`` respects it, ``_readers`` does not.
    """
    from cloudio._gdal import consumer as gdal_consumer

    monkeypatch.setattr(gdal_consumer, "_TRACK_MAX", 300)
    urls = _objects(gcs_emulator, 1500)  # 1500 journaled writes: _epoch is trimmed on the way
    _open_close(urls)
    gc.collect()
    c = gdal_consumer.consumer
    assert len(c._epoch) <= 2 * 300 + 10  # the bound holds where it is enforced
    live = sum(1 for refs in c._readers.values() for r in refs if gdal_consumer._is_open(r))
    assert live == 0
    n_readers = len(c._readers)
    assert n_readers <= 2 * 300 + 10, f"_readers holds {n_readers} objects (every dataset closed), _TRACK_MAX is 300"


def test_gdal_directory_and_check_tables_stay_bounded_and_reads_stay_right(gcs_emulator, monkeypatch, tmp_path):
    """The GDAL consumer keeps, per directory read, cloudio's listing of it (up to 1000 names), and per object
    checked at the strong level, the generations and sidecars it saw: without a bound one entry per directory
    and object ever read, for the life of the process. Bounded (shown with the bounds lowered, the same code
    path as the real ones), and what was dropped is asked again: an object read long ago still opens, at the
    strong level sees that another writer deleted its sidecar, and another sees a sidecar written since."""
    from rasters import external_overview

    from cloudio._gdal import consumer as gdal_consumer

    monkeypatch.setattr(gdal_consumer, "_DIRS_MAX", 40, raising=False)
    monkeypatch.setattr(gdal_consumer, "_TRACK_MAX", 60)
    data = tif(1, 8)  # what _objects writes
    urls = _objects(gcs_emulator, 200)
    first = urls[0]
    ovr = external_overview(data, tmp_path)
    cloudio.filesystem(first).pipe(f"{first}.ovr", ovr)
    with cloudio.session("strong"):
        with cloudio.open(first) as ds:
            assert ds.overviews(1) == [2]
        _open_close(urls[1:])
    c = gdal_consumer.consumer
    listed = sum(1 for d in c._dirs.values() if d.names is not None)
    assert listed <= 40, f"{listed} directory listings kept"  # (a directory with GDAL state keeps what says so)
    assert len(c._seen) <= 2 * 60 + 10 and len(c._related) <= 2 * 60 + 10, (len(c._seen), len(c._related))
    bucket, key = first.removeprefix("gs://").split("/", 1)
    gcs_emulator.client.bucket(bucket).blob(f"{key}.ovr").delete()  # another writer: cloudio hears nothing
    with cloudio.session("strong"), cloudio.open(first) as ds:
        assert ds.overviews(1) == []
        assert int(ds.read(1)[0, 0]) == 1
    second = urls[1]
    cloudio.filesystem(second).pipe(f"{second}.ovr", ovr)  # through cloudio: journaled
    with cloudio.open(second) as ds:
        assert ds.overviews(1) == [2]


def test_zarr_metadata_tables_stay_bounded_and_a_dropped_write_still_distrusts_the_consolidated_copy(
        gcs_bucket, monkeypatch):
    """A process writing a new Zarr store per job: the metadata log (scanned by every ``open_zarr``) and the
    strong level's listings keep at most ``_NODES_MAX`` stores. A store whose entries were dropped still reads
    the documents a write of this process changed after its consolidated copy: the variable added shows."""
    import xarray as xr
    import zarr

    from cloudio._zarr import consumer as zarr_consumer
    from cloudio._zarr import store as zarr_store_module

    monkeypatch.setattr(zarr_store_module, "_NODES_MAX", 20, raising=False)
    monkeypatch.setattr(zarr_consumer, "_CHECKED_MAX", 20, raising=False)
    first = f"{gcs_bucket}/jobs/first.zarr"
    cloudio.to_zarr(xr.Dataset({"a": ("x", np.arange(4.0))}), first, mode="w", consolidated=True, zarr_format=2)
    # this process adds a variable without consolidating: the consolidated copy (.zmetadata) no longer lists all
    zarr.open_group(cloudio.zarr_store(first), mode="a", zarr_format=2).create_array(
        "b", shape=(4,), dtype="f8", attributes={"_ARRAY_DIMENSIONS": ["x"]})[:] = 7.0
    for i in range(60):
        url = f"{gcs_bucket}/jobs/j{i}.zarr"
        cloudio.save_array(np.full((4,), i, dtype="u1"), url)
        with cloudio.session("strong"):
            assert int(cloudio.load_array(url)[0]) == i
    log = zarr_store_module._metadata
    sizes = {"meta": len(log._meta), "consolidated": len(log._consolidated),
             "strong listings": len(zarr_store_module._checked), "announcement checks": len(zarr_consumer._checked)}
    assert max(sizes.values()) <= 20, sizes
    ds = cloudio.open_zarr(first)
    assert sorted(ds.data_vars) == ["a", "b"]
    assert ds["b"].values.tolist() == [7.0] * 4
