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
