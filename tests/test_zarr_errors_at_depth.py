"""Errors of the Zarr entry points decided where they are named (``cloudio_error`` in src/cloudio/_zarr/store.py),
not by a workaround of one entry point: a failure of the user's own Dask graph is raised as it is by every entry
point that computes one, and a store of the other Zarr format than the one asked is named as such."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr
import zarr

import cloudio

pytestmark = [pytest.mark.filterwarnings("ignore:Consolidated metadata is currently not part:UserWarning")]


class _Failed(ValueError):
    """The user's own computation failing."""


def _fails_at_third_block(block: np.ndarray, block_info: dict | None = None) -> np.ndarray:
    if block_info is not None and block_info[0]["chunk-location"][0] == 2:
        raise _Failed("the user's own computation failed")
    return block


def _failing_graph() -> object:
    import dask.array as da

    return da.map_blocks(_fails_at_third_block, da.arange(8.0, chunks=2), dtype="f8")


@pytest.mark.parametrize("where", ["sync", "cluster"])
def test_save_array_raises_a_failure_of_the_users_own_dask_graph_as_it_is(
        gcs_bucket: str, where: str, request: pytest.FixtureRequest) -> None:
    """save_array of a Dask array whose task raised a ValueError said "cloudio.save_array refused its arguments
    ... Change them and try again" (a ConfigurationError): only to_zarr worked around cloudio_error's naming.
    The user's own error is raised as it is, and the array stays marked incomplete: on Dask's synchronous
    scheduler, and on a distributed cluster, whose client raises the task's error."""
    import contextlib

    import dask

    url = f"{gcs_bucket}/graph-{where}.zarr"
    if where == "cluster":
        request.getfixturevalue("thread_client")
    scheduler = dask.config.set(scheduler="sync") if where == "sync" else contextlib.nullcontext()
    with scheduler, pytest.raises(_Failed, match="own computation") as raised:
        cloudio.save_array(_failing_graph(), url, chunks=(2,))
    assert not isinstance(raised.value, cloudio.CloudioError)
    with pytest.raises(cloudio.IncompleteWriteError):
        cloudio.load_array(url)


def test_to_zarr_on_a_cluster_raises_the_users_own_failure_as_it_is(gcs_bucket: str, thread_client: object) -> None:
    """to_zarr on a distributed cluster: the user's error as it is, the store marked incomplete."""
    url = f"{gcs_bucket}/graph-cluster-ds.zarr"
    with pytest.raises(_Failed, match="own computation") as raised:
        cloudio.to_zarr(xr.Dataset({"x": (("t",), _failing_graph())}), url, mode="w",
                        encoding={"x": {"chunks": (2,)}})
    assert not isinstance(raised.value, cloudio.CloudioError) and "refused its input" not in str(raised.value)
    with pytest.raises(cloudio.IncompleteWriteError):
        cloudio.open_zarr(url)


@pytest.mark.parametrize("chunks", [{"t": -3}, {"t": (3, 3)}], ids=["negative", "not-adding-up"])
def test_dask_chunks_open_zarr_refuses_stay_a_named_refusal(gcs_bucket: str, chunks: dict) -> None:
    """Dask's own check of the chunks asked (a ValueError through Dask's frames, no computation) is a wrong
    argument, named with the store, not raised as a failure of the user's graph."""
    url = f"{gcs_bucket}/chunks.zarr"
    cloudio.to_zarr(xr.Dataset({"x": (("t",), np.arange(8.0))}), url, mode="w")
    with pytest.raises(cloudio.ConfigurationError, match="refused its arguments") as raised:
        cloudio.open_zarr(url, chunks=chunks)
    assert url in str(raised.value) and isinstance(raised.value.__cause__, ValueError)


@pytest.mark.parametrize(("written", "asked", "document"), [(3, 2, "zarr.json"), (2, 3, ".zgroup")])
def test_open_zarr_of_the_other_format_says_which_format_is_there(gcs_bucket: str, written: int, asked: int,
                                                                  document: str) -> None:
    """open_zarr(url, zarr_format=2) of a format-3 store (and the reverse) said there was no Zarr store there
    (ObjectNotFoundError): it says the store is of the other format and what to pass."""
    url = f"{gcs_bucket}/fmt{written}.zarr"
    cloudio.to_zarr(xr.Dataset({"x": (("t",), np.arange(8.0))}), url, mode="w",
                    **({} if written == 3 else {"zarr_format": 2}))
    with pytest.raises(cloudio.ConfigurationError) as raised:
        cloudio.open_zarr(url, zarr_format=asked)
    message = str(raised.value)
    assert not isinstance(raised.value, cloudio.ObjectNotFoundError)
    assert url in message and f"zarr_format={written}" in message and document in message
    assert f"format {written}" in message and f"not format {asked}" in message
    assert isinstance(raised.value.__cause__, zarr.errors.GroupNotFoundError)
    assert cloudio.open_zarr(url).x.values.tolist() == list(range(8))  # the store itself is fine


def test_open_zarr_of_a_group_of_the_other_format_names_the_group(gcs_bucket: str) -> None:
    """The same for a group of the store: the group's URL is named."""
    url = f"{gcs_bucket}/grouped.zarr"
    cloudio.to_zarr(xr.Dataset({"x": (("t",), np.arange(8.0))}), url, mode="w", group="g")
    with pytest.raises(cloudio.ConfigurationError, match="zarr_format=3") as raised:
        cloudio.open_zarr(url, group="g", zarr_format=2)
    assert f"{url}/g" in str(raised.value) and raised.value.__cause__ is not None


@pytest.mark.parametrize("asked", [2, 3])
def test_open_zarr_with_a_format_where_nothing_is_stored_is_still_not_found(gcs_bucket: str, asked: int) -> None:
    """No store of either format: still ObjectNotFoundError."""
    url = f"{gcs_bucket}/nothing.zarr"
    with pytest.raises(cloudio.ObjectNotFoundError, match="no Zarr store there") as raised:
        cloudio.open_zarr(url, zarr_format=asked)
    assert "zarr_format" not in str(raised.value)
