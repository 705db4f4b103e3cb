"""Locks of cloudio's caches held across a fork (:func:`cloudio._threads.hold_across_fork`): a process forked while
another thread holds one of them (a ``multiprocessing`` pool or a Dask worker started while writes and reads run)
must be able to use it. Each lock was copied held by a thread the child does not have, and the child's next use
of it (a write recording its generation, an open through the GDAL face, an invalidation) hung for good: each test
failed before its fix.

Each test holds the lock in another thread, as that thread's work does (a fork landing mid-way in it; the work
under these locks is in-memory, so a thread busy with it is rarely caught: holding it makes the fork land there
every time), and forks meanwhile; the child does its ordinary next operation with a bounded wait.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from outcomes import forked_exit_code

from cloudio._journal import journal
from cloudio._paths import parse_gcs

fork_only = pytest.mark.skipif(not hasattr(os, "fork"), reason="nothing forks here")

#: how long the other thread holds the lock: the fork lands inside, the fixed fork waits it out
_HOLD = 0.3


def _forked_while_held(lock: Any, work: Callable[[], object]) -> int:
    """The exit code of a child running ``work``, forked while another thread holds ``lock`` (for :data:`_HOLD`)."""
    return _forked_while_gated(lock.acquire, lock.release, work)


def _forked_while_gated(enter: Callable[[], None], leave: Callable[[], None], work: Callable[[], object]) -> int:
    """The exit code of a child running ``work``, forked while another thread is inside ``enter()`` .. ``leave()``
    (for :data:`_HOLD`)."""
    inside = threading.Event()

    def hold() -> None:
        enter()
        inside.set()
        time.sleep(_HOLD)
        leave()

    t = threading.Thread(target=hold, daemon=True)
    t.start()
    assert inside.wait(5)
    try:
        return forked_exit_code(work)
    finally:
        t.join(10)


# -- cloudio._gcs.transfer: the generations the journal last reported, the upload bodies given up ----------------


@fork_only
@pytest.mark.timeout(60)
def test_a_process_forked_while_a_write_records_its_generation_can_write() -> None:
    """Another thread's write is recording the generation it stored (the last generations' table, under its lock)
    as this one forks. The child's write records its own and the next plain write takes it as the one it
    replaces; the lock was copied held, and the child's first write hung for good."""
    from cloudio._gcs import transfer

    url = "gs://fork-review/generation.bin"

    def in_child() -> None:
        journal().record(url, "write", generation=7)  # what a write does once its object landed

        async def send(generation: int) -> int:
            return generation

        assert asyncio.run(transfer.last_writer_wins(None, parse_gcs(url), 3, send)) == 7  # type: ignore[arg-type]

    assert _forked_while_held(transfer._last_generations._lock, in_child) == 0, "the child hung (2) or failed (1)"


@fork_only
@pytest.mark.timeout(60)
def test_a_process_forked_while_an_upload_is_given_up_can_write_a_store() -> None:
    """Another thread notes an upload request given up (its body may land late) as this one forks. The child's
    Zarr write asks whether such a request may land under the store (:func:`given_up_under`); the lock was copied
    held, and that question hung for good."""
    from cloudio._gcs import transfer

    def in_child() -> None:
        assert not transfer.given_up_under("gs://fork-review/store/")
        transfer._given_up.add("gs://fork-review/store/c/0", 3, "AAAAAA==")
        assert transfer.given_up_under("gs://fork-review/store/")

    assert _forked_while_held(transfer._given_up._lock, in_child) == 0, "the child hung (2) or failed (1)"


# -- cloudio._zarr.consumer: the announcements of other writers' changes --------------------------------------------


@fork_only
@pytest.mark.timeout(60)
def test_a_process_forked_while_an_invalidation_is_kept_for_zarr_can_invalidate() -> None:
    """Another thread's ``cloudio.invalidate`` is being kept for the Zarr face (under its lock) as this one forks.
    The child's own invalidation must reach the Zarr face, whose next open of the store then lists it; the lock
    was copied held, and the child's invalidation hung for good."""
    import cloudio
    from cloudio._zarr import consumer

    def in_child() -> None:
        cloudio.invalidate("gs://fork-review/store")
        assert consumer.pending("gs://fork-review/store")

    assert _forked_while_held(consumer._lock, in_child) == 0, "the child hung (2) or failed (1)"


# -- cloudio._zarr.last_seen: the zarr.json of each array this process last wrote -------------------------------------


@fork_only
@pytest.mark.timeout(60)
def test_a_process_forked_while_a_written_array_is_remembered_can_load_one() -> None:
    """Another thread's write of an array keeps its ``zarr.json`` for load_array's guess (under the lock) as this one
    forks. The child's load asks for its guess and its write keeps its own; the lock was copied held, and the
    child's first load_array (or end of a write) hung for good."""
    from cloudio._zarr import last_seen

    url = "gs://fork-review/array/zarr.json"
    doc = b'{"node_type": "array"}'

    def in_child() -> None:
        assert last_seen.guess(url) is None  # what load_array asks first
        last_seen.remember(url, doc, 5)  # what a write's commit does once its marker is down
        assert last_seen.guess(url) == (doc, 5)

    assert _forked_while_held(last_seen._lock, in_child) == 0, "the child hung (2) or failed (1)"


# -- cloudio._zarr.changes: the store changes of each write, stopped on its failure -----------------------------------


@fork_only
@pytest.mark.timeout(60)
def test_a_process_forked_while_a_write_begins_can_write_a_store() -> None:
    """Another thread begins a write through a Zarr store (its changes listed, under the module's lock) as this one
    forks. The child's write lists its own and its failure stops them; the lock was copied held, and the child's
    first write through a Zarr store hung for good."""
    from cloudio._zarr import changes

    def in_child() -> None:
        with pytest.raises(ValueError), changes.stopped_on_failure():
            raise ValueError("a chunk failed")

    assert _forked_while_held(changes._lock, in_child) == 0, "the child hung (2) or failed (1)"


@fork_only
@pytest.mark.timeout(60)
def test_a_process_forked_while_a_store_change_starts_can_change_the_store() -> None:
    """Another thread's store change (an upload of a chunk) starts or ends as part of a write (the write's own lock)
    as this one forks. The child, a worker given the store naming that write, makes its own change of it; the
    write's lock was copied held, and that change hung for good."""
    from cloudio._zarr import changes

    write = changes._joined("fork-review-write")  # the write's changes in this process (kept: a weak table)

    class Store:
        _cloudio_write = write.write

        @changes.stops_with_its_write
        async def set(self, key: str) -> str:
            return key

    def in_child() -> None:
        assert asyncio.run(Store().set("c/0")) == "c/0"
        assert changes.stop_write(write.write) == 0

    assert _forked_while_held(write._lock, in_child) == 0, "the child hung (2) or failed (1)"


# -- cloudio._zarr.store: the stores' metadata log, generations stored, writes under way, listings ------------------

_ROOT = "gs://fork-review/store"


def _opens_a_store() -> None:
    from cloudio._zarr import store

    assert not store.consolidated_is_stale(_ROOT)  # what an open asks before it trusts the consolidated copy
    store.consolidated_seen(_ROOT, True)  # what a listing that found the copy stale notes
    assert store.consolidated_is_stale(_ROOT)


def _stores_a_chunk() -> None:
    from cloudio._zarr import store

    store._stored_here_as(f"{_ROOT}/c/0", 4)  # what a write through a store notes once its object landed
    assert store._stored_here[f"{_ROOT}/c/0"] == 4


def _clears_a_store() -> None:
    from cloudio._zarr import store

    assert not store._marked(_ROOT)  # what a clear asks: is a write of this process under way there


def _resets() -> None:
    from cloudio._zarr import store

    store.reset()  # what cloudio._state.reset does (a revalidation reads and keeps its listing under the same lock)
    assert not store._checked


@fork_only
@pytest.mark.timeout(60)
@pytest.mark.parametrize(("lock", "work"), [
    ("_metadata", _opens_a_store),
    ("_stored_here_lock", _stores_a_chunk),
    ("_marks_lock", _clears_a_store),
    ("_checked_lock", _resets),
], ids=["metadata-log", "stored-here", "marks", "checked"])
def test_a_process_forked_while_a_store_notes_its_work_can_use_a_store(lock: str, work: Callable[[], None]) -> None:
    """Another thread logs a metadata write, notes a generation stored, counts a write under way, or keeps a
    revalidation's listing (each under its lock of cloudio._zarr.store) as this one forks. The child's open, write,
    clear or revalidation of a store takes the same lock; it was copied held, and that hung for good."""
    from cloudio._zarr import store

    held = store._metadata._lock if lock == "_metadata" else getattr(store, lock)
    assert _forked_while_held(held, work) == 0, "the child hung (2) or failed (1)"


# -- cloudio._zarr.arrays: the whole-array reads with NumPy's huge-page advice off -------------------------------------


@fork_only
@pytest.mark.timeout(60)
def test_a_process_forked_while_a_read_turns_numpy_advice_off_can_read(monkeypatch: pytest.MonkeyPatch) -> None:
    """Another thread's whole-array read turns NumPy's huge-page advice off (its count of reads, under the lock) as
    this one forks. The child's load_array does the same around its decoding; the lock was copied held, and the
    child's first load_array hung for good."""
    pytest.importorskip("numpy._core.multiarray")
    from cloudio._zarr import arrays

    monkeypatch.delenv("NUMPY_MADVISE_HUGEPAGE", raising=False)  # set, it leaves the advice (and the lock) alone

    def in_child() -> None:
        with arrays._no_hugepage_advice():  # what load_array does around zarr's decoding
            pass

    assert _forked_while_held(arrays._advice_lock, in_child) == 0, "the child hung (2) or failed (1)"


# -- cloudio._zarr.buffers: the shard buffers and outputs kept between whole-array reads -------------------------------


@fork_only
@pytest.mark.timeout(60)
@pytest.mark.parametrize("pool", ["shard_buffers", "outputs"])
def test_a_process_forked_while_a_buffer_is_given_back_can_read(pool: str) -> None:
    """Another thread's read gives a buffer back to a pool (or takes one, under the pool's lock) as this one forks.
    The child's whole-array read takes one and gives it back, and the pool lets it go after KEEP_SECONDS (its
    timer's thread is not in the child: a new one runs); the lock was copied held, and the child's first read hung
    for good."""
    import numpy as np

    from cloudio._zarr import buffers

    kept = getattr(buffers, pool)
    kept.give(np.empty(16, dtype="u1"))  # the pool keeps a buffer, its timer running (a thread the child has not)

    def in_child() -> None:
        buf = kept.take(16)  # what a whole-array read does for each shard, or a large one for its output
        kept.give(buf)
        assert kept._timer is not None and kept._timer.is_alive()

    assert _forked_while_held(kept._lock, in_child) == 0, "the child hung (2) or failed (1)"


# -- cloudio._fsspec.consumer: the epochs of invalidations, the instances guarded --------------------------------------


@fork_only
@pytest.mark.timeout(60)
def test_a_process_forked_while_fsspec_listings_are_invalidated_can_invalidate() -> None:
    """Another thread's change bumps the epochs of the listings it makes stale (under their lock) as this one forks.
    Every change of the child reaches the fsspec consumer, which bumps them too; the lock was copied held, and the
    child's first write or invalidation hung for good."""
    import cloudio
    from cloudio._fsspec import consumer

    def in_child() -> None:
        before = consumer._epochs.now
        cloudio.invalidate("gs://fork-review/listed")
        assert consumer._epochs.now > before

    assert _forked_while_held(consumer._epochs._lock, in_child) == 0, "the child hung (2) or failed (1)"


@fork_only
@pytest.mark.timeout(60)
def test_a_process_forked_while_an_fsspec_instance_is_guarded_can_guard_one() -> None:
    """Another thread guards a filesystem's listings (under the guarding lock) as this one forks. The child's next
    change guards every live instance not yet guarded, its own included; the lock was copied held, and that hung
    for good."""
    from fsspec.dircache import DirCache

    from cloudio._fsspec import consumer

    class Listed:
        def __init__(self) -> None:
            self.dircache = DirCache()

    def in_child() -> None:
        fs = Listed()
        consumer.guard_listings(fs)  # what the consumer does to each live instance at a change
        assert type(fs.dircache) is consumer._EpochDirCache

    assert _forked_while_held(consumer._guarding, in_child) == 0, "the child hung (2) or failed (1)"


# -- cloudio._gdal: the GDAL consumer's state and the per-object gates -----------------------------------------------


@fork_only
@pytest.mark.timeout(60)
def test_a_process_forked_while_gdal_caches_take_a_change_can_write() -> None:
    """Another thread applies a change to what cloudio knows of GDAL's caches (the GDAL consumer's state, under its
    lock) as this one forks. The child's write must be applied there too; the lock was copied held, and the
    child's first write (and open through the GDAL face) hung for good."""
    pytest.importorskip("rasterio")
    import math

    from cloudio._gdal.consumer import consumer

    url = "gs://fork-review/d/written.tif"

    def in_child() -> None:
        journal().record(url, "write", generation=3)
        assert consumer.last_check(url) == (3, -math.inf)

    assert _forked_while_held(consumer._state, in_child) == 0, "the child hung (2) or failed (1)"


@fork_only
@pytest.mark.timeout(60)
def test_a_process_forked_while_gdal_io_enters_its_gate_can_write_and_read() -> None:
    """Another thread starts GDAL I/O of an object (its gate, under the gates' lock) as this one forks. The child's
    write must hold its object and its read enter its own; the lock was copied held, and the child's first write
    or open through the GDAL face hung for good."""
    pytest.importorskip("rasterio")
    import cloudio._gdal.consumer  # noqa: F401  # its consumer holds a written object's gate
    from cloudio._gdal.gates import gates

    url = "gs://fork-review/d/gated.tif"

    def in_child() -> None:
        with journal().changing(url):  # what a write through cloudio does before it sends the bytes
            pass
        vsi = parse_gcs(url).vsi
        gates.enter(vsi)  # what an open through the GDAL face does around GDAL's I/O
        gates.exit(vsi)

    assert _forked_while_held(gates._mutex, in_child) == 0, "the child hung (2) or failed (1)"


@fork_only
@pytest.mark.timeout(60)
def test_a_process_forked_while_the_gdal_generation_is_bumped_can_write() -> None:
    """Another thread bumps the GDAL face's generation (a change applied, a listing set, a bucket's options: under
    its lock) as this one forks. The child's write is applied to GDAL's caches, which bumps it; the lock was copied
    held, and the child's first write (and open through the GDAL face) hung for good."""
    pytest.importorskip("rasterio")
    from cloudio._gdal import generation
    from cloudio._gdal.consumer import consumer

    url = "gs://fork-review/d/bumped.tif"

    def in_child() -> None:
        before = generation.current[0]
        journal().record(url, "write", generation=3)  # applied under the GDAL consumer's lock: bumps the generation
        assert generation.current[0] > before
        assert consumer.last_check(url)[0] == 3

    assert _forked_while_held(generation._lock, in_child) == 0, "the child hung (2) or failed (1)"


@fork_only
@pytest.mark.timeout(60)
def test_a_process_forked_while_a_buckets_gdal_options_are_set_can_open_another() -> None:
    """Another thread sets a bucket's GDAL options (the emulator, timeouts: under the endpoints' lock) as this one
    forks. The child's first open through the GDAL face of another bucket sets that bucket's; the lock was copied
    held, and that open hung for good."""
    pytest.importorskip("rasterio")
    from cloudio._gdal import endpoint

    def in_child() -> None:
        endpoint.ensure_endpoint("fork-review-endpoint")  # what an open through the GDAL face does first
        assert endpoint.in_force("fork-review-endpoint")

    assert _forked_while_held(endpoint._endpoints_lock, in_child) == 0, "the child hung (2) or failed (1)"


@fork_only
@pytest.mark.timeout(60)
def test_a_process_forked_while_a_gdal_writer_opens_can_write() -> None:
    """Another thread opens a writer through the GDAL face (its temporary file noted as the object it becomes, under
    the lock) as this one forks. The child's writer notes its own, and its write_vrt asks which object a file stands
    for; the lock was copied held, and the child's first write through the GDAL face hung for good."""
    pytest.importorskip("rasterio")
    from cloudio._gdal import write

    path = parse_gcs("gs://fork-review/d/written-here.tif")

    def in_child() -> None:
        write._remember_local("/tmp/cloudio-fork-review/written-here.tif", path)  # what opening a writer does
        assert write.gcs_path_for_local("/tmp/cloudio-fork-review/written-here.tif") == path

    assert _forked_while_held(write._local_lock, in_child) == 0, "the child hung (2) or failed (1)"


# -- cloudio.emulator: the spawner of the emulator's processes ---------------------------------------------------------


@fork_only
@pytest.mark.timeout(60)
def test_a_process_forked_while_the_emulator_spawner_starts_can_start_a_process() -> None:
    """Another thread starts the emulator's spawner (the thread that forks its servers, under its lock) as this one
    forks. The child's start of a process from a thread other than its main one takes the lock, and hands the fork
    to a spawner: the lock was copied held, and that start hung for good; the parent's spawner, whose thread the
    child has not, would never have run it either."""
    from cloudio import emulator

    def spawn() -> int:
        return emulator._popen(["true"]).wait()  # what Emulator.start does from a pool's thread

    with concurrent.futures.ThreadPoolExecutor(1) as pool:  # the parent's spawner running, its queue kept
        assert pool.submit(spawn).result(30) == 0

    def in_child() -> None:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            assert pool.submit(spawn).result() == 0

    assert _forked_while_held(emulator._spawn_lock, in_child) == 0, "the child hung (2) or failed (1)"


# -- the order a fork takes them in (cloudio._threads.FORK_ORDER) ----------------------------------------------------

_FORK_WHILE_NESTING = """
import os, sys, threading
from cloudio._gdal import endpoint
from cloudio._gdal.consumer import consumer
from cloudio._journal import journal
from cloudio._paths import parse_gcs

journal().record("/tmp/cloudio-fork-order/first", "write")
path = parse_gcs("gs://fork-order/d/x.tif")
stop = threading.Event()

def nest():
    while not stop.is_set():
        consumer.set_listing(path, ["x.tif"], listed_after=0)  # asks the journal (its lock) under the consumer's,
        consumer.forget_listing(path)  # clears GDAL's listing under it: counts (the sessions' lock); both bump the
        # GDAL generation (its lock) under it

def set_options():
    while not stop.is_set():
        endpoint.reset()  # under the endpoints' lock: clears GDAL's cache (counts: the sessions' lock), bumps
        endpoint.ensure_endpoint("fork-order")

threads = [threading.Thread(target=nest, daemon=True) for _ in range(3)]
threads += [threading.Thread(target=set_options, daemon=True) for _ in range(2)]
for t in threads:
    t.start()
for _ in range(100):  # with "journals" first in FORK_ORDER, 30 forks deadlocked 5 times in 5
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
stop.set()
for t in threads:
    t.join()
print("forked")
"""


@fork_only
@pytest.mark.timeout(180)
def test_forks_while_threads_nest_the_locks_never_deadlock_the_parent() -> None:
    """Threads take the GDAL consumer's lock and, under it, the journal's, the sessions' and the GDAL generation's
    (as set_listing and a clear of GDAL's cache do) while the process forks again and again. The fork takes every
    lock held across it: in another order than the code nests them (the journals' first, say), the forking thread
    would wait for the GDAL consumer's lock held by a thread waiting for the journal's, for good. (A guard of
    FORK_ORDER: it deadlocks with "journals", "state" or "gdal generation" put before "gdal consumer". Others set
    buckets' GDAL options meanwhile, taking the sessions' and the generation's locks under the endpoints'.)"""
    pytest.importorskip("rasterio")
    import subprocess

    try:
        run = subprocess.run([sys.executable, "-c", _FORK_WHILE_NESTING], capture_output=True, text=True,
                             timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("the forking process deadlocked")
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip() == "forked"


# -- the gates themselves: an object's change or I/O under way in a thread the child does not have ------------------


@fork_only
@pytest.mark.timeout(60)
def test_a_process_forked_while_another_thread_writes_an_object_can_open_it() -> None:
    """Another thread's write holds its object's gate (sending the bytes) as this one forks. The child's open of that
    object must not wait for a write of a thread it does not have: it waited for good (no limit on that wait)."""
    pytest.importorskip("rasterio")
    from cloudio._gdal.gates import gates

    vsi = parse_gcs("gs://fork-review/d/being-written.tif").vsi

    def in_child() -> None:
        gates.enter(vsi)  # what an open through the GDAL face does around GDAL's I/O
        gates.exit(vsi)

    code = _forked_while_gated(lambda: gates.begin_change(vsi), lambda: gates.end_change(vsi), in_child)
    assert code == 0, "the child hung (2) or failed (1)"


@fork_only
@pytest.mark.timeout(60)
def test_a_process_forked_while_another_thread_reads_an_object_can_write_it() -> None:
    """Another thread's GDAL read of an object is under way (its gate entered) as this one forks. The child's write of
    that object must not wait for a read of a thread it does not have: it waited CHANGE_WAIT (30 s), then wrote with
    a warning that a read might mix two versions."""
    pytest.importorskip("rasterio")
    import cloudio._gdal.consumer  # noqa: F401  # its consumer holds a written object's gate
    from cloudio._gdal.gates import gates

    url = "gs://fork-review/d/being-read.tif"
    vsi = parse_gcs(url).vsi

    def in_child() -> None:
        with journal().changing(url):  # what a write through cloudio does before it sends the bytes
            pass

    assert _forked_while_gated(lambda: gates.enter(vsi), lambda: gates.exit(vsi), in_child) == 0, \
        "the child hung (2) or failed (1)"
