"""GDAL's ``/vsigs/`` caches go stale when another client writes (raw rasterio, no cloudio).

Rows 1-3 of docs/design.md's "The problem, measured" table. Each test asserts
the stale result, and fails (saying so) the day GDAL returns the fresh one.
"""

from __future__ import annotations

import numpy as np
import pytest
import rasterio
import rasterio.shutil
from rasterio.errors import RasterioIOError

from cloudio.emulator import Emulator

from ._helpers import gdal_readdir, geotiff, rasterio_version, raw_gcsfs

pytestmark = [pytest.mark.characterization, pytest.mark.usefixtures("gdal_env")]

FIXED = "upstream fixed? GDAL {} now sees the other client's write: update docs/design.md's table and this test"


def test_listing_misses_new_object(gcs_emulator: Emulator, bucket: str) -> None:
    """GDAL issue 11351: files created in a folder GDAL has already listed are not found.

    GDAL lists ``d/``; ``d/b.tif`` is written by another client; GDAL's
    listing of ``d/`` still lacks it and GDAL's stat says it does not exist.
    """
    client = gcs_emulator.client
    client.bucket(bucket).blob("d/a.tif").upload_from_string(geotiff(8, 1))
    assert gdal_readdir(f"/vsigs/{bucket}/d/") == ["a.tif"]

    client.bucket(bucket).blob("d/b.tif").upload_from_string(geotiff(8, 2))
    assert client.bucket(bucket).get_blob("d/b.tif") is not None  # it is on the server

    listing = gdal_readdir(f"/vsigs/{bucket}/d/")
    exists = rasterio.shutil.exists(f"/vsigs/{bucket}/d/b.tif")
    assert "b.tif" not in listing, FIXED.format("listing")
    assert listing == ["a.tif"]  # the old listing, served from cache
    assert exists is False, FIXED.format("stat")


def _reopen_after_overwrite(gcs_emulator: Emulator, bucket: str, writer: str) -> tuple[str, object]:
    """Open a 64x64 (value 1) GeoTIFF, let ``writer`` overwrite it (128x128, value 2), reopen.

    Returns ``("stale", ...)``, ``("torn", ...)`` or ``("fresh", ...)``.
    """
    key = "d/a.tif"
    path = f"/vsigs/{bucket}/{key}"
    old, new = geotiff(64, 1), geotiff(128, 2)
    gcs_emulator.client.bucket(bucket).blob(key).upload_from_string(old)
    with rasterio.open(path) as ds:
        assert ds.shape == (64, 64)
        assert (ds.read(1) == 1).all()

    if writer == "google-cloud-storage":
        gcs_emulator.client.bucket(bucket).blob(key).upload_from_string(new)
    else:
        raw_gcsfs(gcs_emulator, separate=True).pipe(f"{bucket}/{key}", new)
    assert gcs_emulator.client.bucket(bucket).blob(key).download_as_bytes() == new

    try:
        with rasterio.open(path) as ds:
            shape, pixels = ds.shape, ds.read(1)
    except RasterioIOError as e:
        # GDAL 3.12: the cached header points past what it fetches of the new bytes
        return ("torn" if "read failed" in str(e).lower() else "error", str(e))
    if shape == (64, 64) and np.array_equal(np.unique(pixels), [1]):
        return ("stale", (shape, np.unique(pixels).tolist()))
    if shape == (128, 128) and np.array_equal(np.unique(pixels), [2]):
        return ("fresh", (shape, np.unique(pixels).tolist()))
    return ("torn", (shape, np.unique(pixels).tolist()))


def test_reopen_after_overwrite_returns_old_raster(gcs_emulator: Emulator, bucket: str) -> None:
    """rasterio issue 3254 (a raster rewritten on GCS cannot be reopened fresh in the same
    process) and rasterio issue 1078 (no control over vsicurl caching).

    GDAL opens ``d/a.tif`` (64x64, value 1); google-cloud-storage overwrites it
    with 128x128, value 2; GDAL reopens it and returns the old shape and pixels.
    Measured stale with rasterio 1.4.4/GDAL 3.10.3 and 1.5.2/GDAL 3.12.2.
    """
    outcome, detail = _reopen_after_overwrite(gcs_emulator, bucket, "google-cloud-storage")
    assert outcome != "fresh", FIXED.format("reopen")
    if rasterio_version() < (1, 5):
        assert (outcome, detail) == ("stale", ((64, 64), [1]))
    else:  # rasterio 1.5 / GDAL 3.12 may fail the read instead of serving old pixels
        assert outcome in ("stale", "torn"), detail
        if outcome == "stale":
            assert detail == ((64, 64), [1])


def test_reopen_after_gcsfs_overwrite_is_stale_or_torn(gcs_emulator: Emulator, bucket: str) -> None:
    """rasterio issue 3254, with the overwrite made by gcsfs (another library, same process).

    docs/design.md measured ``Read failed`` (a torn mix of the cached header and the
    new bytes) with rasterio 1.5.2/GDAL 3.12.2; here it may also come back as
    the old 64x64 raster. rasterio 1.4 (GDAL 3.10) returns the old raster.
    """
    outcome, detail = _reopen_after_overwrite(gcs_emulator, bucket, "gcsfs")
    assert outcome != "fresh", FIXED.format("reopen")
    if rasterio_version() < (1, 5):
        assert (outcome, detail) == ("stale", ((64, 64), [1]))
    else:
        assert outcome in ("stale", "torn"), detail
        if outcome == "stale":
            assert detail == ((64, 64), [1])
