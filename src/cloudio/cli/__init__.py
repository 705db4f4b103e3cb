"""The ``cloudio`` command: ``demo``, ``check``, ``inspect``, ``emulator``.

Each command is a thin wrapper over cloudio's public functions, in a module
of its own. Errors are one line naming the URL and the next step; ``--debug``
shows the traceback and cloudio's debug log.

Exit status
-----------
0   success (``demo``/``check``: cloudio was right at every step)
1   ``demo``/``check`` found cloudio inconsistent, or an operation failed
2   bad command line or input: a malformed URL, an object or bucket that
    does not exist, a file ``inspect`` cannot read as a Zarr store or a
    raster, an option or environment variable with an unusable value
130 interrupted (Ctrl-C), except ``cloudio emulator`` for which Ctrl-C is
    the normal way to stop and exits 0
129 hung up (SIGHUP: the terminal running it was closed), after the same
    clean-up as Ctrl-C; not under ``nohup`` (SIGHUP ignored: it runs on)
    (``cloudio emulator``: stopped, exit 0)
143 terminated (SIGTERM: a CI job cancelled or timed out), after the same
    clean-up as Ctrl-C (``cloudio emulator``: stopped, exit 0)
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import signal
import sys
import threading
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from cloudio import __version__
from cloudio.errors import (
    CloudioError,
    ConfigurationError,
    InvalidURLError,
    NotARasterError,
    ObjectNotFoundError,
)

__all__ = ["build_parser", "main"]

#: errors that mean "fix what you typed or your set-up" (exit status 2)
_INPUT_ERRORS = (InvalidURLError, ObjectNotFoundError, ConfigurationError, NotARasterError)
#: a reST literal in a module docstring: ``x``
_LITERAL_RE = re.compile(r"``([^`]+)``")


def _plain(text: str) -> str:
    """A docstring as --help shows it: reST literals become plain options or quoted text."""
    return _LITERAL_RE.sub(lambda m: m.group(1) if m.group(1).startswith("-") else f'"{m.group(1)}"', text)


def build_parser() -> argparse.ArgumentParser:
    from cloudio.cli import check, demo, emulator, inspect

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
        p = sub.add_parser(
            module.__name__.rsplit(".", 1)[1], parents=[common], help=module.HELP,
            description=_plain((module.__doc__ or "").split("\n\n", 1)[-1]),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(p)
        p.set_defaults(func=module.run)
    return parser


def _configure_logging(debug: bool) -> Callable[[], None]:
    """Log to stderr for this command; return a function that puts everything back.

    ``main`` may run inside another program (tests call it in-process), so the
    root logger's handlers and levels are restored afterwards.
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    names = ["cloudio"] + (
        # third-party libraries' debug logs drown cloudio's; keep theirs at INFO
        ["urllib3", "google", "aiohttp", "asyncio", "fsspec", "gcsfs", "rasterio", "matplotlib"] if debug else []
    )
    saved = [(root, root.level)] + [(logging.getLogger(n), logging.getLogger(n).level) for n in names]
    root.addHandler(handler)
    # without --debug, only cloudio's own warnings: the failure itself is reported as one line
    root.setLevel(logging.DEBUG if debug else logging.CRITICAL + 1)
    logging.getLogger("cloudio").setLevel(logging.DEBUG if debug else logging.WARNING)
    for n in names[1:]:
        logging.getLogger(n).setLevel(logging.INFO)

    def restore() -> None:
        root.removeHandler(handler)
        for logger, level in saved:
            logger.setLevel(level)

    return restore


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _unreachable_hint(e: BaseException) -> str:
    """A next step when the failure is the emulator not answering."""
    from cloudio._config import emulator_endpoint

    try:
        ep = emulator_endpoint()
    except CloudioError:
        return ""
    if ep is None or not isinstance(e, OSError) or ep.host not in str(e):
        return ""
    return (f"; nothing answers at STORAGE_EMULATOR_HOST={ep.url}: start an emulator there "
            "(`cloudio emulator --port ...`) or unset STORAGE_EMULATOR_HOST")


class _Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised in the main thread so that clean-up runs as for Ctrl-C (a started emulator
    stopped, the objects written below a URL removed); Python's default for either ends the process at once."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _raise_terminated(signum: int, frame: object) -> None:
    raise _Terminated(signum)


#: the signals that end a command with clean-up, and what the command then says (SIGHUP: its terminal closed)
_ENDING_SIGNALS = {"SIGTERM": "terminated", "SIGHUP": "hung up"}


@contextlib.contextmanager
def _signals_as_interrupt() -> Iterator[None]:
    """While the command runs: SIGTERM and SIGHUP raise :class:`_Terminated` (main thread, default handler only).

    A signal with another handler is left as it is: the program's own handling, or nohup's ignored SIGHUP
    (the command is to outlive its terminal)."""
    if threading.current_thread() is not threading.main_thread():
        yield  # called from a thread: signal handlers cannot be set here
        return
    previous: dict[signal.Signals, Any] = {}
    try:
        for name in _ENDING_SIGNALS:
            sig = getattr(signal, name, None)  # no SIGHUP on Windows
            if sig is not None and signal.getsignal(sig) in (signal.SIG_DFL, None):
                previous[sig] = signal.signal(sig, _raise_terminated)
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``cloudio`` command; return its exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help(sys.stderr)
        return 2
    debug = bool(getattr(args, "debug", False))
    restore_logging = _configure_logging(debug)
    prog = f"cloudio {args.command}"
    try:
        with warnings.catch_warnings(), _signals_as_interrupt():
            if not debug:  # third-party notices (zarr, xarray) are not the user's business here
                warnings.simplefilter("ignore")
            return int(args.func(args))
    except _Terminated as e:
        print(f"{prog}: {_ENDING_SIGNALS.get(signal.Signals(e.signum).name, 'terminated')}", file=sys.stderr)
        return 128 + e.signum  # as a shell reports a process the signal ended: 143 SIGTERM, 129 SIGHUP
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `cloudio check | head`: the reader left; say nothing more
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so the flush at exit does not fail again
        return 1
    except CloudioError as e:
        if debug:
            traceback.print_exc()
        hint = "" if debug else " (--debug shows the traceback)"
        print(f"{prog}: error: {_one_line(e)}{hint}", file=sys.stderr)
        return 2 if isinstance(e, _INPUT_ERRORS) else 1
    except Exception as e:
        if debug:
            traceback.print_exc()
        hint = "" if debug else " (--debug shows the traceback)"
        target = getattr(args, "url", None)
        where = f" {target}" if target else ""
        print(f"{prog}{where}: error: {type(e).__name__}: {_one_line(e)}{_unreachable_hint(e)}{hint}",
              file=sys.stderr)
        return 1
    finally:
        restore_logging()


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
