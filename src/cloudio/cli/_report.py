"""The raw-vs-cloudio table shared by ``cloudio demo`` and ``cloudio check``."""

from __future__ import annotations

from collections.abc import Sequence

from cloudio.cli._ui import table
from cloudio.cli.cases import CaseResult, Outcome

_WORD = {"correct": "ok", "stale": "STALE", "wrong": "WRONG", "error": "ERROR", "skipped": "skipped"}


def cell(o: Outcome) -> str:
    return f"{_WORD.get(o.verdict, o.verdict)}: {o.detail}"


def requests_cell(r: CaseResult) -> str:
    if r.raw.requests is None and r.cloudio.requests is None:
        return "-"
    return f"{_count(r.raw.requests)} / {_count(r.cloudio.requests)}"


def _count(n: int | None) -> str:
    return "-" if n is None else str(n)


def results_table(results: Sequence[CaseResult], first: str = "case", numbered: bool = False) -> str:
    show_requests = any(r.raw.requests is not None or r.cloudio.requests is not None for r in results)
    headers = [first, "raw libraries", "cloudio"] + (["requests\nraw / cloudio"] if show_requests else [])
    rows = []
    for i, r in enumerate(results, 1):
        label = f"{i}. {r.title}" if numbered else f"{r.name}: {r.title}"
        row = [label, cell(r.raw), cell(r.cloudio)]
        if show_requests:
            row.append(requests_cell(r))
        rows.append(row)
    return table(headers, rows)
