"""Shared set-up for the characterization tests: raw libraries pointed at the emulator.

cloudio only provides the emulator (the ``gcs_emulator``/``gcs_bucket``
fixtures); every read and write here goes through rasterio/GDAL, gcsfs,
google-cloud-storage, zarr or xarray configured by hand, the way a user
without cloudio would.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from cloudio.emulator import Emulator

# gcsfs reads this when it is imported: without it, gcsfs 2026.x asks a gRPC
# control API about each bucket, which waits 60 s against the emulator.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")


def _clear_gcsfs_instances() -> None:
    """Drop fsspec's cached gcsfs instances, keeping asynchronous ones alive (see KEEP_ASYNC)."""
    from gcsfs.core import GCSFileSystem

    from ._helpers import KEEP_ASYNC

    KEEP_ASYNC.extend(fs for fs in GCSFileSystem._cache.values() if getattr(fs, "asynchronous", False))
    GCSFileSystem.clear_instance_cache()


@pytest.fixture(autouse=True)
def _fresh_fsspec_instances() -> Iterator[None]:
    """No gcsfs instance (nor its listing cache) survives from one test to the next."""
    _clear_gcsfs_instances()
    yield
    _clear_gcsfs_instances()


@pytest.fixture
def bucket(gcs_bucket: str) -> str:
    """The fresh bucket's bare name."""
    return gcs_bucket.removeprefix("gs://")


@pytest.fixture
def gdal_env(gcs_emulator: Emulator) -> Iterator[None]:
    """GDAL's ``/vsigs/`` pointed at the emulator, set by hand (no cloudio)."""
    import rasterio

    with rasterio.Env(CPL_GS_ENDPOINT=gcs_emulator.url + "/", GS_NO_SIGN_REQUEST="YES"):
        yield
