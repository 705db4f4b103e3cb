"""Plain (untracked) gcsfs filesystems configured for the endpoint in force.

cloudio's own uploads and metadata requests go through these; user-facing
tracked filesystems live in :mod:`cloudio._fsspec.filesystem`.

Time limits. gcsfs waits forever by default: a server that accepts and never
answers hangs ``cat`` for good. Every filesystem cloudio makes (these, and
:func:`cloudio.filesystem`) passes gcsfs ``requests_timeout`` as an
``aiohttp.ClientTimeout`` with connect and read limits of
``CLOUDIO_HTTP_TIMEOUT`` seconds (default 30, :func:`cloudio._config.http_timeout`,
shared with GDAL): a request may take as long as
bytes keep arriving, but no step may stay silent longer. gcsfs retries such a
failure up to 6 times with backoff; a tracked filesystem also bounds one
whole call, retries included, to ``TOTAL_FACTOR`` times the limit, and raises
:class:`~cloudio.TransientError` past it. An explicit ``requests_timeout``
storage option wins over the environment variable.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from cloudio._config import gcsfs_options, http_timeout, prepare_gcsfs_import, require_credentials

if TYPE_CHECKING:
    import gcsfs

#: one tracked call, gcsfs's retries included, may take this many times the limit
TOTAL_FACTOR = 3


#: asynchronous instances cloudio made, kept for the life of the process. gcsfs's
#: finalizer closes an asynchronous instance's session on fsspec's own loop, not
#: the loop (zarr's) that owns it, and raises "attached to a different loop" from
#: the garbage collector (fsspec/gcsfs#606 fixed the synchronous case only). They
#: live as long as fsspec's instance cache would keep them anyway; this only
#: stops ``clear_instance_cache()`` from handing them to that finalizer.
_keep_async: list["gcsfs.GCSFileSystem"] = []


def http_options() -> dict[str, Any]:
    """gcsfs options bounding every request (see the module docstring)."""
    import aiohttp

    limit = http_timeout()
    return {"requests_timeout": aiohttp.ClientTimeout(total=None, sock_connect=limit, sock_read=limit)}


def total_time_limit(requests_timeout: Any) -> float | None:
    """How long one call of a filesystem with this ``requests_timeout`` may take, retries included."""
    if isinstance(requests_timeout, (int, float)):
        return TOTAL_FACTOR * float(requests_timeout)
    limits = [getattr(requests_timeout, a, None) for a in ("total", "sock_read", "sock_connect", "connect")]
    known = [float(v) for v in limits if v]
    return TOTAL_FACTOR * max(known) if known else None


def gcs_filesystem(*, asynchronous: bool = False, **kwargs: Any) -> "gcsfs.GCSFileSystem":
    """A gcsfs filesystem for the emulator in force (or real GCS), fsspec-cached as usual.

    Explicit ``kwargs`` win over the emulator's options and the time limits.
    Its listings are guarded against fills an invalidation overtook.
    """
    prepare_gcsfs_import()
    import gcsfs

    from cloudio._fsspec.consumer import guard_listings

    opts: dict[str, Any] = {**gcsfs_options(), **http_options(), **kwargs}
    if "token" not in opts:
        require_credentials("gs:// URLs")  # fail now, not after minutes of retries against Google
    if not asynchronous:
        fs = gcsfs.GCSFileSystem(**opts)
        guard_listings(fs)
        return fs
    fs = gcsfs.GCSFileSystem(**opts, asynchronous=True)
    guard_listings(fs)
    if not any(k is fs for k in _keep_async):
        _keep_async.append(fs)
    return fs
