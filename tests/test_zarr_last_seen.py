"""``load_array`` asks for a small array's chunks at once, as this process last wrote the array.

The guess is only ever a guess: whatever another writer did to the store
since, the load returns what the store holds now, or refuses it as an
incomplete write, exactly as a load that opened the array first.
"""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest
import zarr
from zarr.storage import FsspecStore

import cloudio
from cloudio._gcs.client import gcs_filesystem
from cloudio._paths import parse_gcs

MARKER = ".cloudio-write-in-progress"


def _other_writer(url: str) -> FsspecStore:
    """zarr on a gcsfs of its own: a writer cloudio hears nothing from."""
    p = parse_gcs(url)
    return FsspecStore(gcs_filesystem(asynchronous=True, skip_instance_cache=True), path=f"{p.bucket}/{p.key}")


def _chunk_gets(proxy, name: str) -> list:
    return [r for r in proxy.requests() if r[0] == "GET" and f"{name}%2Fc%2F" in r[1]]


def _listings(requests: list, name: str) -> list:
    return [r for r in requests if r[0] == "GET" and f"/o?prefix={name}%2F" in r[1]]


def test_the_chunks_are_asked_for_while_the_check_of_the_array_seen_is_on_its_way(gcs_bucket, fault_proxy):
    """The listing that checks the marker and zarr.json's generation is held back: every chunk of the array
    is asked for, and answered, meanwhile; neither the marker nor zarr.json is read."""
    url = f"{gcs_bucket}/seen.zarr"
    data = np.arange(200 * 300, dtype="f4").reshape(200, 300)
    cloudio.save_array(data, url, chunks=(100, 100))  # 6 chunk objects
    release = threading.Event()
    fault_proxy.add("late", method="GET", path=r"/o\?prefix=seen\.zarr%2F", release=release)
    before = len(fault_proxy.requests())
    got: dict[str, np.ndarray] = {}
    reader = threading.Thread(target=lambda: got.update(out=cloudio.load_array(url)))
    reader.start()
    try:
        deadline = time.monotonic() + 10
        while len(_chunk_gets(fault_proxy, "seen.zarr")) < 6 and time.monotonic() < deadline:
            time.sleep(0.02)
        meanwhile = len(_chunk_gets(fault_proxy, "seen.zarr"))
    finally:
        release.set()
        reader.join(30)
    assert meanwhile == 6
    np.testing.assert_array_equal(got["out"], data)
    load = fault_proxy.requests()[before:]
    assert len([r for r in load if r[0] == "GET"]) == 6 + 1  # the chunks once each (the guess held), the listing
    assert len(_listings(load, "seen.zarr")) == 1


class _HalfWritten:
    """Another process's save_array of ones over zeros, half done: its marker up, its zarr.json written again
    (the same bytes, a new generation, as save_array does) and the first half of the chunks new."""

    def __init__(self, emu, url: str) -> None:
        p = parse_gcs(url)
        bucket = emu.client.bucket(p.bucket)
        entry = {"host": "elsewhere", "pid": 7, "time": "2026-12-04T00:00:00+00:00", "operation": "save_array"}
        self.marker = bucket.blob(f"{p.key}/{MARKER}")
        self.marker.upload_from_string(json.dumps({**entry, "writers": [entry]}))
        doc = bucket.blob(f"{p.key}/zarr.json")
        doc.upload_from_string(doc.download_as_bytes())
        self.array = zarr.open_array(_other_writer(url), mode="r+")
        self.array[:100, :] = 1

    def read_while_it_ends(self, url: str) -> None:
        """A load begun now; the write ends half a second later. The load refuses the store (as a read that
        opened it first, while the marker was up) or returns the new array whole: never half of each."""
        got: dict[str, object] = {}

        def read() -> None:
            try:
                got["out"] = cloudio.load_array(url)
            except cloudio.CloudioError as e:
                got["error"] = e

        reader = threading.Thread(target=read)
        reader.start()
        time.sleep(0.5)  # the chunks are read by now; the check is held
        self.array[100:, :] = 1
        self.marker.delete()
        reader.join(30)
        if "error" in got:
            assert isinstance(got["error"], cloudio.IncompleteWriteError), got
        else:
            np.testing.assert_array_equal(got["out"], np.ones((200, 300), "f4"))


def test_a_write_under_way_when_the_read_began_is_never_mixed_into_it(gcs_emulator, gcs_bucket, fault_proxy):
    """Another process's save_array is half done (marker up, zarr.json written again, half the chunks new)
    when the read begins; the check's answer comes only after that write finished and took its marker
    down. The read refuses the store (as a read that opened it first, while the marker was up) or returns
    the new array whole: never half of each."""
    url = f"{gcs_bucket}/torn.zarr"
    cloudio.save_array(np.zeros((200, 300), "f4"), url, chunks=(100, 100), compressors=None)
    other = _HalfWritten(gcs_emulator, url)
    fault_proxy.add("delay", method="GET", path=r"/o\?prefix=torn\.zarr%2F", seconds=1.0)
    other.read_while_it_ends(url)


def test_an_array_reshaped_by_another_writer_reads_as_it_is_now(gcs_emulator, gcs_bucket):
    url = f"{gcs_bucket}/reshaped.zarr"
    cloudio.save_array(np.ones((200, 300), "f4"), url, chunks=(100, 100))
    new = np.arange(300 * 100, dtype="i2").reshape(300, 100)
    zarr.create_array(_other_writer(url), data=new, chunks=(50, 50), overwrite=True)
    n = len(gcs_emulator.requests())
    out = cloudio.load_array(url)
    assert out.dtype == new.dtype
    np.testing.assert_array_equal(out, new)
    # the guess's chunks, then the array's own: c/0/0 is both a guessed and a real chunk
    assert sum("%2Fc%2F0%2F0" in r.path for r in gcs_emulator.requests()[n:] if r.method == "GET") >= 1


@pytest.mark.parametrize("change", ["dtype", "fill_value"])
def test_an_array_whose_chunks_decode_either_way_reads_as_it_is_now(gcs_bucket, change):
    """Another writer keeps every chunk's size: as i4 instead of f4, or with a fill value of 7 and chunks of
    nothing but it left out. Read under the guess, the values would be wrong, and nothing would fail."""
    url = f"{gcs_bucket}/{change}.zarr"
    cloudio.save_array(np.ones((200, 300), "f4"), url, chunks=(100, 100), compressors=None)
    if change == "dtype":
        new = np.arange(200 * 300, dtype="i4").reshape(200, 300)
        zarr.create_array(_other_writer(url), data=new, chunks=(100, 100), overwrite=True, compressors=None)
    else:
        new = np.full((200, 300), 7, "f4")
        new[:100, :100] = 1
        z = zarr.create_array(_other_writer(url), shape=new.shape, dtype="f4", chunks=(100, 100), fill_value=7,
                              overwrite=True, compressors=None)
        z[:100, :100] = 1  # one chunk stored, five left to the fill value
    out = cloudio.load_array(url)
    assert out.dtype == new.dtype
    np.testing.assert_array_equal(out, new)


def test_new_values_under_the_same_zarr_json_are_read(gcs_bucket):
    url = f"{gcs_bucket}/revalued.zarr"
    data = np.arange(200 * 300, dtype="f4").reshape(200, 300)
    cloudio.save_array(data, url, chunks=(100, 100))
    np.testing.assert_array_equal(cloudio.load_array(url), data)
    zarr.open_array(_other_writer(url), mode="r+")[100:, :] = -1  # same zarr.json, chunks c/1/* rewritten
    want = data.copy()
    want[100:, :] = -1
    np.testing.assert_array_equal(cloudio.load_array(url), want)


def test_a_marker_left_by_another_writer_is_refused_under_the_zarr_json_seen(gcs_emulator, gcs_bucket):
    url = f"{gcs_bucket}/left.zarr"
    cloudio.save_array(np.zeros((200, 300), "f4"), url, chunks=(100, 100))
    entry = {"host": "elsewhere", "pid": 7, "time": "2026-12-04T00:00:00+00:00", "operation": "save_array"}
    p = parse_gcs(f"{url}/{MARKER}")
    gcs_emulator.client.bucket(p.bucket).blob(p.key).upload_from_string(json.dumps({**entry, "writers": [entry]}))
    with pytest.raises(cloudio.IncompleteWriteError, match=r"left\.zarr.*by elsewhere \(pid 7, save_array\)"):
        cloudio.load_array(url)


def test_a_zarr_json_another_writer_grew_is_read_the_usual_way(gcs_bucket):
    """Another writer's attributes make zarr.json far larger (a new generation): the array is opened again."""
    url = f"{gcs_bucket}/grown.zarr"
    data = np.arange(20 * 30, dtype="u1").reshape(20, 30)
    cloudio.save_array(data, url, chunks=(10, 10))
    z = zarr.open_array(_other_writer(url), mode="r+")
    z.attrs["notes"] = "x" * (200 * 1024)
    out = cloudio.load_array(url)
    np.testing.assert_array_equal(out, data)
    assert len(zarr.open_array(cloudio.zarr_store(url, read_only=True), mode="r").attrs["notes"]) == 200 * 1024


def test_a_chunk_that_does_not_decode_under_the_guess_is_read_the_usual_way(gcs_bucket):
    """Another writer changed the compressor: the guessed (raw) decoding fails on the new zstd chunks, and the
    array is read again under the zarr.json it now has."""
    url = f"{gcs_bucket}/recoded.zarr"
    data = np.arange(200 * 300, dtype="f4").reshape(200, 300)
    cloudio.save_array(data, url, chunks=(100, 100))
    zarr.create_array(_other_writer(url), data=data * 2, chunks=(100, 100), overwrite=True,
                      compressors=zarr.codecs.ZstdCodec(level=1))
    np.testing.assert_array_equal(cloudio.load_array(url), data * 2)


def test_a_server_failing_past_the_retries_is_asked_no_more_than_without_a_guess(gcs_bucket, fault_proxy,
                                                                                   monkeypatch):
    """The batch's TransientError is the load's: the chunk is not asked for again the usual way."""
    import cloudio._gcs.fast
    from cloudio._zarr import last_seen

    monkeypatch.setattr(cloudio._gcs.fast, "BACKOFF", 0.01)
    url = f"{gcs_bucket}/down.zarr"
    cloudio.save_array(np.zeros((200, 300), "f4"), url, chunks=(100, 100))
    fault_proxy.add("status", code=503, method="GET", path=r"down\.zarr%2Fc%2F1%2F1", times=None)
    asked = []
    for guess in (True, False):
        if not guess:
            last_seen.forget_all()
        before = len(fault_proxy.requests(r"down\.zarr%2Fc%2F1%2F1"))
        with pytest.raises(cloudio.TransientError, match=r"down\.zarr/c/1/1"):
            cloudio.load_array(url)
        asked.append(len(fault_proxy.requests(r"down\.zarr%2Fc%2F1%2F1")) - before)
    assert asked[0] == asked[1] > 1


def test_a_lent_output_read_under_the_guess_holds_the_new_array_only(gcs_bucket, monkeypatch):
    """A dropped output's memory, which a read under the guess may be lent, ends with every element the new
    array's: the fill value where no chunk is stored."""
    import gc

    from cloudio._zarr import arrays, last_seen

    monkeypatch.setattr(arrays, "_PREFAULT_MIN_BYTES", 1 << 20)
    data = np.random.default_rng(8).standard_normal((1024, 1024)).astype("f4")
    cloudio.save_array(data, f"{gcs_bucket}/full.zarr", chunks=(256, 256))  # 16 chunk objects of 256 KiB
    sparse = np.full((1024, 1024), 3, "f4")
    sparse[:10, :10] = 7
    cloudio.save_array(sparse, f"{gcs_bucket}/sparse.zarr", chunks=(256, 256), fill_value=3)  # one chunk stored
    last_seen.forget_all()
    first = cloudio.load_array(f"{gcs_bucket}/full.zarr")  # opened first: its output is cloudio's to lend
    assert first.tobytes() == data.tobytes()
    del first
    gc.collect()
    again = cloudio.load_array(f"{gcs_bucket}/sparse.zarr")
    assert again.tobytes() == sparse.tobytes()


def test_a_read_refused_during_another_write_leaves_no_guess_for_the_next(gcs_emulator, gcs_bucket, fault_proxy):
    """A read refused while another process's save_array is half done has seen that write's zarr.json; the
    next read, begun while the write is still under way, must not take it as the array's."""
    from cloudio._zarr import last_seen

    url = f"{gcs_bucket}/again.zarr"
    cloudio.save_array(np.zeros((200, 300), "f4"), url, chunks=(100, 100), compressors=None)
    last_seen.forget_all()  # a store this process did not write
    other = _HalfWritten(gcs_emulator, url)
    with pytest.raises(cloudio.IncompleteWriteError, match=r"again\.zarr"):
        cloudio.load_array(url)
    fault_proxy.add("delay", method="GET", path=r"/o\?prefix=again\.zarr%2F", seconds=1.0)
    other.read_while_it_ends(url)


def test_an_error_under_a_guess_that_held_is_raised_without_reading_again(gcs_bucket, fault_proxy):
    """A chunk too large to be part of the array, under a zarr.json the listing confirms: the read's own
    IntegrityError, and the array not read again the usual way (its good chunk c/0/0 asked for once)."""
    url = f"{gcs_bucket}/once.zarr"
    cloudio.save_array(np.zeros((200, 300), "f4"), url, chunks=(100, 100), compressors=None)
    cloudio.filesystem(url).pipe(f"{url}/c/1/0", b"\x00" * 100_000)
    before = len(fault_proxy.requests(r"once\.zarr%2Fc%2F0%2F0"))
    with pytest.raises(cloudio.IntegrityError, match=r"once\.zarr/c/1/0: the object holds"):
        cloudio.load_array(url)
    assert len(fault_proxy.requests(r"once\.zarr%2Fc%2F0%2F0")) - before == 1


def test_a_guess_another_writer_proved_wrong_is_not_tried_again(gcs_bucket, fault_proxy):
    """Another writer rewrote the array (a new zarr.json): the first load reads the guessed chunks, finds the
    guess wrong and reads the array again; every later load opens it first, each chunk asked for once."""
    url = f"{gcs_bucket}/proved.zarr"
    cloudio.save_array(np.zeros((200, 300), "f4"), url, chunks=(100, 100), compressors=None)
    zarr.create_array(_other_writer(url), data=np.ones((200, 300), "f4"), chunks=(100, 100), overwrite=True,
                      compressors=None)
    np.testing.assert_array_equal(cloudio.load_array(url), 1)
    before = len(fault_proxy.requests(r"proved\.zarr%2Fc%2F0%2F0"))
    np.testing.assert_array_equal(cloudio.load_array(url), 1)
    assert len(fault_proxy.requests(r"proved\.zarr%2Fc%2F0%2F0")) - before == 1
    assert not _listings(fault_proxy.requests()[-8:], "proved.zarr")  # no check: nothing guessed


def test_a_listing_refused_ends_the_guess(gcs_bucket, fault_proxy):
    """Credentials that may read objects but not list them (403 on the check's listing): the load reads the
    array the usual way, and the next one does not guess (nor list) again."""
    url = f"{gcs_bucket}/unlisted.zarr"
    data = np.arange(200 * 300, dtype="f4").reshape(200, 300)
    cloudio.save_array(data, url, chunks=(100, 100), compressors=None)
    fault_proxy.add("status", method="GET", path=r"/o\?prefix=unlisted\.zarr%2F", code=403, times=None)
    np.testing.assert_array_equal(cloudio.load_array(url), data)
    before = len(fault_proxy.requests())
    np.testing.assert_array_equal(cloudio.load_array(url), data)
    load = fault_proxy.requests()[before:]
    assert not _listings(load, "unlisted.zarr")
    assert len([r for r in load if "unlisted.zarr%2Fc%2F0%2F0" in r[1]]) == 1
