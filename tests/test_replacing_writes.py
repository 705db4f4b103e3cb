"""A write that replaces a Zarr store never deletes what is not Zarr's: a forgotten ``.zarr`` (or key) in
``save_array`` or ``to_zarr(mode="w")`` must not empty a folder or a bucket. Zarr's own overwrite deletes
everything under the URL; cloudio refuses when objects are there and no Zarr node is."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest
import xarray as xr

import cloudio
from cloudio.emulator import Emulator


def _names(emu: Emulator, bucket_url: str) -> set[str]:
    return {b.name for b in emu.client.list_blobs(bucket_url.removeprefix("gs://"))}


@pytest.mark.parametrize("data", [np.arange(3), da.arange(6, chunks=3)], ids=["numpy", "dask"])
@pytest.mark.parametrize("where", ["", "/results"], ids=["bucket-root", "folder"])
def test_save_array_over_objects_that_are_not_zarr_is_refused_and_deletes_nothing(
        gcs_emulator: Emulator, gcs_bucket: str, where: str, data: object) -> None:
    fs = cloudio.filesystem(gcs_bucket)
    fs.pipe({f"{gcs_bucket}{where}/scenes/s1.tif": b"someone's scene", f"{gcs_bucket}{where}/notes.txt": b"n"})
    before = _names(gcs_emulator, gcs_bucket)
    with pytest.raises(cloudio.AlreadyExistsError, match=r"holds 2 object\(s\) that are not a Zarr store.*"
                                                         r"'notes\.txt'.*nothing was written") as info:
        cloudio.save_array(data, f"{gcs_bucket}{where}")
    assert f"{gcs_bucket}{where}:" in str(info.value) and isinstance(info.value, FileExistsError)
    assert _names(gcs_emulator, gcs_bucket) == before  # nothing deleted, no marker left behind


@pytest.mark.parametrize("mode", ["w", "w-"])
def test_to_zarr_over_objects_that_are_not_zarr_is_refused_and_deletes_nothing(
        gcs_emulator: Emulator, gcs_bucket: str, mode: str) -> None:
    cloudio.filesystem(gcs_bucket).pipe(f"{gcs_bucket}/out/scene.tif", b"a scene")
    with pytest.raises(cloudio.AlreadyExistsError, match=r"out: holds 1 object\(s\) that are not a Zarr store "
                                                         r"\('scene\.tif'\)"):
        cloudio.to_zarr(xr.Dataset({"v": ("x", np.arange(4))}), f"{gcs_bucket}/out", mode=mode, consolidated=False)
    assert _names(gcs_emulator, gcs_bucket) == {"out/scene.tif"}


def test_a_store_and_a_failed_writes_leftovers_are_still_replaced(gcs_emulator: Emulator, gcs_bucket: str) -> None:
    """A Zarr node there (whatever else is under it, as zarr's overwrite has it), or only the marker and
    chunks of a write that failed before its metadata: replaced as before."""
    url = f"{gcs_bucket}/a.zarr"
    cloudio.save_array(np.arange(10), url, chunks=(5,))
    cloudio.filesystem(gcs_bucket).pipe(f"{url}/extra.txt", b"x")
    np.testing.assert_array_equal(cloudio.load_array(cloudio.save_array(np.ones(4), url).store), np.ones(4))
    assert _names(gcs_emulator, gcs_bucket) == {"a.zarr/zarr.json", "a.zarr/c/0"}
    ds = xr.Dataset({"v": ("x", np.arange(4))})
    cloudio.to_zarr(ds, url, mode="w", consolidated=False)
    assert cloudio.open_zarr(url)["v"].values.tolist() == [0, 1, 2, 3]
