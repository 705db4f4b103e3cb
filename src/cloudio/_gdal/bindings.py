"""Reaching libgdal: the few VSI calls cloudio makes, through the GDAL rasterio already loaded.

Everything here is a side effect on GDAL's process-wide state; the logic that
decides *when* to call them (:mod:`cloudio._gdal.consumer`) takes them as
collaborators, so that it can be tested without GDAL.

* :func:`clear` is ``VSICurlPartialClearCache``: it drops every cached byte
  range, file property and listing whose path starts with the given string
  (see :mod:`cloudio._gdal.consumer` for what that means for files and
  directories). Safe while other objects are read (GDAL's caches lock
  themselves); what must not overlap I/O of an object is a change of its
  content, see :mod:`cloudio._gdal.gates`.
* :func:`set_path_option` / :func:`clear_path_options` are
  ``VSISetPathSpecificOption`` / ``VSIClearPathSpecificOptions`` (GDAL >= 3.6):
  options looked up by string prefix, in every thread, outliving any
  ``rasterio.Env``.
* :func:`vsi_readdir` is ``VSIReadDir``: the listing GDAL makes, then caches.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Callable

from cloudio._session import count

log = logging.getLogger(__name__)

__all__ = ["clear", "clear_path_options", "set_path_option", "vsi_readdir"]

_lib_handle: ctypes.CDLL | None = None


def _lib() -> ctypes.CDLL:
    """The symbols of the libgdal rasterio already loaded, through its own extension module (never a second copy)."""
    global _lib_handle
    if _lib_handle is None:
        import rasterio._env

        lib = ctypes.CDLL(rasterio._env.__file__)
        lib.VSICurlPartialClearCache.argtypes = [ctypes.c_char_p]
        lib.VSICurlPartialClearCache.restype = None
        lib.VSISetPathSpecificOption.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p]
        lib.VSISetPathSpecificOption.restype = None
        lib.VSIClearPathSpecificOptions.argtypes = [ctypes.c_char_p]
        lib.VSIClearPathSpecificOptions.restype = None
        lib.VSIReadDir.argtypes = [ctypes.c_char_p]
        lib.VSIReadDir.restype = ctypes.POINTER(ctypes.c_char_p)
        lib.CSLDestroy.argtypes = [ctypes.POINTER(ctypes.c_char_p)]
        lib.CSLDestroy.restype = None
        _lib_handle = lib
    return _lib_handle


def vsi_readdir(vsi_dir: str) -> list[str]:
    """GDAL's own ``VSIReadDir``: the listing GDAL makes, and then keeps in its cache."""
    lib = _lib()
    arr = lib.VSIReadDir(vsi_dir.encode())
    names: list[str] = []
    if arr:
        while arr[len(names)] is not None:
            names.append(arr[len(names)].decode())
        lib.CSLDestroy(arr)
    return names


_clear_fn: Callable[[str], None] | None = None


def _partial_clear(vsi_prefix: str) -> None:
    """GDAL's ``VSICurlPartialClearCache``: ``rasterio.cache.invalidate`` (rasterio >= 1.5) or ctypes."""
    global _clear_fn
    if _clear_fn is None:
        try:
            from rasterio.cache import invalidate  # rasterio >= 1.5; passes /vsigs/ paths through

            _clear_fn = invalidate
        except ImportError:
            fn = _lib().VSICurlPartialClearCache
            _clear_fn = lambda prefix: fn(prefix.encode())  # noqa: E731
    _clear_fn(vsi_prefix)


def clear(vsi_prefix: str) -> None:
    """Drop everything GDAL caches whose path starts with ``vsi_prefix`` (a plain string prefix)."""
    _partial_clear(vsi_prefix)
    count("invalidations", cache="gdal")
    log.debug("gdal: cleared %s", vsi_prefix)


def set_path_option(prefix: str, key: str, value: str | None) -> None:
    """``VSISetPathSpecificOption`` (GDAL >= 3.6): ``key=value`` for every path under ``prefix``; None removes
    ``key`` alone (the other options of ``prefix`` stay in force throughout)."""
    _lib().VSISetPathSpecificOption(prefix.encode(), key.encode(), None if value is None else value.encode())


def clear_path_options(prefix: str) -> None:
    """``VSIClearPathSpecificOptions`` for exactly ``prefix``."""
    _lib().VSIClearPathSpecificOptions(prefix.encode())
