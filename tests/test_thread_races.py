"""Races when one process uses cloudio from many threads at once (each found by a review, each fixed).

Each test forces one interleaving (events, barriers; a private function wrapped only to widen a
window that exists) against the real emulator, and asserts what a user would observe.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import numpy as np
import pytest
import rasterio
import rasterio.enums
from affine import Affine
from rasters import PROFILE, put, tif, write_half_masked

import cloudio
from cloudio._session import current_consistency
from cloudio.emulator import Emulator

WAIT = 10.0


def _overview_pair(tmp_path: Any) -> tuple[bytes, bytes]:
    """A 256-square GeoTIFF and its external .ovr (one overview, factor 2)."""
    p = tmp_path / "x.tif"
    p.write_bytes(tif(5, 256))
    with rasterio.Env(TIFF_USE_OVR=True):
        with rasterio.open(p, "r+") as ds:
            ds.build_overviews([2], rasterio.enums.Resampling.nearest)
    return p.read_bytes(), (tmp_path / "x.tif.ovr").read_bytes()


def _hold_listing(monkeypatch: pytest.MonkeyPatch) -> tuple[threading.Event, threading.Event]:
    """Widen the window between cloudio's directory listing coming back and its being stored."""
    from cloudio._gdal import open as gopen

    real = gopen._list_names
    listed, go = threading.Event(), threading.Event()

    def held(path: Any) -> Any:
        names = real(path)
        if not listed.is_set():
            listed.set()
            go.wait(WAIT)
        return names

    monkeypatch.setattr(gopen, "_list_names", held)
    return listed, go


@pytest.mark.parametrize("how", ["cloudio_write", "invalidate"])
def test_gdal_listing_in_flight_across_a_sidecar_write_is_not_stored(
        gcs_emulator: Emulator, gcs_bucket: str, tmp_path: Any, monkeypatch: pytest.MonkeyPatch, how: str) -> None:
    """Thread A opens ``d/x.tif``, the first open in ``d/``: cloudio lists ``d/`` (one request) and then
    stores the names (GdalConsumer.set_listing). Between the answer and the store, thread B writes
    ``d/x.tif.ovr`` through cloudio (or another writer puts it and B calls ``cloudio.invalidate``).
    The journal change reaches GdalConsumer._apply_object / _apply_prefix while the directory has no
    entry yet, so it changes nothing; A then stores the listing taken before the write, plans EMPTY_DIR
    for x.tif, and every later open (after B returned) keeps missing the overview: read-your-writes lost.
    """
    tif_bytes, ovr_bytes = _overview_pair(tmp_path)
    x = f"{gcs_bucket}/d/x.tif"
    put(gcs_emulator, x, tif_bytes)
    listed, go = _hold_listing(monkeypatch)
    errors: list[BaseException] = []

    def reader() -> None:
        try:
            with cloudio.open(x) as ds:
                ds.read(1)
        except BaseException as e:
            errors.append(e)

    a = threading.Thread(target=reader)
    a.start()
    assert listed.wait(WAIT)
    if how == "cloudio_write":
        cloudio.filesystem(gcs_bucket).pipe(x + ".ovr", ovr_bytes)
    else:
        put(gcs_emulator, x + ".ovr", ovr_bytes)
        cloudio.invalidate(f"{gcs_bucket}/d/")
    go.set()
    a.join(WAIT)
    assert not errors, errors
    # the sidecar's write (or its announcement) returned before this open began
    with cloudio.open(x) as ds:
        assert ds.overviews(1) == [2], "the open after the write does not see the .ovr written before it"


def test_reader_during_an_overwrite_never_pairs_new_pixels_with_the_old_mask(
        gcs_emulator: Emulator, gcs_bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A ``"w"`` overwrite uploads the new ``a.tif`` (under a.tif's gate), and only then deletes the old
    version's ``a.tif.msk`` (_gdal/write.py, _upload_outputs -> _drop_old_sidecars, under the .msk's own
    gate). A thread opening ``a.tif`` in between is held by no gate: it reads the new pixels (value 2) with
    the old version's mask (half masked), a dataset of two versions the docs say is never returned.
    """
    from cloudio._gdal import write

    profile = {**PROFILE, "transform": Affine(*PROFILE["transform"])}
    url = f"{gcs_bucket}/d/a.tif"
    write_half_masked(url, 1)
    with cloudio.open(url) as r:  # a reader of the old version: plans, listings, GDAL's caches warm
        assert int(r.read(1)[0, 0]) == 1 and not r.dataset_mask()[32:].any()

    real = write._drop_old_sidecars
    uploaded, go = threading.Event(), threading.Event()

    def held(path: Any, done: set[str]) -> None:
        uploaded.set()
        go.wait(WAIT)
        real(path, done)

    monkeypatch.setattr(write, "_drop_old_sidecars", held)
    seen: list[tuple[int, bool]] = []

    def reader() -> None:
        assert uploaded.wait(WAIT)
        try:
            with cloudio.open(url) as r:
                seen.append((int(r.read(1)[40, 0]), bool(r.dataset_mask()[40:].all())))
        finally:
            go.set()

    t = threading.Thread(target=reader)
    t.start()
    with cloudio.open(url, "w", **profile) as ds:  # no mask: every pixel valid
        ds.write(np.full((1, 64, 64), 2, "uint8"))
    t.join(WAIT)
    value, all_valid = seen[0]
    # the old version (1, half masked) or the new one (2, all valid): never 2 with the old mask
    assert (value, all_valid) in ((1, False), (2, True)), f"read value {value} with all_valid={all_valid}"


def test_one_session_object_entered_in_two_threads_restores_each_threads_own_level(
        gcs_emulator: Emulator, gcs_bucket: str) -> None:
    """``session`` keeps the tokens of its entries in one list shared by every thread (_session.py,
    ``self._tokens``), and ``__exit__`` pops the last one, whichever thread pushed it. Thread A, inside
    its own ``session("strong")``, enters a shared ``session()`` object; thread B enters the same object;
    A leaves it first and pops B's token: ``ContextVar.reset`` refuses a token of another context, and
    the fallback sets A's session to None. A's strong block is lost: its next open takes the level of
    the newest session open in the process ("session") and reads the stale cached raster.
    """
    x = f"{gcs_bucket}/s/x.tif"
    put(gcs_emulator, x, tif(1))
    with cloudio.open(x) as ds:  # GDAL now caches version 1
        assert int(ds.read(1)[0, 0]) == 1
    put(gcs_emulator, x, tif(2))  # another writer: only the strong level sees it

    shared = cloudio.session()
    a_in, b_in = threading.Event(), threading.Event()
    seen: list[int] = []
    errors: list[BaseException] = []

    def thread_a() -> None:
        try:
            with cloudio.session("strong"):
                with shared:
                    a_in.set()
                    assert b_in.wait(WAIT)
                with cloudio.open(x) as ds:  # back in A's strong block
                    seen.append(int(ds.read(1)[0, 0]))
        except BaseException as e:
            errors.append(e)

    def thread_b() -> None:
        assert a_in.wait(WAIT)
        with shared:
            b_in.set()
            ta.join(WAIT)

    ta = threading.Thread(target=thread_a)
    tb = threading.Thread(target=thread_b)
    ta.start()
    tb.start()
    tb.join(WAIT)
    assert not errors, errors
    assert seen == [2], "an open inside a strong block read the stale cached version"


def test_a_users_gcsfs_is_guarded_once_when_two_writers_journal_at_once(
        gcs_emulator: Emulator, gcs_bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The fsspec consumer guards each live gcsfs instance on the first change it hands it
    (_fsspec/consumer.py, guard_listings): ``_cloudio_guarded`` is checked, the listing coroutines are
    wrapped, and only then is the flag set, with no lock. Two writer threads journaling at once (each
    in FsspecConsumer.on_change) both find a user's instance unguarded and both wrap it: every listing
    page is then counted twice (``_counted`` around ``_counted``), so at the strong level
    ``session.stats.revalidations`` reports two requests for the one the server saw.
    """
    import gcsfs
    from rasters import gcsfs_options

    from cloudio._fsspec import consumer as fc

    fs = gcsfs.GCSFileSystem(**gcsfs_options(gcs_emulator), skip_instance_cache=False)
    bucket = gcs_bucket[len("gs://"):]
    put(gcs_emulator, f"{gcs_bucket}/d/a.bin", b"x")
    assert not fs.__dict__.get("_cloudio_guarded")

    real = fc._guarded
    both = threading.Barrier(2, timeout=2.0)
    local = threading.local()

    def widened(method: Any) -> Any:
        if not getattr(local, "waited", False):  # the first wrap of each thread: between the check and the flag
            local.waited = True
            try:
                both.wait()
            except threading.BrokenBarrierError:
                pass
        return real(method)

    monkeypatch.setattr(fc, "_guarded", widened)
    writers = [threading.Thread(target=cloudio.invalidate, args=(f"{gcs_bucket}/other{i}/",)) for i in range(2)]
    for w in writers:
        w.start()
    for w in writers:
        w.join(WAIT)
    monkeypatch.setattr(fc, "_guarded", real)

    try:
        before = gcs_emulator.count(("GET",))
        with cloudio.session("strong") as s:
            assert fs.ls(f"{bucket}/d", detail=False) == [f"{bucket}/d/a.bin"]
        sent = gcs_emulator.count(("GET",)) - before
    finally:  # fsspec would hand this (doubly wrapped) instance to later tests with the same options
        type(fs)._cache.pop(fs._fs_token, None)
    assert sent == 1
    assert s.stats.revalidations == sent, f"{s.stats.revalidations} revalidations counted for {sent} request"


def test_opens_keep_the_emulator_while_a_thread_in_a_rasterio_env_opens_the_bucket(
        gcs_emulator: Emulator, gcs_bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The fixed ensure_endpoint race has a sibling on its "one must go" branch (_gdal/endpoint.py,
    ``if first or not _keys[bucket] <= wanted.keys(): clear_path_options(prefix)``). The state it
    compares includes the HTTP options set in the calling thread's ``rasterio.Env``, so a thread that
    opens inside ``rasterio.Env(GDAL_HTTP_TIMEOUT=...)`` re-applies the bucket's options (the timeout
    must go) by clearing them all first, then setting the rest again. Another thread opening an object
    of the bucket in between finds ``_endpoints[bucket]`` still equal to its own state (it is updated
    last), skips the lock, and GDAL meets the bucket with no emulator endpoint: the open fails.
    """
    from cloudio._gdal import endpoint

    a, b = f"{gcs_bucket}/e/a.tif", f"{gcs_bucket}/e/b.tif"
    put(gcs_emulator, a, tif(1))
    put(gcs_emulator, b, tif(2))
    with cloudio.open(a) as ds:  # the bucket's options are set (no rasterio.Env)
        assert int(ds.read(1)[0, 0]) == 1
    real = endpoint.set_path_option
    cleared, go = threading.Event(), threading.Event()
    prefix = endpoint.bucket_prefix(gcs_bucket[len("gs://"):])

    def widened(p: str, key: str, value: str | None) -> None:
        real(p, key, value)
        if p == prefix and value is None and threading.current_thread() is opener:  # the timeout went
            cleared.set()
            go.wait(WAIT)

    monkeypatch.setattr(endpoint, "set_path_option", widened)

    def open_in_env() -> None:
        with rasterio.Env(GDAL_HTTP_TIMEOUT="20"):
            with cloudio.open(a) as other:
                other.read(1)

    opener = threading.Thread(target=open_in_env)
    opener.start()
    try:
        assert cleared.wait(WAIT), "the thread in a rasterio.Env did not re-apply the bucket's options"
        with cloudio.open(b) as ds:  # this thread has no rasterio.Env: its options are in force
            value = int(ds.read(1)[0, 0])
    finally:
        go.set()
        opener.join(WAIT)
    assert value == 2


def test_one_session_in_two_asyncio_tasks_each_task_gets_its_outer_level_back():
    """Two tasks of one thread enter one ``session(5)`` inside their own outer sessions; each, on
    leaving it, must be back at its own outer level.

    Tokens are now kept per thread, but tasks of one thread share it: task A's exit pops task B's
    token, whose reset fails in A's context (ValueError), and A is set to no session at all, losing
    its outer ``"strong"``.
    """
    inner = cloudio.session(5.0)
    seen: dict[str, object] = {}

    async def task(name: str, level: str, entered: asyncio.Event, go: asyncio.Event) -> None:
        with cloudio.session(level):
            with inner:
                entered.set()
                await go.wait()
            seen[name] = current_consistency()

    async def main() -> None:
        a_in, b_in = asyncio.Event(), asyncio.Event()
        a_go, b_go = asyncio.Event(), asyncio.Event()
        ta = asyncio.create_task(task("a", "strong", a_in, a_go))
        await a_in.wait()
        tb = asyncio.create_task(task("b", "session", b_in, b_go))
        await b_in.wait()
        a_go.set()  # A leaves first, while B is still inside
        await ta
        b_go.set()
        await tb

    asyncio.run(main())
    assert seen == {"a": "strong", "b": "session"}
