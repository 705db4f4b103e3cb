"""Appends whose values the stored dtype cannot hold are refused before anything is written.

xarray casts an appended variable to the dtype stored, within a kind without
a word: int64 300 becomes int8 44 and float64 1e300 float32 inf. The plain
xarray runs below show it on the same emulator; cloudio refuses the write,
names the variable and the value, and the store keeps what it held.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import xarray as xr

import cloudio

pytestmark = pytest.mark.filterwarnings("ignore:Consolidated metadata is currently not part:UserWarning")


def _base(dtype: str) -> xr.Dataset:
    return xr.Dataset({"v": (("t",), np.array([1, 2], dtype))}, coords={"t": [0, 1]})


def _more(values: list[float], dtype: str) -> xr.Dataset:
    return xr.Dataset({"v": (("t",), np.array(values, dtype))}, coords={"t": [2, 3]})


CASES = pytest.mark.parametrize("stored, given, values, kept", [
    ("i1", "i8", [300, 1], [44, 1]),
    ("i1", "i8", [1, -200], [1, 56]),
    ("u2", "u8", [70000, 1], [4464, 1]),
    ("f4", "f8", [1e300, 1.5], [np.inf, 1.5]),
], ids=["int8-high", "int8-low", "uint16", "float32-overflow"])


@CASES
def test_plain_xarray_wraps_or_overflows_an_append_characterized(gcs_emulator, gcs_bucket, stored, given, values,
                                                                 kept):
    opts = {"token": "anon", "endpoint_url": gcs_emulator.url}
    url = f"{gcs_bucket}/plain-{stored}.zarr"
    _base(stored).to_zarr(url, mode="w", storage_options=opts)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # numpy's overflow warning at most
        _more(values, given).to_zarr(url, append_dim="t", storage_options=opts)
    got = xr.open_zarr(url, storage_options=opts).v.values
    assert got.tolist() == [1, 2, *kept]


@CASES
def test_an_append_whose_values_the_stored_dtype_cannot_hold_is_refused(gcs_bucket, stored, given, values, kept):
    url = f"{gcs_bucket}/narrow-{stored}.zarr"
    cloudio.to_zarr(_base(stored), url, mode="w")
    bad = max(values, key=lambda v: abs(v))
    with pytest.raises(cloudio.ConfigurationError, match=rf"narrow-{stored}\.zarr: variable 'v' is stored as") as e:
        cloudio.to_zarr(_more(values, given), url, append_dim="t")
    assert repr(bad) in str(e.value) and "Nothing was written" in str(e.value)
    back = cloudio.open_zarr(url)  # no write marker left: the store reads as it was
    assert back.v.values.tolist() == [1, 2] and back.v.dtype == np.dtype(stored)


def test_an_append_of_a_wider_dtype_whose_values_fit_goes_through(gcs_bucket):
    url = f"{gcs_bucket}/fits.zarr"
    cloudio.to_zarr(_base("i1"), url, mode="w")
    cloudio.to_zarr(_more([127, -128], "i8"), url, append_dim="t")
    back = cloudio.open_zarr(url)
    assert back.v.values.tolist() == [1, 2, 127, -128] and back.v.dtype == np.dtype("i1")


def test_a_region_write_whose_values_the_stored_dtype_cannot_hold_is_refused(gcs_bucket):
    url = f"{gcs_bucket}/region.zarr"
    cloudio.to_zarr(xr.Dataset({"v": (("t",), np.zeros(4, "i1"))}, coords={"t": [0, 1, 2, 3]}), url, mode="w")
    part = xr.Dataset({"v": (("t",), np.array([1000, 1], "i8"))})
    with pytest.raises(cloudio.ConfigurationError, match="1000"):
        cloudio.to_zarr(part, url, region={"t": slice(0, 2)})
    assert cloudio.open_zarr(url).v.values.tolist() == [0, 0, 0, 0]
