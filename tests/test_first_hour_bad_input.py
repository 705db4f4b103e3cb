"""A user's first hour, bad input: an unusable CLOUDIO_* variable given to check or demo, a damaged zarr.json or
a prefix given --band/--var in inspect, an emulator whose server died or was stopped, an unusable timeout=, a
nested with block, and a test module's gcs_emulator_options after the session's emulator started. Found by a
review; each failed before its fix. Against the real fake-gcs-server; nothing is mocked.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from cloudio import _config, _state
from cloudio.emulator import Emulator
from cloudio.errors import CloudioError, ConfigurationError, EmulatorError


def _cli(args: list[str], emulator_url: str | None, timeout: float = 120,
         **extra: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("STORAGE_EMULATOR_HOST", "CLOUDIO_EMULATOR")}
    env["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"
    if emulator_url is not None:
        env["STORAGE_EMULATOR_HOST"] = emulator_url
    env.update(extra)
    return subprocess.run([sys.executable, "-m", "cloudio", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def _put(emu: Emulator, bucket_url: str, key: str, data: bytes) -> None:
    emu.client.bucket(bucket_url.removeprefix("gs://")).blob(key).upload_from_string(data)


# -- the CLI -------------------------------------------------------------------------------------


@pytest.mark.parametrize("variable", ["CLOUDIO_CONSISTENCY=bogus", "CLOUDIO_HTTP_TIMEOUT=abc"])
def test_check_with_an_unusable_variable_is_exit_2_naming_it_not_cloudio_inconsistent(
    gcs_emulator: Emulator, gcs_bucket: str, variable: str
) -> None:
    """guide.md: an unusable environment variable is exit 2 (bad input), one line naming it. `inspect` does
    this; `check` instead runs every case, reports 'cloudio was not consistent in: ...' and exits 1."""
    name, value = variable.split("=")
    r = _cli(["check", f"{gcs_bucket}/run"], gcs_emulator.url, **{name: value})
    assert r.returncode == 2, (r.returncode, r.stdout[-1500:], r.stderr[-1500:])
    assert name in r.stderr
    assert "not consistent" not in r.stdout  # cloudio was not inconsistent: the setting was unusable


def test_demo_with_an_unusable_variable_is_exit_2_and_leaves_nothing_behind(
    gcs_emulator: Emulator, gcs_bucket: str
) -> None:
    """`cloudio demo --url` with CLOUDIO_HTTP_TIMEOUT=abc reports 'cloudio: wrong at 5 of 5 steps', exits 1,
    and leaves the raw side's objects in the bucket ('delete it by hand')."""
    r = _cli(["demo", "--url", f"{gcs_bucket}/run"], gcs_emulator.url, CLOUDIO_HTTP_TIMEOUT="abc")
    assert r.returncode == 2, (r.returncode, r.stdout[-1500:], r.stderr[-1500:])
    assert "CLOUDIO_HTTP_TIMEOUT" in r.stderr
    assert "wrong at" not in r.stdout
    left = list(gcs_emulator.client.list_blobs(gcs_bucket.removeprefix("gs://")))
    assert left == [], [b.name for b in left]


def test_inspect_of_a_damaged_zarr_json_says_what_is_wrong_and_what_to_do(
    gcs_emulator: Emulator, gcs_bucket: str
) -> None:
    """The library says 'a Zarr metadata document there is not valid JSON ...; the store is damaged: write it
    again' (IntegrityError); `cloudio inspect` prints only 'JSONDecodeError: Expecting value: line 1 column 1'."""
    _put(gcs_emulator, gcs_bucket, "z.zarr/zarr.json", b"not json")
    r = _cli(["inspect", f"{gcs_bucket}/z.zarr"], gcs_emulator.url)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    line = r.stderr.strip().splitlines()[-1]
    assert "JSONDecodeError" not in line, line
    assert "not valid JSON" in line and "again" in line, line


@pytest.mark.parametrize("option", [["--band", "3"], ["--var", "nothing"]])
def test_inspect_of_a_prefix_with_band_or_var_is_bad_input(
    gcs_emulator: Emulator, gcs_bucket: str, option: list[str]
) -> None:
    """--plot on a prefix is exit 2 ('give --plot the URL of one of them'); --band/--var, which also name
    something inside one raster or store, are silently ignored and the prefix is listed with exit 0."""
    _put(gcs_emulator, gcs_bucket, "dir/a.txt", b"x")
    r = _cli(["inspect", f"{gcs_bucket}/dir/", *option], gcs_emulator.url)
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert option[0] in r.stderr


# -- the embedded emulator -----------------------------------------------------------------------


def test_calls_on_an_emulator_whose_server_died_raise_emulator_error() -> None:
    """A killed server (OOM, Ctrl-C in its group): create_bucket, has_bucket and requests raise a raw
    urllib.error.URLError ('Connection refused'), not an EmulatorError naming the emulator and the fix."""
    emu = Emulator(mode="binary").start()
    try:
        assert emu.pid is not None
        os.kill(emu.pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while emu._proc is not None and emu._proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        for call in (lambda: emu.create_bucket("after-death"), lambda: emu.has_bucket("after-death"),
                     emu.requests):
            with pytest.raises(EmulatorError) as info:
                call()
            assert emu.url in str(info.value)
    finally:
        emu.stop()


def test_requests_after_stop_says_the_emulator_is_not_running() -> None:
    """After stop(), requests() says 'request counts need an emulator cloudio started (mode 'binary' has no
    log here)': wrong, cloudio did start it; the emulator is stopped (url says so: 'not running')."""
    emu = Emulator(mode="binary").start()
    emu.stop()
    with pytest.raises(EmulatorError, match="not running"):
        emu.requests()


@pytest.mark.parametrize("timeout", ["5", -1, float("nan")])
def test_an_unusable_timeout_is_a_configuration_error_naming_it(timeout: object) -> None:
    """CLOUDIO_EMULATOR_START_TIMEOUT=abc/-1 is a ConfigurationError naming it; timeout= is not checked:
    '5' is a TypeError at start; -1 and nan start a server, then fail 'no answer ... within -1 s' telling to
    raise CLOUDIO_EMULATOR_START_TIMEOUT (which is not what was set)."""
    with pytest.raises(ConfigurationError, match="timeout"):
        Emulator(mode="binary", timeout=timeout).start().stop()  # type: ignore[arg-type]


def test_nested_with_of_one_emulator_restores_the_process() -> None:
    """`with emu:` inside `with emu:` (the same object): the inner exit stops the server, and the outer exit
    then restores nothing: STORAGE_EMULATOR_HOST and cloudio's endpoint stay on a dead server."""
    before_env = os.environ.get("STORAGE_EMULATOR_HOST")
    before_stack = list(_state.endpoints)
    emu = Emulator(mode="binary")
    try:
        with emu:
            with emu:
                pass
    except CloudioError:
        pass  # refusing the re-entry with a clear error is fine too
    finally:
        emu.stop()
    assert os.environ.get("STORAGE_EMULATOR_HOST") == before_env
    assert list(_state.endpoints) == before_stack
    if before_env is None:
        assert _config.emulator_endpoint() is None


# -- the pytest plugin ---------------------------------------------------------------------------


def test_overriding_emulator_options_in_a_test_module_is_not_silently_ignored(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """docs/emulator.md overrides gcs_emulator_options "in a test module as here". When any earlier module
    already used gcs_emulator, the session's emulator is reused with the other options: the page's own
    test_objects_are_plain_files gets the memory backend."""
    monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)
    monkeypatch.delenv("CLOUDIO_EMULATOR", raising=False)
    pytester.makepyfile(
        test_aaa_first=textwrap.dedent("""
            def test_uses_the_emulator(gcs_emulator, gcs_bucket):
                assert gcs_bucket.startswith("gs://")
        """),
        test_emulator_options=textwrap.dedent("""
            import pytest


            @pytest.fixture(scope="session")
            def gcs_emulator_options(tmp_path_factory):
                return {"mode": "binary", "backend": "filesystem", "root": tmp_path_factory.mktemp("gcs")}


            def test_objects_are_plain_files(gcs_emulator, gcs_bucket):
                bucket = gcs_bucket.removeprefix("gs://")
                gcs_emulator.client.bucket(bucket).blob("d/a.bin").upload_from_string(b"on disk")
                assert gcs_emulator.backend == "filesystem"
        """),
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-q", timeout=120)
    # either the override is honoured, or the run says clearly that it cannot be (an error naming the fixture)
    out = result.stdout.str()
    assert result.ret == 0 or ("gcs_emulator_options" in out and "gcs_emulator_factory" in out), out[-3000:]
