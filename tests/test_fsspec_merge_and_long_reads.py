"""The fsspec face: a merge of a source that does not exist.

``merge`` (GCS compose) of a missing source: GCS answers 404, fake-gcs-server 500; cloudio names the missing
source either way (one metadata request per source, up to the first missing one), at once, rather than retrying a
500 until the time limit.
"""

from __future__ import annotations

import re
import threading
import time
from typing import Any

import pytest

import cloudio


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
    with pytest.raises(cloudio.TransientError, match=re.escape(f"gs://{b}/m/out")):
        fs.merge(f"{b}/m/out", [f"{b}/m/a", f"{b}/m/c"])
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
