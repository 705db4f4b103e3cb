"""A Zarr group read through fsspec misses members another writer adds (raw zarr, no cloudio).

Row 6 of docs/design.md's "The problem, measured" table. Checked stale with
zarr 3.1.6 (Python 3.11 env) and zarr 3.4.2 (Python 3.12 env): both list
members through the filesystem instance's ``dircache``.
"""

from __future__ import annotations

import numpy as np
import pytest
import zarr
from gcsfs.core import GCSFileSystem
from zarr.storage import FsspecStore

from cloudio.emulator import Emulator

from ._helpers import raw_gcsfs

pytestmark = pytest.mark.characterization

FIXED = "upstream fixed? zarr {} now lists the array another writer added: update docs/design.md's table and this test"


def test_group_misses_array_added_by_second_writer(gcs_emulator: Emulator, bucket: str) -> None:
    """The Zarr side of GDAL issue 11351 / rasterio issue 1078: members created after a
    listing are not found.

    A group holding ``x`` is read; a second writer (its own gcsfs instance)
    adds array ``y``; the reader's group, and a group opened again the way
    user code does (``FsspecStore.from_url``, which fsspec answers with the
    same cached filesystem instance), still list only ``x``.
    """
    root = f"{bucket}/g.zarr"
    opts = {"endpoint_url": gcs_emulator.url, "token": "anon"}
    writer_store = FsspecStore.from_url(f"gs://{root}", storage_options=opts)
    assert type(writer_store.fs) is GCSFileSystem  # the raw library
    writer = zarr.open_group(writer_store, mode="w")
    writer.create_array("x", shape=(4,), dtype="int32")[:] = np.arange(4)

    reader_store = FsspecStore.from_url(f"gs://{root}", storage_options=opts, read_only=True)
    assert reader_store.fs is writer_store.fs  # fsspec's instance cache: one dircache for equal opens
    reader = zarr.open_group(reader_store, mode="r")
    assert sorted(reader.array_keys()) == ["x"]

    second = zarr.open_group(FsspecStore(raw_gcsfs(gcs_emulator, separate=True, asynchronous=True), path=root))
    second.create_array("y", shape=(4,), dtype="int32")[:] = np.arange(4) * 10
    assert sorted(second.array_keys()) == ["x", "y"]  # the second writer sees both
    assert gcs_emulator.client.bucket(bucket).get_blob("g.zarr/y/zarr.json") is not None

    again = zarr.open_group(
        FsspecStore.from_url(f"gs://{root}", storage_options=opts, read_only=True), mode="r"
    )
    seen, seen_again = sorted(reader.array_keys()), sorted(again.array_keys())
    assert "y" not in seen and "y" not in seen_again, FIXED.format(zarr.__version__)
    assert seen == seen_again == ["x"]
    # the data is there for anyone who asks for it by name
    assert again["y"][:].tolist() == [0, 10, 20, 30]
