"""The Flyte integration and the fsspec face's caches at each consistency level: a range counted from the end, and
a concurrent whole read, after another writer's overwrite (the new bytes at the old offsets, or cut at the old
size), and a DataArray named like its coordinate or dimension as a task's output, failed before their fixes
(found by a review).

Each test writes behind a cache (another process, plain google-cloud-storage, flytekit's own uploads) or through
cloudio, and checks what the reader gets against what docs/consistency.md and docs/flyte.md promise.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import xarray as xr
from flytekit import task, workflow
from flytekit.types.directory import FlyteDirectory
from flytekit.types.file import FlyteFile
from rasters import overwritten_behind_a_listing
from rasters import put as _put

import cloudio
import cloudio.flyte
from cloudio.emulator import Emulator

# --------------------------------------------------------------------------------------------
# levels across threads
# --------------------------------------------------------------------------------------------


def test_strong_level_of_this_thread_is_not_overridden_by_a_session_another_thread_enters(
        gcs_bucket: str, gcs_emulator: Emulator) -> None:
    """docs: "The level comes from the innermost session of the current context". A thread in ``"strong"`` must
    read fresh listings although another thread entered a ``"session"``-level block after it."""
    # passes: pins that the level of the calling thread reaches gcsfs's coroutines on fsspec's loop thread
    fs = cloudio.filesystem(gcs_bucket)
    root = gcs_bucket.removeprefix("gs://")
    fs.pipe(f"{gcs_bucket}/d/a.bin", b"a" * 10)
    assert fs.ls(f"{root}/d", detail=False) == [f"{root}/d/a.bin"]
    _put(gcs_emulator, f"{gcs_bucket}/d/new.bin", b"n" * 5)  # another writer

    entered, done = threading.Event(), threading.Event()

    def other() -> None:
        with cloudio.session("session"):
            entered.set()
            done.wait(30)

    t = threading.Thread(target=other)
    with cloudio.session("strong"):
        t.start()
        try:
            assert entered.wait(30)
            listing = fs.ls(f"{root}/d", detail=False)
            size = fs.info(f"{root}/d/new.bin")["size"] if fs.exists(f"{root}/d/new.bin") else None
        finally:
            done.set()
            t.join()
    assert listing == [f"{root}/d/a.bin", f"{root}/d/new.bin"]
    assert size == 5


# --------------------------------------------------------------------------------------------
# Flyte: FlyteDirectory written through cloudio, read by flytekit in the next task
# --------------------------------------------------------------------------------------------

pytest.importorskip("flytekit")


@task
def fill_dir(url: str, names: list[str], n: int) -> FlyteDirectory:
    fs = cloudio.filesystem(url)
    for name in names:
        fs.pipe(f"{url}/{name}", name.encode() * n)
    return FlyteDirectory(path=url)


@task
def dir_listing(d: FlyteDirectory) -> list[str]:
    """What flytekit downloads of the directory: names and sizes."""
    import os

    local = d.download()
    return sorted(f"{f}:{os.path.getsize(os.path.join(local, f))}" for f in os.listdir(local))


@task
def crawl_listing(d: FlyteDirectory) -> list[str]:
    return sorted(str(p) for _base, p in d.crawl())


@workflow
def dir_grows(url: str) -> tuple[list[str], list[str], list[str], list[str]]:
    d1 = fill_dir(url=url, names=["a", "b"], n=2)
    l1 = dir_listing(d=d1)
    c1 = crawl_listing(d=d1)
    d2 = fill_dir(url=url, names=["a", "c"], n=5)
    l1 >> d2
    c1 >> d2
    return l1, c1, dir_listing(d=d2), crawl_listing(d=d2)


def test_flyte_directory_rewritten_through_cloudio_is_downloaded_whole_by_the_next_task(gcs_bucket: str) -> None:
    # passes: pins that flytekit's own gcsfs instance (FlyteDirectory download/crawl) drops listings on cloudio writes
    l1, c1, l2, c2 = dir_grows(url=f"{gcs_bucket}/flyte-dir/out")
    assert l1 == ["a:2", "b:2"] and c1 == ["a", "b"]
    assert c2 == ["a", "b", "c"]
    assert l2 == ["a:5", "b:2", "c:5"]


# --------------------------------------------------------------------------------------------
# Flyte: a FlyteFile flytekit uploads over an object cloudio's filesystem listed, read through cloudio
# --------------------------------------------------------------------------------------------


@task
def upload_bytes(url: str, n: int) -> FlyteFile:
    import os
    import tempfile

    path = os.path.join(tempfile.mkdtemp(), "x.bin")
    with open(path, "wb") as f:
        f.write(b"x" * n)
    return FlyteFile(path=path, remote_path=url)


@task
def read_strong(f: FlyteFile) -> list[int]:
    fs = cloudio.filesystem("gs://")
    url = f.remote_source
    with cloudio.session("strong"):
        info = fs.info(url)["size"]
        with fs.open(url, "rb") as h:
            data = h.read()
        parent = url.rsplit("/", 1)[0]
        sizes = [e["size"] for e in fs.ls(parent, detail=True)]
    return [info, len(data), *sizes]


@workflow
def uploads_twice(url: str) -> tuple[list[int], list[int]]:
    f1 = upload_bytes(url=url, n=10)
    r1 = read_strong(f=f1)
    f2 = upload_bytes(url=url, n=1000)
    r1 >> f2
    return r1, read_strong(f=f2)


def test_flytekit_upload_over_a_listed_object_is_read_fresh_at_strong(gcs_bucket: str) -> None:
    # passes: pins strong-level info/open/ls of an object flytekit uploaded over, in the next task
    r1, r2 = uploads_twice(url=f"{gcs_bucket}/flyte-up/x.bin")
    assert r1 == [10, 10, 10]
    assert r2 == [1000, 1000, 1000]


# --------------------------------------------------------------------------------------------
# fsspec: ranged reads sized from a stale listing (session level)
# --------------------------------------------------------------------------------------------


def test_session_level_cat_file_with_negative_end_is_never_mixed(gcs_bucket, gcs_emulator) -> None:
    """``cat_file(start, end<0)`` sizes the range from the listing: after an outside overwrite it must not return
    the new object's bytes at the old object's offsets (``tail`` and ``open().read()`` refuse, with
    StaleDatasetError)."""
    fs = cloudio.filesystem(gcs_bucket)
    url = f"{gcs_bucket}/d/r.bin"
    overwritten_behind_a_listing(fs, gcs_emulator, url, b"0123456789", b"abcdefghijklmnopqrstuvwxy")
    try:
        got = fs.cat_file(url, start=2, end=-2)
    except cloudio.StaleDatasetError:
        return
    assert got in (b"234567", b"cdefghijklmnopqrstuvw")  # was b"cdefgh": neither version


def test_strong_cat_file_with_negative_end_reads_the_new_object(gcs_bucket, gcs_emulator) -> None:
    # passes: pins the strong-level answer to the session-level bug below
    fs = cloudio.filesystem(gcs_bucket)
    url = f"{gcs_bucket}/d/r.bin"
    overwritten_behind_a_listing(fs, gcs_emulator, url, b"0123456789", b"abcdefghijklmnopqrstuvwxy")
    with cloudio.session("strong"):
        assert fs.cat_file(url, start=2, end=-2) == b"cdefghijklmnopqrstuvw"


def test_session_level_concurrent_cat_file_is_never_the_new_bytes_cut_short(gcs_bucket, gcs_emulator) -> None:
    """gcsfs's ``cat_file(path, concurrency=N)`` sizes the read from ``info``: from a listing another writer made
    out of date it returned the new object cut at the old size (the truncation cloudio exists to prevent)."""
    fs = cloudio.filesystem(gcs_bucket)
    url = f"{gcs_bucket}/d/c.bin"
    overwritten_behind_a_listing(fs, gcs_emulator, url, b"a" * 10, b"b" * 25)
    try:
        got = fs.cat_file(url, concurrency=2)
    except cloudio.StaleDatasetError:
        return
    assert got in (b"a" * 10, b"b" * 25)


# --------------------------------------------------------------------------------------------
# Flyte + xarray: a task that subsets its input and returns it
# --------------------------------------------------------------------------------------------




@task
def make_ds() -> xr.Dataset:
    import dask.array as da

    v = da.arange(96 * 96, dtype="f8").reshape(96, 96).rechunk(48)
    ds = xr.Dataset({"v": (("y", "x"), v)}, coords={"y": np.arange(96), "x": np.arange(96)})
    ds.v.encoding.update(chunks=(16, 16), shards=(48, 48))
    return ds


@task
def top_rows(ds: xr.Dataset) -> xr.Dataset:
    return ds.isel(y=slice(0, 50))


@task
def total_of(ds: xr.Dataset) -> float:
    return float(ds.v.sum())


@workflow
def subset_flow() -> float:
    return total_of(ds=top_rows(ds=make_ds()))


def test_a_task_returning_a_subset_of_its_input_hands_it_on(gcs_bucket: str, tmp_path) -> None:
    # passes: pins that a subset of a sharded input (encoding kept, shape changed) is written as an output
    from flytekit.core.context_manager import FlyteContextManager
    from flytekit.core.data_persistence import FileAccessProvider

    ctx = FlyteContextManager.current_context()
    fa = FileAccessProvider(local_sandbox_dir=str(tmp_path / "sb"), raw_output_prefix=f"{gcs_bucket}/raw")
    with FlyteContextManager.with_context(ctx.with_file_access(fa)):
        got = subset_flow()
    assert got == float(np.arange(96 * 96, dtype="f8").reshape(96, 96)[:50].sum())


@task
def coord_of(ds: xr.Dataset) -> xr.DataArray:
    return ds["x"]  # an index coordinate: its name is also a coordinate's


@task
def x_sum(a: xr.DataArray) -> float:
    return float(a.sum())


@workflow
def coord_flow() -> tuple[xr.DataArray, float]:
    c = coord_of(ds=make_ds())
    return c, x_sum(a=c)


def test_a_coordinate_data_array_is_a_valid_task_output(gcs_bucket: str, tmp_path) -> None:
    """``return ds["x"]`` (a DataArray named like one of its coordinates, as every index coordinate is): xarray's own
    ``DataArray.to_zarr``/``to_netcdf`` store it under a placeholder name and restore it."""
    from flytekit.core.context_manager import FlyteContextManager
    from flytekit.core.data_persistence import FileAccessProvider

    ctx = FlyteContextManager.current_context()
    fa = FileAccessProvider(local_sandbox_dir=str(tmp_path / "sb"), raw_output_prefix=f"{gcs_bucket}/raw")
    with FlyteContextManager.with_context(ctx.with_file_access(fa)):
        c, s = coord_flow()
    assert s == float(np.arange(96).sum())
    assert c.name == "x" and list(c.values) == list(range(96))


def test_a_data_array_named_like_its_dimension_round_trips(gcs_bucket: str, tmp_path) -> None:
    """A DataArray named like its own dimension (no coordinate) becomes, stored as ``to_dataset(name=...)``, an index
    coordinate: the reader then finds no data variable and refuses the store cloudio itself wrote."""
    from flytekit.core.context_manager import FlyteContextManager
    from flytekit.core.data_persistence import FileAccessProvider
    from flytekit.core.type_engine import TypeEngine

    a = xr.DataArray(np.arange(5.0), dims="x", name="x", attrs={"units": "m"})
    ctx = FlyteContextManager.current_context()
    fa = FileAccessProvider(local_sandbox_dir=str(tmp_path / "sb"), raw_output_prefix=f"{gcs_bucket}/raw")
    with FlyteContextManager.with_context(ctx.with_file_access(fa)):
        ctx = FlyteContextManager.current_context()
        lit = TypeEngine.to_literal(ctx, a, xr.DataArray, TypeEngine.to_literal_type(xr.DataArray))
        back = TypeEngine.to_python_value(ctx, lit, xr.DataArray)
    assert back.name == "x" and list(back.values) == [0.0, 1.0, 2.0, 3.0, 4.0]


# --------------------------------------------------------------------------------------------
# plain xarray / zarr on a gs:// URL in a process where cloudio writes
# --------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:Consolidated metadata is currently not part:UserWarning")
def test_plain_xarray_open_zarr_sees_a_variable_cloudio_appended(gcs_bucket: str, gcs_emulator: Emulator) -> None:
    # passes: pins that zarr's own gcsfs instance (made by xarray from a URL) drops its listings on cloudio's writes
    from rasters import gcsfs_options

    url = f"{gcs_bucket}/plain.zarr"
    so = gcsfs_options(gcs_emulator)
    cloudio.to_zarr(xr.Dataset({"a": ("x", np.arange(4))}), url, mode="w", consolidated=False)
    assert list(xr.open_zarr(url, storage_options=so, consolidated=False).data_vars) == ["a"]
    cloudio.to_zarr(xr.Dataset({"b": ("x", np.arange(4) * 2)}), url, mode="a", consolidated=False)
    back = xr.open_zarr(url, storage_options=so, consolidated=False)
    assert sorted(back.data_vars) == ["a", "b"] and list(back.b.values) == [0, 2, 4, 6]
