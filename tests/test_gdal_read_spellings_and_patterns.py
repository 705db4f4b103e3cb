"""GDAL reads through ``cloudio.open`` for the URL spellings and read patterns a rasterio user uses (found by a
review; the /vsicurl/ spellings, a key naming a network failure and a forced driver failed before their fixes,
the others pin behaviour that had no test)."""

from __future__ import annotations

from urllib.parse import quote

import numpy as np
import pytest
import rasterio
from affine import Affine
from rasterio.errors import RasterioIOError
from rasterio.windows import Window
from rasters import noise, tif

import cloudio
from cloudio.errors import CloudioError, ReadError

PROFILE = dict(driver="GTiff", width=256, height=256, count=2, dtype="uint16", tiled=True, blockxsize=64,
               blockysize=64, crs="EPSG:32631", transform=Affine(10, 0, 500_000, 0, -10, 5_000_000))


def _data(count: int = 2, size: int = 256) -> np.ndarray:
    return np.arange(count * size * size, dtype="uint32").reshape(count, size, size).astype("uint16")


def _write(url: str, **kw: object) -> np.ndarray:
    p = {**PROFILE, **kw}
    data = _data(p["count"], p["height"])  # type: ignore[arg-type]
    with cloudio.open(url, "w", **p) as dst:
        dst.write(data)
    return data


# ---------------------------------------------------------------- URL spellings


@pytest.mark.parametrize("host", ["storage.googleapis.com", "storage.cloud.google.com"])
def test_https_spellings_read_the_object(gcs_bucket: str, host: str) -> None:
    # passes: pins the https spellings the API page promises
    b = gcs_bucket[len("gs://"):]
    data = _write(f"{gcs_bucket}/d/a.tif")
    with cloudio.open(f"https://{host}/{b}/d/a.tif") as ds:
        assert (ds.read() == data).all()


@pytest.mark.parametrize("key", ["d/a b.tif", "d/a%20b.tif", "d/a+b.tif", "d/a#b.tif", "d/é ü.tif",
                                 "d/a?x=1.tif", "d/100%.tif"])
# passes: pins odd keys (%, #, +, space, unicode, ?) read alike through gs://, /vsigs/ and https
def test_odd_keys_read_through_every_spelling(gcs_bucket: str, key: str) -> None:
    b = gcs_bucket[len("gs://"):]
    data = _write(f"{gcs_bucket}/{key}")
    for spelling in (f"{gcs_bucket}/{key}", f"/vsigs/{b}/{key}",
                     f"https://storage.googleapis.com/{b}/{quote(key)}"):
        with cloudio.open(spelling) as ds:
            assert (ds.read(1, window=Window(0, 0, 70, 70)) == data[0, :70, :70]).all(), spelling


@pytest.mark.parametrize("key", ["d/a b.tif", "d/a#b.tif", "d/é.tif"])
# passes: pins freshness after an overwrite (other bands/dtype) for odd keys
def test_odd_keys_fresh_after_overwrite(gcs_bucket: str, key: str) -> None:
    url = f"{gcs_bucket}/{key}"
    _write(url)
    with cloudio.open(url) as ds:
        ds.read(1)
    with cloudio.open(url, "w", **{**PROFILE, "count": 1, "dtype": "uint8"}) as dst:
        dst.write(np.full((1, 256, 256), 9, "uint8"))
    with cloudio.open(url) as ds:
        assert ds.count == 1 and (ds.read(1) == 9).all()


def test_vsicurl_of_emulator_url_after_overwrite(gcs_emulator: object, gcs_bucket: str) -> None:
    """/vsicurl/ of a URL cloudio itself treats as GCS read stale after a journaled overwrite (3, not 5): it went
    to rasterio untouched. It is now read as the object it names."""
    b = gcs_bucket[len("gs://"):]
    url = f"{gcs_bucket}/d/a.tif"
    cloudio.filesystem(url).pipe(url, tif(3))
    spelling = f"/vsicurl/{gcs_emulator.url}/{b}/d/a.tif"  # type: ignore[attr-defined]
    with cloudio.open(spelling) as ds:
        assert ds.read(1)[0, 0] == 3
    cloudio.filesystem(url).pipe(url, tif(5))
    with cloudio.open(spelling) as ds:
        assert ds.read(1)[0, 0] == 5


def test_vsicurl_of_https_google_url(gcs_bucket: str) -> None:
    """/vsicurl/https://storage.googleapis.com/b/k with the emulator in force was sent to Google itself (a raw
    RasterioIOError "Could not resolve host"); it is now read from the emulator."""
    b = gcs_bucket[len("gs://"):]
    url = f"{gcs_bucket}/d/a.tif"
    cloudio.filesystem(url).pipe(url, tif(3))
    try:
        with cloudio.open(f"/vsicurl/https://storage.googleapis.com/{b}/d/a.tif") as ds:
            assert ds.read(1)[0, 0] == 3
    except CloudioError:
        pass


# ---------------------------------------------------------------- read patterns


# passes: pins windows across blocks, masked=True, indexes=[...], sample(), block_windows()
def test_windowed_masked_indexes_sample(gcs_bucket: str) -> None:
    url = f"{gcs_bucket}/d/a.tif"
    data = _write(url, nodata=0)
    with cloudio.open(url) as ds:
        w = Window(50, 60, 100, 70)  # across block boundaries
        assert (ds.read(window=w) == data[:, 60:130, 50:150]).all()
        m = ds.read(1, masked=True)
        assert m.mask[0, 0] and not m.mask[0, 1]
        assert (ds.read(indexes=[2, 1]) == data[::-1]).all()
        pts = [ds.xy(10, 20), ds.xy(200, 100)]
        got = [list(v) for v in ds.sample(pts)]
        assert got == [list(data[:, 10, 20]), list(data[:, 200, 100])]
        for _, win in ds.block_windows(1):
            r = win.toranges()
            assert (ds.read(1, window=win) == data[0, r[0][0]:r[0][1], r[1][0]:r[1][1]]).all()


# passes: pins a COG written with driver="COG", read at every overview level and OVERVIEW_LEVEL=
def test_cog_every_overview_level(gcs_bucket: str) -> None:
    url = f"{gcs_bucket}/d/cog.tif"
    data = noise(1024)
    with cloudio.open(url, "w", driver="COG", width=1024, height=1024, count=1, dtype="uint8",
                      crs="EPSG:32631", transform=PROFILE["transform"], blocksize=256,
                      overview_resampling="nearest") as dst:
        dst.write(data)
    with rasterio.MemoryFile() as mem:
        with mem.open(driver="COG", width=1024, height=1024, count=1, dtype="uint8", crs="EPSG:32631",
                      transform=PROFILE["transform"], blocksize=256, overview_resampling="nearest") as m:
            m.write(data)
        with mem.open() as local:
            want = {f: local.read(1, out_shape=(1024 // f, 1024 // f)) for f in local.overviews(1)}
    with cloudio.open(url) as ds:
        assert ds.overviews(1) == sorted(want)
        for f, arr in want.items():
            assert (ds.read(1, out_shape=(1024 // f, 1024 // f)) == arr).all(), f
        assert (ds.read(1) == data[0]).all()
    with cloudio.open(url, OVERVIEW_LEVEL=0) as ds:
        assert ds.shape == (512, 512)


# passes: pins rasterio/cloudio.open of a file object from cloudio.filesystem().open, after an overwrite
def test_file_object_from_cloudio_filesystem(gcs_bucket: str) -> None:
    url = f"{gcs_bucket}/d/a.tif"
    fs = cloudio.filesystem(url)
    fs.pipe(url, tif(3))
    with fs.open(url) as f, rasterio.open(f) as ds:
        assert ds.read(1)[0, 0] == 3
    fs.pipe(url, tif(4, 128))
    with fs.open(url) as f, cloudio.open(f) as ds:
        assert ds.shape == (128, 128) and ds.read(1)[0, 0] == 4


@pytest.mark.parametrize("change", [dict(blockxsize=128, blockysize=128), dict(compress="deflate"),
                                    dict(tiled=False, blockxsize=None, blockysize=None),
                                    dict(compress="lzw", blockxsize=32, blockysize=32)])
# passes: pins a reopen after an overwrite with other blocks / compression / striped layout
def test_reopen_after_overwrite_with_other_blocks_or_compression(gcs_bucket: str, change: dict) -> None:
    url = f"{gcs_bucket}/d/a.tif"
    data = _write(url)
    with cloudio.open(url) as ds:
        assert (ds.read(window=Window(30, 30, 100, 100)) == data[:, 30:130, 30:130]).all()
    p = {k: v for k, v in {**PROFILE, **change}.items() if v is not None}
    new = (data[::-1] + 7).astype("uint16")
    with cloudio.open(url, "w", **p) as dst:
        dst.write(new)
    with cloudio.open(url) as ds:
        assert (ds.read() == new).all()
        assert (ds.read(window=Window(30, 30, 100, 100)) == new[:, 30:130, 30:130]).all()


# passes: pins a dataset held open across an overwrite with another compression (same blocks)
def test_open_dataset_across_overwrite_with_other_compression(gcs_bucket: str) -> None:
    url = f"{gcs_bucket}/d/a.tif"
    data = _write(url)
    with cloudio.open(url) as ds:
        assert (ds.read(1, window=Window(0, 0, 64, 64)) == data[0, :64, :64]).all()
        new = (data + 5).astype("uint16")
        with cloudio.open(url, "w", **{**PROFILE, "compress": "deflate"}) as dst:
            dst.write(new)
        assert (ds.read() == new).all()
        assert ds.compression is not None and ds.compression.name == "deflate"


# ---------------------------------------------------------------- errors


def test_wrong_driver(gcs_bucket: str) -> None:
    """driver="PNG" on a valid GeoTIFF: the ReadError said "check that it is a complete raster" and never named the
    driver the user forced (the guide's next step: "check the URL and the driver")."""
    url = f"{gcs_bucket}/d/a.tif"
    _write(url)
    with pytest.raises(CloudioError) as info:
        cloudio.open(url, "r", driver="PNG")
    e = info.value
    assert isinstance(e, RasterioIOError)
    assert url in str(e) and "driver" in str(e).lower()
    assert isinstance(e.__cause__, RasterioIOError)


# passes: pins ReadError naming the URL for a text object
def test_text_object(gcs_bucket: str) -> None:
    url = f"{gcs_bucket}/d/notes.tif"
    cloudio.filesystem(url).pipe(url, b"hello, this is not a raster\n" * 10)
    with pytest.raises(ReadError) as info:
        cloudio.open(url)
    e = info.value
    assert url in str(e) and isinstance(e.__cause__, RasterioIOError) and isinstance(e, RasterioIOError)


# ---------------------------------------------------------------- boundless reads (rasterio re-opens ds.name)


@pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")  # rasterio's own boundless code
@pytest.mark.parametrize("spelling", ["gs", "vsigs", "https", "https-cloud", "emulator"])
@pytest.mark.parametrize("key", ["d/a#b.tif", "d/a%20b.tif"])
# passes: pins boundless reads (rasterio re-opens ds.name in a VRT) for every spelling
def test_boundless_read(gcs_emulator: object, gcs_bucket: str, key: str, spelling: str) -> None:
    b = gcs_bucket[len("gs://"):]
    data = _write(f"{gcs_bucket}/{key}")
    name = {"gs": f"{gcs_bucket}/{key}", "vsigs": f"/vsigs/{b}/{key}",
            "https": f"https://storage.googleapis.com/{b}/{quote(key)}",
            "https-cloud": f"https://storage.cloud.google.com/{b}/{quote(key)}",
            "emulator": f"{gcs_emulator.url}/{b}/{quote(key)}"}[spelling]  # type: ignore[attr-defined]
    with cloudio.open(name) as ds:
        out = ds.read(1, window=Window(-10, -10, 40, 40), boundless=True, fill_value=0)
    assert out.shape == (40, 40)
    assert (out[10:, 10:] == data[0, :30, :30]).all()
    assert (out[:10, :] == 0).all()


def _corrupt_deflate_tif() -> bytes:
    """A deflate GeoTIFF whose tiles' compressed bytes are garbage (the header and IFD intact)."""
    with rasterio.MemoryFile() as mem:
        with mem.open(driver="GTiff", width=256, height=256, count=1, dtype="uint8", tiled=True,
                      blockxsize=64, blockysize=64, compress="deflate") as ds:
            ds.write(noise(256))
        with mem.open() as ds:
            offsets = [int(ds.get_tag_item("BLOCK_OFFSET_0_0", "TIFF", bidx=1))]
        raw = bytearray(mem.read())
    start = offsets[0]
    raw[start:] = bytes((x ^ 0x5A) for x in raw[start:])
    return bytes(raw)


@pytest.mark.parametrize("name", ["plain.tif", "preset.tif", "timeout-area.tif", "SSL.tif"])
def test_corrupt_tile_is_a_read_error_whatever_the_key(gcs_bucket: str, name: str) -> None:
    """A corrupt deflate tile is a ReadError whatever the key: rasterio's message names the object by its bare name
    ("preset.tif, band 1: ..."), which was not cut out, so "reset", "timeout" or "SSL" in the key made it a
    TransientError."""
    url = f"{gcs_bucket}/d/{name}"
    cloudio.filesystem(url).pipe(url, _corrupt_deflate_tif())
    with pytest.raises(CloudioError) as info:
        with cloudio.open(url) as ds:
            ds.read(1)
    e = info.value
    assert isinstance(e, ReadError) and not isinstance(e, ConnectionError), f"{type(e).__name__}: {e}"
    assert url in str(e) and isinstance(e.__cause__, RasterioIOError)


@pytest.mark.parametrize("bad", ["{b}/d/../a.tif", "{b}/d//a.tif", "{b}/./a.tif",
                                 "https://storage.googleapis.com/{n}/d/a.tif?generation=1",
                                 "https://storage.googleapis.com/{n}/d/%2E%2E/a.tif",
                                 "/vsigs/{n}/d/../a.tif"])
# passes: pins InvalidURLError for .., //, ., https ?generation=
def test_odd_urls_refused(gcs_bucket: str, bad: str) -> None:
    _write(f"{gcs_bucket}/a.tif")
    with pytest.raises(cloudio.InvalidURLError):
        cloudio.open(bad.format(b=gcs_bucket, n=gcs_bucket[5:]))


def _cog(url: str, data: np.ndarray, blocksize: int, compress: str) -> dict[int, np.ndarray]:
    kw = dict(driver="COG", width=data.shape[-1], height=data.shape[-2], count=1, dtype="uint8",
              crs="EPSG:32631", transform=PROFILE["transform"], blocksize=blocksize, compress=compress,
              overview_resampling="nearest")
    with cloudio.open(url, "w", **kw) as dst:
        dst.write(data)
    with rasterio.MemoryFile() as mem:
        with mem.open(**kw) as m:
            m.write(data)
        with mem.open() as local:
            n = data.shape[-1]
            return {f: local.read(1, out_shape=(n // f, n // f)) for f in local.overviews(1)}


# passes: pins COG overviews after an overwrite with other blocks and compression
def test_cog_overviews_after_overwrite_with_other_blocks_and_compression(gcs_bucket: str) -> None:
    url = f"{gcs_bucket}/d/cog.tif"
    first = _cog(url, noise(1024), 256, "deflate")
    with cloudio.open(url) as ds:
        for arr in first.values():
            assert (ds.read(1, out_shape=arr.shape) == arr).all()
    new = (255 - noise(1024)).astype("uint8")
    second = _cog(url, new, 512, "lzw")
    with cloudio.open(url) as ds:
        assert ds.overviews(1) == sorted(second) and ds.block_shapes == [(512, 512)]
        for f, arr in second.items():
            assert (ds.read(1, out_shape=arr.shape) == arr).all(), f
        assert (ds.read(1) == new[0]).all()
