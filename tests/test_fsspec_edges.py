"""The fsspec face at the edges: answers lost, another writer before the check, overwrites while open, refusals."""

from __future__ import annotations

import threading

import pytest
from rasters import overwritten_behind_a_listing
from rasters import put as _put

import cloudio
from cloudio._journal import journal

# ---------------------------------------------------------------------------------------------
# a write whose answer was lost: the server changed, the journal must say so
# ---------------------------------------------------------------------------------------------


def test_pipe_whose_answer_is_lost_still_invalidates_other_instances(fault_proxy, gcs_emulator, b, user_fs,
                                                                     monkeypatch):
    monkeypatch.setenv("CLOUDIO_HTTP_TIMEOUT", "1")
    fs = cloudio.filesystem(f"gs://{b}")
    fs.pipe(f"{b}/d/a.bin", b"1" * 10)
    assert user_fs.ls(f"{b}/d", detail=True)[0]["size"] == 10  # the user's instance caches d/

    fault_proxy.add("reset", method="POST", path=r"/upload/", times=None)  # stored, answer lost
    seq = journal().seq
    with pytest.raises(cloudio.TransientError):
        fs.pipe(f"{b}/d/a.bin", b"2" * 100)
    fault_proxy.clear()

    assert gcs_emulator.client.bucket(b).get_blob("d/a.bin").size == 100  # it landed
    assert user_fs.info(f"{b}/d/a.bin")["size"] == 100  # stale: 10 (nothing was journaled)
    with user_fs.open(f"{b}/d/a.bin", "rb") as f:
        assert f.read() == b"2" * 100  # stale size: 10 new bytes, silently truncated
    assert [c.kind for c in journal().since(seq)] == ["invalidate"]  # as put_verified does


def test_rm_whose_answer_is_lost_still_journals_the_delete(fault_proxy, gcs_emulator, b, user_fs):
    fs = cloudio.filesystem(f"gs://{b}")
    fs.pipe({f"{b}/d/a.bin": b"a", f"{b}/d/b.bin": b"b"})
    assert user_fs.ls(f"{b}/d") == [f"{b}/d/a.bin", f"{b}/d/b.bin"]

    fault_proxy.add("reset", method="DELETE", path=r"/o/d%2Fa\.bin", times=1)  # deleted, answer lost
    seq = journal().seq
    with pytest.raises(FileNotFoundError):  # gcsfs's retry of the DELETE finds it gone (a 404)
        fs.rm(f"{b}/d/a.bin")
    fault_proxy.clear()

    assert gcs_emulator.client.bucket(b).get_blob("d/a.bin") is None  # gone on the server
    assert user_fs.ls(f"{b}/d") == [f"{b}/d/b.bin"]  # stale: a.bin still listed
    assert not user_fs.exists(f"{b}/d/a.bin")
    assert [(c.url, c.kind) for c in journal().since(seq)] == [(f"gs://{b}/d/a.bin", "delete")]


# ---------------------------------------------------------------------------------------------
# put verifies with a separate metadata GET: it can see (and delete) another writer's object
# ---------------------------------------------------------------------------------------------


def _write_across(fault_proxy, gcs_emulator, b: str, key: str, upload_path: str, write,
                  skip: int = 0) -> list[BaseException]:
    """``write()`` (through cloudio) whose upload the server stores, and whose answer reaches cloudio only
    after another writer (google-cloud-storage, straight to the emulator) stored ``b"theirs"`` there (the
    first ``skip`` upload requests answered at once)."""
    release = threading.Event()
    rule = fault_proxy.add("late", method="POST", path=upload_path, release=release, seconds=30, skip=skip)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            write()
        except BaseException as e:
            errors.append(e)

    t = threading.Thread(target=run)
    t.start()
    try:
        assert rule.answered.wait(20), "the upload never reached the emulator"
        gcs_emulator.client.bucket(b).blob(key).upload_from_string(b"theirs")  # the other writer, last
    finally:
        release.set()
        t.join(30)
    assert not t.is_alive()
    return errors


def test_put_does_not_delete_an_object_another_writer_stored_right_after_it(fault_proxy, gcs_emulator, b,
                                                                            tmp_path):
    fs = cloudio.filesystem(f"gs://{b}")
    local = tmp_path / "p.bin"
    local.write_bytes(b"mine" * 100)

    errors = _write_across(fault_proxy, gcs_emulator, b, "p.bin", r"uploadType=multipart",
                           lambda: fs.put(str(local), f"{b}/p.bin"))

    blob = gcs_emulator.client.bucket(b).get_blob("p.bin")
    assert blob is not None, f"cloudio deleted the other writer's object (put raised {errors!r})"
    assert blob.download_as_bytes() == b"theirs"
    assert errors == []  # cloudio's own upload was stored exactly as sent


def test_put_with_metadata_does_not_delete_an_object_another_writer_stored_right_after_it(
        fault_proxy, gcs_emulator, b, tmp_path):
    """``metadata=`` goes through gcsfs's own upload, which drops the object resource it was answered
    with: the check must still pin the generation this upload stored."""
    fs = cloudio.filesystem(f"gs://{b}")
    local = tmp_path / "m.bin"
    local.write_bytes(b"mine" * 100)

    errors = _write_across(fault_proxy, gcs_emulator, b, "m.bin", r"uploadType=multipart",
                           lambda: fs.put(str(local), f"{b}/m.bin", metadata={"who": "me"}))

    blob = gcs_emulator.client.bucket(b).get_blob("m.bin")
    assert blob is not None, f"cloudio deleted the other writer's object (put raised {errors!r})"
    assert blob.download_as_bytes() == b"theirs"
    assert errors == []


def test_resumable_pipe_does_not_delete_an_object_another_writer_stored_right_after_it(
        fault_proxy, gcs_emulator, b):
    """A pipe past gcsfs's chunk size goes up as a resumable upload, whose last chunk's answer gcsfs
    drops: the check must still pin the generation this upload stored."""
    fs = cloudio.filesystem(f"gs://{b}")
    data = b"m" * (1 << 20)

    errors = _write_across(fault_proxy, gcs_emulator, b, "r.bin", r"upload_id=.*",
                           lambda: fs.pipe(f"{b}/r.bin", data, chunksize=1 << 20))

    blob = gcs_emulator.client.bucket(b).get_blob("r.bin")
    assert blob is not None, f"cloudio deleted the other writer's object (pipe raised {errors!r})"
    assert blob.download_as_bytes() == b"theirs"
    assert errors == []


def test_open_wb_does_not_delete_an_object_another_writer_stored_right_after_it(fault_proxy, gcs_emulator, b):
    fs = cloudio.filesystem(f"gs://{b}")

    def write() -> None:
        with fs.open(f"{b}/w.bin", "wb") as f:
            f.write(b"mine" * 100)

    errors = _write_across(fault_proxy, gcs_emulator, b, "w.bin", r"upload_id=", write)

    blob = gcs_emulator.client.bucket(b).get_blob("w.bin")
    assert blob is not None, f"cloudio deleted the other writer's object (close raised {errors!r})"
    assert blob.download_as_bytes() == b"theirs"
    assert errors == []


# ---------------------------------------------------------------------------------------------
# a file open for reading across an overwrite through cloudio
# ---------------------------------------------------------------------------------------------


def test_a_file_open_for_reading_is_never_torn_by_an_overwrite(b):
    fs = cloudio.filesystem(f"gs://{b}")
    size = 4 * 2**18
    fs.pipe(f"{b}/t.bin", b"1" * size)
    with fs.open(f"{b}/t.bin", "rb", block_size=2**18, cache_type="readahead") as f:
        head = f.read(2**18)
        fs.pipe(f"{b}/t.bin", b"2" * size)  # overwritten through cloudio while f is open
        try:
            rest = f.read()
        except cloudio.CloudioError:
            return  # a clear error naming the URL is fine
    data = head + rest
    assert data in (b"1" * size, b"2" * size), (
        f"read {data.count(b'1')} bytes of the old object and {data.count(b'2')} of the new one")


def test_a_file_open_for_reading_is_never_silently_truncated_by_an_overwrite(b):
    fs = cloudio.filesystem(f"gs://{b}")
    size = 4 * 2**18
    fs.pipe(f"{b}/t.bin", b"1" * size)
    with fs.open(f"{b}/t.bin", "rb", block_size=2**18, cache_type="readahead") as f:
        head = f.read(2**18)
        fs.pipe(f"{b}/t.bin", b"2" * 100)  # overwritten, shorter, through cloudio while f is open
        try:
            rest = f.read()
        except cloudio.CloudioError:
            return  # a clear error naming the URL is fine (not gcsfs's bare HttpError 416)
    data = head + rest
    assert data in (b"1" * size, b"2" * 100), f"read {len(data)} bytes: {data[:3]!r}...{data[-3:]!r}"


# ---------------------------------------------------------------------------------------------
# pipe of a buffer whose items are wider than a byte
# ---------------------------------------------------------------------------------------------


def test_pipe_of_a_wide_memoryview_stores_it_as_plain_gcsfs_does(gcs_emulator, b, user_fs):
    import numpy as np

    arr = np.arange(10, dtype="int64")
    user_fs.pipe(f"{b}/plain.bin", arr.data)  # plain gcsfs: stores the 80 bytes
    assert user_fs.cat(f"{b}/plain.bin") == arr.tobytes()

    fs = cloudio.filesystem(f"gs://{b}")
    fs.pipe(f"{b}/c.bin", b"previous")
    fs.pipe(f"{b}/c.bin", arr.data)  # raises IntegrityError: "sent 10 bytes", and deletes the object
    assert fs.cat(f"{b}/c.bin") == arr.tobytes()


def test_pipe_of_an_ndarray_or_a_strided_buffer_stores_its_bytes_in_c_order(gcs_emulator, b):
    """Plain gcsfs fails on both: numpy's ``UFuncTypeError`` from adding an array to its multipart
    head, and "underlying buffer is not C-contiguous" from a strided memoryview. Each holds bytes, as
    ``arr.tobytes()`` gives them; guarded writes (``if_generation_match=``) take the same."""
    import numpy as np

    arr = np.arange(24, dtype="<f4").reshape(4, 6)
    fs = cloudio.filesystem(f"gs://{b}")
    fs.pipe(f"{b}/a.bin", arr)
    fs.pipe(f"{b}/strided.bin", memoryview(arr[:, ::2]))
    fs.pipe(f"{b}/guarded.bin", arr.T, if_generation_match=0)
    fs.pipe(f"{b}/empty.bin", arr[:0])
    assert fs.cat(f"{b}/a.bin") == arr.tobytes()
    assert fs.cat(f"{b}/strided.bin") == arr[:, ::2].tobytes()
    assert fs.cat(f"{b}/guarded.bin") == arr.T.tobytes()
    assert fs.info(f"{b}/strided.bin")["size"] == 48
    assert fs.cat(f"{b}/empty.bin") == b""


# ---------------------------------------------------------------------------------------------
# refusals the server sends: a cloudio error naming the gs:// URL, not gcsfs's bare HttpError
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("code", [400, 409])
def test_a_refused_pipe_or_cat_is_a_cloudio_error_naming_the_url(fault_proxy, b, code):
    fs = cloudio.filesystem(f"gs://{b}")
    fs.pipe(f"{b}/r.bin", b"r")
    fault_proxy.add("status", code=code, times=None)
    with pytest.raises(cloudio.CloudioError, match=f"gs://{b}/r.bin"):
        fs.pipe(f"{b}/r.bin", b"x")
    with pytest.raises(cloudio.CloudioError, match=f"gs://{b}/r.bin"):
        fs.cat(f"{b}/r.bin")


def test_cp_whose_answer_is_lost_still_invalidates_other_instances(fault_proxy, gcs_emulator, b, user_fs,
                                                                   monkeypatch):
    monkeypatch.setenv("CLOUDIO_HTTP_TIMEOUT", "1")
    fs = cloudio.filesystem(f"gs://{b}")
    fs.pipe({f"{b}/d/a.bin": b"a" * 50, f"{b}/e/a.bin": b"old"})
    assert user_fs.ls(f"{b}/e", detail=True)[0]["size"] == 3  # the user's instance caches e/

    fault_proxy.add("reset", method="POST", path=r"/rewriteTo/", times=None)  # copied, answer lost
    seq = journal().seq
    with pytest.raises(cloudio.TransientError):
        fs.cp(f"{b}/d/a.bin", f"{b}/e/a.bin")
    fault_proxy.clear()

    assert gcs_emulator.client.bucket(b).get_blob("e/a.bin").size == 50  # the server copied it
    assert user_fs.info(f"{b}/e/a.bin")["size"] == 50  # stale: 3
    assert [c.kind for c in journal().since(seq)] == ["invalidate"]


# ---------------------------------------------------------------------------------------------
# get: gcsfs downloads without its _call, so cloudio's time limit and error mapping are bypassed
# ---------------------------------------------------------------------------------------------


def test_get_from_a_server_that_never_answers_raises_transient_error_in_bounded_time(fault_proxy, b, tmp_path,
                                                                                   monkeypatch):
    """Observed once, unbounded: a bare fsspec FSTimeoutError (from aiohttp's SocketTimeoutError) after 254 s."""
    monkeypatch.setenv("CLOUDIO_HTTP_TIMEOUT", "1")
    monkeypatch.setattr("gcsfs.retry.random.random", lambda: 0.0)
    fs = cloudio.filesystem(f"gs://{b}")
    fs.pipe(f"{b}/h.bin", b"h" * 100)
    fs.ls(b)  # the size comes from the listing: only the download itself goes out
    fault_proxy.add("hang", method="GET", path=r"alt=media", times=None)
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            fs.get(f"{b}/h.bin", str(tmp_path / "h.bin"))
            outcome.append(None)
        except BaseException as e:
            outcome.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(3 * 1 + 12)  # TOTAL_FACTOR x CLOUDIO_HTTP_TIMEOUT (what cat takes), and a margin
    assert outcome, "fs.get still blocked 15 s after a 1 s limit (cat raises TransientError within 3 s)"
    assert isinstance(outcome[0], cloudio.TransientError), repr(outcome[0])
    assert f"gs://{b}/h.bin" in str(outcome[0])


# ---------------------------------------------------------------------------------------------
# a file opened on a listing another writer has made out of date: refused whole, never torn
# ---------------------------------------------------------------------------------------------


def test_a_session_level_read_after_an_outside_overwrite_is_never_the_new_bytes_cut_short(gcs_bucket, gcs_emulator):
    fs = cloudio.filesystem(gcs_bucket)
    url = f"{gcs_bucket}/d/a.bin"
    overwritten_behind_a_listing(fs, gcs_emulator, url, b"a" * 10, b"b" * 25)
    with cloudio.session("session"), fs.open(url, "rb") as f:
        with pytest.raises(cloudio.StaleDatasetError, match="changed on the server"):
            f.read()  # was b"b" * 10
    assert fs.cat(url) == b"b" * 25
    with fs.open(url, "rb") as f:  # the change found was journaled: opened again, the new version whole
        assert f.read() == b"b" * 25


def test_a_session_level_tail_after_an_outside_overwrite_is_never_mixed(gcs_bucket, gcs_emulator):
    fs = cloudio.filesystem(gcs_bucket)
    url = f"{gcs_bucket}/d/t.bin"
    overwritten_behind_a_listing(fs, gcs_emulator, url, b"0123456789", b"abcdefghijklmnopqrstuvwxy")
    with pytest.raises(cloudio.StaleDatasetError):
        fs.tail(url, 5)  # was b"fghij": the new object's bytes at the old one's end
    assert fs.tail(url, 5) == b"uvwxy"


def test_a_strong_file_overwritten_between_open_and_first_read_is_never_torn(gcs_bucket, gcs_emulator):
    fs = cloudio.filesystem(gcs_bucket)
    url = f"{gcs_bucket}/d/s.bin"
    _put(gcs_emulator, url, b"a" * 10)
    with cloudio.session("strong"):
        with fs.open(url, "rb") as f:
            assert f.size == 10
            _put(gcs_emulator, url, b"b" * 25)
            with pytest.raises(cloudio.StaleDatasetError):
                f.read()  # was b"b" * 10
        with fs.open(url, "rb") as f:
            assert f.read() == b"b" * 25


def test_bucket_delete_whose_answer_is_lost_still_journals_it(fault_proxy, gcs_emulator, b, user_fs,
                                                               journal_records):
    """Regression: ``rmdir`` of a bucket whose answer was lost journaled nothing.

    gcsfs sends the DELETE again and is told 404 (FileNotFoundError): the bucket is gone, and a
    listing of the buckets cached by another instance still held it.
    """
    fs = cloudio.filesystem(f"gs://{b}")
    assert b in [p.rstrip("/") for p in user_fs.ls("", refresh=True)]  # the user's instance caches the buckets

    fault_proxy.add("reset", method="DELETE", path=rf"/b/{b}$", times=1)  # deleted, answer lost
    with pytest.raises(FileNotFoundError):
        fs.rmdir(b)
    fault_proxy.clear()

    assert b not in [bk.name for bk in gcs_emulator.client.list_buckets()]  # gone on the server
    assert [(c.url, c.kind, c.prefix) for c in journal_records] == [(f"gs://{b}/", "delete", True)]
    assert b not in [p.rstrip("/") for p in user_fs.ls("")]


def test_bucket_create_whose_answer_is_lost_still_journals_it(fault_proxy, gcs_emulator, user_fs, journal_records):
    """Regression: ``mkdir`` of a bucket whose answer was lost journaled nothing.

    gcsfs sends the POST again and is refused (409, it exists): cloudio raised, and a listing of the
    buckets cached by another instance still lacked the bucket that was made.
    """
    import uuid

    b = f"test-{uuid.uuid4().hex[:16]}"
    fs = cloudio.filesystem("gs://")
    assert b not in [p.rstrip("/") for p in user_fs.ls("", refresh=True)]  # the user's instance caches the buckets

    fault_proxy.add("reset", method="POST", path=r"^/storage/v1/b\?", times=1)  # made, answer lost
    with pytest.raises(OSError):
        fs.mkdir(b)
    fault_proxy.clear()

    assert b in [bk.name for bk in gcs_emulator.client.list_buckets()]  # made on the server
    assert [(c.url, c.kind, c.prefix) for c in journal_records] == [(f"gs://{b}/", "invalidate", True)]
    assert b in [p.rstrip("/") for p in user_fs.ls("")]
