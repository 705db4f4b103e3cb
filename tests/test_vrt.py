"""``cloudio.write_vrt``: VRTs whose sources open from anywhere, reopenable at once.

The canonical case is rasterio issue 3254 / GDAL issue 11351: a WarpedVRT of
a GeoTIFF saved in the same prefix as its source, after GDAL listed that
prefix, opened again at once in the same process.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET

import numpy as np
import pytest
import rasterio
from affine import Affine
from rasterio.enums import Resampling
from rasterio.vrt import WarpedVRT

import cloudio
from cloudio._gdal.bindings import vsi_readdir
from cloudio._gdal.vrt import absolute_sources
from cloudio._journal import journal
from cloudio._paths import parse_gcs
from cloudio.emulator import Emulator

PROFILE = dict(
    driver="GTiff", width=64, height=64, count=1, dtype="uint16",
    crs="EPSG:32633", transform=Affine(10, 0, 500000, 0, -10, 4000000), nodata=0,
)


def _src(url: str) -> np.ndarray:
    data = (np.arange(64 * 64, dtype="uint16").reshape(1, 64, 64) % 1000) + 1
    data[0, :4, :4] = 0  # some nodata
    with cloudio.open(url, "w", **PROFILE) as ds:
        ds.write(data)
    return data


def _stored_xml(emu: Emulator, url: str) -> ET.Element:
    p = parse_gcs(url)
    return ET.fromstring(emu.client.bucket(p.bucket).blob(p.key).download_as_bytes())


def _sources(root: ET.Element) -> list[tuple[str, str | None]]:
    return [(el.text or "", el.get("relativeToVRT"))
            for el in root.iter() if el.tag in ("SourceFilename", "SourceDataset")]


def test_warped_vrt_round_trip_in_listed_prefix(gcs_emulator: Emulator, gcs_bucket: str) -> None:
    src_url = f"{gcs_bucket}/d/src.tif"
    vrt_url = f"{gcs_bucket}/d/warped.vrt"
    _src(src_url)
    # GDAL lists d/ behind cloudio's back, as any GDAL tool would: warped.vrt is not there yet
    with rasterio.Env(CPL_GS_ENDPOINT=gcs_emulator.url + "/", GS_NO_SIGN_REQUEST="YES"):
        assert vsi_readdir(parse_gcs(src_url).parent.vsi.rstrip("/")) == ["src.tif"]
    seq = journal().seq
    with cloudio.open(src_url) as src:
        with WarpedVRT(src, crs="EPSG:4326", resampling=Resampling.bilinear) as vrt:
            expected = vrt.read()
            shape, crs, transform, nodata = vrt.shape, vrt.crs, vrt.transform, vrt.nodata
            assert cloudio.write_vrt(vrt, vrt_url) == vrt_url
    root = _stored_xml(gcs_emulator, vrt_url)
    assert _sources(root) == [(parse_gcs(src_url).vsi, "0")]
    assert root.find("GDALWarpOptions/ResampleAlg").text == "Bilinear"
    assert [c.url for c in journal().since(seq)] == [vrt_url]
    with cloudio.open(vrt_url) as again:  # at once, same process
        assert again.shape == shape and again.crs == crs and again.nodata == nodata
        assert again.transform.almost_equals(transform)
        assert (again.read() == expected).all()


def test_overwritten_vrt_is_read_afresh(gcs_emulator: Emulator, gcs_bucket: str) -> None:
    src_url = f"{gcs_bucket}/d/src.tif"
    vrt_url = f"{gcs_bucket}/d/w.vrt"
    _src(src_url)
    with cloudio.open(src_url) as src:
        with WarpedVRT(src, crs="EPSG:4326") as vrt:
            cloudio.write_vrt(vrt, vrt_url)
        with cloudio.open(vrt_url) as first:  # GDAL now holds the first XML
            assert first.crs == rasterio.CRS.from_epsg(4326)
        with WarpedVRT(src, crs="EPSG:3857", resampling=Resampling.nearest) as vrt:
            expected, shape = vrt.read(), vrt.shape
            cloudio.write_vrt(vrt, vrt_url)
    with cloudio.open(vrt_url) as second:
        assert second.crs == rasterio.CRS.from_epsg(3857) and second.shape == shape
        assert (second.read() == expected).all()


def test_plain_dataset_becomes_vrt_with_vsigs_sources(gcs_emulator: Emulator, gcs_bucket: str) -> None:
    src_url = f"{gcs_bucket}/a/src.tif"
    data = _src(src_url)
    vrt_url = f"{gcs_bucket}/b/copy.vrt"  # another prefix: a relative path would break
    with cloudio.open(src_url) as src:
        cloudio.write_vrt(src, vrt_url)
    assert _sources(_stored_xml(gcs_emulator, vrt_url)) == [(parse_gcs(src_url).vsi, "0")]
    with cloudio.open(vrt_url) as r:
        assert (r.read() == data).all() and r.crs == PROFILE["crs"] and r.nodata == 0
        assert r.transform == PROFILE["transform"]


def test_url_of_a_dataset(gcs_emulator: Emulator, gcs_bucket: str) -> None:
    src_url = f"{gcs_bucket}/d/src.tif"
    data = _src(src_url)
    out = cloudio.write_vrt(parse_gcs(src_url).vsi, f"/vsigs/{gcs_bucket[5:]}/d/v.vrt")
    assert out == f"{gcs_bucket}/d/v.vrt"
    with cloudio.open(out) as r:
        assert (r.read() == data).all()


def test_absolute_sources_rewrites_every_spelling(tmp_path) -> None:
    xml = """<VRTDataset rasterXSize="1" rasterYSize="1">
      <VRTRasterBand dataType="Byte" band="1">
        <SimpleSource><SourceFilename relativeToVRT="0">gs://bkt/x/a.tif</SourceFilename></SimpleSource>
        <SimpleSource><SourceFilename relativeToVRT="0">/vsigs_streaming/bkt/b.tif</SourceFilename></SimpleSource>
        <SimpleSource><SourceFilename>https://storage.googleapis.com/bkt/c.tif</SourceFilename></SimpleSource>
        <SimpleSource><SourceFilename>/vsicurl/https://storage.googleapis.com/bkt/d.tif</SourceFilename></SimpleSource>
        <SimpleSource><SourceFilename relativeToVRT="1">/vsigs/bkt/e.tif</SourceFilename></SimpleSource>
        <SimpleSource><SourceFilename>/vsizip//vsigs/bkt/f.zip/f.tif</SourceFilename></SimpleSource>
      </VRTRasterBand>
      <GDALWarpOptions><SourceDataset relativeToVRT="0">gs://bkt/w.tif</SourceDataset></GDALWarpOptions>
    </VRTDataset>"""
    out = _sources(ET.fromstring(absolute_sources(xml)))
    assert out == [
        ("/vsigs/bkt/x/a.tif", "0"), ("/vsigs/bkt/b.tif", "0"), ("/vsigs/bkt/c.tif", None),
        ("/vsigs/bkt/d.tif", None), ("/vsigs/bkt/e.tif", "0"), ("/vsizip//vsigs/bkt/f.zip/f.tif", None),
        ("/vsigs/bkt/w.tif", "0"),
    ]


def test_local_sources_are_refused(gcs_emulator: Emulator, gcs_bucket: str, tmp_path) -> None:
    local = tmp_path / "l.tif"
    with rasterio.open(local, "w", **PROFILE) as ds:
        ds.write(np.ones((1, 64, 64), "uint16"))
    url = f"{gcs_bucket}/l.vrt"
    seq = journal().seq
    with rasterio.open(local) as ds:
        with pytest.raises(cloudio.InvalidURLError) as ei:
            cloudio.write_vrt(ds, url)
    assert url in str(ei.value) and str(local) in str(ei.value)
    assert journal().since(seq) == []
    p = parse_gcs(url)
    assert gcs_emulator.client.bucket(p.bucket).get_blob(p.key) is None


def test_relative_source_resolved_against_base_dir(tmp_path) -> None:
    xml = ('<VRTDataset><SimpleSource><SourceFilename relativeToVRT="1">a.tif</SourceFilename>'
           '</SimpleSource></VRTDataset>')
    with pytest.raises(cloudio.InvalidURLError, match=str(tmp_path / "a.tif")):
        absolute_sources(xml, base_dir=str(tmp_path), url="gs://b/x.vrt")


def test_bad_target_url(gcs_emulator: Emulator) -> None:
    with pytest.raises(cloudio.InvalidURLError, match="gs://bkt-only"):
        cloudio.write_vrt("<VRTDataset/>", "gs://bkt-only")


@pytest.mark.characterization
def test_raw_rasterio_cannot_reopen_vrt_in_listed_prefix(gcs_emulator: Emulator, gcs_bucket: str) -> None:
    """The 'before': plain rasterio, the same steps, the VRT uploaded by another client."""
    from rasterio.errors import RasterioIOError

    src_url = f"{gcs_bucket}/d/src.tif"
    _src(src_url)
    env = dict(CPL_GS_ENDPOINT=gcs_emulator.url + "/", GS_NO_SIGN_REQUEST="YES")
    with cloudio.open(src_url) as src:
        with WarpedVRT(src, crs="EPSG:4326") as vrt:
            xml = absolute_sources(_render_xml(vrt))
    with rasterio.Env(**env):
        assert vsi_readdir(parse_gcs(src_url).parent.vsi.rstrip("/")) == ["src.tif"]
        p = parse_gcs(f"{gcs_bucket}/d/warped.vrt")
        gcs_emulator.client.bucket(p.bucket).blob(p.key).upload_from_string(xml)
        with pytest.raises(RasterioIOError, match="does not exist"):
            rasterio.open(p.vsi)


def _render_xml(ds) -> str:  # type: ignore[no-untyped-def]
    import tempfile

    import rasterio.shutil

    with tempfile.TemporaryDirectory() as d:
        rasterio.shutil.copy(ds, f"{d}/x.vrt", driver="VRT")
        with open(f"{d}/x.vrt") as f:
            return f.read()
