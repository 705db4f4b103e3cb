"""Shared fixtures: the fault-injecting proxy in front of the real emulator, the journal's records.

Raster helpers shared by several test files live in ``tests/rasters.py``.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from faultproxy import FaultProxy

from cloudio import _config
from cloudio._journal import Change, journal
from cloudio.emulator import Emulator

pytest_plugins = ["pytester"]


@pytest.fixture
def fault_proxy(gcs_emulator: Emulator) -> Iterator[FaultProxy]:
    """A :class:`FaultProxy` in front of the emulator, cloudio's endpoint while the test runs."""
    with FaultProxy(gcs_emulator.url) as p:
        _config.push_endpoint(p.url)
        try:
            yield p
        finally:
            _config.pop_endpoint()


@pytest.fixture
def journal_records() -> Iterator[list[Change]]:
    """Every change recorded in this process while the test runs, in the order heard.

    A listener, not the journal's own history: the journal keeps only what
    the library needs, and a test sees exactly its own changes.
    """
    heard: list[Change] = []
    journal().add_listener(heard.append)
    try:
        yield heard
    finally:
        journal().remove_listener(heard.append)
