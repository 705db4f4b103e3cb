"""GET/HEAD requests on a read-heavy workload with interleaved writes (docs/design.md, "Performance targets").

Workload: ``PREFIXES`` prefixes of ``FILES`` small tiled GeoTIFFs (they fit GDAL's
cache); every round overwrites one file (new shape, new pixels) and adds one new
file, then reads every file of every prefix whole. ``ROUNDS`` rounds after a
first full read.

Strategies, each run in its own process on its own copy of the data (so GDAL's
caches never leak from one to another), requests counted at the emulator:

``raw``       plain rasterio in a ``rasterio.Env`` pointing at the emulator (counts stale reads).
              GDAL then lists the directory again at every open (measured), so a
              second, stricter baseline is run too:
``raw_pathopts``  plain rasterio with the emulator options set path-specifically (as
              cloudio sets them): GDAL keeps its listings, fewest requests, most stale
``oracle``    ``raw`` plus one fresh read of each changed file (measured: all GDAL caches
              cleared before each of those reads, as in a new process);
              ``strict oracle`` is ``raw_pathopts`` plus the same fresh reads
``blunt_clear``     ``VSICurlClearCache()`` before every open
``blunt_noncached`` ``CPL_VSIL_CURL_NON_CACHED=/vsigs/<bucket>``
``cloudio``   ``cloudio.open`` at the session level, writes through ``cloudio.filesystem``

Targets: cloudio <= 1.1x the oracle, >= 2x fewer than each blunt fix, 0 stale reads.

Run: ``.venv/bin/python benchmarks/bench_requests.py`` (writes
``benchmarks/results/bench_requests.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

PREFIXES = 4
FILES = 5
ROUNDS = 8
HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def tif(value: int, size: int) -> bytes:
    import numpy as np
    from rasterio.io import MemoryFile

    with MemoryFile() as mem:
        with mem.open(driver="GTiff", width=size, height=size, count=1, dtype="uint8",
                      tiled=True, blockxsize=16, blockysize=16) as ds:
            ds.write(np.full((1, size, size), value, "uint8"))
        return mem.read()


def initial_truth() -> dict[str, tuple[int, int]]:
    """key -> (size, value) of every object before round 1."""
    return {f"p{p}/f{f}.tif": (64, 1 + p * FILES + f) for p in range(PREFIXES) for f in range(FILES)}


def round_writes(r: int) -> list[tuple[str, int, int]]:
    """The writes of round ``r`` (1-based): one overwrite, one new file."""
    over = f"p{r % PREFIXES}/f{r % FILES}.tif"
    new = f"p{(r + 1) % PREFIXES}/new{r}.tif"
    return [(over, 96 if r % 2 else 48, 100 + r), (new, 64, 200 + r)]


# --------------------------------------------------------------------------------------------
# worker: one strategy in one process
# --------------------------------------------------------------------------------------------


def worker(strategy: str, bucket: str, endpoint: str) -> dict[str, object]:
    import rasterio
    import rasterio._env
    from rasterio.errors import RasterioIOError

    truth = initial_truth()
    env_opts = {"CPL_GS_ENDPOINT": endpoint + "/", "GS_NO_SIGN_REQUEST": "YES"}
    if strategy == "blunt_noncached":
        env_opts["CPL_VSIL_CURL_NON_CACHED"] = f"/vsigs/{bucket}"
    stale = 0
    reads = 0

    if strategy == "cloudio":
        import cloudio

        fs = cloudio.filesystem(f"gs://{bucket}")

        def write(key: str, data: bytes) -> None:
            fs.pipe(f"gs://{bucket}/{key}", data)

        def open_(key: str):  # type: ignore[no-untyped-def]
            return cloudio.open(f"gs://{bucket}/{key}")
        env = None
    else:
        import ctypes

        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        client = storage.Client(project="bench", credentials=AnonymousCredentials(),
                                client_options={"api_endpoint": endpoint})
        blobs = client.bucket(bucket)
        lib = ctypes.CDLL(rasterio._env.__file__)

        def write(key: str, data: bytes) -> None:
            blobs.blob(key).upload_from_string(data)

        def open_(key: str):  # type: ignore[no-untyped-def]
            if strategy in ("blunt_clear", "oracle"):
                lib.VSICurlClearCache()
            return rasterio.open(f"/vsigs/{bucket}/{key}")
        if strategy == "raw_pathopts":
            for k, v in env_opts.items():
                lib.VSISetPathSpecificOption(f"/vsigs/{bucket}".encode(), k.encode(), v.encode())
            env = None
        else:
            env = rasterio.Env(**env_opts)
            env.__enter__()

    def read_one(key: str) -> None:
        nonlocal stale, reads
        reads += 1
        size, value = truth[key]
        try:
            with open_(key) as ds:
                a = ds.read()
            ok = a.shape == (1, size, size) and int(a.min()) == value == int(a.max())
        except RasterioIOError:
            ok = False
        stale += not ok

    if strategy != "oracle":
        for key in sorted(truth):
            read_one(key)
    for r in range(1, ROUNDS + 1):
        changed = []
        for key, size, value in round_writes(r):
            write(key, tif(value, size))
            truth[key] = (size, value)
            changed.append(key)
        keys = changed if strategy == "oracle" else sorted(truth)
        for key in keys:
            read_one(key)
    if env is not None:
        env.__exit__()
    return {"strategy": strategy, "reads": reads, "stale_reads": stale}


# --------------------------------------------------------------------------------------------
# driver
# --------------------------------------------------------------------------------------------


def classify(path: str) -> str:
    if path.startswith("/storage/v1/b/") and "/o/" in path:
        return "metadata"
    if "prefix=" in path or (path.startswith("/storage/v1/b/") and path.split("?")[0].endswith("/o")):
        return "listing"
    return "object"


def main() -> None:
    from cloudio.emulator import Emulator

    strategies = ["raw", "raw_pathopts", "oracle", "blunt_clear", "blunt_noncached", "cloudio"]
    out: dict[str, dict[str, object]] = {}
    with Emulator() as emu:
        data = {v: tif(v, 64) for v in {v for _, v in initial_truth().values()}}
        for strategy in strategies:
            bucket = f"bench-{strategy.replace('_', '-')}"
            emu.create_bucket(bucket)
            blobs = emu.client.bucket(bucket)
            for key, (_, value) in initial_truth().items():
                blobs.blob(key).upload_from_string(data[value])
            n0 = len(emu.requests())
            env = {**os.environ, "STORAGE_EMULATOR_HOST": emu.url, "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE.parent / "src"), env.get("PYTHONPATH")]))
            t0 = time.perf_counter()
            proc = subprocess.run(
                [sys.executable, "-W", "ignore", __file__, "--worker", strategy, "--bucket", bucket,
                 "--endpoint", emu.url],
                env=env, capture_output=True, text=True, check=False,
            )
            if proc.returncode != 0:
                raise SystemExit(f"{strategy} failed:\n{proc.stderr}")
            result = json.loads(proc.stdout.strip().splitlines()[-1])
            reqs = [r for r in emu.requests()[n0:] if r.method in ("GET", "HEAD")]
            result["get_head"] = len(reqs)
            result["by_kind"] = dict(Counter(classify(r.path) for r in reqs))
            result["seconds"] = round(time.perf_counter() - t0, 2)
            out[strategy] = result

    oracle = out["raw"]["get_head"] + out["oracle"]["get_head"]  # type: ignore[operator]
    cl = out["cloudio"]["get_head"]
    strict = out["raw_pathopts"]["get_head"] + out["oracle"]["get_head"]  # type: ignore[operator]
    summary = {
        "oracle_requests": oracle,
        "cloudio_over_oracle": round(cl / oracle, 3),  # type: ignore[operator]
        "strict_oracle_requests": strict,
        "cloudio_over_strict_oracle": round(cl / strict, 3),  # type: ignore[operator]
        "blunt_clear_over_cloudio": round(out["blunt_clear"]["get_head"] / cl, 2),  # type: ignore[operator]
        "blunt_noncached_over_cloudio": round(out["blunt_noncached"]["get_head"] / cl, 2),  # type: ignore[operator]
        "cloudio_stale_reads": out["cloudio"]["stale_reads"],
        "raw_stale_reads": out["raw"]["stale_reads"],
        "raw_pathopts_stale_reads": out["raw_pathopts"]["stale_reads"],
    }
    summary["targets_met"] = (
        summary["cloudio_over_oracle"] <= 1.1  # type: ignore[operator]
        and summary["cloudio_over_strict_oracle"] <= 1.1  # type: ignore[operator]
        and summary["blunt_clear_over_cloudio"] >= 2  # type: ignore[operator]
        and summary["blunt_noncached_over_cloudio"] >= 2  # type: ignore[operator]
        and summary["cloudio_stale_reads"] == 0
    )
    import rasterio

    doc = {
        "benchmark": "bench_requests",
        "workload": {"prefixes": PREFIXES, "files_per_prefix": FILES, "rounds": ROUNDS,
                     "writes_per_round": "1 overwrite + 1 new file"},
        "versions": {"python": sys.version.split()[0], "rasterio": rasterio.__version__,
                     "gdal": rasterio.__gdal_version__},
        "strategies": out,
        "summary": summary,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    tag = os.environ.get("BENCH_TAG", "")
    path = RESULTS / f"bench_requests{tag}.json"
    path.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"{'strategy':<17}{'GET/HEAD':>9}{'reads':>7}{'stale':>7}  by kind")
    for name, r in out.items():
        print(f"{name:<17}{r['get_head']:>9}{r['reads']:>7}{r['stale_reads']:>7}  {r['by_kind']}")
    print(f"oracle (raw + fresh reads of changed files): {oracle}; strict (raw_pathopts + fresh reads): {strict}")
    for k, v in summary.items():
        print(f"{k}: {v}")
    print(f"written {path}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker")
    ap.add_argument("--bucket")
    ap.add_argument("--endpoint")
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.bucket, args.endpoint)))
    else:
        main()
