"""VRTs whose sources are in other buckets, relative to where they are stored, or replacing a VRT with sidecars."""

from __future__ import annotations

import uuid
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.enums import Resampling
from rasterio.vrt import WarpedVRT
from rasters import mosaic_vrt as _simple_vrt
from rasters import run_python as _run
from rasters import seeded16, write16

import cloudio
from cloudio._paths import parse_gcs
from cloudio.emulator import Emulator


def _stored(emu: Emulator, url: str) -> bytes:
    p = parse_gcs(url)
    return emu.client.bucket(p.bucket).blob(p.key).download_as_bytes()  # type: ignore[no-any-return]


def _sources(xml: bytes) -> list[str]:
    return [el.text or "" for el in ET.fromstring(xml).iter() if el.tag in ("SourceFilename", "SourceDataset")]


def _sum(a: np.ndarray) -> str:
    return str(int(a.astype("int64").sum()))


def test_mosaic_across_two_buckets_reads_in_this_process(gcs_emulator: Emulator, gcs_bucket: str) -> None:
    other = gcs_emulator.create_bucket(f"test-{uuid.uuid4().hex[:16]}")
    a, b = seeded16(1), seeded16(2)
    write16(f"{gcs_bucket}/m/a.tif", a)
    write16(f"{other}/m/b.tif", b)  # written only: GDAL never read from this bucket
    xml = _simple_vrt([(f"{gcs_bucket}/m/a.tif", 0, 0), (f"{other}/m/b.tif", 64, 0)])
    url = cloudio.write_vrt(xml, f"{gcs_bucket}/v/mosaic.vrt")
    with cloudio.open(url) as ds:
        got = ds.read(1)
    assert (got[:, :64] == a[0]).all()
    assert (got[:, 64:] == b[0]).all()


@pytest.mark.parametrize("level", ["session", "strong"])
def test_mosaic_across_two_buckets_reads_in_another_process(gcs_emulator: Emulator, gcs_bucket: str,
                                                            level: str) -> None:
    other = gcs_emulator.create_bucket(f"test-{uuid.uuid4().hex[:16]}")
    a, b = seeded16(3), seeded16(4)
    write16(f"{gcs_bucket}/m/a.tif", a)
    write16(f"{other}/m/b.tif", b)
    xml = _simple_vrt([(f"{gcs_bucket}/m/a.tif", 0, 0), (f"{other}/m/b.tif", 64, 0)])
    url = cloudio.write_vrt(xml, f"{gcs_bucket}/v/mosaic.vrt")
    r = _run(f"""
        import cloudio
        with cloudio.session({level!r}), cloudio.open({url!r}) as ds:
            x = ds.read(1)
        print(int(x[:, :64].astype('int64').sum()), int(x[:, 64:].astype('int64').sum()))
    """, gcs_emulator)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == [_sum(a), _sum(b)]


def test_warped_vrt_of_a_source_in_another_bucket_reads_in_another_process(
        gcs_emulator: Emulator, gcs_bucket: str) -> None:
    """GDAL opens a warped VRT's source with the VRT: an unset bucket failed the open itself."""
    other = gcs_emulator.create_bucket(f"test-{uuid.uuid4().hex[:16]}")
    write16(f"{other}/m/b.tif", seeded16(2))
    with cloudio.open(f"{other}/m/b.tif") as src, WarpedVRT(src, crs="EPSG:4326") as w:
        expected = w.read()
        url = cloudio.write_vrt(w, f"{gcs_bucket}/v/b_4326.vrt")
    r = _run(f"""
        import cloudio
        with cloudio.open({url!r}) as ds:
            print(int(ds.read().astype('int64').sum()))
    """, gcs_emulator)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == _sum(expected)


def test_vrt_source_new_in_a_folder_gdal_listed_in_another_bucket(gcs_emulator: Emulator, gcs_bucket: str) -> None:
    other = gcs_emulator.create_bucket(f"test-{uuid.uuid4().hex[:16]}")
    old, new = seeded16(5), seeded16(6)
    write16(f"{other}/d/old.tif", old)
    with cloudio.open(f"{other}/d/old.tif") as src:  # a VRT in d/ of the other bucket: GDAL lists d/
        cloudio.write_vrt(src, f"{other}/d/old.vrt")
    with cloudio.open(f"{other}/d/old.vrt") as v:
        assert (v.read() == old).all()
    write16(f"{other}/d/new.tif", new)  # a new name in a folder GDAL listed
    xml = _simple_vrt([(f"{other}/d/old.tif", 0, 0), (f"{other}/d/new.tif", 64, 0)])
    url = cloudio.write_vrt(xml, f"{gcs_bucket}/v/mosaic.vrt")
    with cloudio.open(url) as ds:
        got = ds.read(1)
    assert (got[:, :64] == old[0]).all()
    assert (got[:, 64:] == new[0]).all(), "the new source in the other bucket read as nodata"


def test_vrt_xml_with_a_source_relative_to_the_vrt(gcs_emulator: Emulator, gcs_bucket: str) -> None:
    """XML text whose source is relative to the VRT (relativeToVRT="1"), as GDAL reads it from where it is stored."""
    data = seeded16(8)
    write16(f"{gcs_bucket}/r/src.tif", data)
    xml = _simple_vrt([("src.tif", 0, 0)], relative=True)
    url = cloudio.write_vrt(xml, f"{gcs_bucket}/r/rel.vrt")
    assert _sources(_stored(gcs_emulator, url)) == [f"/vsigs/{gcs_bucket[5:]}/r/src.tif"]
    with cloudio.open(url) as ds:
        assert (ds.read() == data).all()


def test_write_vrt_replacing_a_vrt_drops_its_old_overviews(gcs_emulator: Emulator, gcs_bucket: str,
                                                          tmp_path: Path) -> None:
    """The old VRT's external overviews (.vrt.ovr) must not be read with the new VRT, as for "w"."""
    src = f"{gcs_bucket}/v/a.tif"
    write16(src, np.full((1, 256, 256), 1, "uint16"))
    vrt = f"{gcs_bucket}/v/a.vrt"
    cloudio.write_vrt(src, vrt)
    # overviews of that VRT built locally and uploaded next to it through cloudio
    local = tmp_path / "a.vrt"
    local.write_bytes(_stored(gcs_emulator, vrt))
    with rasterio.Env(GS_NO_SIGN_REQUEST="YES", CPL_GS_ENDPOINT=gcs_emulator.url + "/"):
        with rasterio.open(local, "r+") as ds:
            ds.build_overviews([2, 4], Resampling.nearest)
    assert (tmp_path / "a.vrt.ovr").exists()
    cloudio.filesystem(vrt).put(str(tmp_path / "a.vrt.ovr"), vrt + ".ovr")
    with cloudio.open(vrt) as ds:
        assert ds.overviews(1) == [2, 4]
    # the VRT replaced by another one: a different source, same size
    other = f"{gcs_bucket}/v/b.tif"
    write16(other, np.full((1, 256, 256), 9, "uint16"))
    cloudio.write_vrt(other, vrt)
    with cloudio.open(vrt) as ds:
        small = ds.read(1, out_shape=(64, 64), resampling=Resampling.nearest)
    assert (small == 9).all(), f"read the replaced VRT's overviews: {np.unique(small)}"
