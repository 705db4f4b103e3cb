"""``cloudio check [URL] [--json]``: every staleness case, raw libraries vs cloudio.

Cases: overwrite, delete, new object in a listed prefix, WarpedVRT next to its
source, Zarr group member added, sharded Dask write. Each runs with the raw
libraries and through cloudio, on the embedded emulator (no URL) or in a
fresh folder below a bucket prefix (removed afterwards).
Exit status 0 when cloudio returned the truth in every case that ran, 1
otherwise. The last line is ``N/T cases consistent``; with ``--json`` the
whole output is one JSON document instead.
"""

from __future__ import annotations

import argparse
import json

from cloudio.cli._report import results_table
from cloudio.cli._target import run_target
from cloudio.cli._ui import progress
from cloudio.cli.cases import CHECK_CASES, CaseResult, Context, case_name, case_title

HELP = "run every staleness case: raw libraries vs cloudio"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("url", nargs="?", help="gs://bucket/prefix to run in (default: the embedded emulator)")
    p.add_argument("--json", action="store_true", help="print one JSON document instead of the table")
    p.add_argument("--keep", action="store_true", help="keep the objects written below URL")


def run_cases(url: str | None, keep: bool = False) -> tuple[list[CaseResult], str, str]:
    """Run every case; return the results, where they ran, and the run's prefix."""
    results: list[CaseResult] = []
    with run_target(url, "check", keep=keep) as target:
        for i, fn in enumerate(CHECK_CASES, 1):
            ctx = Context(target.root, target.emulator, folder=f"{case_name(fn)}/")
            with progress(case_title(fn), i, len(CHECK_CASES)):
                results.append(fn(ctx))
    return results, target.where, target.root


def run(args: argparse.Namespace) -> int:
    results, where, root = run_cases(args.url, keep=args.keep)
    ran = [r for r in results if not r.skipped]
    good = sum(r.consistent for r in ran)
    ok = bool(ran) and good == len(ran)
    if args.json:
        doc = {
            "where": where,
            "prefix": root,
            "cases": [r.as_dict() for r in results],
            "consistent": good,
            "total": len(ran),
            "skipped": [r.name for r in results if r.skipped],
            "ok": ok,
        }
        print(json.dumps(doc, indent=2))
        return 0 if ok else 1
    print(f"cloudio check on {where}, in {root}")
    print()
    print(results_table(results))
    print()
    for r in results:
        if r.skipped:
            print(f"skipped {r.name}: {r.cloudio.detail}")
    failed = [r.name for r in ran if not r.consistent]
    if failed:
        print(f"cloudio was not consistent in: {', '.join(failed)}")
    print(f"{good}/{len(ran)} cases consistent")
    return 0 if ok else 1
