"""``cloudio.flyte``: xarray.Dataset / DataArray as Flyte task inputs and outputs.

Local Flyte executions run every task in this process; the raw output
prefix is a ``gs://`` prefix on the emulator or a local directory (the
``raw_prefix`` fixture), so outputs really go through storage and inputs are
read back from it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import numpy as np
import pytest

pytest.importorskip("flytekit")
da = pytest.importorskip("dask.array")
import dask
import xarray as xr
from flytekit import task, workflow
from flytekit.core.context_manager import FlyteContextManager
from flytekit.core.data_persistence import FileAccessProvider
from flytekit.core.type_engine import TypeEngine

import cloudio.flyte

try:
    from flytekitplugins.xarray import (
        XarrayDaZarrTypeTransformer,
        XarrayZarrTypeTransformer,
    )
except ImportError:  # the plugin tests skip
    XarrayZarrTypeTransformer = XarrayDaZarrTypeTransformer = None
from cloudio.emulator import Emulator

N, CHUNK, SHARD = 96, 16, 48  # 2 x 2 shards of 3 x 3 inner chunks


def _truth() -> np.ndarray:
    return np.arange(N * N, dtype="f8").reshape(N, N) % 1000 / 7


@pytest.fixture(params=["gs", "local"])
def raw_prefix(request: pytest.FixtureRequest, gcs_bucket: str, tmp_path: Path) -> Iterator[str]:
    """Flyte's raw output prefix for the test: on the emulator, or a local directory."""
    prefix = f"{gcs_bucket}/flyte-raw" if request.param == "gs" else str(tmp_path / "raw")
    ctx = FlyteContextManager.current_context()
    fa = FileAccessProvider(local_sandbox_dir=str(tmp_path / "sandbox"), raw_output_prefix=prefix)
    with FlyteContextManager.with_context(ctx.with_file_access(fa)):
        yield prefix


def _array_meta(emu: Emulator, prefix: str, name: str) -> list[dict]:
    """Every stored ``<name>/zarr.json`` under ``prefix``, read from the storage itself."""
    if prefix.startswith("gs://"):
        bucket, key = prefix.removeprefix("gs://").split("/", 1)
        blobs = emu.client.list_blobs(bucket, prefix=key + "/")
        return [json.loads(b.download_as_bytes()) for b in blobs if b.name.endswith(f"/{name}/zarr.json")]
    return [json.loads(p.read_text()) for p in Path(prefix).glob(f"*/*/{name}/zarr.json")]


@task
def make_sharded(scale: float) -> xr.Dataset:
    v = da.from_array(_truth() * scale, chunks=SHARD // 2)  # Dask chunks split shards: cloudio aligns them
    ds = xr.Dataset({"v": (("y", "x"), v)}, coords={"y": np.arange(N), "x": np.arange(N) * 10.0},
                    attrs={"title": "sharded"})
    ds.v.encoding.update(chunks=(CHUNK, CHUNK), shards=(SHARD, SHARD))
    return ds


@task
def lazy_stats(ds: xr.Dataset) -> tuple[bool, str, float, float]:
    """Whether the input came lazily, its Dask chunks, and two reductions computed here."""
    lazy = dask.is_dask_collection(ds.v.data)
    return lazy, json.dumps(ds.v.chunks), float(ds.v.sum().compute()), float(ds.v.isel(y=slice(50, 60)).mean())


@workflow
def chain(scale: float) -> tuple[bool, str, float, float]:
    return lazy_stats(ds=make_sharded(scale=scale))


def test_sharded_dask_dataset_read_lazily_in_next_task(gcs_emulator: Emulator, raw_prefix: str) -> None:
    lazy, chunks, total, mean = chain(scale=3.0)
    truth = _truth() * 3.0
    assert lazy
    assert json.loads(chunks) == [[SHARD, SHARD], [SHARD, SHARD]]  # one Dask chunk per stored shard
    assert total == pytest.approx(truth.sum(), rel=1e-12)
    assert mean == pytest.approx(truth[50:60].mean(), rel=1e-12)
    (meta,) = _array_meta(gcs_emulator, raw_prefix, "v")  # written under Flyte's raw output prefix
    assert meta["zarr_format"] == 3 and meta["chunk_grid"]["configuration"]["chunk_shape"] == [SHARD, SHARD]
    (codec,) = meta["codecs"]
    assert codec["name"] == "sharding_indexed" and codec["configuration"]["chunk_shape"] == [CHUNK, CHUNK]


def test_output_is_written_by_the_dask_scheduler_in_force(raw_prefix: str) -> None:
    from distributed import default_client

    calls: list[int] = []

    def counting_get(dsk: object, keys: object, **kwargs: object) -> object:
        calls.append(1)
        return dask.threaded.get(dsk, keys, **kwargs)

    with dask.config.set(scheduler=counting_get):
        lazy, _, total, _ = chain(scale=1.0)
    assert lazy and total == pytest.approx(_truth().sum(), rel=1e-12)
    assert calls  # the write and the reads ran on the scheduler set here
    with pytest.raises(ValueError, match="No clients found"):
        default_client()  # and no distributed cluster was started for them


@task
def name_it(name: str) -> xr.DataArray:
    return _named(name or None)


def _named(name: str | None) -> xr.DataArray:
    """A Dask-backed DataArray named ``name`` (None: unnamed; xarray would take the Dask name)."""
    return xr.DataArray(
        da.from_array(_truth()[:8, :6].astype("f4"), chunks=(4, 3)), dims=("y", "x"), name=name,
        coords={"y": np.arange(8), "x": np.arange(6) * 0.5, "lat": ("y", np.linspace(10, 20, 8)), "level": 500},
        attrs={"units": "K", "history": "made in a task"}).rename(name)


@task
def first_row(a: xr.DataArray) -> xr.DataArray:
    return a.isel(y=0)  # keeps the 2-D chunk and shard encoding of a 1-D result


@workflow
def data_array_flow(name: str) -> tuple[xr.DataArray, xr.DataArray]:
    a = name_it(name=name)
    return a, first_row(a=a)


@pytest.mark.parametrize("name", ["temperature", ""])
def test_data_array_keeps_name_attrs_and_coordinates(raw_prefix: str, name: str) -> None:
    a, row = data_array_flow(name=name)
    expected = _named(name or None)
    xr.testing.assert_identical(a.compute(), expected.compute())
    assert a.name == (name or None)
    xr.testing.assert_identical(row.compute(), expected.isel(y=0).compute())


@task
def overwrite(url: str, ds: xr.Dataset) -> xr.Dataset:
    """Store ``ds`` at a fixed URL and hand on the store itself, lazily."""
    cloudio.to_zarr(ds, url, mode="w", consolidated=False)
    return cloudio.open_zarr(url)


@task
def total(ds: xr.Dataset) -> float:
    return float(ds.v.sum().compute())


@workflow
def overwrite_twice(url: str) -> tuple[float, float, float]:
    first = overwrite(url=url, ds=make_sharded(scale=1.0))
    t1 = total(ds=first)
    second = overwrite(url=url, ds=make_sharded(scale=2.0))
    t1 >> second
    t2 = total(ds=second)
    again = total(ds=first)  # after the overwrite: Flyte's copy of the first output is unchanged
    t2 >> again
    return t1, t2, again


def test_overwritten_dataset_is_reread_with_new_values(gcs_bucket: str, raw_prefix: str) -> None:
    t1, t2, again = overwrite_twice(url=f"{gcs_bucket}/fixed/data.zarr")
    truth = _truth().sum()
    assert (t1, t2, again) == (pytest.approx(truth), pytest.approx(2 * truth), pytest.approx(truth))


def test_another_process_reads_what_was_written(gcs_emulator: Emulator, raw_prefix: str) -> None:
    ctx = FlyteContextManager.current_context()
    ds = make_sharded.task_function(scale=5.0)
    lit = TypeEngine.to_literal(ctx, ds, xr.Dataset, TypeEngine.to_literal_type(xr.Dataset))
    code = (
        "import json, sys, xarray as xr\n"
        "import cloudio.flyte\n"
        "from flytekit import FlyteContextManager\n"
        "from flytekit.core.type_engine import TypeEngine\n"
        "from flytekit.models.literals import Literal\n"
        "from flytekit.models.core.types import BlobType\n"
        "from flytekit.models.literals import Blob, BlobMetadata, Scalar\n"
        "t = BlobType(format='binary', dimensionality=BlobType.BlobDimensionality.MULTIPART)\n"
        "lit = Literal(scalar=Scalar(blob=Blob(uri=sys.argv[1], metadata=BlobMetadata(type=t))))\n"
        "ds = TypeEngine.to_python_value(FlyteContextManager.current_context(), lit, xr.Dataset)\n"
        "print(json.dumps([float(ds.v.sum()), ds.v.chunks, ds.attrs]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code, lit.scalar.blob.uri], capture_output=True, text=True,
                         env=dict(os.environ), timeout=120, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    s, chunks, attrs = json.loads(out.stdout.strip().splitlines()[-1])
    assert s == pytest.approx((_truth() * 5.0).sum(), rel=1e-12)
    assert chunks == [[SHARD, SHARD], [SHARD, SHARD]] and attrs == {"title": "sharded"}


def test_non_blob_literal_is_a_cloudio_error(raw_prefix: str) -> None:
    from flytekit.models.literals import Literal as FlyteLiteral
    from flytekit.models.literals import Primitive, Scalar

    lit = FlyteLiteral(scalar=Scalar(primitive=Primitive(integer=3)))
    with pytest.raises(cloudio.ConfigurationError, match="not a Zarr blob"):
        TypeEngine.to_python_value(FlyteContextManager.current_context(), lit, xr.Dataset)


class TestWithTheFlytekitPlugin:
    """``flytekitplugins-xarray-zarr`` installed too: which transformer flytekit uses, and how to choose."""

    @pytest.fixture(autouse=True)
    def plugin(self) -> Iterator[None]:
        if XarrayZarrTypeTransformer is None:
            pytest.skip("flytekitplugins-xarray-zarr is not installed")
        yield
        cloudio.flyte.register()  # whatever a test did, cloudio's again for the tests after it

    def test_cloudio_wins_after_import_and_unregister_gives_the_plugin_back(self) -> None:
        # `import flytekit` loaded the plugin (an entry point) before `import cloudio.flyte` replaced it
        assert isinstance(TypeEngine.get_transformer(xr.Dataset), cloudio.flyte.DatasetTransformer)
        assert isinstance(TypeEngine.get_transformer(xr.DataArray), cloudio.flyte.DataArrayTransformer)
        cloudio.flyte.unregister()
        assert isinstance(TypeEngine.get_transformer(xr.Dataset), XarrayZarrTypeTransformer)
        assert isinstance(TypeEngine.get_transformer(xr.DataArray), XarrayDaZarrTypeTransformer)
        assert cloudio.flyte.register(override=False) is False  # keeps the plugin's
        assert isinstance(TypeEngine.get_transformer(xr.Dataset), XarrayZarrTypeTransformer)
        assert cloudio.flyte.register() is True
        assert isinstance(TypeEngine.get_transformer(xr.Dataset), cloudio.flyte.DatasetTransformer)

    def test_plugin_reads_cloudio_output_and_annotation_picks_the_plugin(self, raw_prefix: str) -> None:
        @task
        def plugin_total(ds: Annotated[xr.Dataset, XarrayZarrTypeTransformer()]) -> float:
            assert isinstance(ds.v.data, da.Array)
            return float(ds.v.sum().compute())

        @workflow
        def mixed(scale: float) -> float:
            return plugin_total(ds=make_sharded(scale=scale))  # cloudio writes, the plugin reads

        assert mixed(scale=4.0) == pytest.approx((_truth() * 4.0).sum(), rel=1e-12)
