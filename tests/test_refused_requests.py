"""Refusals other than 403/404/412 on cloudio's own transport (cloudio._gcs.fast) and on listings: CloudioErrors.

Every test here failed before its fix (a review's). Faults come from the proxy in front of the real
emulator (tests/faultproxy.py). The promise under test (docs/design.md, docs/guide.md's error table): every
error is a ``cloudio.CloudioError`` naming the URL, with the library's error as ``__cause__``.
"""

from __future__ import annotations

import numpy as np
import pytest

import cloudio
from cloudio._zarr import last_seen

SHAPE, SHARDS, CHUNKS = (1000, 1300), (256, 512), (128, 128)
_SHARD_GET = r"/o/[^?]*%2Fc%2F"  # a shard's GET (fast.get_each / get_into, or fetch_pieces / fetch_into)

#: float32 shards (512 KiB) are read on the event loop, float64 ones (1 MiB) in reader threads
BOTH_READ_PATHS = pytest.mark.parametrize("dtype", ["float32", "float64"], ids=["loop", "threads"])


def _data(dtype: str) -> np.ndarray:
    return np.random.default_rng(7).standard_normal(SHAPE).astype(dtype)


@BOTH_READ_PATHS
@pytest.mark.parametrize("code", [400, 409, 401])
def test_a_shard_read_refused_with_another_4xx_than_403_is_a_cloudio_error(gcs_emulator, gcs_bucket, fault_proxy,
                                                                           dtype, code):
    """The server refuses every shard GET with 400, 409 or 401 (not 403/404/412). fast.fetch_into /
    fast.get_into map the answer with gcsfs's ``validate_response``, which raises gcsfs's bare ``HttpError``
    for these codes (not an OSError); the store's error mapping (``cloudio_error``) only knows
    ``type(e) is OSError`` refusals, so load_array lets gcsfs's ``HttpError`` out: not a CloudioError, no
    URL, no next step. On the fsspec face the same answers are already a ReadError naming the URL."""
    a = _data(dtype)
    url = f"{gcs_bucket}/refused.zarr"
    cloudio.save_array(a, url, chunks=CHUNKS, shards=SHARDS, compressors=None)
    last_seen.forget_all()
    fault_proxy.add("status", code=code, method="GET", path=_SHARD_GET, times=None)
    with pytest.raises(cloudio.CloudioError, match=r"refused\.zarr") as info:
        cloudio.load_array(url)
    assert info.value.__cause__ is not None


@pytest.mark.parametrize("code", [400, 409])
def test_a_metadata_document_read_refused_with_400_or_409_is_a_cloudio_error(gcs_emulator, gcs_bucket,
                                                                             fault_proxy, code):
    """The array's zarr.json GET (JournaledStore.get -> fast.get_into, cloudio's own connections, not gcsfs's
    session) is refused with 400/409: load_array raises gcsfs's bare HttpError instead of a CloudioError
    naming the store."""
    url = f"{gcs_bucket}/refdoc.zarr"
    cloudio.save_array(_data("float32"), url, chunks=CHUNKS, shards=SHARDS, compressors=None)
    last_seen.forget_all()
    fault_proxy.add("status", code=code, method="GET", path=r"refdoc\.zarr%2Fzarr\.json", times=None)
    with pytest.raises(cloudio.CloudioError, match=r"refdoc\.zarr") as info:
        cloudio.load_array(url)
    assert info.value.__cause__ is not None


def test_a_commit_whose_marker_delete_is_refused_with_409_is_a_cloudio_error(gcs_emulator, gcs_bucket, fault_proxy):
    """save_array's commit deletes the write marker over a kept connection (fast.delete_object ->
    fast._changing -> gcsfs's validate_response). A 409 (a 403 is already covered) comes out of
    save_array as gcsfs's bare HttpError: not a CloudioError, and nothing tells the caller that the
    store now stays marked incomplete (load_array refuses it) until it is written again."""
    url = f"{gcs_bucket}/commit409.zarr"
    fault_proxy.add("status", code=409, method="DELETE", path=r"commit409\.zarr%2F\.cloudio", times=None)
    with pytest.raises(cloudio.CloudioError, match=r"commit409\.zarr") as info:
        cloudio.save_array(np.ones((40, 40), "i4"), url, chunks=(10, 10), shards=(20, 20))
    assert info.value.__cause__ is not None


@pytest.mark.parametrize("op", ["ls", "du"])
def test_a_refused_listing_names_the_prefix_listed_not_the_bucket(gcs_emulator, gcs_bucket, fault_proxy, op):
    """A listing of gs://b/d refused (409) is a ReadError, but it names ``gs://b/`` (the bucket), not
    the URL asked for: _request_url reads the object from the HTTP path only, and a listing names its
    prefix in the query (``?prefix=d/``)."""
    b = gcs_bucket[len("gs://"):]
    fs = cloudio.filesystem(gcs_bucket)
    fs.pipe(f"{b}/d/r.bin", b"r" * 1000)
    fs.invalidate_cache()
    fault_proxy.add("status", code=409, method="GET", times=None)
    with pytest.raises(cloudio.CloudioError, match=f"gs://{b}/d"):
        getattr(fs, op)(f"{b}/d")
