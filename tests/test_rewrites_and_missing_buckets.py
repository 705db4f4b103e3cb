"""A bounded open after this process rewrote a store in another format, a get of a gzip-encoded object, and copies and
writes into a missing bucket. Found by a review of earlier fixes; each test failed before its fix."""

from __future__ import annotations

import gzip
import os
from collections.abc import Callable

import numpy as np
import pytest

import cloudio

zarr_warnings = pytest.mark.filterwarnings("ignore:Consolidated metadata is currently not part:UserWarning")


def _dataset(name: str = "a", rows: int = 4) -> object:
    import xarray as xr

    return xr.Dataset({name: (("y", "x"), np.arange(rows * 4.0).reshape(rows, 4))},
                      coords={"y": np.arange(rows), "x": np.arange(4)})


@zarr_warnings
def test_bounded_open_after_own_rewrite_in_another_format(gcs_bucket: str,
                                                         other_writer: Callable[[str], None]) -> None:
    """Within the bound, a listing that found a stale copy is used again, unless this process rewrote the store
    since (here in the other Zarr format, which that listing's format would have forced on xarray)."""
    url = f"{gcs_bucket}/s.zarr"
    cloudio.to_zarr(_dataset(), url, mode="w", zarr_format=3)
    other_writer("""
        import zarr
        group = zarr.open_group(f"gs://{BUCKET}/s.zarr", mode="r+", storage_options=SO, use_consolidated=False)
        group["a"].append(np.full((2, 4), 99.0))
        group["y"].append(np.array([4, 5]))
    """)
    with cloudio.session(3600):  # lists: the consolidated copy is stale
        assert cloudio.open_zarr(url)["a"].shape == (6, 4)
    cloudio.to_zarr(_dataset("b", rows=3), url, mode="w", zarr_format=2)  # this process rewrites it, as v2
    with cloudio.session("session"):
        assert list(cloudio.open_zarr(url).data_vars) == ["b"]
    with cloudio.session(3600):  # within the bound of the listing
        ds = cloudio.open_zarr(url)
        assert list(ds.data_vars) == ["b"]
        assert ds["b"].shape == (3, 4)


def test_get_of_a_gzip_encoded_object(gcs_bucket: str, tmp_path: object) -> None:
    """An object stored gzip-encoded arrives decompressed, and its CRC32C describes the stored bytes: get
    checks it no more than cat does (an intact object was an IntegrityError)."""
    import gcsfs

    fs = cloudio.filesystem(gcs_bucket)
    url = f"{gcs_bucket}/t.txt"
    text = b"hello, compressed world\n" * 100
    plain = gcsfs.GCSFileSystem(endpoint_url="http://" + os.environ["STORAGE_EMULATOR_HOST"].split("://")[-1],
                                token="anon", skip_instance_cache=True)
    plain.pipe(url, gzip.compress(text), fixed_key_metadata={"content_encoding": "gzip"})
    got = fs.cat(url)
    local = os.path.join(str(tmp_path), "t.txt")
    fs.get(url, local)
    with open(local, "rb") as f:
        assert f.read() == got


def test_cp_into_a_missing_bucket_does_not_blame_the_source(gcs_bucket: str) -> None:
    """A copy whose destination bucket is missing names that bucket, not the source (which exists)."""
    fs = cloudio.filesystem(gcs_bucket)
    src = f"{gcs_bucket}/a"
    fs.pipe(src, b"x")
    with pytest.raises(FileNotFoundError) as ei:
        fs.cp(src, "gs://no-such-bucket-review/a")
    assert fs.cat(src) == b"x"
    assert "no-such-bucket-review" in str(ei.value), str(ei.value)


@pytest.mark.parametrize("size", [10, 2**20 + 3])
def test_open_for_write_in_a_missing_bucket_is_cloudios_error(gcs_bucket: str, size: int) -> None:
    """A write into a missing bucket is BucketNotFoundError naming the gs:// URL, through pipe and through
    fs.open(..., "wb") alike (small: one upload at close; large: a resumable upload's start)."""
    fs = cloudio.filesystem(gcs_bucket)
    with pytest.raises(cloudio.errors.BucketNotFoundError) as piped:
        fs.pipe("gs://no-such-bucket-review/a", b"x" * size)
    assert "gs://no-such-bucket-review/a" in str(piped.value)
    with pytest.raises(FileNotFoundError) as ei:
        with fs.open("gs://no-such-bucket-review/a", "wb", block_size=2**18) as f:
            f.write(b"x" * size)
    assert isinstance(ei.value, cloudio.errors.BucketNotFoundError), repr(ei.value)
    assert "gs://no-such-bucket-review/a" in str(ei.value)
