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
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

from .emulator import Emulator

_ENV = ("STORAGE_EMULATOR_HOST", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT")


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
