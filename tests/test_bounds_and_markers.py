"""The GDAL consumer's bounds (_DIRS_MAX, _TRACK_MAX, _EMPTY_DIR_MAX) drop only what is asked for again, and a
write marker whose upload failed or was interrupted leaves no marker over an untouched store nor lifts a
refusal. Faults come from the fault proxy; the bounds are lowered with monkeypatch (the same code paths)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import interrupted_while_marker_goes_up
from rasters import external_overview, put, tif

import cloudio
from cloudio.emulator import Emulator

MARKER = ".cloudio-write-in-progress"


def _open_close(urls: list[str]) -> None:
    for u in urls:
        with cloudio.open(u):
            pass


def dir_key_of(url: str) -> str:
    return "/vsigs/" + url.removeprefix("gs://").rsplit("/", 1)[0]


def _fillers(bucket: str, n: int, tag: str = "f") -> list[str]:
    """``n`` tiny GeoTIFFs, each in its own directory (journaled writes)."""
    data = tif(1, 8)
    batch = {f"{bucket}/{tag}{i}/a.tif": data for i in range(n)}
    cloudio.filesystem(bucket).pipe(batch)
    return list(batch)


# ---------------------------------------------------------------------------------------------------------
# (1) the GDAL consumer's bounds
# ---------------------------------------------------------------------------------------------------------


def test_strong_read_sees_a_sidecar_another_process_added_once_a_forgotten_directory_was_listed_again(
        gcs_emulator: Emulator, gcs_bucket: str, monkeypatch, tmp_path) -> None:
    """A directory GDAL listed whose names the bound dropped is listed again by cloudio later: GDAL's own listing
    of it may lack what another writer added meanwhile, so it is cleared before a read that could see it."""
    from cloudio._gdal import consumer as gdal_consumer

    monkeypatch.setattr(gdal_consumer, "_DIRS_MAX", 8)
    data = tif(1, 64)
    ovr = external_overview(data, tmp_path)
    a, b = f"{gcs_bucket}/two/a.tif", f"{gcs_bucket}/two/b.tif"
    cloudio.filesystem(gcs_bucket).pipe({a: data, f"{a}.ovr": ovr, b: data})
    with cloudio.open(a) as ds:  # GDAL lists two/ (a.tif has a sidecar)
        assert ds.overviews(1) == [2]
    _open_close(_fillers(gcs_bucket, 20))  # two/'s names dropped (kept with its flags: GDAL listed it)
    put(gcs_emulator, f"{b}.ovr", ovr)  # another writer: cloudio hears nothing
    with cloudio.open(a) as ds:  # session level: cloudio lists two/ again (now with b.tif.ovr)
        assert ds.overviews(1) == [2]
    with cloudio.session("strong"), cloudio.open(b) as ds:
        assert ds.overviews(1) == [2], "the strong read of b.tif missed the .ovr another process wrote"


def test_strong_read_sees_a_world_file_another_process_added_once_a_forgotten_directory_was_listed_again(
        gcs_emulator: Emulator, gcs_bucket: str, monkeypatch, tmp_path) -> None:
    """As for an .ovr, for a world file (.tfw) another writer added: the strong read takes its transform."""
    from cloudio._gdal import consumer as gdal_consumer

    monkeypatch.setattr(gdal_consumer, "_DIRS_MAX", 8)
    data = tif(1, 64)
    ovr = external_overview(data, tmp_path)
    a, b = f"{gcs_bucket}/tfw/a.tif", f"{gcs_bucket}/tfw/b.tif"
    cloudio.filesystem(gcs_bucket).pipe({a: data, f"{a}.ovr": ovr, b: data})
    with cloudio.open(a):
        pass
    _open_close(_fillers(gcs_bucket, 20, "g"))
    put(gcs_emulator, f"{gcs_bucket}/tfw/b.tfw", b"10\n0\n0\n-10\n500005\n4000005\n")
    with cloudio.open(a):
        pass
    with cloudio.session("strong"), cloudio.open(b) as ds:
        assert ds.transform.a == 10 and ds.transform.c == 500000, ds.transform


def test_the_listing_just_stored_is_never_the_one_dropped(
        gcs_bucket: str, monkeypatch, tmp_path) -> None:
    """With the smallest bound the open under way still plans with the listing it just stored (else GDAL lists
    the directory behind cloudio's back, and an .ovr written through cloudio later is missed)."""
    from cloudio._gdal import consumer as gdal_consumer

    monkeypatch.setattr(gdal_consumer, "_DIRS_MAX", 1)
    data = tif(1, 64)
    ovr = external_overview(data, tmp_path)
    url = f"{gcs_bucket}/d/a.tif"
    cloudio.filesystem(gcs_bucket).pipe(url, data)
    for other in _fillers(gcs_bucket, 4, "x"):  # until one listing is kept (each bound drops all of them)
        _open_close([other])
        if len(gdal_consumer.consumer._listed) == 1:
            break
    _open_close([url])  # d/ listed next: the bound drops every listing but the one just stored
    cloudio.filesystem(gcs_bucket).pipe(f"{url}.ovr", ovr)  # journaled
    with cloudio.open(url) as ds:
        assert ds.overviews(1) == [2], "cloudio's own write of the .ovr was missed (GDAL's listing is stale)"


def test_directory_table_stays_bounded_when_empty_dir_options_are_dropped(
        gcs_emulator: Emulator, gcs_bucket: str, monkeypatch) -> None:
    """Directories whose EMPTY_DIR options were dropped count as ones GDAL may have listed: the bound still drops
    them (GDAL's listing cleared first), so the table does not grow by one per directory read."""
    from cloudio._gdal import consumer as gdal_consumer

    monkeypatch.setattr(gdal_consumer, "_DIRS_MAX", 20)
    monkeypatch.setattr(gdal_consumer, "_EMPTY_DIR_MAX", 10)
    urls = _fillers(gcs_bucket, 200, "h")
    _open_close(urls)
    c = gdal_consumer.consumer
    mine = [k for k in c._dirs if k.startswith(f"/vsigs/{gcs_bucket[5:]}/h")]
    assert len(mine) <= 2 * 20 + 10, f"{len(mine)} _Dir entries kept after reading 200 directories (_DIRS_MAX 20)"


def test_unchanged_object_read_again_at_strong_level_after_its_tables_were_dropped_reads_right(
        gcs_emulator: Emulator, gcs_bucket: str, monkeypatch, tmp_path) -> None:
    """Kept (passes): an object with an .ovr, read at the strong level, its directory and checks dropped, then
    its .ovr deleted by another writer: the "unknown" path clears it."""
    from cloudio._gdal import consumer as gdal_consumer

    monkeypatch.setattr(gdal_consumer, "_DIRS_MAX", 8)
    monkeypatch.setattr(gdal_consumer, "_TRACK_MAX", 10)
    data = tif(3, 64)
    ovr = external_overview(data, tmp_path)
    url = f"{gcs_bucket}/k/a.tif"
    cloudio.filesystem(gcs_bucket).pipe({url: data, f"{url}.ovr": ovr})
    with cloudio.session("strong"):
        with cloudio.open(url) as ds:
            assert ds.overviews(1) == [2]
        _open_close(_fillers(gcs_bucket, 30, "k"))
    gcs_emulator.client.bucket(gcs_bucket[5:]).blob("k/a.tif.ovr").delete()
    with cloudio.session("strong"), cloudio.open(url) as ds:
        assert ds.overviews(1) == []
        assert int(ds.read(1)[0, 0]) == 3


def test_vrt_whose_source_directory_was_dropped_sees_the_source_rewritten_by_another_process(
        gcs_emulator: Emulator, gcs_bucket: str, monkeypatch) -> None:
    """Kept (passes): a VRT's source directory and checks dropped from the tables, the source overwritten
    elsewhere: the strong read sees the new pixels."""
    from rasters import vrt_xml

    from cloudio._gdal import consumer as gdal_consumer

    monkeypatch.setattr(gdal_consumer, "_DIRS_MAX", 8)
    monkeypatch.setattr(gdal_consumer, "_TRACK_MAX", 10)
    b = gcs_bucket[5:]
    src, vrt = f"{gcs_bucket}/vs/src.tif", f"{gcs_bucket}/vv/m.vrt"
    put(gcs_emulator, src, tif(1))
    put(gcs_emulator, vrt, vrt_xml(f"/vsigs/{b}/vs/src.tif"))
    with cloudio.session("strong"):
        with cloudio.open(vrt) as ds:
            assert int(ds.read(1)[0, 0]) == 1
        _open_close(_fillers(gcs_bucket, 30, "v"))
    put(gcs_emulator, src, tif(7))
    with cloudio.session("strong"), cloudio.open(vrt) as ds:
        assert int(ds.read(1)[0, 0]) == 7


# ---------------------------------------------------------------------------------------------------------
# (2) WriteMark: a marker update that failed or was interrupted
# ---------------------------------------------------------------------------------------------------------


def _names(emu: Emulator, bucket_url: str, prefix: str) -> set[str]:
    return {b.name for b in emu.client.list_blobs(bucket_url.removeprefix("gs://"), prefix=prefix)}


def _settle() -> None:
    """Let what is still running on zarr's loop take its (released) answer in."""
    import asyncio

    from zarr.core.sync import sync

    for _ in range(20):
        sync(asyncio.sleep(0.05))


@pytest.mark.usefixtures("python_sigint")
def test_an_interrupt_while_to_zarrs_marker_goes_up_leaves_no_marker_over_the_old_dataset(
        gcs_emulator: Emulator, gcs_bucket: str, fault_proxy) -> None:
    """A Ctrl-C while to_zarr's marker is on its way (stored, its answer held): the write is cancelled, its
    entry taken off, and the untouched dataset reads as before."""
    import xarray as xr

    url = f"{gcs_bucket}/tz.zarr"
    old = xr.Dataset({"v": (("y", "x"), np.arange(16.0).reshape(4, 4))})
    cloudio.to_zarr(old, url, mode="w", consolidated=False)
    interrupted_while_marker_goes_up(fault_proxy, "tz.zarr",
                                     lambda: cloudio.to_zarr(-old, url, mode="w", consolidated=False))
    _settle()
    fault_proxy.clear()
    assert f"tz.zarr/{MARKER}" not in _names(gcs_emulator, gcs_bucket, "tz.zarr/"), "marker left up"
    np.testing.assert_array_equal(cloudio.open_zarr(url)["v"].values, old["v"].values)


@pytest.mark.usefixtures("python_sigint")
def test_an_interrupt_while_a_dask_save_arrays_marker_goes_up_leaves_no_marker_over_the_old_array(
        gcs_emulator: Emulator, gcs_bucket: str, fault_proxy) -> None:
    """As for to_zarr, for save_array of a Dask array (the path that does not encode shards itself)."""
    import dask.array as da

    url = f"{gcs_bucket}/dk.zarr"
    old = np.arange(64 * 64, dtype="f4").reshape(64, 64)
    cloudio.save_array(old, url, chunks=(16, 16), shards=(32, 32))
    new = da.from_array(-old, chunks=32)
    interrupted_while_marker_goes_up(fault_proxy, "dk.zarr",
                                     lambda: cloudio.save_array(new, url, chunks=(16, 16), shards=(32, 32)))
    _settle()
    fault_proxy.clear()
    assert f"dk.zarr/{MARKER}" not in _names(gcs_emulator, gcs_bucket, "dk.zarr/"), "marker left up"
    np.testing.assert_array_equal(cloudio.load_array(url), old)


def test_a_lost_answer_to_the_marker_upload_does_not_lift_the_refusal_of_a_write_over_a_folder(
        gcs_emulator: Emulator, gcs_bucket: str, fault_proxy, quick_retries) -> None:
    """The marker's upload landed and its answer was lost: the retry finds this write's own entry, which is not an
    earlier writer's; the write over a folder of objects that are not Zarr's is still refused, nothing deleted."""
    url = f"{gcs_bucket}/folder"
    put(gcs_emulator, f"{url}/notes.txt", b"precious")
    put(gcs_emulator, f"{url}/img.png", b"also precious")
    fault_proxy.add("reset", method="POST", path=r"/upload/.*ifGenerationMatch=0",
                    body=rb"folder/\.cloudio-write", after=0)
    try:
        cloudio.save_array(np.arange(16, dtype="u1").reshape(4, 4), url, chunks=(2, 2))
    except cloudio.CloudioError as e:
        print("raised:", type(e).__name__, e)
    fault_proxy.clear()
    left = _names(gcs_emulator, gcs_bucket, "folder/")
    assert {"folder/notes.txt", "folder/img.png"} <= left, f"the folder's objects were deleted: {sorted(left)}"
