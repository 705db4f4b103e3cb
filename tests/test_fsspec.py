"""The fsspec face: tracked filesystems journal their writes; every live gcsfs instance reads fresh.

Each row of docs/design.md's gcsfs staleness table is done through cloudio and read
back through the user's own, plain ``gcsfs.GCSFileSystem`` (and zarr's separate
asynchronous instance), next to the raw counterpart where the raw library goes
stale. Real emulator, real gcsfs, no mocks.
"""

from __future__ import annotations

import pickle

import pytest

import cloudio
from cloudio._config import prepare_gcsfs_import
from cloudio._journal import journal
from cloudio.errors import InvalidURLError


def _changes_since(seq: int) -> list[tuple[str, str, bool]]:
    return [(c.url, c.kind, c.prefix) for c in journal().since(seq)]


def _upload_out_of_band(gcs_emulator, b: str, key: str, data: bytes) -> None:
    """A write cloudio does not see: google-cloud-storage, another client entirely."""
    gcs_emulator.client.bucket(b).blob(key).upload_from_string(data)


# ----------------------------------------------------------------------------------------------
# docs/design.md rows, through cloudio
# ----------------------------------------------------------------------------------------------


def test_overwrite_larger_is_seen_by_the_users_instance(user_fs, b):
    tracked = cloudio.filesystem(f"gs://{b}")
    tracked.pipe(f"{b}/d/a.bin", b"1" * 10)
    assert user_fs.ls(f"{b}/d", detail=True)[0]["size"] == 10  # the user's instance caches d/

    tracked.pipe(f"{b}/d/a.bin", b"2" * 100)

    assert user_fs.info(f"{b}/d/a.bin")["size"] == 100
    assert user_fs.cat(f"{b}/d/a.bin") == b"2" * 100
    with user_fs.open(f"{b}/d/a.bin", "rb") as f:
        assert f.read() == b"2" * 100


@pytest.mark.characterization
def test_raw_overwrite_elsewhere_truncates_silently(gcs_emulator, user_fs, b):
    _upload_out_of_band(gcs_emulator, b, "d/a.bin", b"1" * 10)
    user_fs.ls(f"{b}/d")
    _upload_out_of_band(gcs_emulator, b, "d/a.bin", b"2" * 100)

    assert user_fs.info(f"{b}/d/a.bin")["size"] == 10  # stale
    with user_fs.open(f"{b}/d/a.bin", "rb") as f:
        assert f.read() == b"2" * 10  # new bytes, old size: a silent truncation


def test_delete_is_seen_by_the_users_instance(user_fs, b):
    tracked = cloudio.filesystem(f"gs://{b}")
    tracked.pipe({f"{b}/d/a.bin": b"a", f"{b}/d/b.bin": b"b"})
    user_fs.ls(f"{b}/d")
    assert user_fs.exists(f"{b}/d/a.bin")

    tracked.rm(f"{b}/d/a.bin")

    assert not user_fs.exists(f"{b}/d/a.bin")
    assert user_fs.ls(f"{b}/d") == [f"{b}/d/b.bin"]


@pytest.mark.characterization
def test_raw_delete_elsewhere_still_exists(gcs_emulator, user_fs, b):
    _upload_out_of_band(gcs_emulator, b, "d/a.bin", b"a")
    user_fs.ls(f"{b}/d")
    gcs_emulator.client.bucket(b).blob("d/a.bin").delete()
    assert user_fs.exists(f"{b}/d/a.bin")  # stale


def test_new_object_appears_in_the_users_listing(user_fs, b):
    tracked = cloudio.filesystem(f"gs://{b}")
    tracked.pipe(f"{b}/d/a.bin", b"a")
    assert user_fs.ls(f"{b}/d") == [f"{b}/d/a.bin"]
    assert sorted(user_fs.ls(b)) == [f"{b}/d"]

    tracked.pipe(f"{b}/d/b.bin", b"b")
    tracked.pipe(f"{b}/e/c.bin", b"c")  # a new "directory" too

    assert user_fs.ls(f"{b}/d") == [f"{b}/d/a.bin", f"{b}/d/b.bin"]
    assert sorted(user_fs.ls(b)) == [f"{b}/d", f"{b}/e"]
    assert user_fs.exists(f"{b}/d/b.bin")


def test_open_wb_is_seen_at_close(user_fs, b):
    tracked = cloudio.filesystem(f"gs://{b}")
    tracked.pipe(f"{b}/d/a.bin", b"a")
    user_fs.ls(f"{b}/d")
    seq = journal().seq

    with tracked.open(f"{b}/d/new.bin", "wb") as f:
        f.write(b"n" * 300)
        assert _changes_since(seq) == []  # nothing journaled before the upload completes

    [change] = journal().since(seq)
    assert (change.url, change.kind, change.size) == (f"gs://{b}/d/new.bin", "write", 300)
    assert change.generation is not None and change.generation > 0
    assert user_fs.info(f"{b}/d/new.bin")["size"] == 300
    assert user_fs.ls(f"{b}/d") == [f"{b}/d/a.bin", f"{b}/d/new.bin"]


def test_invalidate_reaches_listings_below_the_prefix(gcs_emulator, user_fs, b):
    for key in ("d/a.bin", "d/sub/x.bin", "e/y.bin"):
        _upload_out_of_band(gcs_emulator, b, key, b"0")
    user_fs.ls(f"{b}/d")
    user_fs.ls(f"{b}/d/sub")
    user_fs.ls(f"{b}/e")
    _upload_out_of_band(gcs_emulator, b, "d/sub/z.bin", b"z")
    _upload_out_of_band(gcs_emulator, b, "d/a.bin", b"1" * 50)
    # gcsfs's own invalidate_cache drops the path and its parents, not what lies below
    user_fs.invalidate_cache(f"{b}/d")
    assert user_fs.ls(f"{b}/d/sub") == [f"{b}/d/sub/x.bin"]  # still stale
    e_listing = user_fs.dircache[f"{b}/e"]

    cloudio.invalidate(f"gs://{b}/d/")

    assert user_fs.ls(f"{b}/d/sub") == [f"{b}/d/sub/x.bin", f"{b}/d/sub/z.bin"]
    assert user_fs.info(f"{b}/d/a.bin")["size"] == 50
    assert user_fs.dircache[f"{b}/e"] is e_listing  # untouched: nothing was written there


def test_invalidate_after_find_drops_every_level(gcs_emulator, user_fs, b):
    _upload_out_of_band(gcs_emulator, b, "d/s/t/x.bin", b"0")
    user_fs.find(f"{b}/d")  # gcsfs caches every level it walked: d, d/s, d/s/t
    assert {f"{b}/d", f"{b}/d/s", f"{b}/d/s/t"} <= set(user_fs.dircache)
    _upload_out_of_band(gcs_emulator, b, "d/s/t/y.bin", b"0")

    cloudio.invalidate(f"gs://{b}/d/s")

    assert user_fs.ls(f"{b}/d/s/t") == [f"{b}/d/s/t/x.bin", f"{b}/d/s/t/y.bin"]


def test_invalidate_of_an_object_refreshes_its_listed_size(gcs_emulator, user_fs, b):
    _upload_out_of_band(gcs_emulator, b, "d/a.bin", b"1" * 10)
    user_fs.ls(f"{b}/d")
    _upload_out_of_band(gcs_emulator, b, "d/a.bin", b"2" * 100)

    cloudio.invalidate(f"gs://{b}/d/a.bin")

    assert user_fs.info(f"{b}/d/a.bin")["size"] == 100
    with user_fs.open(f"{b}/d/a.bin", "rb") as f:
        assert f.read() == b"2" * 100


def test_zarrs_asynchronous_instance_is_invalidated(gcs_emulator, b):
    zarr = pytest.importorskip("zarr")
    from zarr.core.sync import sync

    tracked = cloudio.filesystem(f"gs://{b}")
    tracked.pipe(f"{b}/d/a.bin", b"a")
    store = zarr.storage.FsspecStore.from_url(
        f"gs://{b}/d", storage_options={"endpoint_url": gcs_emulator.url, "token": "anon"}
    )
    assert store.fs.asynchronous and store.fs is not tracked

    async def names() -> list[str]:
        return sorted([k async for k in store.list_dir("")])

    assert sync(names()) == ["a.bin"]
    assert f"{b}/d" in store.fs.dircache

    tracked.pipe(f"{b}/d/b.bin", b"b")

    assert sync(names()) == ["a.bin", "b.bin"]
    assert sync(store.exists("b.bin"))


def test_plain_asynchronous_instance_is_invalidated(gcs_emulator, b):
    import asyncio

    prepare_gcsfs_import()
    import gcsfs

    tracked = cloudio.filesystem(f"gs://{b}")
    tracked.pipe(f"{b}/d/a.bin", b"a" * 10)

    async def main() -> tuple[int, bytes]:
        # a fresh option so fsspec builds a new instance bound to this loop
        fs = gcsfs.GCSFileSystem(endpoint_url=gcs_emulator.url, token="anon", asynchronous=True,
                                 requests_timeout=123.0)
        session = await fs._set_session()
        try:
            await fs._ls(f"{b}/d")
            await asyncio.to_thread(tracked.pipe, f"{b}/d/a.bin", b"b" * 100)
            return (await fs._info(f"{b}/d/a.bin"))["size"], await fs._cat_file(f"{b}/d/a.bin")
        finally:
            await session.close()
            type(fs)._cache.pop(fs._fs_token, None)  # bound to this loop, which ends here

    size, data = asyncio.run(main())
    assert size == 100 and data == b"b" * 100


def test_nothing_is_invalidated_when_nothing_was_written_there(gcs_emulator, user_fs, b):
    tracked = cloudio.filesystem(f"gs://{b}")
    tracked.pipe({f"{b}/d/a.bin": b"a", f"{b}/e/b.bin": b"b"})
    user_fs.ls(f"{b}/d")
    user_fs.ls(f"{b}/e")
    d_listing = user_fs.dircache[f"{b}/d"]

    with cloudio.session() as s:
        tracked.pipe(f"{b}/e/c.bin", b"c")
        cloudio.invalidate(f"gs://{b}/e/")
    assert user_fs.dircache[f"{b}/d"] is d_listing
    assert s.stats.invalidations["fsspec"] >= 1  # e/ was dropped in the user's instance

    before = len(gcs_emulator.requests())
    assert user_fs.ls(f"{b}/d") == [f"{b}/d/a.bin"]
    # still served from the user's cache: no request for this bucket (other tests' stragglers may hit others)
    assert [r for r in gcs_emulator.requests()[before:] if b in r.path] == []


def test_only_the_listings_a_change_touches_are_dropped(user_fs, b):
    tracked = cloudio.filesystem(f"gs://{b}")
    tracked.pipe({f"{b}/d/a": b"a", f"{b}/d/sub/x": b"x", f"{b}/e/y": b"y", f"{b}/e/z": b"z"})

    def cache_all() -> dict[str, object]:
        for p in (b, f"{b}/d", f"{b}/d/sub", f"{b}/e"):
            user_fs.ls(p)
        return {k: user_fs.dircache[k] for k in (b, f"{b}/d", f"{b}/d/sub", f"{b}/e")}

    def kept(before: dict[str, object]) -> set[str]:
        return {k for k, v in before.items() if k in user_fs.dircache and user_fs.dircache[k] is v}

    before = cache_all()
    tracked.pipe(f"{b}/d/new", b"n")  # the parent was listed: only its listing changes
    assert kept(before) == {b, f"{b}/d/sub", f"{b}/e"}

    before = cache_all()
    tracked.rm(f"{b}/e/y")  # a delete may empty its parent: ancestors go too
    assert kept(before) == {f"{b}/d", f"{b}/d/sub"}

    before = cache_all()
    cloudio.invalidate(f"gs://{b}/d/")  # the prefix, all below it, and its parent
    assert kept(before) == {f"{b}/e"}

    before = cache_all()
    cloudio.invalidate(f"gs://{b}/")
    assert kept(before) == set()


def test_each_instance_touched_is_counted_once(gcs_emulator, user_fs, b):
    import gcsfs

    other = gcsfs.GCSFileSystem(endpoint_url=gcs_emulator.url, token="anon", requests_timeout=61.0)
    tracked = cloudio.filesystem(f"gs://{b}")
    tracked.pipe(f"{b}/d/a", b"a")
    user_fs.ls(f"{b}/d")
    other.ls(f"{b}/d")
    with cloudio.session() as s:
        tracked.pipe(f"{b}/d/b", b"b")
    assert s.stats.invalidations["fsspec"] == 2
    assert other.ls(f"{b}/d") == user_fs.ls(f"{b}/d") == [f"{b}/d/a", f"{b}/d/b"]


def test_no_invalidation_is_counted_without_cached_listings(user_fs, b):
    user_fs.pipe(f"{b}/e/x", b"x")
    user_fs.ls(f"{b}/e")  # a listing of this bucket is cached, but none that a write in d/ changes
    e_listing = user_fs.dircache[f"{b}/e"]
    with cloudio.session() as s:
        cloudio.filesystem(f"gs://{b}").pipe(f"{b}/d/a.bin", b"a")
    assert s.stats.invalidations["fsspec"] == 0
    assert user_fs.dircache[f"{b}/e"] is e_listing


# ----------------------------------------------------------------------------------------------
# the tracked filesystem: every write path is journaled, failed writes are not
# ----------------------------------------------------------------------------------------------


def test_tracked_filesystem_is_a_cached_gcsfs_instance(gcs_emulator, b):
    import gcsfs.core

    fs = cloudio.filesystem(f"gs://{b}/some/key")
    assert isinstance(fs, gcsfs.core.GCSFileSystem)
    assert cloudio.filesystem(f"/vsigs/{b}/k") is fs  # one instance, fsspec-cached
    assert fs is not gcsfs.GCSFileSystem(endpoint_url=gcs_emulator.url, token="anon")
    clone = pickle.loads(pickle.dumps(fs))  # ships to Dask workers by reference
    assert type(clone) is type(fs)


def test_own_listing_stays_fresh_after_own_writes(b):
    fs = cloudio.filesystem(f"gs://{b}")
    fs.pipe(f"{b}/d/a.bin", b"a")
    assert fs.ls(f"{b}/d") == [f"{b}/d/a.bin"]
    fs.pipe(f"{b}/d/b.bin", b"b" * 5)
    assert fs.ls(f"{b}/d") == [f"{b}/d/a.bin", f"{b}/d/b.bin"]
    assert fs.info(f"{b}/d/b.bin")["size"] == 5


def test_every_write_method_is_journaled(tmp_path, b):
    fs = cloudio.filesystem(f"gs://{b}")
    local = tmp_path / "src.bin"
    local.write_bytes(b"p" * 42)
    u = f"gs://{b}"

    seq = journal().seq
    fs.pipe(f"{b}/a", b"x" * 3)
    [c] = journal().since(seq)
    assert (c.url, c.kind, c.size) == (f"{u}/a", "write", 3) and c.generation

    seq = journal().seq
    fs.put(str(local), f"{b}/p")
    assert [(c.url, c.kind, c.size) for c in journal().since(seq)] == [(f"{u}/p", "write", 42)]

    seq = journal().seq
    fs.cp(f"{b}/p", f"{b}/q")
    assert _changes_since(seq) == [(f"{u}/q", "write", False)]

    seq = journal().seq
    fs.mv(f"{b}/q", f"{b}/r")  # the emulator refuses moveTo; gcsfs falls back to copy + delete
    assert sorted(_changes_since(seq)) == [(f"{u}/q", "delete", False), (f"{u}/r", "write", False)]

    seq = journal().seq
    fs.touch(f"{b}/t")
    assert [(c.url, c.kind, c.size) for c in journal().since(seq)] == [(f"{u}/t", "write", 0)]

    seq = journal().seq
    fs.rm([f"{b}/r", f"{b}/t"])
    assert sorted(_changes_since(seq)) == [(f"{u}/r", "delete", False), (f"{u}/t", "delete", False)]

    fs.pipe({f"{b}/dir/x": b"1", f"{b}/dir/sub/y": b"2"})
    seq = journal().seq
    fs.rm(f"{b}/dir", recursive=True)
    assert sorted(_changes_since(seq)) == [(f"{u}/dir/sub/y", "delete", False), (f"{u}/dir/x", "delete", False)]
    assert sorted(fs.ls(b)) == [f"{b}/a", f"{b}/p"]


def test_methods_gcsfs_binds_in_its_class_body_are_journaled_too(user_fs, b):
    # gcsfs defines mv_file, merge, setxattrs, mkdir, rmdir as sync wrappers of its own
    # coroutines; the tracked class must rebind them to its overrides
    fs = cloudio.filesystem(f"gs://{b}")
    u = f"gs://{b}"
    fs.pipe({f"{b}/a": b"aa", f"{b}/b": b"bbb"})

    seq = journal().seq
    fs.mv_file(f"{b}/a", f"{b}/a2")
    assert sorted(_changes_since(seq)) == [(f"{u}/a", "delete", False), (f"{u}/a2", "write", False)]

    seq = journal().seq
    fs.merge(f"{b}/m", [f"{b}/a2", f"{b}/b"])
    fs.setxattrs(f"{b}/m", content_type="text/plain")
    assert _changes_since(seq) == [(f"{u}/m", "write", False)] * 2
    assert fs.cat(f"{b}/m") == b"aabbb"

    new_bucket = f"{b}-new"[:63]
    listed = [p.rstrip("/") for p in user_fs.ls("")]  # the user's instance caches the bucket list
    assert b in listed and new_bucket not in listed
    seq = journal().seq
    fs.mkdir(new_bucket)
    assert new_bucket in [p.rstrip("/") for p in user_fs.ls("")]
    fs.rmdir(new_bucket)
    assert _changes_since(seq) == [(f"gs://{new_bucket}/", "invalidate", True), (f"gs://{new_bucket}/", "delete", True)]
    assert new_bucket not in [p.rstrip("/") for p in user_fs.ls("")]


def test_exception_in_open_block_uploads_and_journals_nothing(user_fs, b):
    fs = cloudio.filesystem(f"gs://{b}")
    fs.pipe(f"{b}/d/keep.bin", b"old")
    seq = journal().seq

    with pytest.raises(RuntimeError, match="boom"):
        with fs.open(f"{b}/d/keep.bin", "wb") as f:
            f.write(b"partial")
            raise RuntimeError("boom")

    assert journal().since(seq) == []
    assert user_fs.cat(f"{b}/d/keep.bin") == b"old"
    assert user_fs.ls(f"{b}/d", refresh=True) == [f"{b}/d/keep.bin"]
    assert not user_fs.exists(f"{b}/d/nothing.bin")


def test_multi_chunk_upload_is_journaled_once_and_an_aborted_one_not_at_all(user_fs, b):
    fs = cloudio.filesystem(f"gs://{b}")
    chunk = bytes(range(256)) * 1200  # 300 kB: more than one 256 KiB block per write
    seq = journal().seq
    with fs.open(f"{b}/big.bin", "wb", block_size=2**18) as f:
        for _ in range(4):
            f.write(chunk)
    assert [(c.url, c.size) for c in journal().since(seq)] == [(f"gs://{b}/big.bin", 4 * len(chunk))]

    seq = journal().seq
    with pytest.raises(RuntimeError):
        with fs.open(f"{b}/aborted.bin", "wb", block_size=2**18) as f:
            f.write(chunk)
            f.write(chunk)
            assert f.location is not None  # a resumable upload is under way
            raise RuntimeError("boom")
    assert journal().since(seq) == []
    assert user_fs.ls(b, refresh=True) == [f"{b}/big.bin"]


def test_failed_upload_journals_nothing(gcs_emulator):
    fs = cloudio.filesystem("gs://")
    seq = journal().seq
    with pytest.raises(OSError):
        fs.pipe("no-such-bucket-cloudio/a.bin", b"a")
    with pytest.raises(FileNotFoundError):
        fs.rm("no-such-bucket-cloudio/a.bin")
    assert journal().since(seq) == []


def test_asynchronous_tracked_filesystem_journals(gcs_emulator, b):
    import asyncio

    async def main() -> None:
        fs = cloudio.filesystem(f"gs://{b}", asynchronous=True, requests_timeout=77.0)
        session = await fs._set_session()
        try:
            await fs._pipe_file(f"{b}/async.bin", b"a" * 8)
        finally:
            await session.close()
            type(fs)._cache.pop(fs._fs_token, None)

    seq = journal().seq
    asyncio.run(main())
    assert [(c.url, c.kind, c.size) for c in journal().since(seq)] == [(f"gs://{b}/async.bin", "write", 8)]


def test_local_filesystem_is_tracked(tmp_path):
    fs = cloudio.filesystem(str(tmp_path))
    target = tmp_path / "d" / "a.bin"
    target.parent.mkdir()

    seq = journal().seq
    fs.pipe(str(target), b"abc")
    assert [(c.url, c.kind, c.size) for c in journal().since(seq)] == [(str(target), "write", 3)]

    seq = journal().seq
    with pytest.raises(RuntimeError):
        with fs.open(str(target), "wb") as f:
            f.write(b"partial")
            raise RuntimeError("boom")
    assert target.read_bytes() == b"abc"  # untouched
    assert journal().since(seq) == []

    seq = journal().seq
    fs.mv(str(target), str(tmp_path / "b.bin"))
    fs.rm(str(tmp_path / "b.bin"))
    assert [(c.url, c.kind) for c in journal().since(seq)] == [
        (str(target), "delete"), (str(tmp_path / "b.bin"), "write"), (str(tmp_path / "b.bin"), "delete"),
    ]

    seq = journal().seq
    fs.touch(str(tmp_path / "t"))
    fs.cp_file(str(tmp_path / "t"), str(tmp_path / "u"))
    with fs.open(str(tmp_path / "u"), "ab") as f:
        f.write(b"more")
    assert [(c.url, c.kind, c.size) for c in journal().since(seq)] == [
        (str(tmp_path / "t"), "write", None), (str(tmp_path / "u"), "write", None), (str(tmp_path / "u"), "write", 4),
    ]


def test_bad_urls_raise_invalid_url_error():
    with pytest.raises(InvalidURLError, match="s3://bucket/k"):
        cloudio.filesystem("s3://bucket/k")
    with pytest.raises(InvalidURLError, match="gs://B_A_D"):
        cloudio.filesystem("gs://B_A_D/k")


# ----------------------------------------------------------------------------------------------
# the tracked filesystem verifies bytes, names transient failures, and never hangs
# ----------------------------------------------------------------------------------------------


def test_a_byte_flipped_on_the_way_up_is_not_stored_or_journaled(fault_proxy, gcs_emulator, b):
    fs = cloudio.filesystem(f"gs://{b}")
    fault_proxy.add("flip", where="request", method="POST", path=r"/upload/")
    seq = journal().seq
    with pytest.raises(cloudio.IntegrityError, match=f"gs://{b}/d/a.bin") as e:
        fs.pipe(f"{b}/d/a.bin", b"x" * 1000)
    assert isinstance(e.value.__cause__, Exception)
    assert [k for _u, k, _p in _changes_since(seq)] == ["delete"]  # the write is not journaled
    assert gcs_emulator.client.bucket(b).get_blob("d/a.bin") is None  # no corrupt object left


def test_a_byte_flipped_in_an_open_wb_upload_raises(fault_proxy, gcs_emulator, b):
    fs = cloudio.filesystem(f"gs://{b}")
    fault_proxy.add("flip", where="request", method="POST", path=r"upload_id=", times=None)
    seq = journal().seq
    with pytest.raises(cloudio.IntegrityError, match=f"gs://{b}/w.bin"):
        with fs.open(f"{b}/w.bin", "wb") as f:
            f.write(b"y" * 5000)
    assert "write" not in [k for _u, k, _p in _changes_since(seq)]
    assert gcs_emulator.client.bucket(b).get_blob("w.bin") is None


def test_a_byte_flipped_in_a_put_raises(fault_proxy, gcs_emulator, tmp_path, b):
    fs = cloudio.filesystem(f"gs://{b}")
    local = tmp_path / "p.bin"
    local.write_bytes(b"z" * 777)
    fault_proxy.add("flip", where="request", method="POST", path=r"/upload/")
    with pytest.raises(cloudio.IntegrityError, match=f"gs://{b}/p.bin"):
        fs.put(str(local), f"{b}/p.bin")
    assert gcs_emulator.client.bucket(b).get_blob("p.bin") is None


def test_a_byte_flipped_on_the_way_down_raises_on_cat(fault_proxy, b):
    fs = cloudio.filesystem(f"gs://{b}")
    fs.pipe(f"{b}/r.bin", b"r" * 1000)
    assert fs.cat(f"{b}/r.bin") == b"r" * 1000
    fault_proxy.add("flip", method="GET", path=r"/r\.bin")
    with pytest.raises(cloudio.IntegrityError, match=f"gs://{b}/r.bin"):
        fs.cat(f"{b}/r.bin")


def test_503s_past_the_retries_raise_transient_error(fault_proxy, b, monkeypatch):
    monkeypatch.setattr("gcsfs.retry.random.random", lambda: 0.0)  # keep gcsfs's backoff short
    fs = cloudio.filesystem(f"gs://{b}")
    fs.pipe(f"{b}/t.bin", b"t")
    fault_proxy.add("status", code=503, method="GET", path=r"/t\.bin", times=None)
    with pytest.raises(cloudio.TransientError, match=f"gs://{b}/t.bin.*retr") as e:
        fs.cat(f"{b}/t.bin")
    assert isinstance(e.value, ConnectionError) and e.value.__cause__ is not None
    fault_proxy.clear()
    with pytest.raises(FileNotFoundError):  # fsspec's contract is untouched
        fs.cat(f"{b}/missing.bin")


def test_a_server_that_never_answers_raises_transient_error_in_bounded_time(fault_proxy, b, monkeypatch):
    import time

    monkeypatch.setenv("CLOUDIO_HTTP_TIMEOUT", "1")
    fs = cloudio.filesystem(f"gs://{b}")
    fs.pipe(f"{b}/h.bin", b"h")
    fault_proxy.add("hang", times=None)
    t0 = time.monotonic()
    with pytest.raises(cloudio.TransientError, match=f"gs://{b}/h.bin"):
        fs.cat(f"{b}/h.bin")
    assert time.monotonic() - t0 < 30  # 3 x the limit, far from forever


def test_explicit_requests_timeout_wins(gcs_emulator, monkeypatch):
    monkeypatch.setenv("CLOUDIO_HTTP_TIMEOUT", "7")
    assert cloudio.filesystem("gs://").requests_timeout.sock_read == 7
    assert cloudio.filesystem("gs://", requests_timeout=11.0).requests_timeout == 11.0


def test_a_garbled_answer_is_a_transient_error_not_a_decoding_error(fault_proxy, b):
    """A listing or upload answer with a byte flipped on the way: cloudio's error, retryable, naming the URL."""
    fs = cloudio.filesystem(f"gs://{b}")
    fs.pipe(f"gs://{b}/g/a.bin", b"x" * 100)
    fs.invalidate_cache()
    fault_proxy.add("flip", method="GET", path=rf"/b/{b}/o\?", times=None)
    with pytest.raises(cloudio.TransientError, match=f"gs://{b}/.*garbled") as ei:
        fs.ls(f"{b}/g")
    assert isinstance(ei.value.__cause__, ValueError)
    fault_proxy.clear()
    fault_proxy.add("flip", method="POST", path=r"/upload/", times=None)
    with pytest.raises(cloudio.TransientError, match=f"gs://{b}/g/c.bin.*garbled"):
        fs.pipe(f"gs://{b}/g/c.bin", b"y" * 100)
