"""GDAL read paths a rasterio user exercises (each test found by a review, each failing before its fix).

Every test runs against the real emulator; "another writer" is
``rasters.put`` (google-cloud-storage behind cloudio's back).
"""

from __future__ import annotations

import zipfile

import numpy as np
import pytest
from affine import Affine
from rasterio.errors import RasterioIOError
from rasters import put, tif

import cloudio
from cloudio.errors import CloudioError, StaleDatasetError

PROFILE = dict(driver="GTiff", width=64, height=64, count=1, dtype="uint8", tiled=True, blockxsize=16,
               blockysize=16, crs="EPSG:32631", transform=Affine(10, 0, 500_000, 0, -10, 5_000_000))


def _write(url: str, value: int, **kw: object) -> None:
    p = {**PROFILE, **kw}
    with cloudio.open(url, "w", **p) as dst:
        dst.write(np.full((1, p["height"], p["width"]), value, "uint8"))


@pytest.mark.parametrize("drivers", [["GTiff"], ("GTiff", "COG")])
def test_open_with_a_list_of_drivers_fails_as_rasterio_does_or_reads(gcs_bucket: str, drivers: object) -> None:
    """``driver=`` as a list: rasterio's answer is a ``TypeError`` ("invalid driver"); cloudio's an AttributeError.

    rasterio 1.4 documents a list of driver names for reading, and its
    ``rasterio.open`` refuses one with ``TypeError: invalid driver: ['GTiff']``.
    ``cloudio.open`` promises rasterio's signature, but ``_gdal_open_planned``
    (src/cloudio/_gdal/open.py:566, also :528 and :430) evaluates
    ``(driver or "").upper() == "VRT"`` first and dies with ``AttributeError:
    'list' object has no attribute 'upper'``: neither the TypeError code
    written for rasterio catches, nor a CloudioError naming the URL. Reading
    with the list (GDAL's allowed drivers) would be fine too.
    """
    url = f"{gcs_bucket}/d/a.tif"
    _write(url, 4)
    try:
        with cloudio.open(url, driver=drivers) as ds:
            value = int(ds.read(1)[0, 0])
    except TypeError:
        return  # what rasterio.open itself raises
    assert value == 4


def test_shared_open_after_an_overwrite_reads_the_new_version(gcs_bucket: str) -> None:
    """``sharing=True``: a new ``cloudio.open`` after an overwrite returns the pre-overwrite GDAL handle.

    The docs promise that an object overwritten through ``cloudio.open(..., "w")``
    "reads back new at its next cloudio.open". With ``sharing=True`` the open
    (fast path src/cloudio/_gdal/open.py:412, and ``_rio_open`` :550) passes
    GDAL_OF_SHARED, and GDAL hands back the shared dataset still open from
    before the write. cloudio stamps that old handle with the new epoch, so
    ``_io`` trusts it: the fresh dataset reads the OLD pixels (1), while the
    older dataset, correctly renewed, reads 2.
    """
    url = f"{gcs_bucket}/s/a.tif"
    _write(url, 1)
    old = cloudio.open(url, sharing=True)
    try:
        assert old.read(1)[0, 0] == 1
        _write(url, 2)
        with cloudio.open(url, sharing=True) as new:
            assert new.read(1)[0, 0] == 2
        assert old.read(1)[0, 0] == 2
    finally:
        old.close()


def test_shared_open_after_an_overwrite_in_another_size_has_the_new_size(gcs_bucket: str) -> None:
    """Same root cause as above, worse outcome: the new open reports the old size and pixels.

    After the object was rewritten at 128x128 with value 2, ``cloudio.open(url,
    sharing=True)`` returns GDAL's shared 64x64 handle from before the write:
    shape (64, 64), value 1, and no StaleDatasetError (its epoch is current).
    """
    url = f"{gcs_bucket}/s/b.tif"
    _write(url, 1)
    old = cloudio.open(url, sharing=True)
    try:
        old.read()
        _write(url, 2, width=128, height=128)
        with cloudio.open(url, sharing=True) as new:
            assert new.shape == (128, 128)
            assert new.read(1)[0, 0] == 2
    finally:
        old.close()


@pytest.mark.parametrize("spelling", ["/vsizip//vsigs/{b}/z/a.zip/a.tif", "zip+gs://{b}/z/a.zip!a.tif"])
def test_archive_wrapped_gcs_path_is_read_or_clearly_refused(gcs_bucket: str, gcs_emulator: object,
                                                              tmp_path: object, spelling: str) -> None:
    """A GCS object wrapped in ``/vsizip/`` (or rasterio's ``zip+gs://``) works only by accident.

    ``is_gcs`` does not recognise the wrapped spellings, so ``cloudio.open``
    hands them to ``rasterio.open`` untouched (src/cloudio/_gdal/open.py:397)
    without ``ensure_endpoint`` for the bucket. In a bucket cloudio has already
    opened, the per-bucket path options make it read (even afresh after a
    journaled overwrite); in a bucket it has not, GDAL goes to Google and fails
    with a bare ``RasterioIOError`` about missing GS credentials: neither
    supported nor refused with a CloudioError naming the URL.
    """
    z = tmp_path / "a.zip"  # type: ignore[operator]
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("a.tif", tif(5))
    put(gcs_emulator, f"{gcs_bucket}/z/a.zip", z.read_bytes())  # type: ignore[arg-type]
    path = spelling.format(b=gcs_bucket.removeprefix("gs://"))
    try:
        with cloudio.open(path) as ds:
            value = int(ds.read(1)[0, 0])
    except CloudioError as e:
        assert "a.zip" in str(e)
    except RasterioIOError as e:
        pytest.fail(f"neither read nor refused by cloudio: {type(e).__name__}: {e}")
    else:
        assert value == 5


def test_dataset_open_across_an_overwrite_never_pairs_new_pixels_with_old_metadata(gcs_bucket: str) -> None:
    """New pixels come with the old colour table, tags and band descriptions.

    A dataset opened before an overwrite through cloudio reads from a fresh
    open (``_renew``) when ``_layout`` (src/cloudio/_gdal/open.py:241-246)
    matches; ``_layout`` checks size, bands, dtypes, blocks, georeferencing,
    nodata, scales and offsets, but ``colormap()``, ``tags()`` and
    ``descriptions`` are answered by the old handle. So the read returns the
    new palette index 2 while ``colormap(1)`` is the old palette, in which 2 is
    black, not red: the pixels are rendered wrongly. The docs promise "never
    pixels from two versions"; either the metadata must come from the fresh
    open or the read must raise StaleDatasetError.
    """
    url = f"{gcs_bucket}/c/a.tif"

    def write(value: int, cmap: dict[int, tuple[int, int, int, int]], tag: str) -> None:
        with cloudio.open(url, "w", **PROFILE, photometric="palette") as dst:
            dst.write(np.full((1, 64, 64), value, "uint8"))
            dst.write_colormap(1, cmap)
            dst.update_tags(version=tag)
            dst.set_band_description(1, f"band {tag}")

    red, blue = (255, 0, 0, 255), (0, 0, 255, 255)
    write(1, {1: red}, "1")
    ds = cloudio.open(url)
    try:
        assert ds.read(1)[0, 0] == 1
        write(2, {1: blue, 2: red}, "2")
        try:
            px = int(ds.read(1)[0, 0])
        except StaleDatasetError:
            return  # refusing is an acceptable answer
        assert px == 2
        assert ds.colormap(1)[px] == red
        assert ds.tags().get("version") == "2"
        assert ds.descriptions == ("band 2",)
    finally:
        ds.close()


def test_stale_dataset_error_after_another_writer_does_not_blame_this_process(gcs_bucket: str,
                                                                              gcs_emulator: object) -> None:
    """The StaleDatasetError raised after a strong open caught another writer says "overwritten by this process".

    A dataset opened at the session level, the object rewritten by another
    writer at another size, then a ``"strong"`` open notices it and bumps the
    epoch; the old dataset's next read raises StaleDatasetError whose message
    (``_stale``, src/cloudio/_gdal/open.py:249-253) states that *this process*
    overwrote the object, which it did not: the message misleads the user
    looking for the writer.
    """
    url = f"{gcs_bucket}/q/a.tif"
    put(gcs_emulator, url, tif(1))  # type: ignore[arg-type]
    ds = cloudio.open(url)
    try:
        ds.read()
        put(gcs_emulator, url, tif(2, 128))  # type: ignore[arg-type]
        with cloudio.session("strong"), cloudio.open(url) as fresh:
            assert fresh.shape == (128, 128)
        with pytest.raises(StaleDatasetError) as info:
            ds.read()
        assert url in str(info.value) and "cloudio.open" in str(info.value)
        assert "by this process" not in str(info.value)
    finally:
        ds.close()


def test_open_with_an_empty_driver_list_reads_as_rasterio_does(gcs_emulator, gcs_bucket):
    """``driver=[]`` (no restriction) is accepted by ``rasterio.open`` (its check is
    ``if driver and not isinstance(driver, str)``); ``cloudio.open`` must read the object too.

    The new check raises TypeError for any non-str driver that is not None, stricter than the
    rasterio refusal it claims to mirror.
    """
    put(gcs_emulator, f"{gcs_bucket}/t.tif", tif(9, 4))
    with cloudio.open(f"{gcs_bucket}/t.tif", driver=[]) as ds:
        assert int(ds.read(1)[0, 0]) == 9
