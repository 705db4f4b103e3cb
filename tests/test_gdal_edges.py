"""The GDAL face at the edges: sidecar names, long keys, failed overwrites, path options, georeferencing, names."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio
from affine import Affine
from faultproxy import FaultProxy
from rasters import object_names, profile8, tif, write8, write_half_masked

import cloudio
from cloudio import _config
from cloudio.emulator import Emulator

PROFILE = profile8()


def _value(url: str) -> int:
    with cloudio.open(url) as ds:
        a = ds.read()
        assert a.min() == a.max(), (url, a.min(), a.max())
        return int(a[0, 0, 0])


# -- write: sidecars GDAL names after the temporary file ----------------------------------------


def test_world_file_is_uploaded_under_the_objects_name(gcs_emulator: Emulator, gcs_bucket: str) -> None:
    """GTiff with TFW=YES writes ``dataset.tfw`` next to the temp file; it must become ``a.tfw``."""
    url = f"{gcs_bucket}/d/a.tif"
    write8(url, 1, tfw="YES")
    keys = object_names(gcs_emulator, gcs_bucket)
    assert "d/dataset.tfw" not in keys, keys
    assert "d/a.tfw" in keys, keys


def test_header_sidecar_of_a_multi_file_format_reads_back(gcs_emulator: Emulator, gcs_bucket: str) -> None:
    """EHdr keeps its header in ``<stem>.hdr``: written as ``a.bil``, the header must be ``a.hdr``."""
    url = f"{gcs_bucket}/d/a.bil"
    write8(url, 7, driver="EHdr")
    keys = object_names(gcs_emulator, gcs_bucket)
    assert _value(url) == 7, keys


# -- write_vrt: a long last segment --------------------------------------------------------------


def test_write_vrt_with_a_300_byte_last_segment(gcs_emulator: Emulator, gcs_bucket: str) -> None:
    """cloudio.open(.., "w") handles a 300-byte last segment; write_vrt must too (or raise a CloudioError)."""
    src = f"{gcs_bucket}/d/src.tif"
    write8(src, 4)
    url = f"{gcs_bucket}/d/{'v' * 296}.vrt"
    try:
        out = cloudio.write_vrt(src, url)
    except cloudio.CloudioError:
        return
    assert _value(out) == 4


# -- failed overwrite: the old dataset's sidecars ------------------------------------------------


def test_failed_overwrite_keeps_the_old_sidecar(gcs_emulator: Emulator, gcs_bucket: str) -> None:
    """An overwrite whose main upload fails must leave the old dataset as it was (its .msk included)."""
    url = f"{gcs_bucket}/d/a.tif"
    write_half_masked(url, 1)
    keys = object_names(gcs_emulator, gcs_bucket)
    assert "d/a.tif.msk" in keys, keys
    with cloudio.open(url) as r:
        before = r.dataset_mask()
    assert before[:32].all() and not before[32:].any()
    # the new version's own upload is refused (403); its .msk sidecar, uploaded first, goes through
    with FaultProxy(gcs_emulator.url) as proxy:
        proxy.add("status", code=403, method="POST", path=r"/upload/", body=rb'"name": ?"d/a\.tif"', times=None)
        _config.push_endpoint(proxy.url)
        try:
            with pytest.raises(cloudio.CloudioError) as err:
                with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=False):
                    with cloudio.open(url, "w", **PROFILE) as ds:
                        ds.write(np.full((1, 64, 64), 2, "uint8"))
                        ds.write_mask(np.full((64, 64), 255, "uint8"))
        finally:
            _config.pop_endpoint()
    assert isinstance(err.value, cloudio.UploadError)
    with cloudio.open(url) as r:
        assert int(r.read()[0, 0, 0]) == 1  # the old raster is still there...
        after = r.dataset_mask()
    assert "d/a.tif.msk" in object_names(gcs_emulator, gcs_bucket), "the old dataset's .msk was deleted"
    assert (after == before).all(), "the old dataset lost its mask"


# -- EMPTY_DIR set on a name reaches objects in a directory whose name extends it ----------------


def test_empty_dir_option_does_not_reach_a_later_directory(gcs_emulator: Emulator, gcs_bucket: str,
                                                           tmp_path) -> None:  # type: ignore[no-untyped-def]
    """``d/a`` (no sidecars) opened: EMPTY_DIR on /vsigs/b/d/a. Then ``d/ab/x.tif`` and its .ovr are
    written through cloudio: opening x.tif must see its overview."""
    a = f"{gcs_bucket}/d/a"
    write8(a, 1, driver="GTiff")
    assert _value(a) == 1  # without this open, the test passes: EMPTY_DIR on /vsigs/b/d/a is the cause
    p = tmp_path / "x.tif"
    p.write_bytes(tif(5, 64))
    with rasterio.Env(TIFF_USE_OVR=True):
        with rasterio.open(p, "r+") as ds:
            ds.build_overviews([2], rasterio.enums.Resampling.nearest)
    fs = cloudio.filesystem(gcs_bucket)
    x = f"{gcs_bucket}/d/ab/x.tif"
    fs.pipe(x + ".ovr", (tmp_path / "x.tif.ovr").read_bytes())
    fs.pipe(x, p.read_bytes())
    with cloudio.open(x) as ds:
        assert ds.overviews(1) == [2]


# -- a dataset open across an overwrite: pixels of one version, georeferencing of another ---------


def test_read_after_overwrite_never_pairs_new_pixels_with_old_georeferencing(gcs_bucket: str) -> None:
    """Same size, bands, dtype and blocks, but another transform, CRS and nodata: a read through the old
    dataset must not silently return the new pixels while the dataset still reports the old georeferencing."""
    url = f"{gcs_bucket}/d/a.tif"
    t1, t2 = Affine(10, 0, 500000, 0, -10, 4000000), Affine(30, 0, 0, 0, -30, 0)
    with cloudio.open(url, "w", **{**PROFILE, "transform": t1, "nodata": 0}) as w:
        w.write(np.full((1, 64, 64), 1, "uint8"))
    with cloudio.open(url) as ds:
        assert ds.transform == t1
        with cloudio.open(url, "w", **{**PROFILE, "crs": "EPSG:4326", "transform": t2, "nodata": 255}) as w:
            w.write(np.full((1, 64, 64), 2, "uint8"))
        try:
            a = ds.read(1)
        except cloudio.StaleDatasetError:
            return  # refusing is fine
        # reading the new pixels is fine only if the dataset describes the new version too
        assert (int(a[0, 0]), ds.transform, ds.crs, ds.nodata) == (2, t2, rasterio.CRS.from_epsg(4326), 255), (
            int(a[0, 0]), ds.transform, ds.crs, ds.nodata)


# -- error classes decided from GDAL's message, which contains the object's name -------------------


@pytest.mark.parametrize("name", ["preset.tif", "kassler.tif"])
def test_non_raster_whose_name_looks_transient_is_a_read_error(gcs_bucket: str, name: str) -> None:
    url = f"{gcs_bucket}/d/{name}"
    cloudio.filesystem(url).pipe(url, b"not a raster at all\n" * 10)
    with pytest.raises(cloudio.CloudioError) as info:
        cloudio.open(url)
    assert isinstance(info.value, cloudio.ReadError), (type(info.value).__mro__, str(info.value))
    assert not isinstance(info.value, cloudio.TransientError), str(info.value)


# -- "w" replaces a dataset whole: the old version's sidecars go, as GDAL's own Create deletes them --


def test_overwrite_drops_the_old_mask_sidecar(gcs_emulator: Emulator, gcs_bucket: str) -> None:
    """A version written with a ``.msk`` replaced by one without: reads must not mask the new pixels
    with the old version's mask (locally, GDAL's Create deletes the old ``.msk`` first)."""
    url = f"{gcs_bucket}/d/a.tif"
    with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=False):
        with cloudio.open(url, "w", **PROFILE) as ds:
            ds.write(np.full((1, 64, 64), 1, "uint8"))
            ds.write_mask(np.zeros((64, 64), "uint8"))
    assert "d/a.tif.msk" in object_names(gcs_emulator, gcs_bucket)
    write8(url, 2)
    assert "d/a.tif.msk" not in object_names(gcs_emulator, gcs_bucket)
    with cloudio.open(url) as r:
        assert r.dataset_mask().all(), "the new version is masked by the old version's .msk"


def test_overwrite_drops_the_old_aux_xml_georeferencing(gcs_emulator: Emulator, gcs_bucket: str) -> None:
    """A PNG keeps its georeferencing in ``a.png.aux.xml``; a new version without any must not read
    back with the old one's CRS and transform."""
    url = f"{gcs_bucket}/d/a.png"
    write8(url, 1, driver="PNG")
    assert "d/a.png.aux.xml" in object_names(gcs_emulator, gcs_bucket)
    with cloudio.open(url, "w", driver="PNG", width=64, height=64, count=1, dtype="uint8") as ds:
        ds.write(np.full((1, 64, 64), 2, "uint8"))
    with cloudio.open(url) as r:
        assert int(r.read()[0, 0, 0]) == 2
        assert r.crs is None, f"the new PNG reads back with the old version's CRS {r.crs}"
    assert "d/a.png.aux.xml" not in object_names(gcs_emulator, gcs_bucket)


def test_overwrite_keeps_other_datasets_files(gcs_emulator: Emulator, gcs_bucket: str) -> None:
    """Only the replaced dataset's own sidecars go: not a neighbour whose name starts the same, nor
    another dataset's files of the same stem."""
    write8(f"{gcs_bucket}/d/a.tif", 1, tfw="YES")
    write8(f"{gcs_bucket}/d/a.tif.b.tif", 3)
    write8(f"{gcs_bucket}/d/a.bil", 4, driver="EHdr")
    write8(f"{gcs_bucket}/d/a.tif", 2)
    keys = object_names(gcs_emulator, gcs_bucket)
    assert "d/a.tfw" not in keys, keys  # the old version's world file
    for kept in ("d/a.tif", "d/a.tif.b.tif", "d/a.bil", "d/a.hdr"):
        assert kept in keys, (kept, keys)
    assert _value(f"{gcs_bucket}/d/a.bil") == 4
    assert _value(f"{gcs_bucket}/d/a.tif.b.tif") == 3


def _png_bytes() -> bytes:
    from rasterio.io import MemoryFile

    with MemoryFile() as mem:
        with mem.open(driver="PNG", width=8, height=8, count=1, dtype="uint8") as d:
            d.write(np.ones((1, 8, 8), "uint8"))
        return bytes(mem.read())


def test_overwriting_a_tif_keeps_a_neighbour_pngs_world_file(gcs_emulator: Emulator, gcs_bucket: str) -> None:
    """``d/a.png`` is georeferenced by ``d/a.wld``; ``d/a.tif`` (internal georeferencing) is overwritten
    with "w". GDAL's own Create on a local file keeps a.wld (the old a.tif never read it)."""
    fs = cloudio.filesystem(gcs_bucket)
    with cloudio.open(f"{gcs_bucket}/d/a.tif", "w", **PROFILE) as ds:
        ds.write(np.full((1, 64, 64), 1, "uint8"))
    fs.pipe(f"{gcs_bucket}/d/a.png", _png_bytes())
    fs.pipe(f"{gcs_bucket}/d/a.wld", b"2\n0\n0\n-2\n100\n200\n")
    with cloudio.open(f"{gcs_bucket}/d/a.png") as r:
        assert r.transform == Affine(2, 0, 99, 0, -2, 201)
    with cloudio.open(f"{gcs_bucket}/d/a.tif", "w", **PROFILE) as ds:  # the tif, replaced
        ds.write(np.full((1, 64, 64), 2, "uint8"))
    assert "d/a.wld" in object_names(gcs_emulator, gcs_bucket), "the PNG's world file was deleted"
    with cloudio.open(f"{gcs_bucket}/d/a.png") as r:
        assert r.transform == Affine(2, 0, 99, 0, -2, 201), r.transform


def test_overwrite_without_listing_permission_still_succeeds(gcs_emulator: Emulator, gcs_bucket: str) -> None:
    """A principal that may write (and delete) objects but not list the bucket: the listing for the old
    version's sidecars is refused (403), and the write still succeeds (as cloudio.open's own listing
    copes with a 403)."""
    url = f"{gcs_bucket}/d/new.tif"
    with FaultProxy(gcs_emulator.url) as proxy:
        proxy.add("status", code=403, method="GET", path=r"/o\?.*prefix=", times=None)
        _config.push_endpoint(proxy.url)
        try:
            with cloudio.open(url, "w", **PROFILE) as ds:
                ds.write(np.full((1, 64, 64), 3, "uint8"))
        finally:
            _config.pop_endpoint()
    assert "d/new.tif" in object_names(gcs_emulator, gcs_bucket)
