"""A full read of a 4096x4096 COG through ``cloudio.open`` against raw ``rasterio.open``.

One tiled COG (uint16, 512x512 blocks, DEFLATE, overviews) is written once to
three buckets on a local emulator, so each reader has its own GDAL path
options: ``raw`` is ``rasterio.open`` inside a ``rasterio.Env`` with the
emulator's options (what a rasterio user writes); ``cloudio`` is
``cloudio.open`` with the options cloudio sets per bucket; ``cloudio+opts``
is ``cloudio.open`` with the candidate read options below also set as
path-specific options on its bucket. Rounds interleave the three; before each
read GDAL's cache of the object is cleared, so every read goes to the server.
Reported: the median seconds per full read and the GET requests each read
made at the emulator.

Run: ``.venv/bin/python benchmarks/bench_cog.py`` (``BENCH_ROUNDS``, default 5;
writes ``benchmarks/results/cog.json``).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

ROUNDS = int(os.environ.get("BENCH_ROUNDS", "5"))
SIZE = 4096
RESULTS = Path(__file__).resolve().parent / "results"
#: the candidate read options (GDAL's own defaults in parentheses)
CANDIDATES = {
    "GDAL_HTTP_MULTIPLEX": "YES",  # (YES when curl has HTTP/2) parallel ranges over one connection
    "GDAL_HTTP_MERGE_CONSECUTIVE_RANGES": "YES",  # (YES) adjacent tiles in one request
    "GDAL_INGESTED_BYTES_AT_OPEN": "65536",  # (16384) header and tile index in the first request
    "CPL_VSIL_CURL_CHUNK_SIZE": "1048576",  # (16384) the size of each cached range
}


def _cog() -> bytes:
    import numpy as np
    from rasterio.io import MemoryFile

    y, x = np.mgrid[0:SIZE, 0:SIZE]
    noise = np.random.default_rng(0).integers(0, 64, (SIZE, SIZE))  # compresses about as well as imagery
    data = ((x // 4 + y // 4 + noise) % 4096).astype("uint16")[None]
    with MemoryFile() as src_mem:
        with src_mem.open(driver="GTiff", width=SIZE, height=SIZE, count=1, dtype="uint16") as ds:
            ds.write(data)
        with MemoryFile() as mem:
            from rasterio.shutil import copy

            copy(src_mem.name, mem.name, driver="COG", BLOCKSIZE=512, COMPRESS="DEFLATE", OVERVIEWS="AUTO")
            return bytes(mem.read())


def main() -> None:
    import rasterio

    import cloudio
    from cloudio._gdal import bindings
    from cloudio._gdal.endpoint import bucket_prefix, ensure_endpoint
    from cloudio.emulator import Emulator

    data = _cog()
    with Emulator() as emu:
        os.environ["STORAGE_EMULATOR_HOST"] = emu.url
        os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
        buckets = {"raw": "cog-raw", "cloudio": "cog-cloudio", "cloudio+opts": "cog-opts"}
        for b in buckets.values():
            emu.create_bucket(b)
            emu.client.bucket(b).blob("d/scene.tif").upload_from_string(data)
        ensure_endpoint(buckets["cloudio+opts"])
        for key, value in CANDIDATES.items():
            bindings.set_path_option(bucket_prefix(buckets["cloudio+opts"]), key, value)
        raw_env = {"CPL_GS_ENDPOINT": emu.url + "/", "GS_NO_SIGN_REQUEST": "YES"}

        def read(kind: str) -> object:
            vsi = f"/vsigs/{buckets[kind]}/d/scene.tif"
            bindings.clear(vsi)  # every read from the server
            if kind == "raw":
                with rasterio.Env(**raw_env), rasterio.open(vsi) as ds:
                    return ds.read()
            with cloudio.open(f"gs://{buckets[kind]}/d/scene.tif") as ds:
                return ds.read()

        expected = None
        seconds: dict[str, list[float]] = {k: [] for k in buckets}
        gets: dict[str, list[int]] = {k: [] for k in buckets}
        for kind in buckets:  # warm-up: imports, cloudio's listing
            read(kind)
        for i in range(ROUNDS):
            order = list(buckets) if i % 2 == 0 else list(reversed(buckets))
            for kind in order:
                n0 = len(emu.requests())
                t0 = time.perf_counter()
                arr = read(kind)
                seconds[kind].append(time.perf_counter() - t0)
                gets[kind].append(emu.count(("GET",), since=n0))
                digest = hash(arr.tobytes())  # type: ignore[attr-defined]
                expected = digest if expected is None else expected
                assert digest == expected, f"{kind} read different pixels"

    doc = {
        "benchmark": "bench_cog",
        "size": SIZE,
        "rounds": ROUNDS,
        "object_bytes": len(data),
        "versions": {"python": sys.version.split()[0], "rasterio": rasterio.__version__,
                     "gdal": rasterio.__gdal_version__},
        "candidates": CANDIDATES,
        "median_s": {k: round(statistics.median(v), 3) for k, v in seconds.items()},
        "gets_per_read": {k: statistics.median(v) for k, v in gets.items()},
    }
    doc["ratio_cloudio_to_raw"] = round(doc["median_s"]["cloudio"] / doc["median_s"]["raw"], 3)
    doc["ratio_opts_to_raw"] = round(doc["median_s"]["cloudio+opts"] / doc["median_s"]["raw"], 3)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "cog.json"
    path.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"{'':<14}{'median s':>10}{'GETs':>8}")
    for k in buckets:
        print(f"{k:<14}{doc['median_s'][k]:>10}{doc['gets_per_read'][k]:>8}")
    print(f"written {path}")


if __name__ == "__main__":
    import warnings

    warnings.filterwarnings("ignore")
    main()
