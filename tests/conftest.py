"""Shared fixtures: the fault-injecting proxy in front of the real emulator, the journal's records, Dask clusters.

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


def _cluster(processes: bool) -> Iterator[object]:
    """A 2-worker Dask cluster with cloudio's journal relay installed (workers inherit STORAGE_EMULATOR_HOST,
    set by gcs_emulator before they start)."""
    from distributed import Client, LocalCluster

    import cloudio.dask

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=processes, dashboard_address=":0") as cluster:
        with Client(cluster) as client:
            client.wait_for_workers(2, timeout=60)
            cloudio.dask.install(client)
            yield client


@pytest.fixture(scope="module")
def proc_client(gcs_emulator: Emulator) -> Iterator[object]:
    """Two worker processes."""
    yield from _cluster(processes=True)


@pytest.fixture(scope="module")
def thread_client(gcs_emulator: Emulator) -> Iterator[object]:
    """Two workers in this process."""
    yield from _cluster(processes=False)
