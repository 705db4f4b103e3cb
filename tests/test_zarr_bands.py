"""zstd shards of at least a MiB, encoded in bands by every coder thread (cloudio._zarr.shard_codec).

Each write is compared with zarr's own write of the same array (the same shards, holding the same chunks,
each decompressing to the same bytes) and read back by zarr and by cloudio. Faults come from the proxy
in front of the real emulator (tests/faultproxy.py).
"""

from __future__ import annotations

import math
import threading

import numpy as np
import pytest
import zarr
import zstandard
from zarr.codecs import BytesCodec, ShardingCodec, ZstdCodec

import cloudio
from cloudio._zarr import shard_codec
from cloudio._zarr.buffers import shard_buffers
from cloudio._zarr.shard_codec import plain_layout
from cloudio.emulator import Emulator


def _stored_chunks(emu: Emulator, url: str, per_shard: tuple[int, ...], index_at_end: bool = True
                   ) -> dict[str, dict[tuple[int, ...], bytes]]:
    """Per stored shard, each chunk its index holds (by place) and that chunk's bytes, decompressed."""
    bucket, prefix = url.removeprefix("gs://").split("/", 1)
    n = math.prod(per_shard)
    d = zstandard.ZstdDecompressor()
    held: dict[str, dict[tuple[int, ...], bytes]] = {}
    for b in emu.client.list_blobs(bucket, prefix=prefix + "/c/"):
        raw = b.download_as_bytes()
        idx = raw[-(16 * n + 4):-4] if index_at_end else raw[:16 * n]
        index = np.frombuffer(idx, dtype="<u8").reshape(*per_shard, 2)
        chunks = {}
        for place in np.ndindex(*per_shard):
            off, size = (int(v) for v in index[place])
            if off != 2**64 - 1:
                chunks[place] = d.decompress(raw[off:off + size])
        held[b.name.removeprefix(prefix + "/")] = chunks
    return held


def _same_as_zarr(emu: Emulator, bucket: str, a: np.ndarray, name: str, **kw: object) -> None:
    """save_array of ``a`` (through the banded path) stores the chunks zarr's own write stores, and both
    read back bit-exactly through zarr and through cloudio."""
    ours_url, theirs_url = f"{bucket}/{name}-ours.zarr", f"{bucket}/{name}-theirs.zarr"
    ours = cloudio.save_array(a, ours_url, **kw)
    layout = plain_layout(ours)
    assert layout is not None and layout.zstd is not None and layout.sharded
    assert not shard_codec.in_one_batch(ours.store, layout)  # the banded path
    theirs = zarr.create_array(cloudio.zarr_store(theirs_url), shape=a.shape, dtype=a.dtype,
                               **kw)  # type: ignore[arg-type]
    theirs[...] = a
    mine = _stored_chunks(emu, ours_url, layout.per_shard, layout.index_at_end)
    zarrs = _stored_chunks(emu, theirs_url, layout.per_shard, layout.index_at_end)
    assert {k: sorted(v) for k, v in mine.items()} == {k: sorted(v) for k, v in zarrs.items()}  # same chunks
    assert mine == zarrs  # and the same bytes in each
    native = np.ascontiguousarray(a).astype(a.dtype.newbyteorder("="))
    back = zarr.open_array(cloudio.zarr_store(ours_url), mode="r")[...]
    assert back.dtype == native.dtype and back.tobytes() == native.tobytes()
    assert cloudio.load_array(theirs_url).tobytes() == native.tobytes()
    assert cloudio.load_array(ours_url).tobytes() == native.tobytes()


def _zstd(**kw: object) -> dict[str, object]:
    return {"compressors": ZstdCodec(level=3, **kw)}  # type: ignore[arg-type]


def _patterned(shape: tuple[int, ...], dtype: str, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    dt = np.dtype(dtype)
    if dt.kind == "b":
        return rng.integers(0, 2, size=shape).astype(bool)
    if dt.kind in "iu":
        info = np.iinfo(dt)
        return rng.integers(max(info.min, -100), min(info.max, 100), size=shape, endpoint=True).astype(dt)
    if dt.kind == "c":
        return (np.round(rng.standard_normal(shape) * 4) + 1j * np.round(rng.standard_normal(shape) * 4)).astype(dt)
    return (np.round(rng.standard_normal(shape) * 8) / 8).astype(dt)


def _with_fill_blocks(a: np.ndarray, fill: object, chunk: tuple[int, int], shard: tuple[int, int]) -> np.ndarray:
    """A chunk of fill inside the first shard, a whole shard of it, and fill at the ragged corner."""
    a = a.copy()
    c0, c1 = chunk
    s0, s1 = shard
    a[c0:2 * c0, c1:2 * c1] = fill
    a[s0:2 * s0, s1:2 * s1] = fill
    a[-(a.shape[0] % c0 or c0):, -(a.shape[1] % c1 or c1):] = fill
    return a


# ---------------------------------------------------------------------------------------------------------------
# dtypes and fill values

_DTYPES = {  # name: (dtype, fill, chunks, shards); shards of a MiB or more
    "bool": ("bool", False, (128, 128), (1024, 1024)),
    "bool-fill-true": ("bool", True, (128, 128), (1024, 1024)),
    "int8": ("int8", -1, (128, 128), (1024, 1024)),
    "uint16": ("uint16", 65535, (128, 128), (512, 1024)),
    "int64-large": ("int64", 2**53 + 1, (64, 64), (512, 256)),
    "uint64-max": ("uint64", 2**64 - 1, (64, 64), (512, 256)),
    "complex64": ("complex64", 1 + 2j, (64, 64), (512, 256)),
    "float16-nan": ("float16", np.nan, (128, 128), (512, 1024)),
    "float64-nan": ("float64", np.nan, (64, 64), (512, 256)),
}


@pytest.mark.parametrize("case", sorted(_DTYPES))
def test_dtypes_and_fill_values_are_what_zarr_writes(gcs_emulator: Emulator, gcs_bucket: str, case: str) -> None:
    dtype, fill, chunks, shards = _DTYPES[case]
    shape = (2 * shards[0] + chunks[0] // 2 + 3, 2 * shards[1] + chunks[1] + 5)
    a = _with_fill_blocks(_patterned(shape, dtype), fill, chunks, shards)
    if dtype == "int64":  # a chunk of 2**53: equal to the fill value only when compared as float64
        a[0:64, 64:128] = 2**53
    if dtype == "uint64":
        a[0:64, 64:128] = 2**64 - 2
    _same_as_zarr(gcs_emulator, gcs_bucket, a, case, chunks=chunks, shards=shards, fill_value=fill, **_zstd())


@pytest.mark.parametrize(("fill", "other"), [(0.0, -0.0), (-0.0, 0.0)])
def test_a_chunk_of_the_other_zero_is_kept_as_zarr_keeps_it(gcs_emulator: Emulator, gcs_bucket: str,
                                                             fill: float, other: float) -> None:
    """zarr compares a float chunk with a fill value of zero bit for bit (zarr.core.buffer.core.NDBuffer.all_equal):
    a chunk of -0.0 under a fill value of 0.0 (or the reverse) is stored, and reads back with its sign
    (both where a shard's rows are laid out at once and at its ragged edge)."""
    a = _patterned((1100, 1100), "float32")
    a[128:256, 256:384] = other  # a chunk wholly inside a shard wholly inside the array (laid out by rows)
    a[1024:, 1024:] = other  # and one at the ragged corner (laid out chunk by chunk)
    _same_as_zarr(gcs_emulator, gcs_bucket, a, "zeros", chunks=(128, 128), shards=(512, 512), fill_value=fill,
                  **_zstd())


# ---------------------------------------------------------------------------------------------------------------
# configurations


def test_write_empty_chunks_true_is_what_zarr_writes(gcs_emulator: Emulator, gcs_bucket: str) -> None:
    a = _with_fill_blocks(_patterned((1100, 1100), "float32"), 0.0, (128, 128), (512, 512))
    with zarr.config.set({"array.write_empty_chunks": True}):
        _same_as_zarr(gcs_emulator, gcs_bucket, a, "empty", chunks=(128, 128), shards=(512, 512), **_zstd())


def test_an_index_at_the_start_is_what_zarr_writes(gcs_emulator: Emulator, gcs_bucket: str) -> None:
    a = _with_fill_blocks(_patterned((1100, 1100), "float32"), 0.0, (128, 128), (512, 512))
    serializer = ShardingCodec(chunk_shape=(128, 128), codecs=[BytesCodec(), ZstdCodec(level=3)],
                               index_location="start")
    _same_as_zarr(gcs_emulator, gcs_bucket, a, "start", chunks=(512, 512), serializer=serializer,
                  compressors=None)


def test_an_array_smaller_than_one_shard_is_what_zarr_writes(gcs_emulator: Emulator, gcs_bucket: str) -> None:
    a = _patterned((300, 700), "float32")
    a[:128, :128] = 0
    _same_as_zarr(gcs_emulator, gcs_bucket, a, "small", chunks=(128, 128), shards=(1024, 1024), **_zstd())


@pytest.mark.parametrize("shards", [(128, 4096), (128, 8192)])  # rows of one chunk row; a row above a band
def test_shards_one_chunk_deep_are_what_zarr_writes(gcs_emulator: Emulator, gcs_bucket: str,
                                                    shards: tuple[int, int]) -> None:
    a = _patterned((300, 9000), "float32")
    a[128:256, :] = 0  # a whole shard of fill
    a[0:128, 128:256] = 0
    _same_as_zarr(gcs_emulator, gcs_bucket, a, "deep", chunks=(128, 128), shards=shards, **_zstd())


def test_a_4d_array_is_what_zarr_writes(gcs_emulator: Emulator, gcs_bucket: str) -> None:
    a = _patterned((9, 20, 70, 140), "float64")
    a[0:2, 0:5, 0:32, 32:64] = 0
    a[4:8, 10:20, 0:64, 64:128] = 0  # a whole shard
    _same_as_zarr(gcs_emulator, gcs_bucket, a, "four", chunks=(2, 5, 32, 32), shards=(4, 10, 64, 64), **_zstd())


@pytest.mark.parametrize("view", ["every-other-row", "transposed", "negative-stride"])
def test_non_contiguous_inputs_are_what_zarr_writes(gcs_emulator: Emulator, gcs_bucket: str, view: str) -> None:
    base = _with_fill_blocks(_patterned((2200, 1100), "float32"), 0.0, (128, 128), (512, 512))
    a = {"every-other-row": base[::2], "transposed": base.T, "negative-stride": base[::-1, ::-1]}[view]
    _same_as_zarr(gcs_emulator, gcs_bucket, a, view, chunks=(128, 128), shards=(512, 512), **_zstd())


def test_zstd_checksums_are_what_zarr_writes(gcs_emulator: Emulator, gcs_bucket: str) -> None:
    a = _with_fill_blocks(_patterned((1100, 1100), "float32"), 0.0, (128, 128), (512, 512))
    _same_as_zarr(gcs_emulator, gcs_bucket, a, "sums", chunks=(128, 128), shards=(512, 512),
                  **_zstd(checksum=True))
    bucket, prefix = f"{gcs_bucket}/sums-ours.zarr".removeprefix("gs://").split("/", 1)
    raw = gcs_emulator.client.bucket(bucket).get_blob(f"{prefix}/c/0/0").download_as_bytes()
    params = zstandard.get_frame_parameters(raw)  # the first chunk's frame starts the shard
    assert params.has_checksum


# ---------------------------------------------------------------------------------------------------------------
# buffers, held uploads, failures

_SHARDS_OF = r"/upload/.*name={}%2Fc%2F"  # a shard upload of the array named (regex-escaped) {}


def _many_shards(n0: int, n1: int, seed: int = 4) -> np.ndarray:
    """n0 x n1 shards of 512 x 512 float32 (a MiB each, chunks of 128 x 128): compressible, no chunk empty."""
    return np.round(np.random.default_rng(seed).standard_normal((512 * n0, 512 * n1)).astype("f4") * 8) / 8 + 100


def _wait_for(cond, what: str, limit: float = 60.0) -> None:
    """Wait until ``cond()`` holds (a hang detector, generous: not a timing assertion)."""
    done = threading.Event()
    for _ in range(int(limit / 0.02)):
        if cond():
            return
        done.wait(0.02)
    raise AssertionError(f"never: {what}")


def test_a_banded_write_gives_every_shard_buffer_back(gcs_emulator: Emulator, gcs_bucket: str) -> None:
    a = _many_shards(2, 2)
    shard_buffers.clear()
    z = cloudio.save_array(a, f"{gcs_bucket}/given.zarr", chunks=(128, 128), shards=(512, 512), **_zstd())
    layout = plain_layout(z)
    assert layout is not None and not shard_codec.in_one_batch(z.store, layout)
    assert shard_buffers.kept() >= layout.shard_nbytes
    np.testing.assert_array_equal(cloudio.load_array(f"{gcs_bucket}/given.zarr"), a)


def test_forty_shards_with_their_uploads_held_all_go_up(gcs_emulator: Emulator, gcs_bucket: str,
                                                         fault_proxy) -> None:
    """Uploads held by the proxy fill the room for encoded shards; once they are let go, every shard goes up,
    no more than the room's worth were in flight at once, and the buffers come back."""
    a = _many_shards(5, 8)
    url = f"{gcs_bucket}/forty.zarr"
    release = threading.Event()
    held = fault_proxy.add("late", method="POST", path=_SHARDS_OF.format(r"forty\.zarr"), release=release,
                           seconds=25, times=None)
    room = int(zarr.config.get("async.concurrency"))
    out: dict[str, object] = {}

    def run() -> None:
        try:
            out["z"] = cloudio.save_array(a, url, chunks=(128, 128), shards=(512, 512), **_zstd())
        except BaseException as e:
            out["error"] = e

    shard_buffers.clear()
    t = threading.Thread(target=run)
    t.start()
    try:
        _wait_for(lambda: held.hits >= room, "the room's worth of uploads reached the proxy")
        threading.Event().wait(1.0)  # time for a shard beyond the room to be sent, were it let through
        in_flight = held.hits
    finally:
        release.set()
    t.join(120)
    assert not t.is_alive(), "save_array never returned"
    assert "error" not in out, out.get("error")
    assert in_flight == room
    assert held.hits == 40
    assert shard_buffers.kept() >= 1 << 20
    np.testing.assert_array_equal(cloudio.load_array(url), a)


def test_a_write_refused_in_the_middle_names_the_shard_and_the_next_write_goes_through(
        gcs_emulator: Emulator, gcs_bucket: str, fault_proxy, quick_retries) -> None:
    a = _many_shards(4, 2)
    url = f"{gcs_bucket}/middle.zarr"
    fault_proxy.add("status", code=403, method="POST", path=_SHARDS_OF.format(r"middle\.zarr") + "2%2F1",
                    times=None)
    with pytest.raises(cloudio.CloudioError) as info:
        cloudio.save_array(a, url, chunks=(128, 128), shards=(512, 512), **_zstd())
    assert f"{url}/c/2/1" in str(info.value)
    fault_proxy.clear()
    b = _many_shards(4, 2, seed=9)
    cloudio.save_array(b, url, chunks=(128, 128), shards=(512, 512), **_zstd())
    np.testing.assert_array_equal(cloudio.load_array(url), b)


@pytest.mark.parametrize("other", ["save-to-gcs", "load-from-a-local-path"])
def test_a_write_whose_uploads_are_slow_does_not_stall_another_write(gcs_emulator: Emulator, gcs_bucket: str,
                                                                     fault_proxy, tmp_path, other: str) -> None:
    """Two save_array calls from two threads: while the first one's uploads are held by the server (its room
    for encoded shards full), the second, of another array whose uploads are answered at once, completes.

    The process has a coder thread per core: one that waited for the first write's room while holding its
    thread would make the second write's bands (and a load_array of a local array, decoded in those threads)
    queue behind it. The coder threads never wait for uploads."""
    slow = _many_shards(5, 4)
    release = threading.Event()
    held = fault_proxy.add("late", method="POST", path=_SHARDS_OF.format(r"slow\.zarr"), release=release,
                           seconds=25, times=None)
    room = int(zarr.config.get("async.concurrency"))
    done = threading.Event()
    out: dict[str, object] = {}

    def run() -> None:
        try:
            cloudio.save_array(slow, f"{gcs_bucket}/slow.zarr", chunks=(128, 128), shards=(512, 512), **_zstd())
        except BaseException as e:
            out["slow"] = e

    t = threading.Thread(target=run)
    t.start()
    quick = _many_shards(1, 2, seed=5)
    quick_done = threading.Event()
    local = str(tmp_path / "local.zarr")
    if other != "save-to-gcs":
        cloudio.save_array(quick, local, chunks=(128, 128), shards=(512, 512), **_zstd())

    def run_other() -> None:
        try:
            if other == "save-to-gcs":
                cloudio.save_array(quick, f"{gcs_bucket}/quick.zarr", chunks=(128, 128), shards=(512, 512),
                                   **_zstd())
            else:
                out["read"] = cloudio.load_array(local)
        except BaseException as e:
            out["quick"] = e
        finally:
            quick_done.set()

    u = threading.Thread(target=run_other)
    try:
        _wait_for(lambda: held.hits >= room, "the slow write's room filled")
        u.start()
        finished = quick_done.wait(15)  # a hang detector (the held answers go at 25 s): it needs a fraction of a second
        seen_while_held = held.hits
    finally:
        release.set()
        t.join(120)
        u.join(120)
        done.set()
    assert "quick" not in out and "slow" not in out, out
    assert finished, f"{other} waited for the held write's uploads"
    assert seen_while_held == room
    back = cloudio.load_array(f"{gcs_bucket}/quick.zarr") if other == "save-to-gcs" else out["read"]
    np.testing.assert_array_equal(back, quick)


@pytest.mark.usefixtures("python_sigint")
def test_an_interrupted_write_sends_nothing_more(gcs_emulator: Emulator, gcs_bucket: str, fault_proxy,
                                                 monkeypatch) -> None:
    """A KeyboardInterrupt while save_array waits for its uploads: it raises, and no shard is sent after that
    (the write's docstring: nothing goes up after the write raised). zarr's sync() leaves the coroutine
    running on its loop when the waiting thread is interrupted: the write cancels it, and waits for it."""
    import re
    import signal

    from cloudio._gcs import fast

    a = _many_shards(4, 4)
    url = f"{gcs_bucket}/interrupted.zarr"
    release = threading.Event()
    held = fault_proxy.add("late", method="POST", path=_SHARDS_OF.format(r"interrupted\.zarr"), release=release,
                           seconds=25, times=None)
    # what the client sends (the proxy, a thread of this process, may count a request already sent only later)
    sent: list[bytes] = []
    send = fast._Answers.send

    def recording(self: fast._Answers, request: bytes, out: memoryview | None) -> object:
        if re.search(rb"name=interrupted\.zarr%2Fc%2F", request[:400]):
            sent.append(request[:80])
        return send(self, request, out)

    monkeypatch.setattr(fast._Answers, "send", recording)

    def interrupt() -> None:
        if held.answered.wait(60):  # the first shard reached the emulator: its answer is held
            signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)  # a real Ctrl-C

    t = threading.Thread(target=interrupt)
    t.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            cloudio.save_array(a, url, chunks=(128, 128), shards=(512, 512), **_zstd())
        sent_before = len(sent)
    finally:
        release.set()
        t.join()
    threading.Event().wait(3.0)  # a write still running in the background sends its next shards meanwhile
    assert 0 < sent_before < 16 and len(sent) == sent_before, f"{len(sent) - sent_before} shards sent after it raised"
