"""What ``cloudio.to_zarr``'s write rehearsed in memory (``_rehearse``) says of failures that are not a refusal of
its input, or that are one with another next step than "fix the arguments": each against a store written before,
which must be left as it was (the rehearsal comes before zarr deletes anything)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

import cloudio
from cloudio.errors import CloudioError, ConfigurationError

pytestmark = [pytest.mark.filterwarnings("ignore:Consolidated metadata is currently not part:UserWarning"),
              pytest.mark.filterwarnings("ignore:Numcodecs codecs are not in the Zarr version 3:UserWarning")]


def _stored(url: str) -> xr.Dataset:
    """A dataset written at ``url`` first: what every refused write below must leave there."""
    ds = xr.Dataset({"a": ("x", np.arange(4.0))}, attrs={"title": "before"})
    cloudio.to_zarr(ds, url, mode="w")
    return ds


def _kept(url: str, before: xr.Dataset) -> None:
    with cloudio.open_zarr(url) as got:
        xr.testing.assert_identical(got.load(), before)


def test_out_of_memory_in_the_rehearsal_stays_a_memory_error_saying_nothing_was_written(gcs_bucket: str) -> None:
    """Chunks far larger than memory (``encoding={"a": {"chunks": (2**40,)}}``): zarr's write of the sample
    allocates a whole chunk. It was a ConfigurationError "refuses its input" (not catchable as MemoryError)."""
    url = f"{gcs_bucket}/oom.zarr"
    before = _stored(url)
    with pytest.raises(MemoryError) as info:
        cloudio.to_zarr(before, url, mode="w", encoding={"a": {"chunks": (2**40,)}})
    assert not isinstance(info.value, CloudioError)
    notes = " ".join(getattr(info.value, "__notes__", []))
    assert url in notes and "nothing was written" in notes and "chunks" in notes.lower(), notes
    assert "marked incomplete" not in notes, notes  # the store was not touched: no mark to take off
    _kept(url, before)


def test_attributes_nested_too_deeply_are_named_as_such(gcs_bucket: str) -> None:
    """A RecursionError encoding attributes as JSON is the input's, but "fix the encoding, the attributes,
    zarr_format..." did not say which: the message says a value is nested too deeply."""
    url = f"{gcs_bucket}/deep.zarr"
    before = _stored(url)
    deep: list[object] = []
    cur = deep
    for _ in range(5000):
        nxt: list[object] = []
        cur.append(nxt)
        cur = nxt
    with pytest.raises(ConfigurationError) as info:
        cloudio.to_zarr(before.assign_attrs(deep=deep), url, mode="w")
    assert isinstance(info.value.__cause__, RecursionError)
    assert url in str(info.value) and "nested too deeply" in str(info.value), info.value
    _kept(url, before)


@pytest.mark.skipif(importlib.util.find_spec("zfpy") is not None, reason="zfpy is installed")
def test_a_codec_whose_library_is_not_installed_says_to_install_it(gcs_bucket: str) -> None:
    """numcodecs' ZFPY needs the optional ``zfpy`` library: numcodecs says "codec not available", which the
    message took for arguments to fix; it says the codec is not installed here and what to do."""
    import numcodecs.zarr3

    url = f"{gcs_bucket}/codec.zarr"
    before = _stored(url)
    serializer = numcodecs.zarr3.ZFPY()
    with pytest.raises(ConfigurationError) as info:
        cloudio.to_zarr(before, url, mode="w", encoding={"a": {"serializer": serializer, "compressors": None}})
    message = str(info.value)
    assert url in message and "zfpy" in message and "not available in this environment" in message, message
    assert "install" in message, message
    _kept(url, before)


def test_an_interrupt_in_the_rehearsal_propagates_unchanged(gcs_bucket: str, monkeypatch: pytest.MonkeyPatch,
                                                            python_sigint: None) -> None:
    """Ctrl-C while the sample is written in memory (delivered to the main thread, waiting on zarr's loop, as a
    signal would be): a KeyboardInterrupt, never wrapped, nothing written. (``python_sigint``: Python's own SIGINT
    handler, which ``interrupt_main`` calls; an earlier test's, flytekit's, does not raise KeyboardInterrupt.)"""
    import _thread

    from zarr.storage import MemoryStore

    url = f"{gcs_bucket}/interrupt.zarr"
    before = _stored(url)
    set_in_memory = MemoryStore.set

    async def interrupted(self: MemoryStore, key: str, value: object) -> None:
        _thread.interrupt_main()
        await set_in_memory(self, key, value)  # type: ignore[arg-type]

    monkeypatch.setattr(MemoryStore, "set", interrupted)
    with pytest.raises(KeyboardInterrupt) as info:
        cloudio.to_zarr(before.assign_attrs(title="after"), url, mode="w")
    assert type(info.value) is KeyboardInterrupt and info.value.__cause__ is None
    monkeypatch.undo()
    _kept(url, before)


_WRITTEN_AT_EXIT = """
import atexit, os, sys
import numpy as np, xarray as xr
import cloudio

where = os.environ["WRITTEN_AT_EXIT"]
ds = xr.Dataset({"a": ("x", np.arange(4.0))})
cloudio.to_zarr(ds, where + "/before.zarr", mode="w", consolidated=False)  # zarr's loop started before exit

def at_exit():
    url = where + "/at-exit.zarr"
    try:
        cloudio.to_zarr(ds, url, mode="w", consolidated=False)
        print("written", flush=True)
    except BaseException as e:
        print("error", type(e).__name__, url in str(e), "nothing was written" in str(e), flush=True)

atexit.register(at_exit)  # after cloudio's import: runs before zarr's own clean-up
"""


@pytest.mark.timeout(120)
def test_a_write_at_interpreter_shutdown_is_not_called_a_refusal_of_its_input(tmp_path: Path) -> None:
    """``to_zarr`` from an ``atexit`` handler: zarr's codecs run their work in the event loop's default executor,
    which refuses new work at shutdown (RuntimeError: cannot schedule new futures after interpreter shutdown). The
    rehearsal in memory said so as a ConfigurationError "refuses its input ... Fix the arguments" (Python 3.11),
    then cloudio's LoopNotRunningError; the loop is now given an executor that takes the work then, and the
    write is stored."""
    import subprocess
    import sys

    env = {**os.environ, "WRITTEN_AT_EXIT": str(tmp_path), "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}
    run = subprocess.run([sys.executable, "-W", "ignore", "-c", _WRITTEN_AT_EXIT], env=env, capture_output=True,
                         text=True, timeout=100)
    lines = run.stdout.splitlines()
    assert lines == ["written"], (lines, run.stderr[-3000:])
    got = cloudio.open_zarr(str(tmp_path / "at-exit.zarr"), consolidated=False)
    assert got["a"].values.tolist() == [0.0, 1.0, 2.0, 3.0]
