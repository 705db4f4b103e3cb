"""Xarray datasets and data arrays as Flyte task inputs and outputs (the ``flyte`` extra).

``import cloudio.flyte`` registers :class:`DatasetTransformer` and
:class:`DataArrayTransformer` with flytekit's ``TypeEngine`` for
``xarray.Dataset`` and ``xarray.DataArray``. A task output is written under
Flyte's raw output prefix (``gs://...`` or a local directory) with
:func:`cloudio.to_zarr`: Zarr v3, chunks and shards from each variable's
``.encoding`` (else its Dask chunks), Dask-backed data computed by the
scheduler already in force (a ``distributed.Client`` the task made, or
Dask's default) and never a new cluster. A task input is opened with
:func:`cloudio.open_zarr`, lazily, one Dask chunk per stored shard (per
chunk when unsharded), so a task reads only what it computes on.

Every output goes to a fresh directory and the literal names it, so a later
overwrite of some other store never changes what a consumer reads; writes
are journaled, so a consumer in the same process (a local execution) never
gets stale listings or metadata.

The literal type is the one of ``flytekitplugins-xarray-zarr`` (a multipart
``binary`` blob): tasks typed with either transformer connect, and each
reads the other's stores. When that plugin is installed, ``import flytekit``
registers its transformers first and ``import cloudio.flyte`` replaces them
(logged at INFO). To use the plugin's for one value, annotate it
(``Annotated[xr.Dataset, XarrayZarrTypeTransformer()]``); to put the
previous transformers back for the whole process, call :func:`unregister`.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Hashable
from typing import Any

import xarray as xr
from flytekit import FlyteContext
from flytekit.core.type_engine import TypeEngine, TypeTransformer
from flytekit.models.core.types import BlobType
from flytekit.models.literals import Blob, BlobMetadata, Literal, Scalar
from flytekit.models.types import LiteralType

from cloudio._zarr.xarray import open_zarr, to_zarr
from cloudio.errors import ConfigurationError

log = logging.getLogger(__name__)

__all__ = ["DataArrayTransformer", "DatasetTransformer", "register", "unregister"]

#: The variable name of a DataArray stored without one; xarray's own placeholder, restored to None on read.
UNNAMED = "__xarray_dataarray_variable__"
#: the dataset attribute holding the name of a DataArray stored under :data:`UNNAMED` (xarray's own)
NAME_ATTR = "__xarray_dataarray_name__"

_BLOB = BlobType(format="binary", dimensionality=BlobType.BlobDimensionality.MULTIPART)
_STORE_NAME = "data.zarr"


def _write(ctx: FlyteContext, ds: xr.Dataset) -> Literal:
    """Write ``ds`` to a fresh store under the raw output prefix; the literal names that store."""
    url = ctx.file_access.get_random_remote_path(_STORE_NAME)
    with warnings.catch_warnings():
        # Consolidated on purpose: a reader opens the store with one GET instead of a listing
        # and a GET per variable; zarr warns that v3 does not specify it yet.
        warnings.filterwarnings("ignore", "Consolidated metadata is currently not part", UserWarning)
        to_zarr(ds, url, mode="w", zarr_format=3, consolidated=True)
    log.debug("wrote %s variables to %s", len(ds.variables), url)
    return Literal(scalar=Scalar(blob=Blob(uri=url, metadata=BlobMetadata(type=_BLOB))))


def _rank(grid: Any) -> int | None:
    """Dimensions of a ``chunks``/``shards`` encoding; None for "auto", a dict or nothing."""
    return len(grid) if isinstance(grid, tuple | list) else None


def _read(lv: Literal) -> xr.Dataset:
    """The store a literal names, opened lazily with one Dask chunk per stored shard (or chunk)."""
    blob = lv.scalar.blob if lv.scalar is not None else None
    if blob is None or not blob.uri:
        raise ConfigurationError(f"Flyte literal {lv} is not a Zarr blob; was it written by an xarray transformer?")
    ds = open_zarr(blob.uri, chunks=None)  # lazy, no Dask yet: the grid comes per variable below
    return _chunk_like_store(ds)


def _chunk_like_store(ds: xr.Dataset) -> xr.Dataset:
    """Dask-chunk each variable by its stored shards (chunks when unsharded): one object read per task.

    ``xarray.open_zarr(chunks={})`` would use the inner chunks of a sharded
    array, one small ranged read per task; variables may differ in grid, so
    this goes variable by variable.
    """
    def chunked(name: Hashable) -> xr.Variable:
        var = ds.variables[name]
        if name in ds.indexes or not var.ndim:
            return var  # index coordinates are in memory already; a scalar is one read
        grid: tuple[Any, ...] = var.encoding.get("shards") or var.encoding.get("chunks") or ()
        if _rank(grid) != var.ndim:
            grid = var.shape
        return var.chunk(dict(zip(var.dims, grid, strict=True)))  # keeps .encoding

    out = xr.Dataset({k: chunked(k) for k in ds.data_vars}, coords={k: chunked(k) for k in ds.coords},
                     attrs=ds.attrs)
    out.encoding = dict(ds.encoding)
    return out


class DatasetTransformer(TypeTransformer[xr.Dataset]):  # type: ignore[misc]  # flytekit is untyped
    """``xarray.Dataset`` <-> a Zarr v3 store under Flyte's raw output prefix, through cloudio."""

    def __init__(self) -> None:
        super().__init__(name="cloudio xarray Dataset (Zarr)", t=xr.Dataset)

    def get_literal_type(self, t: type[xr.Dataset]) -> LiteralType:
        return LiteralType(blob=_BLOB)

    def to_literal(self, ctx: FlyteContext, python_val: xr.Dataset, python_type: type[xr.Dataset],
                   expected: LiteralType) -> Literal:
        return _write(ctx, python_val)

    def to_python_value(self, ctx: FlyteContext, lv: Literal, expected_python_type: type[xr.Dataset]) -> xr.Dataset:
        return _read(lv)

    def to_html(self, ctx: FlyteContext, python_val: xr.Dataset, expected_python_type: type[xr.Dataset]) -> str:
        return str(python_val._repr_html_())


class DataArrayTransformer(TypeTransformer[xr.DataArray]):  # type: ignore[misc]  # flytekit is untyped
    """``xarray.DataArray`` <-> a one-variable Zarr v3 store; name (None too), attrs and coordinates kept."""

    def __init__(self) -> None:
        super().__init__(name="cloudio xarray DataArray (Zarr)", t=xr.DataArray)

    def get_literal_type(self, t: type[xr.DataArray]) -> LiteralType:
        return LiteralType(blob=_BLOB)

    def to_literal(self, ctx: FlyteContext, python_val: xr.DataArray, python_type: type[xr.DataArray],
                   expected: LiteralType) -> Literal:
        name = python_val.name
        if name is None or name in python_val.coords or name in python_val.dims:  # as xarray's to_netcdf
            ds = python_val.to_dataset(name=UNNAMED, promote_attrs=False)
            if name is not None:  # an index coordinate's own array, say: the name would make it one again
                ds.attrs[NAME_ATTR] = name
        else:
            ds = python_val.to_dataset(promote_attrs=False)
        return _write(ctx, ds)

    def to_python_value(self, ctx: FlyteContext, lv: Literal,
                        expected_python_type: type[xr.DataArray]) -> xr.DataArray:
        ds = _read(lv)
        if len(ds.data_vars) != 1:
            raise ConfigurationError(
                f"{lv.scalar.blob.uri} holds {len(ds.data_vars)} data variables {list(ds.data_vars)}, not one: "
                "type that input as xarray.Dataset")
        (name,) = ds.data_vars
        da = ds[name]
        return da.rename(ds.attrs.get(NAME_ATTR)) if name == UNNAMED else da

    def to_html(self, ctx: FlyteContext, python_val: xr.DataArray, expected_python_type: type[xr.DataArray]) -> str:
        return str(python_val._repr_html_())


_previous: dict[type, TypeTransformer[Any] | None] = {}


def register(override: bool = True) -> bool:
    """Make cloudio's transformers the ones flytekit uses for ``xarray.Dataset`` and ``xarray.DataArray``.

    ``override=False`` leaves a transformer registered before (e.g. by
    ``flytekitplugins-xarray-zarr``) in place. Returns True when cloudio's are
    registered for both types afterwards.
    """
    for transformer in (DatasetTransformer(), DataArrayTransformer()):
        t = transformer.python_type
        existing = TypeEngine.get_transformer(t) if t in TypeEngine.get_available_transformers() else None
        if existing is not None and _is_cloudio(existing):
            continue
        if existing is not None and not override:
            log.info("%s: keeping the registered transformer %r (override=False)", t.__name__, existing.name)
            continue
        if existing is not None:
            log.info("%s: replacing the transformer %r with cloudio's", t.__name__, existing.name)
        _previous.setdefault(t, existing)
        TypeEngine.register_additional_type(transformer, t, override=True)
    return all(_is_cloudio(TypeEngine.get_transformer(t)) for t in (xr.Dataset, xr.DataArray))


def unregister() -> None:
    """Put back whatever transformers were registered for the two types before :func:`register`."""
    for t, previous in list(_previous.items()):
        if previous is None:
            TypeEngine._REGISTRY.pop(t, None)  # flytekit has no public way to remove a transformer
        else:
            TypeEngine.register_additional_type(previous, t, override=True)
        del _previous[t]


def _is_cloudio(transformer: TypeTransformer[Any] | None) -> bool:
    """Whether ``transformer`` is one of ours (a fresh instance per register() call)."""
    return isinstance(transformer, DatasetTransformer | DataArrayTransformer)


register()
