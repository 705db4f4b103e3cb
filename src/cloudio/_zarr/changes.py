"""The store changes of one write, stopped before its failure reaches the caller.

Why: zarr writes a region's chunks as tasks on its event loop and raises
the first failure while the others still run; Dask does the same with its
chunk tasks. A chunk upload waiting to retry, or a task still computing its
chunk, then writes after ``to_zarr`` raised, and may land on a store the
caller has since rewritten: stale data, with no marker left to say so.
Inside :func:`stopped_on_failure`, every change a store makes
(:func:`stops_with_its_write`: uploads, deletes) runs as part of the
write; when the block raises, those still running are cancelled and
waited for, and none starts afterwards.

A change finds its write in one of two ways. In this process, through a
context variable, which zarr's ``sync`` carries from the calling thread into
the tasks it starts (``loop.call_soon_threadsafe`` copies the caller's
context), as does Dask's threaded scheduler into its task threads. In
another process (a ``dask.distributed`` worker), no context arrives: there
the store itself names the write (:meth:`_Changes.carried`, kept through
pickling), and a failed write tells every worker of the cluster to stop it
and waits for their answers (:func:`_stop_on_cluster`) before it raises.

A request already sent when its task is cancelled may still be carried
out by the server: the upload journals it as an unknown outcome
(:func:`cloudio._gcs.transfer.put_verified`), and the write's marker stays.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import sys
import threading
import uuid
import weakref
from collections import OrderedDict
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, ParamSpec, TypeVar, cast

from cloudio._threads import hold_across_fork

log = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")
S = TypeVar("S")

#: how long a failed write waits for its cancelled changes to end (each ends at its next await)
_STOP_SECONDS = 30.0
#: writes stopped in this process that are remembered, so a change of theirs starting later is refused
_STOPPED_KEPT = 4096


class _Changes:
    """The tasks changing a store on behalf of one write, in this process."""

    def __init__(self, write: str, *, stopped: bool = False) -> None:
        self.write = write  # the write's name, the same in every process
        self.shipped = False  # a store naming it was pickled: other processes may change the store for it
        self._lock = threading.Lock()
        self._tasks: set[asyncio.Task[object]] = set()
        self._stopped = stopped

    @contextmanager
    def running(self) -> Iterator[None]:
        """The current task changes the store for this write; after :meth:`stop` none may start."""
        task = asyncio.current_task()
        with self._lock:
            if self._stopped:
                raise asyncio.CancelledError("the write this change belongs to has failed")
            mine = task if task is not None and task not in self._tasks else None  # an outer change holds it
            if mine is not None:
                self._tasks.add(mine)
        try:
            yield
        finally:
            if mine is not None:
                with self._lock:
                    self._tasks.discard(mine)

    def stop(self) -> int:
        """Cancel the changes still running and wait until each has ended; refuse any later one.

        Returns how many were cancelled."""
        with self._lock:
            self._stopped = True
            tasks = list(self._tasks)
        by_loop: dict[asyncio.AbstractEventLoop, list[asyncio.Task[object]]] = {}
        for task in tasks:
            by_loop.setdefault(task.get_loop(), []).append(task)
        for loop, some in by_loop.items():
            log.debug("stopping %d store changes of a failed write", len(some))
            try:
                asyncio.run_coroutine_threadsafe(_cancelled(some), loop).result(_STOP_SECONDS)
            except (TimeoutError, RuntimeError) as e:  # a loop closed meanwhile has nothing left to run
                log.warning("%d store changes of a failed write did not end within %.0f s (%s)", len(some),
                            _STOP_SECONDS, e)
        return len(tasks)

    def unheard(self) -> bool:
        """Whether other processes may have changed the store for this write without this process hearing of
        it: the store went to them (pickled; Dask also pickles it here to name a task), and Dask's scheduler
        is not one known to run tasks here (the threaded one on threads, the synchronous one) nor a
        ``dask.distributed`` client :func:`cloudio.dask.install` relays records for. A failed write then
        keeps its mark: what they stored is not known here."""
        if not self.shipped:
            return False
        try:
            import dask
            import dask.base
            import dask.local
            import dask.threaded

            scheduler = dask.base.get_scheduler()
            pool = dask.config.get("pool", None)
        except Exception:  # no scheduler to ask: not known to be heard
            return True
        from multiprocessing.pool import ThreadPool

        client = _distributed_client(scheduler)
        if client is not None:
            installed = sys.modules.get("cloudio.dask")
            return installed is None or client not in installed._installed
        if scheduler is dask.local.get_sync:
            return False
        if scheduler in (None, dask.threaded.get):  # (None: the collection's own, threaded for arrays)
            return pool is not None and not isinstance(pool, ThreadPoolExecutor | ThreadPool)
        submit = scheduler.args[0] if isinstance(scheduler, functools.partial) and scheduler.args else None
        return not isinstance(getattr(submit, "__self__", None), ThreadPoolExecutor)  # (an executor given)

    def carried(self, store: S) -> S:
        """``store`` (a zarr store), its changes part of this write in every process it is unpickled in.

        Why: a Dask chunk task on a ``dask.distributed`` worker writes
        through a copy of the store pickled with the graph; the context
        variable stays behind in this process. The copy shares this store's
        state here (its attributes are the same objects), and names the
        write when pickled.
        """
        return _naming(store, self.write)


def _distributed_client(scheduler: Any) -> Any | None:
    """The ``dask.distributed`` client whose method ``scheduler`` (Dask's scheduler in force) is, or None:
    another scheduler, or ``distributed`` not imported (then no client exists, and importing it is slow)."""
    distributed = sys.modules.get("distributed")
    client = getattr(scheduler, "__self__", None)
    return client if distributed is not None and isinstance(client, distributed.Client) else None


async def _cancelled(tasks: list[asyncio.Task[object]]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.wait(tasks)


_current: contextvars.ContextVar[_Changes | None] = contextvars.ContextVar("cloudio_write_changes", default=None)

_lock = threading.Lock()
#: the writes with a change under way in this process (and the write in force of this process's own calls)
_writes: weakref.WeakValueDictionary[str, _Changes] = weakref.WeakValueDictionary()
#: writes stopped here, oldest first
_stopped: OrderedDict[str, None] = OrderedDict()


def _fork_locks() -> list[threading.Lock]:
    """The module's lock, then each write's (taken one at a time: none is taken under another)."""
    changes = [c for c in (r() for r in _writes.valuerefs()) if c is not None]  # a list made at once: no lock
    return [_lock, *(c._lock for c in changes)]


def _renew_locks() -> None:
    """In a forked child: the locks anew. A write's changes still listed ran on event loops whose threads are not
    in the child: its stop cancels tasks that never end there (it waits :data:`_STOP_SECONDS`, then warns)."""
    global _lock
    _lock = threading.Lock()
    for ref in _writes.valuerefs():
        changes = ref()
        if changes is not None:
            changes._lock = threading.Lock()


# held across a fork: a thread starting or ending a store change (or a write) then is not in the child, and a lock
# copied held by it would stop the child's next write through a Zarr store for good (in-memory work under them)
hold_across_fork("zarr changes", _fork_locks, _renew_locks)


def _joined(write: str) -> _Changes:
    """The changes of ``write`` in this process (refused from the start when it was stopped here)."""
    with _lock:
        changes = _writes.get(write)
        if changes is None:
            changes = _writes[write] = _Changes(write, stopped=write in _stopped)
        return changes


def stop_write(write: str) -> int:
    """Refuse every later change of ``write`` in this process, cancel those under way and wait for them."""
    with _lock:
        _stopped[write] = None
        while len(_stopped) > _STOPPED_KEPT:
            _stopped.popitem(last=False)
        changes = _writes.get(write)
    return changes.stop() if changes is not None else 0


async def _stop_on_worker(write: str) -> int:
    """:func:`stop_write` on a Dask worker, off the worker's event loop (its heartbeats go on meanwhile)."""
    return await asyncio.to_thread(stop_write, write)


def _stop_on_cluster(changes: _Changes) -> None:
    """Stop ``changes``' write on every worker of the ``dask.distributed`` cluster that computed it, and wait.

    Why: Dask raises the first failed task while the others still run on
    their workers, and releasing their futures does not stop a running
    task; a task whose chunk is computed after the call returned would
    upload it then. Each worker answers once it refuses the write's later
    changes and the ones under way have ended. Only for a write whose store
    was pickled (a graph sent to the cluster) with a distributed client as
    Dask's scheduler: one round trip to each worker, on failure only.
    """
    if not changes.shipped or "distributed" not in sys.modules:
        return
    try:
        import dask.base

        client = _distributed_client(dask.base.get_scheduler())
        if client is None or client.asynchronous:
            return
        answers = client.run(_stop_on_worker, changes.write, on_error="return")
    except Exception as e:  # the failure being raised is the caller's news; this one is only logged
        log.warning("could not stop the chunk writes of a failed write on the Dask cluster: %s", e)
        return
    for worker, answer in answers.items():
        if isinstance(answer, BaseException):
            log.warning("%s: could not stop the chunk writes of a failed write: %s", worker, answer)
        elif answer:
            log.debug("%s: stopped %d store changes of a failed write", worker, answer)


_carrier_classes: dict[type[Any], type[Any]] = {}


def _carrier_class(base: type[Any]) -> type[Any]:
    """The subclass of store class ``base`` whose instances name a write (:meth:`_Changes.carried`)."""
    with _lock:
        made = _carrier_classes.get(base)
        if made is None:
            made = _carrier_classes[base] = type(base.__name__, (_Carrier, base),
                                                 {"_cloudio_base": base, "__module__": base.__module__})
        return made


class _Carrier:
    """Mixed into a store class: the store names the write its changes belong to, also once pickled."""

    _cloudio_base: type[Any]
    _cloudio_write: str

    def __reduce__(self) -> tuple[Any, ...]:
        rebuild, args, *state = cast(tuple[Any, ...], super().__reduce__())[:3]
        if rebuild is type(self):  # the base's own reduction names this (unimportable) class: its base instead
            rebuild = self._cloudio_base
        with _lock:
            changes = _writes.get(self._cloudio_write)
        if changes is not None:
            changes.shipped = True
        return _carried, (rebuild, args, self._cloudio_write, *state)

    def _plain(self) -> Any:
        """This store as its base class: what it compares (and hashes) as."""
        plain = object.__new__(self._cloudio_base)
        plain.__dict__.update(self.__dict__)
        del plain.__dict__["_cloudio_write"]
        return plain

    def __eq__(self, other: object) -> bool:  # zarr's stores compare their types: as the store passed in
        return bool(self._plain() == (other._plain() if isinstance(other, _Carrier) else other))

    def __hash__(self) -> int:
        return hash(self._plain())

    def _with_store(self, store: Any) -> Any:
        new = cast(Any, super())._with_store(store)  # zarr's WrapperStore: with_read_only, __enter__
        new._cloudio_write = self._cloudio_write
        return new


def _naming(store: S, write: str) -> S:
    """A copy of ``store`` that names ``write``; its attributes are the same objects as ``store``'s."""
    base = cast(type[Any], getattr(type(store), "_cloudio_base", type(store)))
    new = object.__new__(_carrier_class(base))
    new.__dict__.update(store.__dict__)
    new._cloudio_write = write
    return cast(S, new)


def _carried(rebuild: Callable[..., Any], args: tuple[Any, ...], write: str, state: dict[str, Any] | None = None,
             ) -> Any:
    """A store unpickled in any process, its changes part of ``write`` there (``state``: what its own pickling
    carried besides, set on it as pickle would)."""
    store = rebuild(*args)
    store.__dict__.update(state or {})
    return _naming(store, write)


@contextmanager
def stopped_on_failure() -> Iterator[_Changes]:
    """Run a write whose store changes are stopped before its failure leaves the block, in this process
    and on the Dask cluster its stores were sent to (:meth:`_Changes.carried`)."""
    changes = _Changes(uuid.uuid4().hex)
    with _lock:
        _writes[changes.write] = changes
    token = _current.set(changes)
    try:
        yield changes
    except BaseException:
        stop_write(changes.write)
        _stop_on_cluster(changes)
        raise
    finally:
        _current.reset(token)


def stops_with_its_write(
    method: Callable[P, Coroutine[Any, Any, R]],
) -> Callable[P, Coroutine[Any, Any, R]]:
    """A store method that changes objects: part of the write in force, if any (:func:`stopped_on_failure`),
    else of the write its store names (:meth:`_Changes.carried`)."""

    @functools.wraps(method)
    async def changing(*args: P.args, **kwargs: P.kwargs) -> R:
        changes = _current.get()
        if changes is None:
            write = getattr(args[0], "_cloudio_write", None) if args else None
            if write is None:
                return await method(*args, **kwargs)
            changes = _joined(write)
        with changes.running():
            return await method(*args, **kwargs)

    return changing
