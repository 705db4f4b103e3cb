"""The ``zarr.json`` of each Zarr array this process last wrote, and its generation: a guess.

Why: a load of a small array is mostly round trips, and opening it is one
of them (its ``zarr.json`` and the write marker) before any chunk can be
asked for. With a guess of what ``zarr.json`` holds, :func:`cloudio.load_array`
asks for the chunks at once, and beside them, in one listing, for the
marker and the generation of ``zarr.json``; it keeps the chunks only when
the listing shows no marker and the generation guessed
(``cloudio._zarr.arrays``). A missing guess costs the round trip it would
have saved; a wrong one, its chunks read once in vain, and it is forgotten.

Only a write's own documents are kept, once its marker is down
(``WriteMark.commit``): a generation seen while a write was under way (by
a read that was refused, or by the writer itself before its last chunk)
could let a read of that write's half-stored chunks pass the check.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

from cloudio._threads import hold_globals_across_fork

#: documents kept, the most recently seen
_KEEP = 256
#: the largest document kept (a group's consolidated metadata can take megabytes; an array's, a few KiB)
_LARGEST = 1 << 16

_lock = threading.Lock()
_docs: OrderedDict[str, tuple[bytes, int]] = OrderedDict()  # URL of a zarr.json -> its bytes and generation


def remember(url: str, doc: bytes, generation: int) -> None:
    """A write that stored ``doc`` at ``url``, at ``generation`` (0: not known), is over."""
    with _lock:
        if not generation or len(doc) > _LARGEST or b'"array"' not in doc:
            _docs.pop(url, None)  # what was kept no longer holds
            return
        _docs[url] = doc, generation
        _docs.move_to_end(url)
        while len(_docs) > _KEEP:
            _docs.popitem(last=False)


def forget(url: str, kept: tuple[bytes, int] | None = None) -> None:
    """``url`` changed: what was kept of it no longer holds (only if it is still ``kept``, when given: a
    write of this process may have kept a newer one meanwhile)."""
    with _lock:
        if kept is None or _docs.get(url) == kept:
            _docs.pop(url, None)


def guess(url: str) -> tuple[bytes, int] | None:
    """What this process last wrote to ``url``, and its generation, if it did."""
    with _lock:
        return _docs.get(url)


def forget_all() -> None:
    """Nothing seen: the next load of every array opens it first (for a fresh process's figures)."""
    with _lock:
        _docs.clear()


# held across a fork: a thread keeping or forgetting a document then is not in the child, and a lock copied held by
# it would stop the child's first load_array (its guess) or write (its forget) for good (in-memory work under it)
hold_globals_across_fork("zarr last seen", __name__, "_lock")
