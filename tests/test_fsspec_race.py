"""A listing in flight across an invalidation must not refill the cache with the old state.

The fault proxy's "late" fault lets the real emulator answer a listing, then
holds that answer until the test has deleted or overwritten an object through
cloudio: the answer the caller gets predates the change, and gcsfs would store
it after cloudio dropped the cached listings.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest

import cloudio
from cloudio._gcs.client import gcs_filesystem


def _ls_across(fault_proxy: Any, fs: Any, listed: str, change: Callable[[], None]) -> list[str]:
    """``fs.ls(listed)`` answered by the server before ``change()`` runs, delivered after it."""
    bucket = listed.split("/", 1)[0]
    release = threading.Event()
    rule = fault_proxy.add("late", method="GET", path=rf"/b/{bucket}/o\?", release=release, seconds=30)
    got: list[Any] = []
    t = threading.Thread(target=lambda: got.append(fs.ls(listed, detail=True)))
    t.start()
    try:
        assert rule.answered.wait(20), "the listing never reached the emulator"
        change()
    finally:
        release.set()
        t.join(30)
    assert not t.is_alive()
    return [e["name"] for e in got[0]]


@pytest.mark.parametrize("which", ["tracked", "plain"])
def test_listing_answered_before_a_delete_is_not_cached(fault_proxy, b, which):
    writer = cloudio.filesystem(f"gs://{b}")
    writer.pipe({f"{b}/d/a.bin": b"a", f"{b}/d/b.bin": b"b"})
    reader = writer if which == "tracked" else gcs_filesystem()

    old = _ls_across(fault_proxy, reader, f"{b}/d", lambda: writer.rm(f"{b}/d/a.bin"))

    assert old == [f"{b}/d/a.bin", f"{b}/d/b.bin"]  # the caller still gets its (old) answer
    assert reader.ls(f"{b}/d") == [f"{b}/d/b.bin"]
    assert not reader.exists(f"{b}/d/a.bin")


def test_listing_answered_before_an_overwrite_does_not_truncate_reads(fault_proxy, b):
    fs = cloudio.filesystem(f"gs://{b}")
    fs.pipe(f"{b}/d/a.bin", b"1" * 10)
    new = b"2" * 1000

    def overwrite() -> None:
        with cloudio.filesystem(f"gs://{b}").open(f"{b}/d/a.bin", "wb") as f:
            f.write(new)

    _ls_across(fault_proxy, fs, f"{b}/d", overwrite)

    assert fs.info(f"{b}/d/a.bin")["size"] == len(new)
    assert fs.cat(f"{b}/d/a.bin") == new
    with fs.open(f"{b}/d/a.bin", "rb") as f:
        assert f.read() == new


def test_a_fill_after_the_change_is_cached_as_usual(gcs_emulator, b):
    fs = cloudio.filesystem(f"gs://{b}")
    fs.pipe(f"{b}/d/a.bin", b"a")
    fs.rm(f"{b}/d/a.bin")
    fs.pipe(f"{b}/d/c.bin", b"c")
    assert fs.ls(f"{b}/d") == [f"{b}/d/c.bin"]
    before = len([r for r in gcs_emulator.requests() if b in r.path])
    assert fs.ls(f"{b}/d") == [f"{b}/d/c.bin"]  # served from the cache: the fast path is intact
    assert len([r for r in gcs_emulator.requests() if b in r.path]) == before
