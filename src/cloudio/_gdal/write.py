"""Writing rasters to GCS: render locally with GDAL, upload once on a clean close.

``cloudio.open(url, "w" | "w+" | "r+")`` lands here (through
:func:`cloudio._gdal.open.open`). The dataset GDAL writes lives in a private
temporary directory; when it closes without an exception the directory's
files are uploaded with :func:`cloudio._gcs.transfer.upload` (CRC32C checked,
retried, then journaled) and the directory is removed. An exception inside
the ``with`` block, or a failed upload, leaves nothing new on the server and
nothing in the journal, except an overwrite whose corrupt upload replaced the
old object and was deleted: that delete is journaled (see
:mod:`cloudio._gcs.transfer`). The temporary directory is removed in every case.
The local file is named ``dataset`` plus the key's extension, so a key whose
last segment is longer than a local file name may be (255 bytes) still works.

GDAL's own ``/vsigs/`` writer is never used: it writes through a temporary
file too, so nothing is lost, and the emulator rejects its ``PUT`` (see
docs/design.md).

Drivers
-------
Any GDAL raster driver that can create (``GTiff``...) or create-copy
(``COG``, ``PNG``, ``JPEG``...) a file: the latter are written through
rasterio's buffered writer (an in-memory dataset copied to the file on
close). The driver defaults to the one the key's extension names; ``COG``
must be asked for with ``driver="COG"``. ``VRT`` is refused: use
:func:`cloudio.write_vrt`. Sidecar files GDAL writes next to the dataset
(``.aux.xml`` for a georeferenced PNG, ``.ovr``, ``.msk``, ``.tfw``, an EHdr
``.hdr``) are uploaded next to the object, named after its stem as GDAL
named them after the temp file's, and after it: a failed upload of the
object leaves the old dataset as it was, sidecars included. If a sidecar's
upload then fails, the object and the sidecars uploaded with it are deleted
again (what they replaced cannot be kept; the error says so).

``"w"`` replaces the dataset whole, as GDAL's own ``Create`` does on a local
file (it deletes the old dataset's files first): once the new version is
up, one listing of the names that start with the object's stem finds the
sidecars the old version had and this one lacks (a ``.msk``, an
``.aux.xml`` with the old georeferencing, an ``.ovr``, a world file, an
EHdr ``.prj``/``.stx``), and they are deleted; left, GDAL would read them
with the new pixels. Other datasets' files are never taken for sidecars.

Known limit: ``"r+"`` downloads only the object itself, not its sidecars;
the ones it writes replace the old, the others are kept as they were.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import tempfile
import threading
import weakref
from collections import OrderedDict
from contextlib import ExitStack
from types import TracebackType
from typing import TYPE_CHECKING, Any

from cloudio._gcs.client import is_transient
from cloudio._gcs.transfer import Uploaded, checked_guard, download, ensure_bucket, object_generation, upload
from cloudio._journal import journal
from cloudio._paths import GCSPath
from cloudio._threads import hold_globals_across_fork
from cloudio.errors import (
    ConfigurationError,
    ConflictError,
    InvalidURLError,
    NotARasterError,
    TransientError,
    UploadError,
)

if TYPE_CHECKING:
    from rasterio.io import DatasetWriter

log = logging.getLogger(__name__)

__all__ = ["gcs_path_for_local", "open_write"]

_MODES = ("w", "w+", "r+")
_CREATE_ONLY = frozenset({"width", "height", "count", "crs", "transform", "dtype", "nodata"})

# local file of an open (or recently closed) writer -> the object it becomes, so that
# write_vrt can point a VRT built on such a dataset at the object rather than the temp file
_local_to_gcs: OrderedDict[str, GCSPath] = OrderedDict()
_local_lock = threading.Lock()
_LOCAL_MAX = 1024


def gcs_path_for_local(local: str) -> GCSPath | None:
    """The object a cloudio writer's temporary file stands for, if ``local`` is one."""
    with _local_lock:
        return _local_to_gcs.get(os.path.abspath(local))


def _remember_local(local: str, path: GCSPath) -> None:
    with _local_lock:
        _local_to_gcs[os.path.abspath(local)] = path
        while len(_local_to_gcs) > _LOCAL_MAX:
            _local_to_gcs.popitem(last=False)


# held across a fork: a thread opening a writer (its temporary file noted) then is not in the child, and a lock copied
# held by it would stop the child's first write through the GDAL face (and write_vrt) for good (a table under it)
hold_globals_across_fork("gdal write", __name__, "_local_lock")


class _UploadOnClose:
    """Mixed in front of rasterio's writer classes: upload on a clean close.

    ``name`` is the object's ``/vsigs/bucket/key`` path, as for a dataset
    ``cloudio.open`` reads, not the temporary file; ``files`` still lists the
    local files GDAL holds until the dataset closes.
    """

    _cloudio_path: GCSPath
    _cloudio_local: str
    _cloudio_state: dict[str, Any]

    @property
    def name(self) -> str:
        return self._cloudio_path.vsi

    @property
    def uploaded(self) -> list[Uploaded]:
        """What the close uploaded (empty before, or when nothing was uploaded)."""
        return list(self._cloudio_state.get("uploaded", []))

    def close(self) -> None:
        """Close the dataset and upload it (and any sidecar files GDAL wrote)."""
        self._cloudio_finish(upload_it=True)

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self._cloudio_finish(upload_it=et is None)

    def __del__(self) -> None:
        # rasterio >= 1.5 closes a dataset dropped without close(), like io.IOBase. Here that
        # would upload from a finalizer, where a failure can only be printed and ignored: a
        # dropped writer uploads nothing, with rasterio 1.4 and 1.5 alike.
        state = getattr(self, "_cloudio_state", None)
        if state is None or state["done"]:
            return
        log.warning("%s: dataset was never closed; nothing was uploaded", self._cloudio_path.url)
        try:
            self._cloudio_finish(upload_it=False)
        except Exception:
            log.debug("closing an abandoned writer failed", exc_info=True)

    def _cloudio_finish(self, *, upload_it: bool) -> None:
        state = self._cloudio_state
        with state["lock"]:
            if state["done"]:
                return
            state["done"] = True
            try:
                try:
                    super().close()  # type: ignore[misc] # GDAL flushes (or create-copies) into the temp file
                except Exception as e:  # GDAL's own (CPLE_*): it names the temp file, not the URL
                    url = self._cloudio_path.url
                    said = str(e).replace(self._cloudio_local, url).replace(state["tmpdir"], "")
                    raise UploadError(f"{url}: GDAL could not write the dataset ({said}); nothing was uploaded, "
                                      "and what the URL held is unchanged. Check the driver's creation options "
                                      "and data types, and write it again.") from e
                if upload_it:
                    state["uploaded"] = _upload_outputs(self._cloudio_local, self._cloudio_path, state["guard"],
                                                        replace=state["replace"])
                else:
                    log.info("%s: the dataset closed on an exception; nothing was uploaded", self._cloudio_path.url)
            finally:
                shutil.rmtree(state["tmpdir"], ignore_errors=True)


def refuse_folder_key(path: GCSPath) -> None:
    """GDAL datasets are not written to keys ending in '/': their sidecars go next to them by name, which
    the '/' takes away (they would land beside, or delete those of, the object without it)."""
    if path.key.endswith("/"):
        raise InvalidURLError(f"{path.url}: the key ends in '/', a folder's name to GDAL, which writes a "
                              f"dataset's sidecars beside it by name; write to {path.url.rstrip('/')!r} or "
                              "another name. (Such keys can be read, and written through cloudio.filesystem.)")


def _upload_outputs(local: str, path: GCSPath, guard: int | None = None, *, replace: bool = False) -> list[Uploaded]:
    """Upload ``local``, then the sidecars GDAL wrote next to it; when it ``replace``s the dataset, delete
    the old version's sidecars this one lacks (:func:`_drop_old_sidecars`).

    The object goes first, so that a failed upload of it leaves the old
    dataset (sidecars included) as it was. If a sidecar's upload fails, what
    this write uploaded is deleted again (and the deletes journaled), so a
    failed write leaves no new dataset mixed with the old one's sidecars.
    ``guard`` (``if_generation_match``) is checked before anything goes up
    when there are sidecars, and carried by the object's own upload.

    The object is held as changing throughout (:meth:`cloudio._journal.WriteJournal.changing`):
    GDAL reads its sidecars with it, so an open in between would pair the new
    pixels with the old version's ``.msk`` or ``.aux.xml``.
    """
    if not os.path.exists(local):
        raise UploadError(
            f"{path.url}: GDAL produced no file to upload (expected {os.path.basename(local)}); "
            "nothing was uploaded. Check the driver and creation options."
        )
    sidecars = _sidecar_targets(local, path)
    if guard is not None and sidecars:
        held = object_generation(path)
        if held != guard:
            raise ConflictError(path.url, guard, held)
    with journal().changing(path.url):
        return _upload_all(local, path, guard, sidecars, replace)


def _sidecar_targets(local: str, path: GCSPath) -> list[tuple[str, GCSPath]]:
    """The sidecar files GDAL wrote next to ``local``, each with the object it goes to (checked before
    anything is uploaded: a key GCS would refuse must not cost the old version)."""
    folder, base = os.path.split(local)
    targets = []
    for name in sorted(os.listdir(folder)):
        side = os.path.join(folder, name)
        if name == base or not os.path.isfile(side):
            continue
        remote = _remote_name(name, base, path.name)
        try:
            targets.append((side, path.parent.child(remote)))
        except InvalidURLError as e:
            raise InvalidURLError(
                f"{path.url}: GDAL wrote the sidecar {remote!r} with the dataset, and GCS would refuse its key "
                f"({e}); nothing was uploaded. Write to a shorter key, or without what the sidecar holds "
                "(a PNG's CRS and transform go to its .aux.xml)."
            ) from e
    return targets


def upload_known(source: bytes | str, path: GCSPath, *, content_type: str | None = None,
                 if_generation_match: int | None = None) -> Uploaded:
    """:func:`~cloudio._gcs.transfer.upload` of a dataset's object, whose old sidecars go once it is stored: an
    outcome left unknown (the server, asked after the answers were lost, did not say it holds what was sent)
    says they would be read with it if it was stored."""
    try:
        return upload(source, path, content_type=content_type, if_generation_match=if_generation_match)
    except TransientError as e:
        raise TransientError(f"{e} If it was stored, the old version's sidecars (.aux.xml, .ovr, .msk) are "
                             "still beside it and would be read with it: write it again.") from e


def _upload_all(local: str, path: GCSPath, guard: int | None, sidecars: list[tuple[str, GCSPath]],
                replace: bool) -> list[Uploaded]:
    """:func:`_upload_outputs`' uploads (and deletes), the object held as changing by the caller.

    When the object's upload landed with its answers lost, the server holds
    what was sent and the upload succeeded (:func:`~cloudio._gcs.transfer.put_verified`
    asks): the write goes on, so the new pixels are not read with the old version's sidecars.
    """
    done = [upload_known(local, path, if_generation_match=guard)]
    remote = path
    try:
        for side, remote in sidecars:
            done.append(upload(side, remote))
    except Exception as e:
        kept = _undo(done)
        raise UploadError(
            f"{path.url}: the object was uploaded, but its sidecar {remote.url} failed ({e}); "
            "the object and the sidecars uploaded with it were deleted again, so what they held before "
            "this write is gone" + (f" (could not delete {', '.join(kept)})" if kept else "")
            + ". Write the dataset again."
        ) from e
    except BaseException:
        _undo(done)
        raise
    if replace:
        _drop_old_sidecars(path, {up.url for up in done})
    return done


#: what GDAL names a dataset's sidecars, after the object's whole name
_SIDECARS = (".aux.xml", ".aux", ".ovr", ".ovr.aux.xml", ".msk", ".msk.aux.xml")
#: names after the stem that another dataset of the same stem may own (a PNG's .wld, a shapefile's .prj):
#: kept when one is there, as GDAL's own Create keeps what the old dataset's file list did not hold; so is
#: whatever another dataset there reads as its own sidecar (``a.tfw``, ``a.tiff``'s world file too)
_SHARED = frozenset({".wld", ".prj"})
#: the files of a multi-file format, after the object's stem, by the object's extension
_FORMAT_FILES = dict.fromkeys((".bil", ".bip", ".bsq"), (".hdr", ".prj", ".stx", ".clr"))


def _is_sidecar(name: str, obj: str) -> bool:
    """Whether GDAL reads object ``name`` as part of the dataset ``obj`` (same folder): a sidecar named
    after it, a world file named after its stem (``.tfw``, ``.tifw``, ``.wld`` for ``.tif``), or a file
    of its multi-file format. Narrower than :func:`cloudio._gdal.targets.is_sidecar` (which says what an
    invalidation must cover): what this admits is deleted, so another dataset's files never are."""
    if name.startswith(obj) and name[len(obj):] in _SIDECARS:
        return True
    stem, ext = os.path.splitext(obj)
    if not ext or not name.startswith(stem + "."):
        return False
    tail, ext = name[len(stem):].lower(), ext.lower()
    world = {f".{ext[1]}{ext[-1]}w", f"{ext}w", ".wld"} if len(ext) > 2 else set()
    return tail in world or tail in _FORMAT_FILES.get(ext, ())


def _drop_old_sidecars(path: GCSPath, uploaded: set[str]) -> None:
    """Delete (and journal) the sidecars of ``path`` on the server that this write did not upload."""
    from cloudio._gcs.client import call_bounded, gcs_filesystem

    stem = os.path.splitext(path.name)[0]
    fs = gcs_filesystem()
    try:
        names = call_bounded(fs, fs._ls(path.parent.fs_path, prefix=stem, refresh=True, detail=False))
    except FileNotFoundError:
        return  # nothing there (an emulator's empty "folder")
    except Exception as e:
        if not (is_transient(e) or isinstance(e, TimeoutError)):  # refused (403): writing needs no listing
            log.warning("%s: could not list its folder for the old version's sidecars (%s); any the old version "
                        "had are left (listing needs storage.objects.list)", path.url, e)
            return
        raise UploadError(
            f"{path.url}: the dataset was uploaded, but listing its folder for the old version's sidecars "
            f"failed ({e}); a .msk, .aux.xml or world file of the old version may still be read with it. "
            "Retry the write, or delete its old sidecars."
        ) from e
    here = [n.rsplit("/", 1)[-1] for n in names]
    others = [n for n in here if n != path.name and n.startswith(stem + ".") and not _is_sidecar(n, path.name)]
    old = [path.parent.child(n) for n in here  # only sidecars: a neighbour's name need not be one cloudio takes
           if _is_sidecar(n, path.name) and path.parent.url + n not in uploaded
           and not (others and n[len(stem):].lower() in _SHARED)
           and not any(_is_sidecar(n, other) for other in others)]  # a.tiff's .tfw when a.tif is written
    if old:
        log.info("%s: deleting the old version's sidecars %s", path.url, ", ".join(p.name for p in old))
    kept = _delete([p.url for p in old])
    if kept:
        raise UploadError(
            f"{path.url}: the dataset was uploaded, but the old version's sidecars {', '.join(kept)} could "
            "not be deleted, and GDAL reads them with the new one. Delete them, or write the dataset again."
        )


def _remote_name(name: str, base: str, obj: str) -> str:
    """The object name of sidecar ``name``: GDAL names it after the temp file ``base``
    (``dataset.tif.aux.xml``) or its stem (``dataset.tfw``, an EHdr ``dataset.hdr``)."""
    if name.startswith(base):
        return obj + name[len(base):]
    stem = os.path.splitext(base)[0]
    if name.startswith(stem):
        return os.path.splitext(obj)[0] + name[len(stem):]
    return name


def _undo(done: list[Uploaded]) -> list[str]:
    """Delete what a failed write uploaded (journaled); returns the URLs that could not be deleted."""
    return _delete([up.url for up in done])


def _delete(urls: list[str]) -> list[str]:
    """Delete ``urls`` (each delete journaled); returns the ones that could not be deleted."""
    from cloudio._gcs.client import call_bounded, gcs_filesystem
    from cloudio._paths import parse_gcs

    fs = gcs_filesystem()
    kept = []
    for url in urls:
        try:
            call_bounded(fs, fs._rm_file(parse_gcs(url).fs_path))
        except FileNotFoundError:
            pass
        except Exception:
            log.warning("could not delete %s", url, exc_info=True)
            kept.append(url)
            journal().record(url, "invalidate")  # a try may have landed, its answer lost: caches ask again
            continue
        journal().record(url, "delete")
    return kept


@functools.cache
def _uploading_class(base: type) -> type:
    """``base`` with :class:`_UploadOnClose` in front (one subclass per dataset class)."""
    return type(f"Cloudio{base.__name__}", (_UploadOnClose, base), {"__module__": __name__})


def _driver_for(path: GCSPath, driver: str | None) -> str:
    from rasterio.drivers import driver_from_extension

    if driver is None:
        try:
            driver = driver_from_extension(path.key)
        except ValueError as e:
            raise ConfigurationError(
                f"{path.url}: cannot tell the GDAL driver from the file name; pass driver= "
                "(e.g. driver='GTiff' or driver='COG')"
            ) from e
    if driver.upper() == "VRT":
        raise ConfigurationError(
            f"{path.url}: VRT datasets are saved with cloudio.write_vrt(dataset, url), which "
            "makes their source paths absolute /vsigs/ paths"
        )
    return driver


#: longest extension kept on the local file (drivers and sidecars go by it); longer ones are dropped
_EXT_MAX = 16


def _local_name(path: GCSPath) -> str:
    """The temp file's name: ``dataset`` plus the key's extension, however long the key's last segment.

    A GCS key's last segment may be up to 1024 bytes; a local file name at most 255.
    """
    ext = os.path.splitext(path.name)[1]
    return "dataset" + (ext if len(ext) <= _EXT_MAX else "")


def _open_update(path: GCSPath, local: str, driver: str | None, kwargs: dict[str, Any]) -> DatasetWriter:
    """Open the downloaded copy of ``path`` for update; a file GDAL cannot update is a NotARasterError."""
    from rasterio._path import _parse_path
    from rasterio.errors import RasterioError
    from rasterio.io import get_writer_for_path

    try:
        try:
            base = get_writer_for_path(_parse_path(local), driver=driver)
        except TypeError as e:  # rasterio 1.4's get_dataset_driver says "not recognized" this way
            raise RasterioError(str(e)) from e
        return _uploading_class(base)(_parse_path(local), "r+", driver=driver, **kwargs)  # type: ignore[no-any-return]
    except RasterioError as e:
        raise NotARasterError(
            f"{path.url}: GDAL cannot open this object for update "
            f"({str(e).replace(local, path.url)}). Check that it is a raster in a format GDAL can "
            "update in place (e.g. GTiff), or write a new dataset with mode 'w'."
        ) from e


def open_write(path: GCSPath, mode: str, driver: str | None = None, **kwargs: Any) -> DatasetWriter:
    """Open ``path`` for writing (``"w"``, ``"w+"``) or updating (``"r+"``).

    Parameters
    ----------
    path
        The object the dataset becomes.
    mode
        ``"w"``/``"w+"`` create a new dataset; ``"r+"`` updates a copy of the
        current object, downloaded fresh (never from a cache).
    driver
        GDAL driver; by default the one the key's extension names.
    **kwargs
        As for :func:`rasterio.open`: ``width``, ``height``, ``count``,
        ``crs``, ``transform``, ``dtype``, ``nodata``, ``sharing`` and
        creation options; and ``if_generation_match`` (cloudio's): ``close()``
        uploads only if the object is then at that generation (0: only if
        it does not exist), else raises :class:`~cloudio.ConflictError`.

    Returns
    -------
    rasterio.io.DatasetWriter or rasterio.io.BufferedDatasetWriter
        A subclass of the writer :func:`rasterio.open` would return whose
        ``close()`` (and clean ``__exit__``) uploads; ``name`` is the
        ``/vsigs/`` path.

    Raises
    ------
    BucketNotFoundError
        The bucket does not exist (checked at open, once per bucket).
    ObjectNotFoundError
        ``"r+"`` of an object that does not exist.
    ConfigurationError
        Unknown extension without ``driver=``, or ``driver="VRT"``.
    UploadError, IntegrityError
        From ``close()``, when the upload failed; nothing was journaled.
    ConflictError
        From ``close()``, when ``if_generation_match`` did not hold; nothing was uploaded.
    """
    import rasterio  # noqa: F401 - registers drivers
    from rasterio._path import _parse_path
    from rasterio.env import env_ctx_if_needed
    from rasterio.errors import DriverRegistrationError
    from rasterio.io import get_writer_for_driver

    from cloudio._session import current_level

    if mode not in _MODES:
        raise ValueError(f"{path.url}: mode {mode!r} is not a write mode; use 'w', 'w+' or 'r+'")
    current_level()  # an unusable CLOUDIO_CONSISTENCY is named here, not at close (where the old sidecars' listing
    refuse_folder_key(path)  # met it after the upload, and kept them)
    guard = checked_guard(path.url, kwargs.pop("if_generation_match", None))
    if mode != "r+":
        driver = _driver_for(path, driver)
    else:  # rasterio.open passes only driver, sharing and options when updating
        kwargs = {k: v for k, v in kwargs.items() if not (k in _CREATE_ONLY and v is None)}
    tmpdir = tempfile.mkdtemp(prefix="cloudio-write-")
    local = os.path.join(tmpdir, _local_name(path))
    try:
        if mode == "r+":
            download(path, local)  # raises the not-found errors, naming the URL
        else:
            ensure_bucket(path)
        with env_ctx_if_needed():
            if mode == "r+":
                dataset = _open_update(path, local, driver, kwargs)
            else:
                try:
                    base = get_writer_for_driver(driver)
                except DriverRegistrationError as e:
                    raise ConfigurationError(f"{path.url}: GDAL has no driver named {driver!r}; pass one it has "
                                             "(e.g. driver='GTiff' or driver='COG')") from e
                if base is None:
                    raise ConfigurationError(
                        f"{path.url}: GDAL driver {driver!r} can neither create nor create-copy files; "
                        "choose another driver (e.g. driver='GTiff')"
                    )
                dataset = _uploading_class(base)(_parse_path(local), mode, driver=driver, **kwargs)
    except BaseException:
        shutil.rmtree(tmpdir, ignore_errors=True)
        raise
    dataset._env = ExitStack()  # what rasterio.open attaches; closed by the dataset's close()
    dataset._cloudio_path = path
    dataset._cloudio_local = local
    dataset._cloudio_state = state = {"lock": threading.RLock(), "done": False, "tmpdir": tmpdir, "guard": guard,
                                      "replace": mode != "r+"}
    # a dataset dropped without close() uploads nothing; its temporary files still go
    weakref.finalize(dataset, _abandoned, state, path.url)
    _remember_local(local, path)
    log.debug("%s: writing through %s (driver %s, mode %s)", path.url, local, driver, mode)
    return dataset


def _abandoned(state: dict[str, Any], url: str) -> None:
    if not state["done"]:
        log.warning("%s: dataset was never closed; nothing was uploaded", url)
    shutil.rmtree(state["tmpdir"], ignore_errors=True)
