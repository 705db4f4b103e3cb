"""Fixes from a review of cloudio.open's GDAL side, each against the real emulator (behind the fault proxy) and
real rasterio.

* A listing (or a metadata request) refused with 5xx/429 past gcsfs's retries escaped ``cloudio.open`` as
  gcsfs's own ``HttpError`` (an ``Exception``, not an ``OSError``): now a TransientError naming the URL.
* A VRT whose source's download was cut short (a reset) was not really retried: the retry cleared only the
  VRT's own path in GDAL's cache, and the short range stays under the source's, read again by the retry and by
  every later open. Now the sources are cleared too (a read's retry also holds their gates).
"""

from __future__ import annotations

import time

import numpy as np
import pytest
from affine import Affine
from faultproxy import FaultProxy
from rasterio.io import MemoryFile
from rasterio.vrt import WarpedVRT
from rasters import noise, noise_tif, put, tif

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


# -- 3: a VRT whose source's download was cut short --------------------------------------------------


def test_vrt_read_cut_short_in_its_source_is_retried(obj: str, gcs_bucket: str, fault_proxy: FaultProxy) -> None:
    vrt = cloudio.write_vrt(obj, f"{gcs_bucket}/v/a.vrt")
    with cloudio.open(vrt) as ds:
        rule = fault_proxy.add("reset", method="GET", path=r"/d/a\.tif$", after=100_000, times=1)
        np.testing.assert_array_equal(ds.read(), noise())
    assert rule.hits == 1  # the source's download was cut short, and read again
    with cloudio.open(vrt) as ds:  # and nothing of the cut-short range stayed in GDAL's cache
        np.testing.assert_array_equal(ds.read(), noise())


@pytest.mark.parametrize("opened_before", [True, False], ids=["sources-known", "sources-from-its-xml"])
def test_warped_vrt_open_cut_short_in_its_source_is_retried(gcs_emulator: Emulator, gcs_bucket: str,
                                                            fault_proxy: FaultProxy, opened_before: bool) -> None:
    data = tif(5, size=512, block=128, transform=Affine(0.01, 0, 10, 0, -0.01, 50), crs="EPSG:4326")
    with MemoryFile(data) as mem, mem.open() as local, WarpedVRT(local, crs="EPSG:3857") as warped:
        want = warped.read()
    obj = f"{gcs_bucket}/d/a.tif"
    put(gcs_emulator, obj, data)
    with cloudio.open(obj) as src, WarpedVRT(src, crs="EPSG:3857") as warped:
        vrt = cloudio.write_vrt(warped, f"{gcs_bucket}/v/a.vrt")
    if opened_before:  # the open walked its sources: cloudio knows them
        with cloudio.open(vrt) as ds:
            np.testing.assert_array_equal(ds.read(), want)
    cloudio.invalidate(obj)  # GDAL reads the source afresh: its header, as the VRT opens (a warped VRT's does)
    # cut short twice: GDAL's own retry too (once, GDAL sometimes recovers by itself)
    rule = fault_proxy.add("reset", method="GET", path=r"/d/a\.tif$", after=100, times=2)
    with cloudio.open(vrt) as ds:
        np.testing.assert_array_equal(ds.read(), want)
    assert rule.hits == 2
    with cloudio.open(vrt) as ds:
        np.testing.assert_array_equal(ds.read(), want)
