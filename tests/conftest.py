"""Shared fixtures: the fault-injecting proxy in front of the real emulator."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from faultproxy import FaultProxy

from cloudio import _config
from cloudio.emulator import Emulator


@pytest.fixture
def fault_proxy(gcs_emulator: Emulator) -> Iterator[FaultProxy]:
    """A :class:`FaultProxy` in front of the emulator, cloudio's endpoint while the test runs."""
    with FaultProxy(gcs_emulator.url) as p:
        _config.push_endpoint(p.url)
        try:
            yield p
        finally:
            _config.pop_endpoint()
