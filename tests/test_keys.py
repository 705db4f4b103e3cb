"""One URL, one object, on every face: keys kept literally everywhere, or refused everywhere.

Each test puts look-alike objects on the server with google-cloud-storage
(``twin/t.tif`` and ``twin//t.tif``...) and checks that every face of
cloudio either returns the literal object's bytes or raises InvalidURLError
naming the URL, never the look-alike.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from affine import Affine
from rasters import pixel as _pixel
from rasters import tif

import cloudio
from cloudio.errors import InvalidURLError

_GRID = Affine(1, 0, 0, 0, -1, 4)  # 4x4 pixels of 1 unit, north up


def _tif(value: int) -> bytes:
    """A 4x4 one-band GeoTIFF filled with ``value``: which object was read shows in its pixels."""
    return tif(value, 4, tiled=False, transform=_GRID)


def _put(emu: Any, bucket: str, objects: dict[str, int]) -> None:
    b = emu.client.bucket(bucket[len("gs://"):])
    for key, value in objects.items():
        b.blob(key).upload_from_string(_tif(value))


def _keys(emu: Any, bucket: str) -> list[str]:
    return sorted(b.name for b in emu.client.list_blobs(bucket[len("gs://"):]))


def _via_open(url: str) -> int:
    with cloudio.open(url) as ds:
        return int(ds.read(1)[0, 0])


def _via_fs(url: str) -> int:
    return _pixel(cloudio.filesystem("gs://").cat(url))


def _via_fs_of_url(url: str) -> int:
    return _pixel(cloudio.filesystem(url).cat(url))


def _via_vsigs(url: str) -> int:
    return _via_open("/vsigs/" + url[len("gs://"):])


def _via_https(url: str) -> int:
    from urllib.parse import quote

    return _via_open("https://storage.googleapis.com/" + quote(url[len("gs://"):]))


READ_FACES: dict[str, Callable[[str], int]] = {
    "open": _via_open, "vsigs": _via_vsigs, "https": _via_https, "fs": _via_fs, "fs_of_url": _via_fs_of_url,
}


def _literal_or_refused(face: Callable[[str], int], url: str, literal: int) -> None:
    try:
        got = face(url)
    except InvalidURLError as e:
        assert url.split("/", 3)[3].split("/")[0] in str(e)  # the message names the URL
        return
    assert got == literal, f"{url!r} read another object ({got}) than its literal key ({literal})"


@pytest.mark.parametrize("face", READ_FACES)
@pytest.mark.parametrize(
    ("literal", "lookalike"),
    [("twin//t.tif", "twin/t.tif"), ("twin/./t.tif", "twin/t.tif"), ("twin/x/../t.tif", "twin/t.tif"),
     ("/lead.tif", "lead.tif")],
)
def test_a_key_reads_its_literal_object_or_is_refused(gcs_emulator, gcs_bucket, face, literal, lookalike):
    _put(gcs_emulator, gcs_bucket, {lookalike: 1, literal: 2})
    _literal_or_refused(READ_FACES[face], f"{gcs_bucket}/{literal}", 2)


@pytest.mark.parametrize("face", ["open", "vsigs", "fs"])
def test_a_double_slash_is_refused_on_every_read_face(gcs_emulator, gcs_bucket, face):
    _put(gcs_emulator, gcs_bucket, {"twin/t.tif": 1, "twin//t.tif": 2})
    url = f"{gcs_bucket}/twin//t.tif"
    with pytest.raises(InvalidURLError, match="empty segment") as e:
        READ_FACES[face](url)
    assert "twin//t.tif" in str(e.value)


@pytest.mark.parametrize(
    "key",
    ["sp/k ", "pc/a%2Fb.tif", "q/k?generation=5", "h/k#1", "x/t.tif/", "u/ünï cödé.tif", "w/a:b@c.tif"],
)
@pytest.mark.parametrize("face", ["open", "vsigs", "fs"])
def test_odd_but_legal_keys_are_literal_on_every_face(gcs_emulator, gcs_bucket, face, key):
    """'%2F', '?', '#', spaces, a trailing '/': GDAL and gcsfs both take them literally."""
    lookalikes = {"sp/k": 1, "pc/a/b.tif": 1, "q/k": 1, "h/k": 1, "x/t.tif": 1}
    _put(gcs_emulator, gcs_bucket, {**lookalikes, key: 2})
    assert READ_FACES[face](f"{gcs_bucket}/{key}") == 2


def _write_open(url: str) -> None:
    with cloudio.open(url, "w", driver="GTiff", width=4, height=4, count=1, dtype="uint8",
                      transform=_GRID) as ds:
        ds.write(np.full((1, 4, 4), 9, "uint8"))


def _write_fs(url: str) -> None:
    cloudio.filesystem("gs://").pipe(url, _tif(9))


def _write_fs_file(url: str) -> None:
    with cloudio.filesystem("gs://").open(url, "wb") as f:
        f.write(_tif(9))


def _write_vrt(url: str) -> None:
    bucket = url.split("/", 3)[2]
    cloudio.write_vrt(f"gs://{bucket}/src.tif", url)


def _write_zarr(url: str) -> None:
    cloudio.save_array(np.arange(4, dtype="uint8"), url)


def _write_zarr_store(url: str) -> None:
    import zarr

    zarr.create_array(cloudio.zarr_store(url), shape=(4,), dtype="uint8")[:] = 9


def _write_xarray(url: str) -> None:
    import xarray as xr

    cloudio.to_zarr(xr.Dataset({"v": ("x", np.arange(4, dtype="uint8"))}), url)


WRITE_FACES: dict[str, Callable[[str], None]] = {
    "open": _write_open, "fs_pipe": _write_fs, "fs_open": _write_fs_file, "write_vrt": _write_vrt,
    "save_array": _write_zarr, "zarr_store": _write_zarr_store, "to_zarr": _write_xarray,
}


@pytest.mark.parametrize("face", WRITE_FACES)
@pytest.mark.parametrize("key", ["w//a.tif", "w/./a.tif", "w/x/../a.tif"])
def test_a_write_never_lands_on_a_lookalike_key(gcs_emulator, gcs_bucket, face, key):
    _put(gcs_emulator, gcs_bucket, {"src.tif": 5})
    with pytest.raises(InvalidURLError) as e:
        WRITE_FACES[face](f"{gcs_bucket}/{key}")
    assert key in str(e.value)
    assert _keys(gcs_emulator, gcs_bucket) == ["src.tif"]  # nothing written, anywhere


@pytest.mark.parametrize("face", ["load_array", "open_zarr", "zarr_store"])
def test_zarr_reads_refuse_a_lookalike_root(gcs_emulator, gcs_bucket, face):
    cloudio.save_array(np.arange(4, dtype="uint8"), f"{gcs_bucket}/z/arr")
    url = f"{gcs_bucket}/z//arr"
    with pytest.raises(InvalidURLError, match="empty segment"):
        {"load_array": cloudio.load_array, "open_zarr": cloudio.open_zarr, "zarr_store": cloudio.zarr_store}[face](url)


def _spellings(bucket: str) -> list[str]:
    b = bucket[len("gs://"):]
    return [
        f"gs:/{b}/d/a.tif", f"gs:{b}/d/a.tif", f"gs:///{b}/d/a.tif", f"GS://{b}/d/a.tif", f"Gcs://{b}/d/a.tif",
        f" gs://{b}/d/a.tif", f"\tgs://{b}/d/a.tif", f"gs://{b}/d/a.tif\n", f"gs://{b}/d/a.tif\x00.x",
        f"gs://{b}/d/a\r.tif", f"HTTPS://storage.googleapis.com/{b}/d/a.tif",
        f"https:/storage.googleapis.com/{b}/d/a.tif",
        f"https://storage.googleapis.com/{b}/d/a.tif?generation=1",
    ]


FACES_OF_A_URL: dict[str, Callable[[str], Any]] = {
    "open": _via_open,
    "filesystem": _via_fs_of_url,
    "zarr_store": cloudio.zarr_store,
    "load_array": cloudio.load_array,
    "invalidate": cloudio.invalidate,
}


@pytest.mark.parametrize("face", FACES_OF_A_URL)
def test_misspelled_gcs_urls_are_invalid_urls_naming_themselves(gcs_emulator, gcs_bucket, face):
    _put(gcs_emulator, gcs_bucket, {"d/a.tif": 1})
    for url in _spellings(gcs_bucket):
        with pytest.raises(InvalidURLError) as e:
            FACES_OF_A_URL[face](url)
        assert repr(url) in str(e.value), (url, str(e.value))


def test_a_one_slash_url_does_not_reach_gdal_for_credentials(gcs_emulator, gcs_bucket):
    url = f"gs:/{gcs_bucket[len('gs://'):]}/d/a.tif"
    with pytest.raises(InvalidURLError, match="gs://<bucket>/<key>") as e:
        cloudio.open(url)
    assert "GS_SECRET_ACCESS_KEY" not in str(e.value)


def test_trailing_whitespace_is_part_of_the_key_on_every_face(gcs_emulator, gcs_bucket):
    _put(gcs_emulator, gcs_bucket, {"d/a.tif": 1, "d/a.tif ": 2})
    url = f"{gcs_bucket}/d/a.tif "
    assert _via_open(url) == _via_fs(url) == _via_vsigs(url) == 2
