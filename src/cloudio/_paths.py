"""One normaliser for every spelling of a GCS object URL.

``gs://b/k``, ``/vsigs/b/k``, ``/vsigs_streaming/b/k``,
``https://storage.googleapis.com/b/k`` (and the emulator's own
``http://127.0.0.1:P/b/k``) all become the journal key ``gs://b/k``. Local
paths pass through as absolute paths. ``..`` segments are resolved inside the
bucket and may never climb above it.
"""

from __future__ import annotations

import os
import posixpath
import re
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from .errors import InvalidURLError

_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]$")
_VSI_PREFIXES = ("/vsigs/", "/vsigs_streaming/")
_HTTP_HOSTS = ("storage.googleapis.com", "storage.cloud.google.com")
_UNSUPPORTED = ("s3", "az", "abfs", "abfss", "adl", "hdfs", "ftp", "sftp", "memory", "http", "https")


@dataclass(frozen=True, slots=True)
class GCSPath:
    """A bucket and a key ('' for the bucket root). Keys never start with '/'."""

    bucket: str
    key: str

    @property
    def url(self) -> str:
        """The journal key: ``gs://bucket/key``."""
        return f"gs://{self.bucket}/{self.key}"

    @property
    def vsi(self) -> str:
        """The GDAL path: ``/vsigs/bucket/key``."""
        return f"/vsigs/{self.bucket}/{self.key}"

    @property
    def fs_path(self) -> str:
        """The fsspec path without protocol: ``bucket/key``."""
        return f"{self.bucket}/{self.key}".rstrip("/") if self.key else self.bucket

    @property
    def parent(self) -> "GCSPath":
        """The 'directory' holding this object (key '' at the bucket root)."""
        head = posixpath.dirname(self.key.rstrip("/"))
        return GCSPath(self.bucket, head + "/" if head else "")

    @property
    def name(self) -> str:
        return posixpath.basename(self.key.rstrip("/"))

    def child(self, name: str) -> "GCSPath":
        base = self.key if (not self.key or self.key.endswith("/")) else self.key + "/"
        return GCSPath(self.bucket, _clean_key(base + name, self.url))

    def is_under(self, prefix: "GCSPath") -> bool:
        """True when this path equals ``prefix`` or lies below it (as a directory)."""
        if self.bucket != prefix.bucket:
            return False
        p = prefix.key.rstrip("/")
        k = self.key.rstrip("/")
        return not p or k == p or k.startswith(p + "/")


def _clean_key(raw: str, url: str) -> str:
    """Resolve ``.``/``..`` within the bucket, keep a trailing '/' (a prefix)."""
    trailing = raw.endswith("/")
    parts: list[str] = []
    for seg in raw.split("/"):
        if seg in ("", "."):
            continue
        if seg == "..":
            if not parts:
                raise InvalidURLError(
                    f"{url!r}: '..' climbs above the bucket; write the key relative to the bucket root"
                )
            parts.pop()
            continue
        parts.append(seg)
    key = "/".join(parts)
    return key + "/" if (trailing and key) else key


def _check_bucket(bucket: str, url: str) -> str:
    if not bucket:
        raise InvalidURLError(f"{url!r} names no bucket; expected gs://<bucket>/<key> or /vsigs/<bucket>/<key>")
    if not _BUCKET_RE.match(bucket):
        raise InvalidURLError(
            f"{url!r}: {bucket!r} is not a valid GCS bucket name "
            "(3-222 characters: lowercase letters, digits, '-', '_' and '.')"
        )
    return bucket


def parse_gcs(url: str, *, require_key: bool = False) -> GCSPath:
    """Parse any GCS spelling of ``url``; raise :class:`InvalidURLError` otherwise."""
    if not isinstance(url, str | os.PathLike):
        raise InvalidURLError(f"{url!r} is not a URL or path (got {type(url).__name__})")
    url = os.fspath(url)
    rest: str | None = None
    for vsi in _VSI_PREFIXES:
        if url.startswith(vsi):
            rest = url[len(vsi):]
            break
    if rest is None:
        if url.startswith(("gs://", "gcs://")):
            rest = url.split("://", 1)[1]
        elif url.startswith(("http://", "https://")):
            parts = urlsplit(url)
            path = unquote(parts.path)
            if parts.hostname in _HTTP_HOSTS or _is_emulator_netloc(parts.netloc):
                rest = path.lstrip("/")
                if rest.startswith("download/storage/v1/b/") or rest.startswith("storage/v1/b/"):
                    # JSON-API media links: .../b/<bucket>/o/<key>
                    tail = rest.split("/b/", 1)[1]
                    bucket, _, obj = tail.partition("/o/")
                    rest = f"{bucket}/{obj}"
            else:
                raise InvalidURLError(
                    f"{url!r} is not a Google Cloud Storage URL; use gs://<bucket>/<key>"
                )
        else:
            raise InvalidURLError(f"{url!r} is not a GCS URL; use gs://<bucket>/<key> or /vsigs/<bucket>/<key>")
    bucket, _, key = rest.partition("/")
    _check_bucket(bucket, url)
    key = _clean_key(key, url)
    if require_key and not key:
        raise InvalidURLError(f"{url!r} names a bucket but no object; add the object's key after the bucket")
    return GCSPath(bucket, key)


def _is_emulator_netloc(netloc: str) -> bool:
    host = os.environ.get("STORAGE_EMULATOR_HOST", "")
    return bool(host) and urlsplit(host if "://" in host else f"http://{host}").netloc == netloc


def is_gcs(url: object) -> bool:
    """True for any spelling cloudio treats as a GCS object or prefix."""
    if not isinstance(url, str | os.PathLike):
        return False
    s = os.fspath(url)
    if s.startswith(_VSI_PREFIXES) or s.startswith(("gs://", "gcs://")):
        return True
    if s.startswith(("http://", "https://")):
        parts = urlsplit(s)
        return parts.hostname in _HTTP_HOSTS or _is_emulator_netloc(parts.netloc)
    return False


def normalize(url: str | os.PathLike[str]) -> str:
    """The one journal key for ``url``: ``gs://b/k`` or an absolute local path.

    Raises
    ------
    InvalidURLError
        For a malformed GCS URL or an unsupported scheme (``s3://`` ...).
    """
    if is_gcs(url):
        return parse_gcs(os.fspath(url)).url
    if not isinstance(url, str | os.PathLike):
        raise InvalidURLError(f"{url!r} is not a URL or path (got {type(url).__name__})")
    s = os.fspath(url)
    if s.startswith("/vsi"):
        raise InvalidURLError(
            f"{s!r}: only /vsigs/ among GDAL's virtual file systems is supported yet; "
            "use gs://<bucket>/<key>, /vsigs/<bucket>/<key> or a local path"
        )
    scheme = s.split("://", 1)[0] if "://" in s else ""
    if scheme and scheme != "file":
        raise InvalidURLError(
            f"{s!r}: scheme {scheme!r} is not supported yet; cloudio handles gs://, /vsigs/ and local paths"
        )
    if scheme == "file":
        s = s[len("file://"):]
    return os.path.abspath(s)
