"""cloudio's own uploads (its transport's one-request uploads from sender threads: every Zarr shard or chunk
``save_array`` and ``to_zarr`` store, and ``cloudio._gcs.transfer.upload``'s guarded ones) over a slow but steady
uplink: not given up while their bytes go out, however long that takes; given up once nothing moved for the
limit. A relay in front of the real emulator sets the rate."""

from __future__ import annotations

import os

import numpy as np
import pytest
from outcomes import bounded
from relay import BIG, CALL_LIMIT, SLOW_TIMEOUT, UP, Relay

import cloudio
from cloudio._gcs.client import TOTAL_FACTOR
from cloudio._gcs.transfer import upload


def test_a_large_shard_going_out_slowly_is_stored_whole(gcs_emulator, gcs_bucket, slow_link):
    """``save_array`` of one 48 MiB shard at 4 MiB/s: it was given up at the call limit (TransientError "upload
    failed past the retries (TimeoutError: no answer)" after 7 s, sent three times) while its bytes went out."""
    data = np.frombuffer(os.urandom(BIG), dtype="u1")
    url = f"{gcs_bucket}/big.zarr"
    with Relay(gcs_emulator.url, up=UP, piece=64 << 10, needle=b"big.zarr%2Fc%2F0") as relay:
        _, error, took = bounded(lambda: cloudio.save_array(data, url, chunks=data.shape), 120)
    assert error is None, repr(error)
    assert took > CALL_LIMIT + 2, f"took {took:.1f} s: not an upload longer than the limit"
    assert relay.seen == 1  # sent once
    np.testing.assert_array_equal(cloudio.load_array(url), data)


def test_a_large_guarded_upload_going_out_slowly_is_stored_whole(gcs_emulator, gcs_bucket, slow_link):
    """A guarded upload of 48 MiB in one request (``if_generation_match``) at 4 MiB/s."""
    data = os.urandom(BIG)
    url = f"{gcs_bucket}/big.bin"
    with Relay(gcs_emulator.url, up=UP, piece=64 << 10, needle=b"POST /upload/") as relay:
        _, error, took = bounded(lambda: upload(data, url, if_generation_match=0, simple_limit=2 * BIG), 120)
    assert error is None, repr(error)
    assert took > CALL_LIMIT + 2, f"took {took:.1f} s: not an upload longer than the limit"
    assert relay.seen == 1
    assert cloudio.filesystem(url).cat(url) == data


def test_a_large_upload_the_server_stops_taking_is_given_up_at_the_limit(gcs_emulator, gcs_bucket, slow_link):
    """The server takes none of the shard's bytes (what the kernel holds aside): given up once nothing moved for
    the call limit, with TransientError naming the object; the store stays marked incomplete."""
    data = np.frombuffer(os.urandom(16 << 20), dtype="u1")
    url = f"{gcs_bucket}/deaf.zarr"
    with Relay(gcs_emulator.url, piece=64 << 10, deaf_to=rb"POST [^\r\n]*deaf.zarr%2Fc%2F0") as deaf:
        _, error, took = bounded(lambda: cloudio.save_array(data, url, chunks=data.shape), 60)
        assert deaf.deafened >= 1
    assert isinstance(error, cloudio.TransientError), repr(error)
    assert f"{url}/c/0" in str(error)
    assert TOTAL_FACTOR * SLOW_TIMEOUT - 0.5 < took < CALL_LIMIT * 1.5 + 2, f"took {took:.1f} s"
    with pytest.raises(cloudio.IncompleteWriteError):
        cloudio.load_array(url)
