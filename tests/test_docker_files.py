"""docker/fake-gcs/: the compose file and the CI workflow agree with cloudio.emulator, and work.

No Docker engine runs here, so the compose file is exercised by starting the
real bundled binary with exactly its command line (the container's
``-host 0.0.0.0`` and port 4443 become 127.0.0.1 and a free port: the
container has its own network namespace, a test process does not) plus the
image entrypoint's ``-data`` folder, then running cloudio's consistency checks
against it in external mode. Where an engine exists, the compose file itself
is started.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

import cloudio
from cloudio import emulator

HERE = Path(__file__).resolve().parent.parent / "docker" / "fake-gcs"


def _compose() -> dict[str, object]:
    doc = yaml.safe_load((HERE / "compose.yaml").read_text())
    return doc["services"]["fake-gcs"]  # type: ignore[no-any-return]


def test_compose_uses_the_image_and_flags_cloudio_uses() -> None:
    svc = _compose()
    assert svc["image"] == emulator.IMAGE
    assert svc["command"] == emulator.server_flags(4443, host="0.0.0.0")
    assert svc["ports"] == ["127.0.0.1:4443:4443"]  # loopback only
    assert "wget" in svc["healthcheck"]["test"]


def test_workflow_starts_the_same_command_line() -> None:
    wf = yaml.safe_load((HERE / "github-actions.yml").read_text())
    steps = wf["jobs"]["test"]["steps"]
    [start] = [s for s in steps if s.get("name") == "Start fake-gcs-server"]
    argv = shlex.split(start["run"])
    i = argv.index(emulator.IMAGE)
    assert argv[:i] == ["docker", "run", "-d", "--name", "fake-gcs", "-p", "127.0.0.1:4443:4443"]
    assert argv[i + 1:] == _compose()["command"]
    assert wf["jobs"]["test"]["env"]["STORAGE_EMULATOR_HOST"] == "http://127.0.0.1:4443"


def _local_argv(command: list[str], port: int) -> list[str]:
    """The compose command line for a process on this host: loopback, a free port."""
    subst = {"0.0.0.0": "127.0.0.1", "4443": str(port), "127.0.0.1:4443": f"127.0.0.1:{port}",
             "http://127.0.0.1:4443": f"http://127.0.0.1:{port}"}
    return [subst.get(a, a) for a in command]


@pytest.fixture
def compose_server(tmp_path: Path) -> Iterator[str]:
    port = emulator._free_port()
    argv = [str(emulator._binary_path()), "-data", str(HERE / "seed"), *_local_argv(_compose()["command"], port)]
    with open(tmp_path / "server.log", "wb") as log:  # the server keeps its own copy of the descriptor
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    saved = os.environ.get("STORAGE_EMULATOR_HOST")
    os.environ["STORAGE_EMULATOR_HOST"] = url
    try:
        emu = cloudio.Emulator(mode="external").start()  # waits until it answers
        assert emu.url == url
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        if saved is None:
            os.environ.pop("STORAGE_EMULATOR_HOST", None)
        else:
            os.environ["STORAGE_EMULATOR_HOST"] = saved


def test_compose_command_line_serves_seeded_buckets_and_passes_cloudio_check(compose_server: str) -> None:
    fs = cloudio.filesystem("gs://example/")
    assert fs.cat("gs://example/hello.txt") == (HERE / "seed" / "example" / "hello.txt").read_bytes()
    env = {**os.environ, "STORAGE_EMULATOR_HOST": compose_server}
    out = subprocess.run([sys.executable, "-m", "cloudio.cli", "check", "gs://example/ci-check"],
                         env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "cases consistent" in out.stdout


@pytest.mark.skipif(shutil.which("docker") is None or subprocess.run(
    ["docker", "info"], capture_output=True).returncode != 0, reason="needs a running Docker engine (none here)")
def test_compose_file_with_a_docker_engine() -> None:  # pragma: no cover - no engine on this project's CI
    f = str(HERE / "compose.yaml")
    subprocess.run(["docker", "compose", "-f", f, "up", "-d", "--wait"], check=True, timeout=300)
    try:
        env = {**os.environ, "STORAGE_EMULATOR_HOST": "http://127.0.0.1:4443"}
        out = subprocess.run([sys.executable, "-m", "cloudio.cli", "check", "gs://example/ci-check"],
                             env=env, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stdout + out.stderr
    finally:
        subprocess.run(["docker", "compose", "-f", f, "down"], check=False, timeout=120)
