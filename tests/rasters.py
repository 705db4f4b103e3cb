"""Small GeoTIFFs the tests write and read back, shared so every test file makes them alike.

A raster filled with one value shows in its pixels which version of an
object a read saw; a raster of noise is big enough for reads to span several
byte ranges.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

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
