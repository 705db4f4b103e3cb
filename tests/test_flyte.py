"""cloudio inside Flyte tasks (the ``flyte`` extra).

A local Flyte execution runs every task in this process, so a task that
overwrites an object and the task after it that reads it share GDAL's and
gcsfs's caches: exactly the case cloudio is for. Objects travel between tasks
as ``FlyteFile`` values pointing at ``gs://`` URLs on the emulator.
"""

from __future__ import annotations

import os
import tempfile

import numpy as np
import pytest
import rasterio
from affine import Affine

import cloudio
from cloudio.emulator import Emulator

pytest.importorskip("flytekit")
from flytekit import task, workflow
from flytekit.types.file import FlyteFile

_PROFILE = {"driver": "GTiff", "count": 1, "dtype": "uint8", "transform": Affine.identity()}


@task
def write_with_cloudio(url: str, n: int) -> FlyteFile:
    with cloudio.open(url, "w", width=n, height=n, **_PROFILE) as ds:
        ds.write(np.full((1, n, n), n, "uint8"))
    return FlyteFile(path=url)  # already remote: Flyte passes the URL on, uploads nothing


@task
def upload_with_flytekit(url: str, n: int) -> FlyteFile:
    """The plain Flyte way: a local file that flytekit uploads to ``url`` (cloudio does not see it)."""
    path = os.path.join(tempfile.mkdtemp(), "x.tif")
    with rasterio.open(path, "w", width=n, height=n, **_PROFILE) as ds:
        ds.write(np.full((1, n, n), n, "uint8"))
    return FlyteFile(path=path, remote_path=url)


@task
def width_through_cloudio(f: FlyteFile) -> int:
    with cloudio.open(f.remote_source) as ds:
        assert (ds.read(1) == ds.width).all(), "pixels of another version than the header"
        return int(ds.width)


@task
def width_through_cloudio_strong(f: FlyteFile) -> int:
    with cloudio.session("strong"), cloudio.open(f.remote_source) as ds:
        return int(ds.width)


@task
def width_through_raw_rasterio(f: FlyteFile) -> int:
    with rasterio.Env(CPL_GS_ENDPOINT=os.environ["STORAGE_EMULATOR_HOST"] + "/", GS_NO_SIGN_REQUEST="YES"):
        with rasterio.open(f.remote_source.replace("gs://", "/vsigs/")) as ds:
            return int(ds.width)


@task
def downloaded_size(f: FlyteFile) -> int:
    return os.path.getsize(f.download())


@workflow
def overwrite_through_cloudio(url: str) -> tuple[int, int, int, int]:
    f1 = write_with_cloudio(url=url, n=8)
    w1 = width_through_cloudio(f=f1)
    s1 = downloaded_size(f=f1)
    f2 = write_with_cloudio(url=url, n=64)
    w1 >> f2
    s1 >> f2
    return w1, s1, width_through_cloudio(f=f2), downloaded_size(f=f2)


@workflow
def overwrite_by_flytekit(url: str) -> tuple[int, int, int, int]:
    f1 = upload_with_flytekit(url=url, n=8)
    raw1 = width_through_raw_rasterio(f=f1)
    strong1 = width_through_cloudio_strong(f=f1)
    f2 = upload_with_flytekit(url=url, n=64)
    raw1 >> f2
    strong1 >> f2
    raw2 = width_through_raw_rasterio(f=f2)
    strong2 = width_through_cloudio_strong(f=f2)
    raw2 >> strong2  # the raw read first: cloudio must not depend on going first
    return raw1, strong1, raw2, strong2


def _server_size(emu: Emulator, url: str) -> int:
    bucket, key = url.removeprefix("gs://").split("/", 1)
    blob = emu.client.bucket(bucket).get_blob(key)
    assert blob is not None
    return int(blob.size)


def test_tasks_read_what_the_previous_task_wrote(gcs_emulator: Emulator, gcs_bucket: str) -> None:
    url = f"{gcs_bucket}/flyte/scene.tif"
    w1, s1, w2, s2 = overwrite_through_cloudio(url=url)
    assert (w1, w2) == (8, 64)  # each version, read whole in the next task
    assert s2 == _server_size(gcs_emulator, url) and s1 < s2  # FlyteFile.download: the whole new object


@pytest.mark.characterization
def test_flytekit_uploads_leave_raw_gdal_stale_and_strong_reads_fresh(gcs_emulator: Emulator, gcs_bucket: str) -> None:
    """flytekit's own uploads bypass cloudio's journal; the strong level still reads them fresh."""
    raw1, strong1, raw2, strong2 = overwrite_by_flytekit(url=f"{gcs_bucket}/flyte/up.tif")
    assert (raw1, strong1) == (8, 8)
    assert raw2 == 8  # stale: GDAL still holds the first upload
    assert strong2 == 64
