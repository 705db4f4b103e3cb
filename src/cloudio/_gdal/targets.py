"""Path helpers of the GDAL face: how GDAL names an object, its directory and its sidecars.

Pure functions of the path (no GDAL, no I/O). GDAL keys a directory's listing
by its path without a trailing '/' (``/vsigs/b/d``), and options and cache
clears match by plain string prefix, so a name that merely starts with
another's is affected by what is set on it (see :func:`is_sidecar`).
"""

from __future__ import annotations

from typing import NamedTuple

from cloudio._paths import GCSPath

__all__ = ["Target", "dir_key", "is_sidecar", "may_reference", "split_vsi", "target"]

#: names GDAL probes next to any raster whatever its own name (seen in its request log)
_DIR_SIDECARS = frozenset({"metadata.dim", "summary.txt", "hdr.txt", "rpc.txt", "metadata.xml"})
#: drivers whose datasets reference other files that GDAL opens itself
_REFERENCING_SUFFIXES = (".vrt", ".xml")


def may_reference(name: str) -> bool:
    """Could GDAL open ``name`` (a path or key) as a dataset of other files' pixels? A ``.vrt``, or an
    ``.xml`` (a VRT saved under that name: GDAL knows a VRT by its content)."""
    return name.lower().endswith(_REFERENCING_SUFFIXES)


def split_vsi(path: GCSPath) -> tuple[str, str]:
    """``(directory as GDAL keys its listing, name)``: ``("/vsigs/b/d", "a.tif")``."""
    vsi = path.vsi
    i = vsi.rfind("/")
    return vsi[:i], vsi[i + 1:]


class Target(NamedTuple):
    """An object to open, with what every open needs precomputed (cached per URL by the caller)."""

    path: GCSPath
    vsi: str  #: /vsigs/b/d/a.tif: what rasterio.open gets (a gs:// URL costs rasterio a parse per open)
    dir: str  #: /vsigs/b/d, the key of GDAL's listing
    name: str  #: a.tif
    vrt: bool  #: GDAL may open sources of it itself (:func:`may_reference`)
    shown: str  #: the dataset's ``.name``: what rasterio.open of the user's spelling would report


def target(path: GCSPath, spelling: str | None = None) -> Target:
    """``spelling``: the URL as the user wrote it; rasterio names a dataset opened as gs://b/k so."""
    vsi = path.vsi
    i = vsi.rfind("/")
    shown = vsi
    if spelling is not None and spelling == path.url and not any(c in spelling for c in "?#%"):
        shown = spelling
    return Target(path, vsi, vsi[:i], vsi[i + 1:], may_reference(vsi), shown)


def dir_key(path: GCSPath) -> str:
    """The directory holding ``path`` as GDAL keys its listing: ``/vsigs/b/d`` (no '/')."""
    return split_vsi(path)[0]


def is_sidecar(candidate: str, name: str) -> bool:
    """Could GDAL read ``candidate`` (a sibling's name) as part of the dataset ``name``?

    Also true for names that merely start with ``name``: a path-specific
    option set on ``name`` would apply to them too.
    """
    c, n = candidate.lower(), name.lower()
    if c == n:
        return False
    stem = n.rsplit(".", 1)[0]
    return c.startswith((n, stem + ".", stem + "_")) or c in _DIR_SIDECARS
