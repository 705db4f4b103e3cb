"""gcsfs's listing cache goes stale when another client writes (raw gcsfs, no cloudio).

Rows 4-5 of docs/design.md's "The problem, measured" table: fsspec keeps one
``dircache`` per filesystem instance and reuses the instance for equal
arguments, so a write by any other client is invisible to it.
"""

from __future__ import annotations

import pytest

from cloudio.emulator import Emulator

from ._helpers import raw_gcsfs

pytestmark = pytest.mark.characterization

FIXED = "upstream fixed? gcsfs {} now sees the other client's write: update docs/design.md's table and this test"


def test_overwrite_elsewhere_truncates_reads(gcs_emulator: Emulator, bucket: str) -> None:
    """The fsspec side of rasterio issue 1078 (no control over a library's caching); the
    same truncation was reported for s3fs as fsspec/s3fs issue 424, and gcsfs documents
    its listing cache as non-POSIX since fsspec/gcsfs issue 647.

    gcsfs lists ``d/``; ``d/a.bin`` is overwritten from 10 to 100 bytes by
    another gcsfs instance; ``info()`` still says 10 bytes and
    ``open().read()`` returns 10 bytes: a silent truncation of the new object.
    """
    fs = raw_gcsfs(gcs_emulator)
    fs.pipe(f"{bucket}/d/a.bin", b"0" * 10)
    assert fs.ls(f"{bucket}/d/") == [f"{bucket}/d/a.bin"]

    new = bytes(range(100))
    other = raw_gcsfs(gcs_emulator, separate=True)
    assert other is not fs
    other.pipe(f"{bucket}/d/a.bin", new)
    assert gcs_emulator.client.bucket(bucket).get_blob("d/a.bin").size == 100  # the server has 100

    size = fs.info(f"{bucket}/d/a.bin")["size"]
    with fs.open(f"{bucket}/d/a.bin", "rb") as f:
        data = f.read()
    assert size != 100 and len(data) != 100, FIXED.format("info/open")
    assert size == 10
    assert data == new[:10]  # the new object's first 10 bytes: silently cut short


def test_delete_elsewhere_still_exists(gcs_emulator: Emulator, bucket: str) -> None:
    """The same listing cache after a delete (fsspec/gcsfs issue 647, the fsspec side of
    rasterio issue 1078): a removed object still "exists".

    gcsfs lists ``d/``; ``d/a.bin`` is deleted by google-cloud-storage;
    ``exists()`` is still True.
    """
    fs = raw_gcsfs(gcs_emulator)
    fs.pipe(f"{bucket}/d/a.bin", b"0" * 10)
    fs.pipe(f"{bucket}/d/b.bin", b"1" * 10)
    assert fs.ls(f"{bucket}/d/") == [f"{bucket}/d/a.bin", f"{bucket}/d/b.bin"]

    gcs_emulator.client.bucket(bucket).blob("d/a.bin").delete()
    assert gcs_emulator.client.bucket(bucket).get_blob("d/a.bin") is None  # gone on the server

    exists = fs.exists(f"{bucket}/d/a.bin")
    assert exists is True, FIXED.format("exists()")
    assert fs.ls(f"{bucket}/d/") == [f"{bucket}/d/a.bin", f"{bucket}/d/b.bin"]
