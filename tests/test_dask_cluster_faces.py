"""Across a Dask cluster and through Flyte: GDAL, Zarr and xarray reads after writes made in another process."""

from __future__ import annotations

import numpy as np
import pytest
from rasters import read_flat_tif, workers_of, write_flat_tif

distributed = pytest.importorskip("distributed")
da = pytest.importorskip("dask.array")

import dask
import xarray as xr
from flytekit import task, workflow
from flytekit.core.context_manager import FlyteContextManager
from flytekit.core.data_persistence import FileAccessProvider

import cloudio
import cloudio.flyte


def _save(url: str, arr: np.ndarray, shards=None, chunks=None) -> str:
    import cloudio

    cloudio.save_array(arr, url, chunks=chunks, shards=shards)
    return url


def _load(url: str) -> np.ndarray:
    import cloudio

    return np.asarray(cloudio.load_array(url))


# -- GDAL ------------------------------------------------------------------------------------------


def test_worker_gdal_read_sees_client_overwrite(proc_client, gcs_bucket):
    client = proc_client
    w1, _ = workers_of(client)
    url = f"{gcs_bucket}/gd/a.tif"
    write_flat_tif(url, 8, 1)
    assert client.submit(read_flat_tif, url, workers=[w1], pure=False).result() == ((8, 8), 1, 1)
    write_flat_tif(url, 16, 2)
    assert client.submit(read_flat_tif, url, workers=[w1], pure=False).result() == ((16, 16), 2, 2)


def test_client_gdal_read_sees_worker_overwrite(proc_client, gcs_bucket):
    client = proc_client
    w1, w2 = workers_of(client)
    url = f"{gcs_bucket}/gd2/a.tif"
    client.submit(write_flat_tif, url, 8, 1, workers=[w1], pure=False).result()
    assert read_flat_tif(url) == ((8, 8), 1, 1)
    assert client.submit(read_flat_tif, url, workers=[w2], pure=False).result() == ((8, 8), 1, 1)
    client.submit(write_flat_tif, url, 16, 3, workers=[w1], pure=False).result()
    assert read_flat_tif(url) == ((16, 16), 3, 3)
    assert client.submit(read_flat_tif, url, workers=[w2], pure=False).result() == ((16, 16), 3, 3)


# -- save_array / load_array ------------------------------------------------------------------------


def test_worker_save_array_client_load_array(proc_client, gcs_bucket):
    client = proc_client
    w1, w2 = workers_of(client)
    url = f"{gcs_bucket}/arr/a.zarr"
    a1 = np.arange(64, dtype="f4").reshape(8, 8)
    client.submit(_save, url, a1, workers=[w1], pure=False).result()
    np.testing.assert_array_equal(_load(url), a1)
    np.testing.assert_array_equal(client.submit(_load, url, workers=[w2], pure=False).result(), a1)
    a2 = np.arange(12 * 10, dtype="f4").reshape(12, 10) + 100
    client.submit(_save, url, a2, workers=[w1], pure=False).result()
    np.testing.assert_array_equal(_load(url), a2)
    np.testing.assert_array_equal(client.submit(_load, url, workers=[w2], pure=False).result(), a2)


def test_client_save_array_worker_load_array(proc_client, gcs_bucket):
    client = proc_client
    w1, _ = workers_of(client)
    url = f"{gcs_bucket}/arr2/a.zarr"
    a1 = np.arange(64, dtype="f4").reshape(8, 8)
    _save(url, a1)
    np.testing.assert_array_equal(client.submit(_load, url, workers=[w1], pure=False).result(), a1)
    np.testing.assert_array_equal(_load(url), a1)
    a2 = np.arange(12 * 10, dtype="i2").reshape(12, 10)
    _save(url, a2)
    got = client.submit(_load, url, workers=[w1], pure=False).result()
    assert got.dtype == a2.dtype
    np.testing.assert_array_equal(got, a2)


def test_dask_save_array_on_cluster_then_load(proc_client, gcs_bucket):
    url = f"{gcs_bucket}/arr3/a.zarr"
    a1 = np.arange(96 * 96, dtype="f8").reshape(96, 96)
    cloudio.save_array(da.from_array(a1, chunks=24), url, shards=(48, 48), chunks=(24, 24))
    np.testing.assert_array_equal(_load(url), a1)
    lazy = cloudio.load_array(url, lazy=True)
    np.testing.assert_array_equal(lazy.compute(), a1)
    a2 = a1 * 2
    cloudio.save_array(da.from_array(a2, chunks=48), url, shards=(48, 48), chunks=(24, 24))
    np.testing.assert_array_equal(_load(url), a2)
    np.testing.assert_array_equal(cloudio.load_array(url, lazy=True).compute(), a2)


# -- xarray ------------------------------------------------------------------------------------------


def _ds(n: int, scale: float) -> xr.Dataset:
    v = da.from_array(np.arange(n * n, dtype="f8").reshape(n, n) * scale, chunks=n // 4)
    ds = xr.Dataset({"v": (("y", "x"), v)}, coords={"y": np.arange(n), "x": np.arange(n)})
    ds.v.encoding.update(chunks=(n // 4, n // 4), shards=(n // 2, n // 2))
    return ds


def _open_sum(url: str) -> tuple[tuple[int, ...], float]:
    import cloudio

    ds = cloudio.open_zarr(url)
    return tuple(ds.v.shape), float(ds.v.sum().compute(scheduler="sync"))


def test_xarray_to_zarr_on_cluster_overwrite_seen_everywhere(proc_client, gcs_bucket):
    client = proc_client
    w1, _ = workers_of(client)
    url = f"{gcs_bucket}/xr/ds.zarr"
    ds1 = _ds(32, 1.0)
    cloudio.to_zarr(ds1, url, mode="w", zarr_format=3, consolidated=False)
    back = cloudio.open_zarr(url, consolidated=False)
    np.testing.assert_array_equal(back.v.values, ds1.v.values)
    assert client.submit(_open_sum, url, workers=[w1], pure=False).result() == ((32, 32), float(ds1.v.sum()))
    ds2 = _ds(48, 3.0)
    cloudio.to_zarr(ds2, url, mode="w", zarr_format=3, consolidated=False)
    back = cloudio.open_zarr(url, consolidated=False)
    np.testing.assert_array_equal(back.v.values, ds2.v.values)
    assert client.submit(_open_sum, url, workers=[w1], pure=False).result() == ((48, 48), float(ds2.v.sum()))


def test_xarray_to_zarr_compute_false_on_cluster(proc_client, gcs_bucket):
    url = f"{gcs_bucket}/xr2/ds.zarr"
    ds1 = _ds(32, 1.0)
    delayed = cloudio.to_zarr(ds1, url, mode="w", zarr_format=3, consolidated=False, compute=False)
    dask.compute(delayed)
    back = cloudio.open_zarr(url, consolidated=False)
    np.testing.assert_array_equal(back.v.values, ds1.v.values)


def test_a_template_graph_computed_on_the_cluster_marks_the_store_from_the_workers(proc_client, gcs_bucket,
                                                                                    gcs_emulator):
    """xarray's template written with compute=False, a region write (its mark comes off), then the template's graph
    computed on worker processes after all: the workers' first uploads put the mark up again (uploads of the
    marker logged at the emulator), the graph's last task takes it off, and the values are the graph's."""
    from outcomes import uploads_logged

    from cloudio._paths import parse_gcs

    url = f"{gcs_bucket}/xr2/tpl.zarr"
    ds = _ds(32, 5.0)
    graph = cloudio.to_zarr(ds, url, mode="w", zarr_format=3, consolidated=False, compute=False)
    cloudio.to_zarr(_ds(32, 1.0).isel(y=slice(0, 16)).drop_vars("x"), url, region={"y": slice(0, 16)},
                    consolidated=False)
    key = parse_gcs(url).key
    assert gcs_emulator.client.bucket(parse_gcs(url).bucket).get_blob(f"{key}/.cloudio-write-in-progress") is None
    since = len(gcs_emulator.requests())
    dask.compute(graph)
    marked = [u for u in uploads_logged(gcs_emulator, since, f"{key}/.cloudio-write-in-progress") if u[2] == 200]
    assert marked, "no worker put the mark up while the graph's chunks went up"
    np.testing.assert_array_equal(cloudio.open_zarr(url, consolidated=False).v.values, ds.v.values)


def _hold_open(url: str) -> int:
    from distributed import get_worker

    import cloudio

    ds = cloudio.open(url)
    ds.read(1)
    get_worker()._review_held = ds
    return 1


def _read_held() -> tuple[int, int]:
    from distributed import get_worker

    ds = get_worker()._review_held
    try:
        a = ds.read(1)
        return int(a.min()), int(a.max())
    finally:
        ds.close()


def test_dataset_held_open_on_worker_reads_client_overwrite(proc_client, gcs_bucket):
    client = proc_client
    w1, _ = workers_of(client)
    url = f"{gcs_bucket}/held/a.tif"
    write_flat_tif(url, 16, 1)
    client.submit(_hold_open, url, workers=[w1], pure=False).result()
    write_flat_tif(url, 16, 7)  # same layout, new pixels
    assert client.submit(_read_held, workers=[w1], pure=False).result() == (7, 7)


def test_dataset_held_open_on_worker_refuses_new_layout(proc_client, gcs_bucket):
    client = proc_client
    w1, _ = workers_of(client)
    url = f"{gcs_bucket}/held2/a.tif"
    write_flat_tif(url, 16, 1)
    client.submit(_hold_open, url, workers=[w1], pure=False).result()
    write_flat_tif(url, 32, 9)  # another layout
    with pytest.raises(cloudio.StaleDatasetError, match="held2/a.tif"):
        client.submit(_read_held, workers=[w1], pure=False).result()


def _write_bytes(url: str, data: bytes) -> str:
    import cloudio

    cloudio.filesystem(url).pipe(url, data)
    return url


def _cat(url: str) -> bytes:
    from cloudio._gcs.client import gcs_filesystem

    return gcs_filesystem().cat(url)


def _ls(prefix: str) -> list[str]:
    from cloudio._gcs.client import gcs_filesystem

    return sorted(p.rsplit("/", 1)[-1] for p in gcs_filesystem().ls(prefix))


def test_invalidate_in_client_reaches_workers(proc_client, gcs_bucket, gcs_emulator):
    client = proc_client
    w1, _ = workers_of(client)
    prefix = f"{gcs_bucket}/inv"
    _write_bytes(f"{prefix}/a.bin", b"a")
    assert client.submit(_ls, prefix, workers=[w1], pure=False).result() == ["a.bin"]
    bucket, key = prefix.removeprefix("gs://").split("/", 1)
    gcs_emulator.client.bucket(bucket).blob(f"{key}/b.bin").upload_from_string(b"b")  # outside cloudio
    cloudio.invalidate(prefix + "/")
    assert client.submit(_ls, prefix, workers=[w1], pure=False).result() == ["a.bin", "b.bin"]


def test_workers_started_later_get_the_relay(gcs_emulator, gcs_bucket):
    from distributed import Client, LocalCluster

    import cloudio.dask

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster:
        with Client(cluster) as client:
            client.wait_for_workers(1, timeout=60)
            cloudio.dask.install(client)
            cluster.scale(2)
            client.wait_for_workers(2, timeout=60)
            new = sorted(client.nthreads())[-1]
            old = next(w for w in client.nthreads() if w != new)
            prefix = f"{gcs_bucket}/later"
            _write_bytes(f"{prefix}/a.bin", b"a")
            assert client.submit(_ls, prefix, workers=[new], pure=False).result() == ["a.bin"]
            assert client.submit(_ls, prefix, workers=[old], pure=False).result() == ["a.bin"]
            wrote = client.submit(_write_bytes, f"{prefix}/b.bin", b"b", workers=[new], pure=False)
            after = client.submit(lambda _, p: _ls(p), wrote, prefix, workers=[old], pure=False)
            assert after.result() == ["a.bin", "b.bin"]
            assert _ls(prefix) == ["a.bin", "b.bin"]
            _write_bytes(f"{prefix}/c.bin", b"c")
            assert client.submit(_ls, prefix, workers=[new], pure=False).result() == ["a.bin", "b.bin", "c.bin"]


def test_inprocess_cluster_reads_and_writes(thread_client, gcs_bucket):
    client = thread_client
    w1, w2 = workers_of(client)
    url = f"{gcs_bucket}/inproc/a.tif"
    write_flat_tif(url, 8, 1)
    assert client.submit(read_flat_tif, url, workers=[w1], pure=False).result() == ((8, 8), 1, 1)
    client.submit(write_flat_tif, url, 16, 2, workers=[w2], pure=False).result()
    assert read_flat_tif(url) == ((16, 16), 2, 2)
    assert client.submit(read_flat_tif, url, workers=[w1], pure=False).result() == ((16, 16), 2, 2)
    zurl = f"{gcs_bucket}/inproc/ds.zarr"
    ds1 = _ds(32, 1.0)
    cloudio.to_zarr(ds1, zurl, mode="w", zarr_format=3, consolidated=False)
    np.testing.assert_array_equal(cloudio.open_zarr(zurl, consolidated=False).v.values, ds1.v.values)
    ds2 = _ds(48, 2.0)
    cloudio.to_zarr(ds2, zurl, mode="w", zarr_format=3, consolidated=False)
    assert client.submit(_open_sum, zurl, workers=[w1], pure=False).result() == ((48, 48), float(ds2.v.sum()))
    np.testing.assert_array_equal(cloudio.open_zarr(zurl, consolidated=False).v.values, ds2.v.values)
    aurl = f"{gcs_bucket}/inproc/a.zarr"
    a = np.arange(96 * 96, dtype="f4").reshape(96, 96)
    cloudio.save_array(da.from_array(a, chunks=24), aurl, shards=(48, 48), chunks=(24, 24))
    np.testing.assert_array_equal(_load(aurl), a)
    np.testing.assert_array_equal(cloudio.load_array(aurl, lazy=True).compute(), a)


# -- Flyte ------------------------------------------------------------------------------------------


@pytest.fixture
def gs_raw_prefix(gcs_bucket, tmp_path):
    ctx = FlyteContextManager.current_context()
    fa = FileAccessProvider(local_sandbox_dir=str(tmp_path / "sandbox"), raw_output_prefix=f"{gcs_bucket}/raw")
    with FlyteContextManager.with_context(ctx.with_file_access(fa)):
        yield f"{gcs_bucket}/raw"


N = 96


def _truth() -> np.ndarray:
    return np.arange(N * N, dtype="f8").reshape(N, N)


@task
def make_ds(scale: float) -> xr.Dataset:
    v = da.from_array(_truth() * scale, chunks=24)
    lat = da.from_array(np.arange(N * N, dtype="f4").reshape(N, N) / 10, chunks=24)
    ds = xr.Dataset({"v": (("y", "x"), v)}, coords={"y": np.arange(N), "x": np.arange(N) * 10.0,
                                                    "lat": (("y", "x"), lat)}, attrs={"t": "x"})
    ds.v.encoding.update(chunks=(16, 16), shards=(48, 48))
    return ds


@task
def subset(ds: xr.Dataset) -> xr.Dataset:
    return ds.isel(y=slice(10, 70), x=slice(5, 90))


@task
def stats(ds: xr.Dataset) -> tuple[float, float, int, int]:
    return float(ds.v.sum().compute()), float(ds.lat.sum().compute()), int(ds.sizes["y"]), int(ds.sizes["x"])


@workflow
def subset_flow(scale: float) -> tuple[float, float, int, int]:
    return stats(ds=subset(ds=make_ds(scale=scale)))


def _check_subset(got, scale):
    sub = _truth()[10:70, 5:90] * scale
    lat = (np.arange(N * N, dtype="f4").reshape(N, N) / 10)[10:70, 5:90]
    assert got[2:] == (60, 85)
    assert got[0] == pytest.approx(float(sub.sum()))
    assert got[1] == pytest.approx(float(lat.sum(dtype="f8")), rel=1e-5)


def test_flyte_subset_of_an_input_round_trips(gs_raw_prefix):
    _check_subset(subset_flow(scale=1.0), 1.0)


def test_flyte_outputs_computed_on_a_distributed_cluster(proc_client, gs_raw_prefix):
    _check_subset(subset_flow(scale=2.0), 2.0)
    _check_subset(subset_flow(scale=3.0), 3.0)


@task
def make_da() -> xr.DataArray:
    v = da.from_array(_truth(), chunks=32)
    a = xr.DataArray(v, dims=("y", "x"), coords={"y": np.arange(N), "x": np.arange(N) * 2.0,
                                                 "lat": (("y", "x"), np.ones((N, N), "f4")),
                                                 "band": 3}, name=None, attrs={"units": "K"})
    return a


@task
def pass_da(a: xr.DataArray) -> xr.DataArray:
    return a


@workflow
def da_flow() -> xr.DataArray:
    return pass_da(a=make_da())


def test_flyte_data_array_round_trip_identical(gs_raw_prefix):
    got = da_flow()
    want = make_da()
    xr.testing.assert_identical(got.compute(), want.compute())




# -- a late copy of a worker's abandoned upload ------------------------------------------------------------


def _on_workers(endpoint: str | None, timeout: str | None) -> None:
    """On a worker: cloudio's endpoint (None: back to the emulator), its time limit, and guarded uploads sent
    as fake-gcs-server enforces them (multipart), as tests/conftest.py does in the test's own process."""
    import os

    from cloudio import _config
    from cloudio._gcs import fast

    if endpoint is None:
        _config.pop_endpoint()
    else:
        _config.push_endpoint(endpoint)
    if timeout is None:
        os.environ.pop("CLOUDIO_HTTP_TIMEOUT", None)
    else:
        os.environ["CLOUDIO_HTTP_TIMEOUT"] = timeout
    fast.EXPECTED_AS_MULTIPART = timeout is not None


@pytest.mark.parametrize("writer", ["to_zarr", "region"])
def test_a_late_copy_of_a_workers_abandoned_upload_does_not_land_over_a_later_write(
        proc_client, gcs_bucket, fault_proxy, monkeypatch, writer):
    """Dask chunk tasks on worker processes write through a pickled copy of the store: that copy carries the
    generations the write listed. A worker's upload of chunk v/c/0/0 is held past the time limit (sent again),
    a later write commits, then the held copy arrives: the later write's values stay."""
    from outcomes import two_writes_and_a_late_copy

    client = proc_client
    monkeypatch.setenv("CLOUDIO_HTTP_TIMEOUT", "1")
    client.run(_on_workers, fault_proxy.url, "1")
    try:
        url = f"{gcs_bucket}/workers-{writer}.zarr"
        kw = {"encoding": {"v": {"chunks": (32, 32)}}, "consolidated": False}
        cloudio.to_zarr(xr.Dataset({"v": (("y", "x"), np.zeros((64, 64), "i4"))}), url, mode="w", **kw)

        def write(value: int) -> None:
            v = da.full((64, 64), value, dtype="i4", chunks=32)
            if writer == "to_zarr":
                cloudio.to_zarr(xr.Dataset({"v": (("y", "x"), v)}), url, mode="w", **kw)
            else:
                cloudio.to_zarr(xr.Dataset({"v": (("y", "x"), v[:32])}), url, region={"y": slice(0, 32)},
                                consolidated=False)

        two_writes_and_a_late_copy(fault_proxy, rf"name=workers-{writer}\.zarr%2Fv%2Fc%2F0%2F0", write)
        got = cloudio.open_zarr(url, consolidated=False).v.values
        stale = int(np.count_nonzero(got == 1))
        assert stale == 0, f"{stale} values of the first write inside the second (a worker's late copy landed)"
    finally:
        client.run(_on_workers, None, None)
