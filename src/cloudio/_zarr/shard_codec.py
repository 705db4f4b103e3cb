"""Whole-array reads and writes of plain Zarr v3 arrays, one buffer per shard (or per chunk).

Why: for an uncompressed sharded array, zarr's codec pipeline builds every
inner chunk as a fresh array, merges it into a fresh shard array, compares it
with the fill value in full, and concatenates the shard's bytes again before
the upload; on reads it decodes into fresh buffers before copying into the
output. Each of those passes touches new memory, and first touches of pages
are what a 256 MiB round trip spends most of its time on here
(``benchmarks/bench_zarr.py``). When the layout is the plain one, the bytes of
a shard are just its chunks in a row followed by an index, so
:func:`save_array` and :func:`load_array` copy each chunk once, straight
between the user's array and a shard buffer each worker reuses (encoding and
decoding in a worker thread, so the event loop keeps other transfers moving).
Writes go through the same journaled store zarr uses (a media upload per
shard, :mod:`cloudio._gcs.fast`); reads of GCS run in worker threads that
stream each raw shard from the socket into the output, CRC32C-checked on
the way (:func:`_stream`), or read it into the worker's buffer and copy
its chunks out (:func:`cloudio._gcs.fast.fetch_into`).

The same holds with a ``zstd`` compressor (each chunk compressed on its own,
in a worker thread, its compressed size in the index) and for unsharded
arrays (one object per chunk, no index): there zarr's per-chunk Python work
(a fresh array per chunk, an asyncio task per codec step) is what
``benchmarks/bench_peers.py`` layouts b and c spent their time on.

"Plain" means: Zarr v3, chunk codecs ``bytes`` (native byte order)
optionally followed by ``zstd``, either directly (unsharded) or inside one
``sharding_indexed`` codec whose index codecs are ``bytes`` + ``crc32c``
(zarr's default), a fixed-size numeric dtype, the default chunk-key
encoding. Anything else (other compressors, filters, transposes,
variable-length types) returns None from :func:`plain_layout` and goes
through zarr. The objects written are the ones zarr writes: chunks equal to
the fill value are left out unless ``write_empty_chunks`` is on, chunks
beyond the array's edge always, a shard with no chunk left is not written,
and zarr reads them back bit for bit (tests/test_shardio.py and
tests/test_peers.py check both directions).
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import math
import sys
import threading
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Sequence
from concurrent.futures import wait
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, NamedTuple, cast

import numpy as np

from cloudio._gcs import checksums
from cloudio._threads import KeptPool, cores
from cloudio._zarr.buffers import shard_buffers
from cloudio.errors import IntegrityError

if TYPE_CHECKING:
    import gcsfs
    import zarr

    from cloudio._paths import GCSPath
    from cloudio._zarr.store import JournaledStore

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
    sharded: bool = True  #: False: every chunk is an object of its own (``shard`` is then ``chunk``)
    zstd: tuple[int, bool] | None = None  #: (level, checksum) of the chunks' zstd codec, if any

    @property
    def per_shard(self) -> tuple[int, ...]:
        return tuple(s // c for s, c in zip(self.shard, self.chunk, strict=True))

    @property
    def chunk_nbytes(self) -> int:
        return math.prod(self.chunk) * self.dtype.itemsize

    @property
    def index_nbytes(self) -> int:
        return math.prod(self.per_shard) * 16 + 4 if self.sharded else 0

    @property
    def stored_chunk_nbytes(self) -> int:
        """The most one stored chunk can take (zstd's worst case bound for incompressible data)."""
        n = self.chunk_nbytes
        return n if self.zstd is None else n + (n >> 7) + 1024

    @property
    def shard_nbytes(self) -> int:
        """The largest a stored shard can be: every chunk, and the index."""
        return math.prod(self.per_shard) * self.stored_chunk_nbytes + self.index_nbytes

    def shards(self) -> itertools.product[tuple[int, ...]]:
        return itertools.product(*(range(-(-n // s)) for n, s in zip(self.shape, self.shard, strict=True)))

    def chunks_in(self, shard: tuple[int, ...]) -> Iterator[tuple[tuple[int, ...], tuple[slice, ...]]]:
        """Each chunk of ``shard`` that overlaps the array: its place in the shard, and in the array; in
        the order zarr stores a shard's chunks (Morton order), so a shard's bytes are zarr's."""
        for c in _morton(self.per_shard):
            lo = [si * s + ci * k for si, s, ci, k in zip(shard, self.shard, c, self.chunk, strict=True)]
            # chunks beyond the edge are never stored
            if all(start < n for start, n in zip(lo, self.shape, strict=True)):
                where = zip(lo, self.chunk, self.shape, strict=True)
                yield c, tuple(slice(start, min(start + k, n)) for start, k, n in where)


@functools.cache
def _morton(shape: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
    """Every chunk of a shard of ``shape`` chunks in zarr's Morton order (C order where zarr has none)."""
    from zarr.core import indexing

    order = getattr(indexing, "morton_order_coords", None) or getattr(indexing, "morton_order_iter", None)  # 3.4, 3.1
    if order is None:  # another zarr: any order is a valid shard, its index says where
        return tuple(itertools.product(*(range(n) for n in shape)))
    return tuple(tuple(int(i) for i in c) for c in order(shape))


def plain_layout(z: zarr.Array[Any]) -> Layout | None:
    """The array's :class:`Layout` when it is plain (see the module docstring), else None."""
    try:
        from zarr.codecs import BytesCodec, Crc32cCodec, ShardingCodec, ZstdCodec
        from zarr.core.chunk_key_encodings import DefaultChunkKeyEncoding

        md = z.metadata
        if md.zarr_format != 3 or not md.codecs:
            return None
        sharding = md.codecs[0] if isinstance(md.codecs[0], ShardingCodec) else None
        # the values as the bytes codec (checked native below) stores them: a big-endian array in memory
        # is converted as each chunk is laid out, not stored as it is
        dtype = np.dtype(z.dtype).newbyteorder("=")
        if dtype.kind not in "biufc" or dtype.hasobject:
            return None

        def bytes_in(codec: Any, order: str) -> bool:
            endian = getattr(codec, "endian", None)
            return isinstance(codec, BytesCodec) and (endian is None or _name(endian) == order)

        codecs = tuple(sharding.codecs) if sharding is not None else tuple(md.codecs)
        if sharding is not None and len(md.codecs) != 1:
            return None
        if not codecs or len(codecs) > 2 or not bytes_in(codecs[0], _NATIVE):
            return None
        zstd = None
        if len(codecs) == 2:
            if type(codecs[1]) is not ZstdCodec:
                return None
            zstd = (int(codecs[1].level), bool(codecs[1].checksum))
        if sharding is not None:
            index = sharding.index_codecs
            if len(index) != 2 or not bytes_in(index[0], "little") or not isinstance(index[1], Crc32cCodec):
                return None
        config = z._async_array.config
        if not getattr(config, "read_missing_chunks", True):  # zarr >= 3.2 may refuse missing chunks
            return None
        enc = md.chunk_key_encoding
        if not isinstance(enc, DefaultChunkKeyEncoding) or enc.separator != "/":
            return None
        grid: Any = md.chunk_grid  # regular here; its class differs across zarr versions, its chunk_shape does not
        shard = tuple(int(s) for s in grid.chunk_shape)
        chunk = tuple(int(c) for c in sharding.chunk_shape) if sharding is not None else shard
        if any(s % c for s, c in zip(shard, chunk, strict=True)) or not z.shape:
            return None
        return Layout(
            shape=tuple(int(n) for n in z.shape), shard=shard, chunk=chunk, dtype=dtype,
            fill=np.asarray(md.fill_value, dtype=dtype)[()],
            index_at_end=sharding is None or _name(sharding.index_location) == "end",
            write_empty=bool(config.write_empty_chunks), sharded=sharding is not None, zstd=zstd,
        )
    except (AttributeError, ImportError, TypeError, ValueError):  # another zarr: let zarr do it
        log.debug("not a plain sharded layout", exc_info=True)
        return None


def _name(value: Any) -> str:
    """An enum member's value or a plain string (zarr 3.1 uses enums where 3.4 uses strings)."""
    return str(getattr(value, "value", value))


def _is_fill(block: np.ndarray, fill: Any) -> bool:
    """``block`` holds only the fill value (first element first: most chunks differ there), as zarr decides
    it: NaN matches NaN, and a zero fill of a real float type only zeros of its sign (0.0 is not -0.0)."""
    first = block.flat[0]
    if isinstance(fill, np.floating | np.complexfloating) and np.isnan(fill):
        return bool(np.isnan(first)) and bool(np.isnan(block).all())
    if isinstance(fill, np.floating) and fill == 0:
        sign = np.signbit(fill)
        return bool(first == 0 and np.signbit(first) == sign) and bool(((block == 0) & (np.signbit(block) == sign))
                                                                        .all())
    return bool(first == fill) and bool((block == fill).all())


def _encode(layout: Layout, array: np.ndarray, shard: tuple[int, ...], buf: np.ndarray,
            scratch: np.ndarray | None = None) -> memoryview | None:
    """Shard ``shard`` of ``array`` as stored bytes, built in ``buf``; None when it holds no chunk.

    ``scratch`` (one chunk's bytes) is where the chunk of an unsharded array
    is laid out before zstd compresses it into ``buf``.
    """
    if not layout.sharded:
        return _encode_chunk(layout, array, shard, buf, scratch)
    index = np.full((*layout.per_shard, 2), _NO_CHUNK, dtype="<u8")
    start = 0 if layout.index_at_end else layout.index_nbytes
    pos = _encode_run(layout, array, layout.chunks_in(shard), buf, start, index)
    if pos == start:
        return None
    return _with_index(layout, index, buf, pos)


def _with_index(layout: Layout, index: np.ndarray, buf: np.ndarray, pos: int) -> memoryview:
    """``buf`` with the shard's ``index`` (and its CRC32C) written where the layout keeps it, the chunks
    ending at ``pos``."""
    raw = index.tobytes()
    at = pos if layout.index_at_end else 0
    buf[at:at + len(raw)] = np.frombuffer(raw, dtype="u1")
    buf[at + len(raw):at + len(raw) + 4] = np.frombuffer(
        checksums.value(raw).to_bytes(4, "little"), dtype="u1"
    )
    end = pos + (layout.index_nbytes if layout.index_at_end else 0)
    return memoryview(buf[:end])  # type: ignore[arg-type]  # numpy declares __buffer__ for Python >= 3.12 only


def _encode_run(layout: Layout, array: np.ndarray, chunks: Iterator[tuple[tuple[int, ...], tuple[slice, ...]]],
                buf: np.ndarray, pos: int, index: np.ndarray) -> int:
    """Lay out (and compress) ``chunks`` one after the other in ``buf`` from ``pos``, each one's place in
    ``index``; return where the last one ends. Chunks of nothing but the fill value are left out.

    Chunks to compress are laid out side by side, :data:`_BATCH` at a time,
    then compressed by one call (:func:`_compressed`).
    """
    size = layout.chunk_nbytes
    if layout.zstd is None:
        for c, where in chunks:
            block = array[where]
            if layout.write_empty or not _is_fill(block, layout.fill):
                _lay(layout, block, buf[pos:pos + size])
                index[c] = (pos, size)
                pos += size
        return pos
    staged = np.empty(min(math.prod(layout.per_shard), _BATCH) * size, dtype="u1")
    kept: list[tuple[int, ...]] = []

    def compress_kept(pos: int) -> int:
        for at, frame in zip(kept, _compressed(layout, staged, len(kept)), strict=True):
            n = len(frame)
            buf[pos:pos + n] = np.frombuffer(frame, dtype="u1")
            index[at] = (pos, n)
            pos += n
        kept.clear()
        return pos

    for c, where in chunks:
        block = array[where]
        if layout.write_empty or not _is_fill(block, layout.fill):
            _lay(layout, block, staged[len(kept) * size:(len(kept) + 1) * size])
            kept.append(c)
            if len(kept) == _BATCH:
                pos = compress_kept(pos)
    return compress_kept(pos) if kept else pos


#: chunks compressed by one call (:func:`_compressed`): their laid-out bytes (8 x 64 KiB in layout b)
#: stay in the cache
_BATCH = 8


#: about the most one band's chunks take laid out (:func:`_bands`): 32 chunks of 64 KiB in layout b
_BAND_BYTES = 2 << 20


class _Rows(NamedTuple):
    """Rows ``first`` to ``stop`` (along the first axis) of the chunks of a shard wholly inside the array."""

    shard: tuple[int, ...]
    first: int
    stop: int


#: a band of a shard: rows of its chunks, or its chunks (place in the shard, place in the array)
_Band = _Rows | list[tuple[tuple[int, ...], tuple[slice, ...]]]


def _bands(layout: Layout, shard: tuple[int, ...]) -> list[_Band]:
    """``shard``'s chunks in bands of about :data:`_BAND_BYTES`: rows of chunks, laid out by one copy,
    where the shard is wholly inside the array; else runs of chunks in zarr's order."""
    size = layout.chunk_nbytes
    row = math.prod(layout.per_shard[1:]) * size
    if row <= _BAND_BYTES and all((i + 1) * s <= n for i, s, n in zip(shard, layout.shard, layout.shape,
                                                                         strict=True)):
        rows, last = _BAND_BYTES // row, layout.per_shard[0]
        return [_Rows(shard, r, min(r + rows, last)) for r in range(0, last, rows)]
    chunks = list(layout.chunks_in(shard))
    n = max(1, _BAND_BYTES // size)
    return [chunks[i:i + n] for i in range(0, len(chunks), n)]


def _compress_band(layout: Layout, array: np.ndarray, band: _Band) -> tuple[list[tuple[int, ...]], Sequence[Any]]:
    """The places in the shard of ``band``'s chunks not left out as empty, and their zstd frames."""
    size = layout.chunk_nbytes
    count = math.prod(layout.per_shard[1:]) * (band.stop - band.first) if isinstance(band, _Rows) else len(band)
    staged: np.ndarray | None = getattr(_zstd, "staged", None)
    if staged is None or len(staged) < count * size:
        staged = _zstd.staged = np.empty(count * size, dtype="u1")
    if isinstance(band, _Rows):
        kept = _lay_rows(layout, array, band, staged[:count * size])
    else:
        kept = []
        for at, where in band:
            block = array[where]
            if layout.write_empty or not _is_fill(block, layout.fill):
                _lay(layout, block, staged[len(kept) * size:(len(kept) + 1) * size])
                kept.append(at)
    return kept, (_compressed(layout, staged, len(kept)) if kept else ())


def _lay_rows(layout: Layout, array: np.ndarray, rows: _Rows, staged: np.ndarray) -> list[tuple[int, ...]]:
    """Lay the chunks of ``rows`` out side by side in ``staged`` (C order of their places) by one copy;
    those of nothing but the fill value are then left out. Return the places of those kept, in order."""
    g, c = layout.per_shard, layout.chunk
    lo = [i * s for i, s in zip(rows.shard, layout.shard, strict=True)]
    region = array[(slice(lo[0] + rows.first * c[0], lo[0] + rows.stop * c[0]),
                    *(slice(a, a + s) for a, s in zip(lo[1:], layout.shard[1:], strict=True)))]
    n, nd = rows.stop - rows.first, len(g)
    # (rows, c0, g1, c1, ...) -> (rows, g1, ..., c0, c1, ...): every chunk's values together, in C order
    split = region.reshape(n, c[0], *itertools.chain.from_iterable(zip(g[1:], c[1:], strict=True)))
    laid = staged.view(layout.dtype).reshape(n, *g[1:], *c)
    np.copyto(laid, split.transpose(0, *range(2, 2 * nd, 2), *range(1, 2 * nd, 2)), casting="unsafe")
    places = [(rows.first + t[0], *t[1:]) for t in itertools.product(range(n), *(range(k) for k in g[1:]))]
    if layout.write_empty:
        return places
    flat = laid.reshape(len(places), -1)
    firsts = flat[:, 0]
    maybe = np.flatnonzero(np.isnan(firsts) if _is_nan(layout.fill) else firsts == layout.fill)
    empty = {int(k) for k in maybe if _is_fill(flat[k], layout.fill)}
    if not empty:
        return places
    keep = [k for k in range(len(places)) if k not in empty]
    flat[:len(keep)] = flat[keep]  # the kept chunks side by side again
    return [places[k] for k in keep]


def _is_nan(fill: Any) -> bool:
    return isinstance(fill, np.floating | np.complexfloating) and bool(np.isnan(fill))


def _assemble(layout: Layout, parts: list[tuple[list[tuple[int, ...]], Sequence[Any]]],
              buf: np.ndarray) -> memoryview | None:
    """A shard's stored bytes in ``buf`` from its bands' frames (:func:`_compress_band`), in zarr's order;
    None when it holds no chunk."""
    index = np.full((*layout.per_shard, 2), _NO_CHUNK, dtype="<u8")
    start = pos = 0 if layout.index_at_end else layout.index_nbytes
    frames = {at: frame for places, part in parts for at, frame in zip(places, part, strict=True)}
    for at in _morton(layout.per_shard):
        frame = frames.get(at)
        if frame is not None:
            n = len(frame)
            buf[pos:pos + n] = np.frombuffer(frame, dtype="u1")
            index[at] = (pos, n)
            pos += n
    return None if pos == start else _with_index(layout, index, buf, pos)


class _BandedShards:
    """The shards of a write encoded band by band (:func:`_bands`), every coder thread on the earliest
    shard not yet done, so that shards are ready one after the other, the first early.

    Why: with a shard per coder thread, layout b of ``benchmarks/bench_peers.py``
    (4 shards of 256 zstd chunks) had its shards ready in pairs, at the middle
    and at the end of the write, and the last two uploads (which the emulator
    takes one at a time) followed each other with a core idle. Bands of rows
    cost one copy each to lay out and one call to compress, so the coder
    threads hardly wait on each other for the GIL. Measured in one process
    (``save_array`` of layout b, medians of 24): 181 -> 171 ms.
    """

    def __init__(self, layout: Layout, array: np.ndarray, shards: list[tuple[int, ...]]) -> None:
        self._layout, self._array, self._shards = layout, array, shards
        self._todo = ((i, n, band) for i, shard in enumerate(shards) for n, band in enumerate(_bands(layout, shard)))
        self._parts: dict[int, list[Any]] = {}  # per shard being encoded, its bands' frames
        self._left: dict[int, int] = {}  # per shard being encoded, the bands not yet compressed
        self._lock = threading.Lock()
        self.stopped = threading.Event()

    def until_a_shard(self) -> tuple[int, list[Any]] | None:
        """Compress bands (in a coder thread) until one completes a shard: that shard's place in the list and
        its bands' frames, for :func:`_assemble`; None once no band is left, or the write stopped.

        Never waits for anything but the GIL: a write whose uploads are slow
        stops asking, and holds no coder thread meanwhile.
        """
        layout = self._layout
        while not self.stopped.is_set():
            with self._lock:
                item = next(self._todo, None)
                if item is None:
                    return None
                i, n, band = item
                if i not in self._left:
                    self._left[i] = len(_bands(layout, self._shards[i]))
                    self._parts[i] = [None] * self._left[i]
            part = _compress_band(layout, self._array, band)
            with self._lock:
                self._parts[i][n] = part
                self._left[i] -= 1
                if not self._left[i]:
                    return i, self._parts.pop(i)
        return None


def _lay(layout: Layout, block: np.ndarray, laid: np.ndarray) -> None:
    """Lay ``block`` out in ``laid`` (one chunk's bytes) as zarr does: C order, edge chunks padded with
    the fill value."""
    dst = laid.view(layout.dtype).reshape(layout.chunk)
    if block.shape != layout.chunk:
        dst[...] = layout.fill
        dst[tuple(slice(0, n) for n in block.shape)] = block
    else:
        dst[...] = block


def _compressed(layout: Layout, staged: np.ndarray, count: int) -> Sequence[Any]:
    """The zstd frames of the first ``count`` chunks laid out in ``staged``, in order.

    Why a call for several: ``zstandard``'s ``multi_compress_to_buffer``
    lets go of the GIL once for all of them, where two threads compressing
    a chunk per call kept waiting on each other for it. Compressing the 4
    shards of layout b of ``benchmarks/bench_peers.py`` on two threads took
    169 ms a chunk at a time, 148 ms 8 at a time (tensorstore's whole
    in-memory write: 145 ms); 64 or 256 at a time it took 154 to 166 ms
    again, their laid-out bytes no longer in the cache (medians of 10).
    The frames are standard zstd frames at the array's level, as zarr's
    own (numcodecs) are; their bytes may differ, as tensorstore's do.
    """
    import zstandard

    size = layout.chunk_nbytes
    compressor = _compressor(layout)
    if zstandard.backend != "cext":  # only the C extension has the batch call
        return [compressor.compress(staged[k * size:(k + 1) * size]) for k in range(count)]
    segments = np.empty((count, 2), dtype="<u8")
    segments[:, 0] = np.arange(count, dtype="<u8") * size
    segments[:, 1] = size
    batch = zstandard.BufferWithSegments(memoryview(staged[:count * size]), segments.tobytes())  # type: ignore[arg-type]  # numpy declares __buffer__ for Python >= 3.12 only
    return compressor.multi_compress_to_buffer(batch)  # type: ignore[no-any-return]


def _compressor(layout: Layout) -> Any:
    """This thread's ``zstandard`` compressor at the array's level and checksum setting (one must not be
    used by two threads at once)."""
    assert layout.zstd is not None
    kept: dict[tuple[int, bool], Any] | None = getattr(_zstd, "compressors", None)
    if kept is None:
        kept = _zstd.compressors = {}
    compressor = kept.get(layout.zstd)
    if compressor is None:
        import zstandard

        level, checksum = layout.zstd
        compressor = kept[layout.zstd] = zstandard.ZstdCompressor(level=level, write_checksum=checksum)
    return compressor


def _encode_chunk(layout: Layout, array: np.ndarray, at: tuple[int, ...], buf: np.ndarray,
                  scratch: np.ndarray | None) -> memoryview | None:
    """:func:`_encode` for an unsharded array: chunk ``at`` as its object's bytes (no index), None when
    it holds only the fill value and empty chunks are not written."""
    where = tuple(slice(i * k, min((i + 1) * k, n)) for i, k, n in zip(at, layout.chunk, layout.shape, strict=True))
    block = array[where]
    if not layout.write_empty and _is_fill(block, layout.fill):
        return None
    size = layout.chunk_nbytes
    laid = buf[:size] if scratch is None else scratch
    _lay(layout, block, laid)
    if layout.zstd is None:
        return memoryview(laid)  # type: ignore[arg-type]  # numpy declares __buffer__ for Python >= 3.12 only
    packed = _compressor(layout).compress(laid)
    buf[:len(packed)] = np.frombuffer(packed, dtype="u1")
    return memoryview(buf[:len(packed)])  # type: ignore[arg-type]  # numpy declares __buffer__ for Python >= 3.12 only


def _shard_index(layout: Layout, data: np.ndarray, url: str) -> np.ndarray:
    """The (offset, nbytes) of every chunk of a stored shard, its CRC32C checked."""
    if not layout.sharded:  # one chunk, the whole object
        return np.array([0, len(data)], dtype="<u8").reshape((*layout.per_shard, 2))
    n = layout.index_nbytes
    raw = data[-n:] if layout.index_at_end else data[:n]
    return _parsed_index(layout, raw.tobytes() if len(data) >= n else b"", url)


def _parsed_index(layout: Layout, raw: bytes, url: str) -> np.ndarray:
    """:func:`_shard_index` of the index's own bytes."""
    if len(raw) != layout.index_nbytes or checksums.value(raw[:-4]) != int.from_bytes(raw[-4:], "little"):
        raise IntegrityError(
            f"{url}: the shard index fails its CRC32C check (the object is damaged or not a shard); "
            "rewrite the array"
        )
    return np.frombuffer(raw[:-4], dtype="<u8").reshape((*layout.per_shard, 2))


def _decode(layout: Layout, data: np.ndarray, shard: tuple[int, ...], out: np.ndarray, url: str) -> None:
    """Copy every chunk of one stored shard (or chunk object) into ``out``; fill where a chunk is left out."""
    if not layout.sharded and layout.zstd is None:  # one raw chunk: its place, and a copy (no index)
        if len(data) != layout.chunk_nbytes:
            raise IntegrityError(f"{url}: the chunk has {len(data)} bytes, not {layout.chunk_nbytes}; "
                                 "rewrite the array")
        at = zip(shard, layout.chunk, layout.shape, strict=True)
        _place(layout, data, tuple(slice(i * k, min((i + 1) * k, n)) for i, k, n in at), out)
        return
    index = _shard_index(layout, data, url)
    size = layout.chunk_nbytes
    batch: list[tuple[tuple[int, ...], tuple[slice, ...], int, int]] = []
    for c, where in layout.chunks_in(shard):
        offset, nbytes = (int(v) for v in index[c])
        if offset == _NO_CHUNK:
            out[where] = layout.fill
            continue
        if offset + nbytes > len(data) or (layout.zstd is None and nbytes != size):
            raise IntegrityError(f"{url}: chunk {c} has {nbytes} bytes, not {size}; rewrite the array")
        if layout.zstd is None:
            _place(layout, data[offset:offset + nbytes], where, out)
            continue
        batch.append((c, where, offset, nbytes))
        if len(batch) == _BATCH:
            _decompress_into(layout, data, batch, out, url)
            batch.clear()
    if batch:
        _decompress_into(layout, data, batch, out, url)


def _place(layout: Layout, raw: np.ndarray, where: tuple[slice, ...], out: np.ndarray) -> None:
    """Copy one chunk's bytes to its place ``where`` in ``out`` (an edge chunk's part inside the array)."""
    block = raw.view(layout.dtype).reshape(layout.chunk)
    out[where] = block[tuple(slice(0, s.stop - s.start) for s in where)]


def _decompress_into(layout: Layout, data: np.ndarray, batch: list[tuple[tuple[int, ...], tuple[slice, ...], int, int]],
                     out: np.ndarray, url: str) -> None:
    """Decompress some of a shard's chunks (``(chunk, where, offset, nbytes)``) into their places in ``out``.

    Several go in one call, for the reason :func:`_compressed` gives: the 4
    shards of layout b of ``benchmarks/bench_peers.py`` decoded on four
    threads in 51 ms, against 56 ms a chunk at a time (tensorstore's
    in-memory read: 58 ms; medians of 10). When that call fails, each chunk
    is decompressed on its own, so the error names the damaged one.
    """
    import zstandard

    size = layout.chunk_nbytes
    d = _decompressor()
    frames: Sequence[Any] | None = None
    if len(batch) > 1 and zstandard.backend == "cext":  # only the C extension has the batch call
        segments = np.array([(offset, nbytes) for _, _, offset, nbytes in batch], dtype="<u8")
        try:
            frames = d.multi_decompress_to_buffer(
                zstandard.BufferWithSegments(memoryview(data), segments.tobytes()),  # type: ignore[arg-type]  # numpy declares __buffer__ for Python >= 3.12 only
                decompressed_sizes=np.full(len(batch), size, dtype="<u8").tobytes(),
            )
        except zstandard.ZstdError:
            frames = None
    for k, (c, where, offset, nbytes) in enumerate(batch):
        if frames is not None:
            raw = frames[k]
        else:
            try:
                raw = d.decompress(data[offset:offset + nbytes], max_output_size=size)
            except Exception as e:  # zstandard.ZstdError: not a frame, damaged, or too large
                raise IntegrityError(f"{url}: chunk {c} is not a valid zstd frame ({e}); rewrite the array") from e
        if len(raw) != size:
            raise IntegrityError(f"{url}: chunk {c} decompresses to {len(raw)} bytes, not {size}; rewrite the array")
        _place(layout, np.frombuffer(raw, dtype="u1"), where, out)


_zstd = threading.local()


def _decompressor() -> Any:
    """This thread's ``zstandard`` decompressor (one must not be used by two threads at once).

    Why not numcodecs' ``Zstd`` (what zarr decodes with): it holds the GIL
    while it decompresses, so shard workers decompress one at a time; 1,024
    chunks of 64 KiB took 74 ms on one thread or two. ``zstandard`` releases
    it: 50 ms on two threads. The frames are the same standard zstd frames.
    """
    d = getattr(_zstd, "decompressor", None)
    if d is None:
        import zstandard

        d = _zstd.decompressor = zstandard.ZstdDecompressor()
    return d


#: what the workers of one read or write may hold at once (each holds one whole shard)
_MEMORY_BUDGET = 1 << 30


def _workers(layout: Layout, shards: int) -> int:
    """Workers for one read or write: zarr's ``async.concurrency``, fewer if their shards would not fit
    in :data:`_MEMORY_BUDGET`."""
    import zarr

    return max(1, min(int(zarr.config.get("async.concurrency")), shards, _MEMORY_BUDGET // layout.shard_nbytes))


def _each_shard(layout: Layout, new_job: Callable[[], Callable[[tuple[int, ...]], Awaitable[None]]]) -> None:
    """Run a job for every shard on zarr's event loop, ``async.concurrency`` workers at most.

    ``new_job`` is called once per worker, so a worker can keep a buffer;
    fewer workers run when that many whole shards would not fit in
    :data:`_MEMORY_BUDGET`.
    """
    from zarr.core.sync import sync

    shards = list(layout.shards())

    async def worker() -> None:
        job = new_job()
        while shards:
            await job(shards.pop())

    async def run() -> None:
        await asyncio.gather(*(worker() for _ in range(_workers(layout, len(shards)))))

    sync(run())


#: shards (or chunk objects) at least this large are encoded and decoded in a worker thread
_THREAD_MIN_BYTES = 1 << 20


async def _offload(layout: Layout, fn: Callable[..., Any], *args: Any) -> Any:
    """Run ``fn`` in a worker thread when the shard is large: NumPy copies and zstd release the GIL,
    so the event loop keeps other requests moving meanwhile; small chunks are not worth the hand-off.

    No more shards are encoded (or decoded) at once than there are cores,
    as tensorstore's ``data_copy_concurrency`` does: more would only share
    them, and every shard would be ready at the end, its upload not begun.
    With as many, the first shards go up while the next are compressed.
    """
    if layout.shard_nbytes >= _THREAD_MIN_BYTES:
        return await asyncio.get_running_loop().run_in_executor(_coder_threads(), fn, *args)
    return fn(*args)


#: the threads large shards are encoded and decoded in, one per core (:func:`_offload`)
_coder_threads = KeptPool(cores, "cloudio-code")


def in_one_batch(store: Any, layout: Layout) -> bool:
    """Whether :func:`write` sends the shards (or chunks) of ``layout`` to ``store`` in one batch of uploads."""
    from cloudio._zarr.store import JournaledStore

    return layout.shard_nbytes < _THREAD_MIN_BYTES and isinstance(store, JournaledStore) and store.uploads_in_batches


@dataclass(frozen=True)
class Replacing:
    """How :func:`write` replaces what a store held (``save_array``; see ``arrays._created_like``).

    ``begin`` runs before the first upload (it puts up the write marker),
    ``create`` alongside the uploads (the array's metadata documents), and
    ``sweep(kept)`` after the last, with the store keys of the chunks
    written (it deletes the old objects the new array did not overwrite).
    """

    begin: Callable[[], Coroutine[Any, Any, None]]
    create: Callable[[], Coroutine[Any, Any, None]]
    sweep: Callable[[set[str]], Coroutine[Any, Any, None]]


def write(z: zarr.Array[Any], layout: Layout, array: np.ndarray, replacing: Replacing | None = None) -> None:
    """Write all of ``array`` into ``z``: one encode and one upload per shard.

    Each worker reuses one shard buffer, so after its first shard no new
    memory is touched. Where the shards go up :func:`in_one_batch`, they
    are encoded one at a time into one buffer, each sent before the next is
    encoded. Large shards of zstd chunks are encoded band by band by every
    coder thread (:class:`_BandedShards`), at most ``workers`` of them
    waiting for their upload. ``replacing``'s steps run on zarr's event loop (readers refuse
    the store until the write marker goes: the order of the array's objects
    does not matter); large shards are encoded while it begins: on the
    emulator the set-up's round trips are a few ms of a write, on GCS tens
    of ms each. One shard failing cancels the other workers: nothing goes up
    after the write raised.
    """
    from zarr.core.buffer.cpu import Buffer

    size = layout.shard_nbytes
    store = cast("JournaledStore", z.store_path.store)
    shards = list(layout.shards())
    workers = _workers(layout, len(shards))
    batch = in_one_batch(store, layout)
    taken: list[np.ndarray] = []  # borrowed from the pool
    base = z.store_path.path.rstrip("/")
    kept: set[str] = set()  # the store keys written
    banded = layout.sharded and layout.zstd is not None and not batch

    def encoder() -> Callable[[tuple[int, ...], bool], memoryview | None]:
        if batch:
            buf = np.empty(size, dtype="u1")
        else:
            buf = shard_buffers.take(size)
            taken.append(buf)
        return encoder_into(buf)

    def encoder_into(buf: np.ndarray) -> Callable[[tuple[int, ...], bool], memoryview | None]:
        """``encode(shard, listed)``: the shard's bytes in ``buf`` (None: nothing to store), with ``listed`` its
        chunks of the fill value too."""
        scratch = np.empty(layout.chunk_nbytes, dtype="u1") if layout.zstd is not None else None
        return lambda shard, listed: _encode(explicit if listed else layout, array, shard, buf, scratch)

    # a shard of nothing but the fill value, whose object the write's listing found, is stored (its chunks of
    # the fill value) rather than deleted: absent, its object would let in a late copy of an earlier write that
    # needed no object there (JournaledStore.expecting); so is every such shard while an upload this process
    # gave up on may still land under the array (a failed write's, whose object the listing did not find)
    explicit = replace(layout, write_empty=True)
    fenced = replacing is not None and store.late_copies_may_land(f"{base}/" if base else "")

    def listed(shard: tuple[int, ...]) -> bool:
        return replacing is not None and (fenced or store.was_listed(key(shard)))

    def key(shard: tuple[int, ...]) -> str:
        name = z.metadata.encode_chunk_key(shard)
        return f"{base}/{name}" if base else name

    async def all_of_it() -> None:
        begun: asyncio.Task[None] | None = None
        if replacing is not None:
            # not one of the group's tasks, and awaited shielded: a shard failing must not cancel the marker's
            # request on its way (it could land after the failed write found no marker to take off); an
            # interrupt does, and the request may then land late, as any cancelled upload may
            begun = asyncio.ensure_future(replacing.begin())
        try:
            await _written(begun)
        except asyncio.CancelledError:  # interrupted (Ctrl-C): the marker's request is stopped too, at once
            if begun is not None:
                begun.cancel()
            raise
        finally:
            if begun is not None:
                await asyncio.wait([begun])  # its outcome known before the write's mark is failed or committed
                if not begun.cancelled():
                    begun.exception()  # raised to the shards that waited for it, if any did
        if replacing is not None:
            await replacing.sweep(kept)

    async def _written(begun: asyncio.Task[None] | None) -> None:
        async with asyncio.TaskGroup() as tasks:  # one failing stops the others
            if begun is not None:
                assert replacing is not None
                tasks.create_task(_after(asyncio.shield(begun), replacing.create))

            async def batch_of_all() -> None:  # each shard encoded when the batch is ready to send it
                encode = encoder()

                def body(i: int) -> tuple[str, memoryview] | None:
                    view = encode(shards[i], False)
                    if view is None and listed(shards[i]):
                        view = encode(shards[i], True)
                    if view is None:
                        return None
                    name = key(shards[i])
                    kept.add(name)
                    return name, view

                if begun is not None:
                    await asyncio.shield(begun)
                await store.set_each(len(shards), body, workers)

            async def worker() -> None:
                encode = encoder()
                while shards:
                    shard = shards.pop()
                    view = await _offload(layout, encode, shard, False)
                    if begun is not None:
                        await asyncio.shield(begun)
                    if view is None and listed(shard):
                        view = await _offload(layout, encode, shard, True)
                    if view is not None:
                        name = key(shard)
                        kept.add(name)
                        await store.set(name, Buffer.from_array_like(np.frombuffer(view, dtype="u1")))

            async def encoded_in_bands() -> None:  # shards encoded one after the other by every coder thread
                loop = asyncio.get_running_loop()
                pool = _coder_threads()
                room = asyncio.Semaphore(workers)  # shards encoded and not yet uploaded, at most
                coding = _BandedShards(layout, array, shards)

                async def upload(shard: tuple[int, ...], view: memoryview, buf: np.ndarray) -> None:
                    try:
                        if begun is not None:
                            await asyncio.shield(begun)
                        name = key(shard)
                        kept.add(name)
                        await store.set(name, Buffer.from_array_like(np.frombuffer(view, dtype="u1")))
                        shard_buffers.give(buf)
                    finally:
                        room.release()

                async def fill_if_listed(shard: tuple[int, ...], buf: np.ndarray) -> None:
                    view = None
                    encoding = False  # a coder thread writes into buf: stopped meanwhile, buf is not given back
                    try:
                        if begun is not None:
                            await asyncio.shield(begun)
                        if listed(shard):
                            encoding = True
                            view = await loop.run_in_executor(pool, encoder_into(buf), shard, True)
                            encoding = False
                    finally:
                        if view is None:
                            if not encoding:
                                shard_buffers.give(buf)
                            room.release()
                    if view is not None:
                        await upload(shard, view, buf)

                async def coder() -> None:
                    while (done := await loop.run_in_executor(pool, coding.until_a_shard)) is not None:
                        i, parts = done
                        await room.acquire()
                        buf = shard_buffers.take(size)
                        try:
                            view = await loop.run_in_executor(pool, _assemble, layout, parts, buf)
                        except BaseException:
                            room.release()
                            raise
                        if view is None:
                            tasks.create_task(fill_if_listed(shards[i], buf))
                        else:
                            tasks.create_task(upload(shards[i], view, buf))

                try:
                    await asyncio.gather(*(coder() for _ in range(cores())))
                except BaseException:
                    coding.stopped.set()  # the coder threads still compressing stop at their next band
                    raise

            if banded:
                tasks.create_task(encoded_in_bands())
            else:
                for _ in range(1 if batch else workers):
                    tasks.create_task(batch_of_all() if batch else worker())

    from cloudio._zarr.store import run_sync

    try:
        run_sync(all_of_it())  # interrupted (Ctrl-C): cancelled, and ended, before the interrupt is raised
    except BaseExceptionGroup as group:  # the first failure, as a plain write raises it
        raise group.exceptions[0] from group.exceptions[0].__cause__
    for buf in taken:  # every upload answered: nothing sends from them any more (after a failure, none goes back)
        shard_buffers.give(buf)


async def _after(first: Awaitable[None], then: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """``then()`` once ``first`` is done (a write's metadata documents once its marker is up)."""
    await first
    await then()


def _gcs_shards(z: zarr.Array[Any]) -> tuple[gcsfs.GCSFileSystem, str] | None:
    """The filesystem and URL prefix of ``z``'s chunk objects when it is stored on GCS through cloudio."""
    from zarr.storage import FsspecStore

    from cloudio._zarr.store import JournaledStore

    store = z.store_path.store
    inner = getattr(store, "_store", None)
    if isinstance(store, JournaledStore) and isinstance(inner, FsspecStore) and store.root_url.startswith("gs://"):
        return inner.fs, "/".join(p for p in (store.root_url, z.store_path.path.strip("/")) if p)
    return None


#: the threads GCS reads run in, 32: reads in flight at once, all of the process together
_reader_threads = KeptPool(lambda: 32, "cloudio-read")


def read(z: zarr.Array[Any], layout: Layout, out: np.ndarray, meanwhile: Callable[[], None] | None = None) -> None:
    """Fill ``out`` with all of ``z``: one GET per shard.

    ``meanwhile`` runs on the calling thread while the first shards are on
    their way (mapping ``out``'s pages: :func:`cloudio._zarr.arrays._output`),
    or first where the reads run on the event loop.

    On GCS, for objects of a MiB or more, each worker is a thread that GETs
    one shard at a time; the GIL is released while bytes arrive and while
    NumPy copies them. Raw chunks stream from the socket into ``out``
    through a buffer of :data:`_PIECE_BYTES` (:func:`_stream`); compressed
    ones, and any shard the stream could not take, are read whole into a
    buffer the worker reuses (:func:`cloudio._gcs.fast.fetch_into`,
    CRC32C-checked; the shard index's own CRC32C covers only the index) and
    decoded from there. Smaller objects, and other stores, are read by tasks
    on zarr's event loop (measured quicker there: see
    :func:`cloudio._gcs.fast.fetch_into`).
    """
    gcs = _gcs_shards(z)
    if gcs is None or layout.shard_nbytes < _THREAD_MIN_BYTES:
        if meanwhile is not None:
            meanwhile()
        _read_on_the_loop(z, layout, out, gcs)
        return
    from cloudio._gcs.fast import fetch_into
    from cloudio._paths import parse_gcs

    fs, base = gcs
    shards = list(layout.shards())
    order = ["morton"]  # how the shards' chunks are stored, as the last shard streamed showed (see _stream)
    row = layout.chunk_nbytes // layout.chunk[0]

    def worker() -> None:
        piece = shard_buffers.take(max(_PIECE_BYTES // row, 1) * row) if layout.zstd is None else None
        buf: np.ndarray | None = None

        def whole() -> np.ndarray:
            nonlocal buf
            if buf is None:
                buf = shard_buffers.take(layout.shard_nbytes)
            return buf

        try:
            while True:
                try:
                    shard = shards.pop()
                except IndexError:
                    return
                path = parse_gcs(f"{base}/{z.metadata.encode_chunk_key(shard)}")
                got = False if piece is None else _stream(fs, path, layout, shard, out, piece, whole, order)
                if got is True:
                    continue
                if got is False:
                    got = fetch_into(fs, path, whole())
                if got is None:  # a shard of nothing but the fill value
                    _fill(layout, shard, out)
                else:
                    _decode(layout, np.frombuffer(got, dtype="u1"), shard, out, path.url)
        finally:
            for b in (piece, buf):
                if b is not None:
                    shard_buffers.give(b)

    pool = _reader_threads()
    futures = [pool.submit(worker) for _ in range(_workers(layout, len(shards)))]
    try:
        if meanwhile is not None:
            meanwhile()
        for f in futures:
            f.result()
    except BaseException:
        shards.clear()  # the other workers stop after the shard each holds: nothing writes to out later
        wait(futures)
        raise


#: bytes of a raw shard a reader takes from the socket at a time (:func:`_stream`): within the L2 cache
#: (a MiB per core here); 256 KiB and 4 MiB pieces read layout a of bench_peers.py more slowly
_PIECE_BYTES = 1 << 20


class _NotAsGuessed(Exception):
    """A shard's index does not place its chunks as :func:`_stream` can."""


def _stream(fs: gcsfs.GCSFileSystem, path: GCSPath, layout: Layout, shard: tuple[int, ...], out: np.ndarray,
            piece: np.ndarray, whole: Callable[[], np.ndarray], order: list[str]) -> bool | memoryview | None:
    """Read one raw shard (or chunk object) from the socket straight into ``out``, a piece at a time
    (:func:`cloudio._gcs.fast.fetch_pieces`). True when done; a view of ``whole()`` holding the shard
    for :func:`_decode`; None when there is no such object; False when it must be read again the
    careful way (:func:`read`), which then writes over all of the shard's part of ``out``.

    Why: read whole into a buffer, a 16 MiB shard was then read from memory
    twice more, for its CRC32C and for the copy into ``out``; piece by piece
    both happen while the piece is in the cache. A first version of this
    read layout a of ``benchmarks/bench_peers.py`` in 158 ms against 192 ms
    whole (medians of 7 rounds, the output's memory lent again in both).

    Only a shard holding every chunk that overlaps the array streams (its
    length says so; any other is read whole, on the same answer): its
    chunks then fill it, each :attr:`Layout.chunk_nbytes`, in some order,
    and the index says which. An index at the start arrives first. One at
    the end arrives last, so the chunks are placed as guessed: in the order
    ``order[0]`` names, the last one a shard of this read was found in
    (Morton order at first, zarr's and cloudio's; tensorstore's is C
    order). When the index then places them otherwise, they are moved
    where it says; a shard at the array's edge, whose chunks were cut to
    fit the guessed places, is read again whole.
    """
    size = layout.chunk_nbytes
    places = dict(layout.chunks_in(shard))
    stored = tuple(places)  # Morton order
    guess = list(stored) if order[0] == "morton" else sorted(stored)
    k = layout.chunk[0]
    rows = len(piece) * k // size
    pieces = [(p, r, min(rows, k - r)) for p in range(len(stored)) for r in range(0, k, rows)]
    if layout.sharded:  # the index: p = -1
        pieces.insert(len(pieces) if layout.index_at_end else 0, (-1, 0, 0))
    index = bytearray()

    def plan(length: int) -> list[int] | None:
        if length != len(stored) * size + layout.index_nbytes:
            return None  # a chunk is left out: read it whole
        return [layout.index_nbytes if p < 0 else n * size // k for p, _, n in pieces]

    def take(i: int, data: np.ndarray) -> None:
        p, r, n = pieces[i]
        if p < 0:
            index[:] = data.tobytes()
            if not layout.index_at_end:
                guess[:] = _places_in(layout, bytes(index), stored, path.url)
            return
        where = places[guess[p]]
        block = out[where]
        valid = min(n, block.shape[0] - r)
        if valid > 0:
            laid = data.view(layout.dtype).reshape((n, *layout.chunk[1:]))
            block[r:r + valid] = laid[(slice(0, valid), *(slice(0, w.stop - w.start) for w in where[1:]))]

    from cloudio._gcs.fast import fetch_pieces

    done = fetch_pieces(fs, path, plan, piece, take, whole)
    if done is not True or not layout.sharded or not layout.index_at_end:
        return done
    try:
        actual = _places_in(layout, bytes(index), stored, path.url)
    except (_NotAsGuessed, IntegrityError):
        return False
    if actual == guess:
        return True
    order[0] = "morton" if actual == list(stored) else "c"
    if any(w.stop - w.start != n for where in places.values() for w, n in zip(where, layout.chunk, strict=True)):
        return False  # an edge chunk was cut to fit its guessed place
    moved = [out[places[c]].copy() for c in guess]  # the p-th chunk stored, where the guess put it
    for c, block in zip(actual, moved, strict=True):
        out[places[c]] = block
    return True


def _places_in(layout: Layout, raw: bytes, stored: tuple[tuple[int, ...], ...], url: str) -> list[tuple[int, ...]]:
    """The chunks of ``stored`` in the order the shard index ``raw`` places them, every one a whole raw
    chunk; :class:`_NotAsGuessed` when they are not so placed, IntegrityError when the index is damaged."""
    index = _parsed_index(layout, raw, url)
    size = layout.chunk_nbytes
    start = 0 if layout.index_at_end else layout.index_nbytes
    at: dict[int, tuple[int, ...]] = {}
    for c in stored:
        offset, nbytes = (int(v) for v in index[c])
        p, off = divmod(offset - start, size)
        if nbytes != size or off or not 0 <= p < len(stored) or p in at:
            raise _NotAsGuessed(f"{url}: chunk {c} at {offset}, {nbytes} bytes")
        at[p] = c
    return [at[p] for p in range(len(stored))]


def _fill(layout: Layout, shard: tuple[int, ...], out: np.ndarray) -> None:
    where = zip(shard, layout.shard, layout.shape, strict=True)
    out[tuple(slice(i * s, min((i + 1) * s, n)) for i, s, n in where)] = layout.fill


def _read_on_the_loop(z: zarr.Array[Any], layout: Layout, out: np.ndarray,
                      gcs: tuple[gcsfs.GCSFileSystem, str] | None) -> None:
    """:func:`read` on zarr's event loop: small objects on GCS in one batch of GETs
    (:func:`cloudio._gcs.fast.get_each`, CRC32C-checked), every object of other stores by
    tasks calling the store's own ``get``."""
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.sync import sync

    if gcs is not None:
        sync(_get_each_shard(z, layout, out, gcs))
        return
    proto = default_buffer_prototype()

    def new_job() -> Callable[[tuple[int, ...]], Awaitable[None]]:
        async def job(shard: tuple[int, ...]) -> None:
            key = z.metadata.encode_chunk_key(shard)
            stored = await (z.store_path / key).get(prototype=proto)
            if stored is None:  # a shard of nothing but the fill value
                _fill(layout, shard, out)
            else:
                await _offload(layout, _decode, layout, stored.as_numpy_array(), shard, out, f"{z.store_path}/{key}")

        return job

    _each_shard(layout, new_job)


async def _get_each_shard(z: zarr.Array[Any], layout: Layout, out: np.ndarray,
                          gcs: tuple[gcsfs.GCSFileSystem, str]) -> None:
    """Every shard of ``z`` in one batch of GETs (:func:`cloudio._gcs.fast.get_each`, CRC32C-checked),
    each decoded into ``out`` as it arrives."""
    from cloudio._gcs.fast import get_each
    from cloudio._paths import GCSPath, parse_gcs

    fs, base = gcs
    root = parse_gcs(base)  # checked once; the keys are zarr's own
    prefix = f"{root.key.rstrip('/')}/" if root.key else ""
    shards = list(layout.shards())
    paths = [GCSPath(root.bucket, prefix + z.metadata.encode_chunk_key(s)) for s in shards]

    def take(i: int, body: np.ndarray | None) -> None:
        if body is None:  # a shard of nothing but the fill value
            _fill(layout, shards[i], out)
        else:
            _decode(layout, body, shards[i], out, paths[i].url)

    await get_each(fs, paths, layout.shard_nbytes, take, _workers(layout, len(shards)))


def reads_in_one_batch(z: zarr.Array[Any], layout: Layout) -> bool:
    """Whether :func:`read` asks for every shard of ``z`` in one batch of GETs on the event loop (small
    shards or chunk objects on GCS), which :func:`read_checked` can run beside a check."""
    return layout.shard_nbytes < _THREAD_MIN_BYTES and _gcs_shards(z) is not None


def read_checked(z: zarr.Array[Any], layout: Layout, out: np.ndarray,
                 check: Callable[[gcsfs.GCSFileSystem], Coroutine[Any, Any, None]]) -> None:
    """:func:`read` where :func:`reads_in_one_batch`, with ``check(fs)`` running beside the GETs. The
    check's error wins: the GETs still on their way are then cancelled. The read's own error is raised
    only once the check has passed (a read under a wrong guess may fail for that reason alone).

    Why: see :mod:`cloudio._zarr.last_seen`.
    """
    from zarr.core.sync import sync

    gcs = _gcs_shards(z)
    assert gcs is not None and reads_in_one_batch(z, layout)

    async def both() -> None:
        checking = asyncio.ensure_future(check(gcs[0]))
        reading = asyncio.ensure_future(_get_each_shard(z, layout, out, gcs))
        try:
            await asyncio.wait({checking, reading}, return_when=asyncio.FIRST_EXCEPTION)
            await asyncio.wait({checking})  # the read may have ended first: the check's verdict
            checking.result()
            await reading
        finally:
            for task in (checking, reading):
                task.cancel()
            await asyncio.gather(checking, reading, return_exceptions=True)

    sync(both())
