"""Writers in another process: the ``"strong"`` and bounded levels for the fsspec and Zarr faces.

The other writer is a second Python process using only the plain libraries
(google-cloud-storage, gcsfs, zarr, xarray; it asserts that cloudio is not
loaded). Each case shows the staleness at the ``"session"`` level first (the
"before"), then the truth at ``"strong"`` and at a staleness bound, with the
requests counted in the emulator's own log. Bounds are 0 s ("revalidate
everything cached") and an hour ("trust everything cached"): no timers.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import numpy as np
import pytest
from rasters import external_overview

import cloudio
from cloudio.emulator import Emulator, Request


class Counter:
    """Requests the emulator logged for one bucket since the last :meth:`take`."""

    def __init__(self, emulator: Emulator, bucket: str) -> None:
        self.emulator = emulator
        self.bucket = bucket.removeprefix("gs://")
        self._seen = len(emulator.requests())

    def take(self) -> list[Request]:
        """The requests for the bucket since the previous call."""
        log = self.emulator.requests()
        new, self._seen = log[self._seen:], len(log)
        return [r for r in new if self.bucket in r.path]


@pytest.fixture
def counter(gcs_emulator: Emulator, gcs_bucket: str) -> Iterator[Counter]:
    yield Counter(gcs_emulator, gcs_bucket)


def _raw_gcsfs(gcs_emulator: Emulator) -> object:
    """A plain, uncached gcsfs instance: the "uncached library" strong must not cost more than."""
    import gcsfs

    return gcsfs.GCSFileSystem(endpoint_url=gcs_emulator.url, token="anon", skip_instance_cache=True)


# --------------------------------------------------------------------------------------------
# fsspec
# --------------------------------------------------------------------------------------------


def test_new_object_in_a_listed_prefix(gcs_bucket: str, gcs_emulator: Emulator, other_writer: Callable[[str], None],
                                       counter: Counter) -> None:
    fs = cloudio.filesystem(gcs_bucket)
    root = gcs_bucket.removeprefix("gs://")
    fs.pipe(f"{gcs_bucket}/d/a.bin", b"a" * 10)
    assert fs.ls(f"{root}/d", detail=False) == [f"{root}/d/a.bin"]
    other_writer("bucket.blob('d/new.bin').upload_from_string(b'n' * 5)")
    raw = _raw_gcsfs(gcs_emulator)
    counter.take()
    raw.ls(f"{root}/d", detail=False)
    raw_requests = counter.take()

    with cloudio.session("session"):
        assert fs.ls(f"{root}/d", detail=False) == [f"{root}/d/a.bin"]  # the before: stale
    assert counter.take() == []
    with cloudio.session(3600):
        assert fs.ls(f"{root}/d", detail=False) == [f"{root}/d/a.bin"]  # young enough to trust
    assert counter.take() == []
    with cloudio.session("strong"):
        assert fs.ls(f"{root}/d", detail=False) == [f"{root}/d/a.bin", f"{root}/d/new.bin"]
        assert fs.find(f"{root}/d") == [f"{root}/d/a.bin", f"{root}/d/new.bin"]
        assert fs.glob(f"{root}/d/*.bin") == [f"{root}/d/a.bin", f"{root}/d/new.bin"]
    strong = counter.take()
    assert len(strong) == 3 * len(raw_requests) == 3, strong  # one listing each, as uncached gcsfs
    # what strong saw is now what the session level sees too (the listing was refetched)
    assert fs.ls(f"{root}/d", detail=False) == [f"{root}/d/a.bin", f"{root}/d/new.bin"]


def test_new_object_bounded(gcs_bucket: str, other_writer: Callable[[str], None], counter: Counter) -> None:
    fs = cloudio.filesystem(gcs_bucket)
    root = gcs_bucket.removeprefix("gs://")
    fs.pipe(f"{gcs_bucket}/d/a.bin", b"a" * 10)
    fs.ls(f"{root}/d")
    other_writer("bucket.blob('d/new.bin').upload_from_string(b'n' * 5)")
    counter.take()
    with cloudio.session(0):
        assert fs.ls(f"{root}/d", detail=False) == [f"{root}/d/a.bin", f"{root}/d/new.bin"]
    assert len(counter.take()) == 1


def test_overwrite_is_read_whole(gcs_bucket: str, gcs_emulator: Emulator, other_writer: Callable[[str], None],
                                 counter: Counter) -> None:
    fs = cloudio.filesystem(gcs_bucket)
    root = gcs_bucket.removeprefix("gs://")
    url = f"{gcs_bucket}/d/a.bin"
    fs.pipe(url, b"a" * 10)
    fs.ls(f"{root}/d")
    other_writer("bucket.blob('d/a.bin').upload_from_string(b'b' * 25)")
    raw = _raw_gcsfs(gcs_emulator)
    counter.take()
    assert raw.info(url)["size"] == 25
    raw_info = counter.take()
    with raw.open(url, "rb") as f:
        assert f.read() == b"b" * 25
    raw_open = counter.take()

    with cloudio.session("session"):
        assert fs.info(url)["size"] == 10  # the before: the cached listing's size
        with fs.open(url, "rb") as f:
            with pytest.raises(cloudio.StaleDatasetError, match="changed on the server"):
                f.read()  # not the new bytes cut at the old size
        assert fs.info(url)["size"] == 25  # the change it found is journaled: the listing is dropped
        with fs.open(url, "rb") as f:
            assert f.read() == b"b" * 25
    fs.ls(f"{root}/d")  # held again, at the new size
    other_writer("bucket.blob('d/a.bin').upload_from_string(b'b' * 25)")
    counter.take()
    with cloudio.session("strong"):
        assert fs.info(url)["size"] == 25
        assert len(counter.take()) == 1 <= len(raw_info)  # the object's metadata only
        assert fs.size(url) == 25
        counter.take()
        with fs.open(url, "rb") as f:
            assert f.read() == b"b" * 25
        assert len(counter.take()) == 2 <= len(raw_open)  # metadata, then the bytes
    # the changed generation seen at strong invalidated the stale listing for every level
    with fs.open(url, "rb") as f:
        assert f.read() == b"b" * 25


def test_delete(gcs_bucket: str, other_writer: Callable[[str], None], counter: Counter) -> None:
    fs = cloudio.filesystem(gcs_bucket)
    root = gcs_bucket.removeprefix("gs://")
    fs.pipe({f"{gcs_bucket}/d/a.bin": b"a", f"{gcs_bucket}/d/b.bin": b"b"})
    fs.ls(f"{root}/d")
    other_writer("bucket.blob('d/a.bin').delete()")
    counter.take()
    with cloudio.session("session"):
        assert fs.exists(f"{gcs_bucket}/d/a.bin")  # the before
    assert counter.take() == []
    with cloudio.session("strong"):
        assert not fs.exists(f"{gcs_bucket}/d/a.bin")
        with pytest.raises(FileNotFoundError):
            fs.cat(f"{gcs_bucket}/d/a.bin")
        assert [p for _, _, files in fs.walk(f"{root}/d") for p in files] == ["b.bin"]
    assert all(r.method == "GET" for r in counter.take())
    with cloudio.session(0):
        assert not fs.exists(f"{gcs_bucket}/d/a.bin")


# --------------------------------------------------------------------------------------------
# Zarr and Xarray
# --------------------------------------------------------------------------------------------

pytest.importorskip("xarray")
zarr_warnings = pytest.mark.filterwarnings("ignore:Consolidated metadata is currently not part:UserWarning")


def _dataset(name: str = "a", rows: int = 4) -> object:
    import xarray as xr

    return xr.Dataset({name: (("y", "x"), np.arange(rows * 4.0).reshape(rows, 4))},
                      coords={"y": np.arange(rows), "x": np.arange(4)})


@zarr_warnings
def test_zarr_variable_appended(gcs_bucket: str, other_writer: Callable[[str], None], counter: Counter) -> None:
    url = f"{gcs_bucket}/s.zarr"
    cloudio.to_zarr(_dataset(), url, mode="w")
    assert list(cloudio.open_zarr(url, consolidated=False).data_vars) == ["a"]  # the group's listing is cached
    other_writer("""
        import xarray as xr
        ds = xr.Dataset({"b": (("y", "x"), np.ones((4, 4)))})
        ds.to_zarr(f"gs://{BUCKET}/s.zarr", mode="a", consolidated=True, storage_options=SO)
    """)
    with cloudio.session("session"):
        assert list(cloudio.open_zarr(url, consolidated=False).data_vars) == ["a"]  # the before
    counter.take()
    with cloudio.session("strong"):
        assert sorted(cloudio.open_zarr(url, consolidated=False).data_vars) == ["a", "b"]
        strong = counter.take()
        assert sum(1 for r in strong if "/o?" in r.path) == 2, strong  # the metadata listing, the group's
    with cloudio.session(0):
        ds = cloudio.open_zarr(url)
        assert sorted(ds.data_vars) == ["a", "b"]
        np.testing.assert_array_equal(ds["b"].values, np.ones((4, 4)))


@zarr_warnings
def test_zarr_array_resized_behind_consolidated_metadata(gcs_bucket: str, other_writer: Callable[[str], None],
                                                         counter: Counter) -> None:
    url = f"{gcs_bucket}/s.zarr"
    cloudio.to_zarr(_dataset(), url, mode="w")
    other_writer("""
        import zarr
        group = zarr.open_group(f"gs://{BUCKET}/s.zarr", mode="r+", storage_options=SO, use_consolidated=False)
        group["a"].append(np.full((2, 4), 99.0))
        group["y"].append(np.array([4, 5]))
    """)
    with cloudio.session("session"):
        assert cloudio.open_zarr(url)["a"].shape == (4, 4)  # the before: the consolidated copy's shape
    with cloudio.session(3600):  # listed never: a bound revalidates what it never saw
        assert cloudio.open_zarr(url)["a"].shape == (6, 4)
    counter.take()
    with cloudio.session(3600):  # listed just now: not again, and the copy that listing found stale is not trusted
        assert cloudio.open_zarr(url)["a"].shape == (6, 4)
    assert not any("/o?" in r.path for r in counter.take())
    with cloudio.session("strong"):
        a = cloudio.open_zarr(url)["a"].values
    assert a.shape == (6, 4)
    np.testing.assert_array_equal(a[4:], np.full((2, 4), 99.0))
    np.testing.assert_array_equal(a[:4], np.arange(16.0).reshape(4, 4))


@zarr_warnings
def test_zarr_consolidated_metadata_rewritten(gcs_bucket: str, other_writer: Callable[[str], None]) -> None:
    url = f"{gcs_bucket}/s.zarr"
    cloudio.to_zarr(_dataset(), url, mode="w")
    import xarray as xr

    cloudio.to_zarr(xr.Dataset({"c": (("y", "x"), np.zeros((4, 4)))}), url, mode="a", consolidated=False)
    assert sorted(cloudio.open_zarr(url).data_vars) == ["a", "c"]  # read by listing: this process knows why
    other_writer("""
        import xarray as xr
        ds = xr.Dataset({"b": (("y", "x"), np.ones((4, 4)))})
        ds.to_zarr(f"gs://{BUCKET}/s.zarr", mode="a", consolidated=True, storage_options=SO)
    """)
    with cloudio.session("session"):
        assert sorted(cloudio.open_zarr(url).data_vars) == ["a", "c"]  # the before: a stale listing
    with cloudio.session("strong"):
        assert sorted(cloudio.open_zarr(url).data_vars) == ["a", "b", "c"]  # the new consolidated copy
    with cloudio.session(0):
        assert sorted(cloudio.open_zarr(url).data_vars) == ["a", "b", "c"]


@zarr_warnings
def test_zarr_strong_reads_each_members_document_once(gcs_bucket: str, gcs_emulator: Emulator,
                                                      counter: Counter) -> None:
    """At the strong level the members' own documents are read, not the consolidated copy (whose age says
    nothing of its content: tests/test_other_writers_levels.py): one listing of the metadata, the root's
    document, zarr's listing of the group, one GET per member and the coordinates' chunks."""
    import xarray as xr

    url = f"{gcs_bucket}/s.zarr"
    cloudio.to_zarr(_dataset(), url, mode="w")
    counter.take()
    xr.open_zarr(url, storage_options={"endpoint_url": gcs_emulator.url, "token": "anon"})
    raw = counter.take()
    with cloudio.session("session"):
        cloudio.open_zarr(url)
    session = counter.take()
    with cloudio.session("strong"):
        cloudio.open_zarr(url)
    strong = counter.take()
    ds = _dataset()
    members = [f"s.zarr%2F{name}%2Fzarr.json" for name in ds.variables]
    assert [r for r in strong if any(r.path.endswith(f"/o/{m}?alt=media") for m in members)] == [
        r for r in strong if "zarr.json?alt=media" in r.path and "s.zarr%2Fzarr.json" not in r.path]
    assert len(strong) == 3 + len(members) + len(ds.coords), (strong, raw)
    assert len(session) == len(raw) + 1  # the write marker's GET, as before this level existed


def test_load_array_resized(gcs_bucket: str, other_writer: Callable[[str], None], counter: Counter) -> None:
    url = f"{gcs_bucket}/arr.zarr"
    cloudio.save_array(np.arange(10), url)
    other_writer("""
        import zarr
        zarr.open_array(f"gs://{BUCKET}/arr.zarr", mode="r+", storage_options=SO).append(np.arange(10, 15))
    """)
    for level in ("session", "strong", 0):
        with cloudio.session(level):
            np.testing.assert_array_equal(cloudio.load_array(url), np.arange(15))


def test_load_array_strong_unchanged_costs_no_more_than_plain_zarr(gcs_bucket: str, gcs_emulator: Emulator,
                                                                   counter: Counter) -> None:
    import zarr

    from cloudio._zarr import last_seen

    url = f"{gcs_bucket}/arr.zarr"
    cloudio.save_array(np.arange(10), url)
    counter.take()
    zarr.open_array(url, mode="r", storage_options={"endpoint_url": gcs_emulator.url, "token": "anon"})[...]
    raw = counter.take()
    with cloudio.session("session"):
        cloudio.load_array(url)  # as this process wrote it: the chunk, and one listing beside it
        assert len(counter.take()) == len(raw) - 2  # (the marker, zarr.json's generation: _zarr/last_seen)
        last_seen.forget_all()
        cloudio.load_array(url)
    # a first read in a process: the write marker's GET, as before this level existed; and zarr.json alone
    # where zarr also probes .zarray and .zattrs (a v3 array opens with one metadata GET)
    assert len(counter.take()) == len(raw) + 1 - 2
    with cloudio.session("strong"):
        np.testing.assert_array_equal(cloudio.load_array(url), np.arange(10))
    strong = counter.take()
    assert len(strong) < len(raw), (strong, raw)
    assert sum(1 for r in strong if "/o?" in r.path) == 1  # the metadata listing, in place of the marker's GET


def test_load_array_refuses_a_marked_store_at_strong(gcs_bucket: str, other_writer: Callable[[str], None]) -> None:
    url = f"{gcs_bucket}/arr.zarr"
    cloudio.save_array(np.arange(10), url)
    other_writer("bucket.blob('arr.zarr/.cloudio-write-in-progress').upload_from_string(b'{}')")
    with cloudio.session("strong"), pytest.raises(cloudio.IncompleteWriteError, match="arr.zarr"):
        cloudio.load_array(url)


# --------------------------------------------------------------------------------------------
# GDAL beyond the object itself: sidecars and a VRT's sources
# --------------------------------------------------------------------------------------------


def _upload_from(other_writer: Callable[[str], None], key: str, data: bytes, tmp_path: os.PathLike[str]) -> None:
    """The other process uploads ``data`` (made here with rasterio) to ``key`` with google-cloud-storage."""
    local = os.path.join(os.fspath(tmp_path), key.replace("/", "_"))
    with open(local, "wb") as f:
        f.write(data)
    other_writer(f"bucket.blob({key!r}).upload_from_filename({local!r})")


def _aux(value: str) -> bytes:
    return (f'<PAMDataset><Metadata><MDI key="VERSION">{value}</MDI></Metadata></PAMDataset>').encode()


def test_new_and_deleted_overview_sidecar(gcs_bucket: str, other_writer: Callable[[str], None], counter: Counter,
                                          tmp_path: os.PathLike[str]) -> None:
    from rasters import tif

    url = f"{gcs_bucket}/g/a.tif"
    data = tif(3)
    with cloudio.open(url, "w", driver="GTiff", width=64, height=64, count=1, dtype="uint8") as ds:
        ds.write(np.full((1, 64, 64), 3, "uint8"))
    with cloudio.open(url) as ds:
        assert ds.overviews(1) == []
    _upload_from(other_writer, "g/a.tif.ovr", external_overview(data, tmp_path), tmp_path)
    counter.take()
    with cloudio.session("session"), cloudio.open(url) as ds:
        assert ds.overviews(1) == []  # the before: cloudio's listing knows no sidecar, GDAL is told not to look
    assert counter.take() == []
    with cloudio.session("strong"), cloudio.open(url) as ds:
        assert ds.overviews(1) == [2]
        assert ds.read(1, out_shape=(32, 32)).min() == 3
    counter.take()
    with cloudio.session("strong"), cloudio.open(url) as ds:
        assert ds.overviews(1) == [2]
    assert len(counter.take()) == 1  # unchanged now: the check alone
    other_writer("bucket.blob('g/a.tif.ovr').delete()")
    with cloudio.session("session"), cloudio.open(url) as ds:
        assert ds.overviews(1) == [2]  # the before, again
    with cloudio.session("strong"), cloudio.open(url) as ds:
        assert ds.overviews(1) == []
    with cloudio.session(0), cloudio.open(url) as ds:
        assert ds.overviews(1) == []


def test_strong_open_of_an_unchanged_raster_costs_one_request(gcs_bucket: str, counter: Counter) -> None:
    url = f"{gcs_bucket}/g/u.tif"
    with cloudio.open(url, "w", driver="GTiff", width=64, height=64, count=1, dtype="uint8") as ds:
        ds.write(np.full((1, 64, 64), 5, "uint8"))
    with cloudio.session("strong"), cloudio.open(url) as ds:
        ds.read()
    counter.take()
    with cloudio.session("strong") as s, cloudio.open(url) as ds:
        assert ds.read(1)[0, 0] == 5
    requests = counter.take()
    assert len(requests) == 1 and s.stats.revalidations == 1, requests  # the check; the pixels are cached
    with cloudio.session("session"), cloudio.open(url) as ds:
        ds.read()
    assert counter.take() == []  # the session level: nothing, as before


def test_aux_xml_sidecar_overwritten(gcs_bucket: str, other_writer: Callable[[str], None],
                                     tmp_path: os.PathLike[str]) -> None:
    url = f"{gcs_bucket}/g/m.tif"
    with cloudio.open(url, "w", driver="GTiff", width=64, height=64, count=1, dtype="uint8") as ds:
        ds.write(np.full((1, 64, 64), 1, "uint8"))
    _upload_from(other_writer, "g/m.tif.aux.xml", _aux("1"), tmp_path)
    with cloudio.session("strong"), cloudio.open(url) as ds:
        assert ds.tags()["VERSION"] == "1"
    _upload_from(other_writer, "g/m.tif.aux.xml", _aux("2"), tmp_path)
    with cloudio.session("session"), cloudio.open(url) as ds:
        assert ds.tags()["VERSION"] == "1"  # the before: GDAL's cached copy of the sidecar
    with cloudio.session("strong"), cloudio.open(url) as ds:
        assert ds.tags()["VERSION"] == "2"
    _upload_from(other_writer, "g/m.tif.aux.xml", _aux("3"), tmp_path)
    with cloudio.session(0), cloudio.open(url) as ds:
        assert ds.tags()["VERSION"] == "3"
    _upload_from(other_writer, "g/m.tif.aux.xml", _aux("4"), tmp_path)
    with cloudio.session(3600), cloudio.open(url) as ds:
        assert ds.tags()["VERSION"] == "3"  # checked less than an hour ago: trusted


def test_vrt_source_overwritten(gcs_bucket: str, gcs_emulator: Emulator, other_writer: Callable[[str], None],
                                counter: Counter, tmp_path: os.PathLike[str]) -> None:
    from affine import Affine
    from rasterio.vrt import WarpedVRT
    from rasters import put, tif

    src = f"{gcs_bucket}/g/src.tif"
    grid = {"transform": Affine(1, 0, 0, 0, -1, 64), "crs": "EPSG:3857"}
    put(gcs_emulator, src, tif(1, **grid))
    vrt_url = f"{gcs_bucket}/h/w.vrt"
    with cloudio.open(src) as ds, WarpedVRT(ds, crs="EPSG:3857") as vrt:
        cloudio.write_vrt(vrt, vrt_url)
    with cloudio.open(vrt_url) as ds:
        assert ds.read(1).max() == 1
    _upload_from(other_writer, "g/src.tif", tif(2, **grid), tmp_path)  # same size and layout
    with cloudio.session("session"), cloudio.open(vrt_url) as ds:
        assert ds.read(1).max() == 1  # the before: GDAL's cached bytes of the old source
    counter.take()
    with cloudio.session("strong"), cloudio.open(vrt_url) as ds:
        assert ds.read(1).max() == 2
    counter.take()
    with cloudio.session("strong") as s, cloudio.open(vrt_url) as ds:  # unchanged: the VRT and its source
        assert ds.read(1).max() == 2
    assert s.stats.revalidations == 2 and len(counter.take()) == 2
