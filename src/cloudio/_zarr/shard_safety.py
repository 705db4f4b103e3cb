"""Shard safety: make sure each Zarr shard (or chunk) is written by exactly one Dask task.

A Zarr shard is one object. A task that writes part of it reads the object,
changes its part and writes the whole object back. Two tasks doing that to
one shard at once lose one of the two writes, silently: measured with
xarray and ``safe_chunks=False``, 3,120,000 of 4,000,000 values read back
wrong. The same holds for unsharded chunks smaller than a Dask chunk's
boundary allows.

The rule enforced here, per dimension: every boundary *between* two Dask
chunks, placed at its absolute position in the Zarr array (the region start
or the append offset added), falls on a multiple of the write grid (the
shard shape, or the chunk shape when unsharded). The first and last chunk
of a write may cover a shard partly: no other task of the same write
touches that shard, so its read-modify-write is safe.

When the rule is broken, :func:`align` rechunks: boundaries move to grid
multiples, keeping each Dask chunk close to its old size (at least one
shard). When the caller forbade rechunking, :class:`UnsafeChunkingError`
says which variable, which chunks, which grid, and what to do.
"""

from __future__ import annotations

import logging
import operator
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from cloudio.errors import UnsafeChunkingError

if TYPE_CHECKING:
    import dask.array

log = logging.getLogger(__name__)

Chunks = tuple[tuple[int, ...], ...]


def whole(value: object) -> int | None:
    """``value`` as an int when it is one (NumPy's integers too, as zarr takes them), else None (bools too)."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        return None


def is_dask(obj: Any) -> bool:
    """Is ``obj`` a Dask collection (whose chunks need aligning)? False when Dask is not loaded: a collection of
    Dask's was made by Dask, imported by then. Why not import it: a NumPy array's write needs none of it, and Dask's
    import fails once the interpreter shuts down (an ``atexit`` handler saving an array)."""
    base = sys.modules.get("dask.base")
    return base is not None and bool(base.is_dask_collection(obj))


def misaligned_dims(chunks: Chunks, grid: Sequence[int], offsets: Sequence[int] | None = None) -> list[int]:
    """Dimensions whose inner Dask chunk boundaries do not fall on multiples of ``grid``.

    Parameters
    ----------
    chunks
        Dask chunks (``array.chunks``).
    grid
        The write grid: the shard shape, or the chunk shape when unsharded.
    offsets
        Where the write starts in the Zarr array, per dimension (region start,
        append offset); zeros by default.
    """
    offsets = offsets if offsets is not None else (0,) * len(chunks)
    bad = []
    for dim, (cs, g, off) in enumerate(zip(chunks, grid, offsets, strict=True)):
        pos = off
        for c in cs[:-1]:
            pos += c
            if pos % g:
                bad.append(dim)
                break
    return bad


def aligned_chunks(chunks: Chunks, grid: Sequence[int], offsets: Sequence[int] | None = None) -> Chunks:
    """Dask chunks covering the same extent as ``chunks`` whose inner boundaries lie on ``grid``.

    Dimensions already aligned keep their chunks. Elsewhere the new chunk
    size is the multiple of the grid step nearest the largest old chunk (at
    least one step), laid on the absolute grid, so the first and last chunk
    may be shorter.
    """
    offsets = offsets if offsets is not None else (0,) * len(chunks)
    bad = set(misaligned_dims(chunks, grid, offsets))
    out: list[tuple[int, ...]] = []
    for dim, (cs, g, off) in enumerate(zip(chunks, grid, offsets, strict=True)):
        if dim not in bad:
            out.append(tuple(cs))
            continue
        total = sum(cs)
        step = max(1, round(max(cs) / g)) * g
        end = off + total
        new: list[int] = []
        pos = off
        nxt = (off // step + 1) * step  # first step multiple after the start
        while pos < end:
            stop = min(nxt, end)
            new.append(stop - pos)
            pos = stop
            nxt += step
        out.append(tuple(new))
    return tuple(out)


def _fmt_chunks(chunks: Chunks, limit: int = 6) -> str:
    """Dask chunks, short: ``((100 x10), (100 x9, 50))``."""
    parts = []
    for cs in chunks:
        if len(cs) > 2 and len(set(cs)) == 1:
            parts.append(f"({cs[0]} x{len(cs)})")
        elif len(cs) > 2 and len(set(cs[:-1])) == 1:
            parts.append(f"({cs[0]} x{len(cs) - 1}, {cs[-1]})")
        elif len(cs) > limit:
            parts.append("(" + ", ".join(map(str, cs[:limit])) + f", ... {len(cs)} chunks)")
        else:
            parts.append(str(tuple(cs)))
    return "(" + ", ".join(parts) + ")"


def align(
    array: dask.array.Array,
    grid: Sequence[int],
    *,
    offsets: Sequence[int] | None = None,
    name: str = "array",
    url: str = "",
    sharded: bool = True,
    rechunk: bool = True,
) -> dask.array.Array:
    """Return ``array`` rechunked so that no two tasks write one shard (or chunk) of ``grid``.

    Parameters
    ----------
    array
        The Dask array about to be written.
    grid
        Shard shape (or chunk shape when the Zarr array is unsharded).
    offsets
        Where the write starts in the Zarr array, per dimension.
    name, url
        For messages: the variable and the store.
    sharded
        Whether ``grid`` is a shard shape (wording of messages only).
    rechunk
        False forbids rechunking: misaligned chunks raise instead.

    Raises
    ------
    UnsafeChunkingError
        When ``rechunk`` is False and the chunks are misaligned.
    """
    grid = tuple(int(g) for g in grid)
    if len(grid) != array.ndim:
        raise UnsafeChunkingError(
            f"{url or 'store'}: variable {name!r} has {array.ndim} dimensions but its Zarr "
            f"{'shards' if sharded else 'chunks'} {grid} have {len(grid)}; check the encoding"
        )
    bad = misaligned_dims(array.chunks, grid, offsets)
    if not bad:
        return array
    unit = "shard" if sharded else "chunk"
    if not rechunk:
        off = f" starting at offset {tuple(offsets)}" if offsets is not None and any(offsets) else ""
        raise UnsafeChunkingError(
            f"{url or 'store'}: variable {name!r} has Dask chunks {_fmt_chunks(array.chunks)}{off} that "
            f"split Zarr {unit}s of shape {grid} (dimension(s) {bad}); several tasks would "
            f"read-modify-write one {unit} and lose data. Rechunk so every chunk boundary falls on a "
            f"multiple of {grid} (e.g. array.rechunk({grid})), or let cloudio do it (rechunk=True)."
        )
    new = aligned_chunks(array.chunks, grid, offsets)
    log.info("%s: rechunking %r from %s to %s to match Zarr %s %s", url or "store", name,
             _fmt_chunks(array.chunks), _fmt_chunks(new), unit, grid)
    out: dask.array.Array = array.rechunk(new)
    return out


def write_grid(zarr_array: Any) -> tuple[tuple[int, ...], bool]:
    """The grid one task must own in ``zarr_array``: its shard shape, else its chunk shape."""
    shards = getattr(zarr_array, "shards", None)
    if shards is not None:
        return tuple(int(s) for s in shards), True
    return tuple(int(c) for c in zarr_array.chunks), False
