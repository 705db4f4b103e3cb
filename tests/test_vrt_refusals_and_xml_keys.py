"""VRT flows: write_vrt refuses a VRT that would read itself (its own source overwritten), malformed XML is cloudio's
error, a VRT saved under an .xml key reads its sources as a .vrt does, an open VRT reads a source written since
through a fresh open, and a source deleted through cloudio is named. Found by a review; each test failed before its
fix."""

from __future__ import annotations

import uuid

import pytest
from rasterio.vrt import WarpedVRT
from rasters import mosaic_vrt, put, seeded16, tif, vrts_over, write16

import cloudio
from cloudio.emulator import Emulator
from cloudio.errors import CloudioError


def test_write_vrt_onto_its_own_source_is_refused(gcs_emulator: Emulator, gcs_bucket: str) -> None:
    src = f"{gcs_bucket}/s/src.tif"
    write16(src, seeded16(3))
    with cloudio.open(src) as ds:
        with pytest.raises(CloudioError):
            cloudio.write_vrt(ds, src)
    with cloudio.open(src) as ds:
        assert (ds.read() == seeded16(3)).all()


def test_warped_vrt_of_a_vrt_written_over_that_vrt_is_refused(gcs_emulator: Emulator, gcs_bucket: str) -> None:
    src, vrt = f"{gcs_bucket}/s2/src.tif", f"{gcs_bucket}/s2/v.vrt"
    vrts_over(src, 4, vrt)
    with cloudio.open(vrt) as v, WarpedVRT(v, crs="EPSG:4326") as w:
        with pytest.raises(CloudioError):
            cloudio.write_vrt(w, vrt)
    with cloudio.open(vrt) as v:
        assert v.read().shape == (1, 64, 64)


def test_vrt_written_over_the_source_of_a_vrt_it_reads_is_refused(gcs_emulator: Emulator, gcs_bucket: str) -> None:
    """A cycle through a nested VRT: src.tif <- v1.vrt <- v2.vrt; writing a VRT over v2.vrt (or v1.vrt) onto
    src.tif would replace its pixels with XML that reads itself through the others."""
    src, v1, v2 = f"{gcs_bucket}/s3/src.tif", f"{gcs_bucket}/s3/v1.vrt", f"{gcs_bucket}/s3/v2.vrt"
    vrts_over(src, 5, v1, v2)
    for over in (v1, v2):
        with pytest.raises(CloudioError, match="itself"):
            cloudio.write_vrt(mosaic_vrt([(over, 0, 0)]), src)
    with cloudio.open(src) as ds:
        assert (ds.read() == seeded16(5)).all()
    with cloudio.open(v2) as ds:
        assert (ds.read() == seeded16(5)).all()


def test_malformed_vrt_xml_is_a_cloudio_error(gcs_emulator: Emulator, gcs_bucket: str) -> None:
    url = f"{gcs_bucket}/x/bad.vrt"
    with pytest.raises(CloudioError) as e:
        cloudio.write_vrt('<VRTDataset rasterXSize="64" rasterYSize="64"><VRTRasterBand', url)
    assert url in str(e.value)


def test_vrt_stored_as_xml_key_reads_source_in_other_bucket(gcs_emulator: Emulator, gcs_bucket: str) -> None:
    other = gcs_emulator.create_bucket(f"test-{uuid.uuid4().hex[:16]}")
    b = f"{other}/m/b.tif"
    write16(b, seeded16(6))
    url = cloudio.write_vrt(mosaic_vrt([(b, 0, 0)]), f"{gcs_bucket}/v/mosaic.xml")
    with cloudio.open(url) as ds:
        assert (ds.read() == seeded16(6)).all()


def test_strong_vrt_stored_as_xml_sees_source_overwritten_elsewhere(gcs_emulator: Emulator, gcs_bucket: str) -> None:
    src = f"{gcs_bucket}/sx/src.tif"
    put(gcs_emulator, src, tif(1))
    url = cloudio.write_vrt(mosaic_vrt([(src, 0, 0)]).replace("UInt16", "Byte"), f"{gcs_bucket}/sx/mosaic.xml")
    with cloudio.session("strong"):
        with cloudio.open(url) as ds:
            assert (ds.read() == 1).all()
        put(gcs_emulator, src, tif(2))
        with cloudio.open(url) as ds:
            assert (ds.read() == 2).all()


def test_open_vrt_reads_source_overwritten_through_cloudio(gcs_emulator: Emulator, gcs_bucket: str) -> None:
    src, vrt = f"{gcs_bucket}/a/src.tif", f"{gcs_bucket}/a/v.vrt"
    vrts_over(src, 1, vrt)
    with cloudio.open(vrt) as v:
        assert (v.read() == seeded16(1)).all()
        write16(src, seeded16(2))  # same layout, new pixels, through cloudio in this process
        got = v.read()
    assert (got == seeded16(2)).all(), "the open VRT read its source's old pixels after a write through cloudio"


def test_vrt_source_deleted_through_cloudio(gcs_emulator: Emulator, gcs_bucket: str) -> None:
    # a nested VRT read earlier in the process (any folder): afterwards a missing source reads as zeros
    outer = f"{gcs_bucket}/pre/outer.vrt"
    vrts_over(f"{gcs_bucket}/pre/a.tif", 1, f"{gcs_bucket}/pre/inner.vrt", outer)
    with cloudio.open(outer) as o:
        o.read()
    src, vrt = f"{gcs_bucket}/del/src.tif", f"{gcs_bucket}/del/v.vrt"
    vrts_over(src, 10, vrt)
    with cloudio.open(vrt) as v:
        assert (v.read() == seeded16(10)).all()
    cloudio.filesystem(src).rm(src)
    with pytest.raises(CloudioError) as e:
        with cloudio.open(vrt) as v:
            v.read()  # GDAL alone read zeros in its place
    assert src in str(e.value)
