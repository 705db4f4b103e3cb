"""``cloudio demo [--url gs://bucket/prefix]``: cloudio's main job, end to end.

On the embedded GCS emulator (or below a bucket prefix) this writes a
GeoTIFF, saves a WarpedVRT of it in the same prefix and reopens it at once,
overwrites the GeoTIFF and reads it again, writes a sharded Zarr v3 store
from an Xarray dataset backed by Dask, appends a variable and reopens the
store. Each step runs twice in this one process: with the raw libraries
(rasterio/GDAL, gcsfs, zarr, xarray as a user calls them, caches warm) and
through cloudio. The table shows both answers side by side, with the
requests each side made. Exit status 0 when cloudio was right at every step.
"""

from __future__ import annotations

import argparse

from cloudio.cli._report import results_table
from cloudio.cli._target import run_target
from cloudio.cli._ui import progress
from cloudio.cli.cases import DEMO_STEPS, CaseResult, Context, case_title

HELP = "show raw libraries going stale and cloudio staying right, step by step"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", help="gs://bucket/prefix to run in (default: the embedded emulator)")
    p.add_argument("--keep", action="store_true", help="keep the objects written below --url")


def run(args: argparse.Namespace) -> int:
    results: list[CaseResult] = []
    with run_target(args.url, "demo", keep=args.keep) as target:
        print(f"cloudio demo on {target.where}, in {target.root}")
        print("Each step runs twice in this process: raw libraries, then cloudio (separate folders).")
        print()
        ctx = Context(target.root, target.emulator)
        for i, fn in enumerate(DEMO_STEPS, 1):
            with progress(case_title(fn), i, len(DEMO_STEPS)):
                results.append(fn(ctx))
    print(results_table(results, first="step", numbered=True))
    print()
    if any(r.raw.requests is not None for r in results):
        print("requests: every request the emulator served for that side of the step (reads and writes).")
    ran = [r for r in results if not r.skipped]
    raw_bad = sum(not r.raw.correct for r in ran)
    good = sum(r.consistent for r in ran)
    print(f"raw libraries: stale, wrong or failed at {raw_bad} of {len(ran)} steps")
    for r in results:
        if r.skipped:
            print(f"skipped step {r.name}: {r.cloudio.detail}")
    if ran and good == len(ran):
        print(f"cloudio: right at every step ({good}/{len(ran)})")
        return 0
    bad = ", ".join(r.name for r in ran if not r.consistent)
    print(f"cloudio: wrong at {len(ran) - good} of {len(ran)} steps ({bad})")
    return 1
