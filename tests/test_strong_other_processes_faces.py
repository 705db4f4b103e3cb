"""Reads at the "strong" level after another process changed the objects: GDAL (relative and nested VRT sources,
overviews and masks added or replaced), every fsspec listing and read, and Zarr (rewrites with another dtype,
shape or format, deleted variables, appends in a group). A review found no stale read; these pin it.

Each test first reads (and so caches) the old state in this process, then a
second Python process changes the objects, then this process reads at
"strong" and must see the new state (docs/consistency.md, "strong").
"""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np
import pytest
from rasters import run_python, tif

import cloudio
from cloudio.emulator import Emulator

zarr_warnings = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::RuntimeWarning",
                                           "ignore::FutureWarning")


def _cloudio_process(code: str, emu: Emulator, bucket_url: str) -> None:
    """Run ``code`` in a second process that uses cloudio (BUCKET = gs://bucket)."""
    r = run_python(f"BUCKET = {bucket_url!r}\n" + __import__("textwrap").dedent(code), emu)
    assert r.returncode == 0, r.stderr[-3000:]


def _upload(other_writer: Callable[[str], None], key: str, data: bytes, tmp_path: os.PathLike[str]) -> None:
    local = os.path.join(os.fspath(tmp_path), "up.bin")
    with open(local, "wb") as f:
        f.write(data)
    other_writer(f"bucket.blob({key!r}).upload_from_filename({local!r})")


def _aux(value: str) -> bytes:
    return f'<PAMDataset><Metadata><MDI key="VERSION">{value}</MDI></Metadata></PAMDataset>'.encode()


# --------------------------------------------------------------------------------------------
# GDAL
# --------------------------------------------------------------------------------------------


# passes: pins the strong level against another process's change
def test_strong_relative_vrt_source_replaced(gcs_bucket: str, other_writer, tmp_path) -> None:
    url = f"{gcs_bucket}/r/v.vrt"
    _upload(other_writer, "r/s.tif", tif(1), tmp_path)
    xml = (b'<VRTDataset rasterXSize="64" rasterYSize="64"><VRTRasterBand dataType="Byte" band="1">'
           b'<SimpleSource><SourceFilename relativeToVRT="1">s.tif</SourceFilename><SourceBand>1</SourceBand>'
           b'</SimpleSource></VRTRasterBand></VRTDataset>')
    _upload(other_writer, "r/v.vrt", xml, tmp_path)
    with cloudio.open(url) as ds:
        assert ds.read(1).max() == 1
    _upload(other_writer, "r/s.tif", tif(2), tmp_path)
    with cloudio.session("strong"), cloudio.open(url) as ds:
        assert ds.read(1).max() == 2


# passes: pins the strong level against another process's change
def test_strong_nested_vrt_leaf_overwritten(gcs_bucket: str, gcs_emulator: Emulator, other_writer,
                                            tmp_path) -> None:
    from rasters import nested_vrt

    outer, _src = nested_vrt(gcs_emulator, gcs_bucket)
    with cloudio.open(outer) as ds:
        assert ds.read(1).max() == 1
    _upload(other_writer, "g/src.tif", tif(2), tmp_path)
    with cloudio.session("strong"), cloudio.open(outer) as ds:
        assert ds.read(1).max() == 2


# passes: pins the strong level against another process's change
def test_strong_raster_without_extension_ovr_added(gcs_bucket: str, other_writer, tmp_path) -> None:
    from rasters import external_overview

    data = tif(3)
    url = f"{gcs_bucket}/n/raster"
    _upload(other_writer, "n/raster", data, tmp_path)
    with cloudio.session("strong"), cloudio.open(url) as ds:
        assert ds.overviews(1) == []
    _upload(other_writer, "n/raster.ovr", external_overview(data, tmp_path), tmp_path)
    with cloudio.session("strong"), cloudio.open(url) as ds:
        assert ds.overviews(1) == [2]


# passes: pins the strong level against another process's change
def test_strong_raster_written_here_then_overwritten_by_other_cloudio(gcs_bucket: str,
                                                                      gcs_emulator: Emulator) -> None:
    from rasters import write8

    url = f"{gcs_bucket}/g/mine.tif"
    write8(url, 1)
    with cloudio.open(url) as ds:
        assert ds.read(1).max() == 1
    _cloudio_process(f"""
        import sys; sys.path.insert(0, {os.path.dirname(__file__)!r})
        from rasters import write8
        write8(BUCKET + "/g/mine.tif", 2, size=32)
    """, gcs_emulator, gcs_bucket)
    with cloudio.session("strong"), cloudio.open(url) as ds:
        assert ds.shape == (32, 32)
        assert ds.read(1).max() == 2


# passes: pins the strong level against another process's change
def test_strong_vrt_ovr_added(gcs_bucket: str, other_writer, tmp_path) -> None:
    """An ``.ovr`` for a VRT (``v.vrt.ovr``) added by another process."""
    from rasters import external_overview, vrt_xml

    bucket = gcs_bucket.removeprefix("gs://")
    _upload(other_writer, "o/s.tif", tif(4), tmp_path)
    _upload(other_writer, "o/v.vrt", vrt_xml(f"/vsigs/{bucket}/o/s.tif"), tmp_path)
    url = f"{gcs_bucket}/o/v.vrt"
    with cloudio.session("strong"), cloudio.open(url) as ds:
        assert ds.overviews(1) == []
    _upload(other_writer, "o/v.vrt.ovr", external_overview(tif(4), tmp_path), tmp_path)
    with cloudio.session("strong"), cloudio.open(url) as ds:
        assert ds.overviews(1) == [2]


# --------------------------------------------------------------------------------------------
# fsspec
# --------------------------------------------------------------------------------------------


# passes: pins the strong level against another process's change
def test_strong_fsspec_faces_after_other_process(gcs_bucket: str, other_writer) -> None:
    root = gcs_bucket.removeprefix("gs://")
    fs = cloudio.filesystem(gcs_bucket)
    fs.pipe(f"{root}/f/a.bin", b"a" * 10)
    fs.pipe(f"{root}/f/sub/b.bin", b"b" * 10)
    assert fs.ls(f"{root}/f", detail=False)
    assert sorted(fs.find(f"{root}/f")) == [f"{root}/f/a.bin", f"{root}/f/sub/b.bin"]
    assert fs.info(f"{root}/f/a.bin")["size"] == 10
    assert fs.glob(f"{root}/f/**/*.bin")
    assert fs.cat(f"{root}/f/a.bin") == b"a" * 10
    other_writer("""
        bucket.blob('f/a.bin').upload_from_string(b'A' * 20)
        bucket.blob('f/sub/b.bin').delete()
        bucket.blob('f/sub/deep/c.bin').upload_from_string(b'c')
        bucket.blob('f/new.bin').upload_from_string(b'n')
    """)
    with cloudio.session("strong"):
        assert fs.info(f"{root}/f/a.bin")["size"] == 20
        assert fs.size(f"{root}/f/a.bin") == 20
        assert fs.cat(f"{root}/f/a.bin") == b"A" * 20
        with fs.open(f"{root}/f/a.bin", "rb") as f:
            assert f.read() == b"A" * 20
        assert not fs.exists(f"{root}/f/sub/b.bin")
        assert sorted(fs.ls(f"{root}/f", detail=False)) == [f"{root}/f/a.bin", f"{root}/f/new.bin",
                                                            f"{root}/f/sub"]
        assert sorted(fs.find(f"{root}/f")) == [f"{root}/f/a.bin", f"{root}/f/new.bin",
                                                f"{root}/f/sub/deep/c.bin"]
        assert sorted(fs.glob(f"{root}/f/**/*.bin")) == [f"{root}/f/a.bin", f"{root}/f/new.bin",
                                                         f"{root}/f/sub/deep/c.bin"]
        assert fs.isdir(f"{root}/f/sub/deep")
        assert sorted(fs.ls(f"{root}/f/sub", detail=False)) == [f"{root}/f/sub/deep"]


# --------------------------------------------------------------------------------------------
# Zarr
# --------------------------------------------------------------------------------------------


# passes: pins the strong level against another process's change
@zarr_warnings
def test_strong_open_zarr_after_other_rewrote_with_other_dtype_and_shape(gcs_bucket: str, other_writer) -> None:
    from rasters import small_dataset

    url = f"{gcs_bucket}/dt.zarr"
    cloudio.to_zarr(small_dataset(), url, mode="w")
    ds = cloudio.open_zarr(url)
    assert ds["a"].dtype == np.float64 and ds["a"].shape == (4, 4)
    ds["a"].values
    other_writer("""
        import xarray as xr
        ds = xr.Dataset({"a": (("y", "x"), np.arange(12, dtype="int16").reshape(6, 2))},
                        coords={"y": np.arange(6), "x": np.arange(2)})
        ds.to_zarr(f"gs://{BUCKET}/dt.zarr", mode="w", storage_options=SO)
    """)
    with cloudio.session("strong"):
        ds = cloudio.open_zarr(url)
        assert ds["a"].dtype == np.int16
        assert ds["a"].shape == (6, 2)
        np.testing.assert_array_equal(ds["a"].values, np.arange(12).reshape(6, 2))


# passes: pins the strong level against another process's change
@zarr_warnings
def test_strong_load_array_after_other_cloudio_rewrote(gcs_bucket: str, gcs_emulator: Emulator) -> None:
    url = f"{gcs_bucket}/arr.zarr"
    cloudio.save_array(np.ones((8, 8), "float32"), url, chunks=(4, 4))
    assert cloudio.load_array(url).sum() == 64
    _cloudio_process("""
        import numpy as np, cloudio
        cloudio.save_array(np.full((8, 8), 2, "float32"), BUCKET + "/arr.zarr", chunks=(4, 4))
    """, gcs_emulator, gcs_bucket)
    with cloudio.session("strong"):
        a = cloudio.load_array(url)
        assert a.sum() == 128
    _cloudio_process("""
        import numpy as np, cloudio
        cloudio.save_array(np.full((4, 6), 3, "int32"), BUCKET + "/arr.zarr", chunks=(2, 2))
    """, gcs_emulator, gcs_bucket)
    with cloudio.session("strong"):
        a = cloudio.load_array(url)
        assert a.shape == (4, 6) and a.dtype == np.int32 and int(a.sum()) == 72


# passes: pins the strong level against another process's change
@zarr_warnings
def test_strong_open_zarr_group_variable_deleted(gcs_bucket: str, gcs_emulator: Emulator, other_writer) -> None:
    import xarray as xr
    from rasters import small_dataset

    url = f"{gcs_bucket}/grp.zarr"
    cloudio.to_zarr(small_dataset(), url, mode="w", group="g")
    cloudio.to_zarr(xr.Dataset({"b": (("y", "x"), np.ones((4, 4)))}), url, mode="a", group="g")
    assert sorted(cloudio.open_zarr(url, group="g").data_vars) == ["a", "b"]
    other_writer("""
        import gcsfs
        gcsfs.GCSFileSystem(**SO).rm(f"{BUCKET}/grp.zarr/g/b", recursive=True)
    """)
    with cloudio.session("strong"):
        assert sorted(cloudio.open_zarr(url, group="g").data_vars) == ["a"]


# passes: pins the strong level against another process's change
@zarr_warnings
def test_strong_open_zarr_v3_replaced_by_v2(gcs_bucket: str, other_writer) -> None:
    from rasters import small_dataset

    url = f"{gcs_bucket}/fmt.zarr"
    cloudio.to_zarr(small_dataset(), url, mode="w")
    assert cloudio.open_zarr(url)["a"].shape == (4, 4)
    other_writer("""
        import gcsfs, xarray as xr
        gcsfs.GCSFileSystem(**SO).rm(f"{BUCKET}/fmt.zarr", recursive=True)
        ds = xr.Dataset({"a": (("y", "x"), np.full((5, 4), 7.0))}, coords={"y": np.arange(5), "x": np.arange(4)})
        ds.to_zarr(f"gs://{BUCKET}/fmt.zarr", mode="w", zarr_format=2, storage_options=SO)
    """)
    with cloudio.session("strong"):
        ds = cloudio.open_zarr(url)
        assert ds["a"].shape == (5, 4)
        assert float(ds["a"].values[0, 0]) == 7.0


# passes: pins the strong level against another process's change
@zarr_warnings
def test_strong_open_zarr_consolidated_true_after_resize(gcs_bucket: str, other_writer) -> None:
    from rasters import small_dataset

    url = f"{gcs_bucket}/ct.zarr"
    cloudio.to_zarr(small_dataset(), url, mode="w")
    assert cloudio.open_zarr(url, consolidated=True)["a"].shape == (4, 4)
    other_writer("""
        import zarr
        g = zarr.open_group(f"gs://{BUCKET}/ct.zarr", mode="r+", storage_options=SO, use_consolidated=False)
        g["a"].append(np.full((2, 4), 9.0))
        g["y"].append(np.array([4, 5]))
    """)
    with cloudio.session("strong"):
        assert cloudio.open_zarr(url, consolidated=True)["a"].shape == (6, 4)


# passes: pins the strong level against another process's change
@zarr_warnings
def test_strong_open_zarr_store_deleted(gcs_bucket: str, other_writer) -> None:
    from rasters import small_dataset

    url = f"{gcs_bucket}/gone.zarr"
    cloudio.to_zarr(small_dataset(), url, mode="w")
    assert cloudio.open_zarr(url)["a"].shape == (4, 4)
    assert cloudio.load_array(url + "/a").shape == (4, 4)
    other_writer("""
        import gcsfs
        gcsfs.GCSFileSystem(**SO).rm(f"{BUCKET}/gone.zarr", recursive=True)
    """)
    with cloudio.session("strong"):
        with pytest.raises(FileNotFoundError):
            cloudio.open_zarr(url)
        with pytest.raises(FileNotFoundError):
            cloudio.load_array(url + "/a")


# passes: pins the strong level against another process's change
@zarr_warnings
def test_strong_open_zarr_group_appended_by_plain_xarray(gcs_bucket: str, other_writer) -> None:
    from rasters import small_dataset

    url = f"{gcs_bucket}/ga.zarr"
    cloudio.to_zarr(small_dataset(), url, mode="w", group="g")
    assert cloudio.open_zarr(url, group="g")["a"].shape == (4, 4)
    other_writer("""
        import xarray as xr
        ds = xr.Dataset({"a": (("y", "x"), np.full((3, 4), 8.0))}, coords={"y": np.arange(4, 7), "x": np.arange(4)})
        ds.to_zarr(f"gs://{BUCKET}/ga.zarr", group="g", append_dim="y", storage_options=SO)
    """)
    with cloudio.session("strong"):
        ds = cloudio.open_zarr(url, group="g")
        assert ds["a"].shape == (7, 4)


# passes: pins the strong level against another process's change
def test_strong_ovr_added_to_a_vrt_source_gdal_listed(gcs_bucket: str, other_writer, tmp_path) -> None:
    """GDAL listed ``q/`` itself (opening a VRT's source); then another process adds ``q/s.tif.ovr``."""
    from rasters import external_overview, vrt_xml

    bucket = gcs_bucket.removeprefix("gs://")
    data = tif(4)
    _upload(other_writer, "q/s.tif", data, tmp_path)
    _upload(other_writer, "h/v.vrt", vrt_xml(f"/vsigs/{bucket}/q/s.tif"), tmp_path)
    with cloudio.open(f"{gcs_bucket}/h/v.vrt") as ds:
        assert ds.read(1).max() == 4
    with cloudio.open(f"{gcs_bucket}/q/s.tif") as ds:
        assert ds.overviews(1) == []
    _upload(other_writer, "q/s.tif.ovr", external_overview(data, tmp_path), tmp_path)
    with cloudio.session("strong"), cloudio.open(f"{gcs_bucket}/q/s.tif") as ds:
        assert ds.overviews(1) == [2]


# passes: pins the strong level against another process's change
def test_strong_fsspec_more_faces(gcs_bucket: str, other_writer) -> None:
    root = gcs_bucket.removeprefix("gs://")
    fs = cloudio.filesystem(gcs_bucket)
    fs.pipe(f"{root}/m/a.bin", b"a")
    fs.pipe(f"{root}/m/b.bin", b"b")
    assert sorted(fs.glob(f"{root}/m/*")) == [f"{root}/m/a.bin", f"{root}/m/b.bin"]
    assert fs.cat(f"{root}/m/*") == {f"{root}/m/a.bin": b"a", f"{root}/m/b.bin": b"b"}
    assert not fs.exists(f"{root}/m/newdir")
    assert fs.isfile(f"{root}/m/b.bin")
    other_writer("""
        bucket.blob('m/b.bin').delete()
        bucket.blob('m/c.bin').upload_from_string(b'c')
        bucket.blob('m/newdir/x').upload_from_string(b'x')
    """)
    with cloudio.session("strong"):
        assert sorted(fs.glob(f"{root}/m/*")) == [f"{root}/m/a.bin", f"{root}/m/c.bin", f"{root}/m/newdir"]
        assert fs.cat(f"{root}/m/*.bin") == {f"{root}/m/a.bin": b"a", f"{root}/m/c.bin": b"c"}
        assert fs.exists(f"{root}/m/newdir")
        assert fs.isdir(f"{root}/m/newdir")
        assert not fs.isfile(f"{root}/m/b.bin")
        with pytest.raises(FileNotFoundError):
            fs.open(f"{root}/m/b.bin", "rb").read()
        with pytest.raises(FileNotFoundError):
            fs.info(f"{root}/m/b.bin")


# passes: pins the strong level against another process's change
def test_strong_msk_replaced_elsewhere_after_write_here(gcs_bucket: str, gcs_emulator: Emulator,
                                                        other_writer, tmp_path) -> None:
    from rasters import write_half_masked

    url = f"{gcs_bucket}/k/hr.tif"
    write_half_masked(url, 3)
    with cloudio.open(url) as ds:
        assert ds.dataset_mask()[63, 0] == 0
    # another process (cloudio there) writes the same raster with the mask flipped
    _cloudio_process(f"""
        import sys; sys.path.insert(0, {os.path.dirname(__file__)!r})
        import numpy as np, rasterio, cloudio
        from affine import Affine
        from rasters import PROFILE
        profile = {{**PROFILE, "transform": Affine(*PROFILE["transform"])}}
        with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=False):
            with cloudio.open(BUCKET + "/k/hr.tif", "w", **profile) as ds:
                ds.write(np.full((1, 64, 64), 4, "uint8"))
                m = np.zeros((64, 64), "uint8")
                m[32:] = 255
                ds.write_mask(m)
    """, gcs_emulator, gcs_bucket)
    with cloudio.session("strong"), cloudio.open(url) as ds:
        assert ds.read(1).max() == 4
        m = ds.dataset_mask()
        assert m[0, 0] == 0 and m[63, 0] == 255
