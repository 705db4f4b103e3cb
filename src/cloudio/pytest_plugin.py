"""pytest fixtures for a real GCS emulator; registered through ``pytest11``.

``gcs_emulator`` (session scope)
    A running :class:`cloudio.emulator.Emulator`, built from
    ``gcs_emulator_options``: the bundled binary, or the server
    ``STORAGE_EMULATOR_HOST`` names (attach), or Docker when
    ``CLOUDIO_EMULATOR=docker``. While it runs, ``STORAGE_EMULATOR_HOST``
    points at it, so cloudio, gcsfs and google-cloud-storage in this process
    (and processes it starts) use it. Restored afterwards.
``gcs_emulator_options`` (session scope)
    The keyword arguments of that ``Emulator`` (``mode``, ``port``,
    ``backend``, ...); override the fixture in a conftest to change them.
``gcs_emulator_factory`` (session scope)
    A callable taking the same keywords and returning a further running
    emulator; every one it started is stopped when the session ends. Without
    ``mode`` it starts a server of its own (Docker under
    ``CLOUDIO_EMULATOR=docker``, else the bundled binary), never attaching to
    ``STORAGE_EMULATOR_HOST``; ``mode=None`` follows the environment as
    ``Emulator()`` does.
``gcs_bucket`` (function scope)
    A fresh, empty bucket on ``gcs_emulator``, as the string ``"gs://<name>"``.

Each pytest-xdist worker starts its own server on a free port.

gcsfs decides at *import* whether to ask a gRPC control API about each bucket
(``GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT``, on by default), which costs 60 s per
bucket against an emulator, and a test module typically imports gcsfs at
the top, long before a fixture runs. Merely installing cloudio must not change
other projects' runs, so the plugin sets that variable to ``false`` only for
runs that use the emulator, as early as it can tell: before any conftest is
imported when the ini option ``cloudio_emulator = true`` says so; otherwise
just before importing a test module that names one of these fixtures; at the
latest when the first emulator starts (with a warning if gcsfs was imported
too early to see it). An explicit value in the environment wins; whatever the
plugin set is removed when the session ends.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import uuid
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from cloudio import _config
from cloudio.emulator import Emulator, env_mode

_HNS = _config.HNS_ENV
_INI = "cloudio_emulator"
#: a test module naming one of these will start an emulator
_USES_FIXTURES = re.compile(rb"\b(gcs_emulator|gcs_bucket)\w*\b")
_set_hns = pytest.StashKey[bool]()
_warned = pytest.StashKey[bool]()
#: the factory's mode when none is passed: a server of its own
_OWN_SERVER: Any = object()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini(
        _INI, type="bool", default=False,
        help="the tests use cloudio's GCS emulator: keep gcsfs off its gRPC bucket lookup "
             f"({_HNS}=false) before any conftest or test module imports it",
    )


def _keep_gcsfs_off_grpc(config: pytest.Config) -> None:
    """Set the variable for this session, unless the environment already has a value."""
    if _config.disable_gcsfs_hns():
        config.stash[_set_hns] = True


@pytest.hookimpl(tryfirst=True)
def pytest_load_initial_conftests(early_config: pytest.Config) -> None:
    """Projects that opted in get the variable before their conftests import gcsfs."""
    if early_config.getini(_INI):
        _keep_gcsfs_off_grpc(early_config)


def pytest_collectstart(collector: pytest.Collector) -> None:
    """Before a test module is imported: one that names an emulator fixture gets the variable first."""
    if _HNS in os.environ or not isinstance(collector, pytest.Module):
        return
    try:
        source = collector.path.read_bytes()
    except OSError:
        return  # pytest itself reports an unreadable module
    if _USES_FIXTURES.search(source):
        _keep_gcsfs_off_grpc(collector.config)


def pytest_unconfigure(config: pytest.Config) -> None:
    if config.stash.get(_set_hns, False):
        os.environ.pop(_HNS, None)


def _gcsfs_asks_grpc() -> bool:
    """gcsfs is imported and chose its gRPC-probing class (the variable came too late)."""
    gcsfs = sys.modules.get("gcsfs")
    return gcsfs is not None and getattr(getattr(gcsfs, "GCSFileSystem", None), "__name__", "") != "GCSFileSystem"


@pytest.fixture(scope="session")
def gcs_emulator_options() -> dict[str, Any]:
    """Keyword arguments of the session's :class:`~cloudio.emulator.Emulator`; override to change them.

    ``mode=None`` follows ``CLOUDIO_EMULATOR`` and ``STORAGE_EMULATOR_HOST``;
    ``port=None`` picks a free port.
    """
    return dict(_DEFAULT_OPTIONS)


_DEFAULT_OPTIONS: dict[str, Any] = {"mode": None, "port": None, "backend": "memory"}


@pytest.fixture(scope="session")
def gcs_emulator_factory(request: pytest.FixtureRequest) -> Iterator[Callable[..., Emulator]]:
    """Start emulators on demand (keywords of :class:`~cloudio.emulator.Emulator`); all stop at session end."""
    with contextlib.ExitStack() as stack:

        def start(mode: str | None = _OWN_SERVER, **options: Any) -> Emulator:
            config = request.config
            if not config.stash.get(_warned, False) and _gcsfs_asks_grpc() and (
                _HNS not in os.environ or config.stash.get(_set_hns, False)  # not the user's own choice
            ):
                config.stash[_warned] = True
                warnings.warn(
                    f"gcsfs was imported before cloudio's emulator fixtures could set {_HNS}=false, "
                    "so each new bucket costs a 60 s gRPC lookup against the emulator. Fix: add "
                    f"'{_INI} = true' to your pytest configuration (or export {_HNS}=false).",
                    pytest.PytestConfigWarning, stacklevel=2,
                )
            _keep_gcsfs_off_grpc(config)
            if mode is _OWN_SERVER:  # a *further* emulator: never the one STORAGE_EMULATOR_HOST names
                mode = "docker" if env_mode() == "docker" else "binary"
            emu = Emulator(mode, **options)  # type: ignore[arg-type]
            stack.callback(emu.stop)  # every one stops, even when another's stop fails
            return emu.start()

        yield start


@pytest.fixture(scope="session")
def gcs_emulator(
    gcs_emulator_factory: Callable[..., Emulator], gcs_emulator_options: dict[str, Any], request: pytest.FixtureRequest
) -> Iterator[Emulator]:
    """A running fake-gcs-server for the whole test session."""
    saved = os.environ.get("STORAGE_EMULATOR_HOST")
    # without a mode the factory starts a server of its own; the session's follows the environment
    emu = gcs_emulator_factory(**{"mode": None, **gcs_emulator_options})
    request.config.stash[_started_with] = (emu, gcs_emulator_options)
    os.environ["STORAGE_EMULATOR_HOST"] = emu.url
    try:
        yield emu
    finally:
        if saved is None:
            os.environ.pop("STORAGE_EMULATOR_HOST", None)
        else:
            os.environ["STORAGE_EMULATOR_HOST"] = saved


#: the session's emulator and the options it was started with (:func:`_gcs_emulator_options_honoured`)
_started_with = pytest.StashKey[tuple[Emulator, dict[str, Any]]]()


@pytest.fixture(autouse=True)
def _gcs_emulator_options_honoured(request: pytest.FixtureRequest) -> None:
    """A test whose own ``gcs_emulator_options`` (not the defaults) differ from those the session's emulator
    started with fails, naming the fixture: pytest starts a session fixture once, so a test module's
    override after an earlier module used ``gcs_emulator`` would be silently ignored."""
    if "gcs_emulator" not in request.fixturenames:
        return
    emu = request.getfixturevalue("gcs_emulator")
    started = request.config.stash.get(_started_with, None)
    if started is None or started[0] is not emu:  # a gcs_emulator of the user's own making
        return
    wanted, used = request.getfixturevalue("gcs_emulator_options"), started[1]
    if wanted != used and wanted != _DEFAULT_OPTIONS:  # the defaults ask for nothing
        pytest.fail(
            f"this test's gcs_emulator_options {wanted!r} differ from those the session's emulator was started "
            f"with ({used!r}), by an earlier test: pytest starts a session fixture once. Override "
            "gcs_emulator_options in the conftest.py at the root of the tests, or start this module's own "
            "emulator with gcs_emulator_factory(**options).",
            pytrace=False,
        )


@pytest.fixture
def gcs_bucket(gcs_emulator: Emulator) -> str:
    """A new empty bucket on the emulator, returned as ``"gs://<name>"``."""
    name = f"test-{uuid.uuid4().hex[:16]}"
    return gcs_emulator.create_bucket(name)
