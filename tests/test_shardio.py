"""The one-buffer-per-shard path of save_array/load_array writes what zarr writes and reads what zarr reads."""

from __future__ import annotations

import math
import re
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pytest
import zarr

import cloudio
from cloudio._zarr import shard_codec
from cloudio._zarr.shard_codec import plain_layout
from cloudio.emulator import Emulator
from cloudio.errors import IntegrityError

SHAPE, SHARDS, CHUNKS = (1000, 1300), (256, 512), (128, 128)  # ragged edges in both dimensions


def _data(dtype: str, fill: float) -> np.ndarray:
    a = np.random.default_rng(7).standard_normal(SHAPE).astype(dtype)
    a[:128, :128] = fill  # one chunk of fill value: left out of its shard
    a[256:512, 512:1024] = fill  # one whole shard of it: not written at all
    a[900:, 1200:] = fill  # fill at the ragged corner
    return a


def _objects(emu: Emulator, url: str) -> dict[str, int]:
    bucket, prefix = url.removeprefix("gs://").split("/", 1)
    return {
        b.name.removeprefix(prefix + "/"): b.size
        for b in emu.client.list_blobs(bucket, prefix=prefix + "/c/")
    }


def _zarr_written(url: str, a: np.ndarray, **kwargs: object) -> zarr.Array:
    """The same array written by zarr's own codec pipeline."""
    z = zarr.create_array(cloudio.zarr_store(url), shape=a.shape, dtype=a.dtype, chunks=CHUNKS,
                          shards=SHARDS, compressors=None, **kwargs)
    z[...] = a
    return z


@pytest.mark.parametrize(("dtype", "fill"), [("float32", 0.0), ("float64", np.nan), ("int16", -9999)])
def test_writes_the_objects_zarr_writes_and_zarr_reads_them(gcs_emulator: Emulator, gcs_bucket: str,
                                                          dtype: str, fill: float) -> None:
    a = _data(dtype, fill)
    ours = cloudio.save_array(a, f"{gcs_bucket}/ours.zarr", chunks=CHUNKS, shards=SHARDS,
                              compressors=None, fill_value=fill)
    assert plain_layout(ours) is not None  # the fast path was the one taken
    _zarr_written(f"{gcs_bucket}/theirs.zarr", a, fill_value=fill)
    theirs = _objects(gcs_emulator, f"{gcs_bucket}/theirs.zarr")
    assert _objects(gcs_emulator, f"{gcs_bucket}/ours.zarr") == theirs  # same shards, same sizes
    assert "c/1/1" not in theirs  # the all-fill shard
    back = zarr.open_array(cloudio.zarr_store(f"{gcs_bucket}/ours.zarr"), mode="r")[...]
    np.testing.assert_array_equal(back, a)
    assert back.tobytes() == a.tobytes()


def test_a_rewrite_leaves_what_zarr_would_leave(gcs_emulator: Emulator, gcs_bucket: str) -> None:
    """save_array over an array already there replaces it as zarr's create_array(overwrite=True) does: the old
    chunks are gone, the metadata document is the one zarr writes, and zarr reads the new array."""
    import json

    old = _data("float64", 0.0)
    new = np.arange(300 * 200, dtype="int16").reshape(300, 200)
    url = f"{gcs_bucket}/again.zarr"
    cloudio.save_array(old, url, chunks=CHUNKS, shards=SHARDS, compressors=None)
    cloudio.save_array(new, url, chunks=(50, 50), shards=None, compressors=None, attributes={"v": 2})
    theirs = zarr.create_array(cloudio.zarr_store(f"{gcs_bucket}/theirs.zarr"), shape=new.shape, dtype=new.dtype,
                               chunks=(50, 50), shards=None, compressors=None, attributes={"v": 2})
    theirs[...] = new
    bucket, key = url.removeprefix("gs://").split("/", 1)
    names = {b.name.removeprefix(key + "/") for b in gcs_emulator.client.list_blobs(bucket, prefix=key + "/")}
    assert names == {"zarr.json", *_objects(gcs_emulator, f"{gcs_bucket}/theirs.zarr")}  # no old shard left

    def document(at: str) -> dict[str, object]:
        b, k = at.removeprefix("gs://").split("/", 1)
        return json.loads(gcs_emulator.client.bucket(b).blob(f"{k}/zarr.json").download_as_bytes())

    assert document(url) == document(f"{gcs_bucket}/theirs.zarr")
    assert zarr.open_array(cloudio.zarr_store(url), mode="r")[...].tobytes() == new.tobytes()


@pytest.mark.parametrize("side, chunk, zstd", [(64, 16, False), (1024, 256, False), (1024, 256, True)],
                         ids=["batch", "threads", "zstd-bands"])
def test_a_shard_rewritten_as_nothing_but_fill_is_stored_over_the_object_listed(gcs_emulator: Emulator,
                                                                                gcs_bucket: str, side: int,
                                                                                chunk: int, zstd: bool) -> None:
    """A rewrite whose shard c/0/0 holds nothing but the fill value stores it (its chunks of the fill value) over
    the object the write listed, instead of deleting it: absent, the object would let in a late copy of an
    earlier write that needed no object there. It reads back as the fill value, by cloudio and by zarr; a
    first write stores no object for such a shard, as zarr does."""
    kw = {"chunks": (chunk, chunk), "shards": (side // 2, side // 2),
          "compressors": zarr.codecs.ZstdCodec(level=1) if zstd else None}
    a = np.random.default_rng(4).integers(1, 100, (side, side)).astype("f4")
    b = a.copy()
    b[:side // 2, :side // 2] = 0  # the fill value
    bucket = gcs_emulator.client.bucket(gcs_bucket[5:])
    cloudio.save_array(a, f"{gcs_bucket}/fill.zarr", **kw)
    first = bucket.get_blob("fill.zarr/c/0/0").generation
    cloudio.save_array(b, f"{gcs_bucket}/fill.zarr", **kw)
    stored = bucket.get_blob("fill.zarr/c/0/0")
    assert stored is not None and stored.generation != first
    assert cloudio.load_array(f"{gcs_bucket}/fill.zarr").tobytes() == b.tobytes()
    assert zarr.open_array(cloudio.zarr_store(f"{gcs_bucket}/fill.zarr"), mode="r")[...].tobytes() == b.tobytes()
    cloudio.save_array(b, f"{gcs_bucket}/fresh.zarr", **kw)
    assert bucket.get_blob("fresh.zarr/c/0/0") is None and bucket.get_blob("fresh.zarr/c/1/1") is not None


def test_a_rewrite_of_large_shards_keeps_every_new_shard(gcs_emulator: Emulator, gcs_bucket: str,
                                                          fault_proxy) -> None:
    """Large shards are encoded while the old array is listed; the old shards the new array does not
    overwrite are deleted (their deletes held back here), and none of the new shards at the old keys."""
    url = f"{gcs_bucket}/big-again.zarr"
    old = np.ones((4096, 1024), dtype="float32")
    new = np.arange(2048 * 1024, dtype="float32").reshape(2048, 1024)
    cloudio.save_array(old, url, chunks=(256, 256), shards=(512, 1024), compressors=None)  # 8 shards of 2 MiB
    fault_proxy.log.clear()
    fault_proxy.add("delay", method="DELETE", seconds=0.3, times=None)
    fault_proxy.add("delay", method="POST", path=r"/batch/", seconds=0.3, times=None)
    cloudio.save_array(new, url, chunks=(256, 256), shards=(512, 1024), compressors=None)
    assert any("/batch/" in p or (m == "DELETE" and "%2Fc%2F" in p) for m, p, _ in fault_proxy.log)  # 4 old shards
    assert set(_objects(gcs_emulator, url)) == {"c/0/0", "c/1/0", "c/2/0", "c/3/0"}
    assert zarr.open_array(cloudio.zarr_store(url), mode="r")[...].tobytes() == new.tobytes()


def test_write_empty_chunks_writes_every_chunk_like_zarr(gcs_emulator: Emulator, gcs_bucket: str) -> None:
    a = _data("float32", 0.0)
    with zarr.config.set({"array.write_empty_chunks": True}):
        cloudio.save_array(a, f"{gcs_bucket}/ours.zarr", chunks=CHUNKS, shards=SHARDS, compressors=None)
        _zarr_written(f"{gcs_bucket}/theirs.zarr", a)
    theirs = _objects(gcs_emulator, f"{gcs_bucket}/theirs.zarr")
    assert _objects(gcs_emulator, f"{gcs_bucket}/ours.zarr") == theirs
    assert "c/1/1" in theirs


@pytest.mark.parametrize("dtype", ["float32", "float64"], ids=["loop", "threads"])
@pytest.mark.parametrize("index_location", ["end", "start"])
def test_reads_what_zarr_wrote_bit_exact(gcs_emulator: Emulator, gcs_bucket: str, index_location: str,
                                         dtype: str) -> None:
    """zarr's shards (chunks in Morton order, one left out, one shard all fill, cut at both edges) read
    back exactly, each in one GET: on the event loop, and in threads, where whole shards stream."""
    from zarr.codecs import ShardingCodec

    a = _data(dtype, np.nan)
    url = f"{gcs_bucket}/theirs.zarr"
    z = zarr.create_array(
        cloudio.zarr_store(url), shape=a.shape, dtype=a.dtype, chunks=SHARDS, compressors=None,
        serializer=ShardingCodec(chunk_shape=CHUNKS, index_location=index_location), fill_value=np.nan,
    )
    z[...] = a
    assert plain_layout(z) is not None
    n0 = len(gcs_emulator.requests())
    back = cloudio.load_array(url)
    shard_gets = [r for r in gcs_emulator.requests()[n0:] if r.method == "GET" and "%2Fc%2F" in r.path]
    assert len(shard_gets) == 4 * 3  # one GET per shard, the missing one (404) included
    assert back.tobytes() == a.tobytes()  # NaN payloads and all


def test_an_unsharded_chunk_of_the_wrong_size_is_an_integrity_error_naming_it(gcs_emulator: Emulator,
                                                                              gcs_bucket: str) -> None:
    a = _data("float32", 0.0)
    url = f"{gcs_bucket}/short.zarr"
    cloudio.save_array(a, url, chunks=CHUNKS, shards=None, compressors=None)
    cloudio.filesystem(url).pipe(f"{url}/c/1/0", b"\x00" * 12)  # not a chunk of this array
    with pytest.raises(IntegrityError, match=r"short\.zarr/c/1/0.*12 bytes"):
        cloudio.load_array(url)


@pytest.mark.parametrize("framing", [None, {"fault": "chunked", "after": 5000}, {"fault": "unsized"}],
                         ids=["sized", "chunked", "ended-by-close"])
def test_an_object_larger_than_any_chunk_is_an_integrity_error_naming_it(
        gcs_emulator: Emulator, gcs_bucket: str, fault_proxy, framing: dict[str, object] | None) -> None:
    """Read on the event loop (chunks of 64 KiB): however the body is framed, one that does not fit the
    largest chunk this array can have is refused, not written past the buffer."""
    a = _data("float32", 0.0)
    url = f"{gcs_bucket}/big.zarr"
    cloudio.save_array(a, url, chunks=CHUNKS, shards=None, compressors=None)
    cloudio.filesystem(url).pipe(f"{url}/c/1/0", b"\x00" * 100_000)
    if framing is not None:
        fault_proxy.add(method="GET", path=_SHARD_GET, times=None, **framing)
    with pytest.raises(IntegrityError, match=r"big\.zarr/c/1/0: the object holds .*not part of the array"):
        cloudio.load_array(url)


def test_a_damaged_shard_is_an_integrity_error_naming_it(gcs_emulator: Emulator, gcs_bucket: str) -> None:
    a = _data("float32", 0.0)
    url = f"{gcs_bucket}/bad.zarr"
    cloudio.save_array(a, url, chunks=CHUNKS, shards=SHARDS, compressors=None)
    bucket, prefix = url.removeprefix("gs://").split("/", 1)
    blob = gcs_emulator.client.bucket(bucket).blob(f"{prefix}/c/0/1")
    raw = bytearray(blob.download_as_bytes())
    raw[-10] ^= 0xFF  # inside the index
    cloudio.filesystem(url).pipe(f"{url}/c/0/1", bytes(raw))
    with pytest.raises(IntegrityError, match=r"bad\.zarr/c/0/1.*CRC32C"):
        cloudio.load_array(url)


@pytest.mark.parametrize("kind", ["zstd-sharded", "raw-unsharded", "zstd-unsharded"])
@pytest.mark.parametrize("fill", [0.0, np.nan])
def test_compressed_and_unsharded_layouts_take_the_fast_path_both_ways(
    gcs_emulator: Emulator, gcs_bucket: str, kind: str, fill: float
) -> None:
    """zstd chunks (inside shards or not) and unsharded raw chunks: zarr's objects, read bit-exactly both ways."""
    a = np.round(_data("float32", fill) * 8) / 8  # compressible
    kw: dict[str, object] = {"chunks": CHUNKS, "fill_value": fill,
                             "shards": SHARDS if kind.endswith("-sharded") else None,
                             "compressors": zarr.codecs.ZstdCodec(level=3) if kind.startswith("zstd") else None}
    ours = cloudio.save_array(a, f"{gcs_bucket}/ours.zarr", **kw)
    layout = plain_layout(ours)
    assert layout is not None and layout.sharded == kind.endswith("-sharded")
    assert (layout.zstd is not None) == kind.startswith("zstd")
    theirs = zarr.create_array(cloudio.zarr_store(f"{gcs_bucket}/theirs.zarr"), shape=a.shape, dtype=a.dtype,
                               **kw)  # type: ignore[arg-type]
    theirs[...] = a
    ours_objects = _objects(gcs_emulator, f"{gcs_bucket}/ours.zarr")
    theirs_objects = _objects(gcs_emulator, f"{gcs_bucket}/theirs.zarr")
    assert sorted(ours_objects) == sorted(theirs_objects)  # the same chunks (and shards) left out
    if kind == "raw-unsharded":
        assert ours_objects == theirs_objects
    assert zarr.open_array(cloudio.zarr_store(f"{gcs_bucket}/ours.zarr"), mode="r")[...].tobytes() == a.tobytes()
    assert cloudio.load_array(f"{gcs_bucket}/theirs.zarr").tobytes() == a.tobytes()


@pytest.mark.parametrize("batch", [1, 3, 8])
@pytest.mark.parametrize("index_at", ["end", "start"])
def test_zstd_chunks_compressed_in_batches_read_back_bit_exact(
    gcs_emulator: Emulator, gcs_bucket: str, monkeypatch: pytest.MonkeyPatch, batch: int, index_at: str
) -> None:
    """A small shard's chunks (its shards go up in one batch) are compressed a batch at a time, whatever
    is left at the end as a smaller one: zarr reads every shard bit-exactly (chunks left out, edges cut),
    the same objects are stored, and at the array's zstd level (sizes within 1% of zarr's own)."""
    monkeypatch.setattr(shard_codec, "_BATCH", batch)
    a = np.round(_data("float32", 0.0) * 8) / 8
    a[512:640, 0:256] = 0.0  # two chunks of fill at the start of shard (2, 0)
    codecs = [zarr.codecs.BytesCodec(), zarr.codecs.ZstdCodec(level=3)]
    kw: dict[str, object] = {"chunks": SHARDS, "compressors": None, "serializer": zarr.codecs.ShardingCodec(
        chunk_shape=CHUNKS, codecs=codecs, index_location=index_at)}
    ours = cloudio.save_array(a, f"{gcs_bucket}/ours.zarr", **kw)
    layout = plain_layout(ours)
    assert layout is not None and layout.zstd is not None and shard_codec.in_one_batch(ours.store, layout)
    theirs = zarr.create_array(cloudio.zarr_store(f"{gcs_bucket}/theirs.zarr"), shape=a.shape, dtype=a.dtype,
                               **kw)  # type: ignore[arg-type]
    theirs[...] = a
    ours_objects = _objects(gcs_emulator, f"{gcs_bucket}/ours.zarr")
    theirs_objects = _objects(gcs_emulator, f"{gcs_bucket}/theirs.zarr")
    assert sorted(ours_objects) == sorted(theirs_objects)
    for key, size in theirs_objects.items():
        assert abs(ours_objects[key] - size) <= size // 100, key
    assert zarr.open_array(cloudio.zarr_store(f"{gcs_bucket}/ours.zarr"), mode="r")[...].tobytes() == a.tobytes()
    assert cloudio.load_array(f"{gcs_bucket}/theirs.zarr").tobytes() == a.tobytes()


def _chunks_in_shards(emu: Emulator, url: str, per_shard: int) -> dict[str, set[int]]:
    """Per stored shard (index at the end), the chunks its index holds (by their place in the index)."""
    bucket, prefix = url.removeprefix("gs://").split("/", 1)
    held = {}
    for b in emu.client.list_blobs(bucket, prefix=prefix + "/c/"):
        raw = b.download_as_bytes()
        index = np.frombuffer(raw[-(16 * per_shard + 4):-4], dtype="<u8").reshape(-1, 2)
        held[b.name.removeprefix(prefix + "/")] = {k for k in range(per_shard) if index[k, 0] != 2**64 - 1}
    return held


def _ragged_2d(fill: float) -> np.ndarray:
    a = np.round(np.random.default_rng(3).standard_normal((1100, 2100)).astype("f4") * 8) / 8
    a[128:256, 256:384] = fill  # a chunk of fill inside shard (0, 0), wholly inside the array
    a[512:1024, 1024:2048] = fill  # a whole shard of it: not written
    a[1024:, :128] = fill  # fill at the ragged edge
    return a


_BANDED = {  # name: (array, save_array's arguments); every shard of at least a MiB, so encoded in bands
    "2d-ragged": (lambda: _ragged_2d(0.0), {"chunks": (128, 128), "shards": (512, 1024)}),
    "2d-nan": (lambda: _ragged_2d(np.nan), {"chunks": (128, 128), "shards": (512, 1024), "fill_value": np.nan}),
    "3d": (lambda: np.round(np.random.default_rng(5).standard_normal((40, 300, 260)) * 4).astype("f4"),
           {"chunks": (8, 64, 64), "shards": (16, 128, 256)}),
    "1d": (lambda: np.arange(1_100_000, dtype="f4") // 7, {"chunks": (10_000,), "shards": (500_000,)}),
    "big-endian": (lambda: _ragged_2d(0.0).astype(">f4"), {"chunks": (128, 128), "shards": (512, 1024)}),
    "fortran-order": (lambda: np.asfortranarray(_ragged_2d(0.0)), {"chunks": (128, 128), "shards": (512, 1024)}),
}


@pytest.mark.parametrize("band", ["a-chunk", "a-row", "three-rows", "the-shard"])
@pytest.mark.parametrize("case", sorted(_BANDED))
def test_zstd_shards_encoded_in_bands_are_what_zarr_writes(gcs_emulator: Emulator, gcs_bucket: str,
                                                          monkeypatch: pytest.MonkeyPatch, case: str,
                                                          band: str) -> None:
    """Shards of zstd chunks are encoded a band of chunks at a time by every coder thread: rows of chunks
    where the shard lies wholly inside the array, runs of chunks at its edges. Whatever the band, zarr
    reads the array bit-exactly, and the same shards hold the same chunks as zarr's own (empty ones left
    out, edges cut); cloudio reads zarr's back."""
    a, kw = _BANDED[case][0](), {**_BANDED[case][1], "compressors": zarr.codecs.ZstdCodec(level=3)}
    chunks, shards = kw["chunks"], kw["shards"]
    assert isinstance(chunks, tuple) and isinstance(shards, tuple)
    row = math.prod(s // c for s, c in zip(shards[1:], chunks[1:], strict=True)) * math.prod(chunks) * 4
    monkeypatch.setattr(shard_codec, "_BAND_BYTES", {"a-chunk": 1, "a-row": row, "three-rows": 3 * row,
                                                     "the-shard": 1 << 40}[band])
    ours = cloudio.save_array(a, f"{gcs_bucket}/ours.zarr", **kw)
    layout = plain_layout(ours)
    assert layout is not None and layout.zstd is not None and not shard_codec.in_one_batch(ours.store, layout)
    theirs = zarr.create_array(cloudio.zarr_store(f"{gcs_bucket}/theirs.zarr"), shape=a.shape, dtype=a.dtype,
                               **kw)  # type: ignore[arg-type]
    theirs[...] = a
    per_shard = math.prod(s // c for s, c in zip(shards, chunks, strict=True))
    assert (_chunks_in_shards(gcs_emulator, f"{gcs_bucket}/ours.zarr", per_shard)
            == _chunks_in_shards(gcs_emulator, f"{gcs_bucket}/theirs.zarr", per_shard))
    native = a.astype(a.dtype.newbyteorder("="))  # values, NaN payloads and all, whatever the byte order

    def same(b: np.ndarray) -> bool:
        return b.astype(native.dtype).tobytes() == native.tobytes()

    assert same(zarr.open_array(cloudio.zarr_store(f"{gcs_bucket}/ours.zarr"), mode="r")[...])
    assert same(cloudio.load_array(f"{gcs_bucket}/theirs.zarr"))


def test_a_zstd_shard_flipped_on_the_way_up_every_time_is_an_integrity_error(gcs_emulator: Emulator,
                                                                            gcs_bucket: str, fault_proxy) -> None:
    """Shards encoded in bands go up CRC32C-checked like any other: a copy the server stored damaged is
    deleted and never journaled as written."""
    from cloudio._journal import journal

    url = f"{gcs_bucket}/bad-zup.zarr"
    seq = journal().seq
    fault_proxy.add("flip", where="request", method="POST", path=_SHARD_UPLOAD, times=None)
    with pytest.raises(IntegrityError, match=r"bad-zup\.zarr/c/\d+/\d+.*CRC32C") as ei:
        cloudio.save_array(_ragged_2d(0.0), url, chunks=(128, 128), shards=(512, 1024),
                           compressors=zarr.codecs.ZstdCodec(level=3))
    shard = "gs://" + str(ei.value).removeprefix("gs://").split(":", 1)[0]
    bucket, key = shard.removeprefix("gs://").split("/", 1)
    assert gcs_emulator.client.bucket(bucket).get_blob(key) is None  # the corrupt copy is gone
    assert (shard, "write") not in _journaled(url, seq)
    assert (shard, "delete") in _journaled(url, seq)


def test_a_damaged_zstd_chunk_is_an_integrity_error_naming_it(gcs_emulator: Emulator, gcs_bucket: str) -> None:
    a = _data("float32", 0.0)
    url = f"{gcs_bucket}/badz.zarr"
    cloudio.save_array(a, url, chunks=CHUNKS)  # unsharded, zstd
    cloudio.filesystem(url).pipe(f"{url}/c/1/1", b"not a zstd frame")
    with pytest.raises(IntegrityError, match=r"badz\.zarr/c/1/1.*zstd"):
        cloudio.load_array(url)


@pytest.mark.parametrize("damage", ["frame", "size"])
def test_a_damaged_zstd_chunk_inside_a_shard_is_an_integrity_error_naming_it(
        gcs_emulator: Emulator, gcs_bucket: str, damage: str) -> None:
    """A shard's chunks are decompressed several per call; when one of them is damaged, the error still
    names that chunk, not the batch (the index's CRC32C covers only the index)."""
    a = np.round(_data("float32", 0.0) * 8) / 8
    url = f"{gcs_bucket}/badzs.zarr"
    cloudio.save_array(a, url, chunks=CHUNKS, shards=(512, 1024), compressors=zarr.codecs.ZstdCodec(level=3))
    bucket, prefix = url.removeprefix("gs://").split("/", 1)
    raw = bytearray(gcs_emulator.client.bucket(bucket).blob(f"{prefix}/c/0/0").download_as_bytes())
    index = np.frombuffer(bytes(raw[-(32 * 16 + 4):-4]), dtype="<u8").reshape(4, 8, 2)
    offset, nbytes = (int(v) for v in index[1, 2])
    if damage == "frame":
        raw[offset:offset + 4] = b"\x00" * 4  # no zstd magic number
    else:  # a valid frame of another size in its place
        import zstandard

        other = zstandard.ZstdCompressor().compress(b"\x00" * 100)
        raw[offset:offset + nbytes] = other + b"\x00" * (nbytes - len(other))
    cloudio.filesystem(url).pipe(f"{url}/c/0/0", bytes(raw))
    named = r"badzs\.zarr/c/0/0: chunk \(1, 2\) (is not a valid zstd|decompresses to 100)"
    with pytest.raises(IntegrityError, match=named):
        cloudio.load_array(url)


def test_other_layouts_are_left_to_zarr(gcs_bucket: str) -> None:
    from zarr.codecs import BloscCodec

    a = _data("float32", 0.0)
    blosc = cloudio.save_array(a, f"{gcs_bucket}/b.zarr", chunks=CHUNKS, shards=SHARDS, compressors=BloscCodec())
    v2 = cloudio.save_array(a, f"{gcs_bucket}/v2.zarr", chunks=CHUNKS, zarr_format=2, compressors=None)
    assert [plain_layout(z) for z in (blosc, v2)] == [None, None]
    for name in ("b", "v2"):
        assert cloudio.load_array(f"{gcs_bucket}/{name}.zarr").tobytes() == a.tobytes()


# -- every shard is CRC32C-checked on the way up and on the way down ------------------------------

_SHARD_UPLOAD = r"/upload/.*uploadType=\w+&name=[^&]*(/|%2F)c(/|%2F)"  # a shard's upload
_SHARD_GET = r"/o/[^?]*%2Fc%2F"


#: shards under a MiB are uploaded on the event loop, larger ones from sender threads
#: (cloudio._gcs.fast.post_upload); here the limit is 0 for the second
BOTH_UPLOAD_PATHS = pytest.mark.parametrize("small_upload", [1 << 20, 0], ids=["loop", "threads"])


def _journaled(url: str, since: int) -> list[tuple[str, str]]:
    from cloudio._journal import journal

    return [(c.url, c.kind) for c in journal().since(since) if c.url.startswith(url + "/c/")]


def test_shards_go_up_as_one_media_request_each_needing_the_generation_listed(gcs_emulator: Emulator,
                                                                              gcs_bucket: str,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """One media upload per shard (no multipart body is built around it: cloudio._gcs.fast.upload_form), guarded
    (``ifGenerationMatch``) by the generation the write listed: 0 for a new array, the stored shard's when
    rewritten (see JournaledStore.expecting). The request cloudio sends to GCS, not the tests' multipart one."""
    from cloudio._gcs import fast

    monkeypatch.setattr(fast, "EXPECTED_AS_MULTIPART", False)
    a = _data("float32", 0.0)
    url = f"{gcs_bucket}/media.zarr"
    bucket = gcs_emulator.client.bucket(gcs_bucket[5:])
    generations: list[dict[str, str]] = []
    stored: list[dict[str, str]] = []
    for _ in range(2):
        n0 = len(gcs_emulator.requests())
        cloudio.save_array(a, url, chunks=CHUNKS, shards=SHARDS, compressors=None)
        ups = [r for r in gcs_emulator.requests()[n0:] if r.method == "POST" and "/upload/" in r.path]
        shards = [r for r in ups if "%2Fc%2F" in r.path.partition("name=")[2]]
        assert len(shards) == 4 * 3 - 1  # every shard but the all-fill one, once
        assert all("uploadType=media" in r.path and r.status == 200 for r in shards), shards
        guards = [re.search(r"name=([^&]*)&ifGenerationMatch=(\d+)", r.path) for r in shards]
        assert all(guards), [r.path for r in shards]
        generations.append(dict(g.groups() for g in guards if g))
        stored.append({quote(b.name, safe=""): str(b.generation) for b in bucket.list_blobs(prefix="media.zarr/c/")})
        assert zarr.open_array(cloudio.zarr_store(url), mode="r")[...].tobytes() == a.tobytes()
    assert set(generations[0].values()) == {"0"}
    assert generations[1] == stored[0]  # the rewrite needed each shard as the first write left it


@BOTH_UPLOAD_PATHS
def test_a_shard_flipped_on_the_way_up_once_is_sent_again(gcs_emulator: Emulator, gcs_bucket: str, fault_proxy,
                                                          monkeypatch: pytest.MonkeyPatch, small_upload: int) -> None:
    from cloudio._gcs import fast

    monkeypatch.setattr(fast, "_SMALL_UPLOAD", small_upload)
    a = _data("float32", 0.0)
    url = f"{gcs_bucket}/up.zarr"
    rule = fault_proxy.add("flip", where="request", method="POST", path=_SHARD_UPLOAD, times=1)
    cloudio.save_array(a, url, chunks=CHUNKS, shards=SHARDS, compressors=None)
    assert rule.hits == 1
    fault_proxy.clear()
    back = zarr.open_array(cloudio.zarr_store(url), mode="r")[...]  # zarr's own reader
    assert back.tobytes() == a.tobytes()


@BOTH_UPLOAD_PATHS
def test_a_shard_flipped_on_the_way_up_every_time_is_an_integrity_error(gcs_emulator: Emulator, gcs_bucket: str,
                                                                       fault_proxy, monkeypatch: pytest.MonkeyPatch,
                                                                       small_upload: int) -> None:
    from cloudio._gcs import fast
    from cloudio._journal import journal

    monkeypatch.setattr(fast, "_SMALL_UPLOAD", small_upload)

    a = _data("float32", 0.0)
    url = f"{gcs_bucket}/bad-up.zarr"
    seq = journal().seq
    fault_proxy.add("flip", where="request", method="POST", path=_SHARD_UPLOAD, times=None)
    with pytest.raises(IntegrityError, match=r"bad-up\.zarr/c/\d+/\d+.*CRC32C") as ei:
        cloudio.save_array(a, url, chunks=CHUNKS, shards=SHARDS, compressors=None)
    shard = str(ei.value).split(":", 2)[0] + ":" + str(ei.value).split(":", 2)[1]
    bucket, key = shard.removeprefix("gs://").split("/", 1)
    assert gcs_emulator.client.bucket(bucket).get_blob(key) is None  # the corrupt copy is gone
    assert (shard, "write") not in _journaled(url, seq)  # never journaled as good
    assert (shard, "delete") in _journaled(url, seq)


@BOTH_UPLOAD_PATHS
@pytest.mark.parametrize("fault", [{"fault": "status", "code": 503, "times": 2},
                                   {"fault": "status", "code": 429, "times": 1},
                                   {"fault": "reset", "after": 5, "times": 1}],
                         ids=["503x2", "429", "reset-mid-answer"])
def test_a_shard_upload_that_failed_transiently_is_sent_again(gcs_emulator: Emulator, gcs_bucket: str, fault_proxy,
                                                             monkeypatch: pytest.MonkeyPatch,
                                                             fault: dict[str, object], small_upload: int) -> None:
    from cloudio._gcs import fast

    monkeypatch.setattr(fast, "_SMALL_UPLOAD", small_upload)
    a = _data("float32", 0.0)
    url = f"{gcs_bucket}/again.zarr"
    rule = fault_proxy.add(method="POST", path=_SHARD_UPLOAD, **fault)
    cloudio.save_array(a, url, chunks=CHUNKS, shards=SHARDS, compressors=None)
    assert rule.hits == fault["times"]
    fault_proxy.clear()
    assert zarr.open_array(cloudio.zarr_store(url), mode="r")[...].tobytes() == a.tobytes()


@BOTH_UPLOAD_PATHS
def test_a_shard_upload_the_server_never_answers_is_a_transient_error_in_bounded_time(
        gcs_emulator: Emulator, gcs_bucket: str, fault_proxy, monkeypatch: pytest.MonkeyPatch,
        small_upload: int) -> None:
    import time

    from cloudio._gcs import fast

    monkeypatch.setattr(fast, "_SMALL_UPLOAD", small_upload)
    monkeypatch.setenv("CLOUDIO_HTTP_TIMEOUT", "1")
    url = f"{gcs_bucket}/hung-up.zarr"
    fault_proxy.add("hang", method="POST", path=_SHARD_UPLOAD, times=None)
    t0 = time.monotonic()
    with pytest.raises(cloudio.TransientError, match=r"hung-up\.zarr/c/\d+/\d+.*may or may not have been stored"):
        cloudio.save_array(_data("float32", 0.0), url, chunks=CHUNKS, shards=SHARDS, compressors=None)
    assert time.monotonic() - t0 < 30  # a few times the limit, far from forever


@pytest.mark.parametrize("fault", [{"fault": "status", "code": 503}, {"fault": "flip", "where": "request"},
                                   {"fault": "reset", "after": 5}, {"fault": "hang"}],
                         ids=["503", "flipped", "reset-mid-answer", "never-answered"])
def test_a_small_shard_upload_that_failed_is_the_only_one_sent_again(gcs_emulator: Emulator, gcs_bucket: str,
                                                                     fault_proxy, monkeypatch: pytest.MonkeyPatch,
                                                                     fault: dict[str, object]) -> None:
    """Shards under a MiB go up in one batch over kept connections; the one whose upload failed (or whose
    answer never came, past the time limit) is sent again on its own, every other once, each journaled
    once as written."""
    from cloudio._journal import journal

    monkeypatch.setenv("CLOUDIO_HTTP_TIMEOUT", "1")
    a = _data("float32", 0.0)
    url = f"{gcs_bucket}/batch.zarr"
    rule = fault_proxy.add(method="POST", path=_SHARD_UPLOAD, times=1, skip=3, **fault)
    seq = journal().seq
    cloudio.save_array(a, url, chunks=CHUNKS, shards=SHARDS, compressors=None)
    assert rule.hits == 1
    names = [p.partition("name=")[2].partition("&")[0] for _, p, _ in fault_proxy.requests(_SHARD_UPLOAD)]
    assert len(names) == 12 and len(set(names)) == 11  # every shard but the all-fill one; one sent twice
    written = _journaled(url, seq)
    assert sorted(written) == sorted({(u, "write") for u, _ in written})  # one write each, nothing else
    assert len(written) == 11
    fault_proxy.clear()
    assert zarr.open_array(cloudio.zarr_store(url), mode="r")[...].tobytes() == a.tobytes()


def test_a_batch_whose_every_connection_failed_sends_the_rest_the_careful_way(
        gcs_emulator: Emulator, gcs_bucket: str, fault_proxy) -> None:
    """The first ten uploads (one per connection of the batch) are reset: no connection is left for the
    eleventh shard, never sent; all eleven go again one at a time, and the array reads back whole."""
    a = _data("float32", 0.0)
    url = f"{gcs_bucket}/all-failed.zarr"
    rule = fault_proxy.add("reset", method="POST", path=_SHARD_UPLOAD, after=5, times=10)
    cloudio.save_array(a, url, chunks=CHUNKS, shards=SHARDS, compressors=None)
    assert rule.hits == 10
    assert len(fault_proxy.requests(_SHARD_UPLOAD)) == 10 + 11
    fault_proxy.clear()
    assert zarr.open_array(cloudio.zarr_store(url), mode="r")[...].tobytes() == a.tobytes()


#: float32 shards (512 KiB) are read on the event loop, float64 ones (1 MiB) in threads (shard_codec.read)
BOTH_READ_PATHS = pytest.mark.parametrize("dtype", ["float32", "float64"], ids=["loop", "threads"])


@BOTH_READ_PATHS
@pytest.mark.parametrize("times", [1, None])
def test_a_shard_flipped_on_the_way_down(gcs_emulator: Emulator, gcs_bucket: str, fault_proxy,
                                         times: int | None, dtype: str) -> None:
    a = _data(dtype, 0.0)
    url = f"{gcs_bucket}/down.zarr"
    cloudio.save_array(a, url, chunks=CHUNKS, shards=SHARDS, compressors=None)
    rule = fault_proxy.add("flip", method="GET", path=_SHARD_GET, times=times)
    if times == 1:
        assert cloudio.load_array(url).tobytes() == a.tobytes()  # read again, correct
        assert rule.hits == 1
    else:
        with pytest.raises(IntegrityError, match=r"down\.zarr/c/\d+/\d+.*CRC32C"):
            cloudio.load_array(url)


@BOTH_READ_PATHS
@pytest.mark.parametrize("fault", [{"fault": "reset", "after": 1000, "times": 1},
                                   {"fault": "status", "code": 503, "times": 2},
                                   {"fault": "status", "code": 429, "times": 1}])
def test_a_shard_read_that_fails_on_the_way_is_retried(gcs_emulator: Emulator, gcs_bucket: str, fault_proxy,
                                                       fault: dict[str, object], dtype: str) -> None:
    a = _data(dtype, 0.0)
    url = f"{gcs_bucket}/retried.zarr"
    cloudio.save_array(a, url, chunks=CHUNKS, shards=SHARDS, compressors=None)
    rule = fault_proxy.add(method="GET", path=_SHARD_GET, **fault)
    assert cloudio.load_array(url).tobytes() == a.tobytes()
    assert rule.hits == fault["times"]


@pytest.mark.parametrize("framing", [
    {"fault": "chunked", "after": 5000}, {"fault": "unsized"}, {"fault": "trickle", "after": 7},
    {"fault": "chunked", "after": 3000, "piece": 5}, {"fault": "unsized", "piece": 997},
], ids=["chunked", "ended-by-close", "sized-in-pieces", "chunked-in-pieces", "ended-by-close-in-pieces"])
def test_small_object_reads_take_every_http_framing(gcs_emulator: Emulator, gcs_bucket: str, fault_proxy,
                                                     framing: dict[str, object]) -> None:
    """Bodies sent in chunks (with extensions and a trailer) or ended by closing the connection read whole;
    so do answers that arrive a few bytes at a time (a head, a chunk size or a CRLF split between reads)."""
    a = _data("float32", 0.0)
    url = f"{gcs_bucket}/framed.zarr"
    cloudio.save_array(a, url, chunks=CHUNKS, shards=SHARDS, compressors=None)
    rule = fault_proxy.add(method="GET", path=_SHARD_GET, times=None, **framing)
    assert cloudio.load_array(url).tobytes() == a.tobytes()
    assert rule.hits == 12  # every shard (the one of fill values a 404) came so framed


@BOTH_READ_PATHS
def test_a_shard_read_the_server_never_answers_is_a_transient_error_in_bounded_time(
        gcs_emulator: Emulator, gcs_bucket: str, fault_proxy, monkeypatch: pytest.MonkeyPatch, dtype: str) -> None:
    import asyncio
    import time

    monkeypatch.setenv("CLOUDIO_HTTP_TIMEOUT", "1")
    a = _data(dtype, 0.0)
    url = f"{gcs_bucket}/hung.zarr"
    cloudio.save_array(a, url, chunks=CHUNKS, shards=SHARDS, compressors=None)
    fault_proxy.add("hang", method="GET", path=_SHARD_GET, times=None)
    t0 = time.monotonic()
    with pytest.raises(cloudio.TransientError, match=r"hung\.zarr/c/\d+/\d+.*read failed") as ei:
        cloudio.load_array(url)
    assert time.monotonic() - t0 < 30  # 3 x the limit, far from forever
    assert isinstance(ei.value.__cause__, TimeoutError | asyncio.TimeoutError)


@pytest.mark.parametrize("fault", [{"fault": "status", "code": 503}, {"fault": "flip"},
                                   {"fault": "reset", "after": 1000}], ids=["503", "flipped", "reset"])
def test_a_small_object_read_that_failed_is_the_only_one_asked_again(gcs_emulator: Emulator, gcs_bucket: str,
                                                                      fault_proxy, fault: dict[str, object]) -> None:
    """Small objects are read in one batch over kept connections; the one that failed goes the careful way
    (retried on its own) and every other object is asked for once."""
    a = _data("float32", 0.0)
    url = f"{gcs_bucket}/one.zarr"
    cloudio.save_array(a, url, chunks=CHUNKS, shards=SHARDS, compressors=None)
    rule = fault_proxy.add(method="GET", path=r"/o/[^?]*%2Fc%2F2%2F1\?", times=1, **fault)  # one shard (not the 404)
    n = len(fault_proxy.requests(_SHARD_GET))
    assert cloudio.load_array(url).tobytes() == a.tobytes()
    paths = [p for _, p, _ in fault_proxy.requests(_SHARD_GET)[n:]]
    assert rule.hits == 1
    assert len(paths) == 13 and len(set(paths)) == 12  # 12 shards (one of fill values, a 404), one asked twice


def test_a_small_object_the_server_never_answers_is_asked_again_after_the_time_limit(
        gcs_emulator: Emulator, gcs_bucket: str, fault_proxy, monkeypatch: pytest.MonkeyPatch) -> None:
    """One request of the batch hangs: the batch's watch ends it after the per-request limit and the object
    is read again; the read completes, neither hung nor failed."""
    import time

    monkeypatch.setenv("CLOUDIO_HTTP_TIMEOUT", "1")
    a = _data("float32", 0.0)
    url = f"{gcs_bucket}/once.zarr"
    cloudio.save_array(a, url, chunks=CHUNKS, shards=SHARDS, compressors=None)
    rule = fault_proxy.add("hang", method="GET", path=r"/o/[^?]*%2Fc%2F2%2F1\?", times=1)
    t0 = time.monotonic()
    assert cloudio.load_array(url).tobytes() == a.tobytes()
    assert rule.hits == 1
    assert 1 <= time.monotonic() - t0 < 10


def test_small_object_reads_take_new_connections_when_the_server_closed_the_kept_ones(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Small objects are read over kept keep-alive streams; a server that went away (here: restarted
    on the same port) closed them, and the next read opens new ones without spending a retry."""
    import logging
    from urllib.parse import urlsplit

    monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)  # a server of this test's own
    monkeypatch.delenv("CLOUDIO_EMULATOR", raising=False)
    a = _data("float32", 0.0)
    root = tmp_path / "gcs"
    with Emulator(backend="filesystem", root=root) as first:
        first.create_bucket("kept")
        cloudio.save_array(a, "gs://kept/a.zarr", chunks=CHUNKS, shards=SHARDS, compressors=None)
        assert cloudio.load_array("gs://kept/a.zarr").tobytes() == a.tobytes()  # streams kept now
        port = urlsplit(first.url).port
    with Emulator(backend="filesystem", root=root, port=port) as second, caplog.at_level(logging.DEBUG, "cloudio"):
        n = len(second.requests())
        assert cloudio.load_array("gs://kept/a.zarr").tobytes() == a.tobytes()
        shard_gets = [r for r in second.requests()[n:] if "/c/" in r.path or "%2Fc%2F" in r.path]
    shards = [-(-n // s) for n, s in zip(a.shape, SHARDS, strict=True)]
    assert len(shard_gets) == len({r.path for r in shard_gets}) == shards[0] * shards[1]  # each GET once
    assert not [r for r in caplog.records if "retrying" in r.getMessage()]


@BOTH_READ_PATHS
def test_a_requester_pays_store_names_its_project_on_every_request(gcs_emulator: Emulator, gcs_bucket: str,
                                                                    fault_proxy, dtype: str) -> None:
    """Requests cloudio sends outside gcsfs's session carry what gcsfs adds to its own (``userProject``)."""
    a = _data(dtype, 0.0)
    store = cloudio.zarr_store(f"{gcs_bucket}/paid.zarr", requester_pays="my-project")
    cloudio.save_array(a, store, chunks=CHUNKS, shards=SHARDS, compressors=None)
    assert cloudio.load_array(store).tobytes() == a.tobytes()
    sent = [p for _, p, _ in fault_proxy.requests(r"paid\.zarr")]
    assert len(sent) > 20  # the marker, the documents, every shard up and down
    assert [p for p in sent if "userProject=my-project" not in p] == []


@pytest.mark.parametrize("name", ["plain_name-1.zarr", "with space.zarr", "ünï.zarr", "plus+percent%.zarr"])
def test_small_chunks_are_read_from_the_url_gcsfs_would_use(gcs_emulator: Emulator, gcs_bucket: str,
                                                           name: str) -> None:
    """Chunks under a MiB are read in one batch (cloudio._gcs.fast.get_each), which builds plain names'
    URLs itself: every GET goes to the URL gcsfs's ``fs.url`` gives for that chunk, and reads it back."""
    from urllib.parse import urlsplit

    a = np.arange(200 * 300, dtype="f4").reshape(200, 300)
    url = f"{gcs_bucket}/{name}"
    cloudio.save_array(a, url, chunks=(100, 100), shards=None, compressors=None)
    n0 = len(gcs_emulator.requests())
    np.testing.assert_array_equal(cloudio.load_array(url), a)
    fs = cloudio.filesystem(url)
    want = {urlsplit(fs.url(f"{url.removeprefix('gs://')}/c/{i}/{j}")) for i in range(2) for j in range(3)}
    got = [r.path for r in gcs_emulator.requests()[n0:] if r.method == "GET" and "alt=media" in r.path]
    assert sorted(p for p in got if "zarr.json" not in p and "cloudio-write" not in p) == sorted(
        f"{u.path}?{u.query}" for u in want)


def test_no_chunk_is_asked_for_again_after_a_small_read_raised(gcs_emulator: Emulator, gcs_bucket: str,
                                                                 fault_proxy, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two chunks left out of the batch go the careful way side by side: one is refused (403), the other keeps
    answering 503. The read raises the refusal, as cloudio's ReadError, and the other's retries stop with it."""
    import time

    from cloudio._gcs import fast
    from cloudio._zarr import last_seen

    monkeypatch.setattr(fast, "BACKOFF", 0.5)
    url = f"{gcs_bucket}/stops.zarr"
    cloudio.save_array(_data("float32", 0.0), url, chunks=CHUNKS, compressors=None)  # unsharded: small chunks
    last_seen.forget_all()
    fault_proxy.add("status", code=403, method="GET", path=r"stops\.zarr%2Fc%2F0%2F0\?", times=None)
    fault_proxy.add("status", code=503, method="GET", path=r"stops\.zarr%2Fc%2F0%2F1\?", times=None)
    with pytest.raises(cloudio.ReadError, match=r"stops\.zarr: the server refused a read") as info:
        cloudio.load_array(url)
    assert type(info.value.__cause__) is OSError  # gcsfs's mapping of the 403
    time.sleep(0.2)  # a GET sent just before the read raised reaches the proxy's log (a retry comes 0.5 s later)
    asked = len(fault_proxy.requests(r"stops\.zarr%2Fc%2F0%2F1\?"))
    time.sleep(2.0)  # past the next back-off
    assert len(fault_proxy.requests(r"stops\.zarr%2Fc%2F0%2F1\?")) == asked
