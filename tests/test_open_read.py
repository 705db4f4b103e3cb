"""cloudio.open reads what was last written; raw rasterio, next to it, does not.

Each ``test_raw_*`` shows GDAL's cache going stale with plain rasterio (the
"before"); the test after it does the same through cloudio and reads fresh.
Every test uses a fresh bucket, so GDAL cache state never leaks between tests.
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import rasterio
from rasterio.errors import RasterioIOError
from rasters import tif

import cloudio
from cloudio._gdal import bindings, endpoint
from cloudio._gdal import consumer as gdal_consumer
from cloudio._gdal.bindings import vsi_readdir
from cloudio._journal import journal
from cloudio.emulator import Emulator

RASTERIO_15 = tuple(int(x) for x in rasterio.__version__.split(".")[:2]) >= (1, 5)


def ovr_for(value: int, size: int, tmp_path) -> tuple[bytes, bytes]:  # type: ignore[no-untyped-def]
    """A GeoTIFF and its external overview file (``.tif.ovr``)."""
    path = tmp_path / f"o{value}.tif"
    path.write_bytes(tif(value, size))
    with rasterio.Env(TIFF_USE_OVR=True):
        with rasterio.open(path, "r+") as ds:
            ds.build_overviews([2], rasterio.enums.Resampling.nearest)
    return path.read_bytes(), (tmp_path / f"o{value}.tif.ovr").read_bytes()


def read(ds) -> tuple[tuple[int, ...], int]:  # type: ignore[no-untyped-def]
    a = ds.read()
    assert a.min() == a.max()
    return a.shape, int(a[0, 0, 0])


@contextmanager
def raw_env(emu: Emulator) -> Iterator[None]:
    """Plain rasterio pointed at the emulator, scoped like any user's rasterio.Env."""
    with rasterio.Env(CPL_GS_ENDPOINT=emu.url + "/", GS_NO_SIGN_REQUEST="YES"):
        yield


def raw_read(url: str) -> tuple[tuple[int, ...], int]:
    with rasterio.open(url.replace("gs://", "/vsigs/")) as ds:
        return read(ds)


def cloud_read(url: str) -> tuple[tuple[int, ...], int]:
    with cloudio.open(url) as ds:
        return read(ds)


def put_elsewhere(emu: Emulator, url: str, data: bytes) -> None:
    """A write cloudio does not see (another process, another tool)."""
    bucket, key = url[len("gs://"):].split("/", 1)
    emu.client.bucket(bucket).blob(key).upload_from_string(data)


def data_gets(emu: Emulator, since: int) -> int:
    return emu.count(("GET", "HEAD"), since=since)


# -- row 1: GDAL lists d/, a new object is written, GDAL lists d/ again -------------------------


@pytest.mark.characterization
def test_raw_listing_misses_new_object(gcs_emulator: Emulator, gcs_bucket: str) -> None:
    put_elsewhere(gcs_emulator, f"{gcs_bucket}/d/a.tif", tif(1))
    vsi = gcs_bucket.replace("gs://", "/vsigs/") + "/d"
    with raw_env(gcs_emulator):
        assert vsi_readdir(vsi) == ["a.tif"]
        put_elsewhere(gcs_emulator, f"{gcs_bucket}/d/b.tif", tif(2))
        assert vsi_readdir(vsi) == ["a.tif"]  # stale: b.tif missing


def test_listing_through_cloudio_sees_new_object(gcs_bucket: str) -> None:
    fs = cloudio.filesystem(gcs_bucket)
    fs.pipe(f"{gcs_bucket}/d/a.tif", tif(1))
    assert gdal_consumer.listdir(f"{gcs_bucket}/d/") == ["a.tif"]
    fs.pipe(f"{gcs_bucket}/d/b.tif", tif(2))
    assert sorted(gdal_consumer.listdir(f"{gcs_bucket}/d/")) == ["a.tif", "b.tif"]
    fs.rm(f"{gcs_bucket}/d/a.tif")
    assert gdal_consumer.listdir(f"{gcs_bucket}/d/") == ["b.tif"]


# -- row 2: overwrite with a new shape and new pixels --------------------------------------------


@pytest.mark.characterization
def test_raw_open_after_overwrite_is_stale(gcs_emulator: Emulator, gcs_bucket: str) -> None:
    url = f"{gcs_bucket}/d/a.tif"
    put_elsewhere(gcs_emulator, url, tif(1, 64))
    with raw_env(gcs_emulator):
        assert raw_read(url) == ((1, 64, 64), 1)
        put_elsewhere(gcs_emulator, url, tif(2, 128))
        assert raw_read(url) == ((1, 64, 64), 1)  # old shape, old pixels


def test_open_after_overwrite_through_cloudio(gcs_bucket: str) -> None:
    url = f"{gcs_bucket}/d/a.tif"
    fs = cloudio.filesystem(url)
    fs.pipe(url, tif(1, 64))
    assert cloud_read(url) == ((1, 64, 64), 1)
    fs.pipe(url, tif(2, 128))
    assert cloud_read(url) == ((1, 128, 128), 2)


# -- row 3: the overwrite made with gcsfs ---------------------------------------------------------


@pytest.mark.characterization
def test_raw_open_after_gcsfs_overwrite_is_stale_or_torn(gcs_emulator: Emulator, gcs_bucket: str) -> None:
    from cloudio._gcs.client import gcs_filesystem

    url = f"{gcs_bucket}/d/a.tif"
    fs = gcs_filesystem(skip_instance_cache=True)
    fs.pipe(url, tif(1, 64))
    with raw_env(gcs_emulator):
        assert raw_read(url) == ((1, 64, 64), 1)
        fs.pipe(url, tif(2, 128))
        try:
            got = raw_read(url)
        except RasterioIOError:  # rasterio 1.5 / GDAL 3.12: "Read failed", a torn header
            return
        assert got != ((1, 128, 128), 2)


def test_open_after_gcsfs_overwrite_through_cloudio(gcs_bucket: str) -> None:
    from cloudio._gcs.client import gcs_filesystem

    url = f"{gcs_bucket}/d/a.tif"
    fs = gcs_filesystem(skip_instance_cache=True)
    fs.pipe(url, tif(1, 64))
    assert cloud_read(url) == ((1, 64, 64), 1)
    fs.pipe(url, tif(2, 128))
    journal().record(cloudio._paths.normalize(url), "write")  # what a tracked filesystem does
    assert cloud_read(url) == ((1, 128, 128), 2)


# -- new names in a prefix GDAL has seen (GDAL issue 11351) ---------------------------------------


@pytest.mark.characterization
def test_raw_open_of_new_object_in_listed_prefix_fails(gcs_emulator: Emulator, gcs_bucket: str) -> None:
    put_elsewhere(gcs_emulator, f"{gcs_bucket}/d/a.tif", tif(1))
    with raw_env(gcs_emulator):
        assert vsi_readdir(gcs_bucket.replace("gs://", "/vsigs/") + "/d") == ["a.tif"]
        put_elsewhere(gcs_emulator, f"{gcs_bucket}/d/b.tif", tif(2))
        with pytest.raises(RasterioIOError, match="does not exist"):
            raw_read(f"{gcs_bucket}/d/b.tif")


def test_open_of_new_object_through_cloudio(gcs_emulator: Emulator, gcs_bucket: str) -> None:
    fs = cloudio.filesystem(gcs_bucket)
    for i in range(3):
        fs.pipe(f"{gcs_bucket}/d/f{i}.tif", tif(i + 1))
    for i in range(3):
        assert cloud_read(f"{gcs_bucket}/d/f{i}.tif") == ((1, 64, 64), i + 1)
    fs.pipe(f"{gcs_bucket}/d/new.tif", tif(7))
    n = len(gcs_emulator.requests())
    assert cloud_read(f"{gcs_bucket}/d/new.tif") == ((1, 64, 64), 7)
    for i in range(3):  # the other files stay cached: no directory-wide clear
        assert cloud_read(f"{gcs_bucket}/d/f{i}.tif") == ((1, 64, 64), i + 1)
    reqs = [r for r in gcs_emulator.requests()[n:] if r.method in ("GET", "HEAD")]
    assert [r.path.split("?")[0] for r in reqs] == [f"/{gcs_bucket[5:]}/d/new.tif"]


def test_new_object_in_prefix_raw_rasterio_listed(gcs_emulator: Emulator, gcs_bucket: str) -> None:
    """GDAL listed d/ behind cloudio's back: the failed open is retried after clearing that listing."""
    fs = cloudio.filesystem(gcs_bucket)
    fs.pipe(f"{gcs_bucket}/d/a.tif", tif(1))
    with raw_env(gcs_emulator):
        assert vsi_readdir(gcs_bucket.replace("gs://", "/vsigs/") + "/d") == ["a.tif"]
    fs.pipe(f"{gcs_bucket}/d/b.tif", tif(2))
    assert cloud_read(f"{gcs_bucket}/d/b.tif") == ((1, 64, 64), 2)


def test_new_sidecar_is_seen(gcs_emulator: Emulator, gcs_bucket: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    data, ovr = ovr_for(5, 64, tmp_path)
    url = f"{gcs_bucket}/d/a.tif"
    fs = cloudio.filesystem(url)
    fs.pipe(url, data)
    with cloudio.open(url) as ds:
        assert ds.overviews(1) == []
    fs.pipe(url + ".ovr", ovr)
    with cloudio.open(url) as ds:
        assert ds.overviews(1) == [2]
    # once GDAL lists d/ (the file has a sidecar), later new names are still found
    fs.pipe(f"{gcs_bucket}/d/b.tif", tif(3))
    assert cloud_read(f"{gcs_bucket}/d/b.tif") == ((1, 64, 64), 3)
    fs.pipe(f"{gcs_bucket}/d/a.tif", tif(4, 32))
    fs.rm(url + ".ovr")
    with cloudio.open(url) as ds:
        assert ds.overviews(1) == []
        assert read(ds) == ((1, 32, 32), 4)


# -- overwrite smaller, delete, missing bucket ---------------------------------------------------


def test_overwrite_to_smaller_file(gcs_bucket: str) -> None:
    url = f"{gcs_bucket}/a.tif"
    fs = cloudio.filesystem(url)
    fs.pipe(url, tif(1, 256))
    assert cloud_read(url) == ((1, 256, 256), 1)
    fs.pipe(url, tif(2, 16))
    assert cloud_read(url) == ((1, 16, 16), 2)


def test_delete_then_open_is_a_clear_not_found(gcs_bucket: str) -> None:
    url = f"{gcs_bucket}/d/a.tif"
    fs = cloudio.filesystem(url)
    fs.pipe(url, tif(1))
    assert cloud_read(url) == ((1, 64, 64), 1)
    fs.rm(url)
    with pytest.raises(cloudio.ObjectNotFoundError) as info:
        cloudio.open(url)
    assert isinstance(info.value, FileNotFoundError)
    assert not isinstance(info.value, cloudio.BucketNotFoundError)
    assert url in str(info.value) and "does not exist" in str(info.value)
    assert isinstance(info.value.__cause__, RasterioIOError)


def test_never_written_object_is_not_found(gcs_bucket: str) -> None:
    with pytest.raises(cloudio.ObjectNotFoundError, match="nothing.tif does not exist"):
        cloudio.open(f"{gcs_bucket}/nothing.tif")


def test_missing_bucket(gcs_emulator: Emulator) -> None:
    with pytest.raises(cloudio.BucketNotFoundError, match="no-such-bucket-cloudio") as info:
        cloudio.open("gs://no-such-bucket-cloudio/a.tif")
    assert isinstance(info.value, FileNotFoundError)
    assert isinstance(info.value.__cause__, RasterioIOError)


def test_every_spelling_reads_the_same_object(gcs_emulator: Emulator, gcs_bucket: str) -> None:
    url = f"{gcs_bucket}/d/a.tif"
    cloudio.filesystem(url).pipe(url, tif(3))
    b = gcs_bucket[len("gs://"):]
    for spelling in (url, f"/vsigs/{b}/d/a.tif", f"{gcs_emulator.url}/{b}/d/a.tif"):
        assert cloud_read(spelling) == ((1, 64, 64), 3)


def test_local_paths_pass_through(tmp_path) -> None:  # type: ignore[no-untyped-def]
    p = tmp_path / "a.tif"
    p.write_bytes(tif(9, 8))
    with cloudio.open(p) as ds:
        assert read(ds) == ((1, 8, 8), 9)
    with cloudio.open(str(p)) as ds:
        assert ds.name == str(p)


# -- "written elsewhere": cloudio.invalidate ------------------------------------------------------


def test_invalidate_prefix_after_writes_elsewhere(gcs_emulator: Emulator, gcs_bucket: str) -> None:
    put_elsewhere(gcs_emulator, f"{gcs_bucket}/d/a.tif", tif(1))
    assert cloud_read(f"{gcs_bucket}/d/a.tif") == ((1, 64, 64), 1)
    put_elsewhere(gcs_emulator, f"{gcs_bucket}/d/a.tif", tif(2, 32))
    put_elsewhere(gcs_emulator, f"{gcs_bucket}/d/b.tif", tif(3))
    assert cloud_read(f"{gcs_bucket}/d/a.tif") == ((1, 64, 64), 1)  # nobody said anything yet
    cloudio.invalidate(f"{gcs_bucket}/d/")
    assert cloud_read(f"{gcs_bucket}/d/a.tif") == ((1, 32, 32), 2)
    assert cloud_read(f"{gcs_bucket}/d/b.tif") == ((1, 64, 64), 3)


def test_invalidate_one_new_object(gcs_emulator: Emulator, gcs_bucket: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    data, ovr = ovr_for(6, 64, tmp_path)
    put_elsewhere(gcs_emulator, f"{gcs_bucket}/d/a.tif", data)
    with cloudio.open(f"{gcs_bucket}/d/a.tif") as ds:
        assert ds.overviews(1) == []
    put_elsewhere(gcs_emulator, f"{gcs_bucket}/d/a.tif.ovr", ovr)
    cloudio.invalidate(f"{gcs_bucket}/d/a.tif.ovr")
    with cloudio.open(f"{gcs_bucket}/d/a.tif") as ds:
        assert ds.overviews(1) == [2]


# -- consistency levels --------------------------------------------------------------------------


def test_strong_sees_write_elsewhere_with_one_extra_request(gcs_emulator: Emulator, gcs_bucket: str) -> None:
    url = f"{gcs_bucket}/d/a.tif"
    put_elsewhere(gcs_emulator, url, tif(1))
    put_elsewhere(gcs_emulator, f"{gcs_bucket}/d/b.tif", tif(1))
    with cloudio.session("strong") as s:
        assert cloud_read(url) == ((1, 64, 64), 1)
        n = len(gcs_emulator.requests())
        assert cloud_read(url) == ((1, 64, 64), 1)
        assert data_gets(gcs_emulator, n) == 1  # unchanged: the metadata request only
        put_elsewhere(gcs_emulator, url, tif(2, 128))
        n = len(gcs_emulator.requests())
        assert cloud_read(url) == ((1, 128, 128), 2)
        strong = data_gets(gcs_emulator, n)
    assert s.stats.revalidations == 3
    # the same change read at the session level, journaled like a tracked filesystem's write
    cloud_read(f"{gcs_bucket}/d/b.tif")
    put_elsewhere(gcs_emulator, f"{gcs_bucket}/d/b.tif", tif(2, 128))
    journal().record(f"{gcs_bucket}/d/b.tif", "write")
    n = len(gcs_emulator.requests())
    assert cloud_read(f"{gcs_bucket}/d/b.tif") == ((1, 128, 128), 2)
    session_level = data_gets(gcs_emulator, n)
    assert strong == session_level + 1


def test_strong_after_own_write_needs_no_clear(gcs_emulator: Emulator, gcs_bucket: str) -> None:
    url = f"{gcs_bucket}/a.tif"
    fs = cloudio.filesystem(url)
    fs.pipe(url, tif(1))
    with cloudio.session("strong"):
        assert cloud_read(url) == ((1, 64, 64), 1)
        fs.pipe(url, tif(2))
        assert cloud_read(url) == ((1, 64, 64), 2)
        n = len(gcs_emulator.requests())
        assert cloud_read(url) == ((1, 64, 64), 2)
        assert data_gets(gcs_emulator, n) == 1


def test_strong_missing_object(gcs_bucket: str) -> None:
    with cloudio.session("strong"):
        with pytest.raises(cloudio.ObjectNotFoundError, match="x.tif does not exist"):
            cloudio.open(f"{gcs_bucket}/x.tif")
        with pytest.raises(cloudio.BucketNotFoundError, match="no-such-bucket-cloudio"):
            cloudio.open("gs://no-such-bucket-cloudio/x.tif")


def test_bounded_staleness(gcs_emulator: Emulator, gcs_bucket: str) -> None:
    url = f"{gcs_bucket}/a.tif"
    put_elsewhere(gcs_emulator, url, tif(1))
    with cloudio.session(3600):
        assert cloud_read(url) == ((1, 64, 64), 1)
        put_elsewhere(gcs_emulator, url, tif(2))
        n = len(gcs_emulator.requests())
        assert cloud_read(url) == ((1, 64, 64), 1)  # checked less than an hour ago: no request
        assert data_gets(gcs_emulator, n) == 0
    with cloudio.session(0):
        assert cloud_read(url) == ((1, 64, 64), 2)


# -- datasets outlive the call ------------------------------------------------------------------


def test_dataset_read_in_another_thread_after_open_returned(gcs_emulator: Emulator, gcs_bucket: str) -> None:
    url = f"{gcs_bucket}/d/a.tif"
    cloudio.filesystem(url).pipe(url, tif(4, 256))
    ds = cloudio.open(url)  # no rasterio.Env is active once this returns
    bindings.clear(url.replace("gs://", "/vsigs/"))  # make GDAL fetch the pixels lazily, later
    n = len(gcs_emulator.requests())
    out: dict[str, object] = {}

    def work() -> None:
        try:
            out["v"] = read(ds)
        except Exception as e:  # pragma: no cover - reported below
            out["e"] = e

    t = threading.Thread(target=work)
    t.start()
    t.join()
    ds.close()
    assert out == {"v": ((1, 256, 256), 4)}
    assert data_gets(gcs_emulator, n) >= 1  # it really went to the emulator


def test_no_global_gdal_config_is_changed(gcs_bucket: str) -> None:
    url = f"{gcs_bucket}/a.tif"
    cloudio.filesystem(url).pipe(url, tif(1))
    cloud_read(url)
    lib = bindings._lib()
    lib.CPLGetConfigOption.restype = ctypes.c_char_p
    for key in (b"CPL_GS_ENDPOINT", b"GS_NO_SIGN_REQUEST", b"GDAL_DISABLE_READDIR_ON_OPEN"):
        assert lib.CPLGetConfigOption(key, None) is None


def test_session_counts(gcs_bucket: str) -> None:
    url = f"{gcs_bucket}/a.tif"
    fs = cloudio.filesystem(url)
    fs.pipe(url, tif(1))
    with cloudio.session() as s:
        cloud_read(url)
        cloud_read(url)
        fs.pipe(url, tif(2))
        cloud_read(url)
    assert s.stats.opens == 3
    assert s.stats.invalidations["gdal"] >= 1
    assert s.stats.revalidations == 0


@pytest.mark.skipif(not RASTERIO_15, reason="rasterio.cache exists from rasterio 1.5")
def test_rasterio_15_cache_module_is_used(gcs_bucket: str) -> None:
    import rasterio.cache

    url = f"{gcs_bucket}/a.tif"
    fs = cloudio.filesystem(url)
    fs.pipe(url, tif(1))
    assert cloud_read(url) == ((1, 64, 64), 1)
    fs.pipe(url, tif(2))
    assert cloud_read(url) == ((1, 64, 64), 2)
    assert bindings._clear_fn is rasterio.cache.invalidate  # not the ctypes fallback


# -- a dataset open across an overwrite ----------------------------------------------------------


def _read_or_error(ds) -> object:  # type: ignore[no-untyped-def]
    try:
        return read(ds)
    except RasterioIOError as e:
        return f"error: {e}"


@pytest.mark.characterization
def test_raw_old_dataset_poisons_later_opens(gcs_emulator: Emulator, gcs_bucket: str) -> None:
    """A dataset opened before an overwrite and read after it leaves GDAL's cache torn for good."""
    url = f"{gcs_bucket}/d/a.tif"
    put_elsewhere(gcs_emulator, url, tif(1, 32))
    with raw_env(gcs_emulator):
        old = rasterio.open(url.replace("gs://", "/vsigs/"))
        put_elsewhere(gcs_emulator, url, tif(2, 48))
        bindings.clear(url.replace("gs://", "/vsigs/"))  # even an exact clear right after the write
        _read_or_error(old)  # the old dataset reads new bytes cut at its old size
        old.close()
        with rasterio.open(url.replace("gs://", "/vsigs/")) as ds:
            assert _read_or_error(ds) != ((1, 48, 48), 2)


def test_old_dataset_does_not_poison_cloudio_opens(gcs_bucket: str) -> None:
    url = f"{gcs_bucket}/d/a.tif"
    fs = cloudio.filesystem(url)
    fs.pipe(url, tif(1, 32))
    old = cloudio.open(url)
    fs.pipe(url, tif(2, 48))
    _read_or_error(old)  # may be torn: it was opened before the write (GDAL reads lazily)
    with cloudio.open(url) as ds:  # while the old one is still open
        assert read(ds) == ((1, 48, 48), 2)
    _read_or_error(old)
    old.close()
    for _ in range(2):  # and after it closed
        assert cloud_read(url) == ((1, 48, 48), 2)


# -- the per-open fast path (one generation compared instead of re-planning) ----------------------


def test_close_of_a_reader_makes_no_request(gcs_emulator: Emulator, gcs_bucket: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Why cloudio's close needs no gate: GDAL's close of a reader does no I/O of the object or its sidecars."""
    data, ovr = ovr_for(4, 64, tmp_path)
    put_elsewhere(gcs_emulator, f"{gcs_bucket}/d/a.tif", data)
    put_elsewhere(gcs_emulator, f"{gcs_bucket}/d/a.tif.ovr", ovr)
    for _ in range(2):  # the second open takes the fast path
        ds = cloudio.open(f"{gcs_bucket}/d/a.tif")
        assert read(ds) == ((1, 64, 64), 4)
        assert ds.overviews(1) == [2]
        assert int(ds.read(out_shape=(1, 32, 32))[0, 0, 0]) == 4  # from the .ovr
        n = len(gcs_emulator.requests())
        ds.close()
        assert gcs_emulator.requests()[n:] == []


def _read_on_the_fast_path_then_replaced(emu: Emulator, url: str) -> None:
    """``url`` read three times (the later opens take the fast path), then replaced behind cloudio's back."""
    put_elsewhere(emu, url, tif(1))
    for _ in range(3):
        assert cloud_read(url) == ((1, 64, 64), 1)
    put_elsewhere(emu, url, tif(2, 32))


def test_fast_path_sees_a_journaled_change(gcs_emulator: Emulator, gcs_bucket: str) -> None:
    url = f"{gcs_bucket}/d/a.tif"
    _read_on_the_fast_path_then_replaced(gcs_emulator, url)
    cloudio.invalidate(url)
    assert cloud_read(url) == ((1, 32, 32), 2)
    put_elsewhere(gcs_emulator, f"{gcs_bucket}/d/a.tif.msk", tif(9))  # a new sidecar, announced
    cloudio.invalidate(f"{gcs_bucket}/d/a.tif.msk")
    with cloudio.open(url) as ds:
        assert int(ds.read_masks(1)[0, 0]) == 255  # GDAL found the .msk (it holds 9s)


def test_fast_path_does_not_skip_a_stronger_level(gcs_emulator: Emulator, gcs_bucket: str) -> None:
    url = f"{gcs_bucket}/d/a.tif"
    _read_on_the_fast_path_then_replaced(gcs_emulator, url)
    with cloudio.session("strong") as s:
        assert cloud_read(url) == ((1, 32, 32), 2)
    assert s.stats.revalidations == 1
    with cloudio.session(0):
        n = len(gcs_emulator.requests())
        assert cloud_read(url) == ((1, 32, 32), 2)
        assert data_gets(gcs_emulator, n) == 1  # one listing: the object and its sidecars


def test_fast_path_follows_a_new_time_limit(gcs_emulator: Emulator, gcs_bucket: str, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    url = f"{gcs_bucket}/d/a.tif"
    put_elsewhere(gcs_emulator, url, tif(1))
    for _ in range(3):
        assert cloud_read(url) == ((1, 64, 64), 1)
    monkeypatch.setenv("CLOUDIO_HTTP_TIMEOUT", "7")
    assert cloud_read(url) == ((1, 64, 64), 1)
    assert endpoint._endpoints[gcs_bucket[len("gs://"):]][0][2] == b"7"  # the bucket's options follow it
