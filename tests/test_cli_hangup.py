"""``cloudio check``/``demo``/``inspect`` when their terminal is closed (SIGHUP).

Python's default for SIGHUP ends the process at once: no clean-up ran, so a
started emulator's temporary folder stayed, and so did the objects written
below a URL. SIGHUP now does what SIGTERM does (exit 129, 128+1 as shells
report it), unless SIGHUP is ignored (nohup) or has a handler of its own.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

# the helpers of the SIGTERM test, reused: a process's liveness and an environment whose TMPDIR is the test's
from test_tools_review_fixes import _alive, _env_with_tmpdir

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="no SIGHUP on this platform")

CLI = [sys.executable, "-m", "cloudio.cli"]


def _signalled(cmd: list[str], env: dict[str, str], sig: int | None, when: str = "[1/",
               ) -> tuple[subprocess.Popen[str], str, list[int]]:
    """Run ``cmd``, send ``sig`` once ``when`` is on its stderr; its stderr and the server processes it ran."""
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    try:
        seen = ""
        while when not in seen:
            line = p.stderr.readline()  # type: ignore[union-attr]
            assert line, seen
            seen += line
        server = [int(c) for c in Path(f"/proc/{p.pid}/task/{p.pid}/children").read_text().split()]
        if sig is not None:
            p.send_signal(sig)
        _, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    return p, seen + err, server


def _gone(pids: list[int]) -> bool:
    deadline = time.monotonic() + 5
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not any(_alive(pid) for pid in pids)


def test_check_hung_up_cleans_up_like_sigterm(tmp_path: Path) -> None:
    """SIGHUP while the cases run: one line, exit 129, the embedded server stopped, its folder removed."""
    p, err, server = _signalled([*CLI, "check"], _env_with_tmpdir(tmp_path), signal.SIGHUP)
    assert p.returncode == 129, err
    assert "cloudio check: hung up" in err and "Traceback" not in err
    assert server and _gone(server)
    assert list(tmp_path.iterdir()) == []


def test_demo_below_a_url_hung_up_removes_what_it_wrote(gcs_emulator, gcs_bucket: str, tmp_path: Path) -> None:
    """``cloudio demo --url``: SIGHUP after the first step wrote its objects; they are removed, exit 129."""
    env = _env_with_tmpdir(tmp_path)
    env["STORAGE_EMULATOR_HOST"] = gcs_emulator.url
    p, err, _ = _signalled([*CLI, "demo", "--url", f"{gcs_bucket}/hup"], env, signal.SIGHUP, when="[2/")
    assert p.returncode == 129, err
    assert "cloudio demo: hung up" in err and "Traceback" not in err
    left = list(gcs_emulator.client.list_blobs(gcs_bucket.removeprefix("gs://")))
    assert left == [], [b.name for b in left]


def test_check_under_nohup_runs_on_after_sighup(tmp_path: Path) -> None:
    """``nohup cloudio check``: SIGHUP ignored, as nohup asked; the run finishes, every case right."""
    p, err, _ = _signalled(["nohup", *CLI, "check"], _env_with_tmpdir(tmp_path), signal.SIGHUP)
    assert p.returncode == 0, err
    assert "hung up" not in err
    assert list(tmp_path.iterdir()) == []


_OWN_HANDLER = """
import signal, sys
from cloudio.cli import main
signal.signal(signal.SIGHUP, lambda *a: print("own handler", file=sys.stderr, flush=True))
raise SystemExit(main(["check"]))
"""


def test_a_program_s_own_sighup_handler_is_left_alone(tmp_path: Path) -> None:
    """``main`` called by a program with its own SIGHUP handler: that handler runs, and the command goes on."""
    p, err, _ = _signalled([sys.executable, "-c", _OWN_HANDLER], _env_with_tmpdir(tmp_path), signal.SIGHUP)
    assert p.returncode == 0, err
    assert "own handler" in err and "hung up" not in err


def test_sighup_handler_is_put_back_after_main() -> None:
    from cloudio.cli import main

    before = signal.getsignal(signal.SIGHUP)
    assert main(["emulator", "--root", "x"]) == 2  # a quick failure
    assert signal.getsignal(signal.SIGHUP) == before
