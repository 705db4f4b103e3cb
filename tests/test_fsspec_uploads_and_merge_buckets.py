"""The fsspec face: a merge whose sources are in another bucket, and long uploads over a slow uplink.

GCS composes objects of one bucket only, and gcsfs's ``merge`` sends each source's key alone, in the target's
bucket: a merge of another bucket's objects composed the target bucket's objects of the same keys (wrong bytes,
silently) or failed naming objects the caller never named. cloudio refuses it before any request.

A call through a tracked filesystem is given up once nothing moved for its limit: bytes sent count as much as
bytes received, so an upload over a slow but steady uplink is not cut short, and one the server stops reading is.
"""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any

import pytest

import cloudio


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
# a merge of another bucket's objects
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def other(gcs_emulator: Any) -> str:
    """A second bucket, as an fsspec path."""
    return str(gcs_emulator.create_bucket(f"test-{uuid.uuid4().hex[:16]}"))[len("gs://"):]


@pytest.mark.parametrize("spelled", ["gs://", ""])
@pytest.mark.parametrize("which", ["all", "one"])
def test_a_merge_of_another_buckets_objects_is_refused_before_any_request(fault_proxy, b, other, journal_records,
                                                                          spelled, which):
    """Both buckets hold ``x`` and ``y``, with different bytes. Merging the other bucket's into this one composed
    this bucket's ``x`` and ``y`` (gcsfs sends keys only): the target held the wrong bytes and no error was
    raised. Now InvalidURLError naming the target and the other bucket, and saying to copy the sources first;
    no request sent, nothing journaled, no target."""
    fs = cloudio.filesystem(f"gs://{b}")
    fs.pipe({f"{b}/x": b"this bucket's x,", f"{b}/y": b"this bucket's y",
             f"{other}/x": b"the other's x,", f"{other}/y": b"the other's y"})
    sources = [f"{spelled}{other}/x", f"{spelled}{other}/y"] if which == "all" else \
        [f"{spelled}{b}/x", f"{spelled}{other}/y"]
    journal_records.clear()
    sent = len(fault_proxy.log)
    with pytest.raises(cloudio.InvalidURLError) as caught:
        fs.merge(f"{spelled}{b}/out", sources)
    message = str(caught.value)
    assert f"gs://{b}/out" in message and f"gs://{other}" in message, message
    assert "copy" in message.lower(), message
    assert isinstance(caught.value, ValueError)
    assert fault_proxy.log[sent:] == []
    assert journal_records == []
    assert not fs.exists(f"{b}/out")


def test_a_merge_within_one_bucket_spelled_either_way_still_composes(fault_proxy, b, other):
    """Sources named with and without ``gs://``, and a target bucket also holding the other bucket's keys:
    one compose request, the target holds the sources' bytes in order."""
    fs = cloudio.filesystem(f"gs://{b}")
    fs.pipe({f"{b}/x": b"this bucket's x,", f"{b}/y": b"this bucket's y", f"{other}/x": b"the other's x,"})
    fs.merge(f"gs://{b}/out", [f"{b}/x", f"gs://{b}/y"])
    assert fs.cat(f"{b}/out") == b"this bucket's x,this bucket's y"
    assert len(fault_proxy.requests(r"/compose")) == 1
