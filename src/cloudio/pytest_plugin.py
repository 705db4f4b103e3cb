"""pytest fixtures for a real GCS emulator; registered through ``pytest11``.

``gcs_emulator`` (session scope)
    A running :class:`cloudio.emulator.Emulator`: the bundled binary, or the
    server ``STORAGE_EMULATOR_HOST`` names (attach), or Docker when
    ``CLOUDIO_EMULATOR=docker``. While it runs, ``STORAGE_EMULATOR_HOST``
    points at it, so cloudio, gcsfs and google-cloud-storage in this process
    (and processes it starts) use it. Restored afterwards.
``gcs_bucket`` (function scope)
    A fresh, empty bucket, as the string ``"gs://<name>"``.

Each pytest-xdist worker starts its own server on a free port.

gcsfs decides at *import* whether to ask a gRPC control API about each bucket
(``GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT``, on by default), which costs 60 s per
bucket against an emulator. A user's test module typically imports gcsfs at
the top, long before a fixture runs, so the plugin sets that variable to
``false`` for the test session before any conftest or test module is
imported, unless it is already set (an explicit value wins), and removes it
again when the session ends.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

from cloudio.emulator import Emulator

_HNS = "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"
_ENV = ("STORAGE_EMULATOR_HOST", _HNS)
_set_hns = pytest.StashKey[bool]()


@pytest.hookimpl(tryfirst=True)
def pytest_load_initial_conftests(early_config: pytest.Config) -> None:
    """Keep gcsfs off its gRPC bucket lookup before conftests and tests import it."""
    if _HNS not in os.environ:
        os.environ[_HNS] = "false"
        early_config.stash[_set_hns] = True


def pytest_unconfigure(config: pytest.Config) -> None:
    if config.stash.get(_set_hns, False):
        os.environ.pop(_HNS, None)


@pytest.fixture(scope="session")
def gcs_emulator() -> Iterator[Emulator]:
    """A running fake-gcs-server for the whole test session."""
    saved = {k: os.environ.get(k) for k in _ENV}
    emu = Emulator()
    emu.start()
    os.environ["STORAGE_EMULATOR_HOST"] = emu.url
    os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
    try:
        yield emu
    finally:
        emu.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def gcs_bucket(gcs_emulator: Emulator) -> str:
    """A new empty bucket on the emulator, returned as ``"gs://<name>"``."""
    name = f"test-{uuid.uuid4().hex[:16]}"
    return gcs_emulator.create_bucket(name)
