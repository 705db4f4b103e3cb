"""Zarr and xarray through cloudio with a writer and a reader in different processes.

Each writer is a real second process (multiprocessing, spawn) pointed at the emulator through
STORAGE_EMULATOR_HOST; a writer held slow or killed mid-write goes through tests/faultproxy.py.
The reader is this process (or another child). Everything asserted is what a reader gets back.
"""

from __future__ import annotations

import multiprocessing
import re
import threading
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


# ---------------------------------------------------------------------------------------------
# child processes
# ---------------------------------------------------------------------------------------------


def _child(endpoint: str | None, job: str, url: str, arg: Any = None) -> None:
    import os

    if endpoint is not None:
        os.environ["STORAGE_EMULATOR_HOST"] = endpoint
    warnings.filterwarnings("ignore", message="Consolidated metadata is currently not part")
    import xarray as xr

    import cloudio as c

    if job == "save":  # arg: (shape, dtype, value, chunks)
        shape, dtype, value, chunks = arg
        c.save_array(np.full(shape, value, dtype), url, chunks=chunks)
    elif job == "to_zarr_w":  # arg: (n, value, group)
        n, value, group = arg
        ds = xr.Dataset({"a": (("t",), np.full(n, value, "f8"))}, coords={"t": np.arange(n)})
        c.to_zarr(ds, url, mode="w", group=group, consolidated=False, encoding={"a": {"chunks": (100,)}})
    elif job == "to_zarr_w_b":  # a group rewrite: variable "b" into group arg
        ds = xr.Dataset({"b": (("s",), np.arange(10.0))})
        c.to_zarr(ds, url, mode="w", group=arg, consolidated=False)
    elif job == "append":  # arg: (start, n, value)
        start, n, value = arg
        ds = xr.Dataset({"a": (("t",), np.full(n, value, "f8"))}, coords={"t": np.arange(start, start + n)})
        c.to_zarr(ds, url, append_dim="t", consolidated=False)
    elif job == "add_var":  # arg: name
        ds = xr.Dataset({arg: (("s",), np.full(50, 3.0))})
        c.to_zarr(ds, url, mode="a")
    elif job == "region":  # arg: (start, stop, value)
        start, stop, value = arg
        ds = xr.Dataset({"a": (("t",), np.full(stop - start, value, "f8"))})
        c.to_zarr(ds, url, region={"t": slice(start, stop)}, mode="r+", consolidated=False)
    elif job == "rm":
        c.filesystem(url).rm(url, recursive=True)
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


def _marker_there(emu: Emulator, url: str, where: str = "") -> bool:
    bucket, key = url.removeprefix("gs://").split("/", 1)
    return emu.client.bucket(bucket).blob(f"{key}/{where}{MARKER}").exists()


def _levels() -> list[Any]:
    return ["session", "strong", 0]


# ---------------------------------------------------------------------------------------------
# bugs
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# checked, found correct
# ---------------------------------------------------------------------------------------------


def _reads(url: str, level: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with cloudio.session(level):
        for name, fn in (("eager", lambda: cloudio.load_array(url)),
                         ("lazy", lambda: cloudio.load_array(url, lazy=True).compute())):
            try:
                out[name] = fn()
            except cloudio.IncompleteWriteError as e:
                out[name] = e
    return out


def test_a_slow_rewrite_with_another_shape_and_dtype_is_refused_then_read_whole(gcs_emulator, gcs_bucket):
    url = f"{gcs_bucket}/slow.zarr"
    cloudio.save_array(np.ones((200, 300), "f4"), url, chunks=(100, 100))  # this process: a guess is kept
    assert (cloudio.load_array(url) == 1).all()
    with FaultProxy(gcs_emulator.url) as proxy:
        # the chunk's upload held until the reads below are done (not for a fixed time they may outlast under load)
        release = threading.Event()
        rule = proxy.add("delay", method="POST", path=r"slow\.zarr%2Fc%2F1%2F1", release=release, seconds=25,
                         times=None)
        p = _start("save", url, ((300, 100), "i2", 7, (50, 50)), proxy.url)
        try:
            _wait(lambda: rule.hits > 0)
            for level in _levels():
                for name, got in _reads(url, level).items():
                    assert isinstance(got, cloudio.IncompleteWriteError), (level, name, got)
        finally:
            release.set()
            p.join(60)
        assert p.exitcode == 0
    for level in _levels():
        for name, got in _reads(url, level).items():
            assert isinstance(got, np.ndarray), (level, name, got)
            assert got.dtype == np.dtype("i2") and got.shape == (300, 100) and (got == 7).all(), (level, name)


def test_a_writer_killed_mid_save_array_is_refused_until_another_process_rewrites(gcs_emulator, gcs_bucket):
    url = f"{gcs_bucket}/kill.zarr"
    cloudio.save_array(np.ones((200, 300), "f4"), url, chunks=(100, 100))
    with FaultProxy(gcs_emulator.url) as proxy:
        hang = proxy.add("hang", method="POST", path=r"kill\.zarr%2Fc%2F1%2F1", times=None)
        p = _start("save", url, ((200, 300), "f4", 5, (100, 100)), proxy.url)
        try:
            _wait(lambda: hang.hits > 0)
            time.sleep(0.5)
        finally:
            p.kill()
            p.join(30)
    for level in _levels():
        for name, got in _reads(url, level).items():
            assert isinstance(got, cloudio.IncompleteWriteError), (level, name, got)
    _run("save", url, ((20, 30), "i4", 9, (10, 10)))
    for level in _levels():
        for name, got in _reads(url, level).items():
            assert isinstance(got, np.ndarray) and got.shape == (20, 30) and (got == 9).all(), (level, name, got)
    assert not _marker_there(gcs_emulator, url)


def test_a_store_deleted_by_another_process_is_not_found(gcs_emulator, gcs_bucket):
    url = f"{gcs_bucket}/gone.zarr"
    cloudio.save_array(np.ones((200, 300), "f4"), url, chunks=(100, 100))
    assert (cloudio.load_array(url) == 1).all()
    _run("rm", url)
    for level in _levels():
        with cloudio.session(level), pytest.raises(cloudio.ObjectNotFoundError):
            cloudio.load_array(url)


def _open_all(url: str, level: Any, **kw: Any) -> Any:
    with cloudio.session(level):
        try:
            return cloudio.open_zarr(url, **{"consolidated": False, **kw}).load()
        except cloudio.IncompleteWriteError as e:
            return e


def _refused_while_held(emu: Emulator, url: str, chunk: str, job: str, args: tuple[Any, ...]) -> None:
    """A child process's ``job`` on ``url``/a whose upload of chunk ``chunk`` is held until every level's reads
    of the store, all refused as incomplete meanwhile, are done; then it completes."""
    with FaultProxy(emu.url) as proxy:
        release = threading.Event()
        store = re.escape(url.rsplit("/", 1)[1])
        rule = proxy.add("delay", method="POST", path=rf"{store}%2Fa%2Fc%2F{chunk}", release=release, seconds=25,
                         times=None)
        p = _start(job, url, args, proxy.url)
        try:
            _wait(lambda: rule.hits > 0)
            for level in _levels():
                assert isinstance(_open_all(url, level), cloudio.IncompleteWriteError), level
                with cloudio.session(level), pytest.raises(cloudio.IncompleteWriteError):
                    cloudio.load_array(f"{url}/a")
        finally:
            release.set()
            p.join(60)
        assert p.exitcode == 0


def test_a_slow_append_and_region_write_are_refused_then_read_whole(gcs_emulator, gcs_bucket):
    url = f"{gcs_bucket}/app.zarr"
    _run("to_zarr_w", url, (800, 1.0, None))
    for level in _levels():
        assert _open_all(url, level).a.shape == (800,)
    _refused_while_held(gcs_emulator, url, "9", "append", (800, 400, 2.0))
    for level in ["strong", 0, "session"]:
        ds = _open_all(url, level)
        np.testing.assert_array_equal(ds.a.values, np.r_[np.full(800, 1.0), np.full(400, 2.0)])
    _refused_while_held(gcs_emulator, url, "3", "region", (200, 500, 3.0))
    want = np.r_[np.full(200, 1.0), np.full(300, 3.0), np.full(300, 1.0), np.full(400, 2.0)]
    for level in _levels():
        np.testing.assert_array_equal(_open_all(url, level).a.values, want)
        with cloudio.session(level):
            np.testing.assert_array_equal(cloudio.load_array(f"{url}/a"), want)


def test_an_append_and_a_new_variable_at_once_lose_nothing(gcs_emulator, gcs_bucket):
    url = f"{gcs_bucket}/two.zarr"
    _run("to_zarr_w", url, (800, 1.0, None))
    ps = [CTX.Process(target=_child, args=(None, "append", url, (800, 200, 2.0))),
          CTX.Process(target=_child, args=(None, "add_var", url, "c"))]
    for p in ps:
        p.start()
    for p in ps:
        p.join(120)
        assert p.exitcode == 0
    assert not _marker_there(gcs_emulator, url)
    for level in _levels():
        ds = _open_all(url, level)
        np.testing.assert_array_equal(ds.a.values, np.r_[np.full(800, 1.0), np.full(200, 2.0)])
        np.testing.assert_array_equal(ds.c.values, np.full(50, 3.0))


# ---------------------------------------------------------------------------------------------
# write marks and Zarr groups: a write killed mid-way stays refused
# ---------------------------------------------------------------------------------------------


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
