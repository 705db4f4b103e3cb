"""The ``cloudio`` command: ``demo``, ``check``, ``inspect``, ``emulator``.

Each command is a thin wrapper over cloudio's public functions, in a module
of its own. Errors are one line naming the URL and the next step; ``--debug``
shows the traceback and cloudio's debug log.

Exit status
-----------
0   success (``demo``/``check``: cloudio was right at every step)
1   ``demo``/``check`` found cloudio inconsistent, or an operation failed
2   bad command line or input: a malformed URL, an object or bucket that
    does not exist, an option or environment variable with an unusable value
130 interrupted (Ctrl-C), except ``cloudio emulator`` for which Ctrl-C is
    the normal way to stop and exits 0
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
import warnings
from collections.abc import Sequence

from .. import __version__
from ..errors import CloudioError, ConfigurationError, InvalidURLError, ObjectNotFoundError

__all__ = ["main", "build_parser"]

#: errors that mean "fix what you typed or your set-up" (exit status 2)
_INPUT_ERRORS = (InvalidURLError, ObjectNotFoundError, ConfigurationError)


def build_parser() -> argparse.ArgumentParser:
    from . import check, demo, emulator, inspect

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show tracebacks, warnings and cloudio's debug log")
    parser = argparse.ArgumentParser(
        prog="cloudio", parents=[common],
        description="Read-your-writes for cloud objects across GDAL/Rasterio, fsspec/Zarr/Xarray and Dask.",
        epilog="Exit status: 0 ok, 1 inconsistent or failed, 2 bad input (URL, missing object, option).",
    )
    parser.add_argument("--version", action="version", version=f"cloudio {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in (demo, check, inspect, emulator):
        module.add_parser(sub, common)
    return parser


def _configure_logging(debug: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if debug else logging.ERROR)
    logging.getLogger("cloudio").setLevel(logging.DEBUG if debug else logging.WARNING)
    if debug:  # third-party libraries' debug logs drown cloudio's; keep theirs at INFO
        for noisy in ("urllib3", "google", "aiohttp", "asyncio", "fsspec", "gcsfs", "rasterio", "matplotlib"):
            logging.getLogger(noisy).setLevel(logging.INFO)


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``cloudio`` command; return its exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help(sys.stderr)
        return 2
    debug = bool(getattr(args, "debug", False))
    _configure_logging(debug)
    prog = f"cloudio {args.command}"
    try:
        with warnings.catch_warnings():
            if not debug:  # third-party notices (zarr, xarray) are not the user's business here
                warnings.simplefilter("ignore")
            return int(args.func(args))
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `cloudio check | head`
        sys.stderr.close()
        return 0
    except CloudioError as e:
        if debug:
            traceback.print_exc()
        hint = "" if debug else " (--debug shows the traceback)"
        print(f"{prog}: error: {_one_line(e)}{hint}", file=sys.stderr)
        return 2 if isinstance(e, _INPUT_ERRORS) else 1
    except Exception as e:
        if debug:
            traceback.print_exc()
        hint = "" if debug else " (run again with --debug for the traceback)"
        print(f"{prog}: error: {type(e).__name__}: {_one_line(e)}{hint}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
