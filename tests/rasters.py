"""Small GeoTIFFs the tests write and read back, shared so every test file makes them alike.

A raster filled with one value shows in its pixels which version of an
object a read saw; a raster of noise is big enough for reads to span several
byte ranges.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from typing import TYPE_CHECKING, Any

import numpy as np
from rasterio.io import MemoryFile

if TYPE_CHECKING:
    from affine import Affine

    from cloudio.emulator import Emulator


def tif(value: int, size: int = 64, *, tiled: bool = True, block: int = 16,
        transform: Affine | None = None, crs: str | None = None) -> bytes:
    """A one-band uint8 GeoTIFF of ``size`` x ``size`` pixels, all ``value``."""
    layout: dict[str, object] = {"tiled": True, "blockxsize": block, "blockysize": block} if tiled else {}
    if transform is not None:
        layout["transform"] = transform
    if crs is not None:
        layout["crs"] = crs
    with MemoryFile() as mem:
        with mem.open(driver="GTiff", width=size, height=size, count=1, dtype="uint8", **layout) as ds:
            ds.write(np.full((1, size, size), value, "uint8"))
        return bytes(mem.read())


def noise(size: int = 1024) -> np.ndarray:
    """The same pseudo-random pixels every call, shape ``(1, size, size)``."""
    return np.random.default_rng(7).integers(0, 255, (1, size, size), dtype="uint8")


def noise_tif(size: int = 1024) -> bytes:
    """A tiled GeoTIFF of :func:`noise` (about ``size * size`` bytes, so reads span several ranges)."""
    with MemoryFile() as mem:
        with mem.open(driver="GTiff", width=size, height=size, count=1, dtype="uint8",
                      tiled=True, blockxsize=128, blockysize=128) as ds:
            ds.write(noise(size))
        return bytes(mem.read())


def pixel(data: bytes) -> int:
    """The first pixel of a GeoTIFF given as bytes: which :func:`tif` it was."""
    with MemoryFile(data) as mem, mem.open() as ds:
        return int(ds.read(1)[0, 0])


def put(emu: Emulator, url: str, data: bytes) -> None:
    """Upload ``data`` to ``gs://bucket/key`` behind cloudio's back (nothing is journaled)."""
    bucket, key = url[len("gs://"):].split("/", 1)
    emu.client.bucket(bucket).blob(key).upload_from_string(data)


def overwritten_behind_a_listing(fs: Any, emu: Emulator, url: str, old: bytes, new: bytes) -> None:
    """``old`` piped to ``url`` through ``fs`` and its folder listed (``fs`` holds ``old``'s size), then ``new``
    uploaded there behind cloudio's back (:func:`put`): the listing ``fs`` holds is out of date."""
    fs.pipe(url, old)
    fs.ls(url.rsplit("/", 1)[0])
    put(emu, url, new)


def mosaic_vrt(sources: list[tuple[str, int, int]], size: int = 64, *, relative: bool = False) -> str:
    """A 1-band UInt16 VRT mosaic of ``size``-square sources placed at (xoff, yoff)."""
    width = max(x for _, x, _ in sources) + size
    height = max(y for _, _, y in sources) + size
    parts = [
        f'<SimpleSource><SourceFilename relativeToVRT="{int(relative)}">{src}</SourceFilename>'
        f'<SourceBand>1</SourceBand>'
        f'<SrcRect xOff="0" yOff="0" xSize="{size}" ySize="{size}"/>'
        f'<DstRect xOff="{x}" yOff="{y}" xSize="{size}" ySize="{size}"/></SimpleSource>'
        for src, x, y in sources
    ]
    return (f'<VRTDataset rasterXSize="{width}" rasterYSize="{height}">'
            f'<GeoTransform>500000, 10, 0, 4000000, 0, -10</GeoTransform>'
            f'<VRTRasterBand dataType="UInt16" band="1">{"".join(parts)}</VRTRasterBand></VRTDataset>')


def run_python(code: str, emu: Emulator) -> subprocess.CompletedProcess[str]:
    """``code`` in a new process pointed at ``emu`` (GDAL there has set no bucket's options yet)."""
    env = {**os.environ, "STORAGE_EMULATOR_HOST": emu.url}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=env, timeout=120)


def small_dataset(name: str = "a", rows: int = 4) -> Any:
    """An xarray Dataset of one ``rows`` x 4 float variable with y and x coordinates."""
    import xarray as xr

    return xr.Dataset({name: (("y", "x"), np.arange(rows * 4.0).reshape(rows, 4))},
                      coords={"y": np.arange(rows), "x": np.arange(4)})


def gcsfs_options(emu: Emulator) -> dict[str, str]:
    """storage_options for a plain (untracked) gcsfs on ``emu``."""
    return {"endpoint_url": emu.url, "token": "anon"}


#: a 64-square georeferenced uint8 GeoTIFF's profile for ``cloudio.open(url, "w", **PROFILE)``
PROFILE: dict[str, Any] = dict(driver="GTiff", width=64, height=64, count=1, dtype="uint8", crs="EPSG:32633",
                               transform=(10, 0, 500000, 0, -10, 4000000))


def profile8(**more: Any) -> dict[str, Any]:
    """:data:`PROFILE` with its transform an ``Affine``, as rasterio takes it, and ``more``."""
    from affine import Affine

    return {**PROFILE, "transform": Affine(*PROFILE["transform"]), **more}


def write8(url: str, value: int, size: int = 64, **opts: Any) -> None:
    """Through cloudio: a ``size``-square :func:`profile8` GeoTIFF of ``value`` (``opts``: more of the profile)."""
    import cloudio

    with cloudio.open(url, "w", **profile8(width=size, height=size, **opts)) as ds:
        ds.write(np.full((1, size, size), value, "uint8"))


def object_names(emu: Emulator, bucket: str) -> list[str]:
    """The names of the objects in ``bucket`` (``gs://name``), sorted, as the server lists them."""
    return sorted(b.name for b in emu.client.list_blobs(bucket[len("gs://"):]))


def write_half_masked(url: str, value: int) -> None:
    """Write ``value`` everywhere through cloudio, with an external ``.msk`` masking the lower half."""
    import rasterio
    from affine import Affine

    import cloudio

    profile = {**PROFILE, "transform": Affine(*PROFILE["transform"])}
    with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=False):
        with cloudio.open(url, "w", **profile) as ds:
            ds.write(np.full((1, 64, 64), value, "uint8"))
            m = np.zeros((64, 64), "uint8")
            m[:32] = 255
            ds.write_mask(m)


def vrt_xml(source_vsi: str, size: int = 64) -> bytes:
    """A one-band VRT reading all of ``source_vsi`` (no SourceProperties: GDAL opens the source to learn them)."""
    return (f'<VRTDataset rasterXSize="{size}" rasterYSize="{size}">'
            f'<VRTRasterBand dataType="Byte" band="1"><SimpleSource>'
            f'<SourceFilename relativeToVRT="0">{source_vsi}</SourceFilename>'
            f'<SourceBand>1</SourceBand></SimpleSource></VRTRasterBand></VRTDataset>').encode()


def nested_vrt(emu: Emulator, bucket_url: str) -> tuple[str, str]:
    """Put ``h/outer.vrt`` -> ``g/inner.vrt`` -> ``g/src.tif`` (value 1) as another writer; (outer URL, src URL)."""
    bucket = bucket_url[len("gs://"):].split("/", 1)[0]
    src = f"{bucket_url}/g/src.tif"
    put(emu, src, tif(1))
    put(emu, f"{bucket_url}/g/inner.vrt", vrt_xml(f"/vsigs/{bucket}/g/src.tif"))
    outer = f"{bucket_url}/h/outer.vrt"
    put(emu, outer, vrt_xml(f"/vsigs/{bucket}/g/inner.vrt"))
    return outer, src


def external_overview(tif_bytes: bytes, folder: os.PathLike[str] | str) -> bytes:
    """The ``.ovr`` GDAL builds for a GeoTIFF opened read-only (external overviews, factor 2)."""
    import rasterio
    from rasterio.enums import Resampling

    local = os.path.join(os.fspath(folder), "ovr_src.tif")
    with open(local, "wb") as f:
        f.write(tif_bytes)
    with rasterio.Env(TIFF_USE_OVR=True), rasterio.open(local, "r+") as ds:
        ds.build_overviews([2], Resampling.nearest)
    with open(local + ".ovr", "rb") as f:
        return f.read()


def workers_of(client) -> list[str]:
    """The addresses of a 2-worker Dask cluster's workers, once both are up."""
    client.wait_for_workers(2, timeout=60)
    return sorted(client.nthreads())


def write_flat_tif(url: str, n: int, value: int) -> str:
    """An ``n`` x ``n`` GeoTIFF of ``value`` written through cloudio (run on Dask workers too)."""
    from affine import Affine

    import cloudio

    with cloudio.open(url, "w", driver="GTiff", width=n, height=n, count=1, dtype="uint8",
                      transform=Affine.identity()) as dst:
        dst.write(np.full((1, n, n), value, "uint8"))
    return url


def read_flat_tif(url: str) -> tuple[tuple[int, int], int, int]:
    """Shape, min and max of band 1 read through cloudio."""
    import cloudio

    with cloudio.open(url) as src:
        a = src.read(1)
        return src.shape, int(a.min()), int(a.max())


def seeded16(seed: int, size: int = 64) -> np.ndarray:
    """One band of uint16 noise from ``seed`` (never 0, the nodata of :func:`write16`): a version told by its seed."""
    return (np.random.default_rng(seed).integers(1, 60000, (1, size, size))).astype("uint16")


#: where :func:`write16`'s rasters lie (EPSG:32633, 10 m pixels)
GRID16 = (10, 0, 500000, 0, -10, 4000000)


def write16(url: str, data: np.ndarray, **kw: Any) -> None:
    """``data`` (bands, rows, columns) of uint16 as a GeoTIFF through ``cloudio.open(url, "w")``, on :data:`GRID16`."""
    from affine import Affine

    import cloudio

    prof = {"driver": "GTiff", "count": 1, "dtype": "uint16", "crs": "EPSG:32633", "transform": Affine(*GRID16),
            "nodata": 0, "width": data.shape[2], "height": data.shape[1], **kw}
    with cloudio.open(url, "w", **prof) as ds:
        ds.write(data)


def vrts_over(src: str, seed: int, *vrts: str) -> None:
    """Through cloudio: ``src`` as :func:`seeded16` of ``seed``, then each of ``vrts`` a mosaic VRT over the one
    before it (the first over ``src``): a VRT, or VRTs nested in VRTs."""
    import cloudio

    write16(src, seeded16(seed))
    below = src
    for vrt in vrts:
        cloudio.write_vrt(mosaic_vrt([(below, 0, 0)]), vrt)
        below = vrt

