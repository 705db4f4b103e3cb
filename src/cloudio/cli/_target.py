"""Where ``cloudio demo`` and ``cloudio check`` run: the embedded emulator, or a bucket prefix.

Without a URL, the embedded emulator starts and this process points every
library at it (``STORAGE_EMULATOR_HOST`` for gcsfs and google-cloud-storage,
the explicit endpoint for cloudio), restoring both afterwards. With a URL,
the run happens in a fresh folder below it, removed afterwards.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .._cases import new_run_prefix
from .._config import emulator_endpoint, pop_endpoint, push_endpoint
from .._paths import is_gcs, parse_gcs
from ..errors import BucketNotFoundError, InvalidURLError
from ._ui import err, progress

if TYPE_CHECKING:
    from ..emulator import Emulator

log = logging.getLogger(__name__)

_ENV = ("STORAGE_EMULATOR_HOST", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT")
DEMO_BUCKET = "cloudio-demo"


@dataclass
class Target:
    root: str  #: gs://bucket/prefix/ this run owns
    emulator: "Emulator | None"  #: set when cloudio started it (request counts available)
    where: str  #: for the header line


@contextmanager
def _embedded() -> Iterator["Emulator"]:
    from ..emulator import Emulator

    mode = os.environ.get("CLOUDIO_EMULATOR", "").strip() or "binary"
    emu = Emulator(mode=mode)  # type: ignore[arg-type]
    saved = {k: os.environ.get(k) for k in _ENV}
    with progress("starting the embedded GCS emulator (fake-gcs-server)"):
        emu.start()
    os.environ["STORAGE_EMULATOR_HOST"] = emu.url
    os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
    push_endpoint(emu.url)
    try:
        yield emu
    finally:
        pop_endpoint()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        emu.stop()


def _check_url(url: str, command: str) -> None:
    if not is_gcs(url):
        raise InvalidURLError(
            f"{url!r} is not a GCS prefix; cloudio {command} takes gs://<bucket>/<prefix> "
            "(or no URL, to use the embedded emulator)"
        )
    parse_gcs(url)


def _ensure_bucket(url: str) -> None:
    bucket = parse_gcs(url).bucket
    if emulator_endpoint() is not None:
        from ..emulator import Emulator

        emu = Emulator(mode="external").start()  # attach to STORAGE_EMULATOR_HOST
        emu.create_bucket(bucket)
        return
    from .._gcs import gcs_filesystem

    if not gcs_filesystem().exists(bucket):
        raise BucketNotFoundError(
            f"gs://{bucket} does not exist or these credentials cannot see it (from {url!r}); "
            "create it, pass a bucket you can write to, or run without a URL to use the embedded emulator"
        )


def _cleanup(root: str) -> None:
    try:
        import cloudio

        fs = cloudio.filesystem(root)
        if fs.exists(root):
            fs.rm(root, recursive=True)
    except Exception as e:  # never hide the run's own result behind a cleanup failure
        log.debug("cleanup failed", exc_info=True)
        err(f"warning: could not remove {root} ({type(e).__name__}: {e}); delete it by hand")


@contextmanager
def run_target(url: str | None, command: str, keep: bool = False) -> Iterator[Target]:
    """A fresh prefix for one run, on the embedded emulator (``url=None``) or below ``url``."""
    if url is None:
        with _embedded() as emu:
            emu.create_bucket(DEMO_BUCKET)
            yield Target(new_run_prefix(f"gs://{DEMO_BUCKET}", command), emu,
                         f"the embedded GCS emulator at {emu.url}")
        return
    _check_url(url, command)
    _ensure_bucket(url)
    root = new_run_prefix(url, command)
    ep = emulator_endpoint()
    where = f"the emulator at {ep.url}" if ep is not None else "Google Cloud Storage"
    try:
        yield Target(root, None, where)
    finally:
        if keep:
            err(f"kept {root}")
        else:
            _cleanup(root)
