"""``cloudio.open`` against ``rasterio.open`` on the same cached object, nothing to invalidate.

Both open ``/vsigs/<bucket>/a.tif`` on a local emulator with the same GDAL
options (the path-specific endpoint options cloudio sets for the bucket, which
plain rasterio then uses too). After a warm-up, GDAL answers both from its
cache, so the difference is cloudio's own per-open bookkeeping. Opens
alternate (cloudio, rasterio, cloudio, ...) so drift affects both alike;
each open is followed by ``close``. Target: median ratio <= 1.05.

Run: ``.venv/bin/python benchmarks/bench_open_overhead.py`` (writes
``benchmarks/results/bench_open_overhead.json``).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

OPENS = int(os.environ.get("BENCH_OPENS", "2000"))
RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    import numpy as np
    import rasterio
    from rasterio.io import MemoryFile

    import cloudio
    from cloudio.emulator import Emulator

    with Emulator() as emu:
        os.environ["STORAGE_EMULATOR_HOST"] = emu.url
        os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
        emu.create_bucket("overhead")
        with MemoryFile() as mem:
            with mem.open(driver="GTiff", width=256, height=256, count=1, dtype="uint8",
                          tiled=True, blockxsize=64, blockysize=64) as ds:
                ds.write(np.ones((1, 256, 256), "uint8"))
            data = mem.read()
        emu.client.bucket("overhead").blob("d/a.tif").upload_from_string(data)
        url = "gs://overhead/d/a.tif"
        vsi = "/vsigs/overhead/d/a.tif"

        def c_open() -> None:
            cloudio.open(url).close()

        def r_open() -> None:
            rasterio.open(vsi).close()

        for _ in range(20):  # warm-up: GDAL caches, cloudio's listing, imports
            c_open()
            r_open()
        n0 = len(emu.requests())
        tc: list[float] = []
        tr: list[float] = []
        clock = time.perf_counter
        for i in range(OPENS):
            pair = ((c_open, tc), (r_open, tr)) if i % 2 == 0 else ((r_open, tr), (c_open, tc))
            for fn, acc in pair:
                t0 = clock()
                fn()
                acc.append(clock() - t0)
        requests = emu.count(("GET", "HEAD"), since=n0)

    med_c, med_r = statistics.median(tc), statistics.median(tr)
    # the machine's load drifts: also the ratio within each block of 200 pairs, then their median
    block = 200
    block_ratios = [
        statistics.median(tc[i:i + block]) / statistics.median(tr[i:i + block])
        for i in range(0, len(tc) - block + 1, block)
    ]
    doc = {
        "benchmark": "bench_open_overhead",
        "opens_each": OPENS,
        "versions": {"python": sys.version.split()[0], "rasterio": rasterio.__version__,
                     "gdal": rasterio.__gdal_version__},
        "median_us": {"cloudio": round(med_c * 1e6, 1), "rasterio": round(med_r * 1e6, 1)},
        "p90_us": {"cloudio": round(statistics.quantiles(tc, n=10)[-1] * 1e6, 1),
                   "rasterio": round(statistics.quantiles(tr, n=10)[-1] * 1e6, 1)},
        "ratio_median": round(med_c / med_r, 3),
        "ratio_median_of_blocks": round(statistics.median(block_ratios), 3),
        "block_ratios": [round(r, 3) for r in block_ratios],
        "requests_during_measurement": requests,
        "target": "ratio_median <= 1.05",
    }
    doc["target_met"] = doc["ratio_median"] <= 1.05
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"bench_open_overhead{os.environ.get('BENCH_TAG', '')}.json"
    path.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"{'':<10}{'median us':>10}{'p90 us':>10}")
    for k in ("cloudio", "rasterio"):
        print(f"{k:<10}{doc['median_us'][k]:>10}{doc['p90_us'][k]:>10}")
    print(f"ratio (median): {doc['ratio_median']}  target <= 1.05: {doc['target_met']}")
    print(f"ratio (median of {len(block_ratios)} blocks of {block} pairs): {doc['ratio_median_of_blocks']}")
    print(f"GET/HEAD during measurement: {requests}")
    print(f"written {path}")


if __name__ == "__main__":
    import warnings

    warnings.filterwarnings("ignore")
    main()
