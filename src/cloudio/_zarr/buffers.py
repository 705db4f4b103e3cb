"""Shard buffers and output arrays kept between whole-array reads, for a few seconds.

Why: a read of a sharded array holds one buffer of a whole shard per
worker thread (10 x 16 MiB for layout a of ``benchmarks/bench_peers.py``).
Fresh ones are first-touched page by page while the bytes arrive, and in a
VM a first touch may also be a fault of the host, whose cost comes and goes:
reads of layout a took 256 ms (176 to 629) with fresh buffers against
173 ms (163 to 238) with the last read's, on the same emulator in the same
run; in ``benchmarks/bench_peers.py``, whose rounds come about 13 s apart,
layout a's reads moved 606 MiB/s when the pool let its buffers go after
5 s and 1,117 MiB/s when it kept them. Buffers are kept up to
:data:`KEEP_BYTES` in all (:meth:`BufferPool._make_room` says which go
first), and given back to the system :data:`KEEP_SECONDS` after the last
one was returned, so a process that stops reading holds nothing for long.
Writes of large shards borrow them too, and give them back only when
every upload was answered: after a failure, an upload
cancelled part way may still be flushed to the socket from its buffer by
the transport, which must then not be anyone else's. (In
``benchmarks/bench_peers.py``, layout b's writes went from 0.84 to 0.88
of tensorstore's speed to 0.91 to 0.92 with borrowed buffers, two runs
each.)

The memory of a large read's output array comes back the same way
(:data:`outputs`, :func:`lend`), once the caller holds no reference to it
any more: a fresh 256 MiB output is 65,536 first touches of 4 KiB pages,
or 128 of 2 MiB huge pages that the kernel may first have to compact
memory for. In ``benchmarks/bench_peers.py``, whose other sides leave the
process's memory fragmented, mapping a fresh output for layout a took
100 to 560 ms of a 180 to 580 ms read; a kept one, none. This is what the
C library's allocator does for the plain GETs of the transport ceiling,
whose 16 MiB buffers come back from its heap already mapped. The output
given back last is kept: when the smallest kept went first, two outputs of
layout a, all this pool holds, pushed out every output of the layout b
reads after them, and each of those mapped a fresh one (in runs of 8
rounds of layouts a and b, cloudio read layout b at 875 MiB/s to
tensorstore's 970 that way, and at 983 to 1,018 keeping the last; 1,041 to
1,049 in a run of layout b alone).
"""

from __future__ import annotations

import ctypes
import threading
import time
import weakref

import numpy as np
from numpy.typing import DTypeLike

from cloudio._threads import hold_across_fork, started

#: the most the pool keeps, all buffers together
KEEP_BYTES = 256 << 20
#: seconds after the last return when the pool lets its buffers go (a keep-alive pool's order of time:
#: reads in a loop, or one a notebook cell after another, find them; an idle process holds nothing for long)
KEEP_SECONDS = 30.0


class BufferPool:
    """Byte buffers lent to one worker at a time: :meth:`take`, then :meth:`give` back."""

    def __init__(self, keep_bytes: int = KEEP_BYTES, keep_seconds: float = KEEP_SECONDS) -> None:
        self.keep_bytes = keep_bytes
        self.keep_seconds = keep_seconds
        self._free: list[np.ndarray] = []
        self._lock = threading.Lock()
        self._last = 0.0  # time.monotonic() of the last give
        self._timer: threading.Timer | None = None

    def take(self, nbytes: int) -> np.ndarray:
        """A buffer of exactly ``nbytes`` (a kept one at most twice as large, else a new one)."""
        kept = self.take_kept(nbytes)
        return np.empty(nbytes, dtype="u1") if kept is None else kept

    def take_kept(self, nbytes: int) -> np.ndarray | None:
        """A kept buffer cut to exactly ``nbytes`` (one at most twice as large), or None."""
        with self._lock:
            fits = [i for i, b in enumerate(self._free) if nbytes <= len(b) <= 2 * nbytes]
            if not fits:
                return None
            best = min(fits, key=lambda i: len(self._free[i]))
            return self._free.pop(best)[:nbytes]

    def give(self, buf: np.ndarray, wait: bool = True) -> None:
        """Take back a buffer :meth:`take` lent (nothing may use it afterwards).

        ``wait=False``: drop it instead while the pool is busy (a finalizer
        may run in the middle of the pool's own work, on the thread that
        holds its lock).
        """
        base = buf.base if isinstance(buf.base, np.ndarray) else buf
        if not self._lock.acquire(blocking=wait):
            return
        try:
            self._free.append(base)  # in the order given back
            self._make_room()
            self._last = time.monotonic()
            if self._timer is None and self._free:
                self._start(self.keep_seconds)
        finally:
            self._lock.release()

    def _make_room(self) -> None:
        """Let buffers go until at most :attr:`keep_bytes` are kept (the lock held): the one given back last
        stays (what a process reads now, it reads next; one larger than the pool keeps goes, alone), and of
        the others the smallest that makes room alone goes, else the largest (among equals, the first given
        back). Greedy: it may let go more than the fewest bytes that would do."""
        if len(self._free[-1]) > self.keep_bytes:
            self._free.pop()
            return
        over = sum(len(b) for b in self._free) - self.keep_bytes
        while over > 0:
            others = range(len(self._free) - 1)
            enough = [i for i in others if len(self._free[i]) >= over]
            drop = (min(enough, key=lambda i: len(self._free[i])) if enough
                    else max(others, key=lambda i: len(self._free[i])))
            over -= len(self._free.pop(drop))

    def clear(self) -> None:
        """Let every kept buffer go."""
        with self._lock:
            self._free.clear()
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

    def kept(self) -> int:
        """Bytes kept now."""
        with self._lock:
            return sum(len(b) for b in self._free)

    def _start(self, seconds: float) -> None:
        timer = threading.Timer(seconds, self._expire)
        timer.daemon = True
        # at interpreter shutdown from Python 3.12 no timer starts (an atexit handler's write gave its buffers
        # back): they stay, for the handler's next read or write, and go with the process
        self._timer = timer if started(timer) else None

    def _expire(self) -> None:
        with self._lock:
            self._timer = None
            left = self._last + self.keep_seconds - time.monotonic()
            if left > 0:  # given back since: wait the rest
                self._start(left)
            else:
                self._free.clear()


#: the pool of the process's whole-array reads (:func:`cloudio._zarr.shard_codec.read`)
shard_buffers = BufferPool()

#: the most the pool of outputs keeps: two arrays of the size of ``benchmarks/bench_peers.py`` layout a
OUTPUT_KEEP_BYTES = 512 << 20

#: the memory of large outputs of whole-array reads, back from callers that dropped them (:func:`lend`)
outputs = BufferPool(keep_bytes=OUTPUT_KEEP_BYTES)


def _renew_locks() -> None:
    """In a forked child: the pools' locks anew, and no timer (its thread is not in the child, which would never
    start another: its next give starts one, so what the child keeps goes after :data:`KEEP_SECONDS`). What they
    keep stays: the forking thread held every lock, so no pool was half-changed."""
    for pool in (shard_buffers, outputs):
        pool._lock = threading.Lock()
        pool._timer = None


# held across a fork: a thread lending or taking back a buffer then is not in the child, and a lock copied held by it
# would stop the child's next whole-array read or write of large shards for good (in-memory work under each)
hold_across_fork("zarr buffers", lambda: (shard_buffers._lock, outputs._lock), _renew_locks)


def lend(buf: np.ndarray, shape: tuple[int, ...], dtype: DTypeLike, pool: BufferPool = outputs) -> np.ndarray:
    """An array of ``shape`` and ``dtype`` over ``buf``, whose memory goes back to ``pool`` when the last
    array or view over it is gone (then nothing can reach it any more).

    The array's memory is owned by a ctypes array (numpy arrays and views keep their owner alive, and a
    ctypes array, unlike an ndarray, can tell when it dies: a weak reference's finalizer).
    """
    owner = (ctypes.c_char * len(buf)).from_buffer(memoryview(buf))  # type: ignore[arg-type]  # numpy declares __buffer__ for Python >= 3.12 only
    weakref.finalize(owner, pool.give, buf, False).atexit = False
    out: np.ndarray = np.frombuffer(memoryview(owner), dtype=dtype).reshape(shape)
    return out
