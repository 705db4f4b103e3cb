"""A review of the write journal and the consistency levels (``_journal``, ``_session``, ``_state``,
``_threads``); each test failed before its fix, but where its docstring says it guards one."""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from outcomes import forked_exit_code

from cloudio._journal import WriteJournal
from cloudio._session import count, current_consistency, session
from cloudio.errors import ConfigurationError

fork_only = pytest.mark.skipif(not hasattr(os, "fork"), reason="nothing forks here")


@pytest.fixture(autouse=True)
def _no_env_level(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CLOUDIO_CONSISTENCY", raising=False)


def _forks(work: Callable[[], object], n: int = 25) -> list[int]:
    """The exit codes of up to ``n`` children forked one after another, up to the first that did not exit 0."""
    codes: list[int] = []
    while len(codes) < n and not any(codes):
        codes.append(forked_exit_code(work))
    return codes


@pytest.fixture
def busy_threads() -> Iterator[Callable[[Callable[[int], object]], None]]:
    """Start 4 threads repeating ``step(i)`` until the test ends."""
    stop = threading.Event()
    threads: list[threading.Thread] = []

    def start(step: Callable[[int], object]) -> None:
        def loop() -> None:
            i = 0
            while not stop.is_set():
                step(i)
                i += 1

        for _ in range(4):
            threads.append(threading.Thread(target=loop, daemon=True))
            threads[-1].start()

    yield start
    stop.set()
    for t in threads:
        t.join(10)


# -- a fork while other threads record (multiprocessing's and Dask's fork) ---------------------------------------


@fork_only
@pytest.mark.timeout(120)
def test_a_process_forked_while_other_threads_record_changes_can_record_its_own(busy_threads) -> None:
    """Other threads record changes while this one forks (a ``multiprocessing`` pool started while uploads run).
    The child must be able to journal its own writes, and read them back. The journal's lock was copied held by
    a thread the child does not have: the child's first write hung for good."""
    # a journal of the test's own (a WriteJournal as the process's): the caches' consumers registered with the
    # process journal take locks of their own (not this review's), and only the journal's is exercised here
    j = WriteJournal()
    busy_threads(lambda i: j.record(f"/tmp/cloudio-fork-review/{threading.get_ident()}/{i}", "write"))
    time.sleep(0.05)

    def in_child() -> None:
        change = j.record("/tmp/cloudio-fork-review/child", "write")
        assert j.since(change.seq - 1) == [change]

    codes = _forks(in_child)
    assert codes == [0] * 25, f"children that hung (2, -9) or failed (1): {codes}"


@fork_only
@pytest.mark.timeout(120)
def test_a_process_forked_while_other_threads_count_can_open_sessions_and_count(busy_threads) -> None:
    """Other threads count uploads in an open session while this one forks. The child must be able to enter a
    session of its own and count what it does: the sessions' lock was copied held, and the child hung at its
    first upload (``count``) or ``cloudio.session``."""
    with session():
        busy_threads(lambda i: count("uploads"))
        time.sleep(0.05)

        def in_child() -> None:
            with session("strong") as s:
                count("uploads")
                assert current_consistency() == "strong"
            assert s.stats.uploads == 1

        codes = _forks(in_child)
    assert codes == [0] * 25, f"children that hung (2, -9) or failed (1): {codes}"


# -- the level worker threads take: the newest session block still open ------------------------------------------


def _worker_level() -> object:
    with ThreadPoolExecutor(1) as pool:  # a thread that entered no session: the newest block open in the process
        return pool.submit(current_consistency).result()


def test_leaving_a_session_entered_again_inside_another_puts_the_other_back_in_force_for_worker_threads() -> None:
    """``with strong: with bounded: with strong: ...``: once the innermost block is left, the bounded one is the
    newest still open, here and in worker threads. Leaving took off the first entry of ``strong`` (the outer
    block's) instead of its own: worker threads went on reading at "strong", as if the left block were open."""
    strong, bounded = session("strong"), session(5)
    with strong:
        with bounded:
            with strong:
                assert _worker_level() == "strong"
            assert current_consistency() == 5
            assert _worker_level() == 5
        assert _worker_level() == "strong"
    assert _worker_level() == "session"


def test_a_session_left_in_one_thread_takes_off_that_threads_block_not_anothers() -> None:
    """One session object entered in two threads: leaving it in one takes off that thread's block, so a block
    the other thread entered later (inside one of its own) stays the newest. (A guard of the fix above: it
    passed before it too, and fails if leaving takes off the object's last entry instead of the block's own.)"""
    strong, bounded = session("strong"), session(5)
    entered, leave = threading.Event(), threading.Event()

    def other() -> None:
        with strong:
            entered.set()
            leave.wait(10)

    t = threading.Thread(target=other)
    t.start()
    try:
        assert entered.wait(10)
        with bounded:
            with strong:  # the newest block open in the process
                leave.set()
                t.join(10)  # the other thread's (older) block of the same object is left
                assert _worker_level() == "strong"
            assert _worker_level() == 5
    finally:
        leave.set()
        t.join(10)
    assert _worker_level() == "session"


# -- every level refused is a ConfigurationError -----------------------------------------------------------------


@pytest.mark.parametrize(("value", "why"), [
    (-(10**400), "seconds >= 0"),  # past a float's range: OverflowError
    (np.array([1.0, 2.0]), "is not a level"),  # NumPy's "truth value of an array is ambiguous"
    (np.array(["session", "strong"]), "is not a level"),
])
def test_a_level_that_is_no_level_is_a_configuration_error_naming_it(value: object, why: str) -> None:
    """A level cloudio cannot use is a ConfigurationError naming the value and what to pass instead. An integer
    too large for a float raised OverflowError, and an array NumPy's ValueError, from the checks themselves."""
    with pytest.raises(ConfigurationError) as e:
        session(value)  # type: ignore[arg-type]
    assert why in str(e.value) and "'session'" in str(e.value) and "'strong'" in str(e.value)


def test_a_bound_past_a_floats_range_is_the_session_level() -> None:
    """More seconds than a float holds: no cached state is ever that old, so no revalidation (as ``inf``)."""
    assert session(10**400).consistency == "session"
    with session(10**400):
        assert current_consistency() == "session"


# -- a session's counts read from another thread -----------------------------------------------------------------


@pytest.mark.timeout(60)
def test_a_sessions_counts_read_from_another_thread_while_it_is_entered_and_left() -> None:
    """A monitoring thread logs ``s.stats.as_dict()`` while the session is entered and left again and again.
    Each read is a count, never an error: it met the count's start cleared between its test and its use
    (TypeError: unsupported operand type(s) for -: 'int' and 'NoneType')."""
    s = session()
    errors: list[BaseException] = []
    stop = threading.Event()

    def monitor() -> None:
        while not stop.is_set():
            try:
                got = s.stats.as_dict()
                assert isinstance(got["opens"], int) and got["opens"] >= 0
            except BaseException as e:  # what the test reports
                errors.append(e)
                stop.set()

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads switch often: the window between the two reads is met at once
    t = threading.Thread(target=monitor)
    t.start()
    try:
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and not stop.is_set():
            with s:
                count("opens")
    finally:
        stop.set()
        t.join(10)
        sys.setswitchinterval(old)
    assert errors == []
    assert s.stats.opens >= 1


# -- the first changes of a process, recorded by two threads at once ---------------------------------------------

_FIRST_CHANGES = """
import threading, time
import cloudio
from cloudio._journal import WriteJournal

go = threading.Barrier(2)

def first_write():  # the process's first change: its record loads the caches' consumers
    go.wait()
    journal().record("gs://cloudio-first-changes/a/x", "write")

def invalidation():  # meanwhile, another thread says someone else changed a store
    go.wait()
    time.sleep(0.001)
    cloudio.invalidate("gs://cloudio-first-changes/s.zarr")

threads = [threading.Thread(target=first_write), threading.Thread(target=invalidation)]
for t in threads:
    t.start()
for t in threads:
    t.join()
from cloudio._zarr import consumer
print(consumer.pending("gs://cloudio-first-changes/s.zarr"))
"""


@pytest.mark.timeout(120)
def test_an_invalidation_recorded_while_another_thread_loads_the_consumers_reaches_them() -> None:
    """A fresh process: one thread's first write loads the caches' consumers (Zarr's is loaded by cloudio's first
    change), while another calls ``cloudio.invalidate`` on a Zarr store. The next ``open_zarr`` of the store must
    list its documents rather than trust its consolidated copy. The invalidation saw the consumer's module
    being loaded (in ``sys.modules``, not registered yet), took it as loaded, and reached no consumer: the
    announcement was lost (most runs here)."""
    import subprocess

    got = []
    for _ in range(8):
        run = subprocess.run([sys.executable, "-c", _FIRST_CHANGES], capture_output=True, text=True, timeout=60)
        assert run.returncode == 0, run.stderr
        got.append(run.stdout.strip())
        if got[-1] != "True":
            break
    assert set(got) == {"True"}, f"announced in each run: {got}"


# -- writes made while the interpreter shuts down ----------------------------------------------------------------

_SAVED_AT_EXIT = """
import atexit, os
import numpy as np
import cloudio

url = os.environ["SAVED_AT_EXIT"]
want = np.arange(1024 * 1024, dtype="float32").reshape(1024, 1024)
layouts = {  # what each write at exit is given to cloudio's threads for
    "zstd": dict(chunks=(512, 1024)),  # 2 MiB chunks encoded by the coder threads
    "sharded": dict(chunks=(128, 1024), shards=(1024, 1024)),  # a shard's bands compressed by every coder thread
    "raw": dict(chunks=(128, 1024), shards=(512, 1024), compressors=None),  # 2 MiB bodies from sender threads
}
# a program that wrote and read large arrays before: cloudio's threads were started (and end at shutdown)
cloudio.save_array(want, url + "/before.zarr", **layouts["sharded"])
assert np.array_equal(cloudio.load_array(url + "/before.zarr"), want)

def flush():  # the program saves its results as it exits, and reads them back (reader threads)
    for name, layout in layouts.items():
        cloudio.save_array(want, f"{url}/{name}.zarr", **layout)
        print("saved", name, np.array_equal(cloudio.load_array(f"{url}/{name}.zarr"), want), flush=True)

atexit.register(flush)
"""


@pytest.mark.timeout(180)
def test_an_array_saved_in_an_atexit_handler_is_stored(gcs_emulator, gcs_bucket: str) -> None:
    """A program that wrote and read arrays saves its results from an ``atexit`` handler and reads them back
    there. They must be stored whole, and read, as any other write. The threads cloudio keeps for encoding,
    sending and reading refused the work once the interpreter was shutting down (RuntimeError: cannot schedule
    new futures after shutdown; after interpreter shutdown when none had been started), and nothing was saved;
    from Python 3.12 no new thread can take it either (RuntimeError: can't create new thread at interpreter
    shutdown)."""
    import subprocess

    import numpy as np

    import cloudio

    url = f"{gcs_bucket}/exit-{os.getpid()}"
    env = {**os.environ, "STORAGE_EMULATOR_HOST": gcs_emulator.url, "SAVED_AT_EXIT": url}
    run = subprocess.run([sys.executable, "-c", _SAVED_AT_EXIT], env=env, capture_output=True, text=True,
                         timeout=150)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split("\n")[:3] == ["saved zstd True", "saved sharded True", "saved raw True"], \
        run.stderr[-3000:]
    for name in ("zstd", "sharded", "raw"):
        got = cloudio.load_array(f"{url}/{name}.zarr")
        assert np.array_equal(got, np.arange(1024 * 1024, dtype="float32").reshape(1024, 1024)), name


# -- a synchronous call made on the event loop it runs on --------------------------------------------------------


@pytest.mark.timeout(60)
def test_a_synchronous_call_made_on_its_own_event_loop_is_refused_not_a_hang() -> None:
    """cloudio's synchronous wrapper (``run_to_the_end``: zarr's ``run_sync``, the verified uploads) called from
    a coroutine on the very loop it runs on must refuse at once, as zarr's and fsspec's ``sync`` do. It waited
    for a coroutine that loop could never run: the loop, and every call of the process on it, hung for good.
    (Shown at the wrapper: through the public entry points tried, zarr's own ``sync`` refuses first.)"""
    import asyncio

    from cloudio._threads import run_to_the_end

    loop = asyncio.new_event_loop()
    runner = threading.Thread(target=loop.run_forever, daemon=True)
    runner.start()
    try:
        async def nothing() -> int:
            return 1

        async def on_the_loop() -> int:
            return run_to_the_end(loop, nothing())  # a synchronous call inside a coroutine of that loop

        outcome = asyncio.run_coroutine_threadsafe(on_the_loop(), loop)
        with pytest.raises(NotImplementedError, match="within a running loop"):
            outcome.result(timeout=10)
        assert run_to_the_end(loop, nothing()) == 1  # from another thread, as before
    finally:
        loop.call_soon_threadsafe(loop.stop)
        runner.join(10)
        loop.close()


_FORK_WHILE_LOADING = """
import os, sys, threading, time
import fsspec, rasterio  # libraries whose caches the first change loads a consumer for
from cloudio._journal import WriteJournal

j = WriteJournal()
go = threading.Event()

def first():
    go.wait()
    j.record("/tmp/cloudio-fork-import/first", "write")

threads = [threading.Thread(target=first) for _ in range(4)]
for t in threads:
    t.start()
go.set()
time.sleep(0.002)
pid = os.fork()  # while the first changes load the consumers
if pid == 0:
    t = threading.Thread(target=lambda: j.record("/tmp/cloudio-fork-import/child", "write"), daemon=True)
    t.start()
    t.join(5)
    os._exit(2 if t.is_alive() else 0)
_, status = os.waitpid(pid, 0)
for t in threads:
    t.join()
print(os.waitstatus_to_exitcode(status))
"""


@fork_only
@pytest.mark.timeout(180)
def test_a_process_forked_while_the_first_changes_load_the_consumers_can_record() -> None:
    """A fresh process: threads record its first changes (loading the caches' consumers) as it forks. The child
    must be able to record. It waited for good for the import lock of a consumer module that a thread it does not
    have was importing (about half the runs here, once f14b2a1 had records wait for that import)."""
    import subprocess

    got = []
    for _ in range(8):
        run = subprocess.run([sys.executable, "-c", _FORK_WHILE_LOADING], capture_output=True, text=True, timeout=60)
        assert run.returncode == 0, run.stderr[-3000:]
        got.append(run.stdout.strip())
        if got[-1] != "0":
            break
    assert set(got) == {"0"}, f"the child's exit in each run (2: its record hung): {got}"


# -- a synchronous call on an event loop that no longer runs ------------------------------------------------------


@pytest.mark.timeout(60)
def test_a_synchronous_call_on_a_closed_loop_is_a_clear_error() -> None:
    """cloudio's synchronous wrapper (``run_to_the_end``) given a closed loop (zarr's, closed by zarr's own
    ``atexit`` clean-up while another thread still calls cloudio) must raise a CloudioError saying what to do, and
    leave no coroutine never awaited. It raised asyncio's plain RuntimeError (Event loop is closed), and Python
    warned that the coroutine was never awaited. (Shown at the wrapper: zarr drops its closed loop at once.)"""
    import asyncio
    import gc
    import warnings

    from cloudio._threads import run_to_the_end
    from cloudio.errors import CloudioError

    async def work() -> int:
        return 1

    loop = asyncio.new_event_loop()
    loop.close()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(CloudioError, match="is closed: this call could never end. a filesystem made on a loop "
                                               r"closed since: make a new one \(cloudio.filesystem\(\)\)"):
            run_to_the_end(loop, work())
        gc.collect()
    assert not [w for w in caught if "never awaited" in str(w.message)]


_READ_AT_EXIT_EARLY = """
import atexit, os, time
import numpy as np

def at_exit():  # registered before cloudio (and zarr) are imported: runs after zarr's own clean-up closed its loop
    import cloudio
    url = os.environ["READ_AT_EXIT"]
    written = url.replace(".zarr", "-written-at-exit.zarr")
    calls = [("read", lambda: float(cloudio.load_array(url).sum()))] * 2 + [
        ("save", lambda: (cloudio.save_array(np.ones(4, "float32"), written), 0.0)[1]),
        ("save", lambda: (cloudio.save_array(np.ones(4, "float32"), written), 0.0)[1]),
        ("read", lambda: float(cloudio.load_array(written).sum())),  # an array this process wrote
    ]
    for what, call in calls:
        began = time.monotonic()
        try:
            print(what, call(), flush=True)
        except Exception as e:
            named = url in str(e) or written in str(e)
            print("error", type(e).__name__, isinstance(e, cloudio.CloudioError), named,
                  time.monotonic() - began < 0.5, flush=True)

atexit.register(at_exit)
import cloudio
cloudio.filesystem().ls(os.path.dirname(os.environ["READ_AT_EXIT"]))  # the program used cloudio before
"""


@pytest.mark.timeout(120)
def test_a_read_at_exit_after_zarrs_clean_up_reads_or_fails_at_once(gcs_emulator, gcs_bucket: str) -> None:
    """An ``atexit`` handler registered before cloudio was imported runs after zarr's own clean-up, which closed
    zarr's event loop; zarr then makes a new one, whose thread Python 3.12 refuses to start. ``load_array`` there,
    twice (an array this process did not write: read through the store's own synchronous calls), then two
    ``save_array`` and a ``load_array`` of what they saved, must work (3.11: zarr's new loop runs) or fail at once
    with cloudio's error naming the store, at once, never hang. On 3.12 the second call waited for good on the loop
    no thread runs (killed here after 40 s), then a second each; on 3.11 the saves failed importing Dask at
    shutdown."""
    import subprocess

    import cloudio

    url = f"{gcs_bucket}/early-{os.getpid()}.zarr"
    cloudio.save_array(np.ones(4, "float32"), url)  # written by another process: read by the store's own calls
    env = {**os.environ, "STORAGE_EMULATOR_HOST": gcs_emulator.url, "READ_AT_EXIT": url}
    run = subprocess.run([sys.executable, "-W", "always", "-c", _READ_AT_EXIT_EARLY], env=env, capture_output=True,
                         text=True, timeout=40)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stdout.splitlines()
    if sys.version_info < (3, 12):
        assert lines == ["read 4.0", "read 4.0", "save 0.0", "save 0.0", "read 4.0"], run.stderr[-3000:]
    else:  # every call: cloudio's error naming the store, at once
        assert lines == ["error LoopNotRunningError True True True"] * 5, (lines, run.stderr[-3000:])


_FIRST_USE_AT_EXIT = """
import atexit, os
import numpy as np
import cloudio  # and nothing else of it before exit

def at_exit():
    url = os.environ["SAVED_AT_EXIT"]
    for call in (lambda: cloudio.save_array(np.arange(4, dtype="float32"), url),
                 lambda: float(cloudio.load_array(url).sum())):
        try:
            call()
            print("ok", flush=True)
        except Exception as e:
            print("error", type(e).__name__, url in str(e), flush=True)

atexit.register(at_exit)
"""


@pytest.mark.timeout(120)
def test_a_programs_first_cloudio_call_in_an_atexit_handler_works_or_says_why(gcs_emulator, gcs_bucket: str) -> None:
    """A program imports cloudio and first calls it from an ``atexit`` handler. The save and the read must work
    (3.11) or fail with cloudio's error naming the store (3.12, where zarr's loop's thread cannot start then). Both
    failed with RuntimeError: can't register atexit after shutdown: cloudio's thread pools import
    ``concurrent.futures.thread``, which registers a hook with ``threading`` as it loads."""
    import subprocess

    url = f"{gcs_bucket}/first-at-exit-{os.getpid()}.zarr"
    env = {**os.environ, "STORAGE_EMULATOR_HOST": gcs_emulator.url, "SAVED_AT_EXIT": url}
    run = subprocess.run([sys.executable, "-c", _FIRST_USE_AT_EXIT], env=env, capture_output=True, text=True,
                         timeout=90)
    assert run.returncode == 0, run.stderr[-3000:]
    want = ["ok", "ok"] if sys.version_info < (3, 12) else ["error LoopNotRunningError True"] * 2
    assert run.stdout.splitlines() == want, (run.stdout, run.stderr[-3000:])


_FSSPEC_AT_EXIT = """
import atexit, os
import fsspec.asyn
import cloudio

fsspec.asyn.get_loop()  # the program used fsspec before: its loop's thread runs (none can start at exit on 3.12)

def at_exit():  # a filesystem first made here: its session's first connection looks the host name up
    fs = cloudio.filesystem()
    path = os.environ["WRITTEN_AT_EXIT"]
    try:
        fs.pipe(path, b"written at exit")
        print("ok", fs.cat(path).decode(), flush=True)
    except Exception as e:
        print("error", type(e).__name__, e, flush=True)

atexit.register(at_exit)
"""


@pytest.mark.timeout(120)
def test_a_filesystems_first_connection_made_at_exit_looks_its_host_name_up(gcs_emulator, gcs_bucket: str) -> None:
    """The fsspec face at exit, reaching the server by a host name (``localhost`` here, GCS's on GCS): gcsfs's
    session (aiohttp) looks the name up in the event loop's default executor, stopped with every other as the
    interpreter shuts down: the write failed (ReadError or UploadError: RuntimeError: cannot schedule new futures
    after shutdown). cloudio gives the loop an executor that takes the work then."""
    import subprocess

    port = gcs_emulator.url.rsplit(":", 1)[1]
    env = {**os.environ, "STORAGE_EMULATOR_HOST": f"http://localhost:{port}",
           "WRITTEN_AT_EXIT": f"{gcs_bucket.removeprefix('gs://')}/at-exit-{os.getpid()}.txt"}
    run = subprocess.run([sys.executable, "-c", _FSSPEC_AT_EXIT], env=env, capture_output=True, text=True,
                         timeout=90)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.splitlines() == ["ok written at exit"], (run.stdout, run.stderr[-3000:])


_NEW_CONNECTIONS_AT_EXIT = """
import atexit, os
import numpy as np
import cloudio

url = os.environ["SAVED_AT_EXIT"]
want = np.arange(256 * 1024, dtype="float32").reshape(256, 1024)
cloudio.save_array(want, url + "/before.zarr", chunks=(64, 1024))  # cloudio's requests made before

def flush():  # every answer closes its connection: each request at exit connects anew, to a host name
    cloudio.save_array(want, url + "/at-exit.zarr", chunks=(64, 1024))
    print("saved", np.array_equal(cloudio.load_array(url + "/at-exit.zarr"), want), flush=True)

atexit.register(flush)
"""


@pytest.mark.timeout(120)
def test_an_array_saved_at_exit_over_new_connections_to_a_host_name_is_stored(fault_proxy, gcs_bucket: str) -> None:
    """An ``atexit`` handler saves an array, and reads it back, when cloudio's kept connections are gone (on GCS:
    closed by the server while the program did other things), its endpoint named by a host name, as GCS's is. Each
    new connection of cloudio's transport resolved the name in the event loop's default executor, whose threads had
    ended at interpreter shutdown: it refused the work (RuntimeError: cannot schedule new futures after shutdown),
    on Python 3.11 and 3.12 alike, and nothing was saved."""
    import subprocess

    import numpy as np

    import cloudio

    fault_proxy.add("closes", times=None)
    url = f"{gcs_bucket}/exit-{os.getpid()}"
    endpoint = f"http://localhost:{fault_proxy.server.server_address[1]}"
    env = {**os.environ, "STORAGE_EMULATOR_HOST": endpoint, "SAVED_AT_EXIT": url}
    run = subprocess.run([sys.executable, "-c", _NEW_CONNECTIONS_AT_EXIT], env=env, capture_output=True, text=True,
                         timeout=100)
    assert run.returncode == 0 and run.stdout.strip() == "saved True", run.stderr[-3000:]
    fault_proxy.clear()
    got = cloudio.load_array(f"{url}/at-exit.zarr")
    assert np.array_equal(got, np.arange(256 * 1024, dtype="float32").reshape(256, 1024))
