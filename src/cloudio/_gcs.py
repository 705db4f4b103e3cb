"""Plain (untracked) gcsfs filesystems configured for the endpoint in force.

cloudio's own uploads and metadata requests go through these; user-facing
tracked filesystems live in :mod:`cloudio._fsspec`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._config import gcsfs_options, prepare_gcsfs_import

if TYPE_CHECKING:
    import gcsfs


def gcs_filesystem(*, asynchronous: bool = False, **kwargs: Any) -> "gcsfs.GCSFileSystem":
    """A gcsfs filesystem for the emulator in force (or real GCS), fsspec-cached as usual.

    Explicit ``kwargs`` win over the emulator's options.
    """
    prepare_gcsfs_import()
    import gcsfs

    opts: dict[str, Any] = {**gcsfs_options(), **kwargs}
    if asynchronous:
        opts["asynchronous"] = True
    return gcsfs.GCSFileSystem(**opts)
