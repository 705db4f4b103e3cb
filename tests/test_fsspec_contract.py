"""fsspec's own abstract test suite against ``cloudio.filesystem()`` and plain gcsfs, on the emulator.

The same fsspec tests run twice: once on a plain ``gcsfs.GCSFileSystem`` (the
baseline: what gcsfs itself does on this emulator) and once on the tracked
filesystem. A failure of both is a gcsfs limitation (xfailed, strict, with the
reason); a failure of the tracked one alone is a cloudio bug.
"""

from __future__ import annotations

import posixpath
from typing import Any

import pytest
from fsspec.tests.abstract import AbstractFixtures
from fsspec.tests.abstract.copy import AbstractCopyTests
from fsspec.tests.abstract.get import AbstractGetTests
from fsspec.tests.abstract.open import AbstractOpenTests
from fsspec.tests.abstract.pipe import AbstractPipeTests
from fsspec.tests.abstract.put import AbstractPutTests

import cloudio
from cloudio._config import prepare_gcsfs_import


class _Fixtures(AbstractFixtures):
    @pytest.fixture
    def fs_join(self) -> Any:
        return posixpath.join

    @pytest.fixture
    def supports_empty_directories(self) -> bool:
        return False  # GCS has no directories, only prefixes of objects

    @pytest.fixture
    def fs_path(self, gcs_bucket: str) -> str:
        return gcs_bucket[len("gs://"):]


class _Plain(_Fixtures):
    @pytest.fixture
    def fs(self, gcs_emulator: Any) -> Any:
        prepare_gcsfs_import()
        import gcsfs

        fs = gcsfs.GCSFileSystem(endpoint_url=gcs_emulator.url, token="anon")
        fs.invalidate_cache()
        return fs


class _Tracked(_Fixtures):
    @pytest.fixture
    def fs(self, gcs_emulator: Any) -> Any:
        fs = cloudio.filesystem("gs://")
        fs.invalidate_cache()
        return fs


class TestPlainCopy(_Plain, AbstractCopyTests):
    pass


class TestPlainGet(_Plain, AbstractGetTests):
    pass


class TestPlainPut(_Plain, AbstractPutTests):
    pass


#: gcsfs opens "xb" without asking the server; the object's existence is only checked
#: (ifGenerationMatch=0) when the upload completes, so open() itself never raises
_EXCLUSIVE = pytest.mark.xfail(
    strict=True, raises=pytest.fail.Exception,
    reason="gcsfs limitation: open(path, 'xb') of an existing object does not raise FileExistsError "
    "at open (plain gcsfs fails the same way on the same emulator)",
)


class TestPlainOpen(_Plain, AbstractOpenTests):
    @_EXCLUSIVE
    def test_open_exclusive(self, fs: Any, fs_target: str) -> None:
        super().test_open_exclusive(fs, fs_target)


class TestPlainPipe(_Plain, AbstractPipeTests):
    pass


class TestTrackedCopy(_Tracked, AbstractCopyTests):
    pass


class TestTrackedGet(_Tracked, AbstractGetTests):
    pass


class TestTrackedPut(_Tracked, AbstractPutTests):
    pass


class TestTrackedOpen(_Tracked, AbstractOpenTests):
    @_EXCLUSIVE
    def test_open_exclusive(self, fs: Any, fs_target: str) -> None:
        super().test_open_exclusive(fs, fs_target)


class TestTrackedPipe(_Tracked, AbstractPipeTests):
    pass
