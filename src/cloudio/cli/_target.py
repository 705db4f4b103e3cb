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

from cloudio import _config
from cloudio._config import emulator_endpoint, pop_endpoint, push_endpoint
from cloudio._paths import is_gcs, parse_gcs
from cloudio.cli._ui import err, progress
from cloudio.cli.cases import new_run_prefix
from cloudio.errors import BucketNotFoundError, CloudioError, ConfigurationError, InvalidURLError

if TYPE_CHECKING:
    from cloudio.emulator import Emulator

log = logging.getLogger(__name__)

_ENV = (_config.EMULATOR_HOST_ENV, _config.HNS_ENV)
DEMO_BUCKET = "cloudio-demo"


@dataclass
class Target:
    root: str  #: gs://bucket/prefix/ this run owns
    emulator: Emulator | None  #: set when cloudio started it (request counts available)
    where: str  #: for the header line


@contextmanager
def _embedded() -> Iterator[Emulator]:
    from cloudio.emulator import Emulator, env_mode

    emu = Emulator(mode=env_mode() or "binary")  # an unusable CLOUDIO_EMULATOR is exit 2, naming it
    saved = {k: os.environ.get(k) for k in _ENV}
    with progress("starting the embedded GCS emulator (fake-gcs-server)"):
        emu.start()
    os.environ.update(_config.emulator_environ(emu.url))
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
    """Check the bucket exists (never create it); on GCS, also that objects can be written below ``url``.

    The check writes and removes one empty object: what the run needs is
    permission to create objects, which a bucket-metadata request would not
    tell (many roles may write objects but not read bucket metadata).
    """
    bucket = parse_gcs(url).bucket
    if emulator_endpoint() is not None:
        from cloudio.emulator import Emulator

        emu = Emulator(mode="external").start()  # attach to STORAGE_EMULATOR_HOST
        if not emu.has_bucket(bucket):
            raise BucketNotFoundError(
                f"gs://{bucket} does not exist on the emulator at {emu.url} (from {url!r}): the bucket "
                f"does not exist; create it (`cloudio emulator --bucket {bucket}`, or "
                f"Emulator.create_bucket({bucket!r})), or run without a URL to use the embedded emulator"
            )
        return
    import cloudio

    probe = new_run_prefix(url, "probe").rstrip("/") + ".probe"
    fs = cloudio.filesystem(probe)
    try:
        fs.pipe(probe, b"")
        fs.rm_file(probe)  # its exact name: rm would read ? * [ in the prefix as a glob
    except FileNotFoundError as e:
        raise BucketNotFoundError(
            f"gs://{bucket} does not exist or these credentials cannot see it (from {url!r}); "
            "create it, pass a bucket you can write to, or run without a URL to use the embedded emulator"
        ) from e
    except CloudioError:
        raise
    except Exception as e:
        if isinstance(e, OSError) and "connect" in str(e).lower():
            raise ConfigurationError(
                f"cannot reach Google Cloud Storage to write below {url!r} ({' '.join(str(e).split())[:200]}); "
                "check the network and proxy settings, or run without a URL to use the embedded emulator"
            ) from e
        raise ConfigurationError(
            f"cannot write below {url!r} ({type(e).__name__}: {' '.join(str(e).split())[:200]}); check your "
            "credentials (gcloud auth application-default login, GOOGLE_APPLICATION_CREDENTIALS) and that "
            "they may create objects there, or run without a URL to use the embedded emulator"
        ) from e


def _delete_below(root: str) -> None:
    """Delete every object below ``root`` by its exact name.

    ``fs.rm`` would read ``?``, ``*`` and ``[`` in the run's prefix (legal in GCS
    keys) as a glob and miss what is there; the names ``find`` lists are exact.
    gcsfs's ``_delete_files`` batches the deletes on GCS, one request per object
    against an emulator (emulators have no batch endpoint), through cloudio's
    journaling ``_rm_file``/``_rm_files``.
    """
    import fsspec.asyn

    import cloudio

    fs = cloudio.filesystem(root)
    folder = parse_gcs(root).fs_path + "/"
    names = sorted(name for name in fs.find(folder) if name.startswith(folder))
    if not names:
        return
    results = fsspec.asyn.sync(fs.loop, fs._delete_files, names, 100)
    failed = [r for r in results if isinstance(r, Exception)  # already gone is what cleanup wants
              and not isinstance(r, FileNotFoundError) and "No such object" not in str(r)]
    if failed:
        raise failed[0]


def _cleanup(root: str) -> None:
    try:
        _delete_below(root)
    except Exception as e:  # never hide the run's own result behind a cleanup failure
        log.debug("cleanup failed", exc_info=True)
        err(f"warning: could not remove {root} ({type(e).__name__}: {e}); delete it by hand")


@contextmanager
def run_target(url: str | None, command: str, keep: bool = False) -> Iterator[Target]:
    """A fresh prefix for one run, on the embedded emulator (``url=None``) or below ``url``.

    An unusable ``CLOUDIO_*`` variable is bad input, named before anything is
    written: otherwise every step fails on it, is reported as cloudio's own
    inconsistency, and the clean-up fails on it too.
    """
    from cloudio._session import current_consistency

    _config.http_timeout()
    current_consistency()
    if url is None:
        with _embedded() as emu:
            emu.create_bucket(DEMO_BUCKET)
            yield Target(new_run_prefix(f"gs://{DEMO_BUCKET}", command), emu,
                         f"the embedded GCS emulator at {emu.url}")
        return
    _check_url(url, command)
    require_reachable_emulator()
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


def require_reachable_emulator() -> None:
    """Fail fast, in one line, when ``STORAGE_EMULATOR_HOST`` names a server that does not answer.

    Without this, gcsfs retries a refused connection for about half a minute.
    """
    import urllib.error
    import urllib.request

    from cloudio.errors import EmulatorError

    ep = emulator_endpoint()
    if ep is None:
        return
    probe = f"{ep.url}/storage/v1/b"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never via a proxy
    try:
        opener.open(probe, timeout=5).close()
    except urllib.error.HTTPError:
        return  # it answers; what it answered is the command's business
    except (urllib.error.URLError, OSError) as e:
        raise EmulatorError(
            f"nothing answers at STORAGE_EMULATOR_HOST={ep.url} ({getattr(e, 'reason', e)}): start an "
            "emulator there (`cloudio emulator --port ...`) or unset STORAGE_EMULATOR_HOST"
        ) from e
