"""CRC32C as GCS reports it, for every check cloudio makes of bytes sent or received.

GCS spells a CRC32C as the base64 of its big-endian value, in an object
resource's ``crc32c`` and in a response's ``X-Goog-Hash: crc32c=...``; a Zarr
shard index carries its own CRC32C little-endian (:mod:`cloudio._zarr.shard_codec`).

Why the ``crc32c`` package and not google-crc32c: every byte a write sends
and every byte a whole read receives is summed, and it sums 2.3 to 3.2 times
faster (16 against 4.9 GiB/s over 64 MiB on this project's 2-core Xeon).
Interleaved in one process on the emulator, ``save_array``/``load_array`` of
an 8192² float32 array in 16 MiB shards ran 4% and 14% faster with it; 100
chunks of 40 KB, no faster (``benchmarks/bench_crc32c.py``). It also takes
any contiguous buffer (``memoryview``, ``bytearray``, NumPy arrays) without a
copy, and lets go of the GIL over large ones.
"""

from __future__ import annotations

import base64
import os
from typing import Any

from crc32c import crc32c as _extend

#: bytes of a local file summed at a time
_FILE_BLOCK = 2**22


def value(data: Any, crc: int = 0) -> int:
    """The CRC32C of the contiguous buffer ``data``, continuing from the CRC32C ``crc`` of what came before."""
    return _extend(data, crc)


def text(crc: int) -> str:
    """``crc`` as GCS spells it (base64 of the big-endian value)."""
    return base64.b64encode(crc.to_bytes(4, "big")).decode("ascii")


def of(data: Any) -> str:
    """The CRC32C of ``data`` as GCS spells it."""
    return text(value(data))


def of_file(local: str | os.PathLike[str]) -> str:
    """The CRC32C of the local file ``local`` as GCS spells it, read a block at a time."""
    crc = 0
    with open(local, "rb") as f:
        for block in iter(lambda: f.read(_FILE_BLOCK), b""):
            crc = value(block, crc)
    return text(crc)


def of_header(headers: Any) -> str | None:
    """The ``crc32c=`` part of a response's X-Goog-Hash, when it describes the bytes received."""
    if headers.get("X-Goog-Stored-Content-Encoding", "identity") != "identity":
        return None  # the hash is of the stored (compressed) bytes, not of what arrived
    hashes: str = headers.get("X-Goog-Hash", "")  # e.g. "crc32c=...,md5=..."
    for part in hashes.split(","):
        name, _, found = part.strip().partition("=")
        if name == "crc32c":
            return found
    return None


class Running:
    """A CRC32C summed as the bytes go by (an upload sent in chunks)."""

    def __init__(self) -> None:
        self.crc = 0

    def update(self, data: Any) -> None:
        self.crc = value(data, self.crc)

    def text(self) -> str:
        return text(self.crc)
