"""write_vrt and GDAL writes through cloudio.open(..., "w" | "w+" | "r+"): odd keys, overviews, masks, updates."""

from __future__ import annotations

import uuid
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import rasterio
from affine import Affine
from rasterio.enums import Resampling
from rasterio.vrt import WarpedVRT
from rasters import mosaic_vrt as _simple_vrt
from rasters import run_python as _run

import cloudio
from cloudio._journal import journal
from cloudio._paths import parse_gcs
from cloudio.emulator import Emulator

GRID = Affine(10, 0, 500000, 0, -10, 4000000)
PROFILE = dict(driver="GTiff", width=64, height=64, count=1, dtype="uint16",
               crs="EPSG:32633", transform=GRID, nodata=0)


def _data(seed: int, size: int = 64) -> np.ndarray:
    return (np.random.default_rng(seed).integers(1, 60000, (1, size, size))).astype("uint16")


def _write(url: str, data: np.ndarray, **kw) -> None:
    prof = {**PROFILE, "width": data.shape[2], "height": data.shape[1], **kw}
    with cloudio.open(url, "w", **prof) as ds:
        ds.write(data)


def _stored(emu: Emulator, url: str) -> bytes:
    p = parse_gcs(url)
    return emu.client.bucket(p.bucket).blob(p.key).download_as_bytes()


def _sources(xml: bytes) -> list[str]:
    return [el.text or "" for el in ET.fromstring(xml).iter() if el.tag in ("SourceFilename", "SourceDataset")]


# ---------------------------------------------------------------------------------------------
# mosaics, other buckets, relative paths
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# write_vrt: datasets still being written, relative paths, odd keys, VRTs of VRTs
# ---------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::rasterio.errors.RasterioDeprecationWarning")
def test_warped_vrt_of_a_dataset_still_open_for_writing(gcs_emulator: Emulator, gcs_bucket: str) -> None:
    src_url, vrt_url = f"{gcs_bucket}/w/src.tif", f"{gcs_bucket}/w/src_4326.vrt"
    data = _data(7)
    with cloudio.open(src_url, "w+", **PROFILE) as dst:
        dst.write(data)
        with WarpedVRT(dst, crs="EPSG:4326", resampling=Resampling.nearest) as vrt:
            expected, transform = vrt.read(), vrt.transform
            cloudio.write_vrt(vrt, vrt_url)
    assert _sources(_stored(gcs_emulator, vrt_url)) == [parse_gcs(src_url).vsi]
    with cloudio.open(vrt_url) as back:
        assert back.crs.to_epsg() == 4326 and back.transform.almost_equals(transform)
        assert (back.read() == expected).all()


@pytest.mark.parametrize(("src_key", "vrt_key"), [
    ("sp ace/a b.tif", "o ut/a b 4326.vrt"),
    ("ü/ünï cödé.tif", "ö/ü 4326.vrt"),
    ("h/k#1.tif", "h2/k#1.vrt"),
    ("q/k?x=1.tif", "q2/k?x=1.vrt"),
    ("amp/a&b<c>.tif", "amp/a&b.vrt"),
    ("pc/a%2Fb%20c.tif", "pc2/a%2F.vrt"),
    ("plus/a+b.tif", "plus/a+b.vrt"),
])
def test_warped_vrt_round_trip_with_odd_keys(gcs_emulator: Emulator, gcs_bucket: str, src_key: str,
                                             vrt_key: str) -> None:
    src_url, vrt_url = f"{gcs_bucket}/{src_key}", f"{gcs_bucket}/{vrt_key}"
    data = _data(9)
    _write(src_url, data)
    with cloudio.open(src_url) as src, WarpedVRT(src, crs="EPSG:4326") as vrt:
        expected, transform = vrt.read(), vrt.transform
        assert cloudio.write_vrt(vrt, vrt_url) == vrt_url
    assert _sources(_stored(gcs_emulator, vrt_url)) == [parse_gcs(src_url).vsi]
    with cloudio.open(vrt_url) as back:
        assert back.transform.almost_equals(transform) and (back.read() == expected).all()
    r = _run(f"""
        import cloudio
        with cloudio.open({vrt_url!r}) as ds:
            print(int(ds.read().astype('int64').sum()))
    """, gcs_emulator)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == str(int(expected.astype("int64").sum()))


def test_vrt_of_a_vrt_sees_its_leaf_overwritten(gcs_emulator: Emulator, gcs_bucket: str) -> None:
    leaf, inner, outer = f"{gcs_bucket}/a/leaf.tif", f"{gcs_bucket}/b/inner.vrt", f"{gcs_bucket}/c/outer.vrt"
    _write(leaf, _data(10))
    with cloudio.open(leaf) as src:
        cloudio.write_vrt(src, inner)
    with cloudio.open(inner) as v:
        cloudio.write_vrt(v, outer)
    with cloudio.open(outer) as o:
        assert (o.read() == _data(10)).all()
    _write(leaf, _data(11))
    with cloudio.open(outer) as o:
        assert (o.read() == _data(11)).all()
    r = _run(f"""
        import cloudio
        with cloudio.open({outer!r}) as ds:
            print(int(ds.read().astype('int64').sum()))
    """, gcs_emulator)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == str(int(_data(11).astype("int64").sum()))


def test_vrt_reopened_after_its_source_changed_layout_while_another_vrt_is_open(
        gcs_emulator: Emulator, gcs_bucket: str) -> None:
    keep, src = f"{gcs_bucket}/p/keep.tif", f"{gcs_bucket}/p/src.tif"
    _write(keep, _data(12))
    _write(src, _data(13))
    xml_keep = _simple_vrt([(keep, 0, 0)])
    xml_src = _simple_vrt([(src, 0, 0)])
    keep_vrt = cloudio.write_vrt(xml_keep, f"{gcs_bucket}/p/keep.vrt")
    src_vrt = cloudio.write_vrt(xml_src, f"{gcs_bucket}/p/src.vrt")
    with cloudio.open(keep_vrt) as held:
        held.read()
        with cloudio.open(src_vrt) as v:
            assert (v.read() == _data(13)).all()
        # the same pixels' region, another layout: striped, not tiled, a larger file
        new = _data(14, 128)
        _write(src, new, tiled=False)
        with cloudio.open(src_vrt) as v:
            assert (v.read()[0] == new[0, :64, :64]).all()


# ---------------------------------------------------------------------------------------------
# writes: overviews, masks, r+ updates
# ---------------------------------------------------------------------------------------------


def _overview(url: str, factor: int = 4) -> np.ndarray:
    with cloudio.open(url) as ds:
        assert ds.overviews(1) == [2, 4]
        return ds.read(1, out_shape=(ds.height // factor, ds.width // factor), resampling=Resampling.nearest)


def _write_with_overviews(url: str, value: int, **env: str) -> None:
    with rasterio.Env(**env):
        with cloudio.open(url, "w", **{**PROFILE, "width": 256, "height": 256}) as ds:
            ds.write(np.full((1, 256, 256), value, "uint16"))
            ds.build_overviews([2, 4], Resampling.nearest)
            ds.update_tags(ns="rio_overview", resampling="nearest")


@pytest.mark.parametrize("env", [{}, {"TIFF_USE_OVR": "YES"}], ids=["internal", "external_ovr"])
def test_overviews_built_on_write_are_never_stale(gcs_emulator: Emulator, gcs_bucket: str, env) -> None:
    url = f"{gcs_bucket}/o/a.tif"
    _write_with_overviews(url, 1, **env)
    assert (_overview(url) == 1).all()
    _write_with_overviews(url, 2, **env)
    assert (_overview(url) == 2).all()
    # then a version without overviews: none may be read with it
    _write(url, np.full((1, 256, 256), 3, "uint16"))
    with cloudio.open(url) as ds:
        assert ds.overviews(1) == []
        assert (ds.read(1, out_shape=(64, 64)) == 3).all()


def test_r_plus_rebuilds_overviews(gcs_emulator: Emulator, gcs_bucket: str) -> None:
    url = f"{gcs_bucket}/o/u.tif"
    _write_with_overviews(url, 1)
    assert (_overview(url) == 1).all()
    with cloudio.open(url, "r+") as ds:
        ds.write(np.full((1, 256, 256), 5, "uint16"))
        ds.build_overviews([2, 4], Resampling.nearest)
    assert (_overview(url) == 5).all()


@pytest.mark.parametrize("internal", ["YES", "NO"])
def test_masks_written_and_replaced(gcs_emulator: Emulator, gcs_bucket: str, internal: str) -> None:
    url = f"{gcs_bucket}/k/m.tif"
    mask = np.zeros((64, 64), "uint8")
    mask[:32] = 255
    with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=internal):
        with cloudio.open(url, "w", **{**PROFILE, "nodata": None}) as ds:
            ds.write(_data(20))
            ds.write_mask(mask)
    with cloudio.open(url) as ds:
        assert (ds.dataset_mask() == mask).all()
    mask2 = np.zeros((64, 64), "uint8")
    mask2[:, :16] = 255
    with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=internal):
        with cloudio.open(url, "w", **{**PROFILE, "nodata": None}) as ds:
            ds.write(_data(21))
            ds.write_mask(mask2)
    with cloudio.open(url) as ds:
        assert (ds.dataset_mask() == mask2).all()
    _write(url, _data(22), nodata=None)  # no mask at all now
    with cloudio.open(url) as ds:
        assert (ds.dataset_mask() == 255).all()


def test_r_plus_updates_pixels_metadata_nodata_and_georeferencing(gcs_emulator: Emulator, gcs_bucket: str) -> None:
    url = f"{gcs_bucket}/u/a.tif"
    _write(url, _data(30))
    reader = cloudio.open(url)  # open across the update
    assert (reader.read() == _data(30)).all()
    new_grid = Affine(20, 0, 100000, 0, -20, 5000000)
    with cloudio.open(url, "r+") as ds:
        ds.write(_data(31)[:, :32, :32], window=((0, 32), (0, 32)))
    expected = _data(30)
    expected[:, :32, :32] = _data(31)[:, :32, :32]
    try:
        assert (reader.read() == expected).all()
    finally:
        reader.close()
    with cloudio.open(url, "r+") as ds:
        ds.nodata = 7
        ds.transform = new_grid
        ds.crs = "EPSG:32634"
        ds.update_tags(review="yes")
        ds.update_tags(1, band_tag="b")
    with cloudio.open(url) as ds:
        assert (ds.read() == expected).all()
        assert ds.nodata == 7 and ds.transform == new_grid and ds.crs.to_epsg() == 32634
        assert ds.tags()["review"] == "yes" and ds.tags(1)["band_tag"] == "b"
    r = _run(f"""
        import cloudio
        with cloudio.open({url!r}) as ds:
            print(int(ds.read().astype('int64').sum()), ds.nodata, tuple(ds.transform)[:6], ds.crs.to_epsg(),
                  ds.tags()["review"])
    """, gcs_emulator)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split()[0] == str(int(expected.astype("int64").sum()))
    assert "32634" in r.stdout and "yes" in r.stdout and "7.0" in r.stdout


def test_vrt_sees_r_plus_update_of_its_source(gcs_emulator: Emulator, gcs_bucket: str) -> None:
    src, vrt = f"{gcs_bucket}/s/a.tif", f"{gcs_bucket}/s/a_4326.vrt"
    _write(src, _data(40))
    with cloudio.open(src) as s, WarpedVRT(s, crs="EPSG:4326", resampling=Resampling.nearest) as w:
        cloudio.write_vrt(w, vrt)
    with cloudio.open(vrt) as v:
        first = v.read()
    with cloudio.open(src, "r+") as ds:
        ds.write(_data(41))
    with cloudio.open(src) as s, WarpedVRT(s, crs="EPSG:4326", resampling=Resampling.nearest) as w:
        expected = w.read()
    assert not (expected == first).all()
    with cloudio.open(vrt) as v:
        assert (v.read() == expected).all()


# ---------------------------------------------------------------------------------------------
# if_generation_match, the journal, other caches
# ---------------------------------------------------------------------------------------------


def test_write_vrt_if_generation_match(gcs_emulator: Emulator, gcs_bucket: str) -> None:
    src, vrt = f"{gcs_bucket}/g/a.tif", f"{gcs_bucket}/g/a.vrt"
    _write(src, _data(50))
    seq = journal().seq
    cloudio.write_vrt(src, vrt, if_generation_match=0)
    recs = journal().since(seq)
    assert [(c.url, c.kind) for c in recs] == [(vrt, "write")]
    p = parse_gcs(vrt)
    blob = gcs_emulator.client.bucket(p.bucket).get_blob(p.key)
    first = blob.download_as_bytes()
    seq = journal().seq
    with cloudio.open(src) as s, WarpedVRT(s, crs="EPSG:4326") as w:
        with pytest.raises(cloudio.ConflictError) as ei:
            cloudio.write_vrt(w, vrt, if_generation_match=0)
        assert vrt in str(ei.value)
        with pytest.raises(cloudio.ConflictError):
            cloudio.write_vrt(w, vrt, if_generation_match=blob.generation + 12345)
        assert journal().since(seq) == []
        assert _stored(gcs_emulator, vrt) == first
        cloudio.write_vrt(w, vrt, if_generation_match=blob.generation)
    with cloudio.open(vrt) as v:
        assert v.crs.to_epsg() == 4326


def test_open_w_if_generation_match_with_sidecars(gcs_emulator: Emulator, gcs_bucket: str) -> None:
    url = f"{gcs_bucket}/g/o.tif"
    _write_with_overviews(url, 1, TIFF_USE_OVR="YES")
    p = parse_gcs(url)
    gen = gcs_emulator.client.bucket(p.bucket).get_blob(p.key).generation
    seq = journal().seq
    with pytest.raises(cloudio.ConflictError) as ei:
        with rasterio.Env(TIFF_USE_OVR="YES"):
            with cloudio.open(url, "w", if_generation_match=gen + 1, **{**PROFILE, "width": 256, "height": 256}) as ds:
                ds.write(np.full((1, 256, 256), 2, "uint16"))
                ds.build_overviews([2, 4], Resampling.nearest)
    assert url in str(ei.value)
    assert journal().since(seq) == []
    assert (_overview(url) == 1).all()
    with rasterio.Env(TIFF_USE_OVR="YES"):
        with cloudio.open(url, "w", if_generation_match=gen, **{**PROFILE, "width": 256, "height": 256}) as ds:
            ds.write(np.full((1, 256, 256), 2, "uint16"))
            ds.build_overviews([2, 4], Resampling.nearest)
    assert (_overview(url) == 2).all()


def test_user_gcsfs_instance_sees_writes_at_once(gcs_emulator: Emulator, gcs_bucket: str) -> None:
    import gcsfs

    fs = gcsfs.GCSFileSystem(endpoint_url=gcs_emulator.url, token="anon")
    folder = f"{gcs_bucket[5:]}/f"
    url = f"{gcs_bucket}/f/a.tif"
    _write_with_overviews(url, 1, TIFF_USE_OVR="YES")
    assert sorted(n.rsplit("/", 1)[1] for n in fs.ls(folder)) == ["a.tif", "a.tif.ovr"]
    vrt = cloudio.write_vrt(url, f"{gcs_bucket}/f/a.vrt")
    assert sorted(n.rsplit("/", 1)[1] for n in fs.ls(folder)) == ["a.tif", "a.tif.ovr", "a.vrt"]
    short = fs.info(vrt)["size"]
    with cloudio.open(url) as s, WarpedVRT(s, crs="EPSG:4326") as w:
        cloudio.write_vrt(w, vrt)  # a longer XML
    with fs.open(vrt, "rb") as f:
        body = f.read()
    assert body == _stored(gcs_emulator, vrt) and len(body) > short
    _write(url, np.full((1, 256, 256), 3, "uint16"))  # no overviews: the old .ovr is deleted
    assert sorted(n.rsplit("/", 1)[1] for n in fs.ls(folder)) == ["a.tif", "a.vrt"]
    assert fs.info(url)["size"] == len(_stored(gcs_emulator, url))


def test_write_vrt_errors_name_the_url(gcs_emulator: Emulator, gcs_bucket: str, tmp_path) -> None:
    src = f"{gcs_bucket}/e/a.tif"
    _write(src, _data(60))
    url = f"{gcs_bucket}/e/x.vrt"
    ds = cloudio.open(src)
    ds.close()
    with pytest.raises(cloudio.ConfigurationError, match=url):
        cloudio.write_vrt(ds, url)
    with cloudio.open(f"{gcs_bucket}/e/b.tif", "w", **PROFILE) as w:
        w.write(_data(61))
        with pytest.raises(cloudio.ConfigurationError, match=url):
            cloudio.write_vrt(w, url)
    with pytest.raises(cloudio.BucketNotFoundError) as ei:
        cloudio.write_vrt(src, f"gs://no-such-bucket-{uuid.uuid4().hex[:8]}/x.vrt")
    assert "no-such-bucket" in str(ei.value)
    with pytest.raises(cloudio.ObjectNotFoundError) as e2:
        cloudio.write_vrt(f"{gcs_bucket}/e/missing.tif", url)
    assert "missing.tif" in str(e2.value)
    with rasterio.MemoryFile() as mem:
        with mem.open(**PROFILE) as m:
            m.write(_data(62))
        with mem.open() as m:
            with pytest.raises(cloudio.InvalidURLError, match=url):
                cloudio.write_vrt(m, url)
    p = parse_gcs(url)
    assert gcs_emulator.client.bucket(p.bucket).get_blob(p.key) is None


def test_write_vrt_of_a_stored_vrt_with_relative_sources(gcs_emulator: Emulator, gcs_bucket: str) -> None:
    """A VRT another tool stored with paths relative to itself, saved elsewhere through write_vrt."""
    data = _data(70)
    _write(f"{gcs_bucket}/a/src.tif", data)
    p = parse_gcs(f"{gcs_bucket}/a/rel.vrt")
    gcs_emulator.client.bucket(p.bucket).blob(p.key).upload_from_string(
        _simple_vrt([("src.tif", 0, 0)], relative=True))
    cloudio.invalidate(p.url)
    with cloudio.open(p.url) as ds:
        assert (ds.read() == data).all()
    out = cloudio.write_vrt(p.url, f"{gcs_bucket}/elsewhere/deep/copy.vrt")
    assert _sources(_stored(gcs_emulator, out)) == [f"/vsigs/{p.bucket}/a/src.tif"]
    with cloudio.open(out) as ds:
        assert (ds.read() == data).all()


def test_write_journals_object_sidecars_and_deletes(gcs_emulator: Emulator, gcs_bucket: str, journal_records) -> None:
    url = f"{gcs_bucket}/j/a.tif"
    _write_with_overviews(url, 1, TIFF_USE_OVR="YES")
    assert [(c.url, c.kind) for c in journal_records] == [(url, "write"), (url + ".ovr", "write")]
    del journal_records[:]
    _write(url, np.full((1, 256, 256), 2, "uint16"))
    assert [(c.url, c.kind) for c in journal_records] == [(url, "write"), (url + ".ovr", "delete")]
    with cloudio.open(url) as ds:
        assert ds.overviews(1) == [] and (ds.read() == 2).all()


