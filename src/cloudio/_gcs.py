"""Plain (untracked) gcsfs filesystems configured for the endpoint in force.

cloudio's own uploads and metadata requests go through these; user-facing
tracked filesystems live in :mod:`cloudio._fsspec`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._config import gcsfs_options, prepare_gcsfs_import

if TYPE_CHECKING:
    import gcsfs


#: asynchronous instances cloudio made, kept for the life of the process. gcsfs's
#: finalizer closes an asynchronous instance's session on fsspec's own loop, not
#: the loop (zarr's) that owns it, and raises "attached to a different loop" from
#: the garbage collector (fsspec/gcsfs#606 fixed the synchronous case only). They
#: live as long as fsspec's instance cache would keep them anyway; this only
#: stops ``clear_instance_cache()`` from handing them to that finalizer.
_keep_async: list["gcsfs.GCSFileSystem"] = []


def gcs_filesystem(*, asynchronous: bool = False, **kwargs: Any) -> "gcsfs.GCSFileSystem":
    """A gcsfs filesystem for the emulator in force (or real GCS), fsspec-cached as usual.

    Explicit ``kwargs`` win over the emulator's options.
    """
    prepare_gcsfs_import()
    import gcsfs

    opts: dict[str, Any] = {**gcsfs_options(), **kwargs}
    if not asynchronous:
        return gcsfs.GCSFileSystem(**opts)
    fs = gcsfs.GCSFileSystem(**opts, asynchronous=True)
    if not any(k is fs for k in _keep_async):
        _keep_async.append(fs)
    return fs
