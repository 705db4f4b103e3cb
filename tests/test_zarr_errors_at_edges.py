"""The Zarr face's errors at its edges: a synchronous call made on the event loop its requests run on (zarr's,
or fsspec's), or from a coroutine on another loop; an array too large for this process's memory."""

from __future__ import annotations

import asyncio
import functools
import gc
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import xarray as xr
import zarr
from outcomes import bounded, ctrl_c_once_hit, returned

import cloudio
from cloudio.errors import CloudioError, ConfigurationError, ReadError

pytestmark = pytest.mark.filterwarnings("ignore:Consolidated metadata is currently not part:UserWarning")


def _dataset() -> xr.Dataset:
    return xr.Dataset({"v": ("x", np.arange(6.0))}, coords={"x": np.arange(6)})


def _calls(bucket: str) -> dict[str, tuple[str, Callable[[], Any]]]:
    """Each entry point of the Zarr face, by name: the URL it works on, and the call (whose store exists)."""
    return {
        "save_array": (f"{bucket}/new.zarr", lambda: cloudio.save_array(np.arange(6.0), f"{bucket}/new.zarr")),
        "load_array": (f"{bucket}/a.zarr", lambda: cloudio.load_array(f"{bucket}/a.zarr")),
        "to_zarr": (f"{bucket}/new_ds.zarr", lambda: cloudio.to_zarr(_dataset(), f"{bucket}/new_ds.zarr", mode="w")),
        "open_zarr": (f"{bucket}/ds.zarr", lambda: cloudio.open_zarr(f"{bucket}/ds.zarr")),
    }


def _on(loop: asyncio.AbstractEventLoop, call: Callable[[], Any]) -> Any:
    """``call()`` made from a coroutine running on ``loop`` (another thread's), its value or its error."""

    async def inside() -> Any:
        return call()

    return asyncio.run_coroutine_threadsafe(inside(), loop).result(120)


def _stored(bucket: str) -> None:
    cloudio.save_array(np.arange(6.0), f"{bucket}/a.zarr")
    cloudio.to_zarr(_dataset(), f"{bucket}/ds.zarr", mode="w")


def _is_the_loops_refusal(e: BaseException | None) -> bool:
    """zarr's SyncError, or the same refusal of cloudio's own wait on zarr's loop (``run_to_the_end``)."""
    from zarr.core.sync import SyncError

    return isinstance(e, SyncError) or (isinstance(e, NotImplementedError)
                                        and "Calling sync() from within a running loop" in str(e))


@pytest.mark.parametrize("name", ["save_array", "load_array", "to_zarr", "open_zarr"])
def test_a_call_on_zarrs_own_loop_says_so_and_where_to_call_it_from(gcs_bucket: str, user_fs: Any,
                                                                   name: str) -> None:
    """Called from a coroutine on zarr's event loop, each entry point would wait for itself: zarr refuses, and
    the error says that (not that the arguments were refused), names the URL and says to call it from another
    thread; zarr's refusal is its cause. Nothing was written."""
    from zarr.core.sync import _get_loop

    _stored(gcs_bucket)
    url, call = _calls(gcs_bucket)[name]
    _, err, _ = bounded(lambda: _on(_get_loop(), call))
    assert isinstance(err, ConfigurationError) and isinstance(err, CloudioError), repr(err)
    msg = str(err)
    assert url in msg and "to_thread" in msg and "another thread" in msg, msg
    assert "refuse" not in msg.split("(")[0] and "arguments" not in msg and "input" not in msg, msg
    assert _is_the_loops_refusal(err.__cause__), repr(err.__cause__)
    gc.collect()  # a coroutine made and never awaited would warn now, in this test
    if name in ("save_array", "to_zarr"):
        assert user_fs.find(url.removeprefix("gs://")) == [], "something was written"


def test_a_failed_read_on_fsspecs_loop_says_where_to_call_it_from(gcs_bucket: str) -> None:
    """A read of nothing, from a coroutine on fsspec's loop (gcsfs's): naming what is missing asks the server
    with a synchronous gcsfs call, which that loop refuses; said as the call made on the loop, naming the URL."""
    import fsspec.asyn

    for call in (lambda: cloudio.load_array(f"{gcs_bucket}/none.zarr"),
                 lambda: cloudio.open_zarr(f"{gcs_bucket}/none.zarr")):
        _, err, _ = bounded(functools.partial(_on, fsspec.asyn.get_loop(), call))
        assert isinstance(err, ConfigurationError), repr(err)
        assert f"{gcs_bucket}/none.zarr" in str(err) and "to_thread" in str(err), str(err)
        assert _is_the_loops_refusal(err.__cause__), repr(err.__cause__)
    gc.collect()  # a coroutine made and never awaited (gcsfs's call, refused) would warn now, in this test


def test_calls_from_a_coroutine_on_the_users_own_loop_work(gcs_bucket: str) -> None:
    """The user's own ``asyncio.run(main())`` calling the Zarr face directly: it blocks that loop (as zarr's own
    synchronous API does), and works."""
    data = np.arange(24, dtype="f4").reshape(4, 6)

    async def main() -> tuple[np.ndarray, xr.Dataset]:
        cloudio.save_array(data, f"{gcs_bucket}/mine.zarr", chunks=(2, 3))
        cloudio.to_zarr(_dataset(), f"{gcs_bucket}/mine_ds.zarr", mode="w")
        return cloudio.load_array(f"{gcs_bucket}/mine.zarr"), cloudio.open_zarr(f"{gcs_bucket}/mine_ds.zarr").load()

    back, ds = returned(lambda: asyncio.run(main()))
    np.testing.assert_array_equal(back, data)
    np.testing.assert_array_equal(zarr.open_array(cloudio.zarr_store(f"{gcs_bucket}/mine.zarr"), mode="r")[...], data)
    xr.testing.assert_identical(ds, _dataset())


@pytest.mark.parametrize("length", [2**46, 2**62])
def test_an_array_larger_than_memory_is_not_said_to_be_refused_by_the_server(gcs_bucket: str, length: int) -> None:
    """load_array of an array no process could hold (512 TiB; 32 EiB, more than a mapping's size can say:
    metadata only, every chunk the fill value): a MemoryError, catchable as such, naming the URL and the lazy
    read; not a ReadError blaming the server and the credentials, nor an OverflowError of the mapping."""
    url = f"{gcs_bucket}/huge.zarr"
    zarr.create_array(cloudio.zarr_store(url), shape=(length,), dtype="float64", chunks=(2**20,))
    _, err, _ = bounded(lambda: cloudio.load_array(url))
    assert isinstance(err, MemoryError) and not isinstance(err, ReadError), repr(err)
    said = "\n".join([str(err), *getattr(err, "__notes__", [])])
    assert url in said and "lazy=True" in said and "refused" not in said and "credentials" not in said, said


def test_a_local_stores_own_os_failure_is_not_said_to_be_refused_by_the_server(tmp_path) -> None:
    """load_array of a local store one of whose chunks the OS cannot open (a symbolic link to itself): the OS's
    own error (an OSError with its errno, naming the file), not a ReadError saying the server refused the read
    and to check the credentials."""
    import errno
    import os

    url = str(tmp_path / "a.zarr")
    cloudio.save_array(np.arange(6.0), url, chunks=(3,))
    chunk = os.path.join(url, "c", "0")
    os.remove(chunk)
    os.symlink(chunk, chunk)
    _, err, _ = bounded(lambda: cloudio.load_array(url))
    assert isinstance(err, OSError) and err.errno == errno.ELOOP, repr(err)
    assert "server" not in str(err) and "credentials" not in str(err), str(err)


@pytest.mark.usefixtures("python_sigint")
def test_an_interrupt_of_load_array_is_raised_as_it_is(gcs_bucket: str, fault_proxy: Any) -> None:
    """Ctrl-C while load_array waits for a chunk (its answer held at the proxy): KeyboardInterrupt itself,
    neither named as a cloudio error nor given a cause."""
    import threading

    url = f"{gcs_bucket}/intr.zarr"
    cloudio.save_array(np.arange(64.0), url, chunks=(16,))
    release = threading.Event()
    held = fault_proxy.add("delay", method="GET", path=r"intr\.zarr%2Fc", release=release, seconds=30, times=None)

    try:
        with ctrl_c_once_hit(held), pytest.raises(KeyboardInterrupt) as info:
            cloudio.load_array(url)
    finally:
        release.set()
    assert type(info.value) is KeyboardInterrupt and info.value.__cause__ is None, repr(info.value)
    assert held.hits, "no chunk's GET was held: the interrupt came elsewhere"


def test_save_array_with_a_dtype_says_to_convert_the_array_first(gcs_bucket: str, user_fs: Any) -> None:
    """save_array(array, url, dtype=...) (an object array of strings asked to be float32): save_array stores the
    array's own dtype, so the error says to convert the array first (array.astype), naming the URL; not zarr's
    "got multiple values for keyword argument" with a hint about chunks and shards. Nothing was written."""
    url = f"{gcs_bucket}/typed.zarr"
    _, err, _ = bounded(lambda: cloudio.save_array(np.array(["1.5", "x"], dtype=object), url, dtype="float32"))
    assert isinstance(err, ConfigurationError), repr(err)
    msg = str(err)
    assert url in msg and "astype" in msg and "multiple values" not in msg and "shards" not in msg, msg
    assert user_fs.find(url.removeprefix("gs://")) == []
