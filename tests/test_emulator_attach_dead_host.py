"""Attaching to the server ``STORAGE_EMULATOR_HOST`` names, when nothing (or no HTTP emulator) is there.

A connection refused for a few seconds is no server starting up: cloudio did not start it, so there is nothing
more to wait for, and every way a user attaches (``Emulator()``, ``with cloudio.Emulator()``, the ``gcs_emulator``
fixture, ``CLOUDIO_EMULATOR=external cloudio demo``) fails within seconds, naming the address and what to do,
instead of waiting the whole start timeout (30 s by default); a server started a moment before is attached to.
A server that accepts connections but is not ready yet (reset, 503, slow) is still waited for within the timeout.
Each way of writing the variable is either taken as gcsfs takes it, or refused at once.
"""

from __future__ import annotations

import os
import socket
import ssl
import struct
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from faultproxy import FaultProxy
from outcomes import bounded

import cloudio
from cloudio.emulator import Emulator
from cloudio.errors import CloudioError, ConfigurationError, EmulatorError

#: far longer than any test here may take: a test that waits it out has waited for nothing
_LONG = "40"
#: what "at once" means on a loaded 2-core machine (the wait it replaces is the whole start timeout)
_AT_ONCE = 10.0


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No emulator selected by the environment (the session fixture may have set one); a long start timeout.

    Tests that also use ``gcs_emulator`` name it first: the session's variable, set when it starts, is then
    what this fixture puts back."""
    monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)
    monkeypatch.delenv("CLOUDIO_EMULATOR", raising=False)
    monkeypatch.setenv("CLOUDIO_EMULATOR_START_TIMEOUT", _LONG)
    return monkeypatch


@pytest.fixture
def dead_port() -> Iterator[int]:
    """A port bound on 127.0.0.1 and never listened on: every connection to it is refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield int(s.getsockname()[1])


def _fails_at_once(fn: Callable[[], object]) -> BaseException:
    """``fn()``'s error, which must come well before the start timeout."""
    _, err, took = bounded(fn, float(_LONG) + 30)
    assert err is not None, "attached to a server that is not there"
    assert took < _AT_ONCE, f"failed only after {took:.1f} s (start timeout {_LONG} s): {err}"
    return err


def _names_url_and_next_step(err: BaseException, url: str) -> None:
    msg = str(err)
    assert isinstance(err, CloudioError), repr(err)
    assert url in msg, msg
    assert "STORAGE_EMULATOR_HOST" in msg and "unset" in msg, msg


# -- nothing listens there -----------------------------------------------------------------


def test_attach_to_a_refusing_address_fails_at_once(clean_env: pytest.MonkeyPatch, dead_port: int) -> None:
    url = f"http://127.0.0.1:{dead_port}"
    clean_env.setenv("STORAGE_EMULATOR_HOST", url)
    emu = Emulator()
    assert emu.mode == "external"
    err = _fails_at_once(emu.start)
    assert isinstance(err, EmulatorError), repr(err)
    _names_url_and_next_step(err, url)
    assert "refused" in str(err) and f"cloudio emulator --port {dead_port}" in str(err)
    assert not emu.running


def test_with_emulator_on_a_refusing_address_fails_at_once(clean_env: pytest.MonkeyPatch, dead_port: int) -> None:
    """The script's form: ``with cloudio.Emulator():`` while the variable names a dead server."""
    url = f"http://127.0.0.1:{dead_port}"
    clean_env.setenv("STORAGE_EMULATOR_HOST", url)

    def enter() -> None:
        with cloudio.Emulator():
            pass

    err = _fails_at_once(enter)
    _names_url_and_next_step(err, url)
    assert os.environ["STORAGE_EMULATOR_HOST"] == url  # left as it was


def test_attach_to_localhost_where_nothing_listens_fails_at_once(clean_env: pytest.MonkeyPatch,
                                                                  dead_port: int) -> None:
    """``localhost:port`` (no scheme): every address localhost has refuses, so none is waited for."""
    clean_env.setenv("STORAGE_EMULATOR_HOST", f"localhost:{dead_port}")
    err = _fails_at_once(Emulator(mode="external").start)
    _names_url_and_next_step(err, f"http://localhost:{dead_port}")


def test_attach_to_a_host_name_that_does_not_resolve_fails_at_once(clean_env: pytest.MonkeyPatch) -> None:
    url = "http://no-such-emulator.invalid:4443"
    clean_env.setenv("STORAGE_EMULATOR_HOST", url)
    err = _fails_at_once(Emulator().start)
    assert isinstance(err, EmulatorError), repr(err)
    _names_url_and_next_step(err, url)
    assert "no-such-emulator.invalid" in str(err) and "resolve" in str(err)


_USER_TEST = textwrap.dedent('''
    def test_uses_the_emulator(gcs_emulator, gcs_bucket):
        assert gcs_bucket.startswith("gs://")
''')


def _clean_subprocess_env(**updates: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("STORAGE_EMULATOR_HOST", "CLOUDIO_EMULATOR", "PYTEST_ADDOPTS",
                        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT")}
    if env.get("PYTHONPATH"):  # keep finding the cloudio under test from another working directory
        env["PYTHONPATH"] = os.pathsep.join(os.path.abspath(p) for p in env["PYTHONPATH"].split(os.pathsep) if p)
    env["CLOUDIO_EMULATOR_START_TIMEOUT"] = _LONG
    env.update(updates)
    return env


def test_the_gcs_emulator_fixture_on_a_refusing_address_fails_at_once(tmp_path: Path, dead_port: int) -> None:
    """A user's own test run (the ``pytest11`` plugin, no conftest) with the variable naming a dead server."""
    url = f"http://127.0.0.1:{dead_port}"
    (tmp_path / "test_user.py").write_text(_USER_TEST)

    def run() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_user.py"], cwd=tmp_path,
            env=_clean_subprocess_env(STORAGE_EMULATOR_HOST=url), capture_output=True, text=True,
        )

    proc, err, took = bounded(run, float(_LONG) + 60)
    assert err is None, repr(err)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1 and "1 error" in out, out
    assert "EmulatorError" in out and url in out and "unset STORAGE_EMULATOR_HOST" in out, out
    assert took < float(_LONG) - 15, f"the run took {took:.1f} s (start timeout {_LONG} s):\n{out}"


def test_cloudio_demo_attaching_to_a_refusing_address_fails_at_once(dead_port: int) -> None:
    """``CLOUDIO_EMULATOR=external cloudio demo``: one line naming the address and the next step, exit 1."""
    url = f"http://127.0.0.1:{dead_port}"

    def run() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "cloudio.cli", "demo"], capture_output=True, text=True,
            env=_clean_subprocess_env(STORAGE_EMULATOR_HOST=url, CLOUDIO_EMULATOR="external", COLUMNS="400"),
        )

    proc, err, took = bounded(run, float(_LONG) + 60)
    assert err is None, repr(err)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert url in lines[-1] and "unset STORAGE_EMULATOR_HOST" in lines[-1], proc.stderr
    assert took < float(_LONG) - 15, f"the run took {took:.1f} s (start timeout {_LONG} s):\n{proc.stderr}"


def test_a_server_started_a_moment_before_is_attached_to(clean_env: pytest.MonkeyPatch) -> None:
    """``cloudio emulator --port P &`` (or a container) and the tests started together: the first probes are
    refused while the server comes up. They must be waited for: the first version of the fast failure gave up
    at the first refusal, 0.01 s in."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    url = f"http://127.0.0.1:{port}"
    clean_env.setenv("STORAGE_EMULATOR_HOST", url)
    late = Emulator(mode="binary", port=port)
    starter = threading.Timer(1.0, late.start)  # listens about 1.3 s after the attach begins
    starter.start()
    try:
        attached, err, _ = bounded(Emulator().start, float(_LONG) + 30)
        assert err is None, f"gave up on a server starting up: {err}"
        assert attached is not None and attached.mode == "external" and attached.url == url
    finally:
        starter.join(30)
        late.stop()


# -- something is there, not (yet) an emulator answering --------------------------------------


def _accepting(answer: str, s: socket.socket) -> None:
    """Accept connections on ``s`` until it closes: ``"silent"`` keeps each open, never answering;
    ``"reset"`` resets each at once (as a container's published port does before its server listens)."""
    kept = []
    while True:
        try:
            conn, _ = s.accept()
        except OSError:  # the test closed it
            break
        if answer == "reset":
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.close()
        else:
            kept.append(conn)
    for conn in kept:
        conn.close()


@pytest.mark.parametrize("answer", ["silent", "reset"])
def test_an_address_that_accepts_but_does_not_answer_is_waited_for_within_the_timeout(
        clean_env: pytest.MonkeyPatch, answer: str) -> None:
    """Accepted, then silent or reset: perhaps a server still starting; given the start timeout, then an error."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(16)
        threading.Thread(target=_accepting, args=(answer, s), daemon=True).start()
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
        clean_env.setenv("STORAGE_EMULATOR_HOST", url)
        clean_env.setenv("CLOUDIO_EMULATOR_START_TIMEOUT", "1.5")
        _, err, took = bounded(Emulator().start)
        s.shutdown(socket.SHUT_RDWR)
    assert isinstance(err, EmulatorError), repr(err)
    assert took >= 1.5, f"gave up after {took:.1f} s, before the start timeout: {err}"
    assert "within 1.5 s" in str(err) and url in str(err) and "CLOUDIO_EMULATOR_START_TIMEOUT" in str(err)


def test_a_server_answering_503_is_waited_for(gcs_emulator: Emulator, clean_env: pytest.MonkeyPatch) -> None:
    """503 (a proxy in front of a server still starting): retried until it answers."""
    with FaultProxy(gcs_emulator.url) as proxy:
        proxy.add("status", code=503, path=r"^/storage/v1/b$", times=3)
        clean_env.setenv("STORAGE_EMULATOR_HOST", proxy.url)
        emu = Emulator()
        _, err, _ = bounded(emu.start)
        assert err is None, repr(err)
        assert emu.url == proxy.url
        # (the 200's own entry is logged after its head went out: it may follow the return)
        assert [status for _, _, status in proxy.requests(r"^/storage/v1/b$")][:3] == [503, 503, 503]


# -- the ways of writing the variable ---------------------------------------------------------


@pytest.mark.parametrize("form", ["127.0.0.1:{port}", "localhost:{port}", "http://127.0.0.1:{port}/",
                                  " http://127.0.0.1:{port} ", "HTTP://127.0.0.1:{port}"])
def test_forms_gcsfs_takes_attach(gcs_emulator: Emulator, clean_env: pytest.MonkeyPatch, form: str) -> None:
    """No scheme means http (as gcsfs reads it); a trailing slash or blanks around it are dropped."""
    port = gcs_emulator.url.rsplit(":", 1)[1]
    clean_env.setenv("STORAGE_EMULATOR_HOST", form.format(port=port))
    emu = Emulator()
    _, err, _ = bounded(emu.start)
    assert err is None, repr(err)
    assert emu.url.startswith("http://") and emu.url.endswith(f":{port}")
    assert emu.has_bucket(gcs_emulator.create_bucket("attach-forms")[len("gs://"):])


def test_an_https_address_of_a_plain_http_server_is_refused_at_once(gcs_emulator: Emulator,
                                                                     clean_env: pytest.MonkeyPatch) -> None:
    """The emulator speaks plain HTTP (``-scheme http``): an ``https://`` address of it never works."""
    port = gcs_emulator.url.rsplit(":", 1)[1]
    clean_env.setenv("STORAGE_EMULATOR_HOST", f"https://127.0.0.1:{port}")
    err = _fails_at_once(Emulator().start)
    assert isinstance(err, ConfigurationError) and isinstance(err, EmulatorError), repr(err)
    msg = str(err)
    assert f"https://127.0.0.1:{port}" in msg and "plain HTTP" in msg, msg
    assert f"STORAGE_EMULATOR_HOST=http://127.0.0.1:{port}" in msg, msg  # what to write instead


def _self_signed(folder: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 that no one trusts (fake-gcs-server's own default, ``-scheme https``)."""
    pytest.importorskip("cryptography")
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fake-gcs-server")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = folder / "cert.pem", folder / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_file, key_file


def _tls_handshakes(s: socket.socket, context: ssl.SSLContext) -> None:
    """Accept on ``s`` until it closes, each connection shaking hands (which the client refuses) and closed."""
    while True:
        try:
            conn, _ = s.accept()
        except OSError:
            break
        try:
            with context.wrap_socket(conn, server_side=True):
                pass
        except OSError:  # the client refused the certificate, or spoke plain HTTP
            conn.close()


def test_an_https_address_with_an_untrusted_certificate_is_refused_at_once(clean_env: pytest.MonkeyPatch,
                                                                           tmp_path: Path) -> None:
    """fake-gcs-server started without ``-scheme http`` serves TLS with a certificate of its own: no waiting
    makes it trusted."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(*_self_signed(tmp_path))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(16)
        threading.Thread(target=_tls_handshakes, args=(s, context), daemon=True).start()
        url = f"https://127.0.0.1:{s.getsockname()[1]}"
        clean_env.setenv("STORAGE_EMULATOR_HOST", url)
        err = _fails_at_once(Emulator().start)
        s.shutdown(socket.SHUT_RDWR)
    assert isinstance(err, ConfigurationError) and isinstance(err, EmulatorError), repr(err)
    msg = str(err)
    assert url in msg and "TLS handshake failed" in msg and "CERTIFICATE_VERIFY_FAILED" in msg, msg
    assert "-scheme http" in msg and "unset STORAGE_EMULATOR_HOST" in msg, msg


@pytest.mark.parametrize("value", ["http://127.0.0.1:four", "127.0.0.1:99999", "http://127.0.0.1:0", "ftp://x:1"])
def test_an_unusable_address_is_refused_at_once(clean_env: pytest.MonkeyPatch, value: str) -> None:
    clean_env.setenv("STORAGE_EMULATOR_HOST", value)
    err = _fails_at_once(lambda: Emulator().start())
    assert isinstance(err, ConfigurationError), repr(err)
    assert "STORAGE_EMULATOR_HOST" in str(err) and "http://127.0.0.1:4443" in str(err), str(err)
