"""Fixes from a review of cloudio.open's GDAL side, each against the real emulator (behind the fault proxy) and
real rasterio.

* A listing (or a metadata request) refused with 5xx/429 past gcsfs's retries escaped ``cloudio.open`` as
  gcsfs's own ``HttpError`` (an ``Exception``, not an ``OSError``): now a TransientError naming the URL.
"""

from __future__ import annotations

import time

import pytest
from faultproxy import FaultProxy
from rasters import noise_tif, put

import cloudio
from cloudio.emulator import Emulator

#: cloudio's listing requests (JSON API, ``GET /storage/v1/b/<bucket>/o?prefix=...``)
LISTINGS = r"/storage/v1/b/[^/]+/o\?"


@pytest.fixture
def obj(gcs_emulator: Emulator, gcs_bucket: str) -> str:
    url = f"{gcs_bucket}/d/a.tif"
    put(gcs_emulator, url, noise_tif())
    return url


# -- 1: a listing refused past gcsfs's retries -----------------------------------------------------


def test_listing_refused_with_503_is_a_transient_error(obj: str, fault_proxy: FaultProxy,
                                                       quick_retries: None) -> None:
    rule = fault_proxy.add("status", code=503, method="GET", path=LISTINGS, times=None)
    t0 = time.monotonic()
    with pytest.raises(cloudio.TransientError, match=obj) as info:
        cloudio.open(obj)
    assert time.monotonic() - t0 < 60
    assert rule.hits >= 1
    assert info.value.__cause__ is not None


def test_metadata_refused_with_503_after_a_failed_open_is_a_transient_error(
        gcs_emulator: Emulator, gcs_bucket: str, fault_proxy: FaultProxy, quick_retries: None) -> None:
    url = f"{gcs_bucket}/d/junk.tif"
    put(gcs_emulator, url, b"not a raster at all" * 100)
    # GDAL cannot open it: cloudio asks the object's metadata (is it there?), and the server keeps failing
    rule = fault_proxy.add("status", code=503, method="GET", path=r"/storage/v1/b/[^/]+/o/d%2Fjunk\.tif",
                           times=None)
    t0 = time.monotonic()
    with pytest.raises(cloudio.TransientError, match=url) as info:
        cloudio.open(url)
    assert time.monotonic() - t0 < 60
    assert rule.hits >= 1
    assert info.value.__cause__ is not None


def test_source_vrt_unreadable_with_503_fails_write_vrt_transiently(
        obj: str, gcs_bucket: str, fault_proxy: FaultProxy, quick_retries: None) -> None:
    inner = cloudio.write_vrt(obj, f"{gcs_bucket}/v/inner.vrt")
    outer = f"{gcs_bucket}/v/outer.vrt"
    bucket = gcs_bucket[len("gs://"):]
    xml = (f'<VRTDataset rasterXSize="1024" rasterYSize="1024"><VRTRasterBand dataType="Byte" band="1">'
           f'<SimpleSource><SourceFilename relativeToVRT="0">/vsigs/{bucket}/v/inner.vrt</SourceFilename>'
           f'<SourceBand>1</SourceBand></SimpleSource></VRTRasterBand></VRTDataset>')
    # the check that the new VRT does not read itself downloads the source VRT's XML: refused for good
    rule = fault_proxy.add("status", code=503, method="GET", path=r"/download/storage/v1/b/[^/]+/o/v%2Finner\.vrt",
                           times=None)
    with pytest.raises(cloudio.TransientError, match=outer) as info:
        cloudio.write_vrt(xml, outer)
    assert rule.hits >= 1
    assert info.value.__cause__ is not None
    assert inner in str(info.value)
    assert not cloudio.filesystem(outer).exists(outer)  # nothing was written
