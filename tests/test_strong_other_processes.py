"""Writes made by another process, read here at the ``"strong"`` level (and the reverse).

The other writer is always a separate Python process (plain google-cloud-storage,
gcsfs, zarr or xarray, never cloudio unless said), writing to the emulator.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable

import numpy as np
import pytest

import cloudio
from cloudio.emulator import Emulator

zarr_warnings = pytest.mark.filterwarnings("ignore:Consolidated metadata is currently not part:UserWarning")


def _dataset(name: str = "a", rows: int = 4) -> object:
    import xarray as xr

    return xr.Dataset({name: (("y", "x"), np.arange(rows * 4.0).reshape(rows, 4))},
                      coords={"y": np.arange(rows), "x": np.arange(4)})


# --------------------------------------------------------------------------------------------
# Zarr / xarray
# --------------------------------------------------------------------------------------------


@zarr_warnings
def test_strong_open_zarr_after_other_process_removed_a_variable(gcs_bucket: str,
                                                                  other_writer: Callable[[str], None]) -> None:
    """Another process deletes variable ``b`` (all its objects, as ``gsutil rm -r`` would) from a
    consolidated store. At strong, "group membership comes from a fresh listing": ``b`` must be gone."""
    import xarray as xr

    url = f"{gcs_bucket}/rm.zarr"
    cloudio.to_zarr(_dataset(), url, mode="w")
    cloudio.to_zarr(xr.Dataset({"b": (("y", "x"), np.ones((4, 4)))}), url, mode="a")
    assert sorted(cloudio.open_zarr(url).data_vars) == ["a", "b"]
    other_writer("""
        import gcsfs
        gcsfs.GCSFileSystem(**SO).rm(f"{BUCKET}/rm.zarr/b", recursive=True)
    """)
    with cloudio.session("strong"):
        ds = cloudio.open_zarr(url)
        assert sorted(ds.data_vars) == ["a"], ds


@zarr_warnings
def test_strong_open_zarr_after_resize_then_group_attrs_rewritten(gcs_bucket: str,
                                                                   other_writer: Callable[[str], None]) -> None:
    """Another process appends two rows to ``a`` without consolidating, then sets an attribute on the
    root group (zarr rewrites the root ``zarr.json`` carrying its old consolidated copy). The copy's
    object is now newer than ``a/zarr.json`` but its content is older: strong must still show 6 rows."""
    url = f"{gcs_bucket}/attrs.zarr"
    cloudio.to_zarr(_dataset(), url, mode="w")
    assert cloudio.open_zarr(url)["a"].shape == (4, 4)
    other_writer("""
        import zarr
        g = zarr.open_group(f"gs://{BUCKET}/attrs.zarr", mode="r+", storage_options=SO, use_consolidated=False)
        g["a"].append(np.full((2, 4), 99.0))
        g["y"].append(np.array([4, 5]))
        g2 = zarr.open_group(f"gs://{BUCKET}/attrs.zarr", mode="r+", storage_options=SO)
        g2.attrs["note"] = "touched"
    """)
    with cloudio.session("strong"):
        ds = cloudio.open_zarr(url)
        assert ds.attrs.get("note") == "touched"
        assert ds["a"].shape == (6, 4)
        np.testing.assert_array_equal(ds["a"].values[4:], np.full((2, 4), 99.0))


# --------------------------------------------------------------------------------------------
# GDAL
# --------------------------------------------------------------------------------------------


def test_strong_open_renews_a_dataset_opened_before_another_process_overwrote(gcs_bucket: str,
                                                                              gcs_emulator: Emulator) -> None:
    from rasters import put, tif

    url = f"{gcs_bucket}/g/held.tif"
    put(gcs_emulator, url, tif(1))
    held = cloudio.open(url)
    try:
        assert held.read(1).max() == 1
        from rasters import run_python

        r = run_python(f"""
            from google.cloud import storage
            from google.auth.credentials import AnonymousCredentials
            import os, rasterio
            from rasterio.io import MemoryFile
            import numpy as np
            with MemoryFile() as mem:
                with mem.open(driver="GTiff", width=64, height=64, count=1, dtype="uint8", tiled=True,
                              blockxsize=16, blockysize=16) as ds:
                    ds.write(np.full((1, 64, 64), 2, "uint8"))
                data = bytes(mem.read())
            c = storage.Client(project="o", credentials=AnonymousCredentials(),
                               client_options={{"api_endpoint": os.environ["STORAGE_EMULATOR_HOST"]}})
            c.bucket({url.removeprefix("gs://").split("/", 1)[0]!r}).blob("g/held.tif").upload_from_string(data)
        """, gcs_emulator)
        assert r.returncode == 0, r.stderr[-2000:]
        with cloudio.session("strong"), cloudio.open(url) as ds:
            assert ds.read(1).max() == 2
        # the strong check found the change: the dataset opened before it reads the new version
        assert held.read(1).max() == 2
    finally:
        held.close()


def test_strong_vrt_source_deleted_by_another_process(gcs_bucket: str, gcs_emulator: Emulator,
                                                      other_writer: Callable[[str], None]) -> None:
    from rasters import put, tif, vrt_xml

    bucket = gcs_bucket.removeprefix("gs://").split("/", 1)[0]
    src = f"{gcs_bucket}/g/s.tif"
    put(gcs_emulator, src, tif(1))
    vrt = f"{gcs_bucket}/h/s.vrt"
    put(gcs_emulator, vrt, vrt_xml(f"/vsigs/{bucket}/g/s.tif"))
    with cloudio.open(vrt) as ds:
        assert ds.read(1).max() == 1
    other_writer("bucket.blob('g/s.tif').delete()")
    with cloudio.session("strong"):
        with pytest.raises(cloudio.CloudioError, match="s.tif"):
            with cloudio.open(vrt) as ds:
                ds.read(1)


def test_strong_vrt_source_deleted_after_a_nested_vrt_was_read(gcs_bucket: str, gcs_emulator: Emulator,
                                                                other_writer: Callable[[str], None]) -> None:
    """After a nested VRT was read (and its leaf invalidated), GDAL no longer fails a VRT whose source is gone:
    it reads 0 in its place. At the strong level cloudio has just listed the source and found it missing: it
    says so itself."""
    from rasters import nested_vrt, put, tif, vrt_xml

    outer, leaf = nested_vrt(gcs_emulator, gcs_bucket)
    with cloudio.open(outer) as ds:
        assert ds.read(1).max() == 1
    put(gcs_emulator, leaf, tif(2))
    cloudio.invalidate(leaf)
    with cloudio.open(outer) as ds:
        assert ds.read(1).max() == 2
    bucket = gcs_bucket.removeprefix("gs://").split("/", 1)[0]
    src = f"{gcs_bucket}/k/s.tif"
    put(gcs_emulator, src, tif(1))
    vrt = f"{gcs_bucket}/m/s.vrt"
    put(gcs_emulator, vrt, vrt_xml(f"/vsigs/{bucket}/k/s.tif"))
    with cloudio.open(vrt) as ds:
        assert ds.read(1).max() == 1
    other_writer("bucket.blob('k/s.tif').delete()")
    with cloudio.session("strong"), pytest.raises(cloudio.ObjectNotFoundError,
                                                  match=r"m/s\.vrt: its source .*k/s\.tif"):
        with cloudio.open(vrt) as ds:
            ds.read(1)


@pytest.mark.parametrize("sharded", [False, True])
def test_strong_load_array_after_other_process_rewrote_chunks_in_place(gcs_bucket: str,
                                                                       other_writer: Callable[[str], None],
                                                                       sharded: bool) -> None:
    """An array written here; another process rewrites part of its chunks in place (same zarr.json,
    other compressed sizes). load_array at strong reads the new values."""
    url = f"{gcs_bucket}/inplace.zarr"
    data = np.zeros((64, 64), "float64")
    cloudio.save_array(data, url, chunks=(16, 16), shards=(32, 32) if sharded else None)
    np.testing.assert_array_equal(cloudio.load_array(url), data)
    other_writer("""
        import zarr
        a = zarr.open_array(f"gs://{BUCKET}/inplace.zarr", mode="r+", storage_options=SO)
        a[:40, :40] = np.random.default_rng(3).random((40, 40))
    """)
    expected = data.copy()
    expected[:40, :40] = np.random.default_rng(3).random((40, 40))
    with cloudio.session("strong"):
        np.testing.assert_array_equal(cloudio.load_array(url), expected)


@zarr_warnings
def test_strong_open_zarr_after_other_process_appended_along_y(gcs_bucket: str,
                                                               other_writer: Callable[[str], None]) -> None:
    url = f"{gcs_bucket}/app.zarr"
    cloudio.to_zarr(_dataset(), url, mode="w")
    first = cloudio.open_zarr(url)
    assert first["a"].shape == (4, 4)
    other_writer("""
        import xarray as xr
        ds = xr.Dataset({"a": (("y", "x"), np.full((3, 4), 7.0))}, coords={"y": [4, 5, 6], "x": np.arange(4)})
        ds.to_zarr(f"gs://{BUCKET}/app.zarr", append_dim="y", storage_options=SO)
        new = xr.Dataset({"c": (("y", "x"), np.full((7, 4), 3.0))})
        new.to_zarr(f"gs://{BUCKET}/app.zarr", mode="a", storage_options=SO)
    """)
    with cloudio.session("strong"):
        ds = cloudio.open_zarr(url)
        assert sorted(ds.data_vars) == ["a", "c"]
        np.testing.assert_array_equal(ds["y"].values, np.arange(7))
        np.testing.assert_array_equal(ds["a"].values[4:], np.full((3, 4), 7.0))
        np.testing.assert_array_equal(ds["c"].values, np.full((7, 4), 3.0))


CHILD = """
import sys, json
import numpy as np
import cloudio
url, d, zurl = sys.argv[1], sys.argv[2], sys.argv[3]
fs = cloudio.filesystem(url)
out = {}
with cloudio.open(url) as ds:
    out["before_pixel"] = int(ds.read(1).max())
out["before_ls"] = sorted(fs.ls(d, detail=False))
out["before_vars"] = sorted(cloudio.open_zarr(zurl).data_vars)
print("ready", flush=True)
sys.stdin.readline()
with cloudio.session("strong"):
    with cloudio.open(url) as ds:
        out["pixel"] = int(ds.read(1).max())
        out["shape"] = list(ds.shape)
    out["ls"] = sorted(fs.ls(d, detail=False))
    out["vars"] = sorted(cloudio.open_zarr(zurl).data_vars)
print(json.dumps(out), flush=True)
"""


@zarr_warnings
def test_child_process_reads_this_process_writes_at_strong(gcs_bucket: str, gcs_emulator: Emulator) -> None:
    """The reverse: a child (cloudio, session level) caches a raster, a listing and a store; this process
    writes through cloudio; the child at strong sees all of it."""
    import json

    import xarray as xr

    url = f"{gcs_bucket}/rev/a.tif"
    zurl = f"{gcs_bucket}/rev.zarr"
    root = gcs_bucket.removeprefix("gs://")
    profile = dict(driver="GTiff", width=64, height=64, count=1, dtype="uint8")
    with cloudio.open(url, "w", **profile) as ds:
        ds.write(np.full((1, 64, 64), 1, "uint8"))
    cloudio.to_zarr(_dataset(), zurl, mode="w")
    env = {**os.environ, "STORAGE_EMULATOR_HOST": gcs_emulator.url}
    p = subprocess.Popen([sys.executable, "-c", CHILD, url, f"{root}/rev", zurl], env=env, text=True,
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert p.stdout is not None and p.stdin is not None
        line = p.stdout.readline()
        assert line.strip() == "ready", (line, p.stderr.read() if p.poll() is not None else "")
        with cloudio.open(url, "w", **{**profile, "width": 32, "height": 32}) as ds:
            ds.write(np.full((1, 32, 32), 9, "uint8"))
        cloudio.filesystem(url).pipe(f"{gcs_bucket}/rev/new.bin", b"x")
        cloudio.to_zarr(xr.Dataset({"b": (("y", "x"), np.ones((4, 4)))}), zurl, mode="a")
        out, err = p.communicate("go\n", timeout=180)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0, err[-3000:]
    got = json.loads(out.strip().splitlines()[-1])
    assert got["before_pixel"] == 1 and got["before_vars"] == ["a"]
    assert got["pixel"] == 9 and got["shape"] == [32, 32]
    assert got["ls"] == [f"{root}/rev/a.tif", f"{root}/rev/new.bin"]
    assert got["vars"] == ["a", "b"]


def test_strong_open_in_a_bucket_another_process_deleted(gcs_bucket: str, gcs_emulator: Emulator,
                                                         other_writer: Callable[[str], None]) -> None:
    from rasters import put, tif

    url = f"{gcs_bucket}/g/gone.tif"
    put(gcs_emulator, url, tif(1))
    with cloudio.open(url) as ds:
        assert ds.read(1).max() == 1
    other_writer("""
        for b in bucket.list_blobs():
            b.delete()
        bucket.delete()
    """)
    with cloudio.session("strong"), pytest.raises(cloudio.BucketNotFoundError, match=gcs_bucket.removeprefix("gs://")):
        cloudio.open(url)
