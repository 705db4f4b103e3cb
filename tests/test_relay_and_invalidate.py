"""cloudio.invalidate and the Dask journal relay: metadata deleted through cloudio.filesystem reaches open_zarr,
a worker that joins later hears what made a consolidated copy stale, an empty URL is refused,
Zarr invalidations are counted. Found by a review; each test failed before its fix."""

from __future__ import annotations

import numpy as np
import pytest
from rasters import gcsfs_options, small_dataset

import cloudio

pytestmark = pytest.mark.filterwarnings("ignore:Consolidated metadata is currently not part")


def _vars(url: str) -> list[str]:
    import cloudio

    return sorted(cloudio.open_zarr(url).data_vars)


def test_fs_rm_of_a_variable_is_seen_by_open_zarr_in_the_same_process(gcs_bucket):
    url = f"{gcs_bucket}/rmvar/ds.zarr"
    ds = small_dataset("a").assign(b=small_dataset("b")["b"])
    cloudio.to_zarr(ds, url, mode="w", zarr_format=3, consolidated=True)
    assert _vars(url) == ["a", "b"]
    cloudio.filesystem(url).rm(f"{url}/b", recursive=True)
    assert _vars(url) == ["a"]


def test_thread_worker_rm_of_a_variable_is_seen_by_client_open_zarr(thread_client, gcs_bucket):
    url = f"{gcs_bucket}/rmvar_t/ds.zarr"
    ds = small_dataset("a").assign(b=small_dataset("b")["b"])
    cloudio.to_zarr(ds, url, mode="w", zarr_format=3, consolidated=True)
    assert _vars(url) == ["a", "b"]

    def rm(u):
        import cloudio
        cloudio.filesystem(u).rm(f"{u}/b", recursive=True)

    thread_client.submit(rm, url, pure=False).result()
    assert _vars(url) == ["a"]


def test_invalidate_empty_string_is_refused():
    with pytest.raises(cloudio.InvalidURLError):
        cloudio.invalidate("")


def test_zarr_invalidation_is_counted(gcs_bucket, gcs_emulator):
    import zarr
    url = f"{gcs_bucket}/cnt/s.zarr"
    cloudio.to_zarr(small_dataset(), url, mode="w")
    assert cloudio.open_zarr(url)["a"].shape == (4, 4)
    group = zarr.open_group(url, mode="r+", storage_options=gcsfs_options(gcs_emulator), use_consolidated=False)
    group["a"].append(np.full((2, 4), 99.0))
    group["y"].append(np.array([4, 5]))
    with cloudio.session() as s:
        cloudio.invalidate(url)
        assert cloudio.open_zarr(url)["a"].shape == (6, 4)
    assert s.stats.invalidations["zarr"] >= 1, s.stats.as_dict()


def _shape(url: str, name: str) -> tuple[int, ...]:
    import cloudio

    return tuple(cloudio.open_zarr(url)[name].shape)


def test_a_worker_that_joins_after_an_invalidate_reads_the_announced_zarr_change(gcs_emulator, gcs_bucket):
    """Another writer resizes an array behind the store's consolidated copy; the client announces it with
    cloudio.invalidate. The workers up then read the new shape; a worker started afterwards must too."""
    import zarr
    from distributed import Client, LocalCluster

    import cloudio.dask

    url = f"{gcs_bucket}/joinz/s.zarr"
    cloudio.to_zarr(small_dataset("a"), url, mode="w", zarr_format=3, consolidated=True)
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster:
        with Client(cluster) as client:
            client.wait_for_workers(1, timeout=60)
            cloudio.dask.install(client)
            (old,) = list(client.nthreads())
            assert client.submit(_shape, url, "a", workers=[old], pure=False).result() == (4, 4)
            g = zarr.open_group(url, mode="r+", storage_options=gcsfs_options(gcs_emulator), use_consolidated=False)
            g["a"].append(np.full((2, 4), 9.0))
            g["y"].append(np.array([4, 5]))
            cloudio.invalidate(url)
            assert _shape(url, "a") == (6, 4)
            assert client.submit(_shape, url, "a", workers=[old], pure=False).result() == (6, 4)
            cluster.scale(2)
            client.wait_for_workers(2, timeout=60)
            new = next(w for w in client.nthreads() if w != old)
            assert client.submit(_shape, url, "a", workers=[new], pure=False).result() == (6, 4)

