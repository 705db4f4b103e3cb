"""Which CRC32C library cloudio sums with: ``crc32c`` against google-crc32c (``cloudio._gcs.checksums``).

Two measures, in one process:

``sum``
    each library's CRC32C of one 64 MiB buffer, GiB/s (median of 9).
``zarr``
    ``cloudio.save_array`` / ``cloudio.load_array`` of ``bench_peers.py``'s
    layouts a (256 MiB in 16 MiB shards) and c (100 chunks of 40 KB) on one
    local emulator, with ``cloudio._gcs.checksums`` summing through each
    library in turn: interleaved rounds (the order alternating), each store
    deleted after its read, the result checked bit-exactly. ``ratio`` is the
    median over rounds of google-crc32c's time over crc32c's in the same
    round (above 1: crc32c is faster).

Run: ``.venv/bin/python benchmarks/bench_crc32c.py --rounds 12`` (writes
``benchmarks/results/crc32c.json``; needs the ``test`` extra, which brings
google-crc32c).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import google_crc32c
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_peers

from cloudio._gcs import checksums

RESULTS = Path(__file__).resolve().parent / "results"


def _google(data: Any, crc: int = 0) -> int:
    """google-crc32c's sum, given what checksums.value is given (it refuses memoryview and bytearray)."""
    flat = data if isinstance(data, bytes) else np.frombuffer(data, dtype=np.uint8)
    return int(google_crc32c.extend(crc, flat))


CRC32C: Callable[[Any, int], int] = checksums._extend
LIBRARIES: dict[str, Callable[[Any, int], int]] = {"crc32c": CRC32C, "google-crc32c": _google}


def _swapping_reaches_cloudio() -> None:
    """Fail loudly unless cloudio's every sum goes through ``checksums._extend``, the name swapped here (were it
    renamed, both sides would run the same library, and still agree)."""
    checksums._extend = lambda data, crc=0: -1
    try:
        assert checksums.value(b"") == -1, "checksums.value no longer sums through checksums._extend"
    finally:
        checksums._extend = CRC32C


def sum_speed(repeat: int = 9) -> dict[str, float]:
    data = np.random.default_rng(0).integers(0, 256, 64 * 2**20, dtype=np.uint8)
    want = {f(data, 0) for f in LIBRARIES.values()}
    assert len(want) == 1, "the two libraries disagree"
    out = {}
    for name, f in LIBRARIES.items():
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            f(data, 0)
            times.append(time.perf_counter() - t0)
        out[name] = data.nbytes / statistics.median(times) / 2**30
    return out


def zarr_rounds(env: bench_peers.Env, key: str, rounds: int, log: Callable[[str], None]) -> dict[str, Any]:
    _swapping_reaches_cloudio()
    layout = bench_peers.LAYOUTS[key]
    data = layout.data()
    writes: dict[str, list[float]] = {name: [] for name in LIBRARIES}
    reads: dict[str, list[float]] = {name: [] for name in LIBRARIES}
    for i in range(rounds):
        order = list(LIBRARIES) if i % 2 else list(reversed(LIBRARIES))
        for name in order:
            checksums._extend = LIBRARIES[name]
            prefix = f"crc/{key}-{name}-{i}"
            writes[name].append(bench_peers.write_cloudio(env, layout, data, prefix))
            seconds, got = bench_peers.read_cloudio(env, prefix)
            assert np.array_equal(got, data), f"{name}: layout {key} read back differs"
            reads[name].append(seconds)
            env.rm(prefix)
        checksums._extend = CRC32C
        log(f"  {key} round {i + 1}/{rounds}: " + ", ".join(
            f"{n} w{writes[n][-1] * 1e3:.0f} r{reads[n][-1] * 1e3:.0f} ms" for n in LIBRARIES))
    mib = data.nbytes / 2**20

    def side(times: dict[str, list[float]]) -> dict[str, Any]:
        pairs = zip(times["google-crc32c"], times["crc32c"], strict=True)
        return {
            **{f"{n}_mib_s": round(mib / statistics.median(t), 1) for n, t in times.items()},
            "ratio": round(statistics.median(g / c for g, c in pairs), 3),
        }

    return {"layout": layout.name, "rounds": rounds, "write": side(writes), "read": side(reads)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--layouts", default="ac", help="any of a, b, c")
    ap.add_argument("--out", default="crc32c")
    args = ap.parse_args()

    import zarr

    from cloudio.emulator import Emulator

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    result: dict[str, Any] = {"sum_gib_s": {k: round(v, 2) for k, v in sum_speed().items()}}
    log(f"sum, GiB/s: {result['sum_gib_s']}")
    with Emulator() as emu, tempfile.TemporaryDirectory() as tmp:
        os.environ["STORAGE_EMULATOR_HOST"] = emu.url
        bucket = emu.create_bucket(f"crc-{uuid.uuid4().hex[:6]}").removeprefix("gs://")
        concurrency = int(zarr.config.get("async.concurrency"))
        env = bench_peers.Env(emu.url, bucket, concurrency, bench_peers.obstore_for_emulator(emu.url, Path(tmp)))
        result["zarr"] = [zarr_rounds(env, key, args.rounds, log) for key in args.layouts]
    result["load_after"] = round(os.getloadavg()[0], 2)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"{args.out}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    log(f"wrote {out}")


if __name__ == "__main__":
    main()
