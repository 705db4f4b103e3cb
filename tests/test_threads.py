"""8 threads interleave writes and reads on shared prefixes: no read is ever stale.

A read is stale when it returns a version older than the newest write that
had *completed* before the read began (or fails to find an object whose
creation had completed), or anything but one whole version. Each object has
one writer thread, so "newest" is well defined; every thread reads every
object.

One exception is counted apart, not as stale: when another write of the same
object completes *while* a dataset is open, GDAL (which reads lazily) may
read the rest of it from the new bytes, a mix of both versions. That is the
hazard of reading an object while it is replaced; cloudio's guarantee is
about opens that begin after a write completed.
"""

from __future__ import annotations

import random
import threading

import numpy as np
import pytest
from rasterio.errors import RasterioIOError
from rasterio.io import MemoryFile

import cloudio

THREADS = 8
WRITERS = 4
OPS = 14


def tif(version: int) -> bytes:
    size = 16 + (version % 4) * 16  # sizes go up and down between versions
    with MemoryFile() as mem:
        with mem.open(driver="GTiff", width=size, height=size, count=1, dtype="uint8",
                      tiled=True, blockxsize=16, blockysize=16) as ds:
            ds.write(np.full((1, size, size), version, "uint8"))
        return mem.read()


@pytest.mark.timeout(240)
def test_eight_threads_no_stale_reads(gcs_bucket: str) -> None:
    fs = cloudio.filesystem(gcs_bucket)
    prefixes = [f"{gcs_bucket}/p{i}" for i in range(2)]
    # object -> newest version whose write completed; each writer owns two objects
    committed: dict[str, int] = {}
    writes_done: dict[str, int] = {}  # completed writes per object
    writes_started: dict[str, int] = {}
    owned: dict[int, list[str]] = {w: [f"{prefixes[w % 2]}/w{w}-{j}.tif" for j in range(2)] for w in range(WRITERS)}
    for keys in owned.values():
        for key in keys:
            fs.pipe(key, tif(1))
            committed[key] = 1
    lock = threading.Lock()
    stale: list[str] = []
    errors: list[BaseException] = []
    reads = [0]
    concurrent = [0]
    start = threading.Barrier(THREADS)

    def read_one(rng: random.Random) -> None:
        with lock:
            key = rng.choice(sorted(committed))
            floor = committed[key]
            w0 = writes_done.get(key, 0)  # a write is concurrent if it started before the read ended
            # and had not completed when it began: writes_started at the end > w0
        try:
            with cloudio.open(key) as ds:
                a = ds.read()
        except FileNotFoundError as e:
            with lock:
                stale.append(f"{key}: not found after its creation completed ({e})")
            return
        except RasterioIOError as e:  # "Read failed": a torn header/tile mix
            with lock:
                if writes_started.get(key, 0) != w0:
                    concurrent[0] += 1  # overwritten while open: see the module docstring
                else:
                    stale.append(f"{key}: {e} with no write completing meanwhile")
            return
        v = int(a[0, 0, 0])
        size = 16 + (v % 4) * 16
        ok = v >= floor and a.shape == (1, size, size) and int(a.min()) == int(a.max()) == v
        with lock:
            reads[0] += 1
            if not ok and writes_started.get(key, 0) != w0:
                concurrent[0] += 1  # overwritten while open: see the module docstring
            elif not ok:
                stale.append(f"{key}: read version {v} shape {a.shape} after version {floor} was written")

    def work(t: int) -> None:
        rng = random.Random(t)
        version = {k: 1 for k in owned.get(t, [])}
        new = 0
        try:
            start.wait()
            for _ in range(OPS):
                if t < WRITERS and rng.random() < 0.4:
                    if rng.random() < 0.3:  # a new name in a shared prefix
                        new += 1
                        key = f"{prefixes[new % 2]}/new-{t}-{new}.tif"
                        v = 1
                    else:
                        key = rng.choice(owned[t])
                        version[key] += 1
                        v = version[key]
                    with lock:
                        writes_started[key] = writes_started.get(key, 0) + 1
                    fs.pipe(key, tif(v))
                    with lock:
                        committed[key] = v
                        writes_done[key] = writes_done.get(key, 0) + 1
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
    assert stale == []
    assert reads[0] >= THREADS * OPS // 2
    assert concurrent[0] <= reads[0] // 4, concurrent
    # and a final pass sees every last version
    for key, v in sorted(committed.items()):
        with cloudio.open(key) as ds:
            assert int(ds.read()[0, 0, 0]) == v
