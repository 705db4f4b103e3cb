"""GDAL reads through cloudio.open against a failing server (resets, 503s, hangs), and option scoping.

Faults come from the real proxy in front of the real emulator (tests/faultproxy.py);
GDAL requests objects as ``GET /<bucket>/<key>`` there.
"""

from __future__ import annotations

import ctypes
import time

import numpy as np
import pytest
import rasterio
from faultproxy import FaultProxy
from rasterio.errors import RasterioIOError
from rasters import noise as pixels
from rasters import noise_tif as tif
from rasters import put

import cloudio
from cloudio import _config
from cloudio._gdal import bindings, endpoint
from cloudio.emulator import Emulator


def gdal_gets(proxy: FaultProxy, key: str) -> list[object]:
    requests = proxy.requests(key)
    return [status for method, path, status in requests if method == "GET" and not path.startswith("/storage/")]


@pytest.fixture
def obj(gcs_emulator: Emulator, gcs_bucket: str) -> str:
    url = f"{gcs_bucket}/d/a.tif"
    put(gcs_emulator, url, tif())
    return url


# -- bug 1: a reset mid-download poisoned the object in GDAL's cache ----------------------------


def test_reset_during_read_does_not_poison_later_opens(obj: str, fault_proxy: FaultProxy) -> None:
    with cloudio.open(obj) as ds:
        fault_proxy.add("reset", method="GET", path=r"/d/a\.tif$", after=100_000, times=1)
        try:
            ds.read()
        except cloudio.CloudioError:
            pass  # failing once is allowed; poisoning the next opens is not
    with cloudio.open(obj) as ds:
        np.testing.assert_array_equal(ds.read(), pixels())
    assert "reset" in gdal_gets(fault_proxy, r"/d/a\.tif")


def test_reset_during_read_is_retried_by_the_dataset(obj: str, fault_proxy: FaultProxy) -> None:
    with cloudio.open(obj) as ds:
        fault_proxy.add("reset", method="GET", path=r"/d/a\.tif$", after=100_000, times=1)
        np.testing.assert_array_equal(ds.read(), pixels())


def test_reset_during_open_does_not_poison_reads(obj: str, fault_proxy: FaultProxy) -> None:
    fault_proxy.add("reset", method="GET", path=r"/d/a\.tif$", after=8000, times=1)
    with cloudio.open(obj) as ds:
        np.testing.assert_array_equal(ds.read(), pixels())


# -- bug 3: 503s are retried; past the retries, a TransientError naming the URL ------------------


def test_three_503s_are_retried(obj: str, fault_proxy: FaultProxy) -> None:
    fault_proxy.add("status", code=503, method="GET", path=r"/d/a\.tif$", times=3)
    with cloudio.open(obj) as ds:
        np.testing.assert_array_equal(ds.read(), pixels())
    assert gdal_gets(fault_proxy, r"/d/a\.tif$")[:4] == [503, 503, 503, 206]


def test_503_forever_is_a_transient_error(obj: str, fault_proxy: FaultProxy) -> None:
    fault_proxy.add("status", code=503, method="GET", path=r"/d/a\.tif$", times=None)
    t0 = time.monotonic()
    with pytest.raises(cloudio.TransientError, match=obj) as info:
        with cloudio.open(obj) as ds:
            ds.read()
    assert time.monotonic() - t0 < 120
    assert isinstance(info.value.__cause__, RasterioIOError)
    assert isinstance(info.value, RasterioIOError)  # code written for rasterio.open still catches it
    assert gdal_gets(fault_proxy, r"/d/a\.tif$").count(503) >= 4  # GDAL's own retries happened


def test_503_forever_during_read_is_a_transient_error(obj: str, fault_proxy: FaultProxy) -> None:
    with cloudio.open(obj) as ds:
        fault_proxy.add("status", code=503, method="GET", path=r"/d/a\.tif$", times=None)
        with pytest.raises(cloudio.TransientError, match=obj) as info:
            ds.read()
    assert isinstance(info.value.__cause__, RasterioIOError)


# -- bug 2: timeouts ----------------------------------------------------------------------------


def test_hanging_server_gives_transient_error(obj: str, fault_proxy: FaultProxy,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLOUDIO_HTTP_TIMEOUT", "1")
    fault_proxy.add("hang", method="GET", path=r"/d/a\.tif$", times=None)
    t0 = time.monotonic()
    with pytest.raises(cloudio.TransientError, match=obj):
        with cloudio.open(obj) as ds:
            ds.read()
    assert time.monotonic() - t0 < 90  # without timeouts GDAL waits forever


def test_timeouts_and_retries_are_set_on_the_bucket(gcs_bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLOUDIO_HTTP_TIMEOUT", "7")
    bucket = gcs_bucket[len("gs://"):]
    endpoint.ensure_endpoint(bucket)
    assert path_option(f"/vsigs/{bucket}/k.tif", "GDAL_HTTP_TIMEOUT") == "7"
    assert path_option(f"/vsigs/{bucket}/k.tif", "GDAL_HTTP_MAX_RETRY") == "3"


def test_user_gdal_config_wins(gcs_bucket: str) -> None:
    bucket = gcs_bucket[len("gs://"):]
    with rasterio.Env(GDAL_HTTP_TIMEOUT="123"):
        endpoint.ensure_endpoint(bucket)
        assert path_option(f"/vsigs/{bucket}/k.tif", "GDAL_HTTP_TIMEOUT") == "123"
    endpoint.ensure_endpoint(bucket)
    assert path_option(f"/vsigs/{bucket}/k.tif", "GDAL_HTTP_TIMEOUT") == f"{_config.http_timeout():g}"


# -- bug 4: options stay in their bucket ---------------------------------------------------------


def path_option(path: str, key: str) -> str | None:
    """GDAL's own ``VSIGetPathSpecificOption`` (falls back to the config option, like GDAL does)."""
    fn = bindings._lib().VSIGetPathSpecificOption
    fn.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p]
    fn.restype = ctypes.c_char_p
    out = fn(path.encode(), key.encode(), None)
    return out.decode() if out is not None else None


def test_options_reach_the_bucket_and_its_listings(gcs_emulator: Emulator, gcs_bucket: str) -> None:
    bucket = gcs_bucket[len("gs://"):]
    endpoint.ensure_endpoint(bucket)
    assert path_option(f"/vsigs/{bucket}/k.tif", "CPL_GS_ENDPOINT") == gcs_emulator.url + "/"
    assert path_option(f"/vsigs/{bucket}", "GS_NO_SIGN_REQUEST") == "YES"  # GDAL's lookup for listings


def test_options_do_not_reach_a_bucket_whose_name_extends_this_one(gcs_emulator: Emulator, gcs_bucket: str,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """GDAL matches path options by string prefix: /vsigs/data would also match /vsigs/data-prod."""
    bucket = gcs_bucket[len("gs://"):]
    monkeypatch.delenv("CPL_GS_ENDPOINT", raising=False)
    monkeypatch.delenv("GS_NO_SIGN_REQUEST", raising=False)
    endpoint.ensure_endpoint(bucket)
    for sibling in (f"{bucket}-prod", f"{bucket}_x", f"{bucket}.eu", f"{bucket}0"):
        assert path_option(f"/vsigs/{sibling}/k.tif", "CPL_GS_ENDPOINT") != gcs_emulator.url + "/", sibling
        assert path_option(f"/vsigs/{sibling}/k.tif", "GS_NO_SIGN_REQUEST") in (None, "NO"), sibling
        assert path_option(f"/vsigs/{sibling}", "GS_NO_SIGN_REQUEST") in (None, "NO"), sibling  # its listings
    endpoint.ensure_endpoint(f"{bucket}-prod")  # a sibling cloudio reads itself gets the emulator
    assert path_option(f"/vsigs/{bucket}-prod/k.tif", "CPL_GS_ENDPOINT") == gcs_emulator.url + "/"
    assert path_option(f"/vsigs/{bucket}/k.tif", "GS_NO_SIGN_REQUEST") == "YES"


def test_options_are_removed_when_the_endpoint_changes(gcs_emulator: Emulator, gcs_bucket: str,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    bucket = gcs_bucket[len("gs://"):]
    endpoint.ensure_endpoint(bucket)
    assert path_option(f"/vsigs/{bucket}/k.tif", "GS_NO_SIGN_REQUEST") == "YES"
    monkeypatch.delenv("STORAGE_EMULATOR_HOST")
    endpoint.ensure_endpoint("some-other-bucket")  # any open after the change
    try:
        assert path_option(f"/vsigs/{bucket}/k.tif", "GS_NO_SIGN_REQUEST") is None
        assert path_option(f"/vsigs/{bucket}/k.tif", "CPL_GS_ENDPOINT") is None
    finally:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_emulator.url)
        endpoint.ensure_endpoint(bucket)


def test_root_object_with_sidecar_reads_from_the_emulator(gcs_emulator: Emulator, gcs_bucket: str,
                                                          tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "r.tif"
    path.write_bytes(tif(256))
    with rasterio.Env(TIFF_USE_OVR=True):
        with rasterio.open(path, "r+") as ds:
            ds.build_overviews([2], rasterio.enums.Resampling.nearest)
    put(gcs_emulator, f"{gcs_bucket}/r.tif", path.read_bytes())
    put(gcs_emulator, f"{gcs_bucket}/r.tif.ovr", (tmp_path / "r.tif.ovr").read_bytes())
    with cloudio.open(f"{gcs_bucket}/r.tif") as ds:
        assert ds.overviews(1) == [2]
        np.testing.assert_array_equal(ds.read(), pixels(256))


# -- bug 5: modes, VRT writes, names -------------------------------------------------------------


def test_unknown_mode_lists_the_modes(gcs_bucket: str) -> None:
    with pytest.raises(cloudio.ConfigurationError, match=r"'r'.*'w'.*'w\+'.*'r\+'"):
        cloudio.open(f"{gcs_bucket}/a.tif", "wb")


@pytest.mark.parametrize(("mode", "driver"), [("r+", None), ("w", "VRT"), ("w", None)])
def test_vrt_writes_point_to_write_vrt(gcs_bucket: str, mode: str, driver: str | None) -> None:
    with pytest.raises(cloudio.CloudioError, match="cloudio.write_vrt"):
        cloudio.open(f"{gcs_bucket}/x.vrt", mode, driver=driver, width=1, height=1, count=1, dtype="uint8")


def test_name_is_rasterios(gcs_emulator: Emulator, obj: str) -> None:
    with rasterio.Env(CPL_GS_ENDPOINT=gcs_emulator.url + "/", GS_NO_SIGN_REQUEST="YES"):
        with rasterio.open(obj) as raw:
            expected = raw.name
    assert expected == obj
    with cloudio.open(obj) as ds:
        assert ds.name == expected
        assert isinstance(ds, rasterio.io.DatasetReader)
    with cloudio.open(obj.replace("gs://", "/vsigs/")) as ds:
        assert ds.name == obj.replace("gs://", "/vsigs/")


def test_open_gives_up_within_the_documented_time_once_the_server_is_gone(monkeypatch):
    """The guide: a read gives up within about ``4 * CLOUDIO_HTTP_TIMEOUT + 8`` seconds. The open's one
    listing (through gcsfs, which retries a refused connection for half a minute) is bounded as well."""
    monkeypatch.setenv("CLOUDIO_HTTP_TIMEOUT", "1")
    emu = Emulator(mode="binary").start()
    try:
        bucket = emu.create_bucket(f"gone-{time.monotonic_ns()}")
        _config.push_endpoint(emu.url)
        try:
            with cloudio.open(f"{bucket}/a.tif", "w", driver="GTiff", width=8, height=8, count=1,
                              dtype="uint8") as dst:
                dst.write(np.ones((1, 8, 8), "uint8"))
            emu.stop()  # the server goes away
            t0 = time.monotonic()
            with pytest.raises(cloudio.TransientError, match="a.tif"):
                cloudio.open(f"{bucket}/a.tif")
            assert time.monotonic() - t0 <= 4 * 1 + 8
        finally:
            _config.pop_endpoint()
    finally:
        emu.stop()
