"""Write marks and Zarr groups: a write killed mid-way in another process stays refused.

Each writer is a second process (multiprocessing, spawn) pointed at the emulator through
STORAGE_EMULATOR_HOST; the writer that is killed mid-write goes through tests/faultproxy.py, which holds
one chunk upload until the process is killed. The reader is this process.
"""

from __future__ import annotations

import multiprocessing
import time
import warnings
from typing import Any

import numpy as np
import pytest
from faultproxy import FaultProxy

import cloudio
from cloudio.emulator import Emulator

pytestmark = pytest.mark.filterwarnings("ignore:Consolidated metadata is currently not part:UserWarning")

MARKER = ".cloudio-write-in-progress"
CTX = multiprocessing.get_context("spawn")


def _child(endpoint: str | None, job: str, url: str, arg: Any = None) -> None:
    """One write in a process of its own (spawned: nothing of this process's state goes with it)."""
    import os

    if endpoint is not None:
        os.environ["STORAGE_EMULATOR_HOST"] = endpoint
    warnings.filterwarnings("ignore", message="Consolidated metadata is currently not part")
    import xarray as xr

    import cloudio as c

    if job == "to_zarr_w":  # arg: (n, value, group)
        n, value, group = arg
        ds = xr.Dataset({"a": (("t",), np.full(n, value, "f8"))}, coords={"t": np.arange(n)})
        c.to_zarr(ds, url, mode="w", group=group, consolidated=False, encoding={"a": {"chunks": (100,)}})
    elif job == "to_zarr_w_b":  # a group rewrite: variable "b" into group arg
        ds = xr.Dataset({"b": (("s",), np.arange(10.0))})
        c.to_zarr(ds, url, mode="w", group=arg, consolidated=False)
    else:
        raise ValueError(job)


def _run(job: str, url: str, arg: Any = None, endpoint: str | None = None, timeout: float = 120) -> None:
    p = CTX.Process(target=_child, args=(endpoint, job, url, arg))
    p.start()
    p.join(timeout)
    assert p.exitcode == 0, f"child {job} failed ({p.exitcode})"


def _start(job: str, url: str, arg: Any, endpoint: str) -> Any:
    p = CTX.Process(target=_child, args=(endpoint, job, url, arg))
    p.start()
    return p


def _wait(cond: Any, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def _kill_mid_write(emulator: Emulator, held: str, url: str, arg: Any) -> None:
    """``to_zarr_w`` of ``url`` in another process, killed while the upload matching ``held`` hangs."""
    with FaultProxy(emulator.url) as proxy:
        hang = proxy.add("hang", method="POST", path=held, times=None)
        p = _start("to_zarr_w", url, arg, proxy.url)
        try:
            _wait(lambda: hang.hits > 0)
            time.sleep(1.0)  # the other chunks land
        finally:
            p.kill()
            p.join(30)


def _marker_there(emu: Emulator, url: str, where: str = "") -> bool:
    bucket, key = url.removeprefix("gs://").split("/", 1)
    return emu.client.bucket(bucket).blob(f"{key}/{where}{MARKER}").exists()


def _half_written(a: np.ndarray) -> str:
    return f"{np.isnan(a).sum()} NaN values, values {sorted(set(a[~np.isnan(a)].tolist()))}"


def test_a_group_rewrite_does_not_unmark_a_root_write_killed_mid_way(gcs_emulator, gcs_bucket):
    """A to_zarr(mode="w") of the root dataset is killed with half its chunks up; another process then
    rewrites only group "g" (to_zarr(..., mode="w", group="g")). The root dataset is still half written:
    open_zarr(url) must refuse it, not return it with fill values where the lost chunks were."""
    url = f"{gcs_bucket}/killed.zarr"
    _run("to_zarr_w", url, (800, 1.0, None))
    _kill_mid_write(gcs_emulator, r"killed\.zarr%2Fa%2Fc%2F5", url, (800, 2.0, None))
    with pytest.raises(cloudio.IncompleteWriteError):
        cloudio.open_zarr(url, consolidated=False)
    _run("to_zarr_w_b", url, "g")  # rewrites group g only; the root's arrays are as the killed write left them
    np.testing.assert_array_equal(cloudio.open_zarr(url, group="g", consolidated=False).b.values, np.arange(10.0))
    try:
        a = cloudio.open_zarr(url, consolidated=False).a.values
    except cloudio.IncompleteWriteError:
        return
    pytest.fail(f"the half-written root dataset reads as complete: {_half_written(a)}")


def test_a_nested_store_killed_mid_write_is_refused_through_its_parent(gcs_emulator, gcs_bucket):
    """to_zarr(ds, url + "/a", group="b") is killed half way: its marker is at url/a. Reading the same
    group through the parent store, open_zarr(url, group="a/b"), must refuse it too (load_array of its
    array does)."""
    url = f"{gcs_bucket}/nest.zarr"
    _run("to_zarr_w", f"{url}/a", (800, 1.0, "b"))
    _kill_mid_write(gcs_emulator, r"nest\.zarr%2Fa%2Fb%2Fa%2Fc%2F5", f"{url}/a", (800, 2.0, "b"))
    assert _marker_there(gcs_emulator, url, "a/")
    with pytest.raises(cloudio.IncompleteWriteError):
        cloudio.load_array(f"{url}/a/b/a")
    with pytest.raises(cloudio.IncompleteWriteError):
        cloudio.open_zarr(f"{url}/a", group="b", consolidated=False)
    try:
        a = cloudio.open_zarr(url, group="a/b", consolidated=False).a.values
    except cloudio.IncompleteWriteError:
        return
    pytest.fail(f"read through the parent: {_half_written(a)}")
