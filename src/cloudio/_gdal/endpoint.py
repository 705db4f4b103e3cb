"""Per-bucket GDAL options: the emulator endpoint in force, timeouts and retries.

Options that datasets need while GDAL reads them lazily (the emulator
endpoint, unsigned requests) are set as GDAL *path-specific* options on
``/vsigs/<bucket>``, which hold in every thread and outlive any
``rasterio.Env``; process-wide configuration is never touched, and anonymous
requests are only ever configured for an emulator. The same options carry
GDAL's timeouts and retries (:func:`cloudio._config.gdal_http_options`,
``CLOUDIO_HTTP_TIMEOUT``; GDAL's defaults wait forever), except those the
user set in the environment or in the ``rasterio.Env`` in force: a
path-specific option would win over theirs. When the endpoint changes, the
options of every bucket are removed, and what GDAL cached from the old server
is dropped.
"""

from __future__ import annotations

import os
import threading
from typing import Any

from cloudio import _config
from cloudio._config import emulator_endpoint
from cloudio._gdal import generation
from cloudio._gdal.bindings import clear, clear_path_options, set_path_option
from cloudio._threads import hold_globals_across_fork

__all__ = ["bucket_prefix", "ensure_endpoint", "in_force", "reset"]

_endpoints: dict[str, tuple[tuple[object, object, object], tuple[str, ...]]] = {}  # bucket -> settings applied
_endpoints_lock = threading.Lock()
_keys: dict[str, frozenset[str]] = {}  # bucket -> the options set on it (while the endpoint is unchanged)
_applied_endpoint: list[object] = [None]  # the endpoint state the options of _endpoints point at
#: the state of the last options applied to any bucket (see :data:`cloudio._gdal.generation.current`,
#: bumped with it: while the generation is unchanged, every bucket applied since holds this state)
last_applied: list[object] = [None]

#: GDAL options cloudio sets per bucket; a user's own setting of any of these wins
_HTTP_KEYS = (
    "GDAL_HTTP_TIMEOUT", "GDAL_HTTP_CONNECTTIMEOUT", "GDAL_HTTP_MAX_RETRY",
    "GDAL_HTTP_RETRY_DELAY", "GDAL_HTTP_RETRY_CODES",
)

_rio_local: Any = None

#: characters a bucket name may continue with (GCS's rule): where GDAL's string-prefix match on
#: /vsigs/<bucket> would reach a bucket whose name extends this one, a fence stops it
_NAME_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789-_."
#: what a fence puts back for those buckets: the process-wide value, or GDAL's default
_FENCED = {"CPL_GS_ENDPOINT": "https://storage.googleapis.com/", "GS_NO_SIGN_REQUEST": "NO"}


def _user_http_keys() -> tuple[str, ...]:
    """Which of :data:`_HTTP_KEYS` the user set (a ``rasterio.Env`` in this thread, or the environment)."""
    global _rio_local
    if _rio_local is None:
        import rasterio.env

        _rio_local = rasterio.env.local
    env = getattr(_rio_local, "_env", None)
    if env is None:  # the common case, kept cheap
        return ()
    opts = getattr(env, "options", {})
    return tuple(k for k in _HTTP_KEYS if k in opts)


def _endpoint_state() -> tuple[tuple[object, object, object], tuple[str, ...]]:
    """What decides the options of a bucket (cheap to compare on every open; parsed only on change)."""
    return _config.endpoint_state(), _user_http_keys()


def in_force(bucket: str) -> bool:
    """Are ``bucket``'s options those :func:`ensure_endpoint` would set now? (the per-open check)"""
    applied = _endpoints.get(bucket)
    return applied is not None and applied[0] == _config.endpoint_state() and applied[1] == _user_http_keys()


def bucket_prefix(bucket: str) -> str:
    """``/vsigs/<bucket>``, no '/': GDAL looks the options of every listing up by the bucket alone.

    Measured with GDAL 3.10: with ``/vsigs/<bucket>/`` listings of any
    directory go unsigned to Google. The string prefix would also reach
    buckets whose names extend this one (``data`` -> ``data-prod``): GDAL
    takes the longest key that matches, so :func:`_fence` sets, on
    ``/vsigs/<bucket><c>`` for every character ``c`` a bucket name may hold,
    the endpoint and signing options those buckets would have had anyway.
    """
    return f"/vsigs/{bucket}"


def _fence(bucket: str, set_them: bool) -> None:
    """Keep ``bucket``'s emulator options from buckets whose names extend it (see :func:`bucket_prefix`)."""
    values = {k: os.environ.get(k, default) for k, default in _FENCED.items()}
    for c in _NAME_CHARS:
        prefix = bucket_prefix(bucket) + c
        if (bucket + c) in _endpoints:  # a bucket cloudio set itself: its own options, longer, win anyway
            continue
        clear_path_options(prefix)
        if set_them:
            for key, value in values.items():
                set_path_option(prefix, key, value)


def _remove(bucket: str) -> None:
    clear_path_options(bucket_prefix(bucket))
    _fence(bucket, set_them=False)
    clear(f"/vsigs/{bucket}")


def ensure_endpoint(bucket: str) -> None:
    """Set ``bucket``'s GDAL options: the emulator in force (if any), timeouts and retries.

    They are path-specific options on ``/vsigs/<bucket>`` (see
    :func:`bucket_prefix`), so they hold for datasets read lazily in any
    thread. An HTTP option the user set in the environment or in a
    ``rasterio.Env`` is left to them (a path-specific option would win over
    it). When the endpoint changes, every bucket's options are removed and
    what GDAL cached from the old server is dropped.

    Other threads may be reading the bucket meanwhile: options already set
    are overwritten in place and those no longer wanted removed one by one,
    never all cleared first (GDAL would ask Google, unsigned, in between).
    """
    state = _endpoint_state()
    if _endpoints.get(bucket) == state:
        return
    with _endpoints_lock:
        if _endpoints.get(bucket) == state:  # another thread set them while this one waited
            return
        endpoint_state = state[0][:2]
        if _applied_endpoint[0] != endpoint_state:
            for old in list(_endpoints):  # another server: nothing set or cached for the old one holds
                _remove(old)
            _endpoints.clear()
            _keys.clear()
            _applied_endpoint[0] = endpoint_state
        ep = emulator_endpoint()
        user = set(state[1]) | {k for k in _HTTP_KEYS if k in os.environ}
        wanted = dict(ep.gdal_options) if ep is not None else {}
        wanted.update((k, v) for k, v in _config.gdal_http_options().items() if k not in user)
        prefix = bucket_prefix(bucket)
        first = bucket not in _keys
        if first:
            clear_path_options(prefix)
        for key, value in wanted.items():
            set_path_option(prefix, key, value)
        for key in _keys.get(bucket, frozenset()) - wanted.keys():
            set_path_option(prefix, key, None)
        if first and ep is not None:
            _fence(bucket, set_them=True)
        _keys[bucket] = frozenset(wanted)
        _endpoints[bucket] = state
        last_applied[0] = state
        generation.bump()


# held across a fork: a thread setting a bucket's options then is not in the child, and a lock copied held by it would
# stop the child's first open through the GDAL face of a bucket not yet set (or after a change of endpoint) for good.
# Under it a clear of GDAL's cache counts (the sessions' lock) and the GDAL generation is bumped: see
# cloudio._threads.FORK_ORDER
hold_globals_across_fork("gdal endpoint", __name__, "_endpoints_lock")


def reset() -> None:
    """Remove every path option set here, and what GDAL cached of those buckets."""
    with _endpoints_lock:
        for old in list(_endpoints):
            _remove(old)
        _endpoints.clear()
        _keys.clear()
        _applied_endpoint[0] = None
        last_applied[0] = None
        generation.bump()
