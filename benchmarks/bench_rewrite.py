"""Rewriting a Zarr array in place: cloudio, tensorstore and plain zarr, time and requests.

Each side writes ``benchmarks/bench_peers.py``'s layout once to a store of
its own, then writes the same array over it ``--rounds`` times, the sides
interleaved (their order rotating) in one process on one local emulator:
``cloudio.save_array``; tensorstore's ``zarr3`` driver with
``delete_existing=True``; zarr's ``create_array(..., overwrite=True)`` on
``FsspecStore`` over gcsfs, then ``z[...] = data``. Reported per side: the
median time of a rewrite and the requests the emulator served for one
(counts do not jitter). zarr and tensorstore delete what the store held
before the first chunk goes up; cloudio deletes, after its last upload,
only what the new array did not overwrite: nothing, here.

Run: ``.venv/bin/python benchmarks/bench_rewrite.py --rounds 15`` (writes
``benchmarks/results/rewrite.json``).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import tempfile
import uuid
from pathlib import Path
from typing import Any

import bench_peers as peers  # beside this script: its directory is on sys.path when it runs

WRITERS = {"cloudio": peers.write_cloudio, "tensorstore": peers.write_tensorstore,
           "zarr_fsspec": functools.partial(peers.write_zarr_fsspec, overwrite=True)}


def run_layout(env: peers.Env, emu: Any, layout: peers.Layout, rounds: int) -> dict[str, Any]:
    data = layout.data()
    prefixes = {side: f"rewrite-{side}-{uuid.uuid4().hex[:6]}" for side in WRITERS}
    requests: dict[str, int] = {}
    for side, write in WRITERS.items():  # the store each side then rewrites; the second write is counted
        write(env, layout, data, prefixes[side])
        before = len(emu.requests())
        write(env, layout, data, prefixes[side])
        requests[side] = len(emu.requests()) - before
    times: dict[str, list[float]] = {side: [] for side in WRITERS}
    order = list(WRITERS)
    for r in range(rounds):
        for side in order[r % len(order):] + order[:r % len(order)]:
            times[side].append(WRITERS[side](env, layout, data, prefixes[side]))
    for side in WRITERS:
        back = peers.read_cloudio(env, prefixes[side])[1]
        assert back.tobytes() == data.tobytes(), side
        env.rm(prefixes[side])
    fastest = [min(t[i] for t in times.values()) for i in range(rounds)]

    def ratio(t: list[float]) -> float:
        return round(statistics.median(fastest[i] / t[i] for i in range(rounds)), 3)

    return {"layout": layout.name,
            "rewrite": {side: {"median_s": round(statistics.median(t), 4), "ratio_to_fastest": ratio(t),
                               "requests": requests[side]}
                        for side, t in times.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--layouts", default="bc", help="any of a, b, c")
    args = ap.parse_args()

    import zarr

    from cloudio.emulator import Emulator

    with Emulator() as emu, tempfile.TemporaryDirectory() as tmp:
        os.environ["STORAGE_EMULATOR_HOST"] = emu.url
        os.environ["TENSORSTORE_GCS_HTTP_URL"] = emu.url
        os.environ["GOOGLE_AUTH_TOKEN_FOR_TESTING"] = "emulator"
        bucket = emu.create_bucket(f"rewrite-{uuid.uuid4().hex[:6]}").removeprefix("gs://")
        env = peers.Env(emu.url, bucket, int(zarr.config.get("async.concurrency")),
                        peers.obstore_for_emulator(emu.url, Path(tmp)))
        layouts = [run_layout(env, emu, peers.LAYOUTS[key], args.rounds) for key in args.layouts]
    result = {"benchmark": "bench_rewrite", "rounds": args.rounds, "python": platform.python_version(),
              "notes": "median seconds of one in-place rewrite; ratio_to_fastest = median over rounds of the "
                       "fastest side's time over this side's; requests = what the emulator served for one rewrite",
              "layouts": layouts}
    peers.RESULTS.mkdir(exist_ok=True)
    (peers.RESULTS / "rewrite.json").write_text(json.dumps(result, indent=2) + "\n")
    for lay in layouts:
        print(lay["layout"])
        for side, v in lay["rewrite"].items():
            print(f"  {side:12} {v['median_s'] * 1e3:8.1f} ms  ratio {v['ratio_to_fastest']:.2f}  "
                  f"{v['requests']} requests")


if __name__ == "__main__":
    main()
