"""The load run: N threads of mixed reads, writes, deletes, listings and Zarr I/O on shared prefixes.

Every read is checked against a sequence-number oracle; the run reports
operations, stale reads (target 0), errors by cause and the process's RSS
over time (the write journal's memory must stay bounded: the slope of RSS
over the second half of the run, in MiB/min, is the figure to watch).

Workload: ``--prefixes`` prefixes, each holding ``TIFS`` small GeoTIFFs,
``BINS`` plain objects and ``ZARRS`` Zarr arrays, shared by all threads. Each
thread picks an operation at random (weights in ``WEIGHTS``), a prefix and a
name, until ``--seconds`` have passed. Every write carries a sequence number
``seq`` taken from one process-wide counter when the write starts:

- GeoTIFF (``cloudio.open(url, "w")``): every pixel is ``seq`` (uint32), the
  side is 16 + 8 * (seq % 2) so the object's size changes on each overwrite;
- plain object (``cloudio.filesystem().pipe``): ``SEQ:<seq>;`` padded to
  ``size_of(seq)`` bytes, so ``info`` carries the number in its size;
- Zarr (``cloudio.save_array``): an 8 x 8 int64 array of ``seq``, chunks 4 x 4.

Deletes (``rm``) apply to GeoTIFFs and plain objects; the value of a deleted
object is "absent".

What counts as stale (the oracle, in :class:`Oracle`): each write or delete
of a URL is an interval ``[start, end]`` on one monotonic clock, with the
value it leaves. A read with interval ``[rs, re]`` may return the value of

- any write still running when the read started, or started before the read
  ended (``w.end >= rs`` and ``w.start <= re``: concurrent with the read);
- the last completed write(s) before the read: a write that ended before
  ``rs`` and is not *superseded*, i.e. there is no other write that both
  started after it ended and ended before ``rs``;
- a write that failed (its effect on the server is unknown): acceptable
  until superseded, never supersedes anything itself.

A read returning anything else is stale: an older number (stale pixels,
bytes or size), "absent" for an object that must exist, data for an object
that must be absent, a Zarr array mixing two numbers or a number no
acceptable write wrote ("torn"). Stale reads are also counted apart
when a write of the same URL overlapped them (a GeoTIFF overwritten while it
is read can come back torn: GCS serves each range request from the newest
generation). A listing (``fs.ls`` of a prefix) is stale
if it lacks a name whose acceptable values are all "present", or holds one
whose acceptable values are all "absent"; names whose state was in flight may
be listed either way. A Zarr array is many objects written one by one: a
``load_array`` or listing overlapping a ``save_array`` of the same array may
also see it absent or part-written (``IncompleteWriteError`` or mixed
numbers, or zarr's fill value 0 where a chunk is not written yet); such reads
are counted apart (``zarr_partial_reads_during_save``), not as stale; so are
reads of an array whose saves overlapped each other and left a mix of their
numbers, all acceptable (``zarr_reads_mixing_overlapping_saves``: no
multi-object write is atomic against another). A read raising ``FileNotFoundError`` (cloudio's
``ObjectNotFoundError``) returned "absent"; any other exception is counted
under errors by its type, and so is a write that raised.

Run: ``.venv/bin/python benchmarks/bench_load.py [--threads 8] [--seconds 60]
[--prefixes 4]`` (writes ``benchmarks/results/load<tag>.json`` and
``load<tag>.png``; ``BENCH_TAG`` or ``--tag`` sets the tag).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import threading
import time
import traceback
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cloudio.errors import IncompleteWriteError

RESULTS = Path(__file__).resolve().parent / "results"
TIFS = 3
BINS = 3
ZARRS = 2
WEIGHTS = {
    "read_tif": 20, "cat": 15, "info": 8, "ls": 8, "load_array": 8,
    "write_tif": 8, "pipe": 10, "rm": 4, "save_array": 4,
}
ABSENT = None  # the value of a deleted (or never written) object


def size_of(seq: int) -> int:
    """Bytes of the plain object written with ``seq`` (so ``info`` sees the number in the size)."""
    return 32 + seq % 977


def bin_payload(seq: int) -> bytes:
    head = f"SEQ:{seq};".encode()
    return head + b"." * (size_of(seq) - len(head))


def bin_value(data: bytes) -> int:
    """The sequence number a plain object carries; ValueError when the bytes are not one."""
    head, _, rest = data.partition(b";")
    if not head.startswith(b"SEQ:") or len(data) != size_of(int(head[4:])) or rest.strip(b"."):
        raise ValueError(f"not a payload: {data[:24]!r}... ({len(data)} bytes)")
    return int(head[4:])


def tif_side(seq: int) -> int:
    return 16 + 8 * (seq % 2)


@dataclass
class Op:
    """One write or delete of a URL: its interval and the value it leaves (None: absent)."""

    start: int
    end: int | None  # None while running
    value: int | None
    certain: bool = True  # False: it raised, its effect is unknown


class Oracle:
    """Per-URL history of writes; decides which values a read over ``[rs, re]`` may return.

    History is pruned to what a read still running may need, so the oracle's
    own memory stays flat (it is measured with the rest of the process).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._hist: dict[str, list[Op]] = {}
        self._reads: Counter[int] = Counter()  # start ticks of reads in flight

    def begin_write(self, url: str, value: int | None) -> Op:
        op = Op(time.monotonic_ns(), None, value)
        with self._lock:
            self._hist.setdefault(url, []).append(op)
        return op

    def end_write(self, op: Op, ok: bool) -> None:
        with self._lock:
            op.end = time.monotonic_ns()
            op.certain = ok

    def begin_read(self) -> int:
        rs = time.monotonic_ns()
        with self._lock:
            self._reads[rs] += 1
        return rs

    def end_read(self, rs: int) -> None:
        with self._lock:
            self._reads[rs] -= 1
            if not self._reads[rs]:
                del self._reads[rs]

    @staticmethod
    def _acceptable(hist: list[Op], rs: int, re: int) -> set[int | None]:
        out: set[int | None] = set()
        settled = [w for w in hist if w.end is not None and w.end < rs]
        for w in hist:
            if w.start > re:
                continue
            if w.end is None or w.end >= rs:
                out.add(w.value)  # concurrent with the read
            elif not any(o.certain and o is not w and o.start > w.end for o in settled):  # type: ignore[operator]
                out.add(w.value)  # the last completed write(s), or one that failed, not superseded
        return out

    def acceptable(self, url: str, rs: int, re: int) -> set[int | None]:
        with self._lock:
            return self._acceptable(self._hist.get(url, []), rs, re)

    def concurrent(self, url: str, rs: int, re: int) -> bool:
        """Whether a write of ``url`` overlapped ``[rs, re]``."""
        with self._lock:
            return any(w.start <= re and (w.end is None or w.end >= rs) for w in self._hist.get(url, []))

    def prune(self) -> None:
        """Drop writes superseded before the oldest read in flight started: no read can need them."""
        now = time.monotonic_ns()
        with self._lock:
            horizon = min(self._reads, default=now)
            for url, hist in self._hist.items():
                keep = [w for w in hist if w.end is None or w.end >= horizon or not any(
                    o.certain and o.end is not None and o.end < horizon and o.start > w.end for o in hist)]
                self._hist[url] = keep


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def slope_mib_per_min(samples: list[tuple[float, float]]) -> float:
    """Least-squares slope of RSS (MiB) over time (s) in the second half of the run, per minute."""
    half = samples[len(samples) // 2:]
    if len(half) < 2:
        return float("nan")
    n = len(half)
    mt = sum(t for t, _ in half) / n
    mr = sum(r for _, r in half) / n
    den = sum((t - mt) ** 2 for t, _ in half)
    return 60 * sum((t - mt) * (r - mr) for t, r in half) / den if den else float("nan")


class Torn(Exception):
    """A read returned data no single write wrote (mixed numbers, wrong shape, bad bytes)."""

    def __init__(self, message: str, values: set[int] | None = None) -> None:
        super().__init__(message)
        self.values = values or set()


class Load:
    """The workload: shared names, the oracle, and per-kind counters."""

    def __init__(self, bucket: str, prefixes: int, kinds: list[str]) -> None:
        import cloudio

        self.kinds = kinds
        self.bucket = bucket
        self.fs = cloudio.filesystem(f"gs://{bucket}")
        self.oracle = Oracle()
        self.seq = iter(range(1, 1 << 62))
        self.seq_lock = threading.Lock()
        self.prefixes = [f"p{i}" for i in range(prefixes)]
        self.ops: Counter[str] = Counter()
        self.stale: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.stale_overlapping: Counter[str] = Counter()  # of which a write of the same URL overlapped
        self.mixed: Counter[str] = Counter()  # Zarr reads mixing two saves that overlapped (allowed)
        self.partial: Counter[str] = Counter()  # Zarr reads during a save that saw part of it (allowed)
        self.stale_examples: list[str] = []
        self.error_examples: dict[str, str] = {}
        self.lock = threading.Lock()

    def next_seq(self) -> int:
        with self.seq_lock:
            return next(self.seq)

    def url(self, prefix: str, kind: str, i: int) -> str:
        ext = {"tif": "tif", "bin": "bin", "zarr": "zarr"}[kind]
        return f"gs://{self.bucket}/{prefix}/{kind}{i}.{ext}"

    # -- the writes ----------------------------------------------------------------------------

    def write_tif(self, url: str, seq: int) -> None:
        import numpy as np
        from rasterio.transform import from_origin

        import cloudio

        side = tif_side(seq)
        with cloudio.open(url, "w", driver="GTiff", width=side, height=side, count=1, dtype="uint32",
                          crs="EPSG:4326", transform=from_origin(0, side, 1, 1)) as dst:
            dst.write(np.full((1, side, side), seq, "uint32"))

    def pipe(self, url: str, seq: int) -> None:
        self.fs.pipe(url, bin_payload(seq))

    def save_array(self, url: str, seq: int) -> None:
        import numpy as np

        import cloudio

        cloudio.save_array(np.full((8, 8), seq, "int64"), url, chunks=(4, 4))

    # -- the reads: each returns the value seen (None: absent) ----------------------------------

    def read_tif(self, url: str) -> int | None:
        import cloudio

        try:
            with cloudio.open(url) as src:
                a = src.read(1)
        except FileNotFoundError:
            return ABSENT
        lo, hi = int(a.min()), int(a.max())
        if lo != hi or a.shape != (tif_side(lo),) * 2:
            raise Torn(f"{url}: pixels {lo}..{hi}, shape {a.shape}")
        return lo

    def cat(self, url: str) -> int | None:
        try:
            data = self.fs.cat(url)
        except FileNotFoundError:
            return ABSENT
        try:
            return bin_value(data)
        except ValueError as e:
            raise Torn(f"{url}: {e}") from e

    def info_size(self, url: str) -> int | None:
        try:
            return int(self.fs.info(url)["size"])
        except FileNotFoundError:
            return ABSENT

    def load_array(self, url: str) -> int | None:
        import numpy as np

        import cloudio

        try:
            a = cloudio.load_array(url)
        except FileNotFoundError:
            return ABSENT
        lo, hi = int(a.min()), int(a.max())
        if lo != hi or a.shape != (8, 8):
            raise Torn(f"{url}: values {lo}..{hi}, shape {a.shape}", {int(v) for v in np.unique(a)})
        return lo

    # -- one operation ---------------------------------------------------------------------------

    def one(self, rng: random.Random) -> None:
        kind = rng.choices(self.kinds, weights=[WEIGHTS[k] for k in self.kinds])[0]
        prefix = rng.choice(self.prefixes)
        if kind in ("read_tif", "write_tif"):
            url = self.url(prefix, "tif", rng.randrange(TIFS))
        elif kind in ("cat", "info", "pipe"):
            url = self.url(prefix, "bin", rng.randrange(BINS))
        elif kind in ("load_array", "save_array"):
            url = self.url(prefix, "zarr", rng.randrange(ZARRS))
        elif kind == "rm":
            target = rng.choice(["tif", "bin"])
            url = self.url(prefix, target, rng.randrange(TIFS if target == "tif" else BINS))
        else:
            url = f"gs://{self.bucket}/{prefix}"
        with self.lock:
            self.ops[kind] += 1
        try:
            if kind in ("write_tif", "pipe", "save_array", "rm"):
                self.write(kind, url)
            elif kind == "ls":
                self.check_listing(url)
            else:
                self.check_read(kind, url)
        except Exception as e:
            self.note_error(kind, url, e)

    def write(self, kind: str, url: str) -> None:
        seq = self.next_seq()
        op = self.oracle.begin_write(url, ABSENT if kind == "rm" else seq)
        ok = False
        try:
            if kind == "rm":
                try:
                    self.fs.rm(url)
                except FileNotFoundError:
                    pass  # already absent: the delete's effect holds
            else:
                getattr(self, kind)(url, seq)
            ok = True
        finally:
            self.oracle.end_write(op, ok)

    def check_read(self, kind: str, url: str) -> None:
        incomplete: IncompleteWriteError | None = None
        mixed: set[int] = set()
        rs = self.oracle.begin_read()
        try:
            try:
                got: int | None = {"read_tif": self.read_tif, "cat": self.cat, "info": self.info_size,
                                   "load_array": self.load_array}[kind](url)
                torn = None
            except Torn as e:
                got, torn, mixed = -1, str(e), e.values
            except IncompleteWriteError as e:
                got, torn, incomplete = -1, f"{url}: {e}", e
            re = time.monotonic_ns()
            allowed = self.oracle.acceptable(url, rs, re)
            overlapped = self.oracle.concurrent(url, rs, re)
        finally:
            self.oracle.end_read(rs)
        if incomplete is not None and not overlapped:
            raise incomplete  # no save running: an error (of an earlier failed save), not a stale read
        if kind == "load_array" and overlapped and (torn is not None or got in (ABSENT, 0)):
            with self.lock:  # many objects: a read during a save may see part of it (0: zarr's fill value)
                self.partial[kind] += 1
            return
        if kind == "load_array" and mixed and mixed <= allowed:
            with self.lock:  # saves of one array that overlapped each other leave a mix of both
                self.mixed[kind] += 1
            return
        if kind == "info":
            allowed = {None if v is None else size_of(v) for v in allowed}
        if torn is not None or got not in allowed:
            why = torn or f"{url}: {kind} returned {got}, acceptable {sorted(allowed, key=str)}"
            self.note_stale(kind, why, overlapped)

    def check_listing(self, prefix_url: str) -> None:
        rs = self.oracle.begin_read()
        try:
            names = {n.rstrip("/").rsplit("/", 1)[-1] for n in self.fs.ls(prefix_url, detail=False)}
            re = time.monotonic_ns()
            wrong = []
            prefix = prefix_url.rsplit("/", 1)[-1]
            for kind, n in (("tif", TIFS), ("bin", BINS), ("zarr", ZARRS)):
                for i in range(n):
                    url = self.url(prefix, kind, i)
                    allowed = self.oracle.acceptable(url, rs, re)
                    if kind == "zarr" and self.oracle.concurrent(url, rs, re):
                        allowed.add(ABSENT)  # a save replaces the array's objects one by one
                    name = url.rsplit("/", 1)[-1]
                    if name in names and allowed == {ABSENT}:
                        wrong.append(f"{name} listed, must be absent")
                    elif name not in names and ABSENT not in allowed:
                        wrong.append(f"{name} missing, must be present")
        finally:
            self.oracle.end_read(rs)
        if wrong:
            self.note_stale("ls", f"{prefix_url}: " + "; ".join(wrong), False)

    def note_stale(self, kind: str, why: str, overlapped: bool) -> None:
        with self.lock:
            self.stale[kind] += 1
            self.stale_overlapping[kind] += overlapped
            if len(self.stale_examples) < 20:
                self.stale_examples.append(why + (" (a write of it overlapped the read)" if overlapped else ""))

    def note_error(self, kind: str, url: str, e: BaseException) -> None:
        name = f"{type(e).__module__}.{type(e).__qualname__}"
        cause = e.__cause__
        key = f"{kind}: {name}" + (f" (from {type(cause).__module__}.{type(cause).__qualname__})" if cause else "")
        with self.lock:
            self.errors[key] += 1
            self.error_examples.setdefault(key, f"{url}: {e}"[:400])

    def populate(self) -> None:
        """Write every name once, so reads start from known values."""
        for prefix in self.prefixes:
            for kind, n, fn in (("tif", TIFS, "write_tif"), ("bin", BINS, "pipe"), ("zarr", ZARRS, "save_array")):
                for i in range(n):
                    self.write(fn, self.url(prefix, kind, i))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--prefixes", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", default=",".join(WEIGHTS), help="operation kinds to run (to isolate a problem)")
    ap.add_argument("--tag", default=os.environ.get("BENCH_TAG", ""))
    args = ap.parse_args()

    from cloudio.emulator import Emulator

    with Emulator() as emu:
        os.environ["STORAGE_EMULATOR_HOST"] = emu.url
        import rasterio
        import zarr

        from cloudio._journal import journal

        emu.create_bucket("load")
        load = Load("load", args.prefixes, args.only.split(","))
        load.populate()
        load.ops.clear()
        n_requests0 = len(emu.requests())

        samples: list[tuple[float, float]] = []
        stop = threading.Event()
        t0 = time.monotonic()

        def report(status: str, elapsed: float, n_requests: int | None) -> dict[str, Any]:
            """The results so far; also written every 10 s, so a run that dies leaves its record."""
            slope = slope_mib_per_min(samples)
            with load.lock:
                doc: dict[str, Any] = {
                    "benchmark": "bench_load",
                    "status": status,
                    "workload": {"threads": args.threads, "seconds": args.seconds, "prefixes": args.prefixes,
                                 "per_prefix": {"tif": TIFS, "bin": BINS, "zarr": ZARRS},
                                 "weights": {k: WEIGHTS[k] for k in load.kinds}, "seed": args.seed},
                    "versions": {"python": sys.version.split()[0], "rasterio": rasterio.__version__,
                                 "gdal": rasterio.__gdal_version__, "zarr": zarr.__version__},
                    "elapsed_s": round(elapsed, 1),
                    "operations": sum(load.ops.values()),
                    "ops_per_s": round(sum(load.ops.values()) / elapsed, 1),
                    "ops": dict(sorted(load.ops.items())),
                    "stale_reads": sum(load.stale.values()),
                    "stale": dict(sorted(load.stale.items())),
                    "stale_while_a_write_of_it_overlapped": dict(sorted(load.stale_overlapping.items())),
                    "stale_examples": list(load.stale_examples),
                    "zarr_partial_reads_during_save": sum(load.partial.values()),
                    "zarr_reads_mixing_overlapping_saves": sum(load.mixed.values()),
                    "errors": sum(load.errors.values()),
                    "errors_by_cause": dict(load.errors.most_common()),
                    "error_examples": dict(load.error_examples),
                    "emulator_requests": n_requests,
                    "journal_records_at_end": len(journal()),
                    "rss_mib": {"start": samples[0][1], "end": samples[-1][1], "peak": max(r for _, r in samples),
                                "slope_second_half_mib_per_min": round(slope, 3)},
                    "rss_samples": list(samples),
                }
            RESULTS.mkdir(parents=True, exist_ok=True)
            (RESULTS / f"load{args.tag}.json").write_text(json.dumps(doc, indent=2) + "\n")
            return doc

        def sampler() -> None:
            while not stop.wait(1.0 - (time.monotonic() - t0) % 1.0):
                samples.append((round(time.monotonic() - t0, 2), round(rss_mib(), 2)))
                load.oracle.prune()
                if len(samples) % 10 == 0:
                    report("running (this record is from the run's last snapshot)", time.monotonic() - t0, None)

        def worker(i: int) -> None:
            rng = random.Random(args.seed * 1000 + i)
            while time.monotonic() - t0 < args.seconds:
                try:
                    load.one(rng)
                except Exception:
                    traceback.print_exc()

        samples.append((0.0, round(rss_mib(), 2)))
        threads = [threading.Thread(target=sampler, daemon=True)]
        threads += [threading.Thread(target=worker, args=(i,)) for i in range(args.threads)]
        for t in threads:
            t.start()
        for t in threads[1:]:
            t.join()
        elapsed = time.monotonic() - t0
        stop.set()
        threads[0].join()
        samples.append((round(elapsed, 2), round(rss_mib(), 2)))
        n_requests = len(emu.requests()) - n_requests0
        doc = report("complete", elapsed, n_requests)
        slope = doc["rss_mib"]["slope_second_half_mib_per_min"]

    path = RESULTS / f"load{args.tag}.json"
    png = RESULTS / f"load{args.tag}.png"
    plot(samples, png, f"{args.threads} threads x {args.seconds:g} s: RSS slope over 2nd half {slope:+.2f} MiB/min")

    print(f"{'operation':<12}{'ops':>8}{'stale':>7}{'of which overlapping a write':>30}")
    for kind in WEIGHTS:
        print(f"{kind:<12}{load.ops[kind]:>8}{load.stale[kind]:>7}{load.stale_overlapping[kind]:>30}")
    print(f"{'total':<12}{doc['operations']:>8}{doc['stale_reads']:>7}   ({doc['ops_per_s']} ops/s, "
          f"{n_requests} requests at the emulator)")
    print(f"Zarr reads during a save that saw part of it (allowed): {doc['zarr_partial_reads_during_save']}")
    print(f"Zarr reads mixing two saves that overlapped each other (allowed): "
          f"{doc['zarr_reads_mixing_overlapping_saves']}")
    print(f"errors: {doc['errors']}")
    for key, n in load.errors.most_common():
        print(f"  {n:>6}  {key}")
    for ex in load.stale_examples[:5]:
        print(f"  stale: {ex}")
    r = doc["rss_mib"]
    print(f"RSS MiB: start {r['start']}, peak {r['peak']}, end {r['end']}; slope over the second half "
          f"{r['slope_second_half_mib_per_min']} MiB/min; journal records {doc['journal_records_at_end']}")
    print(f"written {path} and {png}")


def plot(samples: list[tuple[float, float]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot([t for t, _ in samples], [r for _, r in samples], lw=1.5)
    ax.axvline(samples[len(samples) // 2][0], color="grey", ls=":", lw=1)
    ax.set_xlabel("seconds")
    ax.set_ylabel("RSS (MiB)")
    ax.set_title(title, fontsize=9)
    ax.set_ylim(bottom=0)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
