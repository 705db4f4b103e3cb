"""Where GCS is, and every setting cloudio reads: the one configuration module.

Every environment variable cloudio reads is read here (:data:`VARIABLES`
lists them; docs/configuration.md documents each), and every GCS-facing
setting (endpoint, anonymous access, time limits, gcsfs's HNS switch) is
derived here, so GDAL, gcsfs and google-cloud-storage are pointed at the
same server.

Resolution order (explicit > environment > default):

``endpoint``
    An emulator endpoint passed explicitly (the pytest fixture, ``cloudio
    demo``) wins; otherwise ``STORAGE_EMULATOR_HOST`` (the convention of
    google-cloud-storage and gcsfs); otherwise real Google Cloud Storage.

Anonymous access (``token="anon"``, ``GS_NO_SIGN_REQUEST=YES``) is only ever
produced together with an emulator endpoint, never for Google's own hosts
(``googleapis.com``, ``google.com`` and their subdomains, compared after
lower-casing and dropping a trailing dot).

``http_timeout``
    ``CLOUDIO_HTTP_TIMEOUT`` (seconds, default 30): how long one HTTP request
    may stay silent (no byte moving either way) before it is abandoned and
    retried; one call, retries included, may take three times that (plus gcsfs's 2 s before its first
    retry, on gcsfs's own requests). GDAL and gcsfs both read it
    through :func:`http_timeout`, so one variable bounds every network call.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping
from dataclasses import dataclass
from urllib.parse import SplitResult, urlsplit

from cloudio import _state
from cloudio.errors import ConfigurationError

#: gcsfs 2026.x asks a gRPC control API for each bucket's layout; against an
#: emulator that waits 60 s per bucket. Must be set before gcsfs is imported.
HNS_ENV = "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"
EMULATOR_HOST_ENV = "STORAGE_EMULATOR_HOST"
CONSISTENCY_ENV = "CLOUDIO_CONSISTENCY"
EMULATOR_MODE_ENV = "CLOUDIO_EMULATOR"
EMULATOR_START_TIMEOUT_ENV = "CLOUDIO_EMULATOR_START_TIMEOUT"
HTTP_TIMEOUT_ENV = "CLOUDIO_HTTP_TIMEOUT"
DEFAULT_HTTP_TIMEOUT = 30.0
#: Google's own domains: anonymous access is never configured for them or their subdomains
GOOGLE_DOMAINS = ("googleapis.com", "google.com")
#: the hosts of GCS's own object URLs (``https://storage.googleapis.com/<bucket>/<key>``)
GOOGLE_STORAGE_HOSTS = ("storage.googleapis.com", "storage.cloud.google.com")
#: GDAL's retries of one request (on top of the first attempt), and the first delay (GDAL backs off)
GDAL_MAX_RETRY = 3
GDAL_RETRY_DELAY = 0.5

#: every environment variable cloudio reads (documented in docs/configuration.md)
VARIABLES = (
    EMULATOR_HOST_ENV, HTTP_TIMEOUT_ENV, CONSISTENCY_ENV, EMULATOR_MODE_ENV, EMULATOR_START_TIMEOUT_ENV,
    HNS_ENV, "GOOGLE_APPLICATION_CREDENTIALS", "GS_NO_SIGN_REQUEST", "GCE_METADATA_HOST", "GCE_METADATA_IP",
    "NUMPY_MADVISE_HUGEPAGE",
)


def env(name: str) -> str | None:
    """The variable ``name`` stripped, or None when unset or blank (blank means "use the default")."""
    raw = os.environ.get(name)
    if raw is None or not raw.strip():
        return None
    return raw.strip()


#: os.environ's own mapping (CPython, POSIX: bytes keys); a missing key costs no KeyError there
_ENV_DATA: dict[bytes, bytes] | None = getattr(os.environ, "_data", None) if os.name == "posix" else None


def env_raw(name: bytes) -> object:
    """The variable ``name`` as stored, compared only for change: the per-open fast path (no KeyError)."""
    if _ENV_DATA is not None:
        return _ENV_DATA.get(name)
    return os.environ.get(name.decode())


def endpoint_state() -> tuple[object, object, object]:
    """What decides the endpoint and time limits, cheap to compare on every open (parsed only on change)."""
    stack = _state.endpoints
    return (
        stack[-1] if stack else None,
        env_raw(b"STORAGE_EMULATOR_HOST"),
        env_raw(b"CLOUDIO_HTTP_TIMEOUT"),
    )


@dataclass(frozen=True, slots=True)
class Endpoint:
    """An emulator endpoint such as ``http://127.0.0.1:4443`` (no trailing '/')."""

    url: str

    @property
    def gdal_options(self) -> dict[str, str]:
        """GDAL configuration for ``/vsigs/`` against this endpoint."""
        return {"CPL_GS_ENDPOINT": self.url + "/", "GS_NO_SIGN_REQUEST": "YES"}

    @property
    def gcsfs_options(self) -> dict[str, object]:
        """Keyword arguments for ``gcsfs.GCSFileSystem``."""
        return {"endpoint_url": self.url, "token": "anon"}

    @property
    def host(self) -> str:
        """``host:port`` (the form of ``STORAGE_EMULATOR_HOST`` many tools expect)."""
        return urlsplit(self.url).netloc


def _split(url: str, source: str) -> SplitResult:
    """``urlsplit(url)`` of the address ``source`` gave: urlsplit's own ValueError (a bracketed host that is no
    IPv6 address, ``http://[::1:4443``) named neither the variable nor what to write instead."""
    try:
        return urlsplit(url)
    except ValueError as e:
        raise _not_an_address(source, url, f" ({e})") from e


def _not_an_address(source: str, url: str, why: str = "") -> ConfigurationError:
    return ConfigurationError(f"{source}={url!r} is not an emulator address{why}; expected http://host:port, an "
                              "IPv6 host in brackets (e.g. http://127.0.0.1:4443 or http://[::1]:4443)")


def _parse_endpoint(raw: str, source: str) -> Endpoint:
    raw = raw.strip()
    if "://" not in raw:
        raw = "http://" + raw
    raw = raw[:raw.index("://") + 3] + raw[raw.index("://") + 3:].rstrip("/")  # "http://" stays hostless
    parts = _split(raw, source)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise _not_an_address(source, raw)
    try:
        port = parts.port  # None when absent; ValueError when not a number in 0..65535
    except ValueError as e:
        raise ConfigurationError(
            f"{source}={raw!r} has no usable port ({e}); expected http://host:port with a port from 1 to 65535 "
            "(e.g. http://127.0.0.1:4443)"
        ) from e
    if port == 0:
        raise ConfigurationError(f"{source}={raw!r}: port 0 is not an address to connect to; give the port the "
                                 "emulator listens on (e.g. http://127.0.0.1:4443)")
    if is_google_host(parts.hostname):
        raise ConfigurationError(
            f"{source}={raw!r} points at Google's own endpoint; cloudio uses anonymous access only with an "
            "emulator. Unset it to use real GCS with your credentials."
        )
    return Endpoint(f"{parts.scheme}://{parts.netloc}")


def is_google_host(hostname: str) -> bool:
    """Is ``hostname`` one of Google's (``storage.googleapis.com.``, ``GoogleAPIs.com``, ...)?"""
    host = hostname.lower().rstrip(".")
    return any(host == d or host.endswith("." + d) for d in GOOGLE_DOMAINS)


def http_timeout() -> float:
    """Seconds one HTTP request may stay silent: ``CLOUDIO_HTTP_TIMEOUT``, else 30 (shared by GDAL and gcsfs)."""
    return env_seconds(HTTP_TIMEOUT_ENV, DEFAULT_HTTP_TIMEOUT)


#: the most seconds a connection may take to open (whatever CLOUDIO_HTTP_TIMEOUT allows a silent request)
CONNECT_MAX = 10.0


def connect_timeout() -> float:
    """Seconds a connection may take to open: ``CLOUDIO_HTTP_TIMEOUT``, at most :data:`CONNECT_MAX` (GDAL and
    gcsfs alike)."""
    return min(http_timeout(), CONNECT_MAX)


def env_seconds(name: str, default: float, error: type[ConfigurationError] = ConfigurationError) -> float:
    """Environment variable ``name`` as a positive, finite number of seconds, ``default`` when unset; any
    other value raises ``error`` naming the variable."""
    raw = env(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise error(f"{name}={raw!r} is not a number of seconds; set it to a positive number such as "
                    f"{default:g}, or unset it for the default ({default:g}).")
    return value


def gdal_http_options() -> dict[str, str]:
    """GDAL's timeouts and retries for ``/vsigs/`` (GDAL's defaults wait forever on a silent server).

    A request gives up after ``http_timeout()`` seconds (connecting: at most
    10 of them) and is retried ``GDAL_MAX_RETRY`` times on 429/5xx, resets and
    timeouts, with backoff from ``GDAL_RETRY_DELAY`` s (about x2 each time):
    each request GDAL makes fails within about ``4 * http_timeout() + 8`` seconds (a read of several
    ranges makes one per range; cloudio retries a failed read once).
    """
    t = http_timeout()
    return {
        "GDAL_HTTP_TIMEOUT": f"{t:g}",
        "GDAL_HTTP_CONNECTTIMEOUT": f"{connect_timeout():g}",
        "GDAL_HTTP_MAX_RETRY": str(GDAL_MAX_RETRY),
        "GDAL_HTTP_RETRY_DELAY": f"{GDAL_RETRY_DELAY:g}",
        "GDAL_HTTP_RETRY_CODES": "429,500,502,503,504",
    }


def emulator_endpoint() -> Endpoint | None:
    """The emulator in force for this process, or None for real GCS."""
    if _state.endpoints:
        return _parse_endpoint(_state.endpoints[-1], "endpoint")
    host = env(EMULATOR_HOST_ENV)
    if host is not None:
        return _parse_endpoint(host, EMULATOR_HOST_ENV)
    return None


def emulator_netloc() -> str | None:
    """``host:port`` of ``STORAGE_EMULATOR_HOST`` as written (its http URLs name GCS objects), or None."""
    host = env(EMULATOR_HOST_ENV)
    if host is None:
        return None
    return _split(host if "://" in host else f"http://{host}", EMULATOR_HOST_ENV).netloc


def push_endpoint(url: str) -> None:
    """Make ``url`` the emulator for this process until :func:`pop_endpoint`."""
    _parse_endpoint(url, "endpoint")
    _state.endpoints.append(url)
    prepare_gcsfs_import()


def pop_endpoint() -> None:
    if _state.endpoints:
        _state.endpoints.pop()


def disable_gcsfs_hns(environ: MutableMapping[str, str] | None = None) -> bool:
    """Set ``GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false`` in ``environ`` (os.environ) unless already set.

    THE one place cloudio sets it. Returns whether it was set here, so the
    caller can remove it again.
    """
    target = os.environ if environ is None else environ
    if HNS_ENV in target:
        return False
    target[HNS_ENV] = os.environ.get(HNS_ENV, "false")
    return True


def prepare_gcsfs_import() -> None:
    """Keep gcsfs off its gRPC bucket-layout lookup when an emulator is in use.

    Call before gcsfs is imported. An explicit value already in the
    environment wins.
    """
    if emulator_endpoint() is not None:
        disable_gcsfs_hns()


def emulator_environ(url: str) -> dict[str, str]:
    """The environment that points other libraries and child processes at the emulator ``url``.

    ``STORAGE_EMULATOR_HOST``, and gcsfs's HNS lookup off unless the
    environment already says otherwise. Used by the pytest plugin and
    ``cloudio demo``/``check``, which save and restore these keys.
    """
    values = {EMULATOR_HOST_ENV: _parse_endpoint(url, "emulator").url}
    disable_gcsfs_hns(values)
    return values


def gcsfs_options() -> dict[str, object]:
    """Options for a gcsfs filesystem: the emulator's, or {} (gcsfs defaults)."""
    ep = emulator_endpoint()
    return ep.gcsfs_options if ep is not None else {}


def gdal_options() -> dict[str, str]:
    """GDAL options for ``/vsigs/``: the emulator's, or {} (GDAL defaults)."""
    ep = emulator_endpoint()
    return ep.gdal_options if ep is not None else {}


def require_credentials(url: str) -> None:
    """Fail at once when ``url`` would go to real GCS with neither an emulator nor Google credentials.

    Without this, gcsfs and google-auth try the metadata server and retry
    storage.googleapis.com for minutes before reporting anything.
    Credentials count when any source google-auth reads is present:
    ``GOOGLE_APPLICATION_CREDENTIALS``, gcloud's application-default file, a
    Compute Engine host; ``GS_NO_SIGN_REQUEST=YES`` asks for anonymous access.
    """
    if emulator_endpoint() is not None or env("GOOGLE_APPLICATION_CREDENTIALS"):
        return
    if (env("GS_NO_SIGN_REQUEST") or "").upper() == "YES":
        return
    if env("GCE_METADATA_HOST") or env("GCE_METADATA_IP"):
        return
    from google.auth import _cloud_sdk
    from google.auth.compute_engine import _metadata

    if os.path.exists(_cloud_sdk.get_application_default_credentials_path()):
        return
    if _metadata.detect_gce_residency_linux():
        return
    raise ConfigurationError(
        f"no Google credentials and no emulator for {url}: set STORAGE_EMULATOR_HOST=http://host:port "
        "to use an emulator (`cloudio emulator`, or `with cloudio.Emulator():` in a script), or "
        "GOOGLE_APPLICATION_CREDENTIALS=/path/to/key.json (or run `gcloud auth application-default login`) "
        "for Google Cloud Storage"
    )
