"""``cloudio.write_vrt``: save any dataset, ``WarpedVRT`` included, as a VRT on GCS.

GDAL serialises a dataset as VRT XML (``rasterio.shutil.copy(ds, "x.vrt",
driver="VRT")``: a ``WarpedVRT`` keeps its warp options, destination CRS,
transform, resampling and nodata; any other dataset becomes a VRT of simple
sources). The XML is rendered into a private temporary folder, and every
source path in it (``SourceFilename``, ``SourceDataset``) is rewritten to an
absolute ``/vsigs/bucket/key`` path so that GDAL can open the VRT from
anywhere:

* ``gs://``, ``/vsigs_streaming/``, ``https://storage.googleapis.com`` and
  ``/vsicurl/https://storage.googleapis.com/...`` spellings become ``/vsigs/``;
* paths GDAL made relative to the temporary folder (``relativeToVRT="1"``)
  are resolved first; relative paths in XML text passed in are resolved
  against the folder of ``url``, as GDAL reads that VRT stored there;
* the temporary file of a dataset being written through ``cloudio.open(...,
  "w"/"r+")`` becomes the object it will be uploaded to;
* a plain local file or an in-memory (``/vsimem/``) dataset cannot be read
  from anywhere else: :class:`~cloudio.errors.InvalidURLError` says so rather
  than storing a VRT that only works on this machine.

The XML is then uploaded with :func:`cloudio._gcs.transfer.upload` (CRC32C checked,
journaled), so a ``cloudio.open`` of the VRT right after, in the same process,
sees it even where GDAL listed that prefix before (rasterio issue 3254, GDAL
issue 11351).
"""

from __future__ import annotations

import logging
import os
import posixpath
import shutil
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from cloudio._gcs.transfer import checked_guard
from cloudio._journal import journal
from cloudio._paths import GCSPath, is_gcs, parse_gcs
from cloudio._session import current_level
from cloudio.errors import CloudioError, ConfigurationError, InvalidURLError, UploadError

if TYPE_CHECKING:
    from rasterio.io import DatasetReaderBase

log = logging.getLogger(__name__)

__all__ = ["SOURCE_TAGS", "absolute_sources", "source_elements", "write_vrt"]

#: elements whose text is a source dataset path in GDAL's VRT formats
SOURCE_TAGS = frozenset({"SourceFilename", "SourceDataset"})
_VSICURL = "/vsicurl/"


def write_vrt(dataset_or_vrt: DatasetReaderBase | str | os.PathLike[str], url: str | os.PathLike[str], *,
              if_generation_match: int | None = None) -> str:
    """Save a dataset as VRT XML at ``url``, with absolute ``/vsigs/`` source paths.

    Parameters
    ----------
    dataset_or_vrt
        An open rasterio dataset (a :class:`rasterio.vrt.WarpedVRT`, a dataset
        read with ``cloudio.open`` or ``rasterio.open``), the path or URL of a
        raster or VRT, or VRT XML text (starting with ``<VRTDataset``).
    url
        Where the VRT goes: ``gs://bucket/key.vrt`` or ``/vsigs/bucket/key.vrt``.
    if_generation_match
        Write only if the object is at this generation (0: only if there is
        none yet), so a concurrent writer's VRT is never replaced unseen.

    Returns
    -------
    str
        The object's URL as ``gs://bucket/key`` (the journal key); pass it to
        ``cloudio.open`` to read the VRT.

    Raises
    ------
    InvalidURLError
        ``url`` is not a GCS object URL, or a source of the dataset is a local
        or in-memory file that GDAL could not open from elsewhere.
    ConfigurationError
        ``if_generation_match`` is no generation, ``CLOUDIO_CONSISTENCY`` is
        unusable, the dataset is closed, or still being written through ``cloudio.open``;
        or the VRT would read ``url`` itself, as a source or through the VRTs
        among its sources (one GET per such VRT), so writing it would replace
        what it reads. Nothing was uploaded.
    UploadError, IntegrityError, BucketNotFoundError
        From the upload, or GDAL could not render the VRT; nothing was journaled.
    ConflictError
        ``if_generation_match`` did not hold; nothing was uploaded or journaled.

    Notes
    -----
    Sources are referenced, not copied: the VRT reads whatever the source
    objects hold when it is opened. Sidecars of the VRT it replaces (a
    ``.vrt.ovr``, a ``.vrt.aux.xml``) are deleted, as for ``cloudio.open(url, "w")``:
    GDAL would read them with the new VRT.
    """
    from cloudio._gdal.write import _drop_old_sidecars, refuse_folder_key, upload_known

    path = parse_gcs(os.fspath(url), require_key=True)
    current_level()  # an unusable CLOUDIO_CONSISTENCY is named now, not after the upload (with the old sidecars)
    guard = checked_guard(path.url, if_generation_match)
    refuse_folder_key(path)
    tmpdir = tempfile.mkdtemp(prefix="cloudio-vrt-")
    try:
        local = os.path.join(tmpdir, "dataset.vrt")  # a key's last segment may be longer than a file name
        xml_text = _render(dataset_or_vrt, local, path)
        # GDAL's own rendering is relative to the temporary folder; XML text, to where it is stored
        is_text = isinstance(dataset_or_vrt, str) and dataset_or_vrt.lstrip().startswith("<VRTDataset")
        fixed = absolute_sources(xml_text, base_dir=path.parent if is_text else tmpdir, url=path.url)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    if _reads(fixed, path):
        raise ConfigurationError(
            f"{path.url}: the VRT would read itself (it is one of its own sources), and writing it would replace "
            "what it reads; nothing was written. Write the VRT to another URL (such as "
            f"{path.url.rsplit('.', 1)[0]}_view.vrt)."
        )
    with journal().changing(path.url):  # an open in between would read the new VRT with the old sidecars
        upload_known(fixed.encode("utf-8"), path, content_type="application/xml", if_generation_match=guard)
        _drop_old_sidecars(path, {path.url})  # the old VRT's .vrt.ovr or .aux.xml would be read with this one
    log.debug("wrote VRT %s", path.url)
    return path.url


def _render(obj: Any, local: str, target: GCSPath) -> str:
    """VRT XML for ``obj``, as GDAL writes it to ``local``."""
    import rasterio.shutil

    if isinstance(obj, (str, os.PathLike)):
        s = os.fspath(obj)
        if s.lstrip().startswith("<VRTDataset"):
            return s
        from cloudio._gdal.open import open as cloudio_open

        with cloudio_open(s) as ds:
            return _render(ds, local, target)
    from cloudio._gdal.write import _UploadOnClose

    if isinstance(obj, _UploadOnClose):
        raise ConfigurationError(
            f"{target.url}: {obj.name} is still being written through cloudio.open; close it first, "
            f"then pass its URL ({obj._cloudio_path.url}) to write_vrt"
        )
    if getattr(obj, "closed", False):
        raise ConfigurationError(
            f"{target.url}: the dataset {getattr(obj, 'name', obj)!r} is closed; pass an open dataset or its URL"
        )
    try:
        rasterio.shutil.copy(obj, local, driver="VRT")
        with open(local, encoding="utf-8") as f:
            return f.read()
    except CloudioError:
        raise
    except Exception as e:  # GDAL's own (CPLE_*, not a RasterioError) would not say which write_vrt failed
        raise UploadError(
            f"{target.url}: GDAL could not render {getattr(obj, 'name', obj)!r} as VRT XML ({e}); nothing was uploaded"
        ) from e


def absolute_sources(xml_text: str, *, base_dir: str | GCSPath | None = None, url: str = "the VRT") -> str:
    """Rewrite every source path in VRT XML to an absolute ``/vsigs/`` path.

    Parameters
    ----------
    xml_text
        The VRT XML.
    base_dir
        Folder that relative paths (``relativeToVRT="1"``) are relative to: a
        local folder, or the GCS folder the VRT is stored in (as GDAL resolves
        them when it reads the VRT there); the current directory when None.
    url
        Named in error messages.

    Raises
    ------
    InvalidURLError
        A source is a local or in-memory file.
    """
    try:
        root = ET.fromstring(xml_text)
    except ET.ParseError as e:
        raise ConfigurationError(f"{url}: the VRT XML is not well-formed ({e}); nothing was written. Check the "
                                 "text (a VRT is a <VRTDataset> document), or pass the dataset itself.") from e
    for el in source_elements(root):
        el.text = _resolved(el, base_dir, url)
        if "relativeToVRT" in el.attrib:
            el.set("relativeToVRT", "0")
    return ET.tostring(root, encoding="unicode")


def _resolved(el: ET.Element, base_dir: str | GCSPath | None, url: str) -> str:
    """The absolute ``/vsigs/`` path a source element names (:func:`absolute_sources`); InvalidURLError for a
    local or in-memory file."""
    raw = (el.text or "").strip()
    if el.get("relativeToVRT") == "1" and not raw.startswith("/vsi"):
        raw = _relative(raw, base_dir, url)
    return _absolute(raw, url)


def source_elements(root: ET.Element) -> Iterator[ET.Element]:
    """The elements of VRT XML that name a source: their text, relative to the VRT when ``relativeToVRT="1"``."""
    return (el for el in root.iter() if el.tag in SOURCE_TAGS and el.text is not None)


def _sources_of(xml_text: str) -> set[str]:
    """The source paths named in VRT XML already made absolute (:func:`absolute_sources`)."""
    return {(el.text or "").strip() for el in source_elements(ET.fromstring(xml_text))}


def _reads(xml_text: str, path: GCSPath) -> bool:
    """Whether VRT XML (its sources absolute) stored at ``path`` would read ``path``: as one of its sources,
    or through the VRTs among them, however deep (their XML as the server holds it, each read once)."""
    seen: set[str] = set()
    level = _sources_of(xml_text)
    while level:
        if path.vsi in level:
            return True
        seen |= level
        below: set[str] = set()
        for vsi in level:
            below |= _stored_sources(vsi, path.url)
        level = below - seen
    return False


def _stored_sources(vsi: str, url: str) -> set[str]:
    """The ``/vsigs/`` sources named by the VRT the server holds at ``vsi`` (none when it is not a VRT on GCS,
    or cannot be read); a source cloudio cannot place (a local file) is left out, the others kept.

    The server failing past the retries (5xx, 429, timeouts) is a TransientError naming ``url``, the VRT
    being written: an unread source VRT may be the one that reads ``url``, so the write cannot go ahead.
    """
    from fsspec.asyn import sync

    from cloudio._gcs.client import bounded, gcs_filesystem, is_transient, transient_error
    from cloudio._gdal.open import failed_request
    from cloudio._gdal.targets import may_reference

    if not (vsi.startswith("/vsigs/") and may_reference(vsi)):
        return set()
    source = parse_gcs(vsi)
    fs = gcs_filesystem()
    try:
        root = ET.fromstring(sync(fs.loop, bounded, fs, fs._cat_file(source.fs_path)))
    except (ET.ParseError, FileNotFoundError):  # missing, not VRT XML: it reads nothing more
        return set()
    except Exception as e:  # gcsfs's HttpError (5xx/429 past its retries) is no OSError
        if is_transient(e):  # (a TransientError too)
            raise transient_error(url, f"reading its source {source.url} (to check that it does not read "
                                       "itself; nothing was written)", e) from e
        if not (failed_request(e) or isinstance(e, CloudioError)):
            raise
        return set()  # refused (403...): GDAL cannot read it either, so it reads nothing more
    found = set()
    for el in source_elements(root):
        try:
            found.add(_resolved(el, source.parent, source.url))
        except CloudioError:
            continue
    return found


def _relative(raw: str, base_dir: str | GCSPath | None, url: str) -> str:
    """``raw`` resolved against ``base_dir``, as GDAL resolves a path relative to a VRT stored there."""
    if not isinstance(base_dir, GCSPath):
        return os.path.normpath(os.path.join(base_dir or os.getcwd(), raw))
    if raw.startswith("/") or is_gcs(raw):  # GDAL reads an absolute path as it is
        return raw
    key = base_dir.key + raw
    if any(part in (".", "..") for part in key.split("/")):
        key = posixpath.normpath(key)
        if key == ".." or key.startswith("../"):
            raise InvalidURLError(
                f"{url}: source {raw!r} is relative to the VRT but leads out of its bucket gs://{base_dir.bucket}"
            )
    return GCSPath(base_dir.bucket, key).vsi


def _absolute(src: str, url: str) -> str:
    if is_gcs(src):
        return parse_gcs(src).vsi
    if src.startswith(_VSICURL) and is_gcs(src[len(_VSICURL):]):
        return parse_gcs(src[len(_VSICURL):]).vsi
    from cloudio._gdal.write import gcs_path_for_local

    if not src.startswith("/vsi"):
        mapped = gcs_path_for_local(src)
        if mapped is not None:
            return mapped.vsi
        raise InvalidURLError(
            f"{url}: source {src!r} is a local file, which GDAL could not open from anywhere else. "
            "Upload it first (cloudio.open(gs_url, 'w', ...)) and build the VRT on the uploaded copy."
        )
    if src.startswith("/vsimem/"):
        raise InvalidURLError(
            f"{url}: source {src!r} lives in this process's memory only. Upload it first "
            "(cloudio.open(gs_url, 'w', ...)) and build the VRT on the uploaded copy."
        )
    return src  # other GDAL virtual paths (/vsis3/, /vsizip//vsigs/...): left as they are
