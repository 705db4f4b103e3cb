"""One normaliser for every spelling of a GCS object URL.

``gs://b/k``, ``/vsigs/b/k``, ``/vsigs_streaming/b/k``,
``https://storage.googleapis.com/b/k`` (and the emulator's own
``http://127.0.0.1:P/b/k``) all become the journal key ``gs://b/k``. Local
paths pass through as absolute paths.

GCS keys are literal, but the faces are not: GDAL resolves ``/./`` and stops
at NUL, while gcsfs reads every key as written. So that one URL never names
two objects, a key is either kept literally on every face or refused with
:class:`InvalidURLError` on every face: empty segments (``//``, a leading
``/``), ``.`` and ``..`` segments and control characters are refused, as are
GCS URLs spelled so that rasterio or gcsfs would read them differently
(``gs:/b/k``, ``GS://b/k``, `` gs://b/k``). A trailing ``/`` names a prefix.
Bucket names follow GCS's own rule (:func:`check_bucket`).
"""

from __future__ import annotations

import os
import posixpath
import re
from dataclasses import dataclass
from urllib.parse import parse_qs, unquote, urlsplit

from cloudio._config import GOOGLE_STORAGE_HOSTS, emulator_netloc
from cloudio.errors import InvalidURLError

_BUCKET_CHARS_RE = re.compile(r"^[a-z0-9][a-z0-9._-]*[a-z0-9]$")
_IPV4_RE = re.compile(r"^\d{1,3}(\.\d{1,3}){3}$")
_GOOGLE_RE = re.compile(r"g[o0][o0]g[l1]e")  # "google" and its close misspellings ("g00gle")
BUCKET_RULE = (
    "GCS bucket names are 3-63 characters (up to 222 with dots, each dot-separated part at most 63) "
    "of lowercase letters, digits, '-', '_' and '.', start and end with a letter or digit, "
    "are not an IP address, and neither start with 'goog' nor contain 'google' or a close misspelling"
)
_KEY_MAX_BYTES = 1024
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
#: what rasterio (urllib) and gcsfs would still read as a GCS URL: any case, leading blanks, any slashes
_LOOSE_GCS_RE = re.compile(
    r"^[\x00-\x20]*(gs|gcs)\s*:|^[\x00-\x20]*https?\s*:/*("
    + "|".join(re.escape(h) for h in GOOGLE_STORAGE_HOSTS) + r")(/|$)",
    re.IGNORECASE,
)
_VSI_PREFIXES = ("/vsigs/", "/vsigs_streaming/")
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
    def parent(self) -> GCSPath:
        """The 'directory' holding this object (key '' at the bucket root)."""
        head = posixpath.dirname(self.key.rstrip("/"))
        return GCSPath(self.bucket, head + "/" if head else "")

    @property
    def name(self) -> str:
        return posixpath.basename(self.key.rstrip("/"))

    def child(self, name: str) -> GCSPath:
        """The object ``name`` in this directory; ``name`` is checked like any key."""
        base = self.key if (not self.key or self.key.endswith("/")) else self.key + "/"
        check_key(base + name, f"{self.url.rstrip('/')}/{name}")
        return GCSPath(self.bucket, base + name)

    def is_under(self, prefix: GCSPath) -> bool:
        """True when this path equals ``prefix`` or lies below it (as a directory)."""
        return is_under(self.url, prefix.url)


def is_under(url: str, prefix: str) -> bool:
    """``url`` equals ``prefix`` or lies below it as a '/'-separated path: THE prefix test.

    Journal keys or paths; trailing '/' are ignored, so ``gs://b/d`` and
    ``gs://b/d/`` are the same prefix and ``gs://b/dd`` is not under it. The
    empty prefix (:data:`cloudio._journal.EVERYTHING`) covers everything.
    """
    if not prefix:
        return True
    p = prefix.rstrip("/")
    u = url.rstrip("/")
    return u == p or u.startswith(p + "/")


def check_key(key: str, url: str) -> None:
    """Refuse a key some face would read as another object (see the module docstring).

    ``url`` is named in the message. A trailing '/' (a prefix) is allowed.
    """
    bad = _CONTROL_RE.search(key)
    if bad:
        raise InvalidURLError(
            f"{url!r}: the key contains the control character {bad.group()!r}; GCS forbids CR and LF "
            "and GDAL stops reading a path at NUL, so cloudio refuses them. Remove it from the key."
        )
    try:
        size = len(key.encode("utf-8"))
    except UnicodeEncodeError as e:
        raise InvalidURLError(f"{url!r}: the key is not valid Unicode (GCS keys are UTF-8); fix the key") from e
    if size > _KEY_MAX_BYTES:
        raise InvalidURLError(f"{url!r}: the key is {size} bytes long; GCS keys are at most 1024 bytes of UTF-8")
    for seg in key.removesuffix("/").split("/") if key else ():
        if seg == "":
            raise InvalidURLError(
                f"{url!r}: the key has an empty segment ('//' or a leading '/'); GCS keys are literal and "
                "cloudio refuses keys that tools read differently. Remove the extra '/'."
            )
        if seg in (".", ".."):
            raise InvalidURLError(
                f"{url!r}: the key has a {seg!r} segment, which GDAL resolves but GCS and gcsfs keep "
                "literally; write the key without it, relative to the bucket root."
            )


def check_bucket(name: str, *, url: str | None = None) -> None:
    """Refuse ``name`` unless GCS itself would accept it as a bucket name (:data:`BUCKET_RULE`).

    Shared by URL parsing and :meth:`cloudio.emulator.Emulator.create_bucket`, so a
    bucket the emulator was asked to make is one cloudio can address, and vice versa.

    Raises
    ------
    InvalidURLError
        Naming ``url`` (or the bucket) and the rule.
    """
    where = repr(url) if url is not None else f"gs://{name}"
    if not name:
        raise InvalidURLError(f"{where} names no bucket; expected gs://<bucket>/<key> or /vsigs/<bucket>/<key>")
    parts = name.split(".")
    if not (
        _BUCKET_CHARS_RE.match(name)
        and 3 <= len(name) <= (222 if len(parts) > 1 else 63)
        and all(len(p) <= 63 for p in parts)
        and not _IPV4_RE.match(name)
        and not name.startswith("goog")
        and not _GOOGLE_RE.search(name)
    ):
        raise InvalidURLError(f"{where}: {name!r} is not a valid GCS bucket name. {BUCKET_RULE}.")


def parse_gcs(url: str, *, require_key: bool = False) -> GCSPath:
    """Parse any GCS spelling of ``url``; raise :class:`InvalidURLError` otherwise."""
    if not isinstance(url, str | os.PathLike):
        raise InvalidURLError(f"{url!r} is not a URL or path (got {type(url).__name__})")
    url = os.fspath(url)
    if _misspelled(url):
        raise InvalidURLError(
            f"{url!r} is not a well-formed GCS URL, and tools would read it differently; write it "
            "gs://<bucket>/<key> (lowercase scheme, two slashes, nothing before it)"
        )
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
            if parts.hostname in GOOGLE_STORAGE_HOSTS or _is_emulator_netloc(parts.netloc):
                if "generation" in parse_qs(parts.query):
                    raise InvalidURLError(
                        f"{url!r} names one generation of an object; cloudio reads the live object only. "
                        "Drop '?generation=' (or copy that generation to a key of its own)"
                    )
                rest = path.lstrip("/")
                if rest.startswith(("download/storage/v1/b/", "storage/v1/b/")):
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
    check_bucket(bucket, url=url)
    check_key(key, url)
    if require_key and not key:
        raise InvalidURLError(f"{url!r} names a bucket but no object; add the object's key after the bucket")
    return GCSPath(bucket, key)


def _misspelled(s: str) -> bool:
    """True for a GCS URL that rasterio or gcsfs would read but not as cloudio's canonical spelling."""
    if not _LOOSE_GCS_RE.match(s):
        return False
    if s.startswith(("gs://", "gcs://")):
        return False
    return not (s.startswith(("http://", "https://")) and urlsplit(s).hostname in GOOGLE_STORAGE_HOSTS)


def _is_emulator_netloc(netloc: str) -> bool:
    return emulator_netloc() == netloc


def is_gcs(url: object) -> bool:
    """True for any spelling cloudio treats as a GCS object or prefix."""
    if not isinstance(url, str | os.PathLike):
        return False
    s = os.fspath(url)
    if s.startswith(_VSI_PREFIXES) or s.startswith(("gs://", "gcs://")) or _misspelled(s):
        return True  # a misspelled GCS URL is GCS's business too: parse_gcs refuses it
    if s.startswith(("http://", "https://")):
        parts = urlsplit(s)
        return parts.hostname in GOOGLE_STORAGE_HOSTS or _is_emulator_netloc(parts.netloc)
    return False


def normalize(url: str | os.PathLike[str]) -> str:
    """The one journal key for ``url``: ``gs://b/k`` or an absolute local path.

    Raises
    ------
    InvalidURLError
        For a malformed GCS URL, an unsupported scheme (``s3://`` ...) or an empty one.
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
    if not s.strip():  # abspath("") is the working directory: never what an empty URL meant
        raise InvalidURLError(f"the URL is empty ({os.fspath(url)!r}); give gs://bucket/key (or a local path)")
    return os.path.abspath(os.path.expanduser(s))  # "~/x.zarr" is the user's, as xarray and fsspec read it
