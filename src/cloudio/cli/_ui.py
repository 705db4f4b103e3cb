"""Plain-text rendering for the ``cloudio`` command: tables that wrap, progress lines, sizes.

Results go to stdout; progress goes to stderr, so ``cloudio check --json``
stays parseable and ``cloudio demo | tee`` keeps only the story.
"""

from __future__ import annotations

import shutil
import sys
import textwrap
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

_MIN_COL = 10
_GAP = "  "


def width() -> int:
    """The terminal's width (``COLUMNS`` wins; 120 when not a terminal)."""
    return max(60, shutil.get_terminal_size((120, 24)).columns)


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], max_width: int | None = None) -> str:
    """A table whose widest columns wrap to fit ``max_width``.

    Columns keep their natural width while everything fits; otherwise the
    widest shrink first (never below a readable minimum).
    """
    total = max_width if max_width is not None else width()
    ncol = len(headers)
    def longest(v: object) -> int:
        return max((len(line) for line in str(v).splitlines()), default=0)

    natural = [max([longest(headers[i])] + [longest(r[i]) for r in rows]) for i in range(ncol)]
    widths = list(natural)
    budget = total - len(_GAP) * (ncol - 1)
    while sum(widths) > budget:
        i = max(range(ncol), key=lambda k: widths[k])
        if widths[i] <= _MIN_COL:
            break
        widths[i] -= 1

    def cells(values: Sequence[str]) -> list[list[str]]:
        out = []
        for v, w in zip(values, widths, strict=False):  # a row's cells beyond the headers are not shown
            lines: list[str] = []
            for part in str(v).splitlines() or [""]:
                lines.extend(textwrap.wrap(part, w, break_on_hyphens=False) or [""])
            out.append(lines)
        return out

    def render(values: Sequence[str]) -> list[str]:
        cs = cells(values)
        height = max(len(c) for c in cs)
        lines = []
        for k in range(height):
            parts = [(c[k] if k < len(c) else "").ljust(w) for c, w in zip(cs, widths, strict=True)]
            lines.append(_GAP.join(parts).rstrip())
        return lines

    out = render(headers)
    out.append(_GAP.join("-" * w for w in widths))
    for r in rows:
        out.extend(render(r))
    return "\n".join(out)


def human_bytes(n: float | int | None) -> str:
    if n is None:
        return "?"
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def err(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _rich_console() -> Any:
    """A rich console on stderr when stderr is a terminal (or ``FORCE_COLOR`` says so) and rich is installed."""
    try:
        from rich.console import Console
    except ImportError:
        return None
    console = Console(stderr=True)
    return console if console.is_terminal else None


@contextmanager
def progress(label: str, step: int | None = None, total: int | None = None) -> Iterator[None]:
    """Show a piece of long work on stderr while it runs, then how long it took.

    On a terminal with rich installed (``cloudio[cli]``): a spinner, then a
    tick line. Otherwise (pipes, CI logs): ``[2/6] label ...`` then its time.
    """
    head = f"[{step}/{total}] " if step is not None and total is not None else ""
    t0 = time.perf_counter()
    console = _rich_console()
    if console is None:
        err(f"{head}{label} ...")
        try:
            yield
        finally:
            err(f"{' ' * len(head)}done in {time.perf_counter() - t0:.1f} s")
        return
    from rich.markup import escape

    ok = False
    try:
        with console.status(escape(f"{head}{label}")):
            yield
        ok = True
    finally:
        mark = "[green]\u2713[/]" if ok else "[red]\u2717[/]"
        console.print(f"{mark} {escape(head + label)} [dim]{time.perf_counter() - t0:.1f} s[/]", highlight=False)
