"""GDAL writes through cloudio.open: a neighbour dataset's sidecars survive an overwrite, and GDAL's refusal at close
is cloudio's error naming the URL. Found by a review; each test failed before its fix."""
from __future__ import annotations

import numpy as np
import pytest
from affine import Affine

import cloudio
from cloudio.emulator import Emulator

PROFILE = dict(
    driver="GTiff", width=64, height=64, count=1, dtype="uint8",
    crs="EPSG:32633", transform=Affine(10, 0, 500000, 0, -10, 4000000), nodata=0,
)
T2 = Affine(20, 0, 600000, 0, -20, 4100000)
#: georeferencing in sidecars only: a world file (.tfw) and the CRS in .aux.xml
BASELINE = dict(PROFILE="BASELINE", tfw="YES")


def _keys(emu: Emulator, bucket: str) -> set[str]:
    return {b.name for b in emu.client.list_blobs(bucket.removeprefix("gs://"))}


def test_overwriting_a_tif_keeps_the_world_file_a_tiff_of_the_same_stem_reads(
        gcs_emulator: Emulator, gcs_bucket: str) -> None:
    """GDAL reads ``a.tfw`` for ``a.tiff`` as well as for ``a.tif`` (first and last letters of the extension,
    then 'w'); writing ``a.tif`` must not take the neighbour dataset's georeferencing away."""
    a_tiff = f"{gcs_bucket}/w/a.tiff"
    with cloudio.open(a_tiff, "w", **{**PROFILE, **BASELINE, "crs": None, "transform": T2}) as ds:
        ds.write(np.full((1, 64, 64), 1, "uint8"))
    assert "w/a.tfw" in _keys(gcs_emulator, gcs_bucket)
    with cloudio.open(a_tiff) as r:
        assert r.transform == T2
    with cloudio.open(f"{gcs_bucket}/w/a.tif", "w", **PROFILE) as ds:  # another dataset, same stem
        ds.write(np.full((1, 64, 64), 2, "uint8"))
    assert "w/a.tfw" in _keys(gcs_emulator, gcs_bucket), "a.tiff's world file was deleted"
    with cloudio.open(a_tiff) as r:
        assert r.transform == T2, "a.tiff lost its georeferencing"


def test_a_create_copy_that_gdal_refuses_at_close_is_a_cloudio_error_naming_the_url(
        gcs_emulator: Emulator, gcs_bucket: str, journal_records) -> None:
    """COG (and PNG, JPEG) render at close; GDAL's refusal there must be cloudio's error naming the URL,
    not GDAL's own naming cloudio's temporary file."""
    url = f"{gcs_bucket}/p/c.tif"
    with pytest.raises(Exception) as ei:
        with cloudio.open(url, "w", **{**PROFILE, "driver": "COG", "blocksize": 17}) as ds:
            ds.write(np.ones((1, 64, 64), "uint8"))
    assert journal_records == [] and "p/c.tif" not in _keys(gcs_emulator, gcs_bucket)
    msg = str(ei.value)
    assert "cloudio-write-" not in msg, msg
    assert isinstance(ei.value, cloudio.CloudioError), f"{type(ei.value).__name__}: {msg}"
    assert url in msg and ei.value.__cause__ is not None


def test_unsupported_dtype_for_jpeg_is_a_cloudio_error_naming_the_url(gcs_emulator: Emulator, gcs_bucket: str,
                                                                      journal_records) -> None:
    url = f"{gcs_bucket}/p/f.jpg"
    with pytest.raises(Exception) as ei:
        with cloudio.open(url, "w", **{**PROFILE, "driver": "JPEG", "dtype": "float32", "nodata": None}) as ds:
            ds.write(np.ones((1, 64, 64), "float32"))
    assert journal_records == []
    assert isinstance(ei.value, cloudio.CloudioError), f"{type(ei.value).__name__}: {ei.value}"
    assert url in str(ei.value) and ei.value.__cause__ is not None


def test_an_old_sidecars_delete_that_landed_before_its_retries_failed_is_journaled(
        gcs_emulator: Emulator, gcs_bucket: str, fault_proxy, journal_records, quick_retries, monkeypatch) -> None:
    """The overwrite's delete of the old ``a.tfw`` reaches the server, its answer is lost, and every retry is
    refused: the write says so (UploadError naming the sidecar), and the journal, which must match what the
    server holds, tells the caches that ``a.tfw`` may have changed."""
    monkeypatch.setenv("CLOUDIO_HTTP_TIMEOUT", "1")
    url = f"{gcs_bucket}/d/a.tif"
    with cloudio.open(url, "w", **{**PROFILE, **BASELINE, "crs": None, "transform": T2}) as ds:
        ds.write(np.full((1, 64, 64), 1, "uint8"))
    assert "d/a.tfw" in _keys(gcs_emulator, gcs_bucket)
    fault_proxy.add("late", method="DELETE", path=r"/o/d%2Fa\.tfw", seconds=3)
    fault_proxy.add("status", method="DELETE", path=r"/o/d%2Fa\.tfw", code=503, times=None)
    journal_records.clear()
    with pytest.raises(cloudio.UploadError, match=r"a\.tfw"):
        with cloudio.open(url, "w", **PROFILE) as ds:
            ds.write(np.full((1, 64, 64), 2, "uint8"))
    assert "d/a.tfw" not in _keys(gcs_emulator, gcs_bucket)  # the first delete landed
    told = [c.kind for c in journal_records if c.url == f"{gcs_bucket}/d/a.tfw"]
    assert told, "the journal says nothing of a.tfw, which the server deleted"
