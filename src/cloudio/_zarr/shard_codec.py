"""Whole-array reads and writes of plain sharded Zarr v3 arrays, one buffer per shard.

Why: for an uncompressed sharded array, zarr's codec pipeline builds every
inner chunk as a fresh array, merges it into a fresh shard array, compares it
with the fill value in full, and concatenates the shard's bytes again before
the upload; on reads it decodes into fresh buffers before copying into the
output. Each of those passes touches new memory, and first touches of pages
are what a 256 MiB round trip spends most of its time on here
(``benchmarks/bench_zarr.py``). When the layout is the plain one, the bytes of
a shard are just its chunks in a row followed by an index, so
:func:`save_array` and :func:`load_array` copy each chunk once, straight
between the user's array and a shard buffer, and leave the transport to the
same journaled store zarr uses.

"Plain" means: Zarr v3, one ``sharding_indexed`` codec whose inner codecs
are only ``bytes`` (native byte order) and whose index codecs are ``bytes``
+ ``crc32c`` (zarr's default), a fixed-size numeric dtype, the default
chunk-key encoding. Anything else (compressors, filters, transposes,
variable-length types) returns None from :func:`plain_layout` and goes
through zarr. The objects written are the ones zarr writes: chunks equal to
the fill value are left out unless ``write_empty_chunks`` is on, chunks
beyond the array's edge always, a shard with no chunk left is not written,
and zarr reads them back bit for bit (tests/test_shardio.py checks both
directions).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import sys
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from cloudio.errors import IntegrityError

if TYPE_CHECKING:
    import zarr

log = logging.getLogger(__name__)

_NO_CHUNK = 2**64 - 1  # index entry of a chunk left out of a shard
_NATIVE = "little" if sys.byteorder == "little" else "big"


@dataclass(frozen=True)
class Layout:
    """Where every chunk of a plain sharded array lives."""

    shape: tuple[int, ...]
    shard: tuple[int, ...]
    chunk: tuple[int, ...]
    dtype: np.dtype
    fill: Any
    index_at_end: bool
    write_empty: bool

    @property
    def per_shard(self) -> tuple[int, ...]:
        return tuple(s // c for s, c in zip(self.shard, self.chunk))

    @property
    def chunk_nbytes(self) -> int:
        return math.prod(self.chunk) * self.dtype.itemsize

    @property
    def index_nbytes(self) -> int:
        return math.prod(self.per_shard) * 16 + 4

    @property
    def shard_nbytes(self) -> int:
        """The largest a stored shard can be: every chunk, and the index."""
        return math.prod(self.per_shard) * self.chunk_nbytes + self.index_nbytes

    def shards(self) -> itertools.product:
        return itertools.product(*(range(-(-n // s)) for n, s in zip(self.shape, self.shard)))

    def chunks_in(self, shard: tuple[int, ...]) -> Iterator[tuple[tuple[int, ...], tuple[slice, ...]]]:
        """Each chunk of ``shard`` that overlaps the array: its place in the shard, and in the array."""
        for c in itertools.product(*(range(n) for n in self.per_shard)):
            lo = [si * s + ci * k for si, s, ci, k in zip(shard, self.shard, c, self.chunk)]
            if all(start < n for start, n in zip(lo, self.shape)):  # chunks beyond the edge are never stored
                yield c, tuple(slice(start, min(start + k, n)) for start, k, n in zip(lo, self.chunk, self.shape))


def plain_layout(z: "zarr.Array") -> Layout | None:
    """The array's :class:`Layout` when it is plain (see the module docstring), else None."""
    try:
        from zarr.codecs import BytesCodec, Crc32cCodec, ShardingCodec
        from zarr.core.chunk_key_encodings import DefaultChunkKeyEncoding

        md = z.metadata
        if md.zarr_format != 3 or len(md.codecs) != 1 or not isinstance(md.codecs[0], ShardingCodec):
            return None
        sharding = md.codecs[0]
        dtype = np.dtype(z.dtype)
        if dtype.kind not in "biufc" or dtype.hasobject:
            return None

        def bytes_in(codec: Any, order: str) -> bool:
            endian = getattr(codec, "endian", None)
            return isinstance(codec, BytesCodec) and (endian is None or _name(endian) == order)

        if len(sharding.codecs) != 1 or not bytes_in(sharding.codecs[0], _NATIVE):
            return None
        index = sharding.index_codecs
        if len(index) != 2 or not bytes_in(index[0], "little") or not isinstance(index[1], Crc32cCodec):
            return None
        config = z._async_array.config
        if not getattr(config, "read_missing_chunks", True):  # zarr >= 3.2 may refuse missing chunks
            return None
        enc = md.chunk_key_encoding
        if not isinstance(enc, DefaultChunkKeyEncoding) or enc.separator != "/":
            return None
        shard = tuple(int(s) for s in md.chunk_grid.chunk_shape)
        chunk = tuple(int(c) for c in sharding.chunk_shape)
        if any(s % c for s, c in zip(shard, chunk)) or not z.shape:
            return None
        return Layout(
            shape=tuple(int(n) for n in z.shape), shard=shard, chunk=chunk, dtype=dtype,
            fill=np.asarray(md.fill_value, dtype=dtype)[()],
            index_at_end=_name(sharding.index_location) == "end",
            write_empty=bool(config.write_empty_chunks),
        )
    except (AttributeError, ImportError, TypeError, ValueError):  # another zarr: let zarr do it
        log.debug("not a plain sharded layout", exc_info=True)
        return None


def _name(value: Any) -> str:
    """An enum member's value or a plain string (zarr 3.1 uses enums where 3.4 uses strings)."""
    return str(getattr(value, "value", value))


def _is_fill(block: np.ndarray, fill: Any) -> bool:
    """``block`` holds only the fill value (first element first: most chunks differ there)."""
    first = block.flat[0]
    if isinstance(fill, np.floating | np.complexfloating) and np.isnan(fill):
        return bool(np.isnan(first)) and bool(np.isnan(block).all())
    return bool(first == fill) and bool((block == fill).all())


def _encode(layout: Layout, array: np.ndarray, shard: tuple[int, ...], buf: np.ndarray) -> memoryview | None:
    """Shard ``shard`` of ``array`` as stored bytes, built in ``buf``; None when it holds no chunk."""
    index = np.full(layout.per_shard + (2,), _NO_CHUNK, dtype="<u8")
    size = layout.chunk_nbytes
    pos = 0 if layout.index_at_end else layout.index_nbytes
    for c, where in layout.chunks_in(shard):
        block = array[where]
        if not layout.write_empty and _is_fill(block, layout.fill):
            continue
        dst = buf[pos:pos + size].view(layout.dtype).reshape(layout.chunk)
        if block.shape != layout.chunk:
            dst[...] = layout.fill  # zarr pads edge chunks with the fill value
        dst[tuple(slice(0, n) for n in block.shape)] = block
        index[c] = (pos, size)
        pos += size
    if pos == (0 if layout.index_at_end else layout.index_nbytes):
        return None
    import google_crc32c

    raw = index.tobytes()
    at = pos if layout.index_at_end else 0
    buf[at:at + len(raw)] = np.frombuffer(raw, dtype="u1")
    buf[at + len(raw):at + len(raw) + 4] = np.frombuffer(
        google_crc32c.value(raw).to_bytes(4, "little"), dtype="u1"
    )
    end = pos + (layout.index_nbytes if layout.index_at_end else 0)
    return memoryview(buf[:end])


def _decode(layout: Layout, data: np.ndarray, shard: tuple[int, ...], out: np.ndarray, url: str) -> None:
    """Copy every chunk of one stored shard into ``out``; fill where a chunk is left out."""
    import google_crc32c

    n = layout.index_nbytes
    raw = (data[-n:] if layout.index_at_end else data[:n]).tobytes()
    if len(data) < n or google_crc32c.value(raw[:-4]) != int.from_bytes(raw[-4:], "little"):
        raise IntegrityError(
            f"{url}: the shard index fails its CRC32C check (the object is damaged or not a shard); "
            "rewrite the array"
        )
    index = np.frombuffer(raw[:-4], dtype="<u8").reshape(layout.per_shard + (2,))
    size = layout.chunk_nbytes
    for c, where in layout.chunks_in(shard):
        offset, nbytes = (int(v) for v in index[c])
        if offset == _NO_CHUNK:
            out[where] = layout.fill
            continue
        if nbytes != size or offset + nbytes > len(data):
            raise IntegrityError(f"{url}: chunk {c} of the shard has {nbytes} bytes, not {size}; rewrite the array")
        block = data[offset:offset + size].view(layout.dtype).reshape(layout.chunk)
        out[where] = block[tuple(slice(0, s.stop - s.start) for s in where)]


#: what the workers of one read or write may hold at once (each holds one whole shard)
_MEMORY_BUDGET = 1 << 30


def _each_shard(layout: Layout, new_job: Callable[[], Callable[[tuple[int, ...]], Awaitable[None]]]) -> None:
    """Run a job for every shard on zarr's event loop, ``async.concurrency`` workers at most.

    ``new_job`` is called once per worker, so a worker can keep a buffer;
    fewer workers run when that many whole shards would not fit in
    :data:`_MEMORY_BUDGET`.
    """
    import zarr
    from zarr.core.sync import sync

    shards = list(layout.shards())

    async def worker() -> None:
        job = new_job()
        while shards:
            await job(shards.pop())

    async def run() -> None:
        n = min(int(zarr.config.get("async.concurrency")), len(shards), _MEMORY_BUDGET // layout.shard_nbytes)
        n = max(1, n)
        await asyncio.gather(*(worker() for _ in range(n)))

    sync(run())


def write(z: "zarr.Array", layout: Layout, array: np.ndarray) -> None:
    """Write all of ``array`` into ``z``: one encode and one upload per shard.

    Each worker reuses one shard buffer, so after its first shard no new
    memory is touched.
    """
    from zarr.core.buffer.cpu import Buffer

    size = layout.shard_nbytes

    def new_job() -> Callable[[tuple[int, ...]], Awaitable[None]]:
        buf = np.empty(size, dtype="u1")

        async def job(shard: tuple[int, ...]) -> None:
            view = _encode(layout, array, shard, buf)
            if view is not None:
                key = z.metadata.encode_chunk_key(shard)
                await (z.store_path / key).set(Buffer.from_array_like(np.frombuffer(view, dtype="u1")))

        return job

    _each_shard(layout, new_job)


def _shard_getter(z: "zarr.Array") -> Callable[[str], Awaitable[np.ndarray | None]]:
    """How to GET one whole shard: CRC32C-checked against the server's X-Goog-Hash on GCS.

    The shard index's own CRC32C covers only the index; the chunks' bytes are
    checked here, for free (the hash comes with the response).
    """
    from zarr.core.buffer import default_buffer_prototype
    from zarr.storage import FsspecStore

    from cloudio._gcs.transfer import get_verified
    from cloudio._zarr.store import JournaledStore

    store = z.store_path.store
    inner = getattr(store, "_store", None)
    if isinstance(store, JournaledStore) and isinstance(inner, FsspecStore) and store.root_url.startswith("gs://"):
        fs = inner.fs
        base = "/".join(p for p in (store.root_url, z.store_path.path.strip("/")) if p)

        async def get_gcs(key: str) -> np.ndarray | None:
            got = await get_verified(fs, f"{base}/{key}")
            return None if got is None else np.frombuffer(got, dtype="u1")

        return get_gcs
    proto = default_buffer_prototype()

    async def get_other(key: str) -> np.ndarray | None:
        got = await (z.store_path / key).get(prototype=proto)
        return None if got is None else got.as_numpy_array()

    return get_other


def read(z: "zarr.Array", layout: Layout, out: np.ndarray) -> None:
    """Fill ``out`` with all of ``z``: one GET per shard."""
    get = _shard_getter(z)

    async def job(shard: tuple[int, ...]) -> None:
        key = z.metadata.encode_chunk_key(shard)
        got = await get(key)
        if got is None:  # a shard of nothing but the fill value
            where = zip(shard, layout.shard, layout.shape)
            out[tuple(slice(i * s, min((i + 1) * s, n)) for i, s, n in where)] = layout.fill
        else:
            _decode(layout, got, shard, out, f"{z.store_path}/{key}")

    _each_shard(layout, lambda: job)
