"""Region writes (to_zarr mode="r+") at the strong level read the documents another writer changed, not the stale
consolidated copy. Found by a review; the test failed before its fix."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

import cloudio

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.timeout(300)]


def _ds(nt=4, start=0):
    t = np.arange(start, start + nt)
    x = np.arange(nt * 3, dtype="f8").reshape(nt, 3) + start * 3
    return xr.Dataset({"x": (("t", "y"), x)}, coords={"t": t, "y": np.arange(3)})


def test_strong_region_write_after_another_writers_append(gcs_bucket, gcs_emulator):
    """Another writer (plain xarray) made the store and appended 3 steps without consolidating again. At the
    strong level, cloudio.to_zarr(mode="r+", region=...) into the new rows lists the store as open_zarr does
    and reads the documents (t=7); before, xarray read the stale .zmetadata (t=4) and refused the write."""
    import gcsfs

    url = f"{gcs_bucket}/strong-region.zarr"
    other = gcsfs.GCSFileSystem(endpoint_url=gcs_emulator.url, token="anon", skip_instance_cache=True)
    _ds().to_zarr(other.get_mapper(url), mode="w", zarr_format=2, consolidated=True)  # another writer's store
    _ds(3, start=4).to_zarr(other.get_mapper(url), append_dim="t", consolidated=False)  # behind cloudio's back
    new = _ds(3, start=4)
    new["x"] = -new.x
    with cloudio.session("strong"):
        cloudio.to_zarr(new.drop_vars(["t", "y"]), url, region={"t": slice(4, 7)}, mode="r+")
        got = cloudio.open_zarr(url)
    exp = np.arange(7 * 3, dtype="f8").reshape(7, 3)
    exp[4:] *= -1
    np.testing.assert_array_equal(got.x.values, exp)
