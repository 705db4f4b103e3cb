"""Bounded tables: dicts kept in order of last change, whose oldest entries go past a limit.

Why: a long-running process (a tile server, an ETL worker) must not grow
what cloudio remembers per object, directory or store without end; every
such table drops its least recently changed entries, and its owner says what
a dropped entry falls back to (checked again, or coarser and never lost).
"""

from __future__ import annotations

import itertools
from typing import TypeVar

K = TypeVar("K")
V = TypeVar("V")

__all__ = ["drop_oldest", "touch"]


def touch(table: dict[K, V], key: K, value: V) -> None:
    """``table[key] = value``, ``key`` moved to the end (the most recently changed)."""
    table.pop(key, None)
    table[key] = value


def drop_oldest(table: dict[K, V], keep: int) -> list[tuple[K, V]]:
    """Remove all but the ``keep`` most recently changed entries of ``table``; the entries removed, oldest first."""
    dropped = list(itertools.islice(table.items(), max(0, len(table) - keep)))
    for key, _ in dropped:
        del table[key]
    return dropped
