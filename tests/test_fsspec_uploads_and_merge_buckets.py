"""The fsspec face: a merge whose sources are in another bucket, and long uploads over a slow uplink.

GCS composes objects of one bucket only, and gcsfs's ``merge`` sends each source's key alone, in the target's
bucket: a merge of another bucket's objects composed the target bucket's objects of the same keys (wrong bytes,
silently) or failed naming objects the caller never named. cloudio refuses it before any request.

A call through a tracked filesystem is given up once nothing moved for its limit: bytes sent count as much as
bytes received, so an upload over a slow but steady uplink is not cut short, and one the server stops reading is.
"""

from __future__ import annotations

import os
import re
import uuid
from typing import Any

import pytest
from outcomes import bounded
from relay import BIG, CALL_LIMIT, UP, Relay

import cloudio

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


@pytest.mark.parametrize("target, sources, says", [
    ("{b}/out", [], "no sources"),
    ("{b}/out", iter([]), "no sources"),
    ("{b}", ["{b}/x", "{b}/y"], "names a bucket"),
    ("{b}/out", ["{b}", "{b}/y"], "names a bucket"),
    ("{b}/out", "{other}/x", "other"),  # one source, spelled as a string: its bucket, not its letters
])
def test_a_merge_of_no_objects_or_into_a_bucket_is_refused_before_any_request(fault_proxy, b, other, journal_records,
                                                                              target, sources, says):
    """An empty list (or generator) of sources composed an empty object, journaled as written; a target or a
    source naming a bucket was sent to gcsfs as an object with an empty name; one source given as a string was
    taken letter by letter (the refusal named buckets gs://g, gs://s, ...). Each is now InvalidURLError before any
    request, nothing journaled."""
    fs = cloudio.filesystem(f"gs://{b}")
    fs.pipe({f"{b}/x": b"x", f"{b}/y": b"y", f"{other}/x": b"x"})
    target = target.format(b=b, other=other)
    if isinstance(sources, str):
        sources = sources.format(b=b, other=other)
    elif isinstance(sources, list):
        sources = [s.format(b=b, other=other) for s in sources]
    journal_records.clear()
    sent = len(fault_proxy.log)
    with pytest.raises(cloudio.InvalidURLError) as caught:
        fs.merge(target, sources)
    message = str(caught.value)
    assert "nothing was sent or written" in message, message
    if says == "other":
        assert f"gs://{other}" in message and "gs://g," not in message, message
    else:
        assert says in message, message
    assert fault_proxy.log[sent:] == []
    assert journal_records == []
    assert not fs.exists(f"{b}/out")


def test_a_merge_of_one_source_given_as_a_string_copies_it(fault_proxy, b):
    fs = cloudio.filesystem(f"gs://{b}")
    fs.pipe(f"{b}/x", b"only x")
    fs.merge(f"{b}/out", f"gs://{b}/x")
    assert fs.cat(f"{b}/out") == b"only x"


def test_a_merge_within_one_bucket_spelled_either_way_still_composes(fault_proxy, b, other):
    """Sources named with and without ``gs://``, and a target bucket also holding the other bucket's keys:
    one compose request, the target holds the sources' bytes in order."""
    fs = cloudio.filesystem(f"gs://{b}")
    fs.pipe({f"{b}/x": b"this bucket's x,", f"{b}/y": b"this bucket's y", f"{other}/x": b"the other's x,"})
    fs.merge(f"gs://{b}/out", [f"{b}/x", f"gs://{b}/y"])
    assert fs.cat(f"{b}/out") == b"this bucket's x,this bucket's y"
    assert len(fault_proxy.requests(r"/compose")) == 1


# ---------------------------------------------------------------------------------------------
# long uploads over a slow uplink
# ---------------------------------------------------------------------------------------------


def _upload(fs: Any, url: str, data: bytes, how: str) -> None:
    if how == "pipe":  # one multipart upload
        fs.pipe(url, data)
    else:  # a resumable upload, its one chunk sent at close
        with fs.open(url, "wb", block_size=2 * len(data)) as f:
            f.write(data)


#: the request that carries the bytes of each kind of upload (its request line)
CARRIES = {"pipe": rb"POST [^\r\n]*uploadType=multipart", "open": rb"POST [^\r\n]*upload_id="}


# (in front of the emulator itself, not the fault proxy: a resumable upload's session URL then names the relay)
@pytest.mark.parametrize("how", ["pipe", "open"])
def test_a_long_upload_whose_bytes_keep_going_out_is_not_cut_short(gcs_emulator, b, slow_link, how):
    """An upload taking longer than the call limit in all, its bytes going out steadily, is stored whole: it was
    given up at the limit (TransientError, "no byte arrived") while its bytes still went out."""
    data = os.urandom(BIG)
    with Relay(gcs_emulator.url, up=UP, piece=64 << 10, needle=b"POST /upload/") as relay:
        fs = cloudio.filesystem(f"gs://{b}")  # (this endpoint's instance)
        _, error, took = bounded(lambda: _upload(fs, f"{b}/big.bin", data, how), 120)
    assert error is None, repr(error)
    assert took > CALL_LIMIT + 2, f"took {took:.1f} s: not an upload longer than the limit"
    assert relay.seen == {"pipe": 1, "open": 2}[how]  # never tried again (a resumable one: its start and chunk)
    assert cloudio.filesystem(f"gs://{b}").cat(f"{b}/big.bin") == data


@pytest.mark.parametrize("how", ["pipe", "open"])
def test_an_upload_the_server_stops_reading_is_given_up_at_the_limit(gcs_emulator, b, slow_link, how):
    """The server takes none of the upload's bytes (what the kernel holds aside, sent at once): given up once
    nothing moved for the call limit, with TransientError naming the object; nothing stored."""
    data = os.urandom(16 << 20)
    with Relay(gcs_emulator.url, piece=64 << 10, deaf_to=CARRIES[how]) as deaf:
        fs = cloudio.filesystem(f"gs://{b}")
        _, error, took = bounded(lambda: _upload(fs, f"{b}/deaf.bin", data, how), 60)
        assert deaf.deafened == 1
    assert isinstance(error, cloudio.TransientError), repr(error)
    assert f"gs://{b}/deaf.bin" in str(error)
    assert CALL_LIMIT - 0.5 < took < CALL_LIMIT * 1.25 + 2, f"took {took:.1f} s"
    assert not cloudio.filesystem(f"gs://{b}").exists(f"{b}/deaf.bin")


@pytest.mark.parametrize("how", ["pipe", "open"])
def test_an_upload_sent_in_pieces_is_sent_whole_again_when_retried(fault_proxy, b, quick_retries, how):
    """The body of an upload goes out in pieces (how its progress is seen); a try answered 503 is sent again,
    whole, from its start: the object holds exactly the bytes written."""
    data = os.urandom((1 << 20) + 12345)
    fault_proxy.add("status", code=503, method="POST", body=re.escape(data[-64:]))
    _upload(cloudio.filesystem(f"gs://{b}"), f"{b}/again.bin", data, how)
    assert [e[2] for e in fault_proxy.log if e[0] == "POST" and "upload" in e[1]][-2:] == [503, 200]
    assert cloudio.filesystem(f"gs://{b}").cat(f"{b}/again.bin") == data


@pytest.mark.parametrize("how", ["pipe", "open"])
def test_an_upload_never_answered_is_given_up_at_the_limit_though_each_try_sends_it_again(fault_proxy, b, slow_link,
                                                                                         how):
    """The server takes every byte of each try and never answers: gcsfs tries again (and again) once aiohttp's
    wait for an answer ends, each try sending the body anew. Bytes sent again are no progress: given up at the
    call limit, with TransientError naming the object, rather than when gcsfs's retries run out."""
    data = os.urandom(1 << 20)
    fault_proxy.add("hang", method="POST", body=re.escape(data[-64:]), times=None)
    fs = cloudio.filesystem(f"gs://{b}")
    _, error, took = bounded(lambda: _upload(fs, f"{b}/mute.bin", data, how), 120)
    assert isinstance(error, cloudio.TransientError), repr(error)
    assert f"gs://{b}/mute.bin" in str(error)
    assert len([e for e in fault_proxy.log if e[2] == "hang"]) >= 2  # tried again meanwhile
    assert CALL_LIMIT - 0.5 < took < CALL_LIMIT * 1.25 + 2, f"took {took:.1f} s"
