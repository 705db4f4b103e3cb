"""8 threads interleave writes and reads on shared prefixes: no read is ever stale.

A read is stale when it returns a version older than the newest write that
had *completed* before the read began (or fails to find an object whose
creation had completed), or anything but one whole version. Each object has
one writer thread, so "newest" is well defined; every thread reads every
object.

Two hazards are counted apart, not as stale, because no cache layer over
GDAL can remove them (GDAL keys its cache by URL, not by generation):

* another write of the object is in progress during the read: GDAL, which
  reads lazily, may take the rest from the new bytes (a torn read);
* a dataset of the object opened *before* the write is still reading after
  the write completed: its downloads may put old bytes back into GDAL's shared
  cache after cloudio cleared it. cloudio clears again at the next open, which
  covers downloads finished by then; readers overlapping an old reader
  beyond that can still see old bytes. Close datasets before overwriting
  their objects to avoid it.

Every bad read is checked to have one of these causes; the rest must be zero.
"""

from __future__ import annotations

import itertools
import random
import threading
import time
import uuid

import pytest
import rasters
from outcomes import forked_exit_code
from rasterio.errors import RasterioIOError

import cloudio
from cloudio._threads import KeptPool
from cloudio.emulator import Emulator

THREADS = 8
WRITERS = 4
OPS = 14


def tif(version: int) -> bytes:
    return rasters.tif(version, 16 + (version % 4) * 16)  # sizes go up and down between versions


@pytest.mark.timeout(240)
def test_eight_threads_no_stale_reads(gcs_bucket: str) -> None:
    fs = cloudio.filesystem(gcs_bucket)
    prefixes = [f"{gcs_bucket}/p{i}" for i in range(2)]
    owned: dict[int, list[str]] = {w: [f"{prefixes[w % 2]}/w{w}-{j}.tif" for j in range(2)] for w in range(WRITERS)}
    lock = threading.Lock()
    clock = itertools.count()  # a logical clock, read under `lock`
    committed: dict[str, int] = {}  # object -> newest version whose write completed
    done: dict[str, list[int]] = {}  # object -> clock at each completed write
    starts: dict[str, list[int]] = {}  # object -> clock at each write's start
    reads: list[tuple[str, int, int, int, str | None]] = []  # key, start, end, writes done at start, problem
    errors: list[BaseException] = []
    for keys in owned.values():
        for key in keys:
            fs.pipe(key, tif(1))
            committed[key], done[key], starts[key] = 1, [next(clock)], [-1]
    barrier = threading.Barrier(THREADS)

    def read_one(rng: random.Random) -> None:
        with lock:
            key = rng.choice(sorted(committed))
            floor, n_done, t0 = committed[key], len(done[key]), next(clock)
        problem = None
        try:
            with cloudio.open(key) as ds:
                a = ds.read()
            v = int(a[0, 0, 0])
            size = 16 + (v % 4) * 16
            if not (v >= floor and a.shape == (1, size, size) and int(a.min()) == int(a.max()) == v):
                problem = f"read version {v} shape {a.shape} after version {floor} was written"
        except FileNotFoundError as e:
            problem = f"not found after its creation completed ({e})"
        except RasterioIOError as e:  # "Read failed": a torn header/tile mix
            problem = str(e)
        with lock:
            reads.append((key, t0, next(clock), n_done, problem))

    def write_one(key: str, v: int) -> None:
        with lock:
            starts.setdefault(key, []).append(next(clock))
        fs.pipe(key, tif(v))
        with lock:
            committed[key] = v
            done.setdefault(key, []).append(next(clock))

    def work(t: int) -> None:
        rng = random.Random(t)
        version = {k: 1 for k in owned.get(t, [])}
        new = 0
        try:
            barrier.wait()
            for _ in range(OPS):
                if t < WRITERS and rng.random() < 0.4:
                    if rng.random() < 0.3:  # a new name in a shared prefix
                        new += 1
                        write_one(f"{prefixes[new % 2]}/new-{t}-{new}.tif", 1)
                    else:
                        key = rng.choice(owned[t])
                        version[key] += 1
                        write_one(key, version[key])
                else:
                    read_one(rng)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(THREADS)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors

    def excused(key: str, t0: int, t1: int, n_done: int) -> bool:
        ends = done[key]
        # a write in progress during the read: not done when it began, started before it ended
        # (the server may switch to the new bytes any time before the writer returns)
        if len(starts[key]) > n_done and starts[key][n_done] < t1:
            return True
        # a reader that began before the write this read relies on, still active after it
        last_write = ends[n_done - 1]
        return any(k == key and s0 < last_write < s1 and nd < n_done for k, s0, s1, nd, _ in reads)

    bad = [r for r in reads if r[4] is not None]
    stale = [f"{k}: {p}" for k, t0, t1, n, p in bad if not excused(k, t0, t1, n)]
    assert stale == []
    assert len(reads) >= THREADS * OPS // 2
    assert len(bad) <= len(reads) // 4, bad
    # and a final pass sees every last version
    for key, v in sorted(committed.items()):
        with cloudio.open(key) as ds:
            assert int(ds.read()[0, 0, 0]) == v


# -- a write and cloudio's GDAL reads of the same object never overlap ---------------------------


def _read_in_thread(ds: object, out: list[object]) -> threading.Thread:
    def run() -> None:
        try:
            out.append(ds.read(1))  # type: ignore[attr-defined]
        except Exception as e:  # reported by the test's assertions
            out.append(e)

    t = threading.Thread(target=run)
    t.start()
    return t


def _until(cond: object, what: str, seconds: float = 30.0) -> None:
    """Wait for ``cond()`` (a request reaching the proxy), failing the test instead of hanging."""
    deadline = time.monotonic() + seconds
    while not cond():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(0.01)


def _order(emu: object, key: str, start: int) -> list[str]:
    """The emulator's log from entry ``start`` on: 'read' (a GET of ``key``'s bytes) and 'upload' (any)."""
    out = []
    for r in emu.requests()[start:]:  # type: ignore[attr-defined]
        if r.method == "GET" and r.path.endswith("/" + key) and "/o/" not in r.path:
            out.append("read")
        elif r.method == "POST" and "/upload/" in r.path:
            out.append("upload")
    return out


def _slow_read(ds: object, got: list[object], fault_proxy: object, seconds: float = 5,
               release: threading.Event | None = None) -> threading.Thread:
    """Start reading ``ds`` (g/a.tif) in a thread whose GET the proxy holds (``seconds``, or until ``release``
    is set); return once it is held."""
    slow = fault_proxy.add("delay", seconds=seconds, release=release, method="GET", path=r"/g/a\.tif$", times=1)  # type: ignore[attr-defined]
    reader = _read_in_thread(ds, got)
    _until(lambda: slow.hits, "the read's GET")
    return reader


@pytest.mark.timeout(120)
def test_a_write_waits_for_a_read_of_the_same_object_in_flight(gcs_emulator, gcs_bucket: str, fault_proxy) -> None:
    """The upload reaches the server only after the read it would have torn (GDAL crashes on that)."""
    url = f"{gcs_bucket}/g/a.tif"
    key = url[len("gs://"):]
    fs = cloudio.filesystem(url)
    start = len(gcs_emulator.requests())
    fs.pipe(url, rasters.tif(1, 512))  # the open reads the header; the pixels need more ranges
    with cloudio.open(url) as ds:
        opened = _order(gcs_emulator, key, start)  # the first upload, then the open's reads
        got: list[object] = []
        reader = _slow_read(ds, got, fault_proxy, seconds=1.5)
        fs.pipe(url, rasters.tif(2, 512))
        reader.join(60)
        assert not reader.is_alive()
        a = got[0]
        assert not isinstance(a, BaseException), a
        assert a.min() == a.max() == 1  # type: ignore[union-attr]  # the version it began reading, whole
        assert ds.read(1).min() == 2  # afterwards through a fresh open: the new version
    order = _order(gcs_emulator, key, start)
    second_upload = order.index("upload", 1)
    assert order[:second_upload] == [*opened, "read"], order  # the slow read reached the server before it


@pytest.mark.timeout(120)
def test_a_write_of_another_object_does_not_wait_for_a_read(gcs_emulator, gcs_bucket: str, fault_proxy) -> None:
    url, other = f"{gcs_bucket}/g/a.tif", f"{gcs_bucket}/g/b.tif"
    fs = cloudio.filesystem(url)
    fs.pipe(url, rasters.tif(1, 512))
    with cloudio.open(url) as ds:
        got: list[object] = []
        release = threading.Event()  # the read held until the write is done, however slow the machine
        reader = _slow_read(ds, got, fault_proxy, seconds=25, release=release)
        try:
            fs.pipe(other, rasters.tif(3, 16))  # would wait the 25 s if writes were serialised with all reads
            assert reader.is_alive(), "the read of a.tif finished before the write of b.tif did"
        finally:
            release.set()
        reader.join(60)
        assert got[0].min() == 1  # type: ignore[union-attr]


@pytest.mark.timeout(120)
def test_a_write_behind_a_stuck_read_goes_ahead_after_change_wait(
    gcs_bucket: str, fault_proxy, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from cloudio._gdal import gates

    monkeypatch.setattr(gates, "CHANGE_WAIT", 0.5)
    url = f"{gcs_bucket}/g/a.tif"
    fs = cloudio.filesystem(url)
    fs.pipe(url, rasters.tif(1, 512))
    with cloudio.open(url) as ds:
        got: list[object] = []
        release = threading.Event()  # the read stuck until the write is done, however slow the machine
        reader = _slow_read(ds, got, fault_proxy, seconds=25, release=release)
        try:
            with caplog.at_level("WARNING", logger="cloudio._gdal.gates"):
                fs.pipe(url, rasters.tif(2, 512))
            assert reader.is_alive(), "the write waited for the stuck read to end"
        finally:
            release.set()
        assert any("/vsigs/" in r.getMessage() and "a.tif" in r.getMessage() and "still running" in r.getMessage()
                   for r in caplog.records), caplog.text
        reader.join(60)
        assert not isinstance(got[0], BaseException), got[0]
        assert got[0].min() == got[0].max()  # type: ignore[union-attr]  # one whole version, never torn


def test_first_opens_of_a_bucket_in_eight_threads_set_its_options_once(
    gcs_emulator: Emulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression: every thread that found the bucket unconfigured cleared its GDAL options and set them again.

    A thread already reading the bucket then met it with no emulator endpoint and
    unsigned requests off, between the clear and the set: GDAL failed with "GS_SECRET_ACCESS_KEY...
    configuration options not defined" (seen once in a loaded run of the test above).
    """
    from cloudio._gdal import endpoint

    cleared: list[str] = []
    clear = endpoint.clear_path_options
    monkeypatch.setattr(endpoint, "clear_path_options", lambda p: (cleared.append(p), clear(p))[1])
    for _ in range(3):
        bucket = gcs_emulator.create_bucket(f"test-{uuid.uuid4().hex[:16]}")
        fs = cloudio.filesystem(bucket)
        urls = [f"{bucket}/t{i}.tif" for i in range(THREADS)]
        for i, u in enumerate(urls):
            fs.pipe(u, tif(i + 1))
        barrier = threading.Barrier(THREADS)
        sums: dict[str, object] = {}

        def read(u: str, barrier: threading.Barrier = barrier, sums: dict[str, object] = sums) -> None:
            barrier.wait()
            try:
                with cloudio.open(u) as ds:
                    sums[u] = int(ds.read(1).sum())
            except Exception as e:  # reported below
                sums[u] = e

        threads = [threading.Thread(target=read, args=(u,)) for u in urls]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        assert all(isinstance(v, int) for v in sums.values()), sums
        assert cleared.count(endpoint.bucket_prefix(bucket.removeprefix("gs://"))) == 1


# -- a kept pool in a forked child (Dask's and multiprocessing's fork) ----------------------------------------


@pytest.mark.timeout(60)
def test_a_kept_pool_runs_work_in_a_forked_child() -> None:
    """Regression: the child inherited the parent's executor, whose idle thread (counted, not there) it
    waited for: work it submitted never ran (a shard read, an upload, ``changing_async`` hung)."""
    pool = KeptPool(lambda: 2, "cloudio-test-fork")
    assert pool().submit(int, "1").result(timeout=30) == 1  # a thread made, now idle

    def in_child() -> None:
        assert pool().submit(int, "2").result(timeout=5) == 2  # ms when it runs: 5 s only on a failure

    assert forked_exit_code(in_child, 20.0) == 0
    assert pool().submit(int, "3").result(timeout=30) == 3  # the parent's pool is untouched


@pytest.mark.timeout(60)
def test_a_kept_pool_being_made_during_a_fork_works_in_the_child() -> None:
    """A fork while another thread is making the pool: the child's copy of the pool's lock, held by a thread
    the child does not have, must not keep the child from making its own."""
    entered, release = threading.Event(), threading.Event()
    calls = itertools.count()

    def workers() -> int:
        if next(calls) == 0:  # the parent's maker: still making the pool when the fork comes
            entered.set()
            release.wait(30)
        return 2

    pool = KeptPool(workers, "cloudio-test-fork")
    maker = threading.Thread(target=pool)
    maker.start()
    try:
        assert entered.wait(30)
        code = forked_exit_code(lambda: pool().submit(int, "2").result(timeout=5), 20.0)
    finally:
        release.set()
        maker.join(30)
    assert code == 0
    assert pool().submit(int, "3").result(timeout=30) == 3
