"""Thread pools made on first use and kept for the life of the process.

Why kept: each thread of the data path holds keep-alive connections of its
own (:mod:`cloudio._gcs.fast`), which a fresh pool per call would open again.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor


class KeptPool:
    """A :class:`~concurrent.futures.ThreadPoolExecutor` of ``workers()`` threads named ``name``, made on
    the first call and returned by every later one."""

    def __init__(self, workers: Callable[[], int], name: str) -> None:
        self._workers = workers
        self._name = name
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    def __call__(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self._workers(), thread_name_prefix=self._name)
            return self._pool


def cores() -> int:
    """The cores this process may run on."""
    return (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()) or 1
