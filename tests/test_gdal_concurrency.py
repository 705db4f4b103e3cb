"""GDAL reads in several threads while another thread overwrites the same objects.

GDAL 3.10 and 3.12 abort the process ("free(): invalid pointer", "double free
or corruption") when ``/vsigs/`` handles of one URL see two versions of the
object: I/O while its content changes on the server, or a handle opened before
the change reading after it, once the cache was cleared. A read overlapping an
overwrite could also return pixels from two versions (the old header and
offsets, the new bytes). The workload runs in a subprocess, so that a crash is
seen as a negative return code instead of killing pytest.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from rasters import tif

from cloudio.emulator import Emulator

WORKLOAD = r'''
import json, random, sys, threading, time
import numpy as np
import cloudio
from affine import Affine

bucket, seconds, how = sys.argv[1], float(sys.argv[2]), sys.argv[3]
fs = cloudio.filesystem(bucket)
urls = [f"{bucket}/c/t{i}.tif" for i in range(3)]
existed = set()  # every version written (added before its write starts)
versions = iter(range(1, 10**9))
lock = threading.Lock()
out = {"reads": 0, "writes": 0, "torn": [], "stale": 0, "errors": []}


def write(url, v):
    size = 16 + 8 * (v % 2)  # the layout changes between versions
    existed.add(v)
    profile = dict(driver="GTiff", width=size, height=size, count=1, dtype="uint32",
                   transform=Affine(1, 0, 0, 0, -1, size))
    if how == "open":
        with cloudio.open(url, "w", **profile) as ds:
            ds.write(np.full((1, size, size), v, "uint32"))
        return
    from rasterio.io import MemoryFile
    with MemoryFile() as mem:
        with mem.open(**profile) as ds:
            ds.write(np.full((1, size, size), v, "uint32"))
        fs.pipe(url, mem.read())


for url in urls:
    write(url, next(versions))
t0 = time.monotonic()


def reader(k):
    rng = random.Random(k)
    while time.monotonic() - t0 < seconds:
        url = rng.choice(urls)
        try:
            with cloudio.open(url) as ds:
                a = ds.read(1)
        except cloudio.StaleDatasetError:
            with lock:
                out["stale"] += 1
            continue
        except Exception as e:
            with lock:
                out["errors"].append(f"{type(e).__name__}: {e}")
            continue
        with lock:
            out["reads"] += 1
            if a.min() != a.max() or int(a.flat[0]) not in existed:
                out["torn"].append([url, int(a.min()), int(a.max())])


def writer():
    rng = random.Random(99)
    while time.monotonic() - t0 < seconds:
        write(rng.choice(urls), next(versions))
        with lock:
            out["writes"] += 1


threads = [threading.Thread(target=reader, args=(k,)) for k in range(3)] + [threading.Thread(target=writer)]
for t in threads:
    t.start()
for t in threads:
    t.join()
out["errors"] = out["errors"][:5]
out["torn"] = out["torn"][:5]
print(json.dumps(out))
'''


def run_workload(emulator: Emulator, bucket: str, tmp_path: Path, how: str) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "workload.py"
    script.write_text(WORKLOAD)
    env = {**os.environ, "STORAGE_EMULATOR_HOST": emulator.url}
    return subprocess.run([sys.executable, str(script), bucket, "10", how], capture_output=True, text=True, env=env,
                          timeout=150)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("how", ["open", "pipe"], ids=["cloudio.open-w", "fsspec-pipe"])
def test_reads_racing_overwrites_neither_crash_nor_tear(
    gcs_emulator: Emulator, gcs_bucket: str, tmp_path: Path, how: str
) -> None:
    """Overwrites through cloudio.open(..., "w") or the tracked filesystem's pipe, reads through cloudio.open."""
    r = run_workload(gcs_emulator, gcs_bucket, tmp_path, how)
    assert r.returncode == 0, f"workload exited with {r.returncode}: {r.stderr[-2000:]}"
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["errors"] == []
    assert out["torn"] == [], f"reads mixing two versions: {out}"
    assert out["writes"] >= 10 and out["reads"] >= 100, out


# -- a dataset open across an overwrite made in this process --------------------------------------


def test_read_after_overwrite_in_same_layout_returns_the_new_version(gcs_bucket: str) -> None:
    import cloudio

    url = f"{gcs_bucket}/d/a.tif"
    fs = cloudio.filesystem(url)
    fs.pipe(url, tif(1, 64))
    with cloudio.open(url) as ds:
        fs.pipe(url, tif(2, 64))
        a = ds.read(1)
        assert a.min() == a.max() == 2
        assert ds.read(1, window=((0, 16), (0, 16))).max() == 2


def test_read_after_overwrite_in_another_layout_is_a_stale_dataset_error(gcs_bucket: str) -> None:
    import cloudio

    url = f"{gcs_bucket}/d/a.tif"
    fs = cloudio.filesystem(url)
    fs.pipe(url, tif(1, 64))
    with cloudio.open(url) as ds:
        fs.pipe(url, tif(2, 128))
        stale = rf"{url}: changed on the server while this dataset was open.*reopen it with cloudio.open"
        with pytest.raises(cloudio.StaleDatasetError, match=stale):
            ds.read(1)
    with cloudio.open(url) as ds:
        assert ds.read(1).shape == (128, 128)
