"""The shard buffers whole-array reads borrow and give back (cloudio._zarr.buffers)."""

from __future__ import annotations

import threading
import time

import numpy as np

from cloudio._zarr.buffers import BufferPool


def _address(a: np.ndarray) -> int:
    return int(a.__array_interface__["data"][0])


def test_a_buffer_given_back_is_lent_again_at_the_size_asked() -> None:
    pool = BufferPool(keep_bytes=1 << 20, keep_seconds=60)
    a = pool.take(1000)
    assert len(a) == 1000
    pool.give(a)
    b = pool.take(600)  # at most twice as large: the kept one, cut to size
    assert len(b) == 600 and _address(b) == _address(a)
    pool.give(b)
    c = pool.take(400)  # more than twice: a new one
    assert _address(c) != _address(a)
    d = pool.take(1001)  # larger than any kept: a new one
    assert len(d) == 1001 and _address(d) != _address(a)
    pool.clear()


def test_buffers_lent_at_once_are_distinct() -> None:
    pool = BufferPool(keep_bytes=1 << 24, keep_seconds=60)
    for _ in range(4):
        pool.give(pool.take(4096))
    got: list[np.ndarray] = []
    lock = threading.Lock()

    def borrow() -> None:
        buf = pool.take(4096)
        with lock:
            got.append(buf)

    threads = [threading.Thread(target=borrow) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({_address(b) for b in got}) == 8  # never one buffer to two borrowers
    pool.clear()


def test_the_pool_keeps_at_most_its_bytes_and_lets_them_go_when_idle() -> None:
    pool = BufferPool(keep_bytes=10_000, keep_seconds=0.2)
    bufs = [pool.take(4000) for _ in range(4)]
    for b in bufs:
        pool.give(b)
    assert pool.kept() == 8000  # the cap: two of the four
    deadline = time.monotonic() + 10
    while pool.kept() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pool.kept() == 0  # let go a little after the last give


def test_a_lent_array_comes_back_when_its_last_view_is_gone() -> None:
    from cloudio._zarr.buffers import lend

    pool = BufferPool(keep_bytes=1 << 20, keep_seconds=60)
    buf = pool.take(4096)
    out = lend(buf, (32, 32), "f4", pool)
    assert out.shape == (32, 32) and out.flags.writeable and out.ctypes.data == _address(buf)
    view = out[3:5]
    del out, buf
    assert pool.kept() == 0  # a view still holds it
    del view
    assert pool.kept() == 4096
    pool.clear()


def test_an_array_dropped_while_its_pool_is_busy_is_let_go_not_waited_for() -> None:
    """The finalizer of a lent array may run on the thread that holds the pool's lock (a garbage
    collection inside the pool's own work): it must neither wait for that lock nor reenter it."""
    from cloudio._zarr.buffers import lend

    pool = BufferPool(keep_bytes=1 << 20, keep_seconds=60)
    out = lend(pool.take(4096), (1024,), "f4", pool)
    with pool._lock:  # busy, on this very thread
        del out  # would deadlock if the finalizer waited
    assert pool.kept() == 0
    pool.clear()


def test_a_full_pool_keeps_the_buffer_given_back_last() -> None:
    """A process that read large arrays and now reads smaller ones: the pool, full of the large ones' memory,
    must keep the small one just given back (and lend it to the next read of that size), not drop it
    because it is the smallest."""
    pool = BufferPool(keep_bytes=9000, keep_seconds=60)
    large = [pool.take(4000) for _ in range(2)]
    for b in large:
        pool.give(b)
    small = pool.take(1500)  # the large ones are more than twice as large: a new one
    assert all(_address(small) != _address(b) for b in large)
    pool.give(small)
    assert pool.kept() == 5500  # one large one went, the first given back
    again = pool.take(1500)
    assert _address(again) == _address(small)
    assert _address(pool.take(4000)) == _address(large[1])
    pool.clear()


def test_a_full_pool_lets_a_small_buffer_go_for_a_small_one_not_the_large_one() -> None:
    """Room for a small buffer is made by letting another small one go, not a large one that many small
    ones came back after (a process that reads a large array, then holds several smaller ones at once)."""
    pool = BufferPool(keep_bytes=9000, keep_seconds=60)
    large = pool.take(4000)
    pool.give(large)
    small = [pool.take(1000) for _ in range(6)]  # the large one is more than twice as large: new ones
    for b in small:
        pool.give(b)
    assert pool.kept() == 9000  # one small one went
    assert _address(pool.take(4000)) == _address(large)
    assert _address(pool.take(1000)) in {_address(b) for b in small[1:]}
    pool.clear()


def test_a_buffer_larger_than_the_pool_keeps_is_let_go_alone() -> None:
    """The others stay: the pool held no more than it keeps before it came back."""
    pool = BufferPool(keep_bytes=9000, keep_seconds=60)
    kept = pool.take(4000)
    pool.give(kept)
    pool.give(pool.take(10_000))
    assert pool.kept() == 4000
    assert _address(pool.take(4000)) == _address(kept)
    pool.clear()
