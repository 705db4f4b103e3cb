"""Fixes from a review of cloudio.to_zarr / open_zarr / save_array / load_array (src/cloudio/_zarr/xarray.py,
src/cloudio/_zarr/arrays.py): each test failed before its fix."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

import cloudio

pytestmark = [pytest.mark.filterwarnings("ignore:Consolidated metadata is currently not part:UserWarning")]

MARKER = ".cloudio-write-in-progress"


def _dataset() -> xr.Dataset:
    return xr.Dataset({"x": (("t",), np.arange(8.0))}, coords={"t": np.arange(8)})


@pytest.mark.parametrize("zarr_format", [4, 1, "3"])
def test_an_unknown_zarr_format_is_refused_before_a_replacing_write_deletes_the_store(gcs_bucket, zarr_format):
    """to_zarr(mode="w", zarr_format=4) was let through to xarray, which checks the format only after zarr
    emptied the store: the dataset stored there was deleted and the store left marked incomplete, for a typo."""
    url = f"{gcs_bucket}/fmt.zarr"
    cloudio.to_zarr(_dataset(), url, mode="w")
    before = sorted(cloudio.filesystem(url).find(url))
    with pytest.raises(cloudio.ConfigurationError, match=r"zarr_format=.*Nothing was written") as raised:
        cloudio.to_zarr(_dataset() * 2, url, mode="w", zarr_format=zarr_format)
    assert url in str(raised.value)
    assert sorted(cloudio.filesystem(url).find(url)) == before  # nothing deleted, no marker left
    assert cloudio.open_zarr(url).x.values.tolist() == list(range(8))
