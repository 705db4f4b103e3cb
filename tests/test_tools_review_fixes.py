"""Findings of a review of the emulator, the pytest plugin and the ``cloudio`` command, each fixed.

Every test runs the real fake-gcs-server and checks what a user sees: the
environment after a block, the processes and temporary folders left behind,
exit codes and stderr.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from cloudio import _config, emulator
from cloudio.emulator import Emulator


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No emulator selected by the environment (the session fixture may have set one)."""
    for name in ("STORAGE_EMULATOR_HOST", "CLOUDIO_EMULATOR", "CLOUDIO_EMULATOR_START_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


# -- `with Emulator()` puts the environment back as it found it ------------------------------------------------


def test_with_emulator_after_gcsfs_was_imported_leaves_no_gcsfs_variable(clean_env: pytest.MonkeyPatch) -> None:
    """gcsfs imported first (as a test module or a notebook does): ``with Emulator()`` set
    GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false (through the endpoint it pushes) and left it set afterwards, for every
    later test and every child process."""
    import gcsfs  # noqa: F401  - imported before the block, the case at hand

    clean_env.delenv(_config.HNS_ENV, raising=False)
    with Emulator():
        pass
    assert _config.HNS_ENV not in os.environ
    assert "STORAGE_EMULATOR_HOST" not in os.environ


def test_with_emulator_keeps_an_explicit_gcsfs_variable(clean_env: pytest.MonkeyPatch) -> None:
    import gcsfs  # noqa: F401

    clean_env.setenv(_config.HNS_ENV, "true")
    with Emulator():
        pass
    assert os.environ[_config.HNS_ENV] == "true"


# -- a free port taken before the server binds it --------------------------------------------------------------


def test_a_free_port_taken_before_the_server_binds_it_is_not_a_failed_start(clean_env: pytest.MonkeyPatch) -> None:
    """Between picking a free port and the server binding it, another process (another xdist worker's emulator,
    say) can take it: the start failed with "address already in use" though no port was asked for. A port cloudio
    picked is picked again."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as held:
        held.bind(("127.0.0.1", 0))
        taken = held.getsockname()[1]
        real = emulator._free_port
        picks: list[int] = []

        def racing_free_port() -> int:
            port = taken if not picks else real()
            picks.append(port)
            return port

        clean_env.setattr(emulator, "_free_port", racing_free_port)
        with Emulator() as emu:
            emu.create_bucket("after-the-race")
            assert emu.has_bucket("after-the-race")
            assert emu.url != f"http://127.0.0.1:{taken}"
        assert picks[0] == taken and len(picks) == 2


def test_an_explicit_busy_port_still_fails_at_once(clean_env: pytest.MonkeyPatch) -> None:
    """A port the user asked for is never swapped for another."""
    from cloudio.errors import EmulatorError

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as held:
        held.bind(("127.0.0.1", 0))
        port = held.getsockname()[1]
        with pytest.raises(EmulatorError, match="address already in use"):
            Emulator(port=port).start()


# -- `cloudio emulator` closed with its terminal -------------------------------------------------------------------


def test_emulator_command_stops_cleanly_on_sighup(tmp_path: Path) -> None:
    """Closing the terminal that runs ``cloudio emulator`` sends SIGHUP: the command died at once (status -1,
    "emulator stopped" never said) and left its temporary folder (the server's log, and the objects of a
    filesystem backend) behind. It stops the server as Ctrl-C does, and exits 0."""
    env = {k: v for k, v in os.environ.items() if k not in ("STORAGE_EMULATOR_HOST", "CLOUDIO_EMULATOR")}
    env["TMPDIR"] = str(tmp_path)  # the command's temporary folders, and only them, go here
    p = subprocess.Popen([sys.executable, "-m", "cloudio.cli", "emulator", "--backend", "filesystem"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = p.stdout.readline()  # type: ignore[union-attr]
        assert line.startswith("export STORAGE_EMULATOR_HOST="), line + p.stderr.read()  # type: ignore[union-attr]
        server = [int(c) for c in Path(f"/proc/{p.pid}/task/{p.pid}/children").read_text().split()]
        assert server and list(tmp_path.iterdir())  # the server runs, its folder exists
        p.send_signal(signal.SIGHUP)
        _, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 0, err
    assert "emulator stopped" in err
    deadline = time.monotonic() + 5
    while any(_alive(pid) for pid in server) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_alive(pid) for pid in server)
    assert list(tmp_path.iterdir()) == []


def test_tempfile_dir_is_where_the_emulator_writes(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """What the SIGHUP test relies on: the server's folder is made under TMPDIR (tempfile's own rule)."""
    clean_env.setattr(tempfile, "tempdir", str(tmp_path))
    with Emulator():
        assert len(list(tmp_path.iterdir())) == 1
    assert list(tmp_path.iterdir()) == []


# -- temporary folders of a killed process ---------------------------------------------------------------------


_KILLED = """
import os, signal
from cloudio.emulator import Emulator
emu = Emulator(backend="filesystem").start()
emu.create_bucket("left-behind")
print(emu.pid, flush=True)
os.kill(os.getpid(), signal.SIGKILL)  # a CI job cancelled, an OOM kill: no clean-up runs
"""


def _env_with_tmpdir(tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("STORAGE_EMULATOR_HOST", "CLOUDIO_EMULATOR")}
    env["TMPDIR"] = str(tmp)
    return env


def test_a_killed_process_s_emulator_folder_is_removed_by_the_next_start(
    clean_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A test session killed (SIGKILL; SIGTERM runs no atexit either) left its server's temporary folder, with
    the log and a filesystem backend's objects, in the temporary directory for good, one more per killed run. The
    next start removes folders whose owner process is gone."""
    r = subprocess.run([sys.executable, "-c", _KILLED], env=_env_with_tmpdir(tmp_path), capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == -signal.SIGKILL, r.stderr
    server = int(r.stdout.split()[0])
    deadline = time.monotonic() + 5
    while _alive(server) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(server)  # the server died with its parent (as before)
    (left,) = tmp_path.iterdir()
    assert left.name.startswith("cloudio-emulator-") and (left / "data").is_dir()
    clean_env.setattr(tempfile, "tempdir", str(tmp_path))
    with Emulator() as emu:
        emu.create_bucket("next-run")
        assert not left.exists()
        assert len(list(tmp_path.iterdir())) == 1  # this start's own
    assert list(tmp_path.iterdir()) == []


def test_a_running_emulator_s_folder_is_never_removed(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Another process's server that still runs keeps its folder (and keeps serving)."""
    import urllib.request

    p = subprocess.Popen([sys.executable, "-m", "cloudio.cli", "emulator", "--bucket", "theirs"],
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                         env=_env_with_tmpdir(tmp_path))
    try:
        line = p.stdout.readline()  # type: ignore[union-attr]
        assert line.startswith("export STORAGE_EMULATOR_HOST="), line
        url = line.strip().split("=", 1)[1]
        (theirs,) = tmp_path.iterdir()
        clean_env.setattr(tempfile, "tempdir", str(tmp_path))
        with Emulator():
            assert theirs.is_dir() and (theirs / "server.log").is_file()
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(f"{url}/storage/v1/b/theirs", timeout=10) as answer:
            assert answer.status == 200
    finally:
        p.send_signal(signal.SIGINT)
        p.wait(timeout=30)
    assert list(tmp_path.iterdir()) == []


def test_a_restarted_filesystem_emulator_leaves_no_folder(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The default filesystem root was kept from the first start: a second start re-created it inside the first
    start's (already removed) folder, and nothing removed it again. (A start retried on a port taken meanwhile
    restarts the same way.)"""
    clean_env.setattr(tempfile, "tempdir", str(tmp_path))
    emu = Emulator(backend="filesystem")
    for _ in range(2):
        emu.start()
        emu.create_bucket("kept-on-disk")
        emu.stop()
    assert list(tmp_path.iterdir()) == []


# -- cloudio.dask.install on a closed client ------------------------------------------------------------------


def test_install_on_a_closed_client_names_the_client_s_state() -> None:
    """``install`` after the client's ``with`` block: a raw AttributeError ('NoneType' object has no attribute
    'register_scheduler_plugin') from inside distributed. Now a ConfigurationError saying the client is closed."""
    from distributed import Client, LocalCluster

    import cloudio.dask
    from cloudio.errors import ConfigurationError

    with LocalCluster(n_workers=1, processes=False, dashboard_address=None) as cluster:
        with Client(cluster) as client:
            pass
        with pytest.raises(ConfigurationError, match="the client is closed") as info:
            cloudio.dask.install(client)
        assert "open client" in str(info.value)


# -- a forked child's exit --------------------------------------------------------------------------------------


_FORKED = """
import os, sys
from cloudio.emulator import Emulator
emu = Emulator(backend="filesystem").start()
emu.create_bucket("parents")
emu.client.bucket("parents").blob("k").upload_from_string(b"kept")
folder = emu._logfile.parent
if os.fork() == 0:
    sys.exit(0)  # a child that ends normally runs the atexit handlers it inherited
os.wait()
print("folder", folder.is_dir())
print("alive", emu._proc.poll() is None)
print("object", emu.client.bucket("parents").blob("k").download_as_bytes())
print("requests", len(emu.requests()) > 0)
emu.stop()
print("removed", not folder.exists())
"""


def test_a_forked_child_s_exit_leaves_the_parent_s_emulator_alone(tmp_path: Path) -> None:
    """A child forked while an emulator ran, exiting normally, ran cloudio's atexit stop and TemporaryDirectory's
    finalizer on its copy: the parent's folder went, with the server's log (``requests()`` then counted nothing)
    and a filesystem backend's objects (gone from the running server)."""
    r = subprocess.run([sys.executable, "-c", _FORKED], env=_env_with_tmpdir(tmp_path), capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split("\n")[:-1] == [
        "folder True", "alive True", "object b'kept'", "requests True", "removed True"
    ], r.stdout + r.stderr[-2000:]
    assert list(tmp_path.iterdir()) == []


# -- `cloudio check` / `demo` terminated (a CI job cancelled) ----------------------------------------------------


def test_check_terminated_cleans_up_like_ctrl_c(tmp_path: Path) -> None:
    """SIGTERM (a CI job cancelled or timed out) ended ``cloudio check`` at once: no clean-up ran, so its
    embedded emulator's folder stayed (and, with a URL, the objects written below it). It now stops as for
    Ctrl-C: one line on stderr, exit 143, the server stopped, nothing left in the temporary directory."""
    p = subprocess.Popen([sys.executable, "-m", "cloudio.cli", "check"], stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True, env=_env_with_tmpdir(tmp_path))
    try:
        seen = ""
        while "[1/" not in seen:  # the cases started: the emulator runs
            line = p.stderr.readline()  # type: ignore[union-attr]
            assert line, seen
            seen += line
        server = [int(c) for c in Path(f"/proc/{p.pid}/task/{p.pid}/children").read_text().split()]
        assert server and list(tmp_path.iterdir())
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 143, seen + err
    assert "cloudio check: terminated" in err and "Traceback" not in err
    deadline = time.monotonic() + 5
    while any(_alive(pid) for pid in server) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_alive(pid) for pid in server)
    assert list(tmp_path.iterdir()) == []


def test_sigterm_handler_is_put_back_after_main() -> None:
    from cloudio.cli import main

    before = signal.getsignal(signal.SIGTERM)
    assert main(["emulator", "--root", "x"]) == 2  # a quick failure
    assert signal.getsignal(signal.SIGTERM) == before


def test_emulator_command_under_nohup_outlives_sighup(tmp_path: Path) -> None:
    """``nohup cloudio emulator &``: SIGHUP ignored, as nohup asked, so the server outlives the terminal."""
    p = subprocess.Popen(["nohup", sys.executable, "-m", "cloudio.cli", "emulator"], stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL, text=True, env=_env_with_tmpdir(tmp_path), cwd=tmp_path)
    try:
        line = p.stdout.readline()  # type: ignore[union-attr]
        assert line.startswith("export STORAGE_EMULATOR_HOST="), line
        p.send_signal(signal.SIGHUP)
        with pytest.raises(subprocess.TimeoutExpired):
            p.wait(timeout=1.5)
    finally:
        p.send_signal(signal.SIGINT)
        p.wait(timeout=30)
    assert p.returncode == 0


# -- an unusable --root is bad input ---------------------------------------------------------------------------


def test_emulator_command_with_a_root_that_is_a_file_is_exit_2(
    clean_env: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--root`` naming a file: exit 1 ("an operation failed"), though the documented status for an option with
    an unusable value is 2; the library's error is now an EmulatorSettingError (still an EmulatorError)."""
    from cloudio.cli import main
    from cloudio.errors import ConfigurationError, EmulatorError

    plain = tmp_path / "plain-file"
    plain.write_text("x")
    assert main(["emulator", "--backend", "filesystem", "--root", str(plain)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(plain) in err[0] and "filesystem root" in err[0], err
    with pytest.raises(EmulatorError) as info:
        Emulator(backend="filesystem", root=plain).start()
    assert isinstance(info.value, ConfigurationError)
    assert list(p.name for p in tmp_path.iterdir()) == ["plain-file"]


# -- attaching to a STORAGE_EMULATOR_HOST where nothing listens ------------------------------------------------


def test_attaching_where_nothing_listens_says_what_to_do_about_the_variable(clean_env: pytest.MonkeyPatch) -> None:
    """A stale ``export STORAGE_EMULATOR_HOST=...`` (from a ``cloudio emulator`` since stopped): the attach
    failed with "Server output ends with: (no output captured)" and "Fix: raise CLOUDIO_EMULATOR_START_TIMEOUT",
    which waits longer for a server that is not there. It now says to start one there or unset the variable."""
    from cloudio.errors import EmulatorError

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, never listening: connections are refused
        clean_env.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{port}")
        clean_env.setenv("CLOUDIO_EMULATOR_START_TIMEOUT", "0.3")
        with pytest.raises(EmulatorError) as info:
            Emulator().start()
    msg = str(info.value)
    assert f"STORAGE_EMULATOR_HOST=http://127.0.0.1:{port}" in msg
    assert f"cloudio emulator --port {port}" in msg and "unset STORAGE_EMULATOR_HOST" in msg
    assert "no output captured" not in msg and "\n" not in msg
