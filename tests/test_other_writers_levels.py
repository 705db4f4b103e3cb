"""Readers through cloudio while something else writes (other processes, plain libraries), level by level.

Each test writes behind cloudio's back (google-cloud-storage from this process,
nothing journaled, or a second process) and checks what each level promises
in docs/consistency.md.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from rasters import external_overview, nested_vrt, vrt_xml
from rasters import gcsfs_options as _so
from rasters import put as _put
from rasters import small_dataset as _dataset

import cloudio
from cloudio.emulator import Emulator


def _key(url: str) -> tuple[str, str]:
    bucket, key = url[len("gs://"):].split("/", 1)
    return bucket, key


def _delete(emu: Emulator, url: str) -> None:
    bucket, key = _key(url)
    emu.client.bucket(bucket).blob(key).delete()


# --------------------------------------------------------------------------------------------
# fsspec
# --------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------
# GDAL: VRTs and sidecars
# --------------------------------------------------------------------------------------------


def test_strong_plain_vrt_source_overwritten(gcs_bucket: str, gcs_emulator: Emulator) -> None:
    from rasters import tif

    src = f"{gcs_bucket}/g/src.tif"
    _put(gcs_emulator, src, tif(1))
    vrt = f"{gcs_bucket}/h/plain.vrt"
    _put(gcs_emulator, vrt, vrt_xml(f"/vsigs/{_key(src)[0]}/g/src.tif"))
    with cloudio.open(vrt) as ds:
        assert ds.read(1).max() == 1
    _put(gcs_emulator, src, tif(2))  # same size and layout
    with cloudio.session("strong"), cloudio.open(vrt) as ds:
        assert ds.read(1).max() == 2


def test_strong_vrt_xml_replaced_to_point_elsewhere(gcs_bucket: str, gcs_emulator: Emulator) -> None:
    from rasters import tif

    bucket = _key(gcs_bucket + "/x")[0]
    _put(gcs_emulator, f"{gcs_bucket}/g/one.tif", tif(1))
    _put(gcs_emulator, f"{gcs_bucket}/g/two.tif", tif(2))
    vrt = f"{gcs_bucket}/h/v.vrt"
    _put(gcs_emulator, vrt, vrt_xml(f"/vsigs/{bucket}/g/one.tif"))
    with cloudio.session("strong"), cloudio.open(vrt) as ds:
        assert ds.read(1).max() == 1
    _put(gcs_emulator, vrt, vrt_xml(f"/vsigs/{bucket}/g/two.tif"))
    with cloudio.session("strong"), cloudio.open(vrt) as ds:
        assert ds.read(1).max() == 2


def _mask_sidecar(tmp_path: os.PathLike[str], value: int) -> bytes:
    import rasterio
    from rasters import tif

    local = os.path.join(os.fspath(tmp_path), f"m{value}.tif")
    with open(local, "wb") as f:
        f.write(tif(5))
    with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=False), rasterio.open(local, "r+") as ds:
        ds.write_mask(np.full((64, 64), value, "uint8"))
    with open(local + ".msk", "rb") as f:
        return f.read()


def test_strong_msk_sidecar_added_and_removed(gcs_bucket: str, gcs_emulator: Emulator, tmp_path) -> None:
    from rasters import tif

    url = f"{gcs_bucket}/g/m.tif"
    _put(gcs_emulator, url, tif(5))
    with cloudio.session("strong"), cloudio.open(url) as ds:
        assert ds.dataset_mask().min() == 255
    _put(gcs_emulator, url + ".msk", _mask_sidecar(tmp_path, 0))
    with cloudio.session("strong"), cloudio.open(url) as ds:
        assert ds.dataset_mask().max() == 0
    _delete(gcs_emulator, url + ".msk")
    with cloudio.session("strong"), cloudio.open(url) as ds:
        assert ds.dataset_mask().min() == 255


def test_strong_world_file_added(gcs_bucket: str, gcs_emulator: Emulator) -> None:
    from rasters import tif

    url = f"{gcs_bucket}/g/w.tif"
    _put(gcs_emulator, url, tif(5))
    with cloudio.session("strong"), cloudio.open(url) as ds:
        before = ds.transform
    _put(gcs_emulator, f"{gcs_bucket}/g/w.tfw", b"10\n0\n0\n-10\n500005\n3999995\n")
    with cloudio.session("strong"), cloudio.open(url) as ds:
        assert ds.transform.a == 10 and ds.transform != before


# --------------------------------------------------------------------------------------------
# Zarr: the session level with cloudio.invalidate
# --------------------------------------------------------------------------------------------

zarr_warnings = pytest.mark.filterwarnings("ignore:Consolidated metadata is currently not part:UserWarning")


@zarr_warnings
@pytest.mark.filterwarnings("ignore:Failed to open Zarr store with consolidated metadata:RuntimeWarning")
def test_session_invalidate_after_variable_added_without_reconsolidating(gcs_bucket: str,
                                                                         gcs_emulator: Emulator) -> None:
    import gcsfs
    import xarray as xr

    url = f"{gcs_bucket}/s.zarr"
    cloudio.to_zarr(_dataset(), url, mode="w")
    assert list(cloudio.open_zarr(url).data_vars) == ["a"]
    other = gcsfs.GCSFileSystem(**_so(gcs_emulator), skip_instance_cache=True)
    xr.Dataset({"b": (("y", "x"), np.ones((4, 4)))}).to_zarr(other.get_mapper(url), mode="a", consolidated=False)
    cloudio.invalidate(url)
    with cloudio.session("session"):
        assert sorted(cloudio.open_zarr(url).data_vars) == ["a", "b"]


def _retyped_behind_consolidated(url: str, emu: Emulator) -> None:
    """Another writer (plain zarr) replaces array ``a`` by one of another dtype of the same itemsize, and
    does not consolidate again: the consolidated copy still describes the old array."""
    import zarr

    group = zarr.open_group(url, mode="r+", storage_options=_so(emu), use_consolidated=False)
    old = group["a"]
    attrs = {k: v for k, v in old.attrs.items() if k != "_FillValue"}
    new = group.create_array("a", shape=old.shape, dtype="int64", chunks=old.chunks, overwrite=True,
                             dimension_names=("y", "x"), attributes=attrs)
    new[...] = np.arange(100, 116, dtype="int64").reshape(4, 4)


@zarr_warnings
def test_strong_open_zarr_never_decodes_new_chunks_with_old_metadata(gcs_bucket: str,
                                                                      gcs_emulator: Emulator) -> None:
    url = f"{gcs_bucket}/s.zarr"
    cloudio.to_zarr(_dataset(), url, mode="w")
    _retyped_behind_consolidated(url, gcs_emulator)
    with cloudio.session("strong"):
        a = cloudio.open_zarr(url)["a"].values
    np.testing.assert_array_equal(a, np.arange(100, 116).reshape(4, 4))


# --------------------------------------------------------------------------------------------
# things expected to hold (checked)
# --------------------------------------------------------------------------------------------


def test_strong_and_bounded_raster_overwritten_with_another_size(gcs_bucket: str, gcs_emulator: Emulator) -> None:
    import time

    from rasters import tif

    url = f"{gcs_bucket}/g/r.tif"
    _put(gcs_emulator, url, tif(1))
    with cloudio.open(url) as ds:
        assert ds.read(1).max() == 1
    _put(gcs_emulator, url, tif(2, size=128))
    with cloudio.session("strong"), cloudio.open(url) as ds:
        assert ds.shape == (128, 128) and ds.read(1).min() == 2
    _put(gcs_emulator, url, tif(3, size=96))
    with cloudio.session(3600), cloudio.open(url) as ds:
        assert ds.shape == (128, 128)  # checked just now: trusted
    time.sleep(1.2)
    with cloudio.session(1), cloudio.open(url) as ds:
        assert ds.shape == (96, 96) and ds.read(1).min() == 3
    _delete(gcs_emulator, url)
    with cloudio.session("strong"), pytest.raises(cloudio.ObjectNotFoundError):
        cloudio.open(url)


def test_tensorstore_rewrites_an_array_cloudio_wrote(gcs_bucket: str, gcs_emulator: Emulator,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    ts = pytest.importorskip("tensorstore")
    url = f"{gcs_bucket}/t.zarr"
    cloudio.save_array(np.arange(10, dtype="int32"), url)
    np.testing.assert_array_equal(cloudio.load_array(url), np.arange(10))
    spec = {"driver": "zarr3", "kvstore": f"{url}/",
            "context": {"gcs_request_retries": {"max_retries": 1}}}
    monkeypatch.setenv("TENSORSTORE_GCS_HTTP_URL", gcs_emulator.url)
    monkeypatch.setenv("GOOGLE_AUTH_TOKEN_FOR_TESTING", "anon")
    arr = ts.open(spec, open=True).result()
    arr[...] = np.arange(100, 110, dtype="int32")
    for level in ("session", "strong", 0):
        with cloudio.session(level):
            np.testing.assert_array_equal(cloudio.load_array(url), np.arange(100, 110))
    new = ts.open({**spec, "metadata": {"shape": [12], "data_type": "int32",
                                        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [5]}}}},
                  create=True, delete_existing=True).result()
    new[...] = np.arange(200, 212, dtype="int32")
    for level in ("session", "strong", 0):
        with cloudio.session(level):
            np.testing.assert_array_equal(cloudio.load_array(url), np.arange(200, 212))


@pytest.mark.parametrize("announce", ["object", "sidecar", "prefix", "prefix-no-slash"])
def test_session_invalidate_announces_a_new_overview(gcs_bucket: str, gcs_emulator: Emulator, tmp_path,
                                                     announce: str) -> None:
    from rasters import tif

    url = f"{gcs_bucket}/g/a.tif"
    data = tif(3)
    _put(gcs_emulator, url, data)
    with cloudio.open(url) as ds:
        assert ds.overviews(1) == []
    _put(gcs_emulator, url + ".ovr", external_overview(data, tmp_path))
    cloudio.invalidate({"object": url, "sidecar": url + ".ovr", "prefix": f"{gcs_bucket}/g/",
                        "prefix-no-slash": f"{gcs_bucket}/g"}[announce])
    with cloudio.open(url) as ds:
        assert ds.overviews(1) == [2]
    _delete(gcs_emulator, url + ".ovr")
    cloudio.invalidate({"object": url, "sidecar": url + ".ovr", "prefix": f"{gcs_bucket}/g/",
                        "prefix-no-slash": f"{gcs_bucket}/g"}[announce])
    with cloudio.open(url) as ds:
        assert ds.overviews(1) == []


def test_strong_fsspec_prefix_emptied_and_sizes(gcs_bucket: str, gcs_emulator: Emulator) -> None:
    fs = cloudio.filesystem(gcs_bucket)
    root = gcs_bucket.removeprefix("gs://")
    fs.pipe({f"{gcs_bucket}/e/sub/a.bin": b"a" * 3, f"{gcs_bucket}/e/b.bin": b"b" * 4})
    assert fs.isdir(f"{root}/e/sub") and fs.du(f"{root}/e") == 7
    fs.ls(f"{root}/e", detail=True)
    fs.find(f"{root}/e")
    _delete(gcs_emulator, f"{gcs_bucket}/e/sub/a.bin")
    _put(gcs_emulator, f"{gcs_bucket}/e/b.bin", b"b" * 40)
    with cloudio.session("strong"):
        assert not fs.exists(f"{root}/e/sub")
        assert not fs.isdir(f"{root}/e/sub")
        assert fs.du(f"{root}/e") == 40
        assert [(e["name"], e["size"]) for e in fs.ls(f"{root}/e", detail=True)] == [(f"{root}/e/b.bin", 40)]
        assert fs.cat(f"{gcs_bucket}/e/b.bin") == b"b" * 40


@pytest.mark.parametrize("level", ["strong", 0])
def test_zarr_group_on_zarr_store_sees_new_array(gcs_bucket: str, gcs_emulator: Emulator, level: object) -> None:
    import zarr

    url = f"{gcs_bucket}/grp.zarr"
    g = zarr.open_group(cloudio.zarr_store(url), mode="w")
    g.create_array("x", shape=(4,), dtype="i4")[...] = 1
    assert sorted(zarr.open_group(cloudio.zarr_store(url), mode="r", use_consolidated=False).array_keys()) == ["x"]
    other = zarr.open_group(url, mode="r+", storage_options=_so(gcs_emulator), use_consolidated=False)
    other.create_array("y", shape=(4,), dtype="i4")[...] = 2
    del other["x"]
    with cloudio.session(level):
        g2 = zarr.open_group(cloudio.zarr_store(url), mode="r", use_consolidated=False)
        assert sorted(g2.array_keys()) == ["y"]
        np.testing.assert_array_equal(g2["y"][...], [2, 2, 2, 2])


@zarr_warnings
def test_strong_v2_consolidated_store_variable_added(gcs_bucket: str, gcs_emulator: Emulator) -> None:
    import xarray as xr

    url = f"{gcs_bucket}/v2.zarr"
    cloudio.to_zarr(_dataset(), url, mode="w", zarr_format=2)
    assert list(cloudio.open_zarr(url).data_vars) == ["a"]
    xr.Dataset({"b": (("y", "x"), np.ones((4, 4)))}).to_zarr(url, mode="a", consolidated=False, zarr_format=2,
                                                            storage_options=_so(gcs_emulator))
    with cloudio.session("strong"):
        assert sorted(cloudio.open_zarr(url).data_vars) == ["a", "b"]


def test_other_cloudio_process_overwrites_a_raster(gcs_bucket: str, gcs_emulator: Emulator) -> None:
    import subprocess
    import sys

    url = f"{gcs_bucket}/p/a.tif"
    with cloudio.open(url, "w", driver="GTiff", width=64, height=64, count=1, dtype="uint8") as ds:
        ds.write(np.full((1, 64, 64), 1, "uint8"))
    with cloudio.open(url) as ds:
        assert ds.read(1).max() == 1
    code = (f"import numpy as np, cloudio\n"
            f"with cloudio.open({url!r}, 'w', driver='GTiff', width=32, height=32, count=1, dtype='uint8') as ds:\n"
            f"    ds.write(np.full((1, 32, 32), 7, 'uint8'))\n")
    r = subprocess.run([sys.executable, "-c", code], env=dict(os.environ), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    with cloudio.session("strong"), cloudio.open(url) as ds:
        assert ds.shape == (32, 32) and ds.read(1).max() == 7


def test_session_invalidate_of_a_nested_vrt_leaf(gcs_bucket: str, gcs_emulator: Emulator) -> None:
    from rasters import tif

    outer, src = nested_vrt(gcs_emulator, gcs_bucket)
    with cloudio.open(outer) as ds:
        assert ds.read(1).max() == 1
    _put(gcs_emulator, src, tif(2))
    cloudio.invalidate(src)
    with cloudio.open(outer) as ds:
        assert ds.read(1).max() == 2
