"""Requests per operation at each consistency level, for the fsspec and Zarr faces.

Operations (each on its own prefix, warmed once through cloudio first so its
caches hold the object, as in a pipeline that read it before):

``ls``          ``cloudio.filesystem().ls(prefix)``; the change: a new object in the prefix
``info``        ``cloudio.filesystem().info(object)`` after its prefix was listed; the change: the
                object overwritten (new size)
``open_zarr``   ``cloudio.open_zarr(store)`` (consolidated, Zarr v3); the change: an array
                resized by plain zarr without consolidating again
``load_chunk``  ``cloudio.load_array(array)`` of a one-chunk array; the change: the chunk
                overwritten by plain zarr
``open``        ``cloudio.open(a.tif)`` and a read; the change: the GeoTIFF overwritten
``open_sidecar`` ``cloudio.open(a.tif).overviews(1)``; the change: an ``a.tif.ovr`` written next to it
``open_vrt_source`` ``cloudio.open(w.vrt)`` of a WarpedVRT saved by cloudio, and a read; the change:
                its source GeoTIFF overwritten

Columns: ``raw`` is the plain library with nothing cached (a new gcsfs instance;
``xarray.open_zarr`` / ``zarr.open_array`` with storage options);
``session``, ``strong``; ``bounded_young`` is a bound of an hour with caches
filled just before (trusted), ``bounded_old`` a bound of 0 s (every cache
entry older than the bound). The other writer is plain gcsfs / zarr on their
own uncached instances (google-cloud-storage for the rasters), so cloudio hears
nothing of it; GDAL's ``raw`` is ``rasterio.open`` with GDAL's cache of the
prefix cleared first. Each cell: GET/HEAD
requests counted at the emulator for one operation, and whether the answer was
stale. Targets: strong on an unchanged object <= raw (but open_zarr, which reads each member's
document rather than the consolidated copy); session unchanged.

Run: ``.venv/bin/python benchmarks/bench_levels.py`` (writes ``benchmarks/results/levels.json``).
"""

from __future__ import annotations

import json
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
LEVELS: dict[str, object] = {"session": "session", "strong": "strong", "bounded_young": 3600.0, "bounded_old": 0.0}


def _plain_options(emu: Any) -> dict[str, Any]:
    return {"endpoint_url": emu.url, "token": "anon", "skip_instance_cache": True}


def _dataset(rows: int) -> Any:
    import xarray as xr

    return xr.Dataset({"a": (("y", "x"), np.arange(rows * 4.0).reshape(rows, 4))},
                      coords={"y": np.arange(rows), "x": np.arange(4)})


class Case:
    """One operation: how to set it up, change it from elsewhere, run it through cloudio and raw."""

    def __init__(self, emu: Any, bucket: str, name: str) -> None:
        self.emu, self.bucket, self.name = emu, bucket, name

    def setup(self, prefix: str) -> None:
        raise NotImplementedError

    def change(self, prefix: str) -> None:
        raise NotImplementedError

    def run(self, prefix: str) -> Any:
        raise NotImplementedError

    def raw(self, prefix: str) -> Any:
        raise NotImplementedError

    def truth(self, changed: bool) -> Any:
        raise NotImplementedError


class Ls(Case):
    def setup(self, prefix: str) -> None:
        import cloudio

        cloudio.filesystem(f"gs://{self.bucket}").pipe(f"gs://{self.bucket}/{prefix}/a.bin", b"a" * 10)

    def change(self, prefix: str) -> None:
        self.emu.client.bucket(self.bucket).blob(f"{prefix}/new.bin").upload_from_string(b"n")

    def run(self, prefix: str) -> Any:
        import cloudio

        return sorted(p.rsplit("/", 1)[1] for p in cloudio.filesystem(f"gs://{self.bucket}").ls(f"{self.bucket}/{prefix}"))

    def raw(self, prefix: str) -> Any:
        import gcsfs

        fs = gcsfs.GCSFileSystem(**_plain_options(self.emu))
        return sorted(p.rsplit("/", 1)[1] for p in fs.ls(f"{self.bucket}/{prefix}"))

    def truth(self, changed: bool) -> Any:
        return ["a.bin", "new.bin"] if changed else ["a.bin"]


class Info(Ls):
    def setup(self, prefix: str) -> None:
        import cloudio

        super().setup(prefix)
        cloudio.filesystem(f"gs://{self.bucket}").ls(f"{self.bucket}/{prefix}")  # a pipeline that listed it

    def change(self, prefix: str) -> None:
        self.emu.client.bucket(self.bucket).blob(f"{prefix}/a.bin").upload_from_string(b"b" * 25)

    def run(self, prefix: str) -> Any:
        import cloudio

        return cloudio.filesystem(f"gs://{self.bucket}").info(f"{self.bucket}/{prefix}/a.bin")["size"]

    def raw(self, prefix: str) -> Any:
        import gcsfs

        return gcsfs.GCSFileSystem(**_plain_options(self.emu)).info(f"{self.bucket}/{prefix}/a.bin")["size"]

    def truth(self, changed: bool) -> Any:
        return 25 if changed else 10


class OpenZarr(Case):
    def setup(self, prefix: str) -> None:
        import cloudio

        cloudio.to_zarr(_dataset(4), f"gs://{self.bucket}/{prefix}", mode="w")

    def change(self, prefix: str) -> None:
        import zarr

        group = zarr.open_group(f"gs://{self.bucket}/{prefix}", mode="r+", use_consolidated=False,
                                storage_options=_plain_options(self.emu))
        group["a"].append(np.zeros((2, 4)))
        group["y"].append(np.array([4, 5]))

    def run(self, prefix: str) -> Any:
        import cloudio

        return cloudio.open_zarr(f"gs://{self.bucket}/{prefix}")["a"].shape

    def raw(self, prefix: str) -> Any:
        import xarray as xr

        return xr.open_zarr(f"gs://{self.bucket}/{prefix}", storage_options=_plain_options(self.emu))["a"].shape

    def truth(self, changed: bool) -> Any:
        return (6, 4) if changed else (4, 4)


class LoadChunk(Case):
    def setup(self, prefix: str) -> None:
        import cloudio

        cloudio.save_array(np.arange(16.0).reshape(4, 4), f"gs://{self.bucket}/{prefix}")

    def change(self, prefix: str) -> None:
        import zarr

        zarr.open_array(f"gs://{self.bucket}/{prefix}", mode="r+",
                        storage_options=_plain_options(self.emu))[...] = np.full((4, 4), 7.0)

    def run(self, prefix: str) -> Any:
        import cloudio

        return float(cloudio.load_array(f"gs://{self.bucket}/{prefix}")[0, 0])

    def raw(self, prefix: str) -> Any:
        import zarr

        return float(zarr.open_array(f"gs://{self.bucket}/{prefix}", mode="r",
                                     storage_options=_plain_options(self.emu))[0, 0])

    def truth(self, changed: bool) -> Any:
        return 7.0 if changed else 0.0


class Open(Case):
    """``cloudio.open(a.tif)`` and a read; the change: the object overwritten with other pixels."""

    def _tif(self, value: int) -> bytes:
        from affine import Affine
        from rasterio.io import MemoryFile

        with MemoryFile() as mem:
            with mem.open(driver="GTiff", width=64, height=64, count=1, dtype="uint8", crs="EPSG:3857",
                          transform=Affine(1, 0, 0, 0, -1, 64)) as ds:
                ds.write(np.full((1, 64, 64), value, "uint8"))
            return bytes(mem.read())

    def _put(self, key: str, data: bytes) -> None:
        self.emu.client.bucket(self.bucket).blob(key).upload_from_string(data)

    def setup(self, prefix: str) -> None:
        self._put(f"{prefix}/a.tif", self._tif(1))

    def change(self, prefix: str) -> None:
        self._put(f"{prefix}/a.tif", self._tif(2))

    def _read(self, ds: Any) -> Any:
        return int(ds.read(1).max())

    def run(self, prefix: str) -> Any:
        import cloudio

        with cloudio.open(f"gs://{self.bucket}/{prefix}/{self.opened}") as ds:
            return self._read(ds)

    def raw(self, prefix: str) -> Any:
        """Plain ``rasterio.open`` pointed at the emulator, with nothing of the prefix in GDAL's cache."""
        import rasterio

        from cloudio._gdal import bindings

        bindings.clear(f"/vsigs/{self.bucket}/{prefix}")
        with rasterio.Env(CPL_GS_ENDPOINT=self.emu.url + "/", GS_NO_SIGN_REQUEST="YES"), \
                rasterio.open(f"/vsigs/{self.bucket}/{prefix}/{self.opened}") as ds:
            return self._read(ds)

    opened = "a.tif"

    def truth(self, changed: bool) -> Any:
        return 2 if changed else 1


class OpenSidecar(Open):
    """``cloudio.open(a.tif).overviews(1)``; the change: an ``a.tif.ovr`` written elsewhere."""

    def change(self, prefix: str) -> None:
        import tempfile

        import rasterio
        from rasterio.enums import Resampling

        with tempfile.TemporaryDirectory() as tmp:
            local = f"{tmp}/a.tif"
            with open(local, "wb") as f:
                f.write(self._tif(1))
            with rasterio.Env(TIFF_USE_OVR=True), rasterio.open(local, "r+") as ds:
                ds.build_overviews([2], Resampling.nearest)
            with open(local + ".ovr", "rb") as f:
                self._put(f"{prefix}/a.tif.ovr", f.read())

    def _read(self, ds: Any) -> Any:
        return ds.overviews(1)

    def truth(self, changed: bool) -> Any:
        return [2] if changed else []


class OpenVrtSource(Open):
    """``cloudio.open(w.vrt)`` (a WarpedVRT saved with ``write_vrt``) and a read; the change: its source
    overwritten elsewhere."""

    opened = "w.vrt"

    def setup(self, prefix: str) -> None:
        from rasterio.vrt import WarpedVRT

        import cloudio

        super().setup(prefix)
        with cloudio.open(f"gs://{self.bucket}/{prefix}/a.tif") as ds, WarpedVRT(ds, crs="EPSG:3857") as vrt:
            cloudio.write_vrt(vrt, f"gs://{self.bucket}/{prefix}/w.vrt")


def measure(emu: Any, bucket: str, fn: Callable[[str], Any], prefix: str) -> tuple[int, Any]:
    """GET/HEAD requests ``fn(prefix)`` made in ``bucket``, and what it returned."""
    n0 = len(emu.requests())
    value = fn(prefix)
    return sum(1 for r in emu.requests()[n0:] if r.method in ("GET", "HEAD") and bucket in r.path), value


def main() -> None:
    import cloudio
    from cloudio.emulator import Emulator

    warnings.simplefilter("ignore")
    out: dict[str, dict[str, dict[str, dict[str, object]]]] = {}
    with Emulator() as emu:
        bucket = "bench-levels"
        emu.create_bucket(bucket)
        cases = (("ls", Ls), ("info", Info), ("open_zarr", OpenZarr), ("load_chunk", LoadChunk),
                 ("open", Open), ("open_sidecar", OpenSidecar), ("open_vrt_source", OpenVrtSource))
        for name, cls in cases:
            case = cls(emu, bucket, name)
            out[name] = {}
            for state in ("unchanged", "changed"):
                row: dict[str, dict[str, object]] = {}
                prefix = f"{name}-{state}-raw"  # stores right under the bucket (one inside another: see docs)
                case.setup(prefix)
                if state == "changed":
                    case.change(prefix)
                n, value = measure(emu, bucket, case.raw, prefix)
                row["raw"] = {"requests": n, "stale": value != case.truth(state == "changed")}
                for column, level in LEVELS.items():
                    prefix = f"{name}-{state}-{column}"
                    case.setup(prefix)
                    with cloudio.session("session"):
                        case.run(prefix)  # warm: cloudio's caches now hold what was written
                    if column == "bounded_young":
                        with cloudio.session(level):  # type: ignore[arg-type]
                            case.run(prefix)  # the bound's own first look, made just now
                    if state == "changed":
                        case.change(prefix)
                    with cloudio.session(level):  # type: ignore[arg-type]
                        n, value = measure(emu, bucket, case.run, prefix)
                    row[column] = {"requests": n, "stale": value != case.truth(state == "changed")}
                out[name][state] = row
    targets = {name: rows["unchanged"]["strong"]["requests"] <= rows["unchanged"]["raw"]["requests"]  # type: ignore[operator]
               for name, rows in out.items()}
    import gcsfs
    import xarray
    import zarr

    doc = {
        "benchmark": "bench_levels",
        "unit": "GET/HEAD requests at the emulator for one operation (stale: the answer missed the change)",
        "versions": {"python": sys.version.split()[0], "gcsfs": gcsfs.__version__, "zarr": zarr.__version__,
                     "xarray": xarray.__version__},
        "operations": out,
        "strong_unchanged_at_most_raw": targets,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "levels.json"
    path.write_text(json.dumps(doc, indent=2) + "\n")
    columns = ["raw", *LEVELS]
    print(f"{'operation':<17}{'state':<11}" + "".join(f"{c:>15}" for c in columns))
    for name, states in out.items():
        for state, row in states.items():
            cells = "".join(f"{str(row[c]['requests']) + (' stale' if row[c]['stale'] else ''):>15}" for c in columns)
            print(f"{name:<17}{state:<11}{cells}")
    print(f"strong on an unchanged object <= raw: {targets}")
    print(f"written {path}")


if __name__ == "__main__":
    main()
