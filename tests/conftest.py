"""Shared fixtures: the fault-injecting proxy in front of the real emulator, the journal's records, Dask clusters,
gcsfs's retries made quick, and another writer (a second Python process with the plain libraries).

Raster helpers shared by several test files live in ``tests/rasters.py``.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import types
from collections.abc import Callable, Iterator

import pytest
from faultproxy import FaultProxy

from cloudio import _config
from cloudio._journal import Change, journal
from cloudio.emulator import Emulator

pytest_plugins = ["pytester"]


@pytest.fixture(autouse=True)
def _preconditions_enforced(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test sees uploads refused as GCS refuses them: an upload guarded against a late copy of an earlier
    write (``JournaledStore.expecting``) goes the way fake-gcs-server enforces its ``ifGenerationMatch`` too (a
    multipart upload; GCS enforces the media upload cloudio sends otherwise), so a wrong guard fails a test here
    as it would fail the write on GCS."""
    from cloudio._gcs import fast

    monkeypatch.setattr(fast, "EXPECTED_AS_MULTIPART", True)


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
def slow_link(monkeypatch: pytest.MonkeyPatch) -> None:
    """CLOUDIO_HTTP_TIMEOUT for tests of long uploads over a slow link (:data:`relay.SLOW_TIMEOUT`)."""
    from relay import SLOW_TIMEOUT

    monkeypatch.setenv("CLOUDIO_HTTP_TIMEOUT", str(SLOW_TIMEOUT))


@pytest.fixture
def b(gcs_bucket: str) -> str:
    """The bucket as an fsspec path (no protocol)."""
    return gcs_bucket[len("gs://"):]


@pytest.fixture
def user_fs(gcs_emulator: Emulator) -> object:
    """The user's own plain gcsfs instance, made the usual way with the emulator's options (cloudio invalidates
    its listings all the same)."""
    _config.prepare_gcsfs_import()
    import gcsfs

    return gcsfs.GCSFileSystem(endpoint_url=gcs_emulator.url, token="anon")


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
    import dask
    from distributed import Client, LocalCluster

    import cloudio.dask

    # each client sets itself as dask's scheduler and restores what it found when it closes: two of one module,
    # closed in the order they started, left "dask.distributed" set with no client for the files after it
    saved = {k: dask.config.get(k, None) for k in ("scheduler", "shuffle")}
    try:
        with LocalCluster(n_workers=2, threads_per_worker=1, processes=processes, dashboard_address=":0") as cluster:
            with Client(cluster) as client:
                client.wait_for_workers(2, timeout=60)
                cloudio.dask.install(client)
                yield client
    finally:
        for k, v in saved.items():
            if v is None:
                dask.config.config.pop(k, None)
            else:
                dask.config.set({k: v})


@pytest.fixture(scope="module")
def proc_client(gcs_emulator: Emulator) -> Iterator[object]:
    """Two worker processes."""
    yield from _cluster(processes=True)


@pytest.fixture(scope="module")
def thread_client(gcs_emulator: Emulator) -> Iterator[object]:
    """Two workers in this process."""
    yield from _cluster(processes=False)


_real_sleep = asyncio.sleep


@pytest.fixture
def quick_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """gcsfs's back-off between retries shortened to 10 ms (6 tries still made, 33 s of waiting saved)."""
    import gcsfs.retry

    async def sleep(_seconds: float) -> None:
        await _real_sleep(0.01)

    monkeypatch.setattr(gcsfs.retry, "asyncio", types.SimpleNamespace(sleep=sleep))


PRELUDE = """
import os, sys
import numpy as np
from google.auth.credentials import AnonymousCredentials
from google.cloud import storage

BUCKET = os.environ["OTHER_BUCKET"]
SO = {"endpoint_url": "http://" + os.environ["STORAGE_EMULATOR_HOST"].split("://")[-1], "token": "anon"}
client = storage.Client(project="other", credentials=AnonymousCredentials(),
                        client_options={"api_endpoint": SO["endpoint_url"]})
bucket = client.bucket(BUCKET)
"""

EPILOGUE = """
assert not any(m == "cloudio" or m.startswith("cloudio.") for m in sys.modules), "the other writer loaded cloudio"
"""


@pytest.fixture
def other_writer(gcs_bucket: str, gcs_emulator: Emulator) -> Callable[[str], None]:
    """Run a snippet in a second Python process (plain libraries, no cloudio) against ``gcs_bucket``."""

    def run(code: str) -> None:
        script = PRELUDE + textwrap.dedent(code) + EPILOGUE
        env = {**os.environ, "OTHER_BUCKET": gcs_bucket.removeprefix("gs://"),
               "STORAGE_EMULATOR_HOST": gcs_emulator.url}
        r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=180)
        assert r.returncode == 0, f"the other writer failed:\n{r.stderr[-3000:]}"

    return run


@pytest.fixture
def python_sigint() -> Iterator[None]:
    """Ctrl-C raises KeyboardInterrupt in the main thread, whatever an earlier test installed (flytekit's local
    runs leave a SIGINT handler that exits)."""
    import signal

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def interrupted_while_marker_goes_up(fault_proxy: FaultProxy, store: str, write: Callable[[], object]) -> None:
    """Run ``write`` (of the store named ``store``) and press Ctrl-C once its write marker reached the server,
    its answer held by the proxy; ``write`` must raise KeyboardInterrupt. (Use with ``python_sigint``.)"""
    import re
    import signal
    import threading

    release = threading.Event()
    marker = fault_proxy.add("late", method="POST", path=r"/upload/.*ifGenerationMatch=0",
                             body=re.escape(f"{store}/.cloudio-write").encode(), release=release, seconds=30)

    def interrupt() -> None:
        if marker.answered.wait(60):  # the marker is stored; its answer is held
            signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)

    t = threading.Thread(target=interrupt)
    t.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            write()
    finally:
        release.set()
        t.join()
