"""cloudio's Zarr path side by side with its peers and with the transport ceiling (issue 15).

Sides, all in one process on one local emulator:

``cloudio``
    ``cloudio.save_array`` / ``cloudio.load_array``.
``tensorstore``
    tensorstore's ``zarr3`` driver (its default ``gcs_request_concurrency``).
``zarr_fsspec``
    plain zarr on ``FsspecStore`` over gcsfs (no cloudio).
``zarr_obstore``
    plain zarr on ``ObjectStore`` over obstore, reads only: obstore uploads
    through GCS's XML API, which fake-gcs-server 1.54 does not implement.
``ceiling``
    the fastest client's plain GET/PUT of the same objects at zarr's
    concurrency (``async.concurrency``): the best of obstore, tensorstore's
    ``gcs`` kvstore and gcsfs (GETs), of tensorstore's kvstore, gcsfs ``pipe``
    and plain ``uploadType=media`` POSTs on aiohttp (PUTs) per round, each
    also reported on its own.

Every writer writes a fresh store per round and the store is deleted right
after its timed write, so the in-memory emulator stays small; every reader
reads the same store, the one cloudio wrote in that round (the same objects
zarr and tensorstore write: ``tests/test_peers.py``), and checks the result
bit-exactly. The sides go in a new order each round (:func:`in_turn`), so
drift and machine load affect each alike, and so does what one side leaves
behind for the next (a rotation kept each side behind the same one:
cloudio's reads always came after gcsfs's plain GETs, tensorstore's after
cloudio's); 24 rounds put every side after every other equally often, for
the 6 writers and the 8 readers. Figures are medians over rounds; a
side's ratio is the median over rounds of (fastest peer's time / this
side's time) in the same round, so 1.0 is the fastest peer; ``vs_ceiling``
the same against the ceiling, the fastest plain GET/PUT client of each
round (a minimum of three noisy times: stricter than any one client);
``vs_fastest_transport`` the same against the one plain client whose
median is the fastest (``fastest_transport``), the issue's "fastest
client's plain GET/PUT". Compare only figures of one run: on a shared
machine they move by tens of percent from run to run.

Layouts: ``a`` 8192^2 float32, shards 2048^2 of 1024^2 chunks, no
compressor (256 MiB); ``b`` 4096^2 float32 quantized (compressible), zstd,
shards 2048^2 of 128^2 chunks; ``c`` 1000^2 float32 in 100^2 chunks,
unsharded (the tutorial's shape).

``--transports`` adds read-transport candidates for the plain GETs of
layout a's objects (obstore, aiohttp, gcsfs, tensorstore kvstore, at
zarr's concurrency and at ``--wide`` requests in flight).

Run: ``.venv/bin/python benchmarks/bench_peers.py --rounds 24`` (writes
``benchmarks/results/peers.json`` and ``peers.png``, ``peers_py312.*``
under Python 3.12).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
MIB = 2**20
PEERS = ("cloudio", "tensorstore", "zarr_fsspec", "zarr_obstore")


@dataclass(frozen=True)
class Layout:
    """One array shape and codec set, as ``zarr.create_array`` arguments."""

    name: str
    shape: tuple[int, int]
    chunks: tuple[int, int]
    shards: tuple[int, int] | None
    zstd: bool

    def data(self) -> np.ndarray:
        """Random float32; quantized where compressed so zstd has something to do."""
        rng = np.random.default_rng(0)
        x = rng.standard_normal(self.shape, dtype="f4")
        return np.round(x * 8) / 8 if self.zstd else x

    def zarr_kwargs(self) -> dict[str, Any]:
        import zarr

        return {"chunks": self.chunks, "shards": self.shards,
                "compressors": zarr.codecs.ZstdCodec(level=0) if self.zstd else None}


LAYOUTS = {
    "a": Layout("a: 8192^2 f4, shards 2048^2 of 1024^2, raw", (8192, 8192), (1024, 1024), (2048, 2048), False),
    "b": Layout("b: 4096^2 f4, shards 2048^2 of 128^2, zstd", (4096, 4096), (128, 128), (2048, 2048), True),
    "c": Layout("c: 1000^2 f4, 100^2 chunks, unsharded, raw", (1000, 1000), (100, 100), None, False),
}


def zarr_metadata(layout: Layout, dtype: np.dtype) -> dict[str, Any]:
    """The zarr.json zarr itself writes for ``layout``: tensorstore is given exactly that."""
    import zarr

    z = zarr.create_array(zarr.storage.MemoryStore(), shape=layout.shape, dtype=dtype, **layout.zarr_kwargs())
    meta = z.metadata.to_dict()
    return {k: v for k, v in meta.items() if v is not None}


@dataclass
class Env:
    """Clients for one emulator, each configured the way the issue's set-up notes say."""

    url: str
    bucket: str
    concurrency: int
    sa_path: str
    fs: Any = field(init=False)
    obs: Any = field(init=False)

    def __post_init__(self) -> None:
        from obstore.store import GCSStore

        from cloudio._gcs.client import gcs_filesystem

        self.fs = gcs_filesystem()
        self.obs = GCSStore(self.bucket, service_account_path=self.sa_path, client_options={"allow_http": True})

    def rm(self, prefix: str) -> None:
        """Delete a store so the in-memory emulator stays small."""
        self.fs.rm(f"{self.bucket}/{prefix}", recursive=True)
        self.fs.invalidate_cache()

    def keys(self, prefix: str) -> list[str]:
        import obstore

        return sorted(m["path"] for batch in obstore.list(self.obs, prefix=prefix + "/") for m in batch)


def obstore_for_emulator(url: str, tmp: Path) -> str:
    """A service-account file pointing obstore at the emulator without OAuth."""
    path = tmp / "sa.json"
    path.write_text(json.dumps({"gcs_base_url": url, "disable_oauth": True, "client_email": "",
                                "private_key": "", "private_key_id": ""}))
    return str(path)


def ts_spec(env: Env, prefix: str, concurrency: int | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"driver": "gcs", "bucket": env.bucket, "path": prefix + "/"}
    if concurrency:
        spec["context"] = {"gcs_request_concurrency": {"limit": concurrency}}
    return spec


# -- writers: each returns seconds for one timed write of ``data`` to ``prefix`` ---------------------

def write_cloudio(env: Env, layout: Layout, data: np.ndarray, prefix: str) -> float:
    import cloudio

    t0 = time.perf_counter()
    cloudio.save_array(data, f"gs://{env.bucket}/{prefix}", **layout.zarr_kwargs())
    return time.perf_counter() - t0


def write_tensorstore(env: Env, layout: Layout, data: np.ndarray, prefix: str) -> float:
    import tensorstore as ts

    t0 = time.perf_counter()
    t = ts.open({"driver": "zarr3", "kvstore": ts_spec(env, prefix), "metadata": zarr_metadata(layout, data.dtype)},
                create=True, delete_existing=True).result()
    t.write(data).result()
    return time.perf_counter() - t0


def write_zarr_fsspec(env: Env, layout: Layout, data: np.ndarray, prefix: str, *, overwrite: bool = False) -> float:
    import zarr
    from zarr.storage import FsspecStore

    from cloudio._gcs.client import gcs_filesystem

    store = FsspecStore(gcs_filesystem(asynchronous=True), path=f"{env.bucket}/{prefix}")
    t0 = time.perf_counter()
    z = zarr.create_array(store, shape=data.shape, dtype=data.dtype, overwrite=overwrite, **layout.zarr_kwargs())
    z[...] = data
    return time.perf_counter() - t0


# -- readers: each returns (seconds, array) for one timed read of the store at ``prefix`` ------------

def read_cloudio(env: Env, prefix: str) -> tuple[float, np.ndarray]:
    import cloudio

    t0 = time.perf_counter()
    out = cloudio.load_array(f"gs://{env.bucket}/{prefix}")
    return time.perf_counter() - t0, out


def read_cloudio_first(env: Env, prefix: str) -> tuple[float, np.ndarray]:
    """cloudio's read of a store this process did not write: without the zarr.json it kept from the write
    (which lets ``read_cloudio`` ask for small chunks at once: ``cloudio._zarr.last_seen``), kept again after."""
    from cloudio._zarr import last_seen

    url = f"gs://{env.bucket}/{prefix}/zarr.json"
    kept = last_seen.guess(url)
    last_seen.forget(url)
    try:
        return read_cloudio(env, prefix)
    finally:
        if kept is not None:
            last_seen.remember(url, *kept)


def read_tensorstore(env: Env, prefix: str) -> tuple[float, np.ndarray]:
    import tensorstore as ts

    t0 = time.perf_counter()
    t = ts.open({"driver": "zarr3", "kvstore": ts_spec(env, prefix)}, open=True).result()
    out = t.read().result()
    return time.perf_counter() - t0, out


def read_zarr_fsspec(env: Env, prefix: str) -> tuple[float, np.ndarray]:
    import zarr
    from zarr.storage import FsspecStore

    from cloudio._gcs.client import gcs_filesystem

    store = FsspecStore(gcs_filesystem(asynchronous=True), path=f"{env.bucket}/{prefix}", read_only=True)
    t0 = time.perf_counter()
    out = zarr.open_array(store, mode="r")[...]
    return time.perf_counter() - t0, out


def read_zarr_obstore(env: Env, prefix: str) -> tuple[float, np.ndarray]:
    import zarr
    from zarr.storage import ObjectStore

    t0 = time.perf_counter()
    out = zarr.open_array(ObjectStore(env.obs, read_only=True), path=prefix, mode="r")[...]
    return time.perf_counter() - t0, out


# -- plain transports: the same objects as bytes -------------------------------------------------------

async def _gather_limited(n: int, jobs: list[Callable[[], Any]]) -> list[Any]:
    sem = asyncio.Semaphore(n)

    async def one(job: Callable[[], Any]) -> Any:
        async with sem:
            return await job()

    return await asyncio.gather(*(one(j) for j in jobs))


def get_obstore(env: Env, keys: list[str], n: int) -> tuple[float, int]:
    import obstore

    async def one(k: str) -> int:
        r = await obstore.get_async(env.obs, k)
        return len(await r.bytes_async())

    t0 = time.perf_counter()
    sizes = asyncio.run(_gather_limited(n, [lambda k=k: one(k) for k in keys]))
    return time.perf_counter() - t0, sum(sizes)


def get_aiohttp(env: Env, keys: list[str], n: int) -> tuple[float, int]:
    """GETs through GCS's JSON API (``alt=media``) on one aiohttp session, as gcsfs sends them."""
    import urllib.parse

    import aiohttp

    async def run() -> list[int]:
        conn = aiohttp.TCPConnector(limit=n)
        async with aiohttp.ClientSession(connector=conn) as s:
            async def one(k: str) -> int:
                u = f"{env.url}/download/storage/v1/b/{env.bucket}/o/{urllib.parse.quote(k, safe='')}?alt=media"
                async with s.get(u) as r:
                    r.raise_for_status()
                    return len(await r.read())

            return await _gather_limited(n, [lambda k=k: one(k) for k in keys])

    t0 = time.perf_counter()
    sizes = asyncio.run(run())
    return time.perf_counter() - t0, sum(sizes)


def get_gcsfs(env: Env, keys: list[str], n: int) -> tuple[float, int]:
    t0 = time.perf_counter()
    out = env.fs.cat([f"{env.bucket}/{k}" for k in keys], batch_size=n)
    return time.perf_counter() - t0, sum(len(v) for v in out.values())


def get_tensorstore(env: Env, keys: list[str], n: int) -> tuple[float, int]:
    import tensorstore as ts

    kv = ts.KvStore.open(ts_spec(env, "", n) | {"path": ""}).result()
    t0 = time.perf_counter()
    futs = [kv.read(k) for k in keys]
    sizes = [len(f.result().value) for f in futs]
    return time.perf_counter() - t0, sum(sizes)


def put_tensorstore(env: Env, objs: dict[str, bytes], n: int) -> float:
    import tensorstore as ts

    kv = ts.KvStore.open(ts_spec(env, "", n) | {"path": ""}).result()
    t0 = time.perf_counter()
    for f in [kv.write(k, v) for k, v in objs.items()]:
        f.result()
    return time.perf_counter() - t0


def put_gcsfs(env: Env, objs: dict[str, bytes], n: int) -> float:
    t0 = time.perf_counter()
    env.fs.pipe({f"{env.bucket}/{k}": v for k, v in objs.items()}, batch_size=n)
    return time.perf_counter() - t0


def put_media(env: Env, objs: dict[str, bytes], n: int) -> float:
    """Plain ``uploadType=media`` POSTs on gcsfs's aiohttp session (the request cloudio's data path sends)."""
    from zarr.core.sync import sync

    from cloudio._gcs.client import gcs_filesystem
    from cloudio._gcs.fast import put_media as media
    from cloudio._paths import parse_gcs

    fs = gcs_filesystem(asynchronous=True)
    jobs = [lambda k=k, v=v: media(fs, parse_gcs(f"gs://{env.bucket}/{k}"), memoryview(v), "application/octet-stream")
            for k, v in objs.items()]
    t0 = time.perf_counter()
    sync(_gather_limited(n, jobs))
    return time.perf_counter() - t0


def fetch_objects(env: Env, prefix: str) -> dict[str, bytes]:
    import obstore

    return {k: obstore.get(env.obs, k).bytes().to_bytes() for k in env.keys(prefix)}


# -- one layout ----------------------------------------------------------------------------------------

WRITERS = {"cloudio": write_cloudio, "tensorstore": write_tensorstore, "zarr_fsspec": write_zarr_fsspec}
READERS = {"cloudio": read_cloudio, "tensorstore": read_tensorstore, "zarr_fsspec": read_zarr_fsspec,
           "zarr_obstore": read_zarr_obstore, "cloudio_first": read_cloudio_first}
PUTS = {"tensorstore_kvstore": put_tensorstore, "gcsfs_pipe": put_gcsfs, "aiohttp_media_put": put_media}
GETS = {"obstore_get": get_obstore, "tensorstore_kvstore": get_tensorstore, "gcsfs_cat": get_gcsfs}


def in_turn(sides: list[Any], r: int) -> list[Any]:
    """The sides in round ``r``'s order: row ``r`` of a Williams design, in which every side comes right
    after every other one equally often (once in each ``len(sides)`` rounds; twice in ``2 * len(sides)``
    for an odd count). What one side leaves behind (garbage, a busy emulator) slows the next: in a run of
    layout b, tensorstore read in 55-57 ms right after obstore's GETs and 57-65 ms after the others."""
    n = len(sides)
    first, low, high = [0], 1, n - 1
    while len(first) < n:
        first.append(low if len(first) % 2 else high)
        low, high = (low + 1, high) if len(first) % 2 == 0 else (low, high - 1)
    rows = [[(k + i) % n for k in first] for i in range(n)]
    if n % 2:
        rows += [row[::-1] for row in rows]
    return [sides[k] for k in rows[r % len(rows)]]


def run_layout(env: Env, layout: Layout, rounds: int, log: Callable[[str], None]) -> dict[str, Any]:
    """Interleaved rounds of every side on ``layout``; medians, MiB/s and ratios."""
    data = layout.data()
    n = env.concurrency
    writes: dict[str, list[float]] = {k: [] for k in [*WRITERS, *PUTS]}
    reads: dict[str, list[float]] = {k: [] for k in [*READERS, *GETS]}
    # warm-up: connections, imports, event loops; and the objects the plain transports move
    warm = f"warm-{uuid.uuid4().hex[:6]}.zarr"
    write_cloudio(env, layout, data, warm)
    for read in READERS.values():
        read(env, warm)
    objs = fetch_objects(env, warm)
    stored = sum(len(v) for v in objs.values())
    env.rm(warm)
    for r in range(rounds):
        side_order = in_turn([*WRITERS, *PUTS], r)
        shared = None
        for side in side_order:
            prefix = f"{side}-{r}-{uuid.uuid4().hex[:6]}.zarr"
            if side in WRITERS:
                writes[side].append(WRITERS[side](env, layout, data, prefix))
            else:
                writes[side].append(PUTS[side](env, {f"{prefix}/{i}": v for i, v in enumerate(objs.values())}, n))
            if side == "cloudio":
                shared = prefix  # every reader reads the store cloudio wrote
            else:
                env.rm(prefix)
        assert shared is not None
        keys = env.keys(shared)
        read_order = in_turn([*READERS, *GETS], r)
        for side in read_order:
            if side in READERS:
                sec, out = READERS[side](env, shared)
                if not np.array_equal(np.asarray(out), data):
                    raise AssertionError(f"{side} read of {shared} is not bit-exact")
            else:
                sec, got = GETS[side](env, keys, n)
                if got != stored:
                    raise AssertionError(f"{side}: {got} bytes read, {stored} stored")
            reads[side].append(sec)
        env.rm(shared)
        log(f"  round {r + 1}/{rounds}: " + ", ".join(
            f"{k} w{writes[k][-1]:.2f}" for k in writes) + " | " + ", ".join(f"{k} r{reads[k][-1]:.2f}" for k in reads))
    writes["ceiling"] = [min(writes[p][i] for p in PUTS) for i in range(rounds)]
    reads["ceiling"] = [min(reads[g][i] for g in GETS) for i in range(rounds)]
    return summarize(layout, data, stored, len(objs), n, writes, reads)


def summarize(layout: Layout, data: np.ndarray, stored: int, count: int, n: int,
              writes: dict[str, list[float]], reads: dict[str, list[float]]) -> dict[str, Any]:
    med = statistics.median

    def table(times: dict[str, list[float]], peers: list[str], transports: list[str]) -> dict[str, Any]:
        rounds = len(times["ceiling"])
        fastest = [min(times[p][i] for p in peers) for i in range(rounds)]
        best = min(transports, key=lambda t: med(times[t]))

        def vs(ref: list[float], ts: list[float]) -> float:
            return round(med(ref[i] / ts[i] for i in range(rounds)), 3)

        return {side: {"median_s": round(med(ts), 4),
                       "mib_per_s": round(data.nbytes / MIB / med(ts), 1),
                       "ratio_to_fastest_peer": vs(fastest, ts),
                       "vs_ceiling": vs(times["ceiling"], ts),
                       "vs_fastest_transport": vs(times[best], ts),
                       "fastest_transport": best,
                       "all_s": [round(t, 4) for t in ts]}
                for side, ts in times.items()}

    return {"layout": layout.name, "shape": list(layout.shape), "chunks": list(layout.chunks),
            "shards": list(layout.shards) if layout.shards else None, "zstd": layout.zstd,
            "array_mib": round(data.nbytes / MIB, 2), "stored_mib": round(stored / MIB, 2), "objects": count,
            "transport_concurrency": n,
            "write": table(writes, list(WRITERS), list(PUTS)),
            "read": table(reads, list(PEERS), list(GETS))}


def transport_sweep(env: Env, rounds: int, wide: int, log: Callable[[str], None]) -> dict[str, Any]:
    """Plain GETs of layout a's shards by every candidate read transport, at zarr's and a wider concurrency."""
    layout = LAYOUTS["a"]
    prefix = f"sweep-{uuid.uuid4().hex[:6]}.zarr"
    write_cloudio(env, layout, layout.data(), prefix)
    keys = env.keys(prefix)
    cands = {"obstore_get": get_obstore, "aiohttp_get": get_aiohttp, "gcsfs_cat": get_gcsfs,
             "tensorstore_kvstore": get_tensorstore}
    times: dict[str, list[float]] = {}
    stored = 0
    for fn in cands.values():  # warm-up
        fn(env, keys, env.concurrency)
    for r in range(rounds):
        for name, c in in_turn([(name, c) for c in (env.concurrency, wide) for name in cands], r):
            sec, stored = cands[name](env, keys, c)
            times.setdefault(f"{name}@{c}", []).append(sec)
        log(f"  sweep round {r + 1}/{rounds}")
    env.rm(prefix)
    best = [min(t[i] for t in times.values()) for i in range(rounds)]
    return {"objects": len(keys), "stored_mib": round(stored / MIB, 2),
            "read": {k: {"median_s": round(statistics.median(v), 4),
                         "mib_per_s": round(stored / MIB / statistics.median(v), 1),
                         "ratio_to_fastest": round(statistics.median(best[i] / v[i] for i in range(rounds)), 3)}
                     for k, v in times.items()}}


def plot(result: dict[str, Any], path: Path) -> None:
    """Grouped bars: MiB/s per side, write and read, one panel per layout."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layouts = result["layouts"]
    fig, axes = plt.subplots(1, len(layouts), figsize=(5 * len(layouts), 4.2), squeeze=False)
    sides = [*PEERS, "ceiling"]
    for ax, lay in zip(axes[0], layouts, strict=True):
        x = np.arange(len(sides))
        w = [lay["write"].get(s, {}).get("mib_per_s", 0) for s in sides]
        rd = [lay["read"].get(s, {}).get("mib_per_s", 0) for s in sides]
        ax.bar(x - 0.2, w, 0.4, label="write")
        ax.bar(x + 0.2, rd, 0.4, label="read")
        ax.set_xticks(x, sides, rotation=30, ha="right")
        ax.set_title(lay["layout"], fontsize=9)
        ax.set_ylabel("MiB/s (array bytes, median)")
    axes[0][0].legend()
    fig.suptitle(f"cloudio vs peers on fake-gcs-server, {result['rounds']} interleaved rounds, "
                 f"concurrency {result['concurrency']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=24,
                    help="interleaved rounds (the default balances the order of the sides)")
    ap.add_argument("--layouts", default="abc", help="any of a, b, c")
    ap.add_argument("--transports", action="store_true", help="also sweep read transports on layout a")
    ap.add_argument("--wide", type=int, default=32, help="the wider concurrency of --transports")
    ap.add_argument("--out", default=None, help="results name (default peers, peers_py3XX)")
    args = ap.parse_args()

    import zarr

    from cloudio.emulator import Emulator

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    concurrency = int(zarr.config.get("async.concurrency"))
    with Emulator() as emu, tempfile.TemporaryDirectory() as tmp:
        os.environ["STORAGE_EMULATOR_HOST"] = emu.url
        os.environ["TENSORSTORE_GCS_HTTP_URL"] = emu.url
        os.environ["GOOGLE_AUTH_TOKEN_FOR_TESTING"] = "emulator"
        bucket = emu.create_bucket(f"peers-{uuid.uuid4().hex[:6]}").removeprefix("gs://")
        env = Env(emu.url, bucket, concurrency, obstore_for_emulator(emu.url, Path(tmp)))
        load_before = os.getloadavg()[0]
        t0 = time.perf_counter()
        layouts = []
        for key in args.layouts:
            log(f"layout {LAYOUTS[key].name}")
            layouts.append(run_layout(env, LAYOUTS[key], args.rounds, log))
        sweep = transport_sweep(env, args.rounds, args.wide, log) if args.transports else None
        wall = time.perf_counter() - t0
        load_after = os.getloadavg()[0]

    from importlib.metadata import version

    result: dict[str, Any] = {
        "benchmark": "bench_peers", "rounds": args.rounds, "concurrency": concurrency,
        "versions": {"python": platform.python_version(),
                     **{p: version(p) for p in ("zarr", "gcsfs", "tensorstore", "obstore", "numpy")}},
        "wall_seconds": round(wall, 1),
        "load_average_1min": {"before": round(load_before, 2), "after": round(load_after, 2), "cpus": os.cpu_count()},
        "notes": "MiB/s of array bytes; ratio_to_fastest_peer = median over rounds of the fastest peer's time "
                 "over this side's (same round); vs_ceiling likewise against the best plain GET/PUT of each round, "
                 "vs_fastest_transport against the plain client with the fastest median (fastest_transport); "
                 "all of the same objects at the same concurrency. zarr_obstore: reads only (the emulator "
                 "lacks the XML-API upload obstore uses).",
        "layouts": layouts,
    }
    if sweep:
        result["read_transports"] = sweep
    default = "peers" if sys.version_info[:2] == (3, 11) else f"peers_py{sys.version_info[0]}{sys.version_info[1]}"
    name = args.out or default
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, RESULTS / f"{name}.png")
    for lay in layouts:
        print(lay["layout"])
        for op in ("write", "read"):
            for side, v in lay[op].items():
                print(f"  {op:5} {side:20} {v['mib_per_s']:8.1f} MiB/s  ratio {v['ratio_to_fastest_peer']:.2f}"
                      f"  vs ceiling {v['vs_ceiling']:.2f}"
                      f"  vs {v['fastest_transport']} {v['vs_fastest_transport']:.2f}")
    if sweep:
        print("read transports (layout a objects)")
        for side, v in sweep["read"].items():
            print(f"  {side:26} {v['mib_per_s']:8.1f} MiB/s  ratio {v['ratio_to_fastest']:.2f}")


if __name__ == "__main__":
    main()
