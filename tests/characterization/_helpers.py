"""Helpers for the characterization tests: raw libraries, configured by hand."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gcsfs.core import GCSFileSystem

    from cloudio.emulator import Emulator


#: asynchronous gcsfs instances are never let go: gcsfs's finalizer closes their
#: sessions on fsspec's loop, not the one that owns them (zarr's), and raises
#: "attached to a different loop" from the garbage collector, in whatever later
#: test happens to trigger a collection.
KEEP_ASYNC: list[object] = []


def raw_gcsfs(emu: Emulator, *, separate: bool = False, asynchronous: bool = False) -> GCSFileSystem:
    """A plain gcsfs filesystem on the emulator.

    ``separate=True`` makes a new instance with its own listing cache (another
    writer); otherwise fsspec hands back the instance it already has for these
    arguments, as it does in user code.
    """
    from gcsfs.core import GCSFileSystem

    fs = GCSFileSystem(
        endpoint_url=emu.url, token="anon", skip_instance_cache=separate, asynchronous=asynchronous
    )
    assert type(fs) is GCSFileSystem  # the raw library, nothing wrapped
    if asynchronous:
        KEEP_ASYNC.append(fs)
    return fs


def geotiff(size: int, value: int) -> bytes:
    """A ``size`` x ``size`` single-band uint8 GeoTIFF filled with ``value``, in strips."""
    from rasters import tif

    return tif(value, size, tiled=False)


def gdal_readdir(path: str) -> list[str]:
    """GDAL's own ``VSIReadDir(path)`` (a ctypes binding only: no cloudio cache in the way)."""
    from cloudio._gdal.bindings import vsi_readdir

    return sorted(vsi_readdir(path))


def rasterio_version() -> tuple[int, int]:
    import rasterio

    major, minor = rasterio.__version__.split(".")[:2]
    return int(major), int(minor)
