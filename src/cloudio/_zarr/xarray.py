"""``cloudio.to_zarr`` / ``cloudio.open_zarr``: Xarray on a journaled Zarr store.

Both are thin: keyword arguments go to :meth:`xarray.Dataset.to_zarr` and
:func:`xarray.open_zarr` unchanged, with three additions.

* Writes go through :func:`cloudio.zarr_store`, so every chunk, shard and
  metadata document written is journaled and the other caches of the
  process see it.
* Dask-backed variables are rechunked first so that each Zarr shard (or
  chunk, when unsharded) is written by exactly one task, whatever
  ``safe_chunks`` says (see :mod:`cloudio._zarr.shard_safety`); ``rechunk=False``
  turns that into an :class:`~cloudio.UnsafeChunkingError` instead.
* ``open_zarr`` does not trust a consolidated copy of the metadata that this
  process made stale (a later write with ``consolidated=False``): it reads
  the metadata documents themselves then. At the strong and bounded levels it
  asks the server whether the copy is older than what it summarises, whoever
  wrote it (:func:`cloudio._zarr.store.revalidate`); at the session level
  too, once, at the first open after another writer's change there was
  announced (:func:`cloudio.invalidate`, :mod:`cloudio._zarr.consumer`).
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable, Hashable, Mapping
from typing import TYPE_CHECKING, Any, Literal, cast

import numpy as np

from cloudio._paths import is_gcs, parse_gcs
from cloudio._session import current_level
from cloudio._threads import shutting_down
from cloudio._zarr import consumer as announcements
from cloudio._zarr.changes import _Changes, stopped_on_failure
from cloudio._zarr.shard_safety import align, whole
from cloudio._zarr.shard_safety import is_dask as _is_dask
from cloudio._zarr.store import (
    STORED_ALREADY,
    JournaledStore,
    MetadataCheck,
    WriteMark,
    check_complete,
    cloudio_errors,
    consolidated_is_stale,
    consolidated_seen,
    key_prefix,
    raised_computing,
    refuse_replacing_others,
    revalidate,
    run_sync,
    written_here,
    zarr_store,
)
from cloudio.errors import CloudioError, ConfigurationError, LoopNotRunningError

if TYPE_CHECKING:
    import xarray

log = logging.getLogger(__name__)

__all__ = ["open_zarr", "to_zarr"]


def _store(url: str | os.PathLike[str] | JournaledStore, read_only: bool,
           storage_options: Mapping[str, Any] | None) -> JournaledStore:
    if isinstance(url, JournaledStore):
        if storage_options:  # (xarray refuses them with a store too: they would go unused)
            raise ConfigurationError(
                f"{url.root_url}: storage_options={dict(storage_options)!r} are given with a store, which has gcsfs "
                "options of its own; nothing was done. Pass the URL with them, or make the store with "
                "cloudio.zarr_store(url, **storage_options).")
        return url
    return zarr_store(url, read_only=read_only, **dict(storage_options or {}))


def _grid_from_encoding(enc: Mapping[str, Any], ndim: int) -> tuple[tuple[int, ...], bool] | None:
    """The write grid a new array will get from its encoding: shards, else chunks; None if unknown."""
    for key, sharded in (("shards", True), ("chunks", False)):
        val = enc.get(key)
        if val is None:
            continue
        if whole(val) is not None:
            return (int(val),) * ndim, sharded
        if isinstance(val, tuple | list) and len(val) == ndim and all(whole(v) is not None for v in val):
            return tuple(int(v) for v in val), sharded
        return None  # "auto", a dict or a rectilinear spec: zarr decides; see _open_existing afterwards
    return None


def _open_existing(store: JournaledStore, group: str | None, name: Hashable) -> Any | None:
    """The existing Zarr array for variable ``name``, or None."""
    import zarr

    path = f"{group.strip('/')}/{name}" if group else str(name)
    try:
        return zarr.open_array(store.with_read_only(True), path=path, mode="r")
    except (FileNotFoundError, KeyError, zarr.errors.NodeNotFoundError, zarr.errors.NodeTypeValidationError):
        return None  # not there yet, or a group: a new array will be created


def _stored_dims(zarr_array: Any) -> tuple[Hashable, ...] | None:
    """Dimension names of a stored array (v3 metadata, or xarray's v2 attribute)."""
    names = getattr(zarr_array.metadata, "dimension_names", None)
    if names is None:
        names = zarr_array.attrs.get("_ARRAY_DIMENSIONS")
    return tuple(names) if names is not None else None


def _resolve_region(dataset: xarray.Dataset, store: JournaledStore, region: Any, group: str | None,
                    ) -> dict[Hashable, slice]:
    """Region slices with ``"auto"`` replaced by positions found from the store's indexes."""
    import xarray as xr

    if region is None:
        return {}
    if region == "auto":
        region = {dim: "auto" for dim in dataset.dims}
    out: dict[Hashable, slice] = {}
    existing = None
    for dim, sl in region.items():
        if isinstance(sl, slice):
            out[dim] = sl
            continue
        if sl != "auto" or dim not in dataset.indexes:
            continue
        if existing is None:
            existing = xr.open_zarr(store.with_read_only(True), group=group, consolidated=False, chunks=None)
        idx = existing.indexes[dim].get_indexer(dataset.indexes[dim])
        if len(idx) and (idx >= 0).all():
            out[dim] = slice(int(idx.min()), int(idx.max()) + 1)
    return out


class StoredVariables:
    """The arrays a write may add to or write into, read once before it: their Zarr arrays (for the write grid
    of Dask chunks) and the dtype each reads back as through Xarray (for the casts an append may not make)."""

    def __init__(self, zstore: Any) -> None:
        self._zstore = zstore  # xarray's ZarrStore of the group, its members read when it was opened
        self._names = set(zstore.array_keys())

    @property
    def zarr_format(self) -> int:
        return int(self._zstore.zarr_group.metadata.zarr_format)

    def array(self, name: Hashable) -> Any | None:
        """The stored Zarr array of variable ``name``, or None (not stored yet, or a group of that name)."""
        return self._zstore.members[str(name)] if str(name) in self._names else None

    def dtype(self, name: Hashable) -> np.dtype[Any] | None:
        """The dtype variable ``name`` reads back as (masked or scaled integers as floats), as xarray decodes
        the stored variable before it appends to it; None when it is not stored.

        Times are left encoded (``decode_times=False``): decoding them would read their first and last values.
        """
        from xarray import conventions

        if str(name) not in self._names:
            return None
        variable = conventions.decode_cf_variable(str(name), self._zstore.open_store_variable(str(name)),
                                                  decode_times=False, decode_timedelta=False)
        decoded: np.dtype[Any] = np.dtype(variable.dtype)
        return decoded


#: the most objects of one variable an append or region write lists for their generations (ten listing pages): a
#: write touching more of it goes unguarded against a late copy of its own uploads (docs/consistency.md)
GUARD_LISTING_LIMIT = 10_000
#: the most rows of objects listed one by one (at once); more, and the variable is listed whole
_ROW_LISTINGS = 16


def _rewritten_starts(dataset: xarray.Dataset, store: JournaledStore, kwargs: Mapping[str, Any], mode: str,
                      stored: StoredVariables | None,
                      region: Callable[[], dict[Hashable, slice]]) -> tuple[list[str], list[str]]:
    """The beginnings of the keys an append, a region write or a write adding variables rewrites (see
    :meth:`JournaledStore.generations_from`), for their uploads to need the generations listed there; and the
    prefixes of the variables an append rewrites whole, where the last writer wins (``expecting``'s ``whole``).

    Why these: a region write rewrites the rows of chunks (or shards) along each variable's first axis that its
    region touches; an append, those rows past the stored length and the variable's metadata; a variable added
    is all new. Listing only those keeps the cost to the objects written (a region write of one row lists one
    row). What writers adding their own variables at once all rewrite alike (the group's own documents,
    coordinates and variables without ``append_dim``, rewritten whole) is listed too, but another writer's object
    there is written over: guarded strictly, those writers would refuse each other's writes of the same values.
    """
    append_dim = kwargs.get("append_dim")
    region_arg = kwargs.get("region")
    base = key_prefix(_group(kwargs))
    starts: list[str] = []
    whole: list[str] = []
    if stored is not None and mode != "r+":
        # the group's attributes (and, format 2, .zgroup): xarray writes them again outside mode "r+"
        whole.append(base + ("zarr.json" if stored.zarr_format == 3 else ".z"))
    for name, var in dataset.variables.items():
        existing = stored.array(name) if stored is not None else None
        if existing is None:
            if region_arg is None:
                starts.append(f"{base}{name}/")  # added: nothing of it is there yet
            continue
        dims = _stored_dims(existing) or tuple(var.dims)
        if not dims:
            whole.append(f"{base}{name}/")  # a scalar (xarray refuses one in a region write)
            continue
        if region_arg is not None:
            touched = region().get(dims[0], slice(None)).indices(int(existing.shape[0]))[:2]
        elif append_dim is not None and append_dim in dims:
            old = int(existing.shape[dims.index(append_dim)])
            touched = (old, old + int(var.sizes[append_dim])) if dims[0] == append_dim else (0, int(existing.shape[0]))
        else:  # rewritten whole, by every writer alike: one listing of it, within the limit
            if _rows(existing, 0, int(existing.shape[0]), f"{base}{name}/") is not None:
                whole.append(f"{base}{name}/")
            continue
        rows = _rows(existing, *touched, f"{base}{name}/")
        if rows is None:
            log.debug("%s: %r: more than %d objects touched; its uploads are not guarded against a late copy",
                      store.root_url, name, GUARD_LISTING_LIMIT)
            continue
        starts += rows
        if region_arg is None and rows != [f"{base}{name}/"]:  # its shape changes: the metadata document too
            starts.append(f"{base}{name}/" + ("zarr.json" if existing.metadata.zarr_format == 3 else ".z"))
    return starts, whole


def _rows(existing: Any, start: int, stop: int, prefix: str) -> list[str] | None:
    """The key beginnings of the rows ``start // n`` to ``stop`` (rounded up) of ``existing``'s objects along its
    first axis (``n``: their extent there), each key prefixed by ``prefix``: one listing per row, or for more than
    :data:`_ROW_LISTINGS` rows ``prefix`` itself (the whole variable); None past :data:`GUARD_LISTING_LIMIT`."""
    from cloudio._zarr.shard_safety import write_grid

    grid, _ = write_grid(existing)
    shape = [max(int(extent), 1) for extent in existing.shape]
    first, last = start // grid[0], -(-max(stop, start + 1) // grid[0])
    per_row = int(np.prod([-(-extent // size) for extent, size in zip(shape[1:], grid[1:], strict=True)]))
    if last - first > _ROW_LISTINGS:
        rows = -(-max(shape[0], last * grid[0]) // grid[0])
        return [prefix] if rows * per_row <= GUARD_LISTING_LIMIT else None
    if (last - first) * per_row > GUARD_LISTING_LIMIT:
        return None
    ndim = len(shape)
    keys = (existing.metadata.encode_chunk_key((row,) + (0,) * (ndim - 1)) for row in range(first, last))
    # "c/5/0/0" -> "c/5/", "5.0" -> "5.", "c/5" -> "c/5": the separator is one character
    return [prefix + key[:len(key) - 2 * (ndim - 1) + 1] if ndim > 1 else prefix + key for key in keys]


def _stored_variables(store: JournaledStore, kwargs: Mapping[str, Any]) -> StoredVariables | None:
    """The variables stored in the group a write that keeps them (``mode`` ``"a"``, ``"a-"``, ``"r+"``) goes to;
    None when there is no group there yet. An array there raises zarr's ``ContainsArrayError``, which
    :func:`cloudio_errors` names as a refusal.

    Read as xarray reads them for the write itself, from the metadata documents (never a consolidated copy,
    which may be stale): a listing of the group and a GET of each member's document, at once.
    """
    from xarray.backends import ZarrStore

    try:
        zstore = ZarrStore.open_group(store.with_read_only(True), mode="r", group=kwargs.get("group"),
                                      consolidated=False, zarr_format=kwargs.get("zarr_format"))
    except FileNotFoundError:
        return None
    return StoredVariables(zstore)


#: dtype kinds whose casts :func:`_refuse_lossy_casts` judges (bool, integers, floats, complex): xarray passes these
#: to the stored dtype unchecked; strings, times and objects it refuses or encodes itself
_NUMERIC_KINDS = "biufc"


def _group(kwargs: Mapping[str, Any]) -> str:
    """The group ``to_zarr``'s or ``open_zarr``'s arguments name, as a path in the store ("": the root)."""
    return str(kwargs.get("group") or "").strip("/")


def _where(store: JournaledStore, group: str) -> str:
    """Where a write goes, as its refusals name it: the store's URL, and the group when there is one."""
    return f"{store.root_url} (group {group!r})" if group else store.root_url


def _refuse_lossy_casts(dataset: xarray.Dataset, stored: StoredVariables, where: str,
                        kwargs: Mapping[str, Any]) -> None:
    """Raise :class:`~cloudio.ConfigurationError` when a variable of ``dataset`` is stored with a dtype its values
    cannot be cast to without loss (numpy's ``same_kind`` rule: floats onto integers, integers onto booleans or
    unsigned integers...), before anything is written.

    Why: xarray writes an existing variable with the stored encoding and casts what it is given to the stored
    dtype, rounding ``0.5`` to ``0`` with at most a SerializationWarning; it compares dtypes only for strings.
    Judged against the dtype the variable reads back as: floats onto an integer variable with a ``_FillValue``
    or ``scale_factor`` are what its CF encoding is for.
    Casts within a kind (``int32`` onto ``int64``, ``float64`` onto ``float32``) are what the stored encoding
    asks for and go through, unless a value held in memory is out of the stored dtype's range (xarray wraps
    ``300`` to ``44`` in ``int8``, and makes ``1e300`` ``inf`` in ``float32``); values of a Dask array are not
    read for that.
    """
    append_dim = kwargs.get("append_dim")
    for name, var in dataset.variables.items():
        given = np.dtype(var.dtype)
        if given.kind not in _NUMERIC_KINDS:
            continue
        target = stored.dtype(name)
        if target is None or target.kind not in _NUMERIC_KINDS:
            continue
        doing = f"appending along {append_dim!r}" if append_dim is not None else "writing into it"
        if np.can_cast(given, target, casting="same_kind"):
            if (value := _out_of_range(var, target)) is not None:
                raise ConfigurationError(
                    f"{where}: variable {name!r} is stored as {target} and the dataset gives {given} holding "
                    f"{value!r}, which {target} cannot hold; {doing} would wrap or overflow it (xarray does so "
                    "without an error). Nothing was written. Clip the values to the stored dtype's range, or write "
                    f"it again whole with mode='w' to store {given}."
                )
            continue
        raise ConfigurationError(
            f"{where}: variable {name!r} is stored as {target} and the dataset gives {given}; {doing} would "
            f"cast {given} to {target} and lose values (xarray rounds or wraps them, with a warning at most). "
            "Nothing was written. "
            f"Cast it explicitly if that is meant (ds[{str(name)!r}] = ds[{str(name)!r}].astype({str(target)!r})), "
            f"or write it again whole with mode='w' to store {given}."
        )


def _out_of_range(var: xarray.Variable, target: np.dtype[Any]) -> Any:
    """A value of ``var`` (when in memory) that a cast to ``target`` of the same kind would wrap or overflow, or None.

    Why only in memory: a Dask array's values would be computed once for this and again for the write.
    """
    given = np.dtype(var.dtype)
    if np.can_cast(given, target, casting="safe") or not var._in_memory or var.size == 0 or given.kind == "c":
        return None
    values = np.asarray(var.values)
    if target.kind in "iu":
        held = np.iinfo(target)
        low, high = values.min().item(), values.max().item()
        return low if low < held.min else high if high > held.max else None
    if target.kind == "f" and given.kind == "f":
        finite = values[np.isfinite(values)]
        if finite.size and (top := np.abs(finite).max().item()) > float(np.finfo(target).max):
            return top
    return None


def _refuse_before_writing(dataset: xarray.Dataset, store: JournaledStore, kwargs: Mapping[str, Any], mode: str,
                           stored: StoredVariables | None) -> None:
    """Raise :class:`~cloudio.ConfigurationError` for input xarray or zarr would refuse only once the write had
    begun (the group created, a document rewritten, the group's path emptied), leaving the store marked
    incomplete: an append along a dimension of nothing stored, a group below an array, an encoding xarray does
    not take; or would write with values lost (:func:`_refuse_lossy_casts`). Why here: xarray checks each as it
    comes to it, after zarr changed the store."""
    group = _group(kwargs)
    where = _where(store, group)
    if stored is not None:
        _refuse_lossy_casts(dataset, stored, where, kwargs)
    if kwargs.get("append_dim") is not None and stored is None:
        if is_gcs(store.root_url):  # no bucket is said as such
            from cloudio._gcs.transfer import ensure_bucket

            ensure_bucket(parse_gcs(store.root_url))
        raise ConfigurationError(
            f"{where}: append_dim={kwargs['append_dim']!r}, but no dataset is stored there to append to. Nothing "
            "was written. Check the URL and group, or write the first part with mode='w-'.")
    if mode in ("w", "w-") and "/" in group:
        parents = group.split("/")[:-1]
        for parent in ("/".join(parents[:depth]) for depth in range(1, len(parents) + 1)):
            doc, _ = run_sync(store.get_generation(f"{parent}/zarr.json"))
            if _is_array_document(doc) or (doc is None and run_sync(store.exists(f"{parent}/.zarray"))):
                raise ConfigurationError(
                    f"{where}: {parent!r} is an array of the store, so no group can be written below it. "
                    "Nothing was written. Choose another group.")
    encoding = kwargs.get("encoding") or {}
    if encoding:
        from zarr import config

        asked = kwargs.get("zarr_format") or (stored.zarr_format if stored is not None else
                                              config.get("default_zarr_format"))
        fmt: Literal[2, 3] = 2 if asked == 2 else 3
        for name, given in encoding.items():
            if name not in dataset.variables:
                raise ConfigurationError(f"{where}: the encoding names {name!r}, which is no variable of the dataset "
                                         f"(it has {sorted(map(str, dataset.variables))}). Nothing was written. Fix "
                                         "the encoding and write again.")
            if not isinstance(given, Mapping):
                continue  # (xarray says so before it writes)
            refused = _encoding_refused(dataset.variables[name], str(name), given, fmt)
            if refused is not None:
                raise ConfigurationError(f"{where}: the encoding of {name!r} is refused ({refused}). Nothing was "
                                         "written. Fix the encoding and write again.") from refused


def _encoding_refused(variable: xarray.Variable, name: str, encoding: Mapping[str, Any],
                      zarr_format: Literal[2, 3]) -> ValueError | None:
    """xarray's refusal of ``encoding`` for ``variable`` (a key the Zarr backend does not take), as its write would
    raise it, or None. Asked of one element of the variable (zeros for a Dask-backed one: nothing is computed),
    through xarray's own steps: its Zarr encoding of the variable takes its keys (``_FillValue``, ``units``,
    ``dtype``...), then the backend's check of what is left. A failure of the first step is left to the write
    itself."""
    import xarray as xr
    from xarray.backends.zarr import encode_zarr_variable, extract_zarr_variable_encoding

    one = (1,) * variable.ndim
    if variable.chunks is not None or 0 in variable.shape:  # (never .data: a lazily opened variable would load)
        sample = np.zeros(one, variable.dtype) if variable.dtype.kind in "biufcmM" else np.full(one, "", variable.dtype)
    else:
        sample = variable[(slice(0, 1),) * variable.ndim].values
    stand_in = xr.Variable(variable.dims, sample, attrs=dict(variable.attrs), encoding=dict(encoding))
    try:
        encoded = encode_zarr_variable(stand_in, name=name, zarr_format=zarr_format)
    except Exception:  # (xarray says it when it writes)
        log.debug("%s: the encoding of a sample failed; left to the write", name, exc_info=True)
        return None
    if "_FillValue" in encoded.encoding:  # as xarray's ZarrStore.set_variables: None is "no fill value"
        if encoded.encoding["_FillValue"] is not None:
            return ValueError("Zarr does not support _FillValue in encoding.")
        del encoded.encoding["_FillValue"]
    try:
        extract_zarr_variable_encoding(encoded, raise_on_invalid=True, name=name, zarr_format=zarr_format)
    except ValueError as e:
        return e
    return None


#: the arguments of ``to_zarr`` that :func:`_rehearse` passes on to its write in memory (the rest are about the store
#: or the Dask graph)
_REHEARSED = ("group", "encoding", "zarr_format", "write_empty_chunks")


def _rehearse(dataset: xarray.Dataset, where: str, mode: str, kwargs: Mapping[str, Any]) -> None:
    """Raise :class:`~cloudio.ConfigurationError` when xarray or zarr refuses to write ``dataset`` with these
    arguments, found by writing a sample of it (the first element along each dimension; zeros in place of what
    is not in memory: nothing is computed or read) to a Zarr store in memory first.

    Why: xarray checks the attributes, the CF encoding of each variable (``units``, ``calendar``,
    ``_FillValue``, ``dtype``, ``scale_factor``) and zarr the array arguments (``compressors``, ``chunks``,
    ``shards``, ``write_empty_chunks``) only after it opened the group, and ``mode="w"`` opens it by deleting
    what the group held: a typo in an encoding deleted the dataset stored there and left the store marked
    incomplete (with ``mode="w-"``, a new store half made and marked). What fails only on other values than the
    sample (an object variable of mixed types further on) still fails in the write itself.
    """
    import warnings

    from zarr.storage import MemoryStore

    # (copied: isel keeps a variable without those dimensions, a scalar, as the dataset's own object)
    sample = dataset.isel({dim: slice(0, 1) for dim in dataset.dims}).copy(deep=False)
    for var in sample.variables.values():
        if not var._in_memory:  # Dask or lazily read: a stand-in of its dtype
            kind = var.dtype.kind
            var.data = (np.zeros(var.shape, var.dtype) if kind in "biufcmM" else
                        np.full(var.shape, "", var.dtype))
    options = {k: kwargs[k] for k in _REHEARSED if k in kwargs}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sample.to_zarr(MemoryStore(), mode="w", consolidated=False, **options)
    except MemoryError as e:  # (a chunk far larger than memory: zarr allocates it whole) not a refusal
        e.add_note(f"{where}: this process ran out of memory writing a one-element sample of the dataset in memory, "
                   "before anything was stored: nothing was written, the store is as it was. Chunks (or shards) "
                   "far larger than memory do this: give smaller ones in the encoding and write again.")
        raise
    except Exception as e:  # made in memory: what xarray or zarr raised is about the input, said with its next step
        if isinstance(e, RuntimeError) and not isinstance(e, RecursionError) and shutting_down():
            # zarr's codecs run in the loop's default executor, which refuses new work at shutdown: not the input's
            raise LoopNotRunningError(
                f"{where}: cloudio.to_zarr was called as the interpreter shuts down, where zarr can no longer run "
                f"its work in threads ({type(e).__name__}: {e}); nothing was written. Write before the "
                "interpreter shuts down (at the end of the program, not from an atexit handler).") from e
        raise ConfigurationError(
            f"{where}: to_zarr(mode={mode!r}) refuses its input ({type(e).__name__}: {e}); nothing was written. "
            + _next_step(e)) from e


def _next_step(e: Exception) -> str:
    """What to do about ``e``, raised writing the sample in memory (only when it failed: no cost otherwise)."""
    import numcodecs.errors
    import zarr.errors

    unknown_codec = tuple(t for t in (getattr(numcodecs.errors, "UnknownCodecError", None),
                                      getattr(zarr.errors, "UnknownCodecError", None)) if t is not None)
    if isinstance(e, RecursionError):  # json.dumps of attributes (or an encoding) of lists in lists in lists...
        return ("A value is nested too deeply to be stored as JSON (an attribute of the dataset or of a variable, "
                "most likely): flatten it (or store it as a string) and write again.")
    if isinstance(e, (ImportError, *unknown_codec)):  # an optional library of numcodecs' (zfpy, pcodec...)
        return ("A codec the encoding names is not available in this environment (its library is not "
                "installed): install it (the package named above where it is named: numcodecs[zfpy], pcodec...), "
                "or choose another codec, and write again.")
    return "Fix the arguments (the encoding, the attributes, zarr_format...) and write again."


def _is_array_document(doc: bytes | None) -> bool:
    """A Zarr v3 ``zarr.json`` of an array."""
    import json

    try:
        return doc is not None and json.loads(doc).get("node_type") == "array"
    except ValueError:
        return False


def _align_dataset(dataset: xarray.Dataset, store: JournaledStore, kwargs: Mapping[str, Any],
                   rechunk: bool, stored: StoredVariables | None,
                   region: Callable[[], dict[Hashable, slice]]) -> xarray.Dataset:
    """Rechunk every Dask-backed variable so no two tasks write one shard; see :mod:`cloudio._zarr.shard_safety`.

    ``stored``: the store's existing variables (:func:`_stored_variables`; None when the write replaces them);
    ``region()``: the write's region, resolved (:func:`_resolve_region`).
    """
    dask_vars = {name: var for name, var in dataset.variables.items() if _is_dask(var.data)}
    if not dask_vars:
        return dataset
    append_dim = kwargs.get("append_dim")
    encoding = kwargs.get("encoding") or {}

    replaced: dict[Hashable, Any] = {}
    for name, var in dask_vars.items():
        existing = stored.array(name) if stored is not None else None
        offsets = [0] * var.ndim
        if existing is not None:
            from cloudio._zarr.shard_safety import write_grid

            grid, sharded = write_grid(existing)
            stored_dims = _stored_dims(existing)
            if stored_dims is not None and stored_dims != tuple(var.dims) and set(stored_dims) == set(var.dims):
                var = var.transpose(*stored_dims)  # xarray writes it in the stored order
                replaced[name] = var
            for i, dim in enumerate(var.dims):
                if append_dim is not None and dim == append_dim:
                    offsets[i] = int(existing.shape[i])
                elif dim in region():
                    offsets[i] = int(region()[dim].indices(int(existing.shape[i]))[0])
        else:
            enc = dict(encoding[name]) if name in encoding else dict(var.encoding)  # xarray replaces, not merges
            found = _grid_from_encoding(enc, var.ndim)
            if found is None:
                if any(isinstance(enc.get(k), str | dict) for k in ("chunks", "shards")):
                    log.warning("%s: %r: cannot check Dask chunks against zarr's automatic grid %r",
                                store.root_url, name, enc.get("shards", enc.get("chunks")))
                    continue
                # No grid requested: xarray takes the Dask chunks as Zarr chunks, which must be
                # regular. Ragged chunks get the largest chunk as their grid.
                dask_chunks = cast("tuple[tuple[int, ...], ...]", var.chunks)  # Dask-backed: never None
                grid = tuple(max(c) if c else 1 for c in dask_chunks)
                sharded = False
            else:
                grid, sharded = found
        new = align(var.data, grid, offsets=offsets, name=str(name), url=store.root_url, sharded=sharded,
                    rechunk=rechunk)
        if new is not var.data:
            # xarray's protocol for duck arrays names an __array_ufunc__ argument differently from dask's
            replaced[name] = var.copy(deep=False, data=new)  # type: ignore[arg-type]
    if not replaced:
        return dataset
    out = dataset.copy(deep=False)
    coords = {k: v for k, v in replaced.items() if k in dataset.coords}
    data = {k: v for k, v in replaced.items() if k not in dataset.coords}
    if coords:
        out = out.assign_coords(coords)
    if data:
        out = out.assign(data)
    for name, var in replaced.items():  # assign() keeps data but may drop encoding
        out[name].encoding = dict(var.encoding)
        if "preferred_chunks" in out[name].encoding:
            del out[name].encoding["preferred_chunks"]
    return out


def to_zarr(dataset: xarray.Dataset, url: str | os.PathLike[str] | JournaledStore, *,
            rechunk: bool = True, **kwargs: Any) -> Any:
    """Write ``dataset`` to Zarr at ``url`` with every write journaled and shard-safe Dask chunks.

    Parameters
    ----------
    dataset
        The dataset to write; NumPy- or Dask-backed.
    url
        ``gs://bucket/store.zarr``, ``/vsigs/...``, a local path, or a
        :func:`cloudio.zarr_store`.
    rechunk
        True (default): Dask chunks that would make several tasks write one
        shard (or unsharded chunk) are rechunked onto shard boundaries, also
        with ``safe_chunks=False``. False: raise
        :class:`~cloudio.UnsafeChunkingError` instead.
    **kwargs
        Passed to :meth:`xarray.Dataset.to_zarr`: ``mode``, ``append_dim``,
        ``region``, ``encoding`` (``chunks``, ``shards``, ``compressors``...),
        ``zarr_format``, ``consolidated``, ``compute``, ``group``,
        ``safe_chunks``, ``storage_options`` (gcsfs options)...

    Returns
    -------
    Any
        Whatever :meth:`xarray.Dataset.to_zarr` returns (a ``Delayed`` with ``compute=False``).

    Raises
    ------
    UnsafeChunkingError
        With ``rechunk=False``, when Dask chunks split a shard; nothing is written then.
    ConfigurationError
        When a variable already stored (an append, a region write) would be cast to its stored dtype with loss
        of values (floats onto integers: numpy's ``same_kind`` rule); nothing is written then.
    BucketNotFoundError
        When the bucket does not exist.
    TransientError
        When the server or network kept failing past the retries. The store
        stays marked as an incomplete write (:func:`open_zarr` raises
        :class:`~cloudio.IncompleteWriteError`) until it is written again
        whole (``mode="w"``): an append or region write that succeeds later
        takes off only its own mark (a region write, also the marks of
        templates: docs/consistency.md).

    Notes
    -----
    ``<store>/.cloudio-write-in-progress`` is written before the first object
    and removed after the last (with ``compute=False``, by a last task of the
    returned graph, or, unless this is a region write, by a region write that
    succeeds while the graph has not started: xarray's template pattern),
    whatever the mode; see docs/consistency.md.
    """
    current_level()  # an unusable CLOUDIO_CONSISTENCY is named before anything is written
    storage_options = kwargs.pop("storage_options", None)
    store = _store(url, False, storage_options)
    if kwargs.get("zarr_format") not in (None, 2, 3):  # xarray checks it only after zarr emptied the store (mode="w")
        raise ConfigurationError(f"{store.root_url}: zarr_format={kwargs['zarr_format']!r} is no Zarr format; pass "
                                 "3 or 2 (or leave it out). Nothing was written.")
    if kwargs.get("safe_chunks") is False and rechunk is False:
        log.debug("%s: safe_chunks=False with rechunk=False: misaligned chunks raise", store.root_url)
    mode = kwargs.get("mode") or ("a" if kwargs.get("append_dim") is not None else
                                  "r+" if kwargs.get("region") is not None else "w-")
    if kwargs.get("append_dim") is not None and mode not in ("a", "a-"):  # (else said as "nothing to append to")
        raise ConfigurationError(f"{store.root_url}: append_dim={kwargs['append_dim']!r} is given with mode={mode!r}, "
                                 "which does not append; nothing was written. Pass mode='a' (or no mode) to append, "
                                 "or leave append_dim out.")
    # appends race with other writers on the consolidated copy: it is rewritten here, guarded
    # (with compute=False xarray writes every document before it returns: consolidated right after, too)
    guarded = mode in ("a", "a-") and kwargs.get("consolidated") is not False and is_gcs(store.root_url)
    if guarded:
        kwargs["consolidated"] = False
    log.debug("to_zarr %s (%s)", store.root_url, {k: v for k, v in kwargs.items() if k != "encoding"})
    with cloudio_errors(store, writing=True, mode=mode, group=kwargs.get("group") or "") as failed:
        if mode == "r+":  # the only write mode in which xarray reads consolidated metadata: as open_zarr reads
            check = revalidate(store)  # at the strong and bounded levels, a listing: the documents, not the copy
            if check is None:
                _avoid_stale_consolidated(store, kwargs)
            else:
                _documents_after_a_listing(store, check, kwargs)
        # a write that keeps what is stored reads it first (its errors are cloudio's): casts that would lose
        # values are refused before anything is written, and Dask chunks are aligned on the stored grid
        try:
            stored = _stored_variables(store, kwargs) if mode not in ("w", "w-") else None
            _refuse_before_writing(dataset, store, kwargs, mode, stored)
        except (KeyError, TypeError) as e:
            if (refusal := _lacks_dimension_names(e)) is not None:
                raise ConfigurationError(_no_dimension_names(_where(store, _group(kwargs)))
                                         + " Nothing was written.") from refusal
            raise
        # "auto" regions found once, from the store's indexes, if a step needs them
        region = functools.cache(functools.partial(_resolve_region, dataset, store, kwargs.get("region"),
                                                   kwargs.get("group")))
        if mode in ("w", "w-"):  # written in memory first: xarray refuses some input only once zarr emptied the group
            _rehearse(dataset, _where(store, _group(kwargs)), mode, kwargs)
        elif mode in ("a", "a-") and kwargs.get("region") is None:  # the variables it adds: made after others
            added = [name for name in dataset.variables if stored is None or stored.array(name) is None]
            if added:
                encoding = {k: v for k, v in (kwargs.get("encoding") or {}).items() if k in added}
                _rehearse(dataset[added], _where(store, _group(kwargs)), mode, {**kwargs, "encoding": encoding})
        aligned = _align_dataset(dataset, store, kwargs, rechunk, stored, region)
        # a write to a group replaces (mode="w") or changes that group only: its mark says which
        group = _group(kwargs)
        if mode in ("w", "w-"):  # zarr deletes (or refuses) whatever is under the group, Zarr's or not
            refuse_replacing_others(store, group)
        operation = f"to_zarr mode={mode!r}" + (f" group={group!r}" if group else "")
        # with compute=False the chunks go up when the graph is computed, if ever (xarray's template: region
        # writes fill the store instead, and take the mark off as they commit)
        later = kwargs.get("compute", True) is False
        fills = kwargs.get("region") is not None
        # "w-" writes only where zarr finds no node, and deletes nothing a failed write left without its metadata
        mark = WriteMark(store, operation, replaces=mode == "w", group=group, fills=fills)
        changes: _Changes | None = None
        try:
            mark.begin()
            # through a store with generations of this write's own; a graph computed later keeps them
            target = store.with_own_expectations()
            # zarr's (or Dask's) other chunk writes end before the failure
            with stopped_on_failure() as changes, target.expecting(kept=later) as expect:
                if mode == "w":  # zarr deletes the group's objects first: every upload then needs no object there
                    expect(key_prefix(group), {})
                    if store.late_copies_may_land(key_prefix(group)) and not _says_write_empty_chunks(aligned,
                                                                                                     kwargs):
                        kwargs = {**kwargs, "write_empty_chunks": True}  # where no chunk is left, one could land
                elif mode != "w-" and store.on_gcs:  # each upload needs the generation it rewrites
                    starts, whole = _rewritten_starts(aligned, store, kwargs, mode, stored, region)
                    for start, generations in run_sync(target.generations_from([*starts, *whole])).items():
                        expect(start, generations, whole=start in whole)
                # Dask tasks computed now write through the store wherever they run: on a cluster's workers, it
                # names the write (those of compute=False run later, when no failure of this call can stop them)
                now = not later and any(_is_dask(var.data) for var in aligned.variables.values())
                if later:
                    aligned = _after_the_mark(aligned, mark)
                out = aligned.to_zarr(changes.carried(target) if now else target, **kwargs)
                if guarded:
                    consolidate_guarded(store, kwargs.get("zarr_format"))
        except BaseException as e:
            unheard = changes is not None and changes.unheard()  # chunks stored by processes not heard here
            changed = unheard or mark.changed()
            failed.marked = mark.fail(unheard)
            # the user's own graph (a chunk's task) failed, not its input: cloudio_errors raises it as it is
            computing = raised_computing(e)
            if changed and not computing and isinstance(e, ValueError | KeyError | TypeError) and not isinstance(
                    e, (CloudioError, *STORED_ALREADY)):  # (a node already there: cloudio_errors names it)
                # xarray checks a variable's encoding as it comes to it: zarr had already written, or deleted
                raise ConfigurationError(
                    f"{store.root_url}: to_zarr(mode={mode!r}) refused its input ({type(e).__name__}: {e}) after "
                    "zarr had started changing the store: "
                    + ("what it held before is deleted, " if mode == "w" else "")
                    + "the store is marked as an incomplete write (open_zarr refuses it) until a write succeeds. "
                    + ("Fix the arguments and write again with mode='w' (it replaces what this write left)."
                       if mode in ("w", "w-") else "Fix the arguments and write again.")
                ) from e
            if not changed and not computing and isinstance(e, KeyError | TypeError) and _raised_by_xarray(e):
                # xarray refused the input before anything was written (region="auto" with coordinates not
                # stored); a ValueError there is named by cloudio_errors; the user's own graph raises as it does
                raise ConfigurationError(
                    f"{store.root_url}: to_zarr(mode={mode!r}) refused its input ({type(e).__name__}: {e}); "
                    "nothing was written. Fix the arguments and write again.") from e
            raise
        if later:
            # the graph writes the chunks later, wherever it runs, after a task that marks the store again (a
            # region write may have taken a template's deferred mark off); its last task takes the mark off. A
            # region write's own graph is no template: its mark stays up until that graph ran
            from dask.delayed import delayed

            if not fills:
                mark.handed_to_graph()
            return delayed(_commit, pure=False)(out, mark)
        mark.commit()
    return out


def _raised_by_xarray(e: BaseException) -> bool:
    """Whether ``e`` was raised in xarray's own code (its innermost frame), not in a Dask task's function or
    in cloudio's."""
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and str(tb.tb_frame.f_globals.get("__name__", "")).startswith("xarray.")


def _says_write_empty_chunks(dataset: xarray.Dataset, kwargs: dict[str, Any]) -> bool:
    """Whether the call or a variable's encoding sets ``write_empty_chunks`` (xarray refuses a parameter that
    differs from an encoding)."""
    encoding = kwargs.get("encoding") or {}
    return "write_empty_chunks" in kwargs or any(
        "write_empty_chunks" in (encoding.get(name) or {}) or "write_empty_chunks" in var.encoding
        for name, var in dataset.variables.items())


#: rounds of guarded consolidation before the ConflictError is raised (each one lost to another writer's)
_CONSOLIDATE_ATTEMPTS = 20


def consolidate_guarded(store: JournaledStore, zarr_format: int | None = None) -> None:
    """``zarr.consolidate_metadata`` of the store's root as a read-modify-write guarded by generation.

    Why: the consolidated copy is rewritten whole from a listing of the
    members; two writers appending different variables at once can each
    list before the other's variable exists, and the later write then drops
    the other's variable from it (plain xarray does). Here the copy's
    generation is read before the listing and required by its write; a
    writer that lost the race lists again and retries. The listing always
    comes from the server (a retry once reused the listing its first attempt
    had cached, which missed the winner's variable). One request more than
    xarray's own consolidation.
    """
    import zarr

    from cloudio._session import reading_the_server
    from cloudio.errors import ConflictError

    last: ConflictError | None = None
    fmt: Literal[2, 3]
    for _ in range(_CONSOLIDATE_ATTEMPTS):
        key, fmt = "zarr.json", 3
        data, generation = (None, 0) if zarr_format == 2 else run_sync(store.get_generation(key))
        if data is None:
            key, fmt = ".zmetadata", 2
            _, generation = run_sync(store.get_generation(key))
        try:
            with store.guarding(key, generation), reading_the_server():
                zarr.consolidate_metadata(store, zarr_format=fmt)
            return
        except ConflictError as e:
            log.info("%s: another writer consolidated meanwhile; listing the members again", store.root_url)
            last = e
    assert last is not None
    raise last


def _after_the_mark(dataset: xarray.Dataset, mark: WriteMark) -> xarray.Dataset:
    """``dataset`` whose Dask variables' chunks are computed after :meth:`WriteMark.computing` ran: once per
    computation of the graph, before any of its chunks goes up, on whichever worker they are computed."""
    import dask.array as da
    from dask.delayed import delayed

    up = delayed(mark.computing, pure=False)()
    out = dataset.copy(deep=False)  # new variable objects, the same data
    for var in out.variables.values():
        if _is_dask(var.data):
            var.data = da.map_blocks(_after, var.data, up, dtype=var.dtype, meta=var.data._meta)
    return out


def _after(block: Any, _up: None) -> Any:
    return block


def _commit(result: Any, mark: WriteMark) -> Any:
    """Remove the marker once the delayed write of ``to_zarr(..., compute=False)`` has run."""
    mark.commit()
    return result


def open_zarr(url: str | os.PathLike[str] | JournaledStore, **kwargs: Any) -> xarray.Dataset:
    """Open the Zarr store at ``url`` with Xarray, seeing every write made in this process.

    Parameters
    ----------
    url
        ``gs://bucket/store.zarr``, ``/vsigs/...``, a local path, or a
        :func:`cloudio.zarr_store`.
    **kwargs
        Passed to :func:`xarray.open_zarr` (``group``, ``chunks``,
        ``consolidated``, ``zarr_format``, ``decode_times``...).
        ``storage_options`` are gcsfs options.

    Returns
    -------
    xarray.Dataset
        Lazily loaded. ``.encoding`` of each variable holds ``chunks`` and, for
        sharded Zarr v3 arrays, ``shards``.

    Raises
    ------
    ObjectNotFoundError
        No Zarr store at ``url``, or no ``group`` in it (:class:`~cloudio.BucketNotFoundError`: no such
        bucket).
    ConfigurationError
        ``url`` is a single object (a GeoTIFF), not a store; or a store of the other Zarr format than the
        ``zarr_format`` asked (the message says which to pass).
    IncompleteWriteError
        A write to ``url`` started and never committed.
    IntegrityError
        A metadata document is not valid JSON.

    Notes
    -----
    When this process changed the store's metadata after its consolidated
    copy was written, the consolidated copy is ignored (also when
    ``consolidated=True`` was asked for) and the metadata documents are read.
    One more request than ``xarray.open_zarr``: the GET of the write marker.

    At the ``"strong"`` level (and past a bound of ``N`` seconds) one listing
    of the store's metadata documents replaces that GET: a consolidated copy
    older than any document it summarises, whoever wrote it, is not trusted,
    and group membership and sizes come from the server (see
    docs/consistency.md).
    """
    import xarray as xr

    storage_options = kwargs.pop("storage_options", None)
    store = _store(url, True, storage_options)
    group = _group(kwargs)  # a write to url/group marks that store, not this one
    # a node of the other Zarr format than the one asked is named as such, not as missing
    with cloudio_errors(store, writing=False, group=group, zarr_format=kwargs.get("zarr_format")):
        check = revalidate(store)
        if check is None:  # the session level (or a bound the last listing is within)
            check_complete(store, group=group)
            _avoid_stale_consolidated(store, kwargs)
        else:
            check_complete(store, own=check.marked, group=group)  # raises, saying who left a marker
            _documents_after_a_listing(store, check, kwargs)
        try:
            ds: xarray.Dataset = xr.open_zarr(store, **kwargs)
        except (KeyError, TypeError) as e:
            if (refusal := _lacks_dimension_names(e)) is not None:
                raise ConfigurationError(_no_dimension_names(_where(store, group))) from refusal
            raise
        _fill_shards(ds, store, kwargs.get("group"))
    return ds


def _lacks_dimension_names(e: BaseException) -> KeyError | None:
    """xarray's refusal of a Zarr array without dimension names, if ``e`` is one: a ``KeyError`` (format 3), or,
    format 2, the ``TypeError`` its NCZarr fallback then raises on a zarr 3 store, that ``KeyError`` its context."""
    seen: BaseException | None = e
    for _ in range(4):
        if seen is None:
            break
        if isinstance(seen, KeyError) and ("_ARRAY_DIMENSIONS" in str(seen) or "`dimension_names`" in str(seen)):
            return seen
        seen = seen.__context__
    return None


def _no_dimension_names(where: str) -> str:
    return (f"{where}: an array of this group has no dimension names (Zarr format 3's dimension_names, or "
            "format 2's _ARRAY_DIMENSIONS attribute), which xarray needs to make it a variable: it was not "
            "written by xarray. Read it with cloudio.load_array(url + '/<name>'), or write it again with "
            "cloudio.save_array(..., dimension_names=[...]) (format 3) or cloudio.to_zarr.")


def _avoid_stale_consolidated(store: JournaledStore, kwargs: dict[str, Any]) -> None:
    """Set ``consolidated=False`` in ``kwargs`` when this process made the consolidated copy stale.

    Also when no consolidated copy was ever written after this process wrote
    metadata there: xarray would otherwise look for one first (a wasted
    request, and a warning when it is missing). And when another writer's
    change there was announced and no listing could check the copy since (a
    local store, a ``to_zarr`` region write): the documents are what changed.
    """
    roots = _consolidated_roots(store, kwargs.get("group"))
    root = roots[-1]
    consolidated = kwargs.get("consolidated")
    if consolidated is not False and any((written_here(r) and consolidated_is_stale(r)) or announcements.pending(r)
                                         for r in roots):
        if consolidated:
            log.info("%s: consolidated metadata is older than writes made here or announced; reading metadata "
                     "documents", root)
        kwargs["consolidated"] = False


def _documents_after_a_listing(store: JournaledStore, check: MetadataCheck,
                                           kwargs: dict[str, Any]) -> None:
    """After a listing of the server (the strong and bounded levels), read the members' own documents, never
    the consolidated copy.

    Why: the copy is a summary written by whoever last consolidated, and its
    age says nothing of its content. zarr rewrites it with whatever summary it
    loaded when it changes the group's attributes (newer than every document,
    older than their content), and a member deleted by another writer stays
    listed in it: both read back old shapes or missing variables. Membership
    then comes from the listing and shapes from the documents (a request per
    member). Whether the copy is older than a document is still noted for the
    session level (:func:`consolidated_seen`). The Zarr format the listing
    shows is passed on, which spares xarray its probes for the other format's
    documents.
    """
    roots = _consolidated_roots(store, kwargs.get("group"))
    root = roots[-1]
    zarr_format = check.zarr_format(root)
    if zarr_format is not None:
        kwargs.setdefault("zarr_format", zarr_format)
    stale = {r: check.consolidated_is_stale(r) for r in roots}
    for r, old in stale.items():
        # after an announcement an out-of-date copy stays distrusted at the session level, as after this
        # process's own writes; a current one is trusted again (a bound's own finding is kept no longer)
        if check.announced or not old:
            consolidated_seen(r, old)
    if kwargs.get("consolidated") is not False:
        log.debug("%s: listed from the server; reading the metadata documents, not the consolidated copy", root)
        kwargs["consolidated"] = False


def _consolidated_roots(store: JournaledStore, group: Any) -> list[str]:
    """The groups whose consolidated copy xarray may read for ``group`` of ``store``: the store's root (xarray
    opens the root's copy and takes the group from it) and the group itself, last."""
    path = str(group).strip("/") if group else ""
    return [store.root_url, f"{store.root_url}/{path}"] if path else [store.root_url]


def _fill_shards(ds: xarray.Dataset, store: JournaledStore, group: str | None) -> None:
    """Put ``shards`` into ``.encoding`` where this xarray version does not (older than 2025.10)."""
    missing = [name for name, var in ds.variables.items() if "shards" not in var.encoding and var.ndim]
    if not missing:
        return
    for name in missing:
        arr = _open_existing(store, group, name)
        if arr is not None:
            ds.variables[name].encoding["shards"] = getattr(arr, "shards", None)

