"""cloudio.zarr_store: journaled writes, sharded v3 integrity, cross-instance freshness."""

from __future__ import annotations

import base64
import os
from collections import Counter

import google_crc32c
import numpy as np
import pytest
import zarr
from zarr.storage import FsspecStore

import cloudio
from cloudio._journal import journal
from cloudio._paths import parse_gcs


def _server_crc32c(emu, url: str) -> str:
    """The object's crc32c as the server reports it (base64, big-endian)."""
    p = parse_gcs(url)
    blob = emu.client.bucket(p.bucket).get_blob(p.key)
    assert blob is not None, url
    return blob.crc32c


def _bytes(emu, url: str) -> bytes:
    p = parse_gcs(url)
    return emu.client.bucket(p.bucket).blob(p.key).download_as_bytes()


def _crc(data: bytes) -> str:
    return base64.b64encode(google_crc32c.value(data).to_bytes(4, "big")).decode()


def _changes_since(seq: int, prefix: str) -> list:
    return journal().since(seq, read=prefix)


def test_store_is_a_zarr_store_and_journals_every_write(gcs_bucket):
    url = f"{gcs_bucket}/g.zarr"
    seq = journal().seq
    store = cloudio.zarr_store(url)
    assert isinstance(store, zarr.storage.WrapperStore)
    g = zarr.open_group(store, mode="w", attributes={"title": "t"})
    a = g.create_array("x", shape=(20, 20), chunks=(5, 5), shards=(10, 10), dtype="i4")
    a[...] = np.arange(400, dtype="i4").reshape(20, 20)
    writes = {c.url for c in _changes_since(seq, url) if c.kind == "write"}
    assert f"{url}/zarr.json" in writes
    assert f"{url}/x/zarr.json" in writes
    assert {f"{url}/x/c/{i}/{j}" for i in range(2) for j in range(2)} <= writes
    # the journal's sizes are the sizes on the server
    *_, shard = (c for c in _changes_since(seq, url) if c.url == f"{url}/x/c/1/1")
    assert shard.size == len(_bytes_of(url + "/x/c/1/1"))
    np.testing.assert_array_equal(zarr.open_array(cloudio.zarr_store(url), path="x")[...],
                                  np.arange(400, dtype="i4").reshape(20, 20))


def _bytes_of(url: str) -> bytes:
    from cloudio._gcs.client import gcs_filesystem

    return gcs_filesystem().cat_file(parse_gcs(url).fs_path)


def test_deletes_are_journaled(gcs_bucket):
    url = f"{gcs_bucket}/d.zarr"
    g = zarr.open_group(cloudio.zarr_store(url), mode="w")
    g.create_array("x", shape=(4,), chunks=(2,), dtype="u1")[...] = 1
    seq = journal().seq
    del g["x"]
    changes = _changes_since(seq, url)
    assert any(c.kind == "delete" and c.prefix and c.url == f"{url}/x" for c in changes)
    # rewriting the store with mode="w" deletes it first: one prefix delete of the root
    seq = journal().seq
    zarr.open_group(cloudio.zarr_store(url), mode="w")
    assert any(c.kind == "delete" and c.prefix and c.url == url for c in _changes_since(seq, url))


def test_no_extra_requests(gcs_emulator, gcs_bucket):
    """Journaling adds no request: the same writes through zarr's own store cost the same."""
    from cloudio._gcs.client import gcs_filesystem

    data = np.arange(64 * 64, dtype="f4").reshape(64, 64)

    def write(store):
        before = len(gcs_emulator.requests())
        z = zarr.create_array(store, shape=data.shape, dtype=data.dtype, chunks=(16, 16), shards=(32, 32))
        z[...] = data
        return Counter(r.method for r in gcs_emulator.requests()[before:])

    b = parse_gcs(gcs_bucket).bucket
    plain = write(FsspecStore(gcs_filesystem(asynchronous=True), path=f"{b}/plain.zarr"))
    tracked = write(cloudio.zarr_store(f"{gcs_bucket}/tracked.zarr"))
    assert tracked == plain
    assert tracked["POST"] == 4 + 1  # 4 shards + zarr.json


def test_read_only_store_refuses_writes(gcs_bucket):
    url = f"{gcs_bucket}/ro.zarr"
    zarr.create_array(cloudio.zarr_store(url), shape=(2,), dtype="u1")
    seq = journal().seq
    ro = cloudio.zarr_store(url, read_only=True)
    assert ro.read_only
    with pytest.raises(ValueError):
        zarr.open_array(ro, mode="r+")[...] = 3
    assert _changes_since(seq, url) == []


def test_local_store_is_journaled(tmp_path):
    path = tmp_path / "local.zarr"
    seq = journal().seq
    z = zarr.create_array(cloudio.zarr_store(str(path)), shape=(10,), chunks=(5,), dtype="i2")
    z[...] = np.arange(10, dtype="i2")
    urls = {c.url for c in journal().since(seq, read=os.fspath(path))}
    assert os.path.join(path, "c", "0") in urls and os.path.join(path, "zarr.json") in urls
    np.testing.assert_array_equal(cloudio.load_array(str(path)), np.arange(10, dtype="i2"))


def test_store_pickles_with_its_root(gcs_emulator):
    import pickle

    store = cloudio.zarr_store("gs://some-bucket/p.zarr", read_only=True)
    back = pickle.loads(pickle.dumps(store))
    assert back.root_url == "gs://some-bucket/p.zarr" and back.read_only
    assert back.with_read_only(False).root_url == store.root_url


def _roundtrip_sharded(emu, url: str, n: int, chunk: int, shard: int) -> None:
    rng = np.random.default_rng(n)
    data = rng.standard_normal((n, n), dtype="f4")
    z = zarr.create_array(
        cloudio.zarr_store(url), shape=data.shape, dtype=data.dtype, chunks=(chunk, chunk),
        shards=(shard, shard), compressors=[zarr.codecs.ZstdCodec(level=1), zarr.codecs.Crc32cCodec()],
    )
    z[...] = data
    meta = zarr.open_array(cloudio.zarr_store(url, read_only=True)).metadata.to_dict()
    sharding = meta["codecs"][0]
    assert sharding["name"] == "sharding_indexed"
    inner = [c["name"] for c in sharding["configuration"]["codecs"]]
    assert inner[-1] == "crc32c", inner  # every inner chunk carries its checksum
    assert [c["name"] for c in sharding["configuration"]["index_codecs"]][-1] == "crc32c"
    back = cloudio.load_array(url)
    assert back.dtype == data.dtype and back.tobytes() == data.tobytes()  # bit-exact
    nshards = -(-n // shard)
    for i in range(nshards):
        for j in range(nshards):
            obj = f"{url}/c/{i}/{j}"
            assert _server_crc32c(emu, obj) == _crc(_bytes(emu, obj)), obj


def test_sharded_v3_roundtrip_1000(gcs_emulator, gcs_bucket):
    _roundtrip_sharded(gcs_emulator, f"{gcs_bucket}/s1000.zarr", 1000, 100, 500)


@pytest.mark.slow
def test_sharded_v3_roundtrip_4000(gcs_emulator, gcs_bucket):
    # one 64 MB shard: large enough that gcsfs uploads it in several resumable parts
    _roundtrip_sharded(gcs_emulator, f"{gcs_bucket}/s4000.zarr", 4000, 500, 4000)


def test_new_array_visible_to_zarrs_own_store_instance(gcs_bucket):
    """A group listed through zarr's own FsspecStore.from_url sees an array added through cloudio."""
    from cloudio._config import gcsfs_options

    url = f"{gcs_bucket}/vis.zarr"
    g = zarr.open_group(cloudio.zarr_store(url), mode="w")
    g.create_array("x", shape=(2,), dtype="u1")
    # options differing from cloudio's (a default value spelled out) make fsspec build another instance
    theirs = FsspecStore.from_url(url, storage_options={**gcsfs_options(), "requester_pays": False})
    assert theirs.fs is not cloudio.zarr_store(url)._store.fs
    assert sorted(zarr.open_group(theirs, mode="r").array_keys()) == ["x"]  # listing now cached there
    zarr.open_group(cloudio.zarr_store(url), mode="a").create_array("y", shape=(3,), dtype="u1")
    assert sorted(zarr.open_group(theirs, mode="r").array_keys()) == ["x", "y"]
    g2 = zarr.open_group(cloudio.zarr_store(url), mode="a")
    del g2["x"]
    assert sorted(zarr.open_group(theirs, mode="r").array_keys()) == ["y"]


def test_failed_write_leaves_no_record(gcs_emulator):
    """A write the server refused (no such bucket) raises and is not journaled."""
    url = "gs://cloudio-no-such-bucket-5/a.zarr"
    seq = journal().seq
    store = cloudio.zarr_store(url)
    with pytest.raises(cloudio.BucketNotFoundError, match="(?i)cloudio-no-such-bucket-5.*create the bucket"):
        zarr.create_array(store, shape=(4,), dtype="u1")
    assert journal().since(seq, read=url) == []


def test_a_gcs_store_lists_every_key_across_pages_without_the_marker(gcs_emulator, gcs_bucket, monkeypatch):
    """list_prefix lists the server (one request per page, each page's token followed): what another
    writer put there too; not the write marker, nor a "directory" placeholder."""
    from zarr.core.sync import sync

    from cloudio._gcs import fast

    url = f"{gcs_bucket}/listed.zarr"
    p = parse_gcs(url)
    bucket = gcs_emulator.client.bucket(p.bucket)
    names = ["zarr.json", "c/0/0", "c/0/1", "c/1/0", "c/01/x", "a/zarr.json", ".cloudio-write-in-progress", "c/"]
    for n in names:
        bucket.blob(f"{p.key}/{n}").upload_from_string(b"x")
    bucket.blob(f"{p.key}-other/zarr.json").upload_from_string(b"x")  # a neighbour, not under the store
    real = fast.list_objects
    pages: list[int] = []

    async def small_pages(*args, **params):  # pages of two: the tokens must be followed
        items = await real(*args, **params, maxResults=2)
        pages.append(len(items))
        return items

    monkeypatch.setattr("cloudio._zarr.store.list_objects", small_pages)
    store = cloudio.zarr_store(url)
    n = len(gcs_emulator.requests())

    async def keys(prefix: str) -> list[str]:
        return sorted([k async for k in store.list_prefix(prefix)])

    every = ["a/zarr.json", "c/0/0", "c/0/1", "c/01/x", "c/1/0", "zarr.json"]
    assert sync(keys("")) == every
    assert sync(keys("c/")) == ["c/0/0", "c/0/1", "c/01/x", "c/1/0"]
    assert sync(keys("c/0")) == ["c/0/0", "c/0/1"]  # a directory, as gcsfs lists it: not c/01
    assert sorted(sync(_all(store))) == every
    assert pages == [8, 5, 3, 8]  # every object under the prefix, the marker and the placeholder among them
    listings = [r for r in gcs_emulator.requests()[n:] if r.method == "GET" and "/o?" in r.path]
    assert len(listings) == 4 + 3 + 2 + 4  # pages of two


async def _all(store) -> list[str]:
    return [k async for k in store.list()]
