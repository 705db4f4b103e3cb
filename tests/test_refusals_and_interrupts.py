"""Writes refused or interrupted before they changed anything leave what was there as it was, and a write
over a failed one's leftovers goes through; cloudio.open of something that is not an object says what is
there, at the cost of one listing."""

from __future__ import annotations

import time

import numpy as np
import pytest
import xarray as xr
from conftest import interrupted_while_marker_goes_up
from outcomes import ctrl_c_once_hit

import cloudio
from cloudio.emulator import Emulator

MARKER = ".cloudio-write-in-progress"
def _names(emu: Emulator, bucket_url: str, prefix: str = "") -> set[str]:
    return {b.name for b in emu.client.list_blobs(bucket_url.removeprefix("gs://"), prefix=prefix or None)}


def _leave_a_failed_first_write(emu: Emulator, bucket: str, fault_proxy, name: str) -> np.ndarray:
    """A first save_array at bucket/name whose zarr.json was refused while its shards went up: the marker
    and the shards are left, no metadata document (zarr.json goes up alongside the chunks, arrays.py)."""
    a = np.arange(40 * 40, dtype="i4").reshape(40, 40)
    fault_proxy.add("status", code=403, method="POST", path=rf"/upload/.*name={name}%2Fzarr\.json", times=None)
    with pytest.raises(cloudio.CloudioError):
        cloudio.save_array(a, f"{bucket}/{name}", chunks=(10, 10), shards=(20, 20))
    fault_proxy.clear()
    left = _names(emu, bucket, name + "/")
    assert f"{name}/zarr.json" not in left and f"{name}/{MARKER}" in left, left
    assert any(n.startswith(f"{name}/c/") for n in left), left
    with pytest.raises(cloudio.IncompleteWriteError, match=r"Write it again \(cloudio.save_array / cloudio.to_zarr"):
        cloudio.load_array(f"{bucket}/{name}")
    return a


@pytest.mark.parametrize("rewrite", ["save_array", "save_array-dask", "to_zarr-w"])
def test_a_failed_first_write_whose_metadata_never_went_up_can_be_written_again(
        gcs_emulator: Emulator, gcs_bucket: str, fault_proxy, quick_retries, rewrite: str) -> None:
    """IncompleteWriteError says: "Write it again (cloudio.save_array / cloudio.to_zarr with mode='w')". After a
    first write whose zarr.json was refused (its shards went up, beside the marker), that rewrite goes through:
    the marker says the objects are a cloudio write's."""
    import dask.array as da

    url = f"{gcs_bucket}/first.zarr"
    a = _leave_a_failed_first_write(gcs_emulator, gcs_bucket, fault_proxy, "first.zarr")
    if rewrite == "save_array":
        cloudio.save_array(a, url, chunks=(10, 10), shards=(20, 20))
        np.testing.assert_array_equal(cloudio.load_array(url), a)
    elif rewrite == "save_array-dask":
        cloudio.save_array(da.from_array(a, chunks=20), url, chunks=(10, 10), shards=(20, 20))
        np.testing.assert_array_equal(cloudio.load_array(url), a)
    else:
        cloudio.to_zarr(xr.Dataset({"v": (("y", "x"), a)}), url, mode="w", consolidated=False)
        np.testing.assert_array_equal(cloudio.open_zarr(url)["v"].values, a)
    assert f"first.zarr/{MARKER}" not in _names(gcs_emulator, gcs_bucket, "first.zarr/")


def test_open_of_a_missing_object_costs_one_more_request_not_ten(gcs_bucket: str, fault_proxy) -> None:
    """Telling a Zarr store or a folder from nothing costs one listing under the name, on the failure only."""
    cloudio.filesystem(gcs_bucket).pipe(f"{gcs_bucket}/other.tif", b"x")  # the bucket is not empty
    fault_proxy.log.clear()
    with pytest.raises(cloudio.ObjectNotFoundError):
        cloudio.open(f"{gcs_bucket}/missing.tif")
    sent = fault_proxy.requests()
    diagnosis = [r for r in sent if "missing.tif%2F" in r[1] or "missing.tif/" in r[1].split("prefix=")[-1]]
    # cloudio's listing of the folder (the plan), GDAL's GET and its listing under the name, cloudio's metadata
    # GET, the bucket's GET (5 before the Zarr-store check), and one listing under the name
    assert len(sent) <= 6, sent
    assert len(diagnosis) <= 2, diagnosis


def test_open_of_a_folder_does_not_say_it_does_not_exist(gcs_bucket: str) -> None:
    """cloudio.open of a prefix holding objects (a folder) says so, not that the URL does not exist and to
    create it with mode 'w' (which would make an object beside the folder)."""
    cloudio.filesystem(gcs_bucket).pipe({f"{gcs_bucket}/scenes/a.tif": b"x", f"{gcs_bucket}/scenes/b.tif": b"y"})
    with pytest.raises(cloudio.CloudioError) as info:
        cloudio.open(f"{gcs_bucket}/scenes")
    msg = str(info.value)
    assert "does not exist" not in msg and "mode 'w'" not in msg, msg


@pytest.mark.usefixtures("python_sigint")
def test_an_interrupt_while_the_marker_goes_up_leaves_no_marker_over_the_old_array(
        gcs_emulator: Emulator, gcs_bucket: str, fault_proxy) -> None:
    """A Ctrl-C while save_array's marker is on its way (it reached the server, its answer is held): nothing but
    the marker was written, so it goes again (as after a refused listing), and the old array reads whole."""
    url = f"{gcs_bucket}/intr.zarr"
    old = np.arange(64 * 64, dtype="f4").reshape(64, 64)
    cloudio.save_array(old, url, chunks=(16, 16), shards=(32, 32))
    interrupted_while_marker_goes_up(fault_proxy, "intr.zarr",
                                     lambda: cloudio.save_array(-old, url, chunks=(16, 16), shards=(32, 32)))
    fault_proxy.clear()
    assert f"intr.zarr/{MARKER}" not in _names(gcs_emulator, gcs_bucket, "intr.zarr")
    np.testing.assert_array_equal(cloudio.load_array(url), old)


def test_the_refusal_spares_zarr_nodes_and_catches_folders_however_spelled(
        gcs_emulator: Emulator, gcs_bucket: str, tmp_path) -> None:
    """Regression: writes over Zarr nodes go through (a group written by xarray, a v2 group, an array inside a
    group, a group beside other groups); writes over objects that are not Zarr's are refused whatever the
    spelling (a trailing slash, the bucket with a slash, objects only deeper down, a local folder)."""
    b = gcs_bucket
    ds = xr.Dataset({"v": ("x", np.arange(4))})
    cloudio.to_zarr(ds, f"{b}/a.zarr", group="g", mode="w", consolidated=False)
    cloudio.to_zarr(ds, f"{b}/a.zarr", mode="w", consolidated=False)
    cloudio.to_zarr(ds, f"{b}/v2.zarr", group="g", mode="w", zarr_format=2)
    cloudio.to_zarr(ds, f"{b}/v2.zarr", mode="w", zarr_format=2)
    cloudio.to_zarr(ds, f"{b}/c.zarr", mode="w", consolidated=False)
    np.testing.assert_array_equal(cloudio.load_array(cloudio.save_array(np.arange(3), f"{b}/c.zarr/new").store),
                                  np.arange(3))
    cloudio.to_zarr(ds, f"{b}/d.zarr", group="g1", mode="w", consolidated=False)
    cloudio.to_zarr(ds, f"{b}/d.zarr", group="g2", mode="w", consolidated=False)
    assert cloudio.open_zarr(f"{b}/d.zarr", group="g1")["v"].values.tolist() == [0, 1, 2, 3]
    cloudio.filesystem(b).pipe({f"{b}/f/x.txt": b"x", f"{b}/deep/a/b/x.txt": b"y"})
    before = _names(gcs_emulator, b)
    for url in (f"{b}/f/", f"{b}/", f"{b}/deep"):
        with pytest.raises(cloudio.AlreadyExistsError, match="not a Zarr store"):
            cloudio.save_array(np.arange(3), url)
    with pytest.raises(cloudio.AlreadyExistsError, match="not a Zarr store"):
        cloudio.to_zarr(ds, f"{b}/f/", mode="w")
    assert _names(gcs_emulator, b) == before
    local = tmp_path / "loc"
    local.mkdir()
    (local / "notes.txt").write_text("x")
    with pytest.raises(cloudio.AlreadyExistsError):
        cloudio.save_array(np.arange(3), str(local))
    assert sorted(p.name for p in local.iterdir()) == ["notes.txt"]


@pytest.mark.usefixtures("python_sigint")
def test_an_interrupt_while_a_vrt_upload_waits_to_try_again_sends_nothing_more(
        gcs_emulator: Emulator, gcs_bucket: str, fault_proxy) -> None:
    """Ctrl-C while ``write_vrt``'s upload waits to try again after a 503: the upload is cancelled before
    KeyboardInterrupt is raised, so the old VRT stays. It went on in the background (fsspec's ``sync``
    leaves its coroutine running): the new VRT landed after the caller had been told the write stopped."""

    from affine import Affine

    src, url = f"{gcs_bucket}/v/src.tif", f"{gcs_bucket}/v/intr.vrt"
    with cloudio.open(src, "w", driver="GTiff", width=16, height=16, count=2, dtype="uint8", crs="EPSG:4326",
                      transform=Affine(0.1, 0, 10, 0, -0.1, 50)) as ds:
        ds.write(np.stack([np.full((16, 16), 1, "uint8"), np.full((16, 16), 2, "uint8")]))
    with cloudio.open(src) as ds:
        old = ds.read(1)
        cloudio.write_vrt(ds, url)
    before = _stored_vrt(gcs_emulator, gcs_bucket)
    upload = r"^/upload/.*v%2Fintr\.vrt"
    sent = len(fault_proxy.requests(upload))
    refused = fault_proxy.add("status", code=503, method="POST", path=upload)

    with ctrl_c_once_hit(refused, 60), pytest.raises(KeyboardInterrupt):
        cloudio.write_vrt(f"<VRTDataset rasterXSize='16' rasterYSize='16'><VRTRasterBand dataType='Byte' "
                          f"band='1'><SimpleSource><SourceFilename>{src}</SourceFilename><SourceBand>2"
                          "</SourceBand></SimpleSource></VRTRasterBand></VRTDataset>", url)
    time.sleep(3)  # what would go on in the background has had its time
    assert [status for _, _, status in fault_proxy.requests(upload)[sent:]] == [503]
    assert _stored_vrt(gcs_emulator, gcs_bucket) == before
    with cloudio.open(url) as ds:
        np.testing.assert_array_equal(ds.read(1), old)


def _stored_vrt(emu: Emulator, bucket_url: str) -> bytes:
    return emu.client.bucket(bucket_url.removeprefix("gs://")).get_blob("v/intr.vrt").download_as_bytes()
