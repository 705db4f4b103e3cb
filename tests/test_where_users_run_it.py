"""Where users run cloudio: Dask clusters (writes on workers read at once elsewhere), Flyte local runs, every
configuration variable's bad values and defaults, and the pytest plugin in a fresh project."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from rasters import read_flat_tif, workers_of, write_flat_tif

import cloudio

distributed = pytest.importorskip("distributed")
da = pytest.importorskip("dask.array")

pytestmark = pytest.mark.filterwarnings("ignore:Consolidated metadata is currently not part")


# -- helpers run on workers ---------------------------------------------------------------------------

def _pipe(url: str, data: bytes) -> str:
    import cloudio

    cloudio.filesystem(url).pipe(url, data)
    return url


def _cat(url: str) -> bytes:
    import cloudio

    return cloudio.filesystem(url).cat(url)


def _ls(prefix: str) -> list[str]:
    import cloudio

    return sorted(p.rsplit("/", 1)[-1] for p in cloudio.filesystem(prefix).ls(prefix))


def _pipe_then_fail(prefix: str) -> None:
    import cloudio

    fs = cloudio.filesystem(prefix)
    fs.pipe(f"{prefix}/half.bin", b"half")
    raise RuntimeError("half way")


def _save(url: str, arr: np.ndarray) -> str:
    import cloudio

    cloudio.save_array(arr, url)
    return url


def _load(url: str) -> np.ndarray:
    import cloudio

    return np.asarray(cloudio.load_array(url))


def _ds(n: int, value: float, chunks: int = 16):
    import xarray as xr

    v = da.full((n, n), value, dtype="f8", chunks=chunks)
    return xr.Dataset({"v": (("y", "x"), v)}, coords={"y": np.arange(n), "x": np.arange(n)})


def _open_shape_sum(url: str, consolidated: bool | None = None) -> tuple[tuple[int, ...], float]:
    import cloudio

    kw = {} if consolidated is None else {"consolidated": consolidated}
    ds = cloudio.open_zarr(url, **kw)
    return tuple(ds.v.shape), float(ds.v.sum().compute(scheduler="sync"))


# -- (1) Dask -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("cluster", ["proc_client", "thread_client"])
def test_worker_gdal_overwrite_seen_by_other_worker_with_cached_read(cluster, request, gcs_bucket):
    client = request.getfixturevalue(cluster)
    w1, w2 = workers_of(client)
    url = f"{gcs_bucket}/w2w/a.tif"
    client.submit(write_flat_tif, url, 8, 1, workers=[w1], pure=False).result()
    assert client.submit(read_flat_tif, url, workers=[w2], pure=False).result() == ((8, 8), 1, 1)
    assert read_flat_tif(url) == ((8, 8), 1, 1)
    wrote = client.submit(write_flat_tif, url, 16, 5, workers=[w1], pure=False)
    after = client.submit(lambda _, u: read_flat_tif(u), wrote, url, workers=[w2], pure=False)
    assert after.result() == ((16, 16), 5, 5)
    assert read_flat_tif(url) == ((16, 16), 5, 5)


@pytest.mark.parametrize("cluster", ["proc_client", "thread_client"])
def test_a_task_that_fails_half_way_its_write_is_seen(cluster, request, gcs_bucket):
    client = request.getfixturevalue(cluster)
    w1, w2 = workers_of(client)
    prefix = f"{gcs_bucket}/half"
    _pipe(f"{prefix}/a.bin", b"a")
    assert _ls(prefix) == ["a.bin"]
    assert client.submit(_ls, prefix, workers=[w2], pure=False).result() == ["a.bin"]
    fut = client.submit(_pipe_then_fail, prefix, workers=[w1], pure=False)
    with pytest.raises(RuntimeError, match="half way"):
        fut.result()
    assert _ls(prefix) == ["a.bin", "half.bin"]
    assert _cat(f"{prefix}/half.bin") == b"half"
    assert client.submit(_ls, prefix, workers=[w2], pure=False).result() == ["a.bin", "half.bin"]


@pytest.mark.parametrize("cluster", ["proc_client", "thread_client"])
def test_save_array_on_one_worker_overwritten_on_another_then_loaded(cluster, request, gcs_bucket):
    client = request.getfixturevalue(cluster)
    w1, w2 = workers_of(client)
    url = f"{gcs_bucket}/arr/a.zarr"
    a1 = np.arange(64, dtype="i4").reshape(8, 8)
    a2 = np.arange(256, dtype="i4").reshape(16, 16) * 2
    client.submit(_save, url, a1, workers=[w1], pure=False).result()
    np.testing.assert_array_equal(client.submit(_load, url, workers=[w1], pure=False).result(), a1)
    np.testing.assert_array_equal(_load(url), a1)
    wrote = client.submit(_save, url, a2, workers=[w2], pure=False)
    after = client.submit(lambda _, u: _load(u), wrote, url, workers=[w1], pure=False)
    np.testing.assert_array_equal(after.result(), a2)
    np.testing.assert_array_equal(_load(url), a2)


@pytest.mark.parametrize("cluster", ["proc_client", "thread_client"])
def test_to_zarr_compute_false_overwrite_seen_by_worker_that_read_before(cluster, request, gcs_bucket):
    client = request.getfixturevalue(cluster)
    w1, _ = workers_of(client)
    url = f"{gcs_bucket}/cf/ds.zarr"
    ds1 = _ds(32, 1.0)
    cloudio.to_zarr(ds1, url, mode="w", zarr_format=3, consolidated=True)
    assert client.submit(_open_shape_sum, url, workers=[w1], pure=False).result() == ((32, 32), 32 * 32 * 1.0)
    ds2 = _ds(48, 2.0)
    delayed = cloudio.to_zarr(ds2, url, mode="w", zarr_format=3, consolidated=True, compute=False)
    client.compute(delayed).result()
    assert _open_shape_sum(url) == ((48, 48), 48 * 48 * 2.0)
    assert client.submit(_open_shape_sum, url, workers=[w1], pure=False).result() == ((48, 48), 48 * 48 * 2.0)


def test_to_zarr_append_on_cluster_seen_by_worker_that_opened_before(proc_client, gcs_bucket):
    client = proc_client
    w1, _ = workers_of(client)
    url = f"{gcs_bucket}/app/ds.zarr"
    ds1 = _ds(32, 1.0)
    cloudio.to_zarr(ds1, url, mode="w", zarr_format=3, consolidated=True)
    assert client.submit(_open_shape_sum, url, workers=[w1], pure=False).result() == ((32, 32), 32 * 32 * 1.0)
    ds2 = _ds(32, 2.0).assign_coords(y=np.arange(32, 64))
    cloudio.to_zarr(ds2, url, append_dim="y", zarr_format=3)
    want = ((64, 32), 32 * 32 * 3.0)
    assert _open_shape_sum(url) == want
    assert client.submit(_open_shape_sum, url, workers=[w1], pure=False).result() == want


def test_dask_to_zarr_on_workers_then_read_on_another_worker_at_once(proc_client, gcs_bucket):
    """A task on w1 runs cloudio.to_zarr of a Dask-backed dataset (computed with the worker's own
    scheduler); a dependent task on w2 that had opened the old store reads the new one."""
    client = proc_client
    w1, w2 = workers_of(client)
    url = f"{gcs_bucket}/onw/ds.zarr"

    def write(n, value):
        import cloudio

        cloudio.to_zarr(_ds(n, value), url, mode="w", zarr_format=3, consolidated=True)
        return n

    client.submit(write, 32, 1.0, workers=[w1], pure=False).result()
    assert client.submit(_open_shape_sum, url, workers=[w2], pure=False).result() == ((32, 32), 1024.0)
    wrote = client.submit(write, 40, 3.0, workers=[w1], pure=False)
    after = client.submit(lambda _, u: _open_shape_sum(u), wrote, url, workers=[w2], pure=False)
    assert after.result() == ((40, 40), 40 * 40 * 3.0)
    assert _open_shape_sum(url) == ((40, 40), 40 * 40 * 3.0)


def test_a_worker_that_joins_after_the_writes_reads_them(gcs_emulator, gcs_bucket):
    from distributed import Client, LocalCluster

    import cloudio.dask

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster:
        with Client(cluster) as client:
            client.wait_for_workers(1, timeout=60)
            cloudio.dask.install(client)
            (old,) = list(client.nthreads())
            url = f"{gcs_bucket}/join/a.tif"
            prefix = f"{gcs_bucket}/join"
            client.submit(write_flat_tif, url, 8, 1, workers=[old], pure=False).result()
            client.submit(_pipe, f"{prefix}/x.bin", b"x1", workers=[old], pure=False).result()
            cluster.scale(2)
            client.wait_for_workers(2, timeout=60)
            new = next(w for w in client.nthreads() if w != old)
            assert client.submit(read_flat_tif, url, workers=[new], pure=False).result() == ((8, 8), 1, 1)
            assert client.submit(_cat, f"{prefix}/x.bin", workers=[new], pure=False).result() == b"x1"
            client.submit(write_flat_tif, url, 16, 2, workers=[old], pure=False).result()
            client.submit(_pipe, f"{prefix}/x.bin", b"x2", workers=[old], pure=False).result()
            assert client.submit(read_flat_tif, url, workers=[new], pure=False).result() == ((16, 16), 2, 2)
            assert client.submit(_cat, f"{prefix}/x.bin", workers=[new], pure=False).result() == b"x2"
            assert client.submit(_ls, prefix, workers=[new], pure=False).result() == ["a.tif", "x.bin"]


# -- (3) Configuration --------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["-1", "0", "soon", "nan"])
def test_bad_http_timeout_is_named_by_every_face(monkeypatch, gcs_bucket, bad):
    url = f"{gcs_bucket}/cfg/a.bin"
    tif = f"{gcs_bucket}/cfg/a.tif"
    _pipe(url, b"x")
    write_flat_tif(tif, 4, 1)
    monkeypatch.setenv("CLOUDIO_HTTP_TIMEOUT", bad)
    with pytest.raises(cloudio.ConfigurationError, match="CLOUDIO_HTTP_TIMEOUT"):
        cloudio.filesystem(url).cat(url)
    with pytest.raises(cloudio.ConfigurationError, match="CLOUDIO_HTTP_TIMEOUT"):
        read_flat_tif(tif)
    with pytest.raises(cloudio.ConfigurationError, match="CLOUDIO_HTTP_TIMEOUT"):
        cloudio.load_array(f"{gcs_bucket}/cfg/x.zarr")


@pytest.mark.parametrize("face", ["gdal_open", "fsspec_cat", "fsspec_ls", "fsspec_open", "load_array", "open_zarr"])
@pytest.mark.parametrize("bad", ["-1", "nan", "sometimes"])
def test_bad_consistency_is_named_by_every_face(monkeypatch, gcs_bucket, bad, face):
    url = f"{gcs_bucket}/cfgc/a.bin"
    tif = f"{gcs_bucket}/cfgc/a.tif"
    zurl = f"{gcs_bucket}/cfgc/a.zarr"
    xurl = f"{gcs_bucket}/cfgc/x.zarr"
    _pipe(url, b"x")
    write_flat_tif(tif, 4, 1)
    cloudio.save_array(np.arange(4), zurl)
    cloudio.to_zarr(_ds(8, 1.0).compute(), xurl, mode="w", zarr_format=3, consolidated=False)
    calls = {
        "gdal_open": lambda: read_flat_tif(tif),
        "fsspec_cat": lambda: cloudio.filesystem(url).cat(url),
        "fsspec_ls": lambda: cloudio.filesystem(url).ls(f"{gcs_bucket}/cfgc"),
        "fsspec_open": lambda: cloudio.filesystem(url).open(url).read(),
        "load_array": lambda: cloudio.load_array(zurl),
        "open_zarr": lambda: cloudio.open_zarr(xurl, consolidated=False).v.values,
    }
    monkeypatch.setenv("CLOUDIO_CONSISTENCY", bad)
    with pytest.raises(cloudio.ConfigurationError, match="CLOUDIO_CONSISTENCY"):
        calls[face]()


def test_gcsfs_connect_limit_is_at_most_10_seconds(monkeypatch, gcs_emulator):
    """docs/configuration.md: CLOUDIO_HTTP_TIMEOUT is how long a request may stay silent, "(connect at
    most 10 of them), for GDAL and gcsfs alike"."""
    from cloudio import _config

    monkeypatch.setenv("CLOUDIO_HTTP_TIMEOUT", "60")
    assert _config.gdal_http_options()["GDAL_HTTP_CONNECTTIMEOUT"] == "10"
    rt = cloudio.filesystem("gs://").requests_timeout
    assert rt.sock_read == 60
    assert rt.sock_connect <= 10, f"gcsfs may take {rt.sock_connect} s to connect"


def test_default_http_timeout_is_in_force_for_gcsfs(monkeypatch, gcs_emulator):
    monkeypatch.delenv("CLOUDIO_HTTP_TIMEOUT", raising=False)
    rt = cloudio.filesystem("gs://").requests_timeout
    assert rt.sock_read == 30


@pytest.mark.parametrize("bad", ["-5", "0", "abc", "nan", "inf"])
def test_bad_emulator_start_timeout_is_named(monkeypatch, bad):
    from cloudio.emulator import Emulator

    monkeypatch.setenv("CLOUDIO_EMULATOR_START_TIMEOUT", bad)
    with pytest.raises(cloudio.ConfigurationError, match="CLOUDIO_EMULATOR_START_TIMEOUT"):
        Emulator("binary")


@pytest.mark.parametrize("bad", ["nope", "Binary", "docker "])
def test_bad_emulator_mode_is_named(monkeypatch, bad):
    from cloudio.emulator import Emulator

    monkeypatch.setenv("CLOUDIO_EMULATOR", bad)
    if bad.strip() == "docker":
        assert Emulator().mode == "docker"  # blanks are stripped as for every variable
        return
    with pytest.raises(cloudio.ConfigurationError, match="CLOUDIO_EMULATOR"):
        Emulator()


def test_documented_emulator_defaults(monkeypatch):
    from cloudio.emulator import Emulator

    monkeypatch.delenv("CLOUDIO_EMULATOR", raising=False)
    monkeypatch.delenv("CLOUDIO_EMULATOR_START_TIMEOUT", raising=False)
    monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)
    e = Emulator()
    assert e.mode == "binary" and e.timeout == 30
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", "127.0.0.1:4443")
    assert Emulator().mode == "external"
    assert Emulator(port=5555).mode == "binary"
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", "  ")
    assert Emulator().mode == "binary"
    monkeypatch.setenv("CLOUDIO_EMULATOR", "")
    assert Emulator().mode == "binary"


@pytest.mark.parametrize("bad", ["http://", "localhost:-1", "ftp://127.0.0.1:1", "127.0.0.1:99999",
                                 "https://storage.googleapis.com"])
def test_bad_storage_emulator_host_is_named_at_the_first_read(monkeypatch, bad):
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", bad)
    with pytest.raises(cloudio.ConfigurationError, match="STORAGE_EMULATOR_HOST"):
        cloudio.filesystem("gs://review-bkt/k").cat("gs://review-bkt/k")
    with pytest.raises(cloudio.ConfigurationError, match="STORAGE_EMULATOR_HOST"):
        cloudio.open("gs://review-bkt/k.tif")


# -- (2) Flyte ----------------------------------------------------------------------------------------

import xarray as xr
from flytekit import task, workflow
from flytekit.core.context_manager import FlyteContextManager
from flytekit.core.data_persistence import FileAccessProvider

import cloudio.flyte


@pytest.fixture
def flyte_gs(gcs_bucket, tmp_path):
    ctx = FlyteContextManager.current_context()
    fa = FileAccessProvider(local_sandbox_dir=str(tmp_path / "sandbox"), raw_output_prefix=f"{gcs_bucket}/raw")
    with FlyteContextManager.with_context(ctx.with_file_access(fa)):
        yield f"{gcs_bucket}/raw"


@task
def fl_make(n: int) -> xr.Dataset:
    v = da.arange(n * n, dtype="f8").reshape(n, n).rechunk(32)
    ds = xr.Dataset({"v": (("y", "x"), v)}, coords={"y": np.arange(n), "x": np.arange(n)}, attrs={"a": 1})
    ds.v.encoding.update(chunks=(16, 16), shards=(32, 32))
    return ds


@task
def fl_passthrough(ds: xr.Dataset) -> xr.Dataset:
    return ds


@task
def fl_scaled(ds: xr.Dataset) -> xr.Dataset:
    return ds * 2


@task
def fl_sum(ds: xr.Dataset) -> float:
    return float(ds.v.sum().compute())


@workflow
def fl_pass_flow(n: int) -> float:
    return fl_sum(ds=fl_passthrough(ds=fl_make(n=n)))


@workflow
def fl_scaled_flow(n: int) -> float:
    return fl_sum(ds=fl_scaled(ds=fl_make(n=n)))


def test_flyte_an_input_returned_unchanged_round_trips(flyte_gs):
    n = 64
    assert fl_pass_flow(n=n) == float(np.arange(n * n).sum())


def test_flyte_arithmetic_on_an_input_round_trips(flyte_gs):
    n = 64
    assert fl_scaled_flow(n=n) == float(2 * np.arange(n * n).sum())


# -- (4) pytest plugin --------------------------------------------------------------------------------

_PROJECT_TESTS = textwrap.dedent(
    '''
    import numpy as np
    import pytest

    import cloudio


    @pytest.mark.parametrize("i", range(3))
    def test_write_same_key_each_test(gcs_bucket, i):
        url = f"{gcs_bucket}/k.bin"
        fs = cloudio.filesystem(url)
        assert fs.ls(gcs_bucket) == []
        fs.pipe(url, str(i).encode())
        assert fs.cat(url) == str(i).encode()
        with cloudio.open(f"{gcs_bucket}/r.tif", "w", driver="GTiff", width=4, height=4, count=1,
                          dtype="uint8") as dst:
            dst.write(np.full((1, 4, 4), i, "uint8"))
        with cloudio.open(f"{gcs_bucket}/r.tif") as src:
            assert int(src.read(1).max()) == i


    @pytest.fixture(scope="session")
    def reference_cube(gcs_emulator):
        gcs_emulator.create_bucket("reference-data")
        url = "gs://reference-data/cube.zarr"
        cloudio.save_array(np.arange(10_000, dtype="int32").reshape(100, 100), url,
                           chunks=(10, 10), shards=(50, 50))
        return url


    def test_reads_a_block(reference_cube):
        assert cloudio.load_array(reference_cube)[3, 4] == 304


    def test_strong_session_in_a_test(gcs_bucket):
        with cloudio.session("strong") as s:
            cloudio.filesystem(gcs_bucket).pipe(f"{gcs_bucket}/s.bin", b"s")
            assert cloudio.filesystem(gcs_bucket).cat(f"{gcs_bucket}/s.bin") == b"s"
        assert s.consistency == "strong"
    '''
)


def _run_project(folder: Path, *extra: str, env_updates: dict[str, str] | None = None) -> subprocess.Popen[str]:
    (folder / "test_project.py").write_text(_PROJECT_TESTS)
    env = dict(os.environ)
    env.update(env_updates or {})
    for key in ("STORAGE_EMULATOR_HOST", "CLOUDIO_EMULATOR", "PYTEST_ADDOPTS", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"):
        env.pop(key, None)
    if env.get("PYTHONPATH"):
        env["PYTHONPATH"] = os.pathsep.join(os.path.abspath(p) for p in env["PYTHONPATH"].split(os.pathsep) if p)
    return subprocess.Popen(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *extra, "test_project.py"],
        cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_two_projects_run_in_parallel_each_with_its_own_emulator(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    procs = [_run_project(a), _run_project(b)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out
        assert "5 passed" in out, out


@pytest.mark.parametrize("autoload", ["on", "off"])
def test_plugin_named_explicitly_with_dash_p(tmp_path, autoload):
    """``-p cloudio.pytest_plugin`` (the module's name) must work whether or not entry points autoload."""
    env = {"PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"} if autoload == "off" else {}
    p = _run_project(tmp_path, "-p", "cloudio.pytest_plugin", env_updates=env)
    out = p.communicate(timeout=300)[0]
    assert p.returncode == 0, out
    assert "5 passed" in out, out


def test_session_stats_count_uploads_through_cloudio_filesystem(gcs_bucket):
    """Stats docstring: ``uploads, bytes_uploaded``: objects uploaded through cloudio, and their bytes."""
    with cloudio.session() as s:
        cloudio.filesystem(gcs_bucket).pipe(f"{gcs_bucket}/s.bin", b"12345")
    with cloudio.session() as t:
        write_flat_tif(f"{gcs_bucket}/s.tif", 4, 1)
    assert t.stats.uploads == 1  # the GDAL face counts its upload
    assert (s.stats.uploads, s.stats.bytes_uploaded) == (1, 5)
