"""A failed Dask write on a dask.distributed cluster writes nothing after it raised (docs/consistency.md).

Dask raises the first failed chunk task while the others still run on their workers; the context
that stops a failed write's changes in the client never reaches a worker process.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

distributed = pytest.importorskip("distributed")
da = pytest.importorskip("dask.array")

import xarray as xr

import cloudio

#: the failed write's other tasks compute this long before they write their shard
SLOW_SECONDS = 2.0


def _slow_or_failing(block: np.ndarray, block_info=None) -> np.ndarray:
    """Block (0, 0) fails at once; every other block is written ``SLOW_SECONDS`` later, after the failure."""
    if block_info[None]["chunk-location"] == (0, 0):
        raise RuntimeError("block (0, 0) failed")
    time.sleep(SLOW_SECONDS)
    return block + 1000.0


def _failing() -> da.Array:
    """Four blocks of one shard each: one fails, three are still computing when it does."""
    return da.from_array(np.zeros((64, 64)), chunks=32).map_blocks(_slow_or_failing, dtype="f8")


def test_failed_dask_save_array_writes_nothing_after_it_raised(proc_client, gcs_bucket):
    url = f"{gcs_bucket}/fail/a.zarr"
    with pytest.raises(RuntimeError, match="failed"):
        cloudio.save_array(_failing(), url, chunks=(32, 32), shards=(32, 32))
    with pytest.raises(cloudio.IncompleteWriteError):  # marked as before
        cloudio.load_array(url)
    fresh = np.arange(64 * 64, dtype="f8").reshape(64, 64)
    cloudio.save_array(fresh, url, chunks=(32, 32), shards=(32, 32))  # the rewrite after the failure
    time.sleep(2 * SLOW_SECONDS)  # the failed write's other tasks finish meanwhile
    got = np.asarray(cloudio.load_array(url))
    stale = int((got != fresh).sum())
    assert stale == 0, f"{stale} of {fresh.size} values are the failed write's, written after it raised"


def test_failed_dask_to_zarr_writes_nothing_after_it_raised(proc_client, gcs_bucket):
    url = f"{gcs_bucket}/fail2/ds.zarr"
    enc = {"v": {"chunks": (32, 32), "shards": (32, 32)}}
    with pytest.raises(RuntimeError, match="failed"):
        cloudio.to_zarr(xr.Dataset({"v": (("y", "x"), _failing())}), url, mode="w", zarr_format=3,
                        consolidated=False, encoding=enc)
    with pytest.raises(cloudio.IncompleteWriteError):
        cloudio.open_zarr(url, consolidated=False)
    fresh = np.arange(64 * 64, dtype="f8").reshape(64, 64)
    cloudio.to_zarr(xr.Dataset({"v": (("y", "x"), fresh)}), url, mode="w", zarr_format=3, consolidated=False,
                    encoding=enc)  # the rewrite after the failure
    time.sleep(2 * SLOW_SECONDS)
    got = cloudio.open_zarr(url, consolidated=False).v.values
    stale = int((got != fresh).sum())
    assert stale == 0, f"{stale} of {fresh.size} values are the failed write's, written after it raised"


def test_save_array_of_dask_data_returns_an_array_on_the_store_passed(gcs_bucket):
    """The array save_array returns is open on a store equal to the one passed (and to another
    zarr_store of the URL), though its Dask tasks wrote through a copy that names the write."""
    import dask.array as da

    url = f"{gcs_bucket}/a.zarr"
    store = cloudio.zarr_store(url)
    z = cloudio.save_array(da.ones((8, 8), chunks=4, dtype="uint8"), store, chunks=(4, 4))
    assert int(np.asarray(z[...]).sum()) == 64
    assert z.store == store, (type(z.store), type(store))
    assert z.store == cloudio.zarr_store(url)
