"""``cloudio.open(url, "w" | "w+" | "r+")``: render locally, upload once on a clean close."""

from __future__ import annotations

import base64
import os
import uuid

import google_crc32c
import numpy as np
import pytest
import rasterio
from affine import Affine

import cloudio
from cloudio._gcs.client import gcs_filesystem
from cloudio._journal import journal
from cloudio._paths import parse_gcs
from cloudio.emulator import Emulator

PROFILE = dict(
    driver="GTiff", width=64, height=64, count=1, dtype="uint8",
    crs="EPSG:32633", transform=Affine(10, 0, 500000, 0, -10, 4000000), nodata=0,
)


def _crc(data: bytes) -> str:
    return base64.b64encode(google_crc32c.value(data).to_bytes(4, "big")).decode()


def _blob(emu: Emulator, url: str):  # type: ignore[no-untyped-def]
    p = parse_gcs(url)
    return emu.client.bucket(p.bucket).get_blob(p.key)


def _records(url: str, since: int) -> list[object]:
    return [c for c in journal().since(since) if c.url == url]


def _pattern(shape: tuple[int, int], seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(1, 255, size=(1, *shape), dtype="uint8")


def test_write_then_read_bit_exact(gcs_emulator: Emulator, gcs_bucket: str) -> None:
    url = f"{gcs_bucket}/d/a.tif"
    data = _pattern((64, 64), 1)
    seq = journal().seq
    with cloudio.session() as s:
        with cloudio.open(url, "w", **PROFILE) as ds:
            ds.write(data)
            assert ds.name == parse_gcs(url).vsi and not ds.closed
            assert _blob(gcs_emulator, url) is None  # nothing is uploaded before the close
            local = ds.files[0]
    assert ds.closed and not os.path.exists(os.path.dirname(local))  # temp folder removed
    with cloudio.open(url) as r:
        assert (r.read() == data).all()
        assert (r.crs, r.transform, r.nodata) == (rasterio.CRS.from_epsg(32633), PROFILE["transform"], 0)
    # through gcsfs: the full size, and the server's CRC32C matches the bytes
    fs = gcs_filesystem()
    raw = fs.cat_file(parse_gcs(url).fs_path)
    blob = _blob(gcs_emulator, url)
    assert len(raw) == blob.size == fs.info(parse_gcs(url).fs_path)["size"]
    assert _crc(raw) == blob.crc32c == ds.uploaded[0].crc32c  # what GDAL rendered is what is stored
    [rec] = _records(url, seq)
    assert (rec.kind, rec.generation, rec.size) == ("write", blob.generation, blob.size)
    assert (s.stats.uploads, s.stats.bytes_uploaded) == (1, blob.size)
    assert [u.url for u in ds.uploaded] == [url]


def test_exception_in_with_uploads_nothing(gcs_emulator: Emulator, gcs_bucket: str) -> None:
    url = f"{gcs_bucket}/d/boom.tif"
    seq = journal().seq
    n0 = len(gcs_emulator.requests())
    with pytest.raises(RuntimeError, match="boom"):
        with cloudio.open(url, "w", **PROFILE) as ds:
            ds.write(_pattern((64, 64), 2))
            local = ds.files[0]
            raise RuntimeError("boom")
    assert ds.closed
    assert not os.path.exists(os.path.dirname(local))
    assert _blob(gcs_emulator, url) is None
    assert _records(url, seq) == []
    assert not [r for r in gcs_emulator.requests()[n0:] if r.method in ("POST", "PUT")]


def test_explicit_close_uploads_once(gcs_emulator: Emulator, gcs_bucket: str) -> None:
    url = f"{gcs_bucket}/c.tif"
    seq = journal().seq
    ds = cloudio.open(url, "w", **PROFILE)
    ds.write(_pattern((64, 64), 3))
    ds.close()
    ds.close()  # idempotent: no second upload
    assert len(_records(url, seq)) == 1
    assert _blob(gcs_emulator, url) is not None


def test_r_plus_update_is_visible(gcs_emulator: Emulator, gcs_bucket: str) -> None:
    url = f"{gcs_bucket}/d/u.tif"
    with cloudio.open(url, "w", **PROFILE) as ds:
        ds.write(np.full((1, 64, 64), 5, "uint8"))
    with cloudio.open(url) as r:  # GDAL now caches the old bytes
        assert r.read().max() == 5
    with cloudio.open(url, "r+") as ds:
        assert ds.read().max() == 5 and ds.name == parse_gcs(url).vsi
        ds.write(np.full((1, 32, 64), 9, "uint8"), window=((0, 32), (0, 64)))
        ds.update_tags(note="updated")
    with cloudio.open(url) as r:
        a = r.read()
        assert (a[0, :32] == 9).all() and (a[0, 32:] == 5).all()
        assert r.tags()["note"] == "updated"


def test_r_plus_sees_a_write_made_elsewhere(gcs_emulator: Emulator, gcs_bucket: str, tmp_path) -> None:
    url = f"{gcs_bucket}/d/e.tif"
    with cloudio.open(url, "w", **PROFILE) as ds:
        ds.write(np.full((1, 64, 64), 1, "uint8"))
    with cloudio.open(url) as r:
        r.read()
    other = tmp_path / "o.tif"  # overwritten by another client, not through cloudio
    with rasterio.open(other, "w", **{**PROFILE, "width": 32, "height": 32}) as o:
        o.write(np.full((1, 32, 32), 7, "uint8"))
    _blob(gcs_emulator, url).upload_from_filename(str(other))
    with cloudio.open(url, "r+") as ds:  # downloads the current object, not a cached one
        assert ds.shape == (32, 32) and ds.read().max() == 7


def test_overwrite_with_a_smaller_file(gcs_emulator: Emulator, gcs_bucket: str) -> None:
    url = f"{gcs_bucket}/d/s.tif"
    big = _pattern((256, 256), 4)
    with cloudio.open(url, "w", **{**PROFILE, "width": 256, "height": 256}) as ds:
        ds.write(big)
    fs = gcs_filesystem()
    fs.ls(parse_gcs(url).parent.fs_path)  # gcsfs caches the big size
    with cloudio.open(url) as r:  # GDAL caches the big header and blocks
        assert r.shape == (256, 256)
    small = _pattern((16, 16), 5)
    with cloudio.open(url, "w", **{**PROFILE, "width": 16, "height": 16}) as ds:
        ds.write(small)
    with cloudio.open(url) as r:
        assert r.shape == (16, 16) and (r.read() == small).all()
    blob = _blob(gcs_emulator, url)
    assert fs.info(parse_gcs(url).fs_path)["size"] == blob.size
    assert _crc(fs.cat_file(parse_gcs(url).fs_path)) == blob.crc32c


@pytest.mark.parametrize("driver,ext,sidecar", [("PNG", "png", True), ("COG", "tif", False), ("JPEG", "jpg", True)])
def test_create_copy_drivers(gcs_emulator: Emulator, gcs_bucket: str, driver: str, ext: str, sidecar: bool) -> None:
    url = f"{gcs_bucket}/d/x.{ext}"
    data = np.full((1, 64, 64), 77, "uint8")
    with cloudio.open(url, "w", **{**PROFILE, "driver": driver, "nodata": None}) as ds:
        ds.write(data)
    names = sorted(u.url for u in ds.uploaded)
    assert names == sorted([url] + ([url + ".aux.xml"] if sidecar else []))
    with cloudio.open(url) as r:
        assert r.crs == rasterio.CRS.from_epsg(32633) and r.transform == PROFILE["transform"]
        if driver == "JPEG":
            assert abs(int(r.read().mean()) - 77) <= 1  # lossy
        else:
            assert (r.read() == data).all()
        if driver == "COG":
            assert r.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG"


def test_w_plus_reads_back_before_close(gcs_emulator: Emulator, gcs_bucket: str) -> None:
    url = f"{gcs_bucket}/wp.tif"
    with cloudio.open(url, "w+", **PROFILE) as ds:
        ds.write(np.full((1, 64, 64), 3, "uint8"))
        assert ds.read().max() == 3
    with cloudio.open(url) as r:
        assert r.read().max() == 3


def test_bad_url_names_it(gcs_emulator: Emulator) -> None:
    for bad in ("gs://Bad_Bucket/x.tif", "gs:///x.tif", "/vsigs/b/../../x.tif"):
        with pytest.raises(cloudio.InvalidURLError) as ei:
            cloudio.open(bad, "w", **PROFILE)
        assert bad in str(ei.value)


def test_missing_bucket(gcs_emulator: Emulator) -> None:
    url = f"gs://no-such-{uuid.uuid4().hex[:12]}/x.tif"
    with pytest.raises(cloudio.BucketNotFoundError) as ei:
        cloudio.open(url, "w", **PROFILE)
    assert url in str(ei.value)
    with pytest.raises(cloudio.BucketNotFoundError):
        cloudio.open(url, "r+")


def test_r_plus_missing_object(gcs_emulator: Emulator, gcs_bucket: str) -> None:
    url = f"{gcs_bucket}/missing.tif"
    with pytest.raises(cloudio.ObjectNotFoundError) as ei:
        cloudio.open(url, "r+")
    assert url in str(ei.value) and isinstance(ei.value, FileNotFoundError)


def test_driver_errors(gcs_emulator: Emulator, gcs_bucket: str) -> None:
    with pytest.raises(cloudio.ConfigurationError, match="write_vrt"):
        cloudio.open(f"{gcs_bucket}/x.vrt", "w", **{**PROFILE, "driver": "VRT"})
    no_driver = {k: v for k, v in PROFILE.items() if k != "driver"}
    with pytest.raises(cloudio.ConfigurationError, match="driver="):
        cloudio.open(f"{gcs_bucket}/x.unknownext", "w", **no_driver)
    with cloudio.open(f"{gcs_bucket}/ok.tif", "w", **no_driver) as ds:  # GTiff from the extension
        ds.write(np.ones((1, 64, 64), "uint8"))
    assert ds.driver == "GTiff"


def test_dataset_dropped_without_close_uploads_nothing(gcs_emulator: Emulator, gcs_bucket: str) -> None:
    import gc

    url = f"{gcs_bucket}/dropped.tif"
    seq = journal().seq
    ds = cloudio.open(url, "w", **PROFILE)
    ds.write(np.ones((1, 64, 64), "uint8"))
    folder = os.path.dirname(ds.files[0])
    del ds
    gc.collect()
    assert not os.path.exists(folder)
    assert _blob(gcs_emulator, url) is None and _records(url, seq) == []


def test_threads_write_concurrently(gcs_emulator: Emulator, gcs_bucket: str) -> None:
    from concurrent.futures import ThreadPoolExecutor

    def write(i: int) -> None:
        with cloudio.open(f"{gcs_bucket}/t/{i}.tif", "w", **PROFILE) as ds:
            ds.write(np.full((1, 64, 64), i + 1, "uint8"))

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(write, range(8)))
    for i in range(8):
        with cloudio.open(f"{gcs_bucket}/t/{i}.tif") as r:
            assert r.read().max() == r.read().min() == i + 1


def test_fsspec_reads_full_new_size_after_gdal_write(gcs_emulator: Emulator, gcs_bucket: str) -> None:
    """A user's own fsspec filesystem listed the prefix before; the write grows the file."""
    url = f"{gcs_bucket}/d/g.tif"
    with cloudio.open(url, "w", **{**PROFILE, "width": 8, "height": 8}) as ds:
        ds.write(np.ones((1, 8, 8), "uint8"))
    fs = cloudio.filesystem(gcs_bucket)
    key = parse_gcs(url).fs_path
    old = fs.ls(parse_gcs(url).parent.fs_path, detail=True)[0]["size"]
    big = _pattern((256, 256), 6)
    with cloudio.open(url, "w", **{**PROFILE, "width": 256, "height": 256}) as ds:
        ds.write(big)
    blob = _blob(gcs_emulator, url)
    assert blob.size > old
    assert fs.info(key)["size"] == blob.size
    with fs.open(key, "rb") as f:
        data = f.read()
    assert len(data) == blob.size and _crc(data) == blob.crc32c


# -- what the journal says after a failed write, and writes that used to fail -------------------


def test_failed_overwrite_journals_what_the_server_holds(gcs_emulator: Emulator, gcs_bucket: str, fault_proxy) -> None:
    url = f"{gcs_bucket}/d/over.tif"
    with cloudio.open(url, "w", **PROFILE) as ds:
        ds.write(_pattern((64, 64), 1))
    with cloudio.open(url) as r:  # GDAL now caches the object
        assert r.read().shape == (1, 64, 64)
    fs = cloudio.filesystem(url)
    fs.pipe(f"{gcs_bucket}/d/keep.bin", b"keeps the folder listable")
    assert f"{url[5:]}" in fs.ls(f"{gcs_bucket}/d")  # and the listing caches it
    fault_proxy.add("flip", where="request", method="POST", path=r"/upload/", times=None)
    with pytest.raises(cloudio.IntegrityError, match=r"(?s)over\.tif.*PREVIOUS OBJECT.*IS GONE"):
        with cloudio.open(url, "w", **PROFILE) as ds:
            ds.write(_pattern((64, 64), 2))
    fault_proxy.clear()
    assert _blob(gcs_emulator, url) is None  # the server holds nothing...
    with pytest.raises(cloudio.ObjectNotFoundError, match=r"over\.tif"):  # ...and cloudio says so
        cloudio.open(url)
    assert f"{url[5:]}" not in fs.ls(f"{gcs_bucket}/d")


def test_key_with_a_300_byte_last_segment(gcs_emulator: Emulator, gcs_bucket: str) -> None:
    name = "n" * 296 + ".tif"
    url = f"{gcs_bucket}/d/{name}"
    data = _pattern((64, 64), 3)
    with cloudio.open(url, "w", **PROFILE) as ds:
        ds.write(data)
    with cloudio.open(url) as r:
        assert r.driver == "GTiff" and (r.read() == data).all()
    with cloudio.open(url, "r+") as ds:  # the update path downloads to a temp file as well
        ds.write(data[:, ::-1].copy())
    with cloudio.open(url) as r:
        assert (r.read() == data[:, ::-1]).all()


def test_r_plus_of_a_non_raster_names_the_url(gcs_emulator: Emulator, gcs_bucket: str) -> None:
    url = f"{gcs_bucket}/d/notes.txt"
    cloudio.filesystem(url).pipe(url, b"not a raster at all\n")
    with pytest.raises(cloudio.CloudioError) as ei:
        cloudio.open(url, "r+")
    msg = str(ei.value)
    assert url in msg and "cloudio-write-" not in msg and "raster" in msg
    assert ei.value.__cause__ is not None


def test_upload_that_never_gets_an_answer_ends(gcs_emulator: Emulator, gcs_bucket: str, fault_proxy,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    monkeypatch.setenv("CLOUDIO_HTTP_TIMEOUT", "1")
    url = f"{gcs_bucket}/d/hang.tif"
    cloudio.filesystem(url).ls(gcs_bucket)  # the bucket is known before the fault
    fault_proxy.add("hang", method="POST", path=r"/upload/", times=None)
    seq = journal().seq
    t0 = time.monotonic()
    with pytest.raises(cloudio.TransientError, match=r"hang\.tif") as ei, cloudio.open(url, "w", **PROFILE) as ds:
        ds.write(_pattern((64, 64), 4))
    assert time.monotonic() - t0 < 120  # generous: it ends, it does not hang
    assert ei.value.__cause__ is not None
    assert [c.kind for c in _records(url, seq)] == ["invalidate"]  # outcome unknown: caches dropped
    assert _blob(gcs_emulator, url) is None
