"""At a small ``CLOUDIO_HTTP_TIMEOUT``, a call through gcsfs's own requests still gets the retry gcsfs makes.

gcsfs waits ``random() + 1`` seconds (1 to 2 s) before its first retry. A whole call may take three times the
limit, retries included: at 1 s, a request given up at the limit left its retry between 0 and 1 s, none at all
after gcsfs's longest wait, and the call failed with TransientError though the server was answering again. The
tests pin gcsfs's wait at its longest.
"""

from __future__ import annotations

import gcsfs.retry
import pytest
from outcomes import bounded

import cloudio


@pytest.mark.parametrize("op", ["pipe", "cat"])
def test_a_request_given_up_at_a_one_second_limit_is_retried_after_gcsfs_longest_wait(
        gcs_emulator, gcs_bucket, fault_proxy, monkeypatch, op):
    monkeypatch.setenv("CLOUDIO_HTTP_TIMEOUT", "1")
    monkeypatch.setattr(gcsfs.retry.random, "random", lambda: 0.999)  # gcsfs then waits 2 s before retrying
    fs = cloudio.filesystem(gcs_bucket)
    path = f"{gcs_bucket}/slow.bin"
    if op == "cat":
        fs.pipe(path, b"stored")
    held = fault_proxy.add("delay", method="POST" if op == "pipe" else "GET",
                           path=r"/upload/" if op == "pipe" else r"slow\.bin", seconds=3, times=1)
    value, err, _ = bounded(lambda: fs.pipe(path, b"piped") if op == "pipe" else fs.cat(path))
    assert err is None, repr(err)
    assert held.hits == 1
    assert fs.cat(path) == (b"piped" if op == "pipe" else b"stored")
    if op == "cat":
        assert value == b"stored"
