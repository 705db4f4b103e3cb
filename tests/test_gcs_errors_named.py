"""cloudio's GCS client and transfers name every failure: a not-found diagnosis whose bucket request fails past
the retries, an object's metadata refused, a refused read of a Zarr store (one text with the other faces'), and
no repeated metadata request in an upload. Found by a review; each test failed before its fix.

Faults come from the proxy in front of the real emulator (tests/faultproxy.py). The promise under test
(README "Reliability", docs/design.md, docs/guide.md's error table): every error is a ``cloudio.CloudioError``
naming the gs:// URL and a next step, with the library's error as ``__cause__``.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
from outcomes import returned

import cloudio
from cloudio._gcs import client, transfer
from cloudio._paths import parse_gcs
from cloudio._zarr import last_seen

#: the next step of every refused read, on every face (client.read_refused)
READ_AGAIN = "Check the URL and that your credentials may read it, then read again."


def _bucket_get(gcs_bucket: str) -> str:
    """The proxy's pattern for the bucket's own metadata request (``GET /storage/v1/b/<bucket>``)."""
    return rf"/storage/v1/b/{re.escape(gcs_bucket.removeprefix('gs://'))}(\?|$)"


# -- task 1: not_found's bucket request -------------------------------------------------------------------


def test_a_download_of_a_missing_object_whose_bucket_request_answers_503_is_a_transient_error(
        gcs_emulator, gcs_bucket, fault_proxy, quick_retries, tmp_path):
    """The object's metadata GET answers 404, and the bucket GET made to tell a missing bucket from a missing
    object answers 503 past gcsfs's retries: TransientError naming the URL, gcsfs's HttpError as its cause (it
    was that bare HttpError, neither a CloudioError nor an OSError)."""
    url = f"{gcs_bucket}/missing/never.bin"
    n = len(fault_proxy.requests())
    fault_proxy.add("status", code=503, method="GET", path=_bucket_get(gcs_bucket), times=None)
    with pytest.raises(cloudio.TransientError, match=re.escape(url)) as info:
        returned(lambda: transfer.download(url, tmp_path / "never.bin"))
    assert "retry later" in str(info.value)
    assert client.is_http_error(info.value.__cause__)
    asked = [s for m, _, s in fault_proxy.requests(_bucket_get(gcs_bucket))[n:] if m == "GET"]
    assert asked and set(asked) == {503}, asked
    assert not (tmp_path / "never.bin").exists()


def test_not_found_still_tells_a_missing_bucket_and_a_missing_object(gcs_emulator, gcs_bucket, fault_proxy):
    """Unchanged: no fault, a missing object in an existing bucket is ObjectNotFoundError, a missing bucket
    BucketNotFoundError; one bucket request each."""
    path = parse_gcs(f"{gcs_bucket}/nope.bin")
    err = client.not_found(path)
    assert type(err) is cloudio.ObjectNotFoundError and path.url in str(err)
    gone = parse_gcs("gs://no-such-bucket-for-cloudio-tests/x.bin")
    assert isinstance(client.not_found(gone), cloudio.BucketNotFoundError)


# -- task 2: one object_metadata, its failures cloudio's ---------------------------------------------------


@pytest.mark.parametrize("code", [403, 401])
def test_object_metadata_refused_is_a_read_error_naming_the_url(gcs_emulator, gcs_bucket, fault_proxy, code):
    """The object's metadata GET refused (403, 401): ReadError naming the URL and the next step, gcsfs's error
    as its cause (it was gcsfs's bare OSError 'Forbidden: ...' or HttpError)."""
    url = f"{gcs_bucket}/meta/refused.bin"
    transfer.upload(b"x" * 100, url)
    fault_proxy.add("status", code=code, method="GET", path=r"/o/meta%2Frefused\.bin", times=None)
    with pytest.raises(cloudio.ReadError, match=re.escape(url)) as info:
        returned(lambda: client.object_metadata(parse_gcs(url)))
    assert READ_AGAIN in str(info.value)
    assert info.value.__cause__ is not None and not isinstance(info.value.__cause__, cloudio.CloudioError)
    assert not isinstance(info.value, cloudio.TransientError)


def test_object_metadata_of_a_missing_object_and_past_the_retries_are_cloudio_errors(
        gcs_emulator, gcs_bucket, fault_proxy, quick_retries):
    """A missing object is ObjectNotFoundError naming the URL, with no bucket request unless asked to diagnose
    (GDAL's callers diagnose themselves); diagnosed, a missing bucket is BucketNotFoundError (it was gcsfs's bare
    FileNotFoundError naming the HTTP path). A metadata GET answered 503 past the retries is TransientError (it
    was gcsfs's bare HttpError)."""
    missing = f"{gcs_bucket}/meta/none.bin"
    n = len(fault_proxy.requests())
    with pytest.raises(cloudio.ObjectNotFoundError, match=re.escape(missing)) as info:
        returned(lambda: client.object_metadata(parse_gcs(missing)))
    assert isinstance(info.value.__cause__, FileNotFoundError)
    assert not fault_proxy.requests(_bucket_get(gcs_bucket))[n:]
    with pytest.raises(cloudio.BucketNotFoundError, match="no-such-bucket-for-cloudio-tests"):
        returned(lambda: client.object_metadata(parse_gcs("gs://no-such-bucket-for-cloudio-tests/x.bin"),
                                                diagnose=True))
    url = f"{gcs_bucket}/meta/busy.bin"
    transfer.upload(b"y" * 100, url)
    fault_proxy.add("status", code=503, method="GET", path=r"/o/meta%2Fbusy\.bin", times=None)
    with pytest.raises(cloudio.TransientError, match=re.escape(url)) as busy:
        returned(lambda: client.object_metadata(parse_gcs(url)))
    assert client.is_http_error(busy.value.__cause__)


def test_object_metadata_is_one_function():
    """transfer's object_metadata is client's (it was a second function of that name wrapping the first)."""
    assert transfer.object_metadata is client.object_metadata


# -- task 3: one text for a refused read ------------------------------------------------------------------


def test_a_refused_zarr_read_says_what_a_refused_get_says(gcs_emulator, gcs_bucket, fault_proxy):
    """A Zarr read refused (403) and a tracked filesystem's get refused (403) give the same next step
    (the store had a text of its own: 'check that the credentials in use may read this bucket')."""
    url = f"{gcs_bucket}/same.zarr"
    cloudio.save_array(np.ones((40, 40), "f4"), url, chunks=(20, 20), compressors=None)
    last_seen.forget_all()
    other = f"{gcs_bucket}/same/o.bin"
    fs = cloudio.filesystem(other)
    fs.pipe(other, b"z" * 100)
    fault_proxy.add("status", code=403, method="GET", path=r"same\.zarr%2Fc%2F", times=None)
    fault_proxy.add("status", code=403, method="GET", path=r"same%2Fo\.bin", times=None)
    with pytest.raises(cloudio.ReadError, match=r"same\.zarr") as store_refused:
        returned(lambda: cloudio.load_array(url))
    with pytest.raises(cloudio.ReadError, match=re.escape(other)) as get_refused:
        returned(lambda: fs.cat(other))
    assert READ_AGAIN in str(store_refused.value) and READ_AGAIN in str(get_refused.value)
    assert "the server refused a read" in str(store_refused.value)
    assert store_refused.value.__cause__ is not None
