"""Where GCS is: one place that points GDAL, gcsfs and google-cloud-storage at it.

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
    may take before it is abandoned and retried. GDAL and gcsfs both read it
    through :func:`http_timeout`, so one variable bounds every network call.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from urllib.parse import urlsplit

from cloudio.errors import ConfigurationError

#: gcsfs 2026.x asks a gRPC control API for each bucket's layout; against an
#: emulator that waits 60 s per bucket. Must be set before gcsfs is imported.
_HNS_ENV = "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"
#: Google's own domains: anonymous access is never configured for them or their subdomains
_GOOGLE_DOMAINS = ("googleapis.com", "google.com")
HTTP_TIMEOUT_ENV = "CLOUDIO_HTTP_TIMEOUT"
DEFAULT_HTTP_TIMEOUT = 30.0
#: GDAL's retries of one request (on top of the first attempt), and the first delay (GDAL backs off)
GDAL_MAX_RETRY = 3
GDAL_RETRY_DELAY = 0.5

_override: list[str] = []  # stack of explicit endpoints (innermost last)


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


def _parse_endpoint(raw: str, source: str) -> Endpoint:
    raw = raw.strip().rstrip("/")
    if "://" not in raw:
        raw = "http://" + raw
    parts = urlsplit(raw)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigurationError(
            f"{source}={raw!r} is not an emulator address; expected http://host:port (e.g. http://127.0.0.1:4443)"
        )
    if is_google_host(parts.hostname):
        raise ConfigurationError(
            f"{source}={raw!r} points at Google's own endpoint; cloudio uses anonymous access only with an "
            "emulator. Unset it to use real GCS with your credentials."
        )
    return Endpoint(f"{parts.scheme}://{parts.netloc}")


def is_google_host(hostname: str) -> bool:
    """Is ``hostname`` one of Google's (``storage.googleapis.com.``, ``GoogleAPIs.com``, ...)?"""
    host = hostname.lower().rstrip(".")
    return any(host == d or host.endswith("." + d) for d in _GOOGLE_DOMAINS)


def http_timeout() -> float:
    """Seconds one HTTP request may take: ``CLOUDIO_HTTP_TIMEOUT``, else 30 (shared by GDAL and gcsfs)."""
    raw = os.environ.get(HTTP_TIMEOUT_ENV)
    if raw is None or not raw.strip():
        return DEFAULT_HTTP_TIMEOUT
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise ConfigurationError(
            f"{HTTP_TIMEOUT_ENV}={raw!r} is not a number of seconds; set it to a positive number such as 30, "
            "or unset it for the default."
        )
    return value


def gdal_http_options() -> dict[str, str]:
    """GDAL's timeouts and retries for ``/vsigs/`` (GDAL's defaults wait forever on a silent server).

    A request gives up after ``http_timeout()`` seconds (connecting: at most
    10 of them) and is retried ``GDAL_MAX_RETRY`` times on 429/5xx, resets and
    timeouts, with backoff from ``GDAL_RETRY_DELAY`` s (about x2 each time):
    a read fails within about ``4 * http_timeout() + 8`` seconds.
    """
    t = http_timeout()
    return {
        "GDAL_HTTP_TIMEOUT": f"{t:g}",
        "GDAL_HTTP_CONNECTTIMEOUT": f"{min(t, 10.0):g}",
        "GDAL_HTTP_MAX_RETRY": str(GDAL_MAX_RETRY),
        "GDAL_HTTP_RETRY_DELAY": f"{GDAL_RETRY_DELAY:g}",
        "GDAL_HTTP_RETRY_CODES": "429,500,502,503,504",
    }


def emulator_endpoint() -> Endpoint | None:
    """The emulator in force for this process, or None for real GCS."""
    if _override:
        return _parse_endpoint(_override[-1], "endpoint")
    env = os.environ.get("STORAGE_EMULATOR_HOST")
    if env is not None and env.strip():
        return _parse_endpoint(env, "STORAGE_EMULATOR_HOST")
    return None


def push_endpoint(url: str) -> None:
    """Make ``url`` the emulator for this process until :func:`pop_endpoint`."""
    _parse_endpoint(url, "endpoint")
    _override.append(url)
    prepare_gcsfs_import()


def pop_endpoint() -> None:
    if _override:
        _override.pop()


def prepare_gcsfs_import() -> None:
    """Keep gcsfs off its gRPC bucket-layout lookup when an emulator is in use.

    Call before gcsfs is imported. An explicit value already in the
    environment wins.
    """
    if emulator_endpoint() is not None:
        os.environ.setdefault(_HNS_ENV, "false")


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
    if emulator_endpoint() is not None or os.environ.get("GOOGLE_APPLICATION_CREDENTIALS", "").strip():
        return
    if os.environ.get("GS_NO_SIGN_REQUEST", "").strip().upper() == "YES":
        return
    if os.environ.get("GCE_METADATA_HOST") or os.environ.get("GCE_METADATA_IP"):
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
