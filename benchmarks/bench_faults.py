"""The fault table: each fault, applied to each cloudio operation, with its outcome and time to outcome.

Every cell runs in its own process with its own real emulator and the
fault-injecting proxy of ``tests/faultproxy.py`` between cloudio and it
(imported from ``tests/``, not copied). The fault is a rule on the
operation's own requests (``TARGETS``: the object's download for reads, the
upload for writes, the listing for ``ls``), so it hits the step that moves
the data. ``CLOUDIO_HTTP_TIMEOUT`` is 10 s unless already set.

Outcomes:

``ok``                 returned, and the data (read back from the emulator directly) is right
``wrong data``         returned, but the bytes, pixels or listing are not what was written
``<CloudioError subclass>``  a cloudio error (the message is in the JSON)
``raw <type>``         an error of an underlying library, not a CloudioError
``hang``               no outcome within ``--cap`` seconds (default 90)
``crash``              the process died (signal or abort)
``setup failed``       the cell could not prepare its data or check it: nothing measured
``n/a``                the fault does not apply (an upload flip on a read)

``(not hit)`` after an outcome means the rule never matched a request: the
cell did not test that fault. "killed" stops the emulator at the first
upload request and starts a new one on the same port (same bucket, empty)
3 s later.

Run: ``.venv/bin/python benchmarks/bench_faults.py [--jobs 3] [--cap 90]
[--ops a,b] [--faults x,y]`` (writes ``benchmarks/results/faults<tag>.json``
and ``.md``; ``BENCH_TAG`` or ``--tag`` sets the tag).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
TESTS = HERE.parent / "tests"
BUCKET = "faults"
OPS = ["open_read", "open_write", "cat", "pipe", "ls", "save_array", "load_array"]
WRITES = {"open_write", "pipe", "save_array"}
#: fault name -> FaultProxy.add keywords (method and path come from TARGETS)
FAULTS: dict[str, dict[str, Any]] = {
    "none": {},
    "503 x3": {"fault": "status", "code": 503, "times": 3},
    "503 forever": {"fault": "status", "code": 503, "times": None},
    "429 x3": {"fault": "status", "code": 429, "times": 3},
    "delay 2 s": {"fault": "delay", "seconds": 2.0, "times": None},
    "hang": {"fault": "hang", "times": 1},
    "reset mid-body": {"fault": "reset", "after": 100, "times": 1},
    "flip response": {"fault": "flip", "where": "response", "times": 1},
    "flip upload": {"fault": "flip", "where": "request", "times": 1},
    "killed mid-upload": {"fault": "kill", "times": 1},
}
UPLOAD_ONLY = {"flip upload", "killed mid-upload"}
#: operation -> (method, path regex) of the requests a fault applies to
TARGETS = {
    "open_read": ("GET", r"target\.tif"),
    "open_write": ("POST", r"/upload/"),
    "cat": ("GET", r"target\.bin"),
    "pipe": ("POST", r"/upload/"),
    "ls": ("GET", r"/o\?.*prefix="),
    "save_array": ("POST", r"/upload/"),
    "load_array": ("GET", r"target\.zarr.*(c%2F|/c/)"),
}


# --------------------------------------------------------------------------------------------
# one cell, in its own process
# --------------------------------------------------------------------------------------------


def _tif(seed: int) -> tuple[bytes, Any]:
    import numpy as np
    from rasterio.io import MemoryFile
    from rasterio.transform import from_origin

    a = np.random.default_rng(seed).integers(0, 255, (1, 256, 256), dtype="uint8")
    with MemoryFile() as mem:
        with mem.open(driver="GTiff", width=256, height=256, count=1, dtype="uint8", crs="EPSG:4326",
                      transform=from_origin(0, 256, 1, 1)) as ds:
            ds.write(a)
        return mem.read(), a


def _array(seed: int) -> Any:
    import numpy as np

    return np.random.default_rng(seed).random((128, 128)).astype("float32")


def cell(op: str, fault: str, cap: float) -> dict[str, Any]:
    """Run ``op`` under ``fault``; return outcome, seconds and the proxy's view."""
    sys.path.insert(0, str(TESTS))
    import numpy as np
    from faultproxy import FaultProxy

    from cloudio import _config
    from cloudio.emulator import Emulator, _free_port

    port = _free_port()
    emu = Emulator(port=port).start()
    emu.create_bucket(BUCKET)
    url = f"gs://{BUCKET}/d/target"
    blobs = emu.client.bucket(BUCKET)
    tif_bytes, tif_pixels = _tif(1)
    bin_bytes = np.random.default_rng(2).bytes(256 * 1024)
    arr = _array(3)
    # the state before the operation, written straight to the emulator (or without faults)
    blobs.blob("d/other.bin").upload_from_string(b"x")
    if op == "open_read":
        blobs.blob("d/target.tif").upload_from_string(tif_bytes)
    elif op == "cat":
        blobs.blob("d/target.bin").upload_from_string(bin_bytes)
    elif op == "load_array":
        import cloudio

        _config.push_endpoint(emu.url)
        cloudio.save_array(arr, url + ".zarr", chunks=(64, 64))
        _config.pop_endpoint()

    restarted: list[Emulator] = []

    def kill() -> None:
        emu.stop()

        def restart() -> None:
            time.sleep(3)
            new = Emulator(port=port).start()
            new.create_bucket(BUCKET)
            restarted.append(new)
        threading.Thread(target=restart, daemon=True).start()

    proxy = FaultProxy(emu.url).__enter__()
    _config.push_endpoint(proxy.url)
    method, path = TARGETS[op]
    rule = None
    if FAULTS[fault]:
        kw = {**FAULTS[fault], "method": method, "path": path}
        if fault == "killed mid-upload":
            kw["action"] = kill
        rule = proxy.add(kw.pop("fault"), **kw)

    result: dict[str, Any] = {}

    def run() -> None:
        import cloudio

        t0 = time.perf_counter()
        try:
            if op == "open_read":
                with cloudio.open(url + ".tif") as src:
                    result["value"] = src.read()
            elif op == "open_write":
                with cloudio.open(url + ".tif", "w", driver="GTiff", width=256, height=256, count=1,
                                  dtype="uint8", crs="EPSG:4326", transform=tif_transform()) as dst:
                    dst.write(tif_pixels)
            elif op == "cat":
                result["value"] = cloudio.filesystem(url).cat(url + ".bin")
            elif op == "pipe":
                cloudio.filesystem(url).pipe(url + ".bin", bin_bytes)
            elif op == "ls":
                fs = cloudio.filesystem(url)
                result["value"] = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(f"gs://{BUCKET}/d", detail=False))
            elif op == "save_array":
                cloudio.save_array(arr, url + ".zarr", chunks=(64, 64))
            elif op == "load_array":
                result["value"] = cloudio.load_array(url + ".zarr")
        except BaseException as e:
            result["error"] = e
        result["seconds"] = time.perf_counter() - t0

    th = threading.Thread(target=run, daemon=True)
    th.start()
    th.join(cap)
    hits = rule.hits if rule is not None else 0
    log = [f"{m} {p[:90]} -> {s}" for m, p, s in proxy.requests()][:40]
    if th.is_alive():
        return {"outcome": "hang", "seconds": cap, "fault_hits": hits, "proxy_log": log}

    out: dict[str, Any] = {"seconds": round(result["seconds"], 2), "fault_hits": hits, "proxy_log": log}
    err = result.get("error")
    if err is not None:
        from cloudio.errors import CloudioError

        raw = f"raw {type(err).__module__}.{type(err).__name__}"
        kind = type(err).__name__ if isinstance(err, CloudioError) else raw
        out["outcome"] = kind
        out["message"] = str(err)[:500]
        if err.__cause__ is not None:
            out["cause"] = f"{type(err.__cause__).__module__}.{type(err.__cause__).__name__}: {err.__cause__}"[:300]
        if not isinstance(err, CloudioError):
            out["traceback"] = "".join(traceback.format_exception(err))[-1500:]
        return out

    # check the data: reads against what was stored, writes by reading the emulator directly
    live = restarted[-1] if restarted else emu
    if op == "open_read":
        ok = np.array_equal(result["value"], tif_pixels)
    elif op == "cat":
        ok = result["value"] == bin_bytes
    elif op == "ls":
        ok = result["value"] == ["other.bin"] if not restarted else True
        out["listing"] = result["value"]
    elif op == "load_array":
        ok = np.array_equal(result["value"], arr)
    elif op == "open_write":
        ok = _stored_tif_equal(live, tif_pixels)
    elif op == "pipe":
        ok = _stored_bytes(live, "d/target.bin") == bin_bytes
    else:
        import cloudio

        _config.push_endpoint(live.url)  # another endpoint: fresh caches, straight to the emulator
        try:
            ok = np.array_equal(cloudio.load_array(url + ".zarr"), arr)
        except Exception as e:
            ok = False
            out["check_error"] = repr(e)[:300]
    out["outcome"] = "ok" if ok else "wrong data"
    return out


def tif_transform() -> Any:
    from rasterio.transform import from_origin

    return from_origin(0, 256, 1, 1)


def _stored_bytes(emu: Any, key: str) -> bytes | None:
    blob = emu.client.bucket(BUCKET).get_blob(key)
    return None if blob is None else blob.download_as_bytes()


def _stored_tif_equal(emu: Any, pixels: Any) -> bool:
    import numpy as np
    from rasterio.io import MemoryFile

    data = _stored_bytes(emu, "d/target.tif")
    if data is None:
        return False
    with MemoryFile(data) as mem, mem.open() as ds:
        return bool(np.array_equal(ds.read(), pixels))


# --------------------------------------------------------------------------------------------
# driver
# --------------------------------------------------------------------------------------------


def run_cell(op: str, fault: str, cap: float) -> dict[str, Any]:
    if fault in UPLOAD_ONLY and op not in WRITES:
        return {"outcome": "n/a", "seconds": None}
    env = {**os.environ, "CLOUDIO_HTTP_TIMEOUT": os.environ.get("CLOUDIO_HTTP_TIMEOUT", "10")}
    env.pop("STORAGE_EMULATOR_HOST", None)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(
            [sys.executable, "-W", "ignore", __file__, "--cell", op, fault, "--cap", str(cap)],
            env=env, capture_output=True, text=True, timeout=cap + 90, check=False,
        )
    except subprocess.TimeoutExpired:
        return {"outcome": "hang", "seconds": cap, "note": "the cell's process did not exit"}
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines or not lines[-1].startswith("{"):
        return {"outcome": "crash", "seconds": round(time.perf_counter() - t0, 1),
                "returncode": proc.returncode, "stderr": proc.stderr[-1500:]}
    return json.loads(lines[-1])


def label(r: dict[str, Any]) -> str:
    if r["outcome"] == "n/a":
        return "n/a"
    text = r["outcome"]
    if r.get("fault_hits") == 0 and r.get("fault") != "none":
        text += " (not hit)"
    return f"{text}, {r['seconds']} s" if r.get("seconds") is not None else text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cell", nargs=2, metavar=("OP", "FAULT"))
    ap.add_argument("--cap", type=float, default=90.0)
    ap.add_argument("--jobs", type=int, default=3)
    ap.add_argument("--ops", default=",".join(OPS))
    ap.add_argument("--faults", default=",".join(FAULTS))
    ap.add_argument("--tag", default=os.environ.get("BENCH_TAG", ""))
    args = ap.parse_args()
    if args.cell:
        try:
            out = cell(args.cell[0], args.cell[1], args.cap)
        except Exception as e:
            out = {"outcome": "setup failed", "seconds": None, "message": repr(e)[:500],
                   "traceback": traceback.format_exc()[-1500:]}
        print(json.dumps(out, default=str), flush=True)
        os._exit(0)  # a hung request thread must not keep the cell alive

    import rasterio
    import zarr

    ops = args.ops.split(",")
    faults = args.faults.split(",")
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        futs = {(op, f): pool.submit(run_cell, op, f, args.cap) for f in faults for op in ops}
        table: dict[str, dict[str, Any]] = {f: {} for f in faults}
        for (op, f), fut in futs.items():
            r = fut.result()
            r["fault"] = f
            table[f][op] = r
            print(f"{f:<18} {op:<11} {label(r)}", flush=True)
    doc = {
        "benchmark": "bench_faults",
        "versions": {"python": sys.version.split()[0], "rasterio": rasterio.__version__,
                     "gdal": rasterio.__gdal_version__, "zarr": zarr.__version__},
        "cloudio_http_timeout": os.environ.get("CLOUDIO_HTTP_TIMEOUT", "10"),
        "cap_seconds": args.cap,
        "targets": TARGETS,
        "faults": {f: {k: v for k, v in FAULTS[f].items()} for f in faults},
        "wall_seconds": round(time.perf_counter() - t0, 1),
        "cells": table,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"faults{args.tag}.json"
    path.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    md = RESULTS / f"faults{args.tag}.md"
    md.write_text(markdown(doc, ops, faults))
    print(f"written {path} and {md}")


def markdown(doc: dict[str, Any], ops: list[str], faults: list[str]) -> str:
    v = doc["versions"]
    lines = [
        "# Fault table",
        "",
        (f"`benchmarks/bench_faults.py`: outcome, seconds to outcome. Python {v['python']}, rasterio "
        f"{v['rasterio']} / GDAL {v['gdal']}, zarr {v['zarr']}; CLOUDIO_HTTP_TIMEOUT="
        f"{doc['cloudio_http_timeout']}, cap {doc['cap_seconds']:g} s. Each cell: its own process, "
        "emulator and fault proxy; the fault applies to the operation's data requests "
        "(see `targets` in faults.json). \"ok\" means the data was checked."),
        "",
        "| fault | " + " | ".join(f"`{o}`" for o in ops) + " |",
        "| --- |" + " --- |" * len(ops),
    ]
    for f in faults:
        lines.append(f"| {f} | " + " | ".join(label(doc["cells"][f][o]) for o in ops) + " |")
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
