"""``cloudio emulator``: the embedded GCS emulator in the foreground, for local development.

Prints the ``export STORAGE_EMULATOR_HOST=...`` line to paste into another
shell (cloudio, gcsfs and google-cloud-storage there then use this emulator),
and runs until Ctrl-C (SIGINT), SIGTERM or SIGHUP, then stops the server and exits 0.
"""

from __future__ import annotations

import argparse
import signal
import threading
from types import FrameType

from cloudio._paths import check_bucket
from cloudio.cli._ui import err
from cloudio.errors import ConfigurationError, EmulatorError

HELP = "run the embedded GCS emulator in the foreground (Ctrl-C stops it)"


def _port(text: str) -> int:
    """A port number for --port: argparse names the option and exits 2 on anything else."""
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port; give 1..65535, or 0 (or none) for a free one")
    return port


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bucket", action="extend", nargs="+", default=[], metavar="NAME",
                   help="create these buckets at start (several names, or repeat the option)")
    p.add_argument("--backend", choices=("memory", "filesystem"), default="memory",
                   help="keep objects in memory (default) or on disk under --root")
    p.add_argument("--root", help="folder for --backend filesystem (default: a temporary one)")
    p.add_argument("--port", type=_port, help="listen on this port of 127.0.0.1 (default or 0: a free one)")


def run(args: argparse.Namespace) -> int:
    from cloudio.emulator import Emulator, env_mode

    mode = env_mode() or "binary"  # an unusable CLOUDIO_EMULATOR is exit 2, naming it
    if mode == "external":
        raise ConfigurationError(
            "CLOUDIO_EMULATOR=external attaches to a running emulator, but `cloudio emulator` starts one: "
            "unset CLOUDIO_EMULATOR (or set it to 'docker')"
        )
    for name in args.bucket:
        check_bucket(name)  # GCS's rule, before anything starts
    if args.root is not None and args.backend != "filesystem":
        raise ConfigurationError("--root is only used with --backend filesystem; add --backend filesystem")
    stop = threading.Event()

    def on_term(signum: int, frame: FrameType | None) -> None:
        stop.set()

    emu = Emulator(mode=mode, backend=args.backend, root=args.root, port=args.port)
    # SIGHUP: the terminal running the command was closed; stop as for Ctrl-C, or the server's
    # temporary folder (its log, a filesystem backend's objects) is left behind
    # (under nohup SIGHUP is ignored, and stays so: the server outlives the terminal, as asked)
    hup = getattr(signal, "SIGHUP", None)
    stop_signals = [signal.SIGTERM] + ([hup] if hup is not None and signal.getsignal(hup) != signal.SIG_IGN else [])
    previous = {s: signal.signal(s, on_term) for s in stop_signals}
    try:
        emu.start()
        for name in args.bucket:
            emu.create_bucket(name)
        print(f"export STORAGE_EMULATOR_HOST={emu.url}", flush=True)
        buckets = f"; buckets: {', '.join('gs://' + b for b in args.bucket)}" if args.bucket else ""
        err(f"fake-gcs-server ({mode}, {args.backend} backend) is running at {emu.url}{buckets}")
        err("Paste the export line above into another shell; Ctrl-C here stops the emulator.")
        proc = getattr(emu, "_proc", None)  # the binary's process, to notice if it dies on its own
        while not stop.wait(0.5):
            if proc is not None and proc.poll() is not None:
                raise EmulatorError(
                    f"fake-gcs-server at {emu.url} exited on its own with code {proc.returncode}; "
                    "run `cloudio emulator --debug` to see why"
                )
    except KeyboardInterrupt:
        pass
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        emu.stop()
    err("emulator stopped")
    return 0
