"""Where GCS is: one place that points GDAL, gcsfs and google-cloud-storage at it.

Resolution order (explicit > environment > default):

``endpoint``
    An emulator endpoint passed explicitly (the pytest fixture, ``cloudio
    demo``) wins; otherwise ``STORAGE_EMULATOR_HOST`` (the convention of
    google-cloud-storage and gcsfs); otherwise real Google Cloud Storage.

Anonymous access (``token="anon"``, ``GS_NO_SIGN_REQUEST=YES``) is only ever
produced together with an emulator endpoint, never for Google's own hosts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from urllib.parse import urlsplit

from .errors import ConfigurationError

#: gcsfs 2026.x asks a gRPC control API for each bucket's layout; against an
#: emulator that waits 60 s per bucket. Must be set before gcsfs is imported.
_HNS_ENV = "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"
_GOOGLE_HOSTS = ("storage.googleapis.com", "www.googleapis.com", "storage.cloud.google.com")

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
    if parts.hostname in _GOOGLE_HOSTS or parts.hostname.endswith((".googleapis.com", ".google.com")):
        raise ConfigurationError(
            f"{source}={raw!r} points at Google's own endpoint; cloudio uses anonymous access only with an "
            "emulator. Unset it to use real GCS with your credentials."
        )
    return Endpoint(f"{parts.scheme}://{parts.netloc}")


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
