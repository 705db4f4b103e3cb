"""Where the time of a Zarr write and read goes on this machine: wall time, this process's CPU time and the
emulator's, for cloudio and tensorstore side by side (issue 15, layout b of ``bench_peers.py``).

Why: layout b (zstd chunks) is bound by the CPU on 2 cores. When both sides'
CPU time (client and emulator together) over the cores is close to their wall
time, neither can be much faster without doing less work, whatever the order
of its requests. Rounds alternate the sides; figures are medians.

Run: ``.venv/bin/python benchmarks/bench_cpu.py --layout b --rounds 12`` (writes
``benchmarks/results/cpu_<layout>.json``; needs ``psutil``).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_peers as peers  # the sides and layouts are bench_peers.py's own

RESULTS = Path(__file__).resolve().parent / "results"


def _seconds(read: Callable[..., tuple[float, object]], *args: object) -> float:
    """A reader's seconds (bench_peers' readers return them with the array)."""
    return read(*args)[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layout", default="b", choices=sorted(peers.LAYOUTS))
    ap.add_argument("--rounds", type=int, default=12)
    args = ap.parse_args()

    import psutil

    from cloudio.emulator import Emulator

    layout = peers.LAYOUTS[args.layout]
    data = layout.data()
    times: dict[str, list[tuple[float, float, float]]] = {}
    with Emulator() as emu, tempfile.TemporaryDirectory() as tmp:
        os.environ["TENSORSTORE_GCS_HTTP_URL"] = emu.url
        os.environ["GOOGLE_AUTH_TOKEN_FOR_TESTING"] = "emulator"
        bucket = emu.create_bucket(f"cpu-{uuid.uuid4().hex[:6]}").removeprefix("gs://")
        env = peers.Env(emu.url, bucket, 10, peers.obstore_for_emulator(emu.url, Path(tmp)))
        server, me = psutil.Process(emu.pid), psutil.Process()

        def measure(name: str, run: Callable[[], float]) -> None:
            c0, e0 = me.cpu_times(), server.cpu_times()
            wall = run()
            c1, e1 = me.cpu_times(), server.cpu_times()
            times.setdefault(name, []).append(
                (wall, c1.user + c1.system - c0.user - c0.system, e1.user + e1.system - e0.user - e0.system))

        for r in range(args.rounds):
            sides = ("cloudio", "tensorstore") if r % 2 else ("tensorstore", "cloudio")
            for side in sides:
                write = peers.write_cloudio if side == "cloudio" else peers.write_tensorstore
                measure(f"write {side}", functools.partial(write, env, layout, data, f"{side}{r}"))
            for side in sides:
                read = peers.read_cloudio if side == "cloudio" else peers.read_tensorstore
                measure(f"read {side}", functools.partial(_seconds, read, env, f"cloudio{r}"))
            env.rm(f"tensorstore{r}")
    cores = os.cpu_count() or 1
    rows = {}
    for name, runs in times.items():
        wall, client, emulator = (statistics.median(x[i] for x in runs) * 1000 for i in range(3))
        rows[name] = {"wall_ms": round(wall, 1), "client_cpu_ms": round(client, 1),
                      "emulator_cpu_ms": round(emulator, 1), "cpu_over_cores_ms": round((client + emulator) / cores, 1)}
        print(f"{name:18} wall {wall:6.1f} ms   client CPU {client:6.1f}   emulator CPU {emulator:5.1f}   "
              f"(client + emulator) / {cores} cores {(client + emulator) / cores:6.1f}")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"cpu_{args.layout}.json"
    out.write_text(json.dumps({"benchmark": "bench_cpu", "layout": layout.name, "rounds": args.rounds,
                               "cores": cores, "sides": rows}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
