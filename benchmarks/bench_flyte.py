"""A 64 MiB xarray.Dataset passed through three Flyte tasks: cloudio's transformer against the plugin's.

One local Flyte workflow, ``make -> add_one -> total``: ``make`` returns a
Dask-backed 4096 x 4096 float32 Dataset (64 MiB; Dask chunks 1024 x 1024,
encoded as Zarr shards of 1024 x 1024 with inner chunks of 512 x 512),
``add_one`` takes it as an input and returns ``ds + 1``, ``total`` takes that
and sums it. Two outputs are written to and two inputs read from Flyte's raw
output prefix on a local emulator (``gs://``). The two sides differ only in
the transformer flytekit uses for ``xarray.Dataset``:

* ``cloudio``: :mod:`cloudio.flyte` (``cloudio.to_zarr`` / ``cloudio.open_zarr``,
  the Dask scheduler already in force, one Dask chunk per stored shard);
* ``plugin``: ``flytekitplugins-xarray-zarr`` (``xarray.to_zarr`` inside a new
  ``dask.distributed.Client`` per output, ``xarray.open_zarr`` defaults).

Rounds alternate the order of the sides; figures are medians over rounds,
ratios within this one run. Also counted: requests at the emulator per run.

Run: ``.venv/bin/python benchmarks/bench_flyte.py`` (writes
``benchmarks/results/flyte.json``, ``flyte_py312.json`` under Python 3.12;
``BENCH_ROUNDS``, default 3).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import dask
import dask.array as da
import flytekit
import xarray as xr
import zarr
from flytekit import task, workflow

RESULTS = Path(__file__).resolve().parent / "results"
N = 4096
CHUNK, SHARD = 512, 1024
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))


@task
def make() -> xr.Dataset:
    v = da.random.default_rng(42).random((N, N), chunks=SHARD, dtype="f4")
    ds = xr.Dataset({"v": (("y", "x"), v)}, coords={"y": range(N), "x": range(N)})
    ds.v.encoding.update(chunks=(CHUNK, CHUNK), shards=(SHARD, SHARD))
    return ds


@task
def add_one(ds: xr.Dataset) -> xr.Dataset:
    return ds + 1


@task
def total(ds: xr.Dataset) -> float:
    return float(ds.v.sum(dtype="f8").compute())


@workflow
def three_tasks() -> float:
    return total(ds=add_one(ds=make()))


def main() -> None:
    from flytekit.core.context_manager import FlyteContextManager
    from flytekit.core.data_persistence import FileAccessProvider
    from flytekitplugins import xarray as plugin  # noqa: F401  (imported by flytekit too, as a plugin)

    import cloudio.flyte
    from cloudio.emulator import Emulator

    warnings.filterwarnings("ignore")  # the plugin's consolidated-metadata and auth warnings, once per run

    with Emulator() as emu, tempfile.TemporaryDirectory() as sandbox:
        os.environ["STORAGE_EMULATOR_HOST"] = emu.url  # for the plugin's gcsfs and its Dask workers too
        bucket = emu.create_bucket("bench-flyte")
        fa = FileAccessProvider(local_sandbox_dir=sandbox, raw_output_prefix=f"{bucket}/raw")
        ctx = FlyteContextManager.current_context()

        def run(side: str) -> tuple[float, int, float]:
            if side == "cloudio":
                cloudio.flyte.register()
            else:
                cloudio.flyte.unregister()
            n0 = len(emu.requests())
            with FlyteContextManager.with_context(ctx.with_file_access(fa)):
                t0 = time.perf_counter()
                value = three_tasks()
                seconds = time.perf_counter() - t0
            return seconds, len(emu.requests()) - n0, value

        sides = ["cloudio", "plugin"]
        runs: dict[str, list[tuple[float, int, float]]] = {s: [] for s in sides}
        run("cloudio")  # warm-up: imports, first connections
        load_before = os.getloadavg()[0]
        for r in range(ROUNDS):
            for side in sides[r % 2:] + sides[:r % 2]:
                runs[side].append(run(side))
                print(f"round {r} {side}: {runs[side][-1][0]:.2f} s", file=sys.stderr)
        load_after = os.getloadavg()[0]
        cloudio.flyte.register()

    values = {s: {v for _, _, v in runs[s]} for s in sides}
    assert values["cloudio"] == values["plugin"] and len(values["cloudio"]) == 1, values
    med = {s: statistics.median(t for t, _, _ in runs[s]) for s in sides}
    requests = {s: statistics.median(n for _, n, _ in runs[s]) for s in sides}
    result = {
        "benchmark": "bench_flyte",
        "dataset": {"shape": [N, N], "dtype": "float32", "mib": N * N * 4 / 2**20,
                    "dask_chunks": SHARD, "zarr_chunks": CHUNK, "zarr_shards": SHARD},
        "workflow": "make -> add_one -> total (2 outputs written, 2 inputs read)",
        "rounds": ROUNDS,
        "versions": {"python": platform.python_version(), "flytekit": flytekit.__version__,
                     "xarray": xr.__version__, "zarr": zarr.__version__, "dask": dask.__version__},
        "median_seconds": med,
        "median_requests": requests,
        "all_seconds": {s: [t for t, _, _ in runs[s]] for s in sides},
        "load_average_1min": [load_before, load_after],
        "ratio_plugin_over_cloudio_seconds": med["plugin"] / med["cloudio"],
    }
    RESULTS.mkdir(exist_ok=True)
    suffix = "_py312" if sys.version_info[:2] == (3, 12) else ""
    out = RESULTS / f"flyte{suffix}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'side':10} {'median s':>9} {'requests':>9}")
    for s in sides:
        print(f"{s:10} {med[s]:9.2f} {requests[s]:9.0f}")
    print(f"plugin / cloudio time: {result['ratio_plugin_over_cloudio_seconds']:.2f}  ({out})")


if __name__ == "__main__":
    main()
