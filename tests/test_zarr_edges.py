"""save_array / load_array fast paths at the edges: shapes, dtypes, fills, names, refusals of the server."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

import cloudio
from cloudio._paths import parse_gcs
from cloudio._zarr import last_seen


@pytest.mark.parametrize("dtype", [">f8", ">i2", ">u4"])
def test_big_endian_save_array_reads_back_in_zarr(gcs_bucket, dtype):
    a = (np.arange(30 * 20) - 300).reshape(30, 20).astype(dtype)
    url = f"{gcs_bucket}/be.zarr"
    cloudio.save_array(a, url, chunks=(10, 10), shards=(20, 20), compressors=None)
    back = zarr.open_array(cloudio.zarr_store(url), mode="r")[...]
    np.testing.assert_array_equal(back, a)


@pytest.mark.parametrize("dtype", [">f8", ">i2"])
def test_big_endian_written_by_zarr_loads_right(gcs_bucket, dtype):
    a = (np.arange(30 * 20) - 300).reshape(30, 20).astype(dtype)
    url = f"{gcs_bucket}/bez.zarr"
    z = zarr.create_array(cloudio.zarr_store(url), shape=a.shape, dtype=a.dtype, chunks=(10, 10), shards=(20, 20),
                          compressors=None)
    z[...] = a
    last_seen.forget_all()
    np.testing.assert_array_equal(cloudio.load_array(url), a)


def _objects(emu, url):
    """Every chunk or shard object under ``url`` (not zarr.json), by key."""
    bucket, prefix = url.removeprefix("gs://").split("/", 1)
    return {b.name.removeprefix(prefix + "/"): b.download_as_bytes()
            for b in emu.client.list_blobs(bucket, prefix=prefix + "/c/")}


CASES = [
    # shape, chunks, shards, kwargs
    ((37,), (5,), (15,), {}),
    ((37,), (5,), None, {}),
    ((7, 9, 11), (2, 3, 4), (4, 6, 8), {}),
    ((7, 9, 11), (2, 3, 4), (4, 6, 8), {"shard_index_location": "start"}),
    ((7, 9, 11), (2, 3, 4), (4, 6, 8), {"fill_value": np.nan}),
    ((7, 9, 11), (2, 3, 4), (4, 6, 8), {"fill_value": 3.0, "config": {"write_empty_chunks": True}}),
    ((7, 9, 11), (2, 3, 4), None, {"fill_value": 3.0, "config": {"write_empty_chunks": True}}),
    ((7, 9, 11), (2, 3, 4), (4, 6, 8), {"compressors": {"name": "zstd", "configuration": {"level": 1}}}),
    ((7, 9, 11), (2, 3, 4), None, {"compressors": {"name": "zstd", "configuration": {"level": 1}}}),
    ((1, 1), (1, 1), (1, 1), {}),
    ((5, 1), (2, 1), (4, 1), {"fill_value": np.nan}),
]


@pytest.mark.parametrize("loaded", ["guess", "opened"])
@pytest.mark.parametrize(("shape", "chunks", "shards", "kwargs"), CASES)
def test_edge_shapes_read_back_bit_exact_both_ways(gcs_emulator, gcs_bucket, shape, chunks, shards, kwargs, loaded):
    kwargs = dict(kwargs)
    if "shard_index_location" in kwargs:
        kwargs.pop("shard_index_location")
        kwargs["serializer"] = None  # a flag: shards with their index at the start
    rng = np.random.default_rng(1)
    a = rng.standard_normal(shape).astype("f4")
    fill = kwargs.get("fill_value", 0.0)
    flat = a.reshape(-1)
    flat[: flat.size // 3] = fill  # leading chunks of fill
    url = f"{gcs_bucket}/edge.zarr"
    theirs_url = f"{gcs_bucket}/theirs.zarr"
    extra = {k: v for k, v in kwargs.items() if k != "serializer"}
    if "serializer" in kwargs:
        z0 = zarr.create_array(cloudio.zarr_store(theirs_url), shape=shape, dtype=a.dtype, chunks=chunks,
                               shards={"shape": shards, "index_location": "start"}, compressors=None, **extra)
        ours = cloudio.save_array(a, url, chunks=chunks, shards={"shape": shards, "index_location": "start"},
                                  compressors=None, **extra)
    else:
        z0 = zarr.create_array(cloudio.zarr_store(theirs_url), shape=shape, dtype=a.dtype, chunks=chunks,
                               shards=shards, **({"compressors": None} | extra))
        ours = cloudio.save_array(a, url, chunks=chunks, shards=shards, **({"compressors": None} | extra))
    z0[...] = a
    from cloudio._zarr.shard_codec import plain_layout
    assert plain_layout(ours) is not None  # the fast path wrote it
    theirs = {k: v for k, v in _objects(gcs_emulator, theirs_url).items()}
    mine = {k: v for k, v in _objects(gcs_emulator, url).items()}
    assert sorted(mine) == sorted(theirs)
    if "compressors" not in kwargs:
        assert mine == theirs
    back = zarr.open_array(cloudio.zarr_store(url), mode="r")[...]
    assert back.tobytes() == a.tobytes()
    if loaded == "opened":
        last_seen.forget_all()
    got = cloudio.load_array(url)
    assert got.dtype == a.dtype and got.shape == a.shape and got.tobytes() == a.tobytes()
    last_seen.forget_all()
    got = cloudio.load_array(theirs_url)
    assert got.tobytes() == a.tobytes()


@pytest.mark.parametrize(("dtype", "fill"), [("bool", True), ("c8", 1 + 2j), ("c16", complex(np.nan, 0)),
                                             ("u8", 2**64 - 1), ("i1", -128), ("f2", np.inf), ("f2", np.nan)])
@pytest.mark.parametrize("shards", [(4, 6), None])
def test_dtypes_and_fills_read_back_bit_exact(gcs_bucket, dtype, fill, shards):
    rng = np.random.default_rng(2)
    a = (rng.standard_normal((9, 13)) * 50).astype(dtype) if dtype != "bool" else rng.random((9, 13)) > 0.5
    a[:2, :3] = fill
    url = f"{gcs_bucket}/dt.zarr"
    cloudio.save_array(a, url, chunks=(2, 3), shards=shards, compressors=None, fill_value=fill)
    back = zarr.open_array(cloudio.zarr_store(url), mode="r")[...]
    assert back.tobytes() == a.tobytes()
    assert cloudio.load_array(url).tobytes() == a.tobytes()
    last_seen.forget_all()
    assert cloudio.load_array(url).tobytes() == a.tobytes()


@pytest.fixture
def ts_env(gcs_emulator, monkeypatch):
    monkeypatch.setenv("TENSORSTORE_GCS_HTTP_URL", gcs_emulator.url)
    monkeypatch.setenv("GOOGLE_AUTH_TOKEN_FOR_TESTING", "emulator")


def _ts_kv(url):
    p = parse_gcs(url)
    return {"driver": "gcs", "bucket": p.bucket, "path": p.key + "/"}


@pytest.mark.parametrize("index_location", ["end", "start"])
@pytest.mark.parametrize(("shape", "chunks", "shards"), [
    ((70, 90, 100), (16, 16, 50), (48, 48, 100)),  # threads path (1+ MiB shards), 3x3x2 chunks per shard, edges
    ((700, 500), (64, 100), (192, 300)),
    ((30, 40, 50), (4, 8, 10), (12, 24, 30)),  # small: event loop path
])
def test_tensorstore_and_cloudio_read_each_other(gcs_bucket, ts_env, shape, chunks, shards, index_location):
    ts = pytest.importorskip("tensorstore")
    rng = np.random.default_rng(5)
    a = rng.standard_normal(shape).astype("f8")
    a[: shape[0] // 4] = 0  # some chunks of fill
    sh = {"shape": shards, "index_location": index_location}
    probe = zarr.create_array(zarr.storage.MemoryStore(), shape=shape, dtype=a.dtype, chunks=chunks, shards=sh,
                              compressors=None)
    meta = {k: v for k, v in probe.metadata.to_dict().items() if v is not None}
    turl = f"{gcs_bucket}/ts.zarr"
    t = ts.open({"driver": "zarr3", "kvstore": _ts_kv(turl), "metadata": meta}, create=True,
                delete_existing=True).result()
    t.write(a).result()
    got = cloudio.load_array(turl)
    assert got.tobytes() == a.tobytes()
    curl = f"{gcs_bucket}/cl.zarr"
    cloudio.save_array(a, curl, chunks=chunks, shards=sh, compressors=None)
    back = ts.open({"driver": "zarr3", "kvstore": _ts_kv(curl)}, open=True).result().read().result()
    assert np.asarray(back).tobytes() == a.tobytes()
    last_seen.forget_all()
    assert cloudio.load_array(curl).tobytes() == a.tobytes()


def test_a_rewrite_of_a_store_whose_name_has_brackets_deletes_the_old_shards(gcs_emulator, gcs_bucket,
                                                                             journal_records):
    """save_array's sweep deletes the old shards the new array did not overwrite; a store named with '['
    (a legal GCS name) must lose them too, and no other store may lose anything."""
    url = f"{gcs_bucket}/run[1].zarr"
    other = f"{gcs_bucket}/run1.zarr"
    old = np.arange(40 * 40, dtype="i4").reshape(40, 40) + 1
    cloudio.save_array(old, other, chunks=(10, 10), shards=(20, 20))
    cloudio.save_array(old, url, chunks=(10, 10), shards=(20, 20))
    new = old[:20]  # shards c/1/0 and c/1/1 are outside the new grid: the old ones must go
    n = len(journal_records)
    cloudio.save_array(new, url, chunks=(10, 10), shards=(20, 20))
    deletes = {c.url for c in journal_records[n:] if c.kind == "delete"}
    last_seen.forget_all()
    got = cloudio.load_array(url)
    p = parse_gcs(url)
    names = {b.name for b in gcs_emulator.client.list_blobs(p.bucket, prefix="run")}
    np.testing.assert_array_equal(got, new)
    assert "run1.zarr/c/1/1" in names  # another store's shard was deleted
    assert f"{p.key}/c/1/1" not in names
    assert f"{url}/c/1/1" in deletes and not any("run1.zarr" in d for d in deletes), deletes  # as the server


# -- a write asked not to replace what is stored ------------------------------------------------


@pytest.mark.parametrize("existing", ["array", "group"])
def test_save_array_without_overwrite_onto_a_node_names_the_url_and_keeps_it(gcs_bucket, existing):
    """``overwrite=False`` onto a stored node: a cloudio error naming the URL and what to do (zarr's error
    as the cause, still a ValueError as zarr's is), and the node left as it was."""
    url = f"{gcs_bucket}/kept.zarr"
    if existing == "array":
        cloudio.save_array(np.arange(6), url)
    else:
        zarr.open_group(cloudio.zarr_store(url), mode="w").attrs["x"] = 1
    with pytest.raises(cloudio.AlreadyExistsError) as err:
        cloudio.save_array(np.zeros(3), url, overwrite=False)
    assert isinstance(err.value, ValueError) and isinstance(err.value, FileExistsError)
    assert url in str(err.value) and "overwrite=True" in str(err.value), err.value
    assert isinstance(err.value.__cause__, zarr.errors.ContainsArrayError | zarr.errors.ContainsGroupError)
    if existing == "array":
        np.testing.assert_array_equal(cloudio.load_array(url), np.arange(6))
    else:
        assert zarr.open_group(cloudio.zarr_store(url), mode="r").attrs["x"] == 1
