"""What a failed Zarr write leaves behind stays visible to the writes after it: a write that does not replace
the store keeps the failed write's mark, and a write that leaves a shard at the fill value stores it wherever
a late copy of the failed write could land."""

from __future__ import annotations

import time

import numpy as np
import pytest
import xarray as xr

import cloudio
from cloudio.emulator import Emulator


@pytest.mark.parametrize("writer", ["save_array", "to_zarr"])
def test_a_write_that_does_not_replace_the_store_keeps_a_failed_writes_mark(
        gcs_emulator: Emulator, gcs_bucket: str, fault_proxy, quick_retries, writer: str) -> None:
    """A first write stored its shards, its zarr.json was refused: the store holds chunks and the write's mark,
    no metadata. ``save_array(..., overwrite=False)`` (``to_zarr(..., mode="w-")``) then finds no array there
    and writes, leaving one shard at the fill value: the failed write's shard stays. It took the failed
    write's entry off the mark as a rewrite (``mode="w"``) does, though it deleted nothing: the old shard
    read as part of the new array, no error."""
    url = f"{gcs_bucket}/ow-{writer}.zarr"
    fault_proxy.add("status", code=403, method="POST", path=rf"name=ow-{writer}\.zarr%2F(v%2F)?zarr\.json",
                    times=None)
    new = np.full((64, 64), 2, "i4")
    new[:32, :32] = 0  # the first shard: all fill value, not written
    if writer == "save_array":
        with pytest.raises(cloudio.CloudioError):
            cloudio.save_array(np.ones((64, 64), "i4"), url, chunks=(16, 16), shards=(32, 32), compressors=None)
        fault_proxy.clear()
        cloudio.save_array(new, url, chunks=(16, 16), shards=(32, 32), compressors=None, overwrite=False)
    else:
        enc = {"v": {"chunks": (16, 16), "shards": (32, 32), "compressors": None, "fill_value": 0}}
        with pytest.raises(cloudio.CloudioError):
            cloudio.to_zarr(xr.Dataset({"v": (("y", "x"), np.ones((64, 64), "i4"))}), url, mode="w",
                            consolidated=False, encoding=enc)
        fault_proxy.clear()
        cloudio.to_zarr(xr.Dataset({"v": (("y", "x"), new)}), url, mode="w-", consolidated=False, encoding=enc)
    with pytest.raises(cloudio.IncompleteWriteError):
        cloudio.load_array(url) if writer == "save_array" else cloudio.open_zarr(url, consolidated=False).v.values


def test_no_shard_buffer_goes_back_to_the_pool_while_a_coder_thread_still_writes_it(
        gcs_emulator: Emulator, gcs_bucket: str, fault_proxy, monkeypatch: pytest.MonkeyPatch) -> None:
    """A rewrite whose shard became all fill value stores it explicitly (its object was listed): a coder thread
    encodes it into a pooled buffer. Another shard's upload is refused meanwhile, and the write stops. The
    buffer went back to the pool at once while the thread still wrote into it: the next borrower (a read
    decoding a shard, the retried write) could have its bytes overwritten after their CRC32C check."""
    import threading
    import time

    from cloudio._zarr import shard_codec
    from cloudio._zarr.buffers import shard_buffers

    url = f"{gcs_bucket}/band.zarr"
    a = np.arange(1 << 20, dtype="f4").reshape(1024, 1024) + 1
    cloudio.save_array(a, url, chunks=(64, 1024), shards=(512, 1024))
    b = a * 2
    b[512:] = 0  # the second shard: all fill value, its object listed
    started, finished, encoding_into = threading.Event(), threading.Event(), []
    encode = shard_codec._encode

    def slow_explicit(layout, array, shard, buf, scratch=None):
        if not layout.write_empty:
            return encode(layout, array, shard, buf, scratch)
        encoding_into.append(buf)
        started.set()
        time.sleep(1.0)  # (a large shard's encode, slowed so the refusal below meets it)
        try:
            return encode(layout, array, shard, buf, scratch)
        finally:
            finished.set()

    monkeypatch.setattr(shard_codec, "_encode", slow_explicit)
    fault_proxy.add("status", code=403, method="POST", path=r"name=band\.zarr%2Fc%2F0%2F0", release=started,
                    seconds=30, times=None)
    shard_buffers.clear()
    with pytest.raises(cloudio.CloudioError):
        cloudio.save_array(b, url, chunks=(64, 1024), shards=(512, 1024))
    assert started.is_set() and not finished.is_set()
    assert not [x for x in shard_buffers._free if np.shares_memory(x, encoding_into[0])]
    assert finished.wait(10)


def test_a_late_copy_of_a_failed_save_array_does_not_land_in_the_rewrite(
        gcs_emulator: Emulator, gcs_bucket: str, fault_proxy, monkeypatch: pytest.MonkeyPatch) -> None:
    """A first save_array's upload of a shard is held past the time limit and given up; its retries fail, and
    the write raises. The rewrite leaves that shard at the fill value: it listed no object there, so it
    stored none. The held request then reached the server: needing "no object", it landed, and its values
    read as part of the rewrite, with no error. A shard of the fill value is now stored while an upload this
    process gave up on may still land under the array (as zarr's path and to_zarr(mode="w") do)."""
    import threading
    import time

    from outcomes import bounded, returned

    monkeypatch.setenv("CLOUDIO_HTTP_TIMEOUT", "1")
    url = f"{gcs_bucket}/refill.zarr"
    shard = r"name=refill\.zarr%2Fc%2F0%2F0"
    release = threading.Event()
    held = fault_proxy.add("delay", method="POST", path=shard, release=release, seconds=60)
    fault_proxy.add("status", code=503, method="POST", path=shard, times=None)
    _, err, _ = bounded(lambda: cloudio.save_array(np.full((64, 64), 1, "i4"), url, chunks=(16, 16),
                                                   shards=(32, 32), compressors=None), 120)
    assert isinstance(err, cloudio.TransientError), repr(err)
    fault_proxy.clear()
    second = np.full((64, 64), 2, "i4")
    second[:32, :32] = 0  # the held shard: all fill value
    returned(lambda: cloudio.save_array(second, url, chunks=(16, 16), shards=(32, 32), compressors=None), 120)
    release.set()
    assert held.answered.wait(20)
    time.sleep(0.3)
    np.testing.assert_array_equal(cloudio.load_array(url), second)


def test_region_auto_with_coordinates_not_stored_is_a_cloudio_error(gcs_emulator: Emulator, gcs_bucket: str) -> None:
    """``to_zarr(region="auto")`` whose coordinate values are not in the store: xarray raises a KeyError after
    the mark went up; nothing was written, and the mark comes down. It escaped as that bare KeyError, naming
    neither the store nor a next step (a ValueError there was already named)."""
    url = f"{gcs_bucket}/auto.zarr"
    cloudio.to_zarr(xr.Dataset({"v": ("t", np.arange(4.0))}, coords={"t": [0, 1, 2, 3]}), url, mode="w",
                    consolidated=False)
    with pytest.raises(cloudio.ConfigurationError, match=r"auto\.zarr.*nothing was written") as info:
        cloudio.to_zarr(xr.Dataset({"v": ("t", [9.0])}, coords={"t": [7]}), url, region="auto", consolidated=False)
    assert isinstance(info.value.__cause__, KeyError)
    np.testing.assert_array_equal(cloudio.open_zarr(url, consolidated=False).v.values, np.arange(4.0))


def _fail_one_block(block: np.ndarray, block_info: dict | None = None) -> np.ndarray:
    """A Dask block function (module level: a child process imports it): the last block fails, later than
    the others are stored."""
    if block_info is not None and block_info[None]["chunk-location"] == (1, 1):
        time.sleep(2)
        raise RuntimeError("block (1, 1) failed")
    return block + 1.0


@pytest.mark.parametrize("scheduler", ["processes", "process-pool"])
def test_a_region_write_failing_on_other_processes_stays_marked(gcs_emulator: Emulator, gcs_bucket: str,
                                                               scheduler: str) -> None:
    """A region write computed by Dask's "processes" scheduler: three blocks are stored by child processes,
    the fourth fails. Their journal records stay in the children, so this process saw no change, and the
    failed write took its mark down: the store opened, mixing new and old shards. A write whose store went
    to other processes, whose records this process may not hear, keeps its mark."""
    from concurrent.futures import ProcessPoolExecutor

    import dask
    import dask.array as da

    url = f"{gcs_bucket}/procs-{scheduler}.zarr"
    enc = {"v": {"chunks": (32, 32), "shards": (32, 32)}}
    cloudio.to_zarr(xr.Dataset({"v": (("y", "x"), np.zeros((64, 64)))}), url, mode="w", zarr_format=3,
                    consolidated=False, encoding=enc)
    part = xr.Dataset({"v": (("y", "x"), da.zeros((64, 64), chunks=32).map_blocks(_fail_one_block, dtype="f8"))})
    with ProcessPoolExecutor(2) as pool:
        chosen = {"scheduler": "processes", "num_workers": 2} if scheduler == "processes" else {"scheduler": pool}
        with dask.config.set(**chosen), pytest.raises(Exception, match="block"):
            cloudio.to_zarr(part, url, region={"y": slice(0, 64), "x": slice(0, 64)}, consolidated=False)
    mixed = xr.open_zarr(cloudio.zarr_store(url), consolidated=False).v.values
    assert (mixed == 1).any() and (mixed == 0).any()  # some blocks were stored
    with pytest.raises(cloudio.IncompleteWriteError):
        cloudio.open_zarr(url, consolidated=False)


def _fail_every_block(block: np.ndarray) -> np.ndarray:
    raise RuntimeError("every block fails")


def test_a_region_write_failing_in_this_process_before_anything_was_stored_takes_its_mark_down(
        gcs_emulator: Emulator, gcs_bucket: str) -> None:
    """The same failed region write on Dask's default (threaded) scheduler, every block failing before any was
    stored: nothing changed, so the mark comes down and the store opens as it was. (Dask pickles the store
    in this process to name the task; that is no other process writing.)"""
    import dask.array as da

    url = f"{gcs_bucket}/threads.zarr"
    enc = {"v": {"chunks": (32, 32), "shards": (32, 32)}}
    cloudio.to_zarr(xr.Dataset({"v": (("y", "x"), np.zeros((64, 64)))}), url, mode="w", zarr_format=3,
                    consolidated=False, encoding=enc)
    part = xr.Dataset({"v": (("y", "x"), da.zeros((64, 64), chunks=32).map_blocks(_fail_every_block, dtype="f8"))})
    with pytest.raises(RuntimeError, match="every block fails"):
        cloudio.to_zarr(part, url, region={"y": slice(0, 64), "x": slice(0, 64)}, consolidated=False)
    np.testing.assert_array_equal(cloudio.open_zarr(url, consolidated=False).v.values, np.zeros((64, 64)))


def _raise_a_key_error(block: np.ndarray) -> np.ndarray:
    raise KeyError("the user's own lookup failed")


def test_a_key_error_of_the_users_own_graph_is_raised_as_it_is(gcs_emulator: Emulator, gcs_bucket: str) -> None:
    """A KeyError raised by the user's Dask function is theirs: it is raised as it is, not named as cloudio's
    refusal of the arguments."""
    import dask.array as da

    url = f"{gcs_bucket}/own-error.zarr"
    cloudio.to_zarr(xr.Dataset({"v": ("x", np.zeros(64))}), url, mode="w", consolidated=False)
    part = xr.Dataset({"v": ("x", da.zeros(64, chunks=32).map_blocks(_raise_a_key_error, dtype="f8"))})
    with pytest.raises(KeyError, match="own lookup") as info:
        cloudio.to_zarr(part, url, region={"x": slice(0, 64)}, consolidated=False)
    assert not isinstance(info.value, cloudio.CloudioError)
