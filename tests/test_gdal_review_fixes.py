"""Fixes from a review of cloudio.open's GDAL side, each against the real emulator (behind the fault proxy) and
real rasterio.

* A listing (or a metadata request) refused with 5xx/429 past gcsfs's retries escaped ``cloudio.open`` as
  gcsfs's own ``HttpError`` (an ``Exception``, not an ``OSError``): now a TransientError naming the URL.
* A VRT whose source's download was cut short (a reset) was not really retried: the retry cleared only the
  VRT's own path in GDAL's cache, and the short range stays under the source's, read again by the retry and by
  every later open. Now the sources are cleared too (a read's retry also holds their gates).
* ``cloudio.invalidate(url)`` racing an open of the object gave torn pixels: the prefix change it records
  neither waited for the open's GDAL I/O nor moved an epoch the open compares (the object had none, and no
  dataset registered yet), so the open put the old version's bytes back into GDAL's cache after the clear and
  its dataset was not known to be stale.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from affine import Affine
from faultproxy import FaultProxy
from outcomes import Outcome
from rasterio.io import MemoryFile
from rasterio.vrt import WarpedVRT
from rasters import noise, noise_tif, put, tif

import cloudio
from cloudio._gdal.consumer import RACED, GdalCalls, GdalConsumer
from cloudio._gdal.gates import gates
from cloudio._gdal.targets import Target, target
from cloudio._journal import Change
from cloudio._paths import parse_gcs
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


# -- 2: cloudio.invalidate racing an open of the object ----------------------------------------------


def test_invalidate_during_an_open_leaves_no_torn_reads(obj: str, gcs_emulator: Emulator,
                                                        fault_proxy: FaultProxy) -> None:
    release = threading.Event()
    # GDAL's first range of the object (its header, the first tiles' start): the server's answer (the old
    # version) is held on its way until the test lets it go
    rule = fault_proxy.add("late", method="GET", path=r"/d/a\.tif$", release=release, seconds=30)
    opening = Outcome(lambda: cloudio.open(obj)).start()
    try:
        assert rule.answered.wait(30), opening.said()
        put(gcs_emulator, obj, tif(2, size=1024, block=128))  # another writer replaces it: same layout
        invalidating = Outcome(lambda: cloudio.invalidate(obj)).start()
        time.sleep(0.5)
    finally:
        release.set()
    assert opening.finished(60), opening.said()
    assert invalidating.finished(60), invalidating.said()
    assert opening.error is None and invalidating.error is None, (opening.said(), invalidating.said())
    with opening.value as ds:
        try:
            pixels = ds.read()
        except cloudio.StaleDatasetError:
            pass
        else:
            assert (pixels == 2).all(), f"{(pixels != 2).sum()} pixels of the old version"
    with cloudio.open(obj) as ds:
        pixels = ds.read()
    assert (pixels == 2).all(), f"{(pixels != 2).sum()} pixels of the old version"


class _Dataset:
    """Stands for a rasterio dataset in the consumer's own tests: weakly referenced, open until ``closed``."""

    closed = False


def _t(key: str) -> Target:
    return target(parse_gcs(f"gs://review-unit/{key}"))


def _consumer(clear: list[str]) -> GdalConsumer:
    return GdalConsumer(GdalCalls(clear=clear.append, set_path_option=lambda prefix, key, value: None,
                                  clear_path_options=lambda prefix: None, listdir=lambda vsi: []))


def _invalidated(gdal: GdalConsumer, url: str) -> None:
    gdal.on_change(Change(1, url, "invalidate", prefix=True))  # what cloudio.invalidate records


def test_an_open_across_an_invalidation_of_an_object_never_changed_is_raced() -> None:
    """No epoch, no dataset yet, no I/O in flight when the invalidation looked (the open read GDAL's cache, the
    old version, before the clear): the open's dataset is stale all the same, and its reads go to a fresh open."""
    cleared: list[str] = []
    gdal = _consumer(cleared)
    a, beside = _t("d/a.tif"), _t("d2/a.tif")
    epoch, since = gdal.epoch(a), gdal.prefix_seq()  # the opens begin
    epoch2, since2 = gdal.epoch(beside), gdal.prefix_seq()
    _invalidated(gdal, "gs://review-unit/d/a.tif")
    assert cleared == [a.vsi]
    datasets = [_Dataset() for _ in range(3)]  # held: the consumer keeps weak references
    assert gdal.opened_dataset(a, datasets[0], epoch, since) == RACED  # no epoch matches it: _io renews
    assert gdal.has_stale_datasets(a.vsi)
    assert cleared[-1] == a.vsi  # what the open put back is cleared
    assert gdal.opened_dataset(beside, datasets[1], epoch2, since2) == epoch2  # not below what changed
    assert not gdal.has_stale_datasets(beside.vsi)
    later = gdal.prefix_seq()  # an open that begins after the clear reads the new version
    assert gdal.opened_dataset(a, datasets[2], gdal.epoch(a), later) == gdal.epoch(a)


def test_an_invalidation_waits_for_an_open_in_flight_of_an_object_below() -> None:
    """An open's GDAL I/O (inside the object's gate, no dataset registered, no epoch) finishes before the clear,
    as for a write of the object."""
    events: list[str] = []
    gdal = GdalConsumer(GdalCalls(clear=lambda vsi: events.append("clear"),
                                  set_path_option=lambda prefix, key, value: None,
                                  clear_path_options=lambda prefix: None, listdir=lambda vsi: []))
    vsi = _t("e/a.tif").vsi
    entered, leave = threading.Event(), threading.Event()

    def open_() -> None:
        gates.enter(vsi)
        entered.set()
        leave.wait(5)
        events.append("open done")
        gates.exit(vsi)

    opener = threading.Thread(target=open_)
    opener.start()
    assert entered.wait(5)
    change = Outcome(lambda: _invalidated(gdal, "gs://review-unit/e/")).start()
    time.sleep(0.3)
    assert events == []  # the invalidation waits for the open's I/O
    leave.set()
    opener.join(5)
    assert change.finished(10), change.said()
    assert events == ["open done", "clear"]
    assert gdal.epoch(_t("e/a.tif")) == 2  # moved: the open sees it
