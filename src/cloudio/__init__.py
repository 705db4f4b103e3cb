"""cloudio: cloud objects written in a process are at once readable by GDAL/Rasterio,
fsspec/Zarr/Xarray and every worker of a Dask cluster.

``import cloudio`` does no work: the public names below load their modules on
first use, so no GDAL, gcsfs or emulator is touched until called.
"""

from __future__ import annotations

import concurrent.futures.thread  # noqa: F401  (see below)
import importlib
import logging
from typing import TYPE_CHECKING, Any

from cloudio.errors import (
    AlreadyExistsError,
    BucketNotFoundError,
    CloudioError,
    ConfigurationError,
    ConflictError,
    EmulatorError,
    IncompleteWriteError,
    IntegrityError,
    InvalidURLError,
    LocalFileNotFoundError,
    LoopNotRunningError,
    NotARasterError,
    ObjectNotFoundError,
    ReadError,
    StaleDatasetError,
    TransientError,
    UnsafeChunkingError,
    UploadError,
)

logging.getLogger(__name__).addHandler(logging.NullHandler())
# concurrent.futures.thread, imported above (a few ms), registers its hook with threading as it loads, which the
# interpreter refuses once it shuts down: a program whose first cloudio call is in an atexit handler got
# "RuntimeError: can't register atexit after shutdown" from cloudio's thread pools' first import

__version__ = "0.1.0"

# public name -> module that defines it
_LAZY = {
    "open": "._gdal.open",
    "write_vrt": "._gdal.vrt",
    "session": "._session",
    "invalidate": "._session",
    "filesystem": "._fsspec.filesystem",
    "zarr_store": "._zarr.store",
    "open_zarr": "._zarr.xarray",
    "to_zarr": "._zarr.xarray",
    "save_array": "._zarr.arrays",
    "load_array": "._zarr.arrays",
    "Emulator": ".emulator",
}

__all__ = [
    "AlreadyExistsError",
    "BucketNotFoundError",
    "CloudioError",
    "ConfigurationError",
    "ConflictError",
    "Emulator",
    "EmulatorError",
    "IncompleteWriteError",
    "IntegrityError",
    "InvalidURLError",
    "LocalFileNotFoundError",
    "LoopNotRunningError",
    "NotARasterError",
    "ObjectNotFoundError",
    "ReadError",
    "StaleDatasetError",
    "TransientError",
    "UnsafeChunkingError",
    "UploadError",
    "__version__",
    *_LAZY,
]
__all__ = list(dict.fromkeys(__all__))

if TYPE_CHECKING:  # the lazy names, for type checkers (`X as X`: re-exported)
    from cloudio._fsspec.filesystem import filesystem as filesystem
    from cloudio._gdal.open import open as open
    from cloudio._gdal.vrt import write_vrt as write_vrt
    from cloudio._session import invalidate as invalidate
    from cloudio._session import session as session
    from cloudio._zarr.arrays import load_array as load_array
    from cloudio._zarr.arrays import save_array as save_array
    from cloudio._zarr.store import zarr_store as zarr_store
    from cloudio._zarr.xarray import open_zarr as open_zarr
    from cloudio._zarr.xarray import to_zarr as to_zarr
    from cloudio.emulator import Emulator as Emulator

def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    if name == "dask":
        return importlib.import_module(".dask", __name__)
    raise AttributeError(f"module 'cloudio' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__) | {"dask"})
