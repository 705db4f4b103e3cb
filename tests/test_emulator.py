"""The embedded GCS emulator, used directly (no pytest fixture in the way).

Every test here starts real fake-gcs-server processes and checks what can be
observed from outside: sockets, HTTP answers, files on disk, process ids.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from outcomes import settled

from cloudio import _config
from cloudio.emulator import Emulator, Request
from cloudio.errors import CloudioError, ConfigurationError, EmulatorError

_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No emulator selected by the environment (the session fixture may have set one)."""
    monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)
    monkeypatch.delenv("CLOUDIO_EMULATOR", raising=False)
    monkeypatch.delenv("CLOUDIO_EMULATOR_START_TIMEOUT", raising=False)
    return monkeypatch


def _http(method: str, url: str, data: bytes | None = None) -> int:
    req = urllib.request.Request(url, data=data, method=method)
    try:
        with _NO_PROXY.open(req, timeout=10) as r:
            r.read()
            return int(r.status)
    except urllib.error.HTTPError as e:
        return int(e.code)


def _answers(url: str) -> bool:
    try:
        with _NO_PROXY.open(f"{url}/storage/v1/b", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def _process_gone(pid: int) -> bool:
    """True once ``pid`` no longer runs (absent, or a zombie nobody has reaped yet)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return True
    state = stat.rsplit(")", 1)[1].split()[0]
    return state in ("Z", "X")


def _wait_until(predicate, what: str, timeout: float = 15.0) -> None:
    """Probe ``predicate`` until true; bounded, with a short back-off between probes."""
    deadline = time.monotonic() + timeout
    delay = 0.01
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for: {what}")
        time.sleep(delay)
        delay = min(delay * 2, 0.2)


def _listening_addresses(port: int) -> set[str]:
    """Local addresses (hex, as in /proc/net/tcp*) with a socket listening on ``port``."""
    out = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            fields = line.split()
            addr, hexport = fields[1].split(":")
            if int(hexport, 16) == port and fields[3] == "0A":  # 0A = LISTEN
                out.add(addr)
    return out


def _port(url: str) -> int:
    m = re.fullmatch(r"http://127\.0\.0\.1:(\d+)", url)
    assert m, url
    return int(m.group(1))


# -- lifecycle -----------------------------------------------------------------------------


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="needs Linux /proc/net/tcp")
def test_context_manager_binds_loopback_only_and_stops(clean_env: pytest.MonkeyPatch) -> None:
    with Emulator() as emu:
        assert emu.mode == "binary"
        assert emu.running
        port = _port(emu.url)
        assert port > 0
        # listening on 127.0.0.1 only: not 0.0.0.0, not ::
        assert _listening_addresses(port) == {"0100007F"}
        assert _answers(emu.url)
        pid = emu.pid
        assert pid is not None and not _process_gone(pid)
    assert not emu.running
    assert emu.pid is None
    assert _process_gone(pid)
    assert not _answers(f"http://127.0.0.1:{port}")
    with pytest.raises(EmulatorError, match="not running"):
        emu.url


def test_two_emulators_use_different_free_ports(clean_env: pytest.MonkeyPatch) -> None:
    with Emulator() as a, Emulator(mode="binary") as b:  # in a's block, Emulator() would attach to a
        assert a.url != b.url
        a.create_bucket("only-on-a")
        assert [x.name for x in a.client.list_buckets()] == ["only-on-a"]
        assert list(b.client.list_buckets()) == []


def test_start_and_stop_without_with(clean_env: pytest.MonkeyPatch) -> None:
    emu = Emulator(mode="binary")
    assert emu.start() is emu
    assert emu.start() is emu  # idempotent: same server
    pid = emu.pid
    url = emu.url
    emu.stop()
    emu.stop()  # idempotent
    assert pid is not None and _process_gone(pid)
    assert not _answers(url)


def test_no_process_left_after_exception_inside_with(clean_env: pytest.MonkeyPatch) -> None:
    with pytest.raises(ZeroDivisionError):
        with Emulator() as emu:
            pid, url = emu.pid, emu.url
            1 / 0
    assert pid is not None and _process_gone(pid)
    assert not _answers(url)


_CHILD = textwrap.dedent(
    """
    import json, sys
    from cloudio.emulator import Emulator
    emu = Emulator(mode="binary").start()
    print(json.dumps({"pid": emu.pid, "url": emu.url}), flush=True)
    sys.stdin.read()  # block until killed
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal is Linux-only")
def test_no_process_left_after_parent_is_sigkilled(clean_env: pytest.MonkeyPatch) -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=dict(os.environ)
    )
    try:
        assert child.stdout is not None
        line = child.stdout.readline()  # the child prints once the server answers
        info = json.loads(line)
        pid, url = info["pid"], info["url"]
        assert _answers(url)
        assert not _process_gone(pid)
        child.send_signal(signal.SIGKILL)  # no atexit, no finally: only the kernel can clean up
        child.wait(timeout=10)
        _wait_until(lambda: _process_gone(pid), f"emulator pid {pid} to exit after its parent was killed")
        assert not _answers(url)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(timeout=10)
        if child.stdin is not None:
            child.stdin.close()
        if child.stdout is not None:
            child.stdout.close()


def test_emulator_started_in_a_thread_outlives_the_thread(clean_env: pytest.MonkeyPatch) -> None:
    """Regression: PR_SET_PDEATHSIG fires when the *forking thread* ends, not the process."""
    box: dict[str, Emulator] = {}
    t = threading.Thread(target=lambda: box.setdefault("emu", Emulator().start()))
    t.start()
    t.join()
    emu = box["emu"]
    try:
        pid = emu.pid
        assert pid is not None
        # the thread is gone; the server must still answer, repeatedly
        for _ in range(5):
            assert _answers(emu.url)
        assert not _process_gone(pid)
        emu.create_bucket("after-thread")
        assert [b.name for b in emu.client.list_buckets()] == ["after-thread"]
    finally:
        emu.stop()
    assert _process_gone(pid)


# -- failed starts -------------------------------------------------------------------------


def test_failed_start_port_in_use_reports_server_output(clean_env: pytest.MonkeyPatch) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as held:
        held.bind(("127.0.0.1", 0))  # bound, not listening: the probe cannot mistake it for a server
        port = held.getsockname()[1]
        emu = Emulator(port=port)
        with pytest.raises(EmulatorError) as info:
            emu.start()
    msg = str(info.value)
    assert isinstance(info.value, CloudioError)
    assert "address already in use" in msg  # the tail of the server's own output
    assert f"127.0.0.1:{port}" in msg
    assert "Fix:" in msg and "STORAGE_EMULATOR_HOST" in msg  # what to try next
    assert not emu.running and emu.pid is None


def test_busy_port_is_an_error_not_someone_elses_server(clean_env: pytest.MonkeyPatch) -> None:
    """A port another emulator listens on: an error naming it, never a silent attach."""
    with Emulator() as other:
        other.create_bucket("theirs")
        port = int(other.url.rsplit(":", 1)[1])
        emu = Emulator(port=port)
        with pytest.raises(EmulatorError) as info:
            emu.start()
        msg = str(info.value)
        assert "bind: address already in use" in msg and str(port) in msg
        assert "Fix:" in msg
        assert not emu.running and emu.pid is None
        assert other.client.bucket("theirs").exists()  # the other server is untouched


def test_failed_start_bad_filesystem_root(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    not_a_dir = tmp_path / "plain-file"
    not_a_dir.write_text("x")
    emu = Emulator(backend="filesystem", root=not_a_dir)
    with pytest.raises(EmulatorError, match="filesystem root") as info:
        emu.start()
    assert str(not_a_dir) in str(info.value)
    assert "Fix:" in str(info.value)
    assert not emu.running and emu.pid is None


def test_unknown_mode_and_backend_are_errors(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("CLOUDIO_EMULATOR", "podman")
    with pytest.raises(EmulatorError, match="'binary', 'docker' or 'external'"):
        Emulator()
    with pytest.raises(EmulatorError, match="'memory' or 'filesystem'"):
        Emulator(mode="binary", backend="s3")  # type: ignore[arg-type]


def _docker_engine() -> bool:
    try:
        import docker

        return bool(docker.from_env().ping())
    except Exception:
        return False


@pytest.mark.skipif(_docker_engine(), reason="a Docker engine is running here")
def test_docker_mode_without_engine_is_a_clear_error(clean_env: pytest.MonkeyPatch) -> None:
    """No Docker engine: testcontainers may or may not be installed; either way one clear error."""
    clean_env.setenv("CLOUDIO_EMULATOR", "docker")
    emu = Emulator()
    assert emu.mode == "docker"
    with pytest.raises(EmulatorError) as info:
        emu.start()
    msg = str(info.value)
    try:
        import testcontainers  # noqa: F401
    except ImportError:
        assert "pip install 'cloudio[docker]'" in msg
    else:
        assert "Docker" in msg and "engine" in msg
    assert "unset CLOUDIO_EMULATOR" in msg
    assert not emu.running


@pytest.mark.skipif(not _docker_engine(), reason="needs a running Docker engine (none on this project's CI)")
def test_docker_mode_serves_and_counts_requests(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("CLOUDIO_EMULATOR", "docker")
    with Emulator() as emu:
        assert emu.mode == "docker" and emu.url.startswith("http://127.0.0.1:")
        emu.create_bucket("dock")
        emu.client.bucket("dock").blob("k").upload_from_string(b"hello")
        assert emu.client.bucket("dock").blob("k").download_as_bytes() == b"hello"
        assert any(r.method == "GET" and "/dock/" in r.path for r in emu.requests())
    assert not emu.running


# -- what it offers ------------------------------------------------------------------------


def test_client_create_bucket_upload_download(clean_env: pytest.MonkeyPatch) -> None:
    with Emulator() as emu:
        assert emu.create_bucket("bkt-one") == "gs://bkt-one"
        assert emu.create_bucket("bkt-one") == "gs://bkt-one"  # idempotent
        blob = emu.client.bucket("bkt-one").blob("dir/obj.bin")
        blob.upload_from_string(b"\x00payload\xff")
        assert emu.client.bucket("bkt-one").blob("dir/obj.bin").download_as_bytes() == b"\x00payload\xff"
        assert [b.name for b in emu.client.list_blobs("bkt-one")] == ["dir/obj.bin"]
        assert emu.client.project == "cloudio-test"


@pytest.mark.parametrize("name", ["b", "b1", "Upper", "-dash", "a" * 64])
def test_create_bucket_refuses_what_cloudio_cannot_address(clean_env: pytest.MonkeyPatch, name: str) -> None:
    """One rule, GCS's: a name the emulator is not even asked to create, with the rule in the message."""
    from cloudio.errors import InvalidURLError

    with Emulator() as emu:
        before = emu.requests()
        with pytest.raises(InvalidURLError, match=r"3-63 characters") as info:
            emu.create_bucket(name)
        assert f"gs://{name}" in str(info.value)
        assert [r for r in emu.requests()[len(before):] if r.method == "POST"] == []
        ok = "b" * 63 + "." + "c" * 63  # 127 characters with dots: GCS accepts it, so do both
        assert emu.create_bucket(ok) == f"gs://{ok}"
        cloudio_path = __import__("cloudio._paths", fromlist=["parse_gcs"]).parse_gcs(f"gs://{ok}/k")
        assert cloudio_path.bucket == ok and emu.has_bucket(ok)


def test_requests_are_parsed_and_counted_exactly(clean_env: pytest.MonkeyPatch) -> None:
    with Emulator() as emu:
        emu.create_bucket("counted")
        emu.client.bucket("counted").blob("a.bin").upload_from_string(b"12345")
        n = len(settled(emu))
        meta = f"{emu.url}/storage/v1/b/counted/o/a.bin"
        media = f"{emu.url}/download/storage/v1/b/counted/o/a.bin?alt=media"
        assert _http("GET", meta) == 200
        assert _http("GET", media) == 200
        assert _http("GET", f"{emu.url}/storage/v1/b/counted/o/missing.bin") == 404
        assert _http("HEAD", media) == 200
        assert _http("DELETE", meta) == 200  # fake-gcs-server answers 200 where GCS says 204
        assert _http("GET", meta) == 404
        got = emu.requests()[n:]
        assert got == [
            Request("GET", "/storage/v1/b/counted/o/a.bin", 200),
            Request("GET", "/download/storage/v1/b/counted/o/a.bin?alt=media", 200),
            Request("GET", "/storage/v1/b/counted/o/missing.bin", 404),
            Request("HEAD", "/download/storage/v1/b/counted/o/a.bin?alt=media", 200),
            Request("DELETE", "/storage/v1/b/counted/o/a.bin", 200),
            Request("GET", "/storage/v1/b/counted/o/a.bin", 404),
        ]
        # the marker requests requests() sends are never in the list, and calling it adds nothing
        assert len(emu.requests()) == n + 6
        assert emu.count(since=n) == 5
        assert emu.count(methods=("HEAD",), since=n) == 1
        assert emu.count(methods=("DELETE",), since=n) == 1
        assert emu.count(methods=("GET", "HEAD", "DELETE"), since=n) == 6


def test_requests_in_a_busy_log_are_complete(clean_env: pytest.MonkeyPatch) -> None:
    with Emulator() as emu:
        emu.create_bucket("busy")
        n = len(emu.requests())
        for i in range(50):
            assert _http("GET", f"{emu.url}/storage/v1/b/busy/o/k{i}") == 404
        assert emu.count(since=n) == 50  # counted right after the last answer: nothing missing


def test_filesystem_backend_keeps_objects_on_disk(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    root = tmp_path / "gcs-data"
    with Emulator(backend="filesystem", root=root) as emu:
        emu.create_bucket("ondisk")
        emu.client.bucket("ondisk").blob("x/y.bin").upload_from_string(b"persisted")
        assert (root / "ondisk" / "x" / "y.bin").read_bytes() == b"persisted"
    assert (root / "ondisk" / "x" / "y.bin").read_bytes() == b"persisted"  # stop keeps the data
    with Emulator(backend="filesystem", root=root) as again:  # a new server over the same root
        assert again.client.bucket("ondisk").blob("x/y.bin").download_as_bytes() == b"persisted"


# -- external mode -------------------------------------------------------------------------


def test_external_mode_attaches_to_storage_emulator_host(clean_env: pytest.MonkeyPatch) -> None:
    # (set in a context of its own, undone inside the block: clean_env's undo at teardown would otherwise put
    # back the first server's URL, dead by then, when the variable was not set before the test)
    with Emulator() as first, pytest.MonkeyPatch.context() as attach:
        attach.setenv("STORAGE_EMULATOR_HOST", first.url)
        with Emulator() as second:
            assert second.mode == "external"
            assert second.url == first.url
            assert second.pid is None  # nothing started
            second.create_bucket("shared-bkt")
            second.client.bucket("shared-bkt").blob("k").upload_from_string(b"from second")
            assert [b.name for b in first.client.list_buckets()] == ["shared-bkt"]
            assert first.client.bucket("shared-bkt").blob("k").download_as_bytes() == b"from second"
            with pytest.raises(EmulatorError, match="request counts need an emulator cloudio started"):
                second.requests()
        # leaving the attached one leaves the server running
        assert _answers(first.url)
        assert first.client.bucket("shared-bkt").blob("k").download_as_bytes() == b"from second"


def test_external_mode_accepts_host_port_form(clean_env: pytest.MonkeyPatch) -> None:
    with Emulator() as first, pytest.MonkeyPatch.context() as attach:  # undone inside: see the test above
        attach.setenv("STORAGE_EMULATOR_HOST", first.url.removeprefix("http://"))
        with Emulator(mode="external") as second:
            assert second.url == first.url


def test_external_mode_needs_storage_emulator_host(clean_env: pytest.MonkeyPatch) -> None:
    with pytest.raises(EmulatorError, match="STORAGE_EMULATOR_HOST"):
        Emulator(mode="external").start()


def test_external_mode_nothing_listening(clean_env: pytest.MonkeyPatch) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, never listening: connections are refused
        clean_env.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{port}")
        clean_env.setenv("CLOUDIO_EMULATOR_START_TIMEOUT", "0.5")
        emu = Emulator()
        assert emu.timeout == 0.5
        with pytest.raises(EmulatorError, match=r"no answer from .*within 0\.5 s") as info:
            emu.start()
    assert "STORAGE_EMULATOR_HOST" in str(info.value)


def test_bad_start_timeout_is_an_error(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("CLOUDIO_EMULATOR_START_TIMEOUT", "soon")
    with pytest.raises(EmulatorError, match="CLOUDIO_EMULATOR_START_TIMEOUT"):
        Emulator()


# -- anonymous access never targets Google -------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        "https://storage.googleapis.com",
        "storage.googleapis.com",
        "http://storage.googleapis.com:443/",
        "https://www.googleapis.com",
        "https://storage.us-central1.rep.googleapis.com",
    ],
)
def test_google_hosts_are_never_used_as_emulator(clean_env: pytest.MonkeyPatch, value: str) -> None:
    clean_env.setenv("STORAGE_EMULATOR_HOST", value)
    for fn in (_config.emulator_endpoint, _config.gdal_options, _config.gcsfs_options):
        with pytest.raises(ConfigurationError, match="Google's own endpoint"):
            fn()
    with pytest.raises(ConfigurationError, match="anonymous access only with an emulator"):
        Emulator().start()


def test_emulator_options_are_anonymous_only_for_the_emulator(clean_env: pytest.MonkeyPatch) -> None:
    assert _config.emulator_endpoint() is None
    assert _config.gdal_options() == {}
    assert _config.gcsfs_options() == {}
    with Emulator() as emu, pytest.MonkeyPatch.context() as attach:  # undone inside: see the tests above
        attach.setenv("STORAGE_EMULATOR_HOST", emu.url)
        assert _config.gdal_options() == {"CPL_GS_ENDPOINT": emu.url + "/", "GS_NO_SIGN_REQUEST": "YES"}
        assert _config.gcsfs_options() == {"endpoint_url": emu.url, "token": "anon"}


# -- a script's own emulator -----------------------------------------------------------------

_SCRIPT = textwrap.dedent('''
    import os
    import numpy as np
    import cloudio
    from cloudio import _config

    with cloudio.Emulator() as emu:
        emu.create_bucket("scripted")
        with cloudio.open("gs://scripted/a.tif", "w", driver="GTiff", width=8, height=8, count=1,
                          dtype="uint8") as dst:
            dst.write(np.full((1, 8, 8), 7, "uint8"))
        with cloudio.open("gs://scripted/a.tif") as src:
            assert src.read(1).max() == 7
        assert cloudio.filesystem("gs://scripted/").ls("scripted") == ["scripted/a.tif"]
        assert os.environ["STORAGE_EMULATOR_HOST"] == emu.url
    assert "STORAGE_EMULATOR_HOST" not in os.environ and "CPL_GS_ENDPOINT" not in os.environ
    assert _config.emulator_endpoint() is None
    print("ok")
''')


def test_with_emulator_points_the_script_at_itself(tmp_path: Path) -> None:
    """``with cloudio.Emulator():`` in a plain script: cloudio, gcsfs and GDAL use it, then stop."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("STORAGE_EMULATOR_HOST", "CLOUDIO_EMULATOR", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT",
                        "CPL_GS_ENDPOINT", "GS_NO_SIGN_REQUEST")}
    env["CLOUDSDK_CONFIG"] = str(tmp_path)  # no gcloud credentials either
    script = tmp_path / "script.py"
    script.write_text(_SCRIPT)
    r = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stdout + r.stderr


def test_no_emulator_and_no_credentials_fails_at_once(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    clean_env.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
    clean_env.delenv("GS_NO_SIGN_REQUEST", raising=False)
    clean_env.setenv("CLOUDSDK_CONFIG", str(tmp_path))  # gcloud's application-default file: absent
    with pytest.raises(ConfigurationError) as info:
        _config.require_credentials("gs://b1/a.tif")
    msg = str(info.value)
    assert "gs://b1/a.tif" in msg and "STORAGE_EMULATOR_HOST" in msg and "GOOGLE_APPLICATION_CREDENTIALS" in msg
    clean_env.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "key.json"))
    _config.require_credentials("gs://b1/a.tif")  # credentials named: gcsfs's business from here
    clean_env.delenv("GOOGLE_APPLICATION_CREDENTIALS")
    clean_env.setenv("STORAGE_EMULATOR_HOST", "http://127.0.0.1:9")
    _config.require_credentials("gs://b1/a.tif")


def test_no_credentials_fail_fast_through_the_public_calls(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import time

    import numpy as np

    import cloudio

    clean_env.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
    clean_env.delenv("GS_NO_SIGN_REQUEST", raising=False)
    clean_env.setenv("CLOUDSDK_CONFIG", str(tmp_path))
    t0 = time.monotonic()
    with pytest.raises(ConfigurationError, match="gs://no-creds/d"):
        cloudio.filesystem("gs://no-creds/d")
    with pytest.raises(ConfigurationError, match="STORAGE_EMULATOR_HOST"):
        with cloudio.open("gs://no-creds/d/a.tif", "w", driver="GTiff", width=4, height=4, count=1,
                          dtype="uint8") as ds:
            ds.write(np.zeros((1, 4, 4), "uint8"))
    assert time.monotonic() - t0 < 30  # not minutes of retries against storage.googleapis.com


# -- settings that cannot work are refused at once ------------------------------------------


def test_port_zero_starts_or_fails_at_once(clean_env: pytest.MonkeyPatch) -> None:
    """``port=0`` ("any port" to most servers) must not wait out the start timeout and blame it."""
    import cloudio

    emu = Emulator(mode="binary", port=0, timeout=6)
    t0 = time.monotonic()
    try:
        emu.start()
    except cloudio.EmulatorError as e:
        elapsed = time.monotonic() - t0
        assert elapsed < 4, f"took {elapsed:.1f} s to fail: {e}"
        assert "CLOUDIO_EMULATOR_START_TIMEOUT" not in str(e), str(e)
    else:
        try:
            assert not emu.url.endswith(":0")
            assert emu.create_bucket("port-zero") == "gs://port-zero"
        finally:
            emu.stop()


def test_emulator_root_without_the_filesystem_backend_is_not_silently_ignored(
    clean_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """`cloudio emulator --root DIR` without --backend filesystem is refused; Emulator(root=DIR) keeps nothing there."""
    root = tmp_path / "gcs-data"
    try:
        emu = Emulator(mode="binary", root=root).start()
    except CloudioError as e:
        assert "filesystem" in str(e)
        return
    try:
        emu.create_bucket("kept")
        emu.client.bucket("kept").blob("a.bin").upload_from_string(b"on disk")
        assert (root / "kept" / "a.bin").exists(), (
            f"root={root} was accepted, but the server runs the {emu.backend!r} backend and kept nothing there"
        )
    finally:
        emu.stop()
