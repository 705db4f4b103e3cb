"""A call run in a daemon thread and waited for with a time limit, shared so every test file bounds its calls
alike: a call that hangs fails its test instead of blocking the run; and two such writes with an upload of the
first held on its way until after the second (a late copy); and the emulator's request log once settled, and
the uploads in it, with the generation each needed."""

from __future__ import annotations

import contextlib
import functools
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import parse_qs, urlsplit


class Outcome:
    """``fn()`` in a daemon thread: its value or exception, and how long it took."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.fn = fn
        self.value: Any = None
        self.error: BaseException | None = None
        self.elapsed: float | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.t0 = 0.0

    def _run(self) -> None:
        self.t0 = time.monotonic()
        try:
            self.value = self.fn()
        except BaseException as e:  # handed to the test
            self.error = e
        finally:
            self.elapsed = time.monotonic() - self.t0

    def start(self) -> Outcome:
        self.thread.start()
        return self

    def finished(self, seconds: float) -> bool:
        self.thread.join(seconds)
        return not self.thread.is_alive()

    def said(self) -> str:
        if self.thread.is_alive():
            return f"still running after {time.monotonic() - self.t0:.1f} s"
        if self.error is not None:
            return f"{type(self.error).__name__} after {self.elapsed:.1f} s: {str(self.error)[:300]}"
        return f"returned {self.value!r:.80} after {self.elapsed:.1f} s"


def bounded(fn: Callable[[], Any], seconds: float = 60.0) -> tuple[Any, BaseException | None, float]:
    """``fn()`` in a daemon thread, waited for at most ``seconds``: (its value, its exception, seconds taken); a
    hang fails the test instead of blocking it."""
    t0 = time.monotonic()
    o = Outcome(fn).start()
    done = o.finished(seconds)
    took = time.monotonic() - t0
    assert done, f"the operation hung for more than {seconds:.0f} s"
    return o.value, o.error, took


def returned(fn: Callable[[], Any], seconds: float = 60.0) -> Any:
    """:func:`bounded`'s ``fn()``: its value, or its exception raised here, in the test's thread."""
    value, error, _ = bounded(fn, seconds)
    if error is not None:
        raise error
    return value


def two_writes_and_a_late_copy(fault_proxy: Any, upload: str, write: Callable[[int], Any]) -> None:
    """``write(1)`` with the upload matching ``upload`` (a path pattern of ``fault_proxy``) held on its way for
    4 times ``CLOUDIO_HTTP_TIMEOUT`` (at least 4 s; abandoned at that time limit, and sent again), ``write(2)``,
    then the held request reaching the server."""
    seconds = max(4.0, 4 * float(os.environ.get("CLOUDIO_HTTP_TIMEOUT", "1")))
    held = fault_proxy.add("delay", method="POST", path=upload, seconds=seconds, times=1)
    for value in (1, 2):
        _, err, _ = bounded(functools.partial(write, value))
        assert err is None, repr(err)
    assert held.hits == 1
    assert held.answered.wait(20)  # the held request reached the server
    time.sleep(0.3)


def uploads_logged(emu: Any, since: int, under: str) -> list[tuple[str, str | None, int]]:
    """(object name, its ifGenerationMatch or None, status) of each upload the emulator logged after the first
    ``since`` requests, for the objects whose name starts with ``under``; read once the log settled, as an
    upload's answer goes out before the emulator logs it."""
    out = []
    for r in settled(emu)[since:]:
        if r.method != "POST" or not r.path.startswith("/upload/"):
            continue
        query = parse_qs(urlsplit(r.path).query)
        name = query["name"][0]
        if name.startswith(under):
            out.append((name, query.get("ifGenerationMatch", [None])[0], r.status))
    return out


def settled(emu: Any) -> list[Any]:
    """The emulator's request log once two reads 50 ms apart agree: fake-gcs-server logs a request after its
    answer went out, so on a loaded machine a request can be logged after a later read's marker (seen in CI:
    a bucket's GET, logged after the upload that followed it)."""
    log, before = emu.requests(), -1
    while len(log) != before:
        before = len(log)
        time.sleep(0.05)
        log = emu.requests()
    return log


def forked_exit_code(work: Callable[[], object], seconds: float = 5.0) -> int:
    """Fork; the child runs ``work`` in its main thread (the forking one, as multiprocessing's children do) and
    exits 0 when it returned, 1 when it raised (its traceback on stderr), 2 when it was still running after
    ``seconds`` (a hang: a watchdog thread ends it). The parent kills a child gone silent, so nothing hangs the
    run.

    Why not in a thread of its own: a new thread of the child may take the identity of the parent's thread that
    held a lock (its stack is free again there), and then owns a reentrant lock copied held by that thread."""
    import signal
    import sys
    import traceback

    pid = os.fork()
    if pid == 0:  # the child: leaves through os._exit on every path, never back into pytest

        def watchdog() -> None:
            time.sleep(seconds)
            os._exit(2)

        threading.Thread(target=watchdog, daemon=True).start()
        try:
            work()
        except BaseException:
            sys.stderr.write(traceback.format_exc())
            os._exit(1)
        os._exit(0)
    deadline = time.monotonic() + seconds + 5
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return 2
        time.sleep(0.01)


@contextlib.contextmanager
def ctrl_c_once_hit(fault: Any, seconds: float = 30.0) -> Iterator[None]:
    """Press Ctrl-C (SIGINT to the main thread) once the fault proxy's ``fault`` was hit (or after ``seconds``),
    while the block runs; the pressing thread has ended when the block is left. (Use with ``python_sigint``.)"""
    import signal

    def interrupt() -> None:
        deadline = time.monotonic() + seconds
        while not fault.hits and time.monotonic() < deadline:
            time.sleep(0.005)
        signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)  # type: ignore[arg-type]

    t = threading.Thread(target=interrupt)
    t.start()
    try:
        yield
    finally:
        t.join()
