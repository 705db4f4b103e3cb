"""The fsspec face (cloudio.filesystem): what a write whose answer was lost, a transaction with a failed file, a
corrupt download, a refused or missing object and a move onto itself leave and say. Found by a review; each test
failed before its fix. Real emulator (and the fault proxy in front of it), real gcsfs; no mocks.
"""

from __future__ import annotations

import pytest
from outcomes import bounded

import cloudio
from cloudio._journal import journal

# ---------------------------------------------------------------------------------------------
# a write whose final answer was lost: it landed, the journal must say so
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["open_wb", "pipe_resumable"])
def test_a_resumable_write_whose_final_answer_is_lost_is_journaled_and_not_called_missing(
        fault_proxy, gcs_emulator, b, user_fs, how):
    fs = cloudio.filesystem(f"gs://{b}")
    fs.pipe(f"{b}/w/a.bin", b"o" * 10)
    assert user_fs.ls(f"{b}/w", detail=True)[0]["size"] == 10  # the user's instance caches w/

    if how == "open_wb":
        new = b"n" * 1000
        fault_proxy.add("reset", method="POST", path=r"upload_id=", times=1)  # the one (final) chunk

        def write() -> None:
            with fs.open(f"{b}/w/a.bin", "wb") as f:
                f.write(new)
    else:
        new = b"n" * (3 << 20)
        fault_proxy.add("reset", method="POST", path=r"upload_id=", times=1, skip=2)  # the third (final) chunk

        def write() -> None:
            fs.pipe(f"{b}/w/a.bin", new, chunksize=1 << 20)

    seq = journal().seq
    _, err, _ = bounded(write)
    fault_proxy.clear()

    assert gcs_emulator.client.bucket(b).get_blob("w/a.bin").download_as_bytes() == new  # it landed
    assert journal().since(seq), f"the server changed and the journal says nothing (raised {err!r})"
    assert user_fs.info(f"{b}/w/a.bin")["size"] == len(new)  # not the 10 its cached listing held
    assert user_fs.cat(f"{b}/w/a.bin") == new
    # a write that landed is not a missing file: success, or cloudio's error saying the outcome is unknown
    assert err is None or isinstance(err, cloudio.TransientError), repr(err)


def test_a_write_whose_final_answer_is_lost_leaves_no_view_of_the_files_buffer_in_its_error(fault_proxy, b):
    """gcsfs's ``_upload_chunk`` holds memoryviews of the file's BytesIO in its frames; the error's traceback kept
    them, so the buffer stayed exported (it cannot be resized) for as long as the error lived."""
    fs = cloudio.filesystem(f"gs://{b}")
    fault_proxy.add("reset", method="POST", path=r"upload_id=", times=1)  # the one (final) chunk
    f = None
    with pytest.raises(cloudio.CloudioError) as ei:  # pytest keeps the error, as a user's handler may
        with fs.open(f"{b}/v.bin", "wb") as f:
            f.write(b"n" * 1000)
    fault_proxy.clear()
    assert f is not None and ei.value is not None
    f.buffer.truncate(0)  # BufferError "Existing exports of data" while a view of it is alive


_COLLECTED_WITH_ITS_ERROR = """
import gc, sys
sys.path.insert(0, sys.argv[1])
import cloudio
from cloudio import _config
from faultproxy import FaultProxy

with FaultProxy(sys.argv[2]) as proxy:
    _config.push_endpoint(proxy.url)
    fs = cloudio.filesystem(f"gs://{sys.argv[3]}")
    for i in range(3):
        proxy.add("reset", method="POST", path=r"upload_id=", times=1)
        try:
            with fs.open(f"{sys.argv[3]}/gc{i}.bin", "wb") as f:
                f.write(b"n" * 1000)
        except cloudio.CloudioError as e:
            err = e
            err.kept = err  # the error in a reference cycle, as an exception handler's frame often leaves it
        del err, f
        gc.collect()
print("collected")
"""


def test_a_write_whose_final_answer_is_lost_does_not_crash_the_garbage_collector(gcs_emulator, b):
    """The same views, with the error in a reference cycle: the collector freed the BytesIO before its views,
    and Python 3.12 crashed (a segmentation fault, in whatever thread collected next)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}
    out = subprocess.run([sys.executable, "-c", _COLLECTED_WITH_ITS_ERROR, str(Path(__file__).parent),
                          gcs_emulator.url, b], env=env, capture_output=True, text=True, timeout=120)
    assert "deallocated BytesIO" not in out.stderr, out.stderr[-2000:]
    assert (out.returncode, out.stdout.strip()) == (0, "collected"), out.stderr[-2000:]


# ---------------------------------------------------------------------------------------------
# transactions
# ---------------------------------------------------------------------------------------------


def test_a_transaction_commits_the_other_files_when_one_file_block_failed_and_was_handled(b, user_fs):
    fs = cloudio.filesystem(f"gs://{b}")
    with fs.transaction:
        with pytest.raises(RuntimeError, match="boom"):
            with fs.open(f"{b}/t/a.bin", "wb") as f:  # cloudio: an exception in the block uploads nothing
                f.write(b"partial")
                raise RuntimeError("boom")
        with fs.open(f"{b}/t/b.bin", "wb") as f:
            f.write(b"bbb")
    # the discarded a.bin is not committed (that raised TypeError, and b.bin was never stored)
    assert fs.cat(f"{b}/t/b.bin") == b"bbb"
    assert not user_fs.exists(f"{b}/t/a.bin")


# ---------------------------------------------------------------------------------------------
# whole-object downloads are checked
# ---------------------------------------------------------------------------------------------


def test_get_of_a_whole_object_with_a_byte_flipped_on_the_way_is_not_silently_corrupt(fault_proxy, b, tmp_path):
    fs = cloudio.filesystem(f"gs://{b}")
    data = bytes(range(256)) * 4
    fs.pipe(f"{b}/r.bin", data)
    fault_proxy.add("flip", method="GET", path=r"r\.bin\?alt=media", times=None)
    local = tmp_path / "r.bin"
    _, err, _ = bounded(lambda: fs.get(f"{b}/r.bin", str(local)))
    # README: "whole-object reads that pass through cloudio are checked against x-goog-hash" (cat is)
    if err is None:
        assert local.read_bytes() == data, "fs.get wrote corrupt bytes and raised nothing"
    else:
        assert isinstance(err, cloudio.IntegrityError), repr(err)
        assert f"gs://{b}/r.bin" in str(err)


# ---------------------------------------------------------------------------------------------
# errors: CloudioError naming the gs:// URL
# ---------------------------------------------------------------------------------------------


def test_pipe_with_mode_create_onto_an_existing_object_is_a_conflict_naming_the_url(b):
    fs = cloudio.filesystem(f"gs://{b}")
    fs.pipe(f"{b}/c.bin", b"1")
    with pytest.raises(FileExistsError) as ei:  # gcsfs's 412 answer
        fs.pipe(f"{b}/c.bin", b"2", mode="create")
    # cloudio's error naming the object (gcsfs's names the HTTP upload endpoint)
    assert isinstance(ei.value, cloudio.CloudioError), repr(ei.value)
    assert f"gs://{b}/c.bin" in str(ei.value)
    assert fs.cat(f"{b}/c.bin") == b"1"


def test_pipe_with_mode_create_whose_first_answer_was_lost_is_stored_not_refused(b, fault_proxy):
    """gcsfs's retry of a create-only upload that landed, its answer cut, finds its own object (412). That is
    the write stored, journaled as one; it was AlreadyExistsError, "Nothing was uploaded", and no record."""
    fs = cloudio.filesystem(f"gs://{b}")
    url = f"gs://{b}/created.bin"
    seq = journal().seq
    fault_proxy.add("reset", method="POST", path=r"^/upload/")  # forwarded (it lands), its answer cut
    fs.pipe(f"{b}/created.bin", b"created once", mode="create")
    assert [status for _, _, status in fault_proxy.requests(r"^/upload/")] == ["reset", 412]
    assert fs.cat(f"{b}/created.bin") == b"created once"
    assert [c.kind for c in journal().since(seq) if c.url == url] == ["write"]


def test_a_missing_object_is_an_object_not_found_error_naming_the_gs_url(b, tmp_path):
    fs = cloudio.filesystem(f"gs://{b}")
    fs.pipe(f"{b}/x/e.bin", b"e")
    missing = f"{b}/x/missing.bin"
    ops = {
        "cat": lambda: fs.cat(missing),
        "cat_file range": lambda: fs.cat_file(missing, start=1, end=3),
        "info": lambda: fs.info(missing),
        "open rb": lambda: fs.open(missing, "rb"),
        "rm": lambda: fs.rm(missing),
        "cp": lambda: fs.cp(missing, f"{b}/x/c.bin"),
        "get": lambda: fs.get(missing, str(tmp_path / "g.bin")),
        "pipe to a missing bucket": lambda: fs.pipe("no-such-bucket-cloudio-review/a.bin", b"1"),
    }
    wrong = {}
    for name, op in ops.items():
        with pytest.raises(FileNotFoundError) as ei:  # fsspec's contract
            op()
        want = "gs://no-such-bucket-cloudio-review" if "bucket" in name else f"gs://{missing}"
        if not isinstance(ei.value, cloudio.ObjectNotFoundError) or want not in str(ei.value):
            wrong[name] = f"{type(ei.value).__name__}: {ei.value}"
    assert wrong == {}


# ---------------------------------------------------------------------------------------------
# mv onto itself
# ---------------------------------------------------------------------------------------------


def test_mv_of_an_object_onto_itself_spelled_another_way_keeps_it(b):
    fs = cloudio.filesystem(f"gs://{b}")
    fs.pipe(f"{b}/m/a.bin", b"keep")
    fs.mv(f"gs://{b}/m/a.bin", f"{b}/m/a.bin")  # one object: "gs://b/k" and "b/k" are the same key
    assert fs.cat(f"{b}/m/a.bin") == b"keep"  # gcsfs copies it onto itself, then deletes the source
