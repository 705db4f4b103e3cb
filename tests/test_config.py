"""Endpoint and timeout configuration (cloudio._config): what is refused, what is derived."""

from __future__ import annotations

import pytest

import cloudio
from cloudio import _config


@pytest.mark.parametrize("host", [
    "storage.googleapis.com.", "https://STORAGE.GoogleAPIs.com", "googleapis.com", "google.com.",
    "http://www.google.com:443", "storage.cloud.google.com",
])
def test_google_hosts_are_never_an_emulator(host: str) -> None:
    with pytest.raises(cloudio.ConfigurationError, match="Google"):
        _config.push_endpoint(host)


def test_lookalike_hosts_are_allowed() -> None:
    assert not _config.is_google_host("notgoogleapis.com")
    assert _config.is_google_host("Storage.GoogleAPIs.com.")


def test_http_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CLOUDIO_HTTP_TIMEOUT", raising=False)
    assert _config.http_timeout() == 30.0
    monkeypatch.setenv("CLOUDIO_HTTP_TIMEOUT", "2.5")
    assert _config.http_timeout() == 2.5
    assert _config.gdal_http_options()["GDAL_HTTP_TIMEOUT"] == "2.5"
    for bad in ("0", "-1", "soon", "inf", "nan"):
        monkeypatch.setenv("CLOUDIO_HTTP_TIMEOUT", bad)
        with pytest.raises(cloudio.ConfigurationError, match="CLOUDIO_HTTP_TIMEOUT"):
            _config.http_timeout()


def test_every_variable_cloudio_reads_is_documented() -> None:
    """docs/configuration.md lists every variable of ``_config.VARIABLES`` (the ones cloudio reads)."""
    from pathlib import Path

    doc = (Path(__file__).parent.parent / "docs" / "configuration.md").read_text()
    missing = [v for v in _config.VARIABLES if f"`{v}`" not in doc]
    assert not missing, missing


def test_hns_switch_keeps_an_explicit_value(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(_config.HNS_ENV, "true")
    assert _config.emulator_environ("http://127.0.0.1:4443") == {
        "STORAGE_EMULATOR_HOST": "http://127.0.0.1:4443", _config.HNS_ENV: "true",
    }
    assert _config.disable_gcsfs_hns() is False
    monkeypatch.delenv(_config.HNS_ENV)
    assert _config.emulator_environ("127.0.0.1:4443")[_config.HNS_ENV] == "false"


def test_missing_bucket_reads_and_uploads_say_the_same(gcs_emulator) -> None:
    """One bucket-missing message, whether GDAL's open or an upload found the bucket missing."""
    from cloudio._gcs.transfer import upload

    with pytest.raises(cloudio.BucketNotFoundError) as read:
        cloudio.open("gs://cloudio-no-such-bucket-12/a.tif")
    with pytest.raises(cloudio.BucketNotFoundError) as write:
        upload(b"x", "gs://cloudio-no-such-bucket-12/a.tif")
    assert str(read.value) == str(write.value)
    assert "gs://cloudio-no-such-bucket-12/a.tif" in str(read.value) and "create the bucket" in str(read.value)
    assert isinstance(read.value.__cause__, Exception) and isinstance(write.value.__cause__, Exception)


@pytest.mark.parametrize("value", ["http://127.0.0.1:notaport", "127.0.0.1:70000", "http://127.0.0.1:0"])
def test_an_emulator_address_without_a_usable_port_is_refused_at_once(monkeypatch: pytest.MonkeyPatch,
                                                                      value: str) -> None:
    """Not a TransientError after half a minute of retries: the variable is named, with what it takes."""

    monkeypatch.setenv("STORAGE_EMULATOR_HOST", value)
    for call in (lambda: cloudio.load_array("gs://some-bucket/a.zarr"), lambda: cloudio.Emulator().start()):
        with pytest.raises(cloudio.ConfigurationError, match="STORAGE_EMULATOR_HOST") as err:
            call()
        assert "port" in str(err.value)


@pytest.mark.parametrize("value", ["http://[::1:4443", "http://[localhost]:4443", "[::1:4443"])
def test_an_emulator_address_that_is_no_url_is_refused_naming_the_variable(monkeypatch: pytest.MonkeyPatch,
                                                                         value: str) -> None:
    """Regression: urlsplit's own ValueError ("Invalid IPv6 URL") escaped every open, even is_gcs, unnamed."""
    from cloudio._paths import is_gcs

    monkeypatch.setenv("STORAGE_EMULATOR_HOST", value)
    for call in (lambda: cloudio.load_array("gs://some-bucket/a.zarr"), lambda: cloudio.Emulator().start(),
                 lambda: cloudio.filesystem("gs://some-bucket"),
                 lambda: is_gcs("http://127.0.0.1:4443/some-bucket/a.tif")):
        with pytest.raises(cloudio.ConfigurationError, match="STORAGE_EMULATOR_HOST") as err:
            call()
        assert value in str(err.value) and "http://127.0.0.1:4443" in str(err.value)  # what to write instead
        assert isinstance(err.value.__cause__, ValueError)


@pytest.mark.parametrize("value", ["http://127.0.0.1:notaport", "http://[::1:4443"])
def test_the_command_line_says_which_variable_is_unusable(value: str) -> None:
    import os
    import subprocess
    import sys

    env = {**os.environ, "STORAGE_EMULATOR_HOST": value}
    r = subprocess.run([sys.executable, "-m", "cloudio.cli", "inspect", "gs://some-bucket/a.tif"], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "STORAGE_EMULATOR_HOST" in r.stderr, r.stderr
