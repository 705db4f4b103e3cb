"""The fsspec face: a merge of a source that does not exist, and long reads over a slow link.

``merge`` (GCS compose) of a missing source: GCS answers 404, fake-gcs-server 500; cloudio names the missing
source either way (one metadata request per source, up to the first missing one), at once, rather than retrying a
500 until the time limit. A call through a tracked filesystem is bounded by the time no byte arrives, not by how
long it takes in all: a large read over a slow but steady link is not given up, one that stops is.
"""

from __future__ import annotations

import os
import re
import threading
import time
from typing import Any

import pytest
from relay import Relay

import cloudio
from cloudio._gcs.client import GCSFS_FIRST_RETRY_WAIT, TOTAL_FACTOR

#: a tracked call's limit at CLOUDIO_HTTP_TIMEOUT=1: no byte for 3 x 1 s and gcsfs's first wait
CALL_LIMIT = TOTAL_FACTOR * 1.0 + GCSFS_FIRST_RETRY_WAIT


@pytest.fixture
def quick(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLOUDIO_HTTP_TIMEOUT", "1")


def _run(fn: Any, seconds: float) -> tuple[Any, BaseException | None, float]:
    """``fn()`` in a daemon thread, waited for ``seconds`` at most: what it returned, raised, and how long it took
    (a hang fails the test instead of blocking the run)."""
    out: list[Any] = []
    t0 = time.monotonic()

    def run() -> None:
        try:
            out.append((fn(), None))
        except BaseException as e:
            out.append((None, e))
        out.append(time.monotonic() - t0)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    assert out, f"still running after {seconds} s"
    return out[0][0], out[0][1], out[1]


# ---------------------------------------------------------------------------------------------
# merge of a source that does not exist
# ---------------------------------------------------------------------------------------------


def _source_checks(fault_proxy: Any, b: str) -> list[Any]:
    """The metadata requests of the objects under ``m/`` (a merge's source checks)."""
    return fault_proxy.requests(rf"^/storage/v1/b/{b}/o/m%2F[^/?]+$")


@pytest.mark.parametrize("answer", ["emulator", 404, 503])
def test_a_merge_of_a_missing_source_names_it_at_once(fault_proxy, b, journal_records, quick, answer):
    """fake-gcs-server answers a compose of a missing source 500, GCS 404 (a 503 stands for a server that also
    has trouble): either way ObjectNotFoundError naming that source, within a second, nothing journaled at the
    target. It was a TransientError after gcsfs retried the 500 up to the time limit (a bare FileNotFoundError
    naming the HTTP path for GCS's 404)."""
    fs = cloudio.filesystem(f"gs://{b}")
    fs.pipe({f"{b}/m/a": b"a", f"{b}/m/c": b"c"})
    if answer != "emulator":
        fault_proxy.add("status", code=answer, method="POST", path=r"/compose", times=None)
    journal_records.clear()
    checks_before = len(_source_checks(fault_proxy, b))
    _, error, took = _run(lambda: fs.merge(f"{b}/m/out", [f"{b}/m/a", f"{b}/m/nope", f"{b}/m/c"]), 60)
    assert isinstance(error, cloudio.ObjectNotFoundError), repr(error)
    assert f"gs://{b}/m/nope" in str(error) and f"gs://{b}/m/out" in str(error)
    assert error.__cause__ is not None  # the server's own answer
    assert took < 1.5, f"took {took:.1f} s"
    assert len(fault_proxy.requests(r"/compose")) == 1
    # one metadata request per source, up to the first missing one
    assert len(_source_checks(fault_proxy, b)) - checks_before == 2
    assert [c for c in journal_records if c.url == f"gs://{b}/m/out"] == []
    assert not fs.exists(f"{b}/m/out")


def test_a_merge_that_fails_with_its_sources_there_stays_transient(fault_proxy, b, journal_records, quick_retries):
    """A 503 with every source present goes gcsfs's retries and ends in TransientError, as before; the sources
    are checked once (one request each)."""
    fs = cloudio.filesystem(f"gs://{b}")
    fs.pipe({f"{b}/m/a": b"a", f"{b}/m/c": b"c"})
    fault_proxy.add("status", code=503, method="POST", path=r"/compose", times=None)
    checks_before = len(_source_checks(fault_proxy, b))
    with pytest.raises(cloudio.TransientError, match=re.escape(f"gs://{b}/m/out")) as raised:
        fs.merge(f"{b}/m/out", [f"{b}/m/a", f"{b}/m/c"])
    assert "compose" not in str(raised.value)  # the object, not the HTTP path of its request
    assert len(_source_checks(fault_proxy, b)) - checks_before == 2
    assert len(fault_proxy.requests(r"/compose")) > 2  # retried


def test_a_merge_whose_first_try_fails_with_its_sources_there_is_retried(fault_proxy, b, journal_records):
    fs = cloudio.filesystem(f"gs://{b}")
    fs.pipe({f"{b}/m/a": b"a", f"{b}/m/c": b"c"})
    fault_proxy.add("status", code=503, method="POST", path=r"/compose", times=1)
    journal_records.clear()
    fs.merge(f"{b}/m/out", [f"{b}/m/a", f"{b}/m/c"])
    assert fs.cat(f"{b}/m/out") == b"ac"
    assert [c.kind for c in journal_records if c.url == f"gs://{b}/m/out"] == ["write"]


def test_a_merge_into_a_missing_bucket_names_the_bucket(fault_proxy, b, quick):
    fs = cloudio.filesystem(f"gs://{b}")
    gone = f"{b}-gone"[:63]
    _, error, took = _run(lambda: fs.merge(f"{gone}/out", [f"{gone}/a", f"{gone}/c"]), 60)
    assert isinstance(error, cloudio.BucketNotFoundError), repr(error)
    assert gone in str(error) and took < 1.5


# ---------------------------------------------------------------------------------------------
# long reads over a slow link
# ---------------------------------------------------------------------------------------------

#: 640 KiB at 64 KiB/s, 16 KiB every 0.25 s: about 10 s in all, never silent for the 1 s a read may wait
SLOW = 64 << 10
SIZE = 640 << 10


def _read(fs: Any, b: str, how: str, tmp_path: Any) -> bytes:
    if how == "cat":
        return bytes(fs.cat(f"{b}/s.bin"))
    if how == "range":
        return bytes(fs.cat_file(f"{b}/s.bin", start=0, end=SIZE))
    if how == "tail":
        return bytes(fs.cat_file(f"{b}/s.bin", start=-SIZE))
    if how == "open":
        with fs.open(f"{b}/s.bin", "rb", block_size=SIZE) as f:
            return bytes(f.read())
    fs.get(f"{b}/s.bin", str(tmp_path / "s.bin"))
    return (tmp_path / "s.bin").read_bytes()


@pytest.mark.parametrize("how", ["cat", "range", "tail", "open", "get"])
def test_a_long_read_whose_bytes_keep_arriving_is_not_cut_short(fault_proxy, b, tmp_path, quick, how):
    """A read taking twice the call limit in all, its bytes arriving steadily, returns them all: it was given up
    at the limit (TransientError, "no answer") while bytes still arrived."""
    data = os.urandom(SIZE)
    cloudio.filesystem(f"gs://{b}").pipe(f"{b}/s.bin", data)
    with Relay(fault_proxy.url, down=SLOW):
        fs = cloudio.filesystem(f"gs://{b}")  # (this endpoint's instance)
        out, error, took = _run(lambda: _read(fs, b, how, tmp_path), 60)
    assert error is None, repr(error)
    assert out == data
    assert took > CALL_LIMIT + 2, f"took {took:.1f} s: not a read longer than the limit"
    assert len(fault_proxy.requests(r"s\.bin\?alt=media")) == 1  # one request, never retried


@pytest.mark.parametrize("how", ["cat", "open"])
def test_a_long_read_that_stops_is_given_up_once_silent_for_the_limit(fault_proxy, b, tmp_path, quick, how):
    """Bytes arrive steadily for a while, then the answer stops (its connection open) and every retry is never
    answered: given up once no byte arrived for the call limit, with TransientError naming the object."""
    data = os.urandom(SIZE)
    cloudio.filesystem(f"gs://{b}").pipe(f"{b}/s.bin", data)
    fault_proxy.add("hang", method="GET", path=r"s\.bin\?alt=media", skip=1, times=None)  # the retries
    with Relay(fault_proxy.url, down=SLOW, needle=b"s.bin?alt=media", stall_after=SIZE // 2) as relay:
        fs = cloudio.filesystem(f"gs://{b}")
        _, error, took = _run(lambda: _read(fs, b, how, tmp_path), 60)
        assert relay.stalled == 1
    assert isinstance(error, cloudio.TransientError), repr(error)
    assert f"gs://{b}/s.bin" in str(error)
    # about 5 s of bytes, then no byte for the limit (sampled every quarter of it)
    assert 5 + CALL_LIMIT - 1 < took < 5 + CALL_LIMIT * 1.25 + 2, f"took {took:.1f} s"


def test_a_call_the_server_never_answers_is_given_up_at_the_limit(fault_proxy, b, quick):
    fs = cloudio.filesystem(f"gs://{b}")
    fs.pipe(f"{b}/h.bin", b"h")
    fault_proxy.add("hang", method="GET", path=r"h\.bin\?alt=media", times=None)
    _, error, took = _run(lambda: fs.cat(f"{b}/h.bin"), 60)
    assert isinstance(error, cloudio.TransientError) and f"gs://{b}/h.bin" in str(error), repr(error)
    assert CALL_LIMIT - 0.5 < took < CALL_LIMIT + 1, f"took {took:.1f} s"
