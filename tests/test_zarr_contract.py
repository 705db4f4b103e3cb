"""zarr's own store contract (``zarr.testing.store.StoreTests``) for ``JournaledStore``, on the emulator.

Set up the way zarr tests its ``FsspecStore`` (tests/test_store/test_fsspec.py
in zarr): a fresh asynchronous filesystem per test (each async test runs on
its own event loop), ``get``/``set`` helpers that bypass the store through a
synchronous filesystem. Plain ``FsspecStore`` runs through the same suite on
the same emulator, so a failure of ours next to a pass of theirs is ours.
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from zarr.core.buffer import Buffer, cpu
from zarr.storage import FsspecStore
from zarr.testing.store import StoreTests

from cloudio._config import gcsfs_options
from cloudio._gcs.client import gcs_filesystem, keep_alive
from cloudio._paths import parse_gcs
from cloudio._zarr.store import JournaledStore

pytestmark = [
    pytest.mark.asyncio,
    # the suite marks every test of the class; our sync ones too
    pytest.mark.filterwarnings("ignore:.*is marked with '@pytest.mark.asyncio' but it is not an async function"),
    pytest.mark.filterwarnings("ignore::pytest.PytestWarning"),
]


def _async_fs() -> Any:
    """A new asynchronous gcsfs instance, bound to the event loop of the test that uses it."""
    import gcsfs

    gcsfs.GCSFileSystem.clear_instance_cache()  # as zarr's tests do: an instance serves one loop
    fs = gcsfs.GCSFileSystem(asynchronous=True, **gcsfs_options())
    keep_alive(fs)  # its finalizer would close the session on a loop that is gone (see _gcs)
    return fs


class _OnEmulator:
    """``get``/``set`` bypassing the store, and a fresh prefix per test."""

    buffer_cls = cpu.Buffer

    @pytest.fixture
    def prefix(self, gcs_bucket: str) -> str:
        return f"{parse_gcs(gcs_bucket).bucket}/{uuid.uuid4().hex[:8]}"

    async def get(self, store: Any, key: str) -> Buffer:
        return self.buffer_cls.from_bytes(gcs_filesystem().cat_file(f"{_inner(store).path}/{key}"))

    async def set(self, store: Any, key: str, value: Buffer) -> None:
        gcs_filesystem().pipe_file(f"{_inner(store).path}/{key}", value.to_bytes())

    def test_store_supports_writes(self, store: Any) -> None:
        assert store.supports_writes

    def test_store_supports_listing(self, store: Any) -> None:
        assert store.supports_listing

    def test_store_supports_partial_writes(self, store: Any) -> None:
        assert not store.supports_partial_writes

    @pytest.fixture
    def store(self, store_kwargs: dict[str, Any]) -> Any:
        return self.store_cls(**store_kwargs)  # type: ignore[attr-defined]

    @pytest.fixture
    def store_not_open(self, store_kwargs: dict[str, Any]) -> Any:
        return self.store_cls(**store_kwargs)  # type: ignore[attr-defined]


def _inner(store: Any) -> FsspecStore:
    return store._store if isinstance(store, JournaledStore) else store


class TestFsspecStoreOnEmulator(_OnEmulator, StoreTests[FsspecStore, cpu.Buffer]):
    """The reference: zarr's own store, as zarr tests it."""

    store_cls = FsspecStore

    @pytest.fixture
    def store_kwargs(self, prefix: str) -> dict[str, Any]:
        return {"fs": _async_fs(), "path": prefix}

    def test_store_repr(self, store: FsspecStore) -> None:
        assert str(store).startswith("<FsspecStore(GCSFileSystem, ")


class TestJournaledStore(_OnEmulator, StoreTests[JournaledStore, cpu.Buffer]):
    """cloudio's store passes what zarr's ``FsspecStore`` passes."""

    store_cls = JournaledStore

    @pytest.fixture
    def store_kwargs(self, prefix: str) -> dict[str, Any]:
        return {"store": FsspecStore(fs=_async_fs(), path=prefix), "root_url": f"gs://{prefix}"}

    @pytest.fixture
    def open_kwargs(self, store_kwargs: dict[str, Any]) -> dict[str, Any]:
        # WrapperStore.open(store_cls, *args, **kwargs): the wrapped store's class and arguments
        inner: FsspecStore = store_kwargs["store"]
        return {"store_cls": FsspecStore, "fs": inner.fs, "path": inner.path}

    def test_store_repr(self, store: JournaledStore) -> None:
        assert repr(store).startswith("JournaledStore('gs://")

    def test_open_derives_the_root_url(self, store_kwargs: dict[str, Any]) -> None:
        """``WrapperStore.open`` gives no root URL: it comes from the wrapped store."""
        from zarr.core.sync import sync

        inner: FsspecStore = store_kwargs["store"]
        opened = sync(JournaledStore.open(FsspecStore, fs=inner.fs, path=inner.path))
        assert opened.root_url == store_kwargs["root_url"]

    def test_sync_protocols_follow_the_wrapped_store(self, store: JournaledStore, tmp_path: Any) -> None:
        from zarr.abc.store import SupportsDeleteSync, SupportsSetSync
        from zarr.storage import LocalStore

        assert not isinstance(store, SupportsSetSync) and not isinstance(store, SupportsDeleteSync)
        local = JournaledStore(LocalStore(str(tmp_path)), str(tmp_path))
        assert isinstance(local, SupportsSetSync) == isinstance(LocalStore(str(tmp_path)), SupportsSetSync)
