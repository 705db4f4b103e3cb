"""The bounded level (a number of seconds): no read goes back behind a change older than the bound, whether a listing
saw it or this process wrote beside it. Found by a review; each test failed before its fix."""

from __future__ import annotations

import time

import pytest
from rasters import put as _put
from rasters import tif

import cloudio
from cloudio.emulator import Emulator

zarr_warnings = pytest.mark.filterwarnings("ignore:Consolidated metadata is currently not part:UserWarning")


@zarr_warnings
def test_bounded_zarr_never_goes_back_past_the_bound(gcs_bucket: str, other_writer) -> None:
    """A resize older than the bound, seen by a bounded open, must not vanish at the next bounded open."""
    from rasters import small_dataset

    url = f"{gcs_bucket}/s.zarr"
    cloudio.to_zarr(small_dataset(), url, mode="w")
    other_writer("""
        import zarr
        group = zarr.open_group(f"gs://{BUCKET}/s.zarr", mode="r+", storage_options=SO, use_consolidated=False)
        group["a"].append(np.full((2, 4), 99.0))
        group["y"].append(np.array([4, 5]))
    """)
    time.sleep(4.5)  # the resize is now older than the bound
    with cloudio.session(4):
        assert cloudio.open_zarr(url)["a"].shape == (6, 4)  # listed: the truth
        # the resize is > 4 s old: no read at this bound may return the state before it
        assert cloudio.open_zarr(url)["a"].shape == (6, 4)


def test_bounded_open_after_own_fs_write_still_sees_an_old_sidecar(gcs_bucket: str, gcs_emulator: Emulator,
                                                                   tmp_path) -> None:
    from rasters import external_overview

    url = f"{gcs_bucket}/g/a.tif"
    _put(gcs_emulator, url, tif(3))
    with cloudio.open(url) as ds:  # session level: cloudio lists g/, no sidecar, GDAL told not to look
        assert ds.overviews(1) == []
    _put(gcs_emulator, url + ".ovr", external_overview(tif(4), tmp_path))  # another writer's overview
    time.sleep(4.5)  # older than the bound now
    cloudio.filesystem(gcs_bucket).pipe(url, tif(4))  # this process rewrites the pixels (nothing else)
    with cloudio.session(4), cloudio.open(url) as ds:
        assert ds.read(1)[0, 0] == 4
        assert ds.overviews(1) == [2]  # the .ovr is 4.5 s old: a 4 s bound must show it

