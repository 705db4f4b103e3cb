"""Thread pools made on first use and kept for the life of the process.

Why kept: each thread of the data path holds keep-alive connections of its
own (:mod:`cloudio._gcs.fast`), which a fresh pool per call would open again.

Why forgotten in a forked child (Dask's and multiprocessing's fork): the child
inherits the executor but none of its threads, and the executor, counting the
parent's idle ones, starts none, so work submitted there never ran; the pool's
lock may also have been copied held by a thread the child does not have.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Coroutine, Iterable
from concurrent.futures import BrokenExecutor, Future, ThreadPoolExecutor
from typing import Any, Protocol, TypeVar

from cloudio.errors import LoopNotRunningError

T = TypeVar("T")

log = logging.getLogger(__name__)

#: seconds an interrupted call is given to cancel its requests and end (:func:`run_to_the_end`)
CANCEL_WAIT = 30.0
#: how zarr's and fsspec's ``sync``, and :func:`run_to_the_end`, begin their refusal of a synchronous call made on
#: the event loop it would wait for
SYNC_REFUSED = "Calling sync() from within a running loop"


def started(thread: threading.Thread) -> bool:
    """Start ``thread``; False when the interpreter is shutting down and starts no thread any more (from Python
    3.12: RuntimeError: can't create new thread at interpreter shutdown). Why: work done at exit (an ``atexit``
    handler saving an array) must then go on without it, where it can, rather than fail."""
    try:
        thread.start()
    except RuntimeError:
        if not shutting_down():  # out of threads, say: not ours to hide
            raise
        return False
    return True


def shutting_down() -> bool:
    """Whether the interpreter is shutting down. ``threading._shutdown`` sets the flag first, then stops every
    ``ThreadPoolExecutor`` (each joins its threads and refuses new work from then on), then joins the non-daemon
    threads; ``atexit`` handlers run after that. Read with a default: a Python without the private flag is never
    taken for shutting down (3.9 to 3.13 have it), and work at exit then fails as before this was added."""
    return bool(getattr(threading, "_SHUTTING_DOWN", False))


class _KeptExecutor(ThreadPoolExecutor):
    """The executor of a :class:`KeptPool`: once the interpreter is shutting down (an ``atexit`` handler saving
    an array), what it is given runs in a thread of its own, or, where no thread can be started any more (Python
    3.12 and later), at once in the calling thread, which gets a Future already done.

    Why: ``ThreadPoolExecutor`` then refuses new work (RuntimeError: cannot
    schedule new futures after shutdown, or after interpreter shutdown when it
    had no thread yet: its threads have been joined, and as they ended they
    marked it shut down), and a write or read made at exit through cloudio
    failed with it;
    from 3.12 the interpreter refuses any new thread then too (RuntimeError:
    can't create new thread at interpreter shutdown). Run in the caller, the
    work must not wait for other work given to a pool: none of cloudio's does
    (encoding a shard or its bands, sending an upload's body, a read's worker
    taking shards until none is left, waiting for GDAL's reads of an object);
    given by a coroutine it holds the event loop meanwhile, which is slower
    but ends.
    """

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        try:
            return super().submit(fn, *args, **kwargs)
        except BrokenExecutor:
            raise
        except RuntimeError:
            # not self._shutdown: the executor's own threads set it as they end at interpreter shutdown
            if not shutting_down():
                raise
        future: Future[T] = Future()
        future.set_running_or_notify_cancel()

        def run() -> None:
            try:
                result = fn(*args, **kwargs)
            except BaseException as e:
                future.set_exception(e)
            else:
                future.set_result(result)

        if started(threading.Thread(target=run, name=f"{self._name}-at-exit", daemon=True)):
            log.debug("%s: the interpreter is shutting down; running %r in a thread of its own", self._name, fn)
        else:
            log.debug("%s: the interpreter is shutting down; running %r in the calling thread", self._name, fn)
            run()
        return future

    @property
    def _name(self) -> str:
        return str(self._thread_name_prefix)  # type: ignore[attr-defined]


#: the event loops given a default executor that works at interpreter shutdown (:func:`resolving_at_exit`)
_resolving_at_exit: weakref.WeakSet[asyncio.AbstractEventLoop] = weakref.WeakSet()


def resolving_at_exit(loop: asyncio.AbstractEventLoop) -> None:
    """At interpreter shutdown, give ``loop`` a default executor that takes work then (:class:`_KeptExecutor`: in
    a thread of its own, or in the loop's own thread). Why: asyncio looks host names up in it (every new
    connection to ``storage.googleapis.com``: cloudio's own, gcsfs's aiohttp's), and the loop's own executor,
    stopped with every other as the interpreter shuts down, refuses them (RuntimeError: cannot schedule new
    futures after shutdown): an ``atexit`` handler's write or read failed once its kept connections had closed."""
    if shutting_down() and loop not in _resolving_at_exit:
        _resolving_at_exit.add(loop)
        loop.set_default_executor(_KeptExecutor(1, thread_name_prefix="cloudio-resolve-at-exit"))


class KeptPool:
    """A :class:`~concurrent.futures.ThreadPoolExecutor` of ``workers()`` threads named ``name``, made on
    the first call and returned by every later one (in a forked child: the first call there makes its own)."""

    def __init__(self, workers: Callable[[], int], name: str) -> None:
        self._workers = workers
        self._name = name
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        _pools.add(self)

    def __call__(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = _KeptExecutor(self._workers(), thread_name_prefix=self._name)
            return self._pool

    def _forget(self) -> None:
        """In a forked child: drop the parent's executor (its threads are not here) and its lock (maybe
        held by one of them). Not shut down: there is nothing of it to stop in the child."""
        self._lock = threading.Lock()
        self._pool = None


#: every KeptPool of this process, to forget in a forked child
_pools: weakref.WeakSet[KeptPool] = weakref.WeakSet()


def _forked() -> None:
    for pool in list(_pools):
        pool._forget()


if hasattr(os, "register_at_fork"):  # not on Windows, where nothing forks
    os.register_at_fork(after_in_child=_forked)


class _Lock(Protocol):
    def acquire(self, blocking: bool = ..., timeout: float = ...) -> bool: ...

    def release(self) -> None: ...


#: The groups of locks a fork holds (:func:`hold_across_fork`), in the order it takes them. Why one order: a
#: thread holding one of these may go on to take a later one, never an earlier one, so the forking thread, taking
#: them in this order, never waits for a thread that waits for it (``os.register_at_fork`` would take them in the
#: reverse order of the modules' imports instead, which no code nests them in).
#:
#: * "journal imports" (:data:`cloudio._journal._loading`): a consumer module imported under it registers with
#:   the journal and may record a change, whose consumers take every lock below;
#: * "gdal consumer" (``GdalConsumer._state``): :meth:`~cloudio._gdal.consumer.GdalConsumer.set_listing` asks the
#:   journal (its lock) under it, and a clear of GDAL's cache under it counts the invalidation (the sessions' lock,
#:   "state");
#: * "gdal endpoint" (:data:`cloudio._gdal.endpoint._endpoints_lock`): a bucket's options set under it clear
#:   GDAL's cache of the old server (counted: "state") and bump the GDAL generation;
#: * the rest take no other of these locks under them (in-memory work: gates, tables, counters; the GDAL face's
#:   writers' temporary files; the Zarr face's documents last written, its writes' store changes, each write's
#:   lock taken apart from the module's, its stores' metadata log, generations stored, writes under way and
#:   listings, its count of reads with NumPy's advice off, its buffer pools, each taken apart; the fsspec
#:   consumer's epochs and guarding, apart; the emulator's spawner);
#: * "gdal generation" (:mod:`cloudio._gdal.generation`) takes nothing under it, but is taken under the GDAL
#:   consumer's lock (each change applied there bumps it) and the endpoints': after those;
#: * nothing takes one of them under the journals' locks, last.
FORK_ORDER = ("journal imports", "gdal consumer", "gdal endpoint", "gdal gates", "gdal write", "zarr consumer",
              "zarr last seen", "zarr changes", "zarr store", "zarr arrays", "zarr buffers", "fsspec consumer",
              "transfer", "emulator spawner", "gdal generation", "state", "journals")

#: name -> (the group's locks now, what makes them anew in a forked child)
_fork_groups: dict[str, tuple[Callable[[], Iterable[_Lock]], Callable[[], None]]] = {}
#: the locks :func:`_before_fork` took, in order, to give back in the parent
_fork_held: list[_Lock] = []


def hold_across_fork(name: str, locks: Callable[[], Iterable[_Lock]], renew: Callable[[], None]) -> None:
    """Hold ``locks()`` across every fork of this process (in the place :data:`FORK_ORDER` gives ``name``); in
    the child, ``renew()`` makes them anew. Why: a thread holding one at the fork is not in the child, and a lock
    copied held by it would stop the child's first use of it for good; held by the forking thread, what it guards
    is copied whole. Registering a name again replaces its group (a module reloaded)."""
    if name not in FORK_ORDER:
        raise ValueError(f"{name!r} has no place in FORK_ORDER: add it where the code nests its locks")
    _fork_groups[name] = (locks, renew)


def hold_globals_across_fork(name: str, module: str, *locks: str) -> None:
    """:func:`hold_across_fork` for locks that are globals of ``module`` (read as module globals where taken, so
    the new one is the one taken): each made anew in the child as a plain ``threading.Lock``."""
    import sys

    held = sys.modules[module]

    def renew() -> None:
        for lock in locks:
            setattr(held, lock, threading.Lock())

    hold_across_fork(name, lambda: [getattr(held, lock) for lock in locks], renew)


def _groups() -> list[tuple[Callable[[], Iterable[_Lock]], Callable[[], None]]]:
    return [_fork_groups[n] for n in FORK_ORDER if n in _fork_groups]


def _before_fork() -> None:
    for locks, _ in _groups():
        for lock in list(locks()):
            lock.acquire()
            _fork_held.append(lock)


def _after_fork_in_parent() -> None:
    while _fork_held:
        _fork_held.pop().release()


def _after_fork_in_child() -> None:
    _fork_held.clear()
    for _, renew in _groups():
        renew()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent,
                        after_in_child=_after_fork_in_child)


def run_to_the_end(loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` on ``loop`` (another thread's: gcsfs's, zarr's) and wait for it. When the wait is
    interrupted (Ctrl-C: ``KeyboardInterrupt``), the coroutine is cancelled and has ended (for up to
    :data:`CANCEL_WAIT` seconds) before the interrupt is raised. Why: fsspec's and zarr's ``sync`` leave it
    running, and a write would go on in the background after its caller was told it stopped."""
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if loop.is_closed() or (shutting_down() and not runs_soon(loop)):  # nothing would ever run the coroutine
        coro.close()
        state = "closed" if loop.is_closed() else "not running, and no thread can start it at interpreter shutdown"
        why = ("zarr's own atexit clean-up closes zarr's loop as the interpreter shuts down, and an atexit handler "
               "registered before cloudio was imported runs after it (from Python 3.12 no thread can start another "
               "loop then): save and read before the interpreter shuts down, or register that handler after "
               "importing cloudio, so that it runs first" if shutting_down() else
               "a filesystem made on a loop closed since: make a new one (cloudio.filesystem())")
        raise LoopNotRunningError(
            f"the event loop cloudio runs its requests on ({_name_of(loop)}) is {state}: this call could never end. "
            f"{why}")
    resolving_at_exit(loop)
    if running is loop:  # it would wait for itself for good: zarr's and fsspec's sync refuse it, so does this
        coro.close()
        raise NotImplementedError(
            f"{SYNC_REFUSED}: a synchronous cloudio call made on the event loop it runs "
            "its requests on would wait for itself for good; make it from another thread (asyncio.to_thread)")
    ended = threading.Event()

    async def whole() -> T:
        try:
            return await coro
        finally:
            ended.set()

    future = asyncio.run_coroutine_threadsafe(whole(), loop)
    try:
        return future.result()
    except BaseException:
        future.cancel()
        ended.wait(CANCEL_WAIT)
        raise


#: seconds a loop not running at interpreter shutdown is given to start (its thread just started: Python 3.11)
_START_WAIT = 1.0


def runs_soon(loop: asyncio.AbstractEventLoop, thread: threading.Thread | None = None) -> bool:
    """Whether ``loop`` runs, or starts within :data:`_START_WAIT` (``thread``: the one meant to run it, when
    known: one never started never will). Why wait: zarr starts its loop's thread as it makes the loop, and the
    loop runs a moment later; from Python 3.12 no thread starts at shutdown, and zarr's loop, made after its
    clean-up closed the last one, is then run by none, for good."""
    deadline = time.monotonic() + _START_WAIT
    while not loop.is_running():
        if loop.is_closed() or time.monotonic() > deadline or (thread is not None and thread.ident is None):
            return False
        time.sleep(0.01)
    return True


def _name_of(loop: asyncio.AbstractEventLoop) -> str:
    """Whose loop ``loop`` is, for a message: zarr's or fsspec's, else just a loop."""
    import sys

    for module, name in (("zarr.core.sync", "zarr's"), ("fsspec.asyn", "fsspec's")):
        held = getattr(sys.modules.get(module), "loop", None)
        if isinstance(held, list) and loop in held:
            return name
    return "a loop given to cloudio"


def cores() -> int:
    """The cores this process may run on."""
    return (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()) or 1


def sync_to_the_end(loop: asyncio.AbstractEventLoop | None, func: Callable[..., Coroutine[Any, Any, T]],
                    *args: Any, **kwargs: Any) -> T:
    """fsspec's ``sync(loop, func, *args, **kwargs)`` (for a filesystem's sync methods), except that an
    interrupted wait cancels the coroutine and waits for it to end first (:func:`run_to_the_end`): fsspec's
    leaves it running on its IO loop. Refused, as by fsspec, on a closed loop or from the loop's own thread."""
    if loop is None or loop.is_closed():
        raise RuntimeError("Loop is not running")
    return run_to_the_end(loop, func(*args, **kwargs))
