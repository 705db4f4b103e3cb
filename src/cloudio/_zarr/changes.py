"""The store changes of one write, stopped before its failure reaches the caller.

Why: zarr writes a region's chunks as tasks on its event loop and raises
the first failure while the others still run. A chunk upload waiting to
retry then goes out after ``to_zarr`` raised, and may land on a store the
caller has since rewritten: stale data, with no marker left to say so.
Inside :func:`stopped_on_failure`, every change a store makes
(:func:`stops_with_its_write`: uploads, deletes) runs as part of the
write; when the block raises, those still running are cancelled and
waited for, and none starts afterwards. The write is found through a
context variable, which zarr's ``sync`` carries from the calling thread
into the tasks it starts (``loop.call_soon_threadsafe`` copies the
caller's context).

A request already sent when its task is cancelled may still be carried
out by the server: the upload journals it as an unknown outcome
(:func:`cloudio._gcs.transfer.put_verified`), and the write's marker stays.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import threading
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from typing import Any, ParamSpec, TypeVar

log = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")

#: how long a failed write waits for its cancelled changes to end (each ends at its next await)
_STOP_SECONDS = 30.0


class _Changes:
    """The tasks changing a store on behalf of one write."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tasks: set[asyncio.Task[object]] = set()
        self._stopped = False

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

    def stop(self) -> None:
        """Cancel the changes still running and wait until each has ended; refuse any later one."""
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


async def _cancelled(tasks: list[asyncio.Task[object]]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.wait(tasks)


_current: contextvars.ContextVar[_Changes | None] = contextvars.ContextVar("cloudio_write_changes", default=None)


@contextmanager
def stopped_on_failure() -> Iterator[None]:
    """Run a write whose store changes are stopped before its failure leaves the block."""
    changes = _Changes()
    token = _current.set(changes)
    try:
        yield
    except BaseException:
        changes.stop()
        raise
    finally:
        _current.reset(token)


def stops_with_its_write(
    method: Callable[P, Coroutine[Any, Any, R]],
) -> Callable[P, Coroutine[Any, Any, R]]:
    """A store method that changes objects: part of the write in force, if any (:func:`stopped_on_failure`)."""

    @functools.wraps(method)
    async def changing(*args: P.args, **kwargs: P.kwargs) -> R:
        changes = _current.get()
        if changes is None:
            return await method(*args, **kwargs)
        with changes.running():
            return await method(*args, **kwargs)

    return changing
