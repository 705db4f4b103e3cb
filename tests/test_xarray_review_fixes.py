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


def _dated() -> xr.Dataset:
    import pandas as pd

    return xr.Dataset({"x": (("t",), np.arange(8.0))}, coords={"t": pd.date_range("2000", periods=8)})


#: input xarray or zarr refuses only once the group is open, which mode="w" opens by deleting what it held
_REFUSED_LATE = {
    "attribute of the dataset": lambda ds: (ds.assign_attrs(a={1, 2}), {}),
    "attribute of a variable": lambda ds: (ds.assign(x=ds.x.assign_attrs(b={1})), {}),
    "dtype": lambda ds: (ds, {"encoding": {"x": {"dtype": "not-a-dtype"}}}),
    "compressors": lambda ds: (ds, {"encoding": {"x": {"compressors": "nope"}}}),
    "zero chunks": lambda ds: (ds, {"encoding": {"x": {"chunks": (0,)}}}),
    "time units": lambda ds: (ds, {"encoding": {"t": {"units": "garbage"}}}),
    "calendar": lambda ds: (ds, {"encoding": {"t": {"calendar": "martian"}}}),
    "fill value": lambda ds: (ds, {"encoding": {"x": {"_FillValue": "abc"}}}),
    "shards": lambda ds: (ds, {"encoding": {"x": {"chunks": (3,), "shards": (4,)}}}),
    "scale factor": lambda ds: (ds, {"encoding": {"x": {"scale_factor": "a", "dtype": "i2"}}}),
    "write_empty_chunks": lambda ds: (ds, {"write_empty_chunks": "yes"}),
}


@pytest.mark.parametrize("dask_backed", [False, True], ids=["numpy", "dask"])
@pytest.mark.parametrize("case", sorted(_REFUSED_LATE))
def test_input_xarray_refuses_late_is_refused_before_mode_w_deletes_the_store(gcs_bucket, case, dask_backed):
    """Bad attributes or encodings given to to_zarr(mode="w") were found by xarray or zarr only after zarr had
    deleted the store's objects: the dataset stored there was gone, the store marked incomplete, and for some
    (a calendar, zero chunks) the error was the library's raw AttributeError or ZeroDivisionError."""
    url = f"{gcs_bucket}/late.zarr"
    cloudio.to_zarr(_dated(), url, mode="w")
    before = sorted(cloudio.filesystem(url).find(url))
    ds, kwargs = _REFUSED_LATE[case](_dated() * 1)
    if dask_backed:
        ds = ds.chunk({"t": 4})
    with pytest.raises(cloudio.ConfigurationError, match="nothing was written") as raised:
        cloudio.to_zarr(ds, url, mode="w", **kwargs)
    assert url in str(raised.value) and raised.value.__cause__ is not None
    assert sorted(cloudio.filesystem(url).find(url)) == before  # nothing deleted, no marker
    assert cloudio.open_zarr(url).x.values.tolist() == list(range(8))


def test_a_new_store_refused_late_is_left_empty_not_marked(gcs_bucket):
    """mode="w-" onto a new store: the same refusals left a half-made store behind, marked incomplete."""
    url = f"{gcs_bucket}/new.zarr"
    with pytest.raises(cloudio.ConfigurationError, match="nothing was written"):
        cloudio.to_zarr(_dated(), url, mode="w-", encoding={"x": {"compressors": "nope"}})
    assert cloudio.filesystem(url).find(url) == []
    cloudio.to_zarr(_dated(), url, mode="w-")
    assert cloudio.open_zarr(url).x.values.tolist() == list(range(8))


class _Failed(ValueError):
    """The user's own computation failing."""


def _fails_at_third_block(block: np.ndarray, block_info: dict | None = None) -> np.ndarray:
    if block_info is not None and block_info[0]["chunk-location"][0] == 2:
        raise _Failed("the user's own computation failed")
    return block


@pytest.mark.parametrize("mode", ["w", "a"])
def test_a_failure_of_the_users_own_dask_graph_is_not_called_refused_input(gcs_bucket, mode):
    """A ValueError raised by the user's own Dask task once chunks had gone up was raised as a ConfigurationError
    saying to_zarr "refused its input" and to "fix the arguments": the user's own error is raised as it is, and
    the store stays marked incomplete."""
    import dask
    import dask.array as da

    url = f"{gcs_bucket}/graph.zarr"
    if mode == "a":
        cloudio.to_zarr(xr.Dataset({"y": (("t",), np.arange(8.0))}), url, mode="w")
    data = da.map_blocks(_fails_at_third_block, da.arange(8.0, chunks=2), dtype="f8")
    with dask.config.set(scheduler="sync"), pytest.raises(_Failed) as raised:
        cloudio.to_zarr(xr.Dataset({"x": (("t",), data)}), url, mode=mode, encoding={"x": {"chunks": (2,)}})
    assert not isinstance(raised.value, cloudio.CloudioError) and "refused its input" not in str(raised.value)
    with pytest.raises(cloudio.IncompleteWriteError):
        cloudio.open_zarr(url)


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_a_store_of_arrays_xarray_cannot_name_dimensions_of_is_a_named_refusal(gcs_bucket, zarr_format):
    """open_zarr of a group whose arrays carry no dimension names (written with save_array or plain zarr), and an
    append to it, raised xarray's raw KeyError: a ConfigurationError names the URL, the array and what to do."""
    import zarr

    url = f"{gcs_bucket}/plain.zarr"
    zarr.open_group(cloudio.zarr_store(url), mode="w", zarr_format=zarr_format)
    cloudio.save_array(np.zeros((3, 4)), f"{url}/a", zarr_format=zarr_format)
    with pytest.raises(cloudio.ConfigurationError, match=r"dimension names.*load_array") as raised:
        cloudio.open_zarr(url)
    assert url in str(raised.value) and isinstance(raised.value.__cause__, KeyError)
    with pytest.raises(cloudio.ConfigurationError, match=r"dimension names.*Nothing was written") as raised:
        cloudio.to_zarr(xr.Dataset({"a": (("y", "x"), np.ones((3, 4)))}), url, mode="a")
    assert url in str(raised.value) and isinstance(raised.value.__cause__, KeyError)
    assert cloudio.load_array(f"{url}/a").shape == (3, 4)
    assert not cloudio.filesystem(url).exists(f"{url}/{MARKER}")


@pytest.mark.parametrize("mode", ["w", "w-", "r+"])
def test_append_dim_with_a_mode_that_does_not_append_is_named_as_such(gcs_bucket, mode):
    """append_dim with mode="w" was refused saying no dataset was stored there to append to, also when one was:
    xarray's rule (an append needs mode "a") is said, and nothing is written."""
    url = f"{gcs_bucket}/stored.zarr"
    cloudio.to_zarr(_dataset(), url, mode="w")
    before = sorted(cloudio.filesystem(url).find(url))
    with pytest.raises(cloudio.ConfigurationError, match=r"append_dim='t' is given with mode=.*mode='a'") as raised:
        cloudio.to_zarr(_dataset(), url, mode=mode, append_dim="t")
    assert "no dataset is stored" not in str(raised.value) and url in str(raised.value)
    assert sorted(cloudio.filesystem(url).find(url)) == before


@pytest.mark.parametrize("append_dim", [None, "t"])
def test_an_append_whose_new_variable_zarr_refuses_writes_nothing(gcs_bucket, append_dim):
    """to_zarr(mode="a") adding variables, one with an encoding zarr refuses (a compressor that is no codec): zarr
    made the others first, so the store was left marked incomplete, refused to every reader until rewritten whole
    with mode="w" (an append that succeeds later takes off only its own mark)."""
    url = f"{gcs_bucket}/added.zarr"
    cloudio.to_zarr(_dated(), url, mode="w")
    before = sorted(cloudio.filesystem(url).find(url))
    more = _dated().assign(a=("t", np.ones(8)), y=("t", np.ones(8)))
    if append_dim is not None:
        import pandas as pd

        more = more.assign_coords(t=pd.date_range("2001", periods=8))
    with pytest.raises(cloudio.ConfigurationError, match="nothing was written") as raised:
        cloudio.to_zarr(more, url, mode="a", append_dim=append_dim, encoding={"y": {"compressors": "nope"}})
    assert url in str(raised.value) and isinstance(raised.value.__cause__, TypeError)
    assert sorted(cloudio.filesystem(url).find(url)) == before
    assert cloudio.open_zarr(url).x.values.tolist() == list(range(8))


@pytest.mark.parametrize("face", ["to_zarr", "open_zarr"])
def test_storage_options_with_a_store_are_refused_not_ignored(gcs_bucket, face):
    """storage_options given with a cloudio.zarr_store (which has its own) were dropped without a word, so the
    credentials or project they named were not used; xarray refuses them with a store that is not a URL."""
    url = f"{gcs_bucket}/opts.zarr"
    cloudio.to_zarr(_dataset(), url, mode="w")
    before = sorted(cloudio.filesystem(url).find(url))
    options = {"project": "another-project"}
    refused = r"storage_options.*zarr_store\(url, \*\*storage_options\)"
    with pytest.raises(cloudio.ConfigurationError, match=refused) as raised:
        if face == "to_zarr":
            cloudio.to_zarr(_dataset() * 2, cloudio.zarr_store(url), mode="w", storage_options=options)
        else:
            cloudio.open_zarr(cloudio.zarr_store(url), storage_options=options)
    assert url in str(raised.value)
    assert sorted(cloudio.filesystem(url).find(url)) == before
    assert cloudio.open_zarr(url).x.values.tolist() == list(range(8))


def test_load_array_refuses_dask_chunks_for_an_eager_read(gcs_bucket):
    """load_array(url, chunks=...) without lazy=True dropped the chunks and read the whole array into memory at
    once; the chunks are Dask's: the call is refused before any request, saying to pass lazy=True."""
    url = f"{gcs_bucket}/eager.zarr"
    cloudio.save_array(np.arange(100.0), url, chunks=(10,))
    with pytest.raises(cloudio.ConfigurationError, match=r"chunks=.*lazy=True") as raised:
        cloudio.load_array(url, chunks=(50,))
    assert url in str(raised.value)
    assert cloudio.load_array(url, lazy=True, chunks=(50,)).chunks == ((50, 50),)
