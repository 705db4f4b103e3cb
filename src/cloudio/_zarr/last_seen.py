"""The ``zarr.json`` each Zarr node held when this process last read or wrote it: a guess, never an answer.

Why: a load of a small array is mostly round trips, and opening it is one
of them (its ``zarr.json`` and the write marker) before any chunk can be
asked for. With a guess of what ``zarr.json`` holds, :func:`cloudio.load_array`
asks for the chunks in the same batch of GETs as the document and the
marker, and keeps them only when the document that comes back is, byte for
byte, the one guessed (``cloudio._zarr.arrays``). The guess is never
trusted: a wrong or missing one costs the round trip it would have saved.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

#: documents kept, the most recently seen; a few hundred bytes to a few KiB each
_KEEP = 256

_lock = threading.Lock()
_docs: OrderedDict[str, bytes] = OrderedDict()  # URL of a zarr.json -> its bytes, last seen last


def remember(url: str, doc: bytes) -> None:
    """``doc`` was just read from, or written to, ``url``."""
    with _lock:
        _docs[url] = doc
        _docs.move_to_end(url)
        while len(_docs) > _KEEP:
            _docs.popitem(last=False)


def guess(url: str) -> bytes | None:
    """What ``url`` held when last seen here, if it was."""
    with _lock:
        return _docs.get(url)


def forget_all() -> None:
    """Nothing seen: the next load of every array opens it first (for a fresh process's figures)."""
    with _lock:
        _docs.clear()
