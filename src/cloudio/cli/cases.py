"""Staleness cases: one scenario run twice, with the raw libraries and through cloudio.

``cloudio demo`` and ``cloudio check`` are built from these plain functions.
Each case function takes a :class:`Context` and returns a :class:`CaseResult`
holding two :class:`Outcome` objects: what the raw libraries returned (plain
``rasterio.open`` with GDAL configured through process environment variables,
as users configure it for GCS; plain gcsfs, zarr and xarray; in this same
process so their caches are warm) and what cloudio
returned for the same scenario, plus the requests each side made when the
emulator's request log is available.

The two sides work in separate folders (``<root>/raw/`` and
``<root>/cloudio/``) so that an invalidation cloudio makes can never make the
raw side look right, and a stale raw cache can never make cloudio look wrong.
In a "second writer" step, the raw side uses a separate gcsfs instance (what
another library, job or process would hold); the cloudio side writes through
cloudio, which is the contract of the session level.

Nothing here prints: the CLI renders the results.
"""

from __future__ import annotations

import logging
import os
import time
import traceback
import uuid
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from cloudio._config import emulator_endpoint, gcsfs_options, gdal_options, prepare_gcsfs_import
from cloudio._paths import parse_gcs

if TYPE_CHECKING:
    from cloudio.emulator import Emulator

log = logging.getLogger(__name__)

Verdict = Literal["correct", "stale", "wrong", "error", "skipped"]
RAW, CLOUDIO = "raw", "cloudio"

#: a small projected raster, so that a WarpedVRT to EPSG:4326 is a real warp
_CRS = "EPSG:32631"
_ORIGIN = (500_000.0, 5_000_000.0)
_RES = 10.0
#: the sharded-write case: small enough to run in a second, large enough that
#: concurrent read-modify-writes of one shard reliably lose data
_SHARD_N, _SHARD_S, _SHARD_C = 400, 200, 50


@dataclass
class Outcome:
    """What one side returned: a verdict against the truth, in words, and its request count."""

    verdict: Verdict
    detail: str
    requests: int | None = None

    @property
    def correct(self) -> bool:
        return self.verdict == "correct"


@dataclass
class CaseResult:
    """One scenario, both sides."""

    name: str
    title: str
    expected: str
    raw: Outcome
    cloudio: Outcome
    seconds: float = 0.0

    @property
    def skipped(self) -> bool:
        return self.cloudio.verdict == "skipped"

    @property
    def consistent(self) -> bool:
        """cloudio returned the truth (the raw side may or may not have)."""
        return self.cloudio.correct

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["consistent"] = self.consistent
        return d


class Skip(Exception):
    """A case cannot run here (a missing optional dependency); says what to install."""


@dataclass
class Context:
    """Where the cases write, and how requests are counted.

    Parameters
    ----------
    root
        A ``gs://bucket/prefix/`` the cases may fill (and that is cleaned up
        by whoever created it).
    emulator
        The emulator that serves ``root``, when cloudio started it: its
        request log gives the per-side request counts. ``None`` on a real
        bucket (counts are then not shown).
    folder
        A sub-folder each case writes into; ``cloudio check`` gives every case
        its own, ``cloudio demo`` shares one so that its steps build on each
        other.
    """

    root: str
    emulator: Emulator | None = None
    folder: str = ""
    state: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.root = self.root.rstrip("/") + "/"

    # -- paths -------------------------------------------------------------------------------

    def url(self, side: str, name: str) -> str:
        return f"{self.root}{side}/{self.folder}{name}"

    @property
    def on_emulator(self) -> bool:
        """Whether this run talks to an emulator (its limitations are then labelled as such)."""
        return emulator_endpoint() is not None

    @staticmethod
    def vsi(url: str) -> str:
        return parse_gcs(url).vsi

    # -- the raw libraries, configured only as a user would --------------------------------

    @property
    def storage_options(self) -> dict[str, Any]:
        """What a user passes to gcsfs/zarr/xarray for this endpoint (``{}`` on real GCS)."""
        return dict(gcsfs_options())

    def raw_fs(self) -> Any:
        """The user's plain gcsfs filesystem (fsspec's cached instance)."""
        prepare_gcsfs_import()
        import fsspec

        return fsspec.filesystem("gcs", **self.storage_options)

    def other_fs(self) -> Any:
        """A second, separate gcsfs instance: what another library or job writes with."""
        prepare_gcsfs_import()
        import gcsfs

        return gcsfs.GCSFileSystem(**self.storage_options, skip_instance_cache=True)

    @contextmanager
    def gdal_env(self) -> Iterator[None]:
        """Raw rasterio configured as users configure GDAL for GCS: process environment variables.

        On real GCS, credentials come from the environment (``GS_*``,
        ``GOOGLE_APPLICATION_CREDENTIALS``); the emulator's ``CPL_GS_ENDPOINT``
        and ``GS_NO_SIGN_REQUEST`` are set the same way, for this side only.
        (Passed as ``rasterio.Env`` options instead, rasterio 1.4.4 / GDAL 3.10
        re-lists the directory at each open, and GDAL issue 11351 does not show.)
        """
        import rasterio

        opts = gdal_options()
        saved = {k: os.environ.get(k) for k in opts}
        os.environ.update(opts)
        try:
            with rasterio.Env():
                yield
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    # -- counting ----------------------------------------------------------------------------

    def _nrequests(self) -> int | None:
        if self.emulator is None:
            return None
        try:
            return len(self.emulator.requests())
        except Exception:  # an attached emulator has no log here
            return None

    def side(self, fn: Callable[[], tuple[Verdict, str]]) -> Outcome:
        """Run one side, count its requests, turn an exception into an ``error`` outcome."""
        n0 = self._nrequests()
        try:
            verdict, detail = fn()
        except Skip as e:
            return Outcome("skipped", str(e))
        except Exception as e:  # the outcome *is* the error: report it, don't raise
            log.debug("side failed:\n%s", traceback.format_exc())
            verdict, detail = "error", _describe(e)
        n1 = self._nrequests()
        return Outcome(verdict, self.shorten(detail), None if n0 is None or n1 is None else n1 - n0)

    def shorten(self, text: str) -> str:
        """Paths in messages, relative to the run's prefix (the table names the prefix once)."""
        for prefix in (self.vsi(self.root), self.root, parse_gcs(self.root).fs_path + "/"):
            text = text.replace(prefix, "")
        return text


#: the part of GDAL's messages that explains nothing about the case
_GDAL_TAILS = (", and is not recognized as a supported dataset name", ", unless CPL_VSIL_USE_TEMP_FILE")


def _describe(e: BaseException, with_type: bool = True) -> str:
    msg = " ".join(str(e).split()) or repr(e)
    for tail in _GDAL_TAILS:
        msg = msg.split(tail, 1)[0]
    if msg.startswith("Attempt to create new") and " failed: " in msg:  # GDAL's wrapper around the reason
        msg = msg.split(" failed: ", 1)[1]
    if len(msg) > 160:
        msg = msg[:157] + "..."
    return f"{type(e).__name__}: {msg}" if with_type else msg


@contextmanager
def _quiet() -> Iterator[None]:
    """Third-party warnings (zarr's consolidated-metadata notice, ...) are not outcomes."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


CaseFn = Callable[[Context], CaseResult]


def _named(name: str, title: str) -> Callable[[CaseFn], CaseFn]:
    """Give a case its short name (``cloudio check`` rows, JSON) and its title."""

    def deco(fn: CaseFn) -> CaseFn:
        fn.case_name = name  # type: ignore[attr-defined]
        fn.title = title  # type: ignore[attr-defined]
        return fn

    return deco


def _case(ctx: Context, fn: CaseFn, expected: str,
          raw: Callable[[], tuple[Verdict, str]], cio: Callable[[], tuple[Verdict, str]]) -> CaseResult:
    t0 = time.perf_counter()
    with _quiet():
        r = ctx.side(raw)
        c = ctx.side(cio)
    return CaseResult(case_name(fn), case_title(fn), expected, r, c, time.perf_counter() - t0)


# -- data -------------------------------------------------------------------------------------


def _profile(n: int) -> dict[str, Any]:
    from rasterio.transform import Affine

    x0, y0 = _ORIGIN
    return {
        "driver": "GTiff", "width": n, "height": n, "count": 1, "dtype": "uint8",
        "crs": _CRS, "transform": Affine(_RES, 0.0, x0, 0.0, -_RES, y0),
        "tiled": True, "blockxsize": 32, "blockysize": 32,
    }


def _geotiff_bytes(n: int, value: int) -> bytes:
    """A GeoTIFF made with rasterio in memory: what a raw user uploads with gcsfs."""
    from rasterio.io import MemoryFile

    with MemoryFile() as mf:
        with mf.open(**_profile(n)) as dst:
            dst.write(np.full((1, n, n), value, "uint8"))
        return bytes(mf.read())


def _vrt_xml(vrt: Any) -> bytes:
    """A dataset's VRT XML, rendered in memory by GDAL (what a user then uploads)."""
    import rasterio.shutil
    from rasterio.io import MemoryFile

    with MemoryFile(ext=".vrt") as mf:
        rasterio.shutil.copy(vrt, mf.name, driver="VRT")
        return bytes(mf.read())


def _cloudio_write_geotiff(url: str, n: int, value: int) -> None:
    import cloudio

    with cloudio.open(url, "w", **_profile(n)) as dst:
        dst.write(np.full((1, n, n), value, "uint8"))


def _raster_summary(ds: Any) -> tuple[tuple[int, int], set[int]]:
    band = ds.read(1)
    return band.shape, {int(v) for v in np.unique(band)[:4]}


def _fmt_raster(shape: tuple[int, int], values: set[int]) -> str:
    vals = ", ".join(str(v) for v in sorted(values))
    return f"{shape[0]}x{shape[1]}, value {vals}"


def _names(paths: list[str]) -> list[str]:
    return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in paths)


# -- rasters ----------------------------------------------------------------------------------


@_named("write", "Write a GeoTIFF")
def write_geotiff(ctx: Context) -> CaseResult:
    """Write a GeoTIFF to the bucket.

    Raw GDAL refuses to create a GeoTIFF on ``/vsigs/`` (random writes need
    ``CPL_VSIL_USE_TEMP_FILE_FOR_RANDOM_WRITE``), on real GCS as on the
    emulator. With that option set, GDAL uploads with an XML-API PUT, which
    the emulator does not support: that outcome is labelled as the emulator's.
    """
    import rasterio

    n, value = 64, 1

    def raw() -> tuple[Verdict, str]:
        url = ctx.url(RAW, "scene.tif")
        ctx.state["raw_scene"] = url
        try:
            with ctx.gdal_env():
                with rasterio.open(ctx.vsi(url), "w", **_profile(n)) as dst:
                    dst.write(np.full((1, n, n), value, "uint8"))
            problem = None
        except Exception as e:
            problem = _describe(e, with_type=False)
        fs = ctx.raw_fs()
        ok = fs.exists(url) and fs.info(url)["size"] > 0
        # the later steps need the file: upload it the raw way (rasterio in memory + gcsfs)
        ctx.raw_fs().pipe(url, _geotiff_bytes(n, value))
        if problem is not None:  # GDAL's own limitation, the same on real GCS
            return "error", f"rasterio.open(..., 'w'): {problem} (then uploaded with gcsfs)"
        if not ok:
            if ctx.on_emulator:
                return "error", ("emulator limitation: GDAL's upload is an XML-API PUT, which "
                                 "fake-gcs-server does not support (uploaded with gcsfs instead)")
            return "error", "rasterio wrote nothing: the object does not exist (uploaded with gcsfs instead)"
        return "correct", "written by GDAL"

    def cio() -> tuple[Verdict, str]:
        import cloudio

        url = ctx.url(CLOUDIO, "scene.tif")
        ctx.state["cloudio_scene"] = url
        _cloudio_write_geotiff(url, n, value)
        with cloudio.open(url) as ds:
            shape, values = _raster_summary(ds)
        if shape == (n, n) and values == {value}:
            return "correct", f"written and read back: {_fmt_raster(shape, values)}"
        return "wrong", f"read back {_fmt_raster(shape, values)}"

    return _case(ctx, write_geotiff, f"{n}x{n}, value {value}", raw, cio)


def _scene(ctx: Context, side: str) -> str:
    """The GeoTIFF a raster step works on (written now unless an earlier step did)."""
    key = f"{side}_scene"
    if key not in ctx.state:
        url = ctx.url(side, "scene.tif")
        if side == RAW:
            ctx.raw_fs().pipe(url, _geotiff_bytes(64, 1))
        else:
            _cloudio_write_geotiff(url, 64, 1)
        ctx.state[key] = url
    return str(ctx.state[key])


@_named("overwrite", "Overwrite a GeoTIFF, read it again")
def overwrite(ctx: Context) -> CaseResult:
    """A GeoTIFF is read, overwritten (bigger, new values), and read again."""
    import rasterio

    def raw() -> tuple[Verdict, str]:
        url = _scene(ctx, RAW)
        with ctx.gdal_env():
            with rasterio.open(ctx.vsi(url)) as ds:  # warms GDAL's cache
                _raster_summary(ds)
            ctx.other_fs().pipe(url, _geotiff_bytes(128, 2))  # GDAL cannot write it, gcsfs can
            with rasterio.open(ctx.vsi(url)) as ds:
                shape, values = _raster_summary(ds)
        if shape == (128, 128) and values == {2}:
            return "correct", _fmt_raster(shape, values)
        return "stale", f"{_fmt_raster(shape, values)} (the old file)"

    def cio() -> tuple[Verdict, str]:
        import cloudio

        url = _scene(ctx, CLOUDIO)
        with cloudio.open(url) as ds:
            _raster_summary(ds)
        _cloudio_write_geotiff(url, 128, 2)
        with cloudio.open(url) as ds:
            shape, values = _raster_summary(ds)
        if shape == (128, 128) and values == {2}:
            return "correct", _fmt_raster(shape, values)
        return "stale", f"{_fmt_raster(shape, values)} (the old file)"

    return _case(ctx, overwrite, "128x128, value 2", raw, cio)


def _vrt_source(ctx: Context, side: str) -> str:
    """The WarpedVRT's source: a GeoTIFF in a fresh ``warp/`` folder, written the side's way."""
    url = ctx.url(side, "warp/scene.tif")
    if side == RAW:
        ctx.raw_fs().pipe(url, _geotiff_bytes(64, 1))
    else:
        _cloudio_write_geotiff(url, 64, 1)
    return url


@_named("vrt", "Save a WarpedVRT next to its source, reopen it")
def vrt_next_to_source(ctx: Context) -> CaseResult:
    """A WarpedVRT saved in the prefix of its source (which GDAL has listed), reopened at once.

    rasterio issue 3254, GDAL issue 11351: raw GDAL answers "does not exist"
    from its cached listing of the folder. The raw side renders the VRT with
    GDAL and uploads it with a separate gcsfs client (the JSON API): GDAL's own
    ``/vsigs/`` upload is an XML-API PUT, which the emulator does not support,
    and its failure would hide the cache bug behind an emulator limitation.

    The source is a GeoTIFF of its own, in a folder nobody touched before:
    GDAL does not trust a listing it made of an empty folder (as step 1's
    refused write leaves in ``cloudio demo``) and would then ask for each file.
    """
    import rasterio
    from rasterio.vrt import WarpedVRT

    def raw() -> tuple[Verdict, str]:
        src_url = _vrt_source(ctx, RAW)
        vrt_url = ctx.url(RAW, "warp/scene_4326.vrt")
        with ctx.gdal_env():
            with rasterio.open(ctx.vsi(src_url)) as src, WarpedVRT(src, crs="EPSG:4326") as vrt:
                expected = vrt.read(1)
                xml = _vrt_xml(vrt)
            # another client saves it (GDAL's own /vsigs/ upload is an XML-API PUT the emulator lacks)
            ctx.other_fs().pipe(vrt_url, xml)
            saved = "saved with gcsfs"
            try:
                with rasterio.open(ctx.vsi(vrt_url)) as v:
                    got = v.read(1)
            except Exception as e:
                return "error", f"{saved}; rasterio.open: {_describe(e, with_type=False)}"
        if got.shape == expected.shape and np.array_equal(got, expected):
            return "correct", f"{saved}; reopened {got.shape[0]}x{got.shape[1]} EPSG:4326"
        return "wrong", f"{saved}; reopened pixels differ from the warp"

    def cio() -> tuple[Verdict, str]:
        import cloudio

        src_url = _vrt_source(ctx, CLOUDIO)
        vrt_url = ctx.url(CLOUDIO, "warp/scene_4326.vrt")
        with cloudio.open(src_url) as src, WarpedVRT(src, crs="EPSG:4326") as vrt:
            expected = vrt.read(1)
            cloudio.write_vrt(vrt, vrt_url)
        with cloudio.open(vrt_url) as v:
            got = v.read(1)
            crs = v.crs
        if got.shape == expected.shape and np.array_equal(got, expected) and crs == "EPSG:4326":
            return "correct", f"saved; reopened {got.shape[0]}x{got.shape[1]} EPSG:4326, pixels match"
        return "wrong", f"reopened {got.shape} {crs}: differs from the warp"

    return _case(ctx, vrt_next_to_source, "the warped raster (EPSG:4326)", raw, cio)


# -- fsspec listings --------------------------------------------------------------------------


@_named("delete", "Delete an object in a listed prefix")
def delete(ctx: Context) -> CaseResult:
    """gcsfs lists a prefix, an object in it is deleted by another writer, gcsfs asks again."""

    def raw() -> tuple[Verdict, str]:
        url = ctx.url(RAW, "gone/a.bin")
        fs = ctx.raw_fs()
        fs.pipe(url, b"x" * 10)
        fs.ls(ctx.url(RAW, "gone/"))  # the listing is cached
        ctx.other_fs().rm(url)
        exists = fs.exists(url)
        return ("stale", "exists() is still True") if exists else ("correct", "exists() is False")

    def cio() -> tuple[Verdict, str]:
        import cloudio

        url = ctx.url(CLOUDIO, "gone/a.bin")
        cfs = cloudio.filesystem(url)
        cfs.pipe(url, b"x" * 10)
        fs = ctx.raw_fs()
        fs.ls(ctx.url(CLOUDIO, "gone/"))
        cfs.rm(url)
        exists = fs.exists(url)
        return ("stale", "exists() is still True") if exists else ("correct", "exists() is False")

    return _case(ctx, delete, "exists() is False", raw, cio)


@_named("new-object", "New object in a listed prefix")
def new_object(ctx: Context) -> CaseResult:
    """gcsfs lists a prefix, another writer adds an object there, gcsfs lists again."""

    def run(side: str, writer: Any) -> tuple[Verdict, str]:
        d = ctx.url(side, "listed/")
        fs = ctx.raw_fs()
        fs.pipe(d + "a.bin", b"a")
        fs.ls(d)  # the listing is cached
        writer.pipe(d + "b.bin", b"b")
        names = _names(fs.ls(d))
        if names == ["a.bin", "b.bin"]:
            return "correct", "ls() shows a.bin, b.bin"
        return "stale", f"ls() shows {', '.join(names)}: b.bin missing"

    def raw() -> tuple[Verdict, str]:
        return run(RAW, ctx.other_fs())

    def cio() -> tuple[Verdict, str]:
        import cloudio

        return run(CLOUDIO, cloudio.filesystem(ctx.url(CLOUDIO, "listed/")))

    return _case(ctx, new_object, "ls() shows a.bin, b.bin", raw, cio)


# -- Zarr and Xarray --------------------------------------------------------------------------


@_named("zarr-member", "Zarr group member added by a second writer")
def zarr_member_added(ctx: Context) -> CaseResult:
    """A Zarr group is read; a second writer adds array ``y``; the group is opened again."""
    import zarr

    def raw() -> tuple[Verdict, str]:
        url = ctx.url(RAW, "group.zarr")
        so = ctx.storage_options
        g = zarr.open_group(url, mode="w", storage_options=so, zarr_format=3)
        g.create_array("x", shape=(4,), dtype="i4")
        sorted(zarr.open_group(url, mode="r", storage_options=so).array_keys())  # read: listing cached
        from fsspec.implementations.asyn_wrapper import AsyncFileSystemWrapper
        from zarr.storage import FsspecStore

        # a second writer with its own gcsfs instance (another job, process or library)
        other = FsspecStore(AsyncFileSystemWrapper(ctx.other_fs()), path=parse_gcs(url).fs_path)
        zarr.open_group(other, mode="a").create_array("y", shape=(4,), dtype="i4")
        keys = sorted(zarr.open_group(url, mode="r", storage_options=so).array_keys())
        if keys == ["x", "y"]:
            return "correct", "members: x, y"
        return "stale", f"members: {', '.join(keys)} (y missing)"

    def cio() -> tuple[Verdict, str]:
        import cloudio

        url = ctx.url(CLOUDIO, "group.zarr")
        g = zarr.open_group(cloudio.zarr_store(url), mode="w", zarr_format=3)
        g.create_array("x", shape=(4,), dtype="i4")
        sorted(zarr.open_group(cloudio.zarr_store(url, read_only=True), mode="r").array_keys())
        zarr.open_group(cloudio.zarr_store(url), mode="a").create_array("y", shape=(4,), dtype="i4")
        keys = sorted(zarr.open_group(cloudio.zarr_store(url, read_only=True), mode="r").array_keys())
        if keys == ["x", "y"]:
            return "correct", "members: x, y"
        return "stale", f"members: {', '.join(keys)} (y missing)"

    return _case(ctx, zarr_member_added, "members: x, y", raw, cio)


def _dask_dataset() -> tuple[Any, np.ndarray]:
    try:
        import dask.array as da
    except ImportError as e:
        raise Skip("needs dask: pip install 'cloudio[dask]'") from e
    import xarray as xr

    n, c = _SHARD_N, _SHARD_C
    data = np.arange(n * n, dtype="float32").reshape(n, n)
    ds = xr.Dataset({"v": (("y", "x"), da.from_array(data, chunks=(c, c)))},
                    coords={"y": np.arange(n), "x": np.arange(n)})
    return ds, data


def _shard_encoding() -> dict[str, Any]:
    return {"v": {"chunks": (_SHARD_C, _SHARD_C), "shards": (_SHARD_S, _SHARD_S)}}


def _wrong(got: np.ndarray, want: np.ndarray) -> int:
    if got.shape != want.shape:
        return int(want.size)
    return int(np.count_nonzero(got != want))


@_named("sharded-dask", f"Sharded Zarr v3 from Xarray + Dask ({_SHARD_C}x{_SHARD_C} chunks into "
                        f"{_SHARD_S}x{_SHARD_S} shards)")
def sharded_dask_write(ctx: Context) -> CaseResult:
    """Xarray writes a sharded Zarr v3 array from Dask chunks smaller than a shard."""
    n = _SHARD_N

    def raw() -> tuple[Verdict, str]:
        import xarray as xr

        ds, data = _dask_dataset()
        url = ctx.url(RAW, "cube.zarr")
        ctx.state["raw_cube"] = url
        so = ctx.storage_options
        try:
            ds.to_zarr(url, mode="w", zarr_format=3, encoding=_shard_encoding(), storage_options=so,
                       consolidated=False)
            first = "default: written"
        except ValueError as e:
            first = "default: ValueError (Dask chunks overlap a shard)" if "overlap" in str(e) else _describe(e)
        ds.to_zarr(url, mode="w", zarr_format=3, encoding=_shard_encoding(), storage_options=so,
                   consolidated=False, safe_chunks=False)
        got = xr.open_zarr(url, storage_options=so, consolidated=False)["v"].values
        wrong = _wrong(got, data)
        if wrong:
            return "wrong", f"{first}; safe_chunks=False: {wrong:,} of {data.size:,} values wrong"
        return "correct", f"{first}; safe_chunks=False: all {data.size:,} values right (this time)"

    def cio() -> tuple[Verdict, str]:
        import cloudio

        ds, data = _dask_dataset()
        url = ctx.url(CLOUDIO, "cube.zarr")
        ctx.state["cloudio_cube"] = url
        cloudio.to_zarr(ds, url, mode="w", zarr_format=3, encoding=_shard_encoding())
        got = cloudio.open_zarr(url)["v"].values
        wrong = _wrong(got, data)
        if wrong:
            return "wrong", f"{wrong:,} of {data.size:,} values wrong"
        return "correct", f"all {data.size:,} values right"

    return _case(ctx, sharded_dask_write, f"{n}x{n} values, all right", raw, cio)


@_named("append", "Append a variable, reopen the store")
def append_variable(ctx: Context) -> CaseResult:
    """A variable is appended to the store from the previous step; the store is opened again.

    The reader had the dataset open and the store listed (a plain gcsfs
    filesystem, as a user browsing the bucket holds) before the append.
    """
    import xarray as xr

    def new_var(ds: Any) -> Any:
        # Dask chunks equal to the shard: the append itself is safe in both sides
        return xr.Dataset({"w": ds["v"] * 2}).chunk({"y": _SHARD_S, "x": _SHARD_S})

    def check(opened: Any, listing: list[str], want: np.ndarray) -> tuple[Verdict, str]:
        names = sorted(opened.data_vars)
        ok = names == ["v", "w"] and not _wrong(opened["w"].values, want)
        parts = [f"xarray sees {', '.join(names)}" + ("" if ok or "w" not in names else " (w wrong)")]
        if "w" in listing:
            parts.append("ls() lists w/")
        else:
            ok = False
            parts.append(f"ls() lists {', '.join(n for n in listing if not n.startswith('.'))}: no w/")
        return ("correct" if ok else "stale"), "; ".join(parts)

    def raw() -> tuple[Verdict, str]:
        ds, data = _dask_dataset()
        so = ctx.storage_options
        url = ctx.state.get("raw_cube") or ctx.url(RAW, "cube.zarr")
        ds = ds.chunk({"y": _SHARD_S, "x": _SHARD_S})
        if "raw_cube" not in ctx.state:
            ds.to_zarr(url, mode="w", zarr_format=3, encoding=_shard_encoding(), storage_options=so)
        fs = ctx.raw_fs()
        xr.open_zarr(url, storage_options=so)  # the reader has it open
        fs.ls(url)  # and listed
        new_var(ds).to_zarr(url, mode="a", storage_options=so,
                            encoding={"w": {"chunks": (_SHARD_C, _SHARD_C), "shards": (_SHARD_S, _SHARD_S)}})
        opened = xr.open_zarr(url, storage_options=so)
        return check(opened, _names(fs.ls(url)), data * 2)

    def cio() -> tuple[Verdict, str]:
        import cloudio

        ds, data = _dask_dataset()
        url = ctx.state.get("cloudio_cube") or ctx.url(CLOUDIO, "cube.zarr")
        if "cloudio_cube" not in ctx.state:
            cloudio.to_zarr(ds, url, mode="w", zarr_format=3, encoding=_shard_encoding())
        fs = ctx.raw_fs()
        cloudio.open_zarr(url)
        fs.ls(url)
        cloudio.to_zarr(new_var(ds), url, mode="a",
                        encoding={"w": {"chunks": (_SHARD_C, _SHARD_C), "shards": (_SHARD_S, _SHARD_S)}})
        opened = cloudio.open_zarr(url)
        return check(opened, _names(fs.ls(url)), data * 2)

    return _case(ctx, append_variable, "xarray sees v, w; ls() lists w/", raw, cio)


#: every staleness case ``cloudio check`` runs, in order
CHECK_CASES: tuple[CaseFn, ...] = (
    overwrite,
    delete,
    new_object,
    vrt_next_to_source,
    zarr_member_added,
    sharded_dask_write,
)

#: the steps of ``cloudio demo``: one story, each step building on the previous ones
DEMO_STEPS: tuple[CaseFn, ...] = (
    write_geotiff,
    vrt_next_to_source,
    overwrite,
    sharded_dask_write,
    append_variable,
)


def case_title(fn: CaseFn) -> str:
    """What a case shows, in a few words (progress lines, table rows)."""
    return str(getattr(fn, "title", fn.__name__))


def case_name(fn: CaseFn) -> str:
    """A case's short name (``overwrite``, ``vrt``, ...)."""
    return str(getattr(fn, "case_name", fn.__name__))


def new_run_prefix(base: str, command: str) -> str:
    """A fresh folder under ``base`` for one run (so runs never see each other's objects)."""
    return f"{base.rstrip('/')}/cloudio-{command}-{uuid.uuid4().hex[:8]}/"
