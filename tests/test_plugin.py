"""The pytest plugin as a user meets it: a test file of their own, no conftest.

The user's file is written outside the repository and run by a separate
``python -m pytest`` with that folder as its working directory, so neither
this repository's conftest nor its pyproject settings apply: only the
``pytest11`` entry point brings the fixtures in.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cloudio.emulator import Emulator

# The user's test file: it imports cloudio and nothing of this repository.
_USER_TESTS = textwrap.dedent(
    '''
    import json
    import os
    from pathlib import Path

    import cloudio  # noqa: F401  (what a user's file would import)
    import gcsfs  # imported at the top, before any fixture runs


    def _children_named(name):
        """Processes whose parent is this one and whose command is ``name``."""
        out = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                text = stat.read_text()
            except OSError:
                continue
            comm = text[text.index("(") + 1 : text.rindex(")")]
            ppid = int(text[text.rindex(")") + 2 :].split()[1])
            if ppid == os.getpid() and name in comm:
                out.append(int(stat.parent.name))
        return out


    def _record(name, **info):
        Path(f"result-{name}.json").write_text(json.dumps(info))


    def test_first(gcs_emulator, gcs_bucket):
        assert gcs_bucket.startswith("gs://")
        bucket = gcs_bucket[len("gs://"):]
        client = gcs_emulator.client
        assert list(client.list_blobs(bucket)) == []
        client.bucket(bucket).blob("hello.txt").upload_from_string(b"hi")
        assert client.bucket(bucket).blob("hello.txt").download_as_bytes() == b"hi"
        assert os.environ["STORAGE_EMULATOR_HOST"] == gcs_emulator.url
        _record("first", mode=gcs_emulator.mode, url=gcs_emulator.url, pid=gcs_emulator.pid,
                bucket=gcs_bucket, servers=_children_named("fake-gcs"))


    def test_second(gcs_emulator, gcs_bucket):
        bucket = gcs_bucket[len("gs://"):]
        assert list(gcs_emulator.client.list_blobs(bucket)) == []  # fresh, empty
        _record("second", url=gcs_emulator.url, bucket=gcs_bucket)


    def test_gcsfs_imported_at_the_top_works(gcs_emulator, gcs_bucket):
        # the plain class: no gRPC bucket-layout lookup (60 s per bucket against an emulator)
        assert gcsfs.GCSFileSystem is gcsfs.core.GCSFileSystem
        fs = gcsfs.GCSFileSystem(endpoint_url=gcs_emulator.url, token="anon")
        fs.pipe(f"{gcs_bucket}/a.txt", b"abc")
        assert fs.cat(f"{gcs_bucket}/a.txt") == b"abc"
    '''
)


def _run_user_tests(folder: Path, env_updates: dict[str, str | None]) -> subprocess.CompletedProcess[str]:
    (folder / "test_user.py").write_text(_USER_TESTS)
    env = dict(os.environ)
    # as a fresh shell would have it (the outer session's plugin set some of these)
    for key in ("STORAGE_EMULATOR_HOST", "CLOUDIO_EMULATOR", "PYTEST_ADDOPTS", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"):
        env.pop(key, None)
    for key, value in env_updates.items():
        if value is not None:
            env[key] = value
    # keep finding the cloudio under test when it comes from a relative PYTHONPATH (e.g. PYTHONPATH=src)
    if env.get("PYTHONPATH"):
        env["PYTHONPATH"] = os.pathsep.join(os.path.abspath(p) for p in env["PYTHONPATH"].split(os.pathsep) if p)
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_user.py"],
        cwd=folder, env=env, capture_output=True, text=True, timeout=240,
    )


def _results(folder: Path) -> tuple[dict[str, object], dict[str, object]]:
    first = json.loads((folder / "result-first.json").read_text())
    second = json.loads((folder / "result-second.json").read_text())
    return first, second


def _process_gone(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def test_plugin_is_registered_through_pytest11() -> None:
    eps = [ep for ep in importlib.metadata.entry_points(group="pytest11") if ep.name == "cloudio.pytest_plugin"]
    assert eps and {ep.value for ep in eps} == {"cloudio.pytest_plugin"}


_linux = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process table in /proc")


@_linux
def test_user_file_outside_repo_starts_its_own_emulator(tmp_path: Path) -> None:
    proc = _run_user_tests(tmp_path, {})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "3 passed" in proc.stdout, proc.stdout
    first, second = _results(tmp_path)
    assert first["mode"] == "binary"
    assert first["url"] == second["url"]  # one emulator for the whole session
    assert first["bucket"] != second["bucket"]  # a fresh bucket per test
    pid = first["pid"]
    assert isinstance(pid, int) and first["servers"] == [pid]
    assert _process_gone(pid)  # the session ended: its server is gone


@_linux
def test_user_file_attaches_to_storage_emulator_host(tmp_path: Path, gcs_emulator: Emulator) -> None:
    proc = _run_user_tests(tmp_path, {"STORAGE_EMULATOR_HOST": gcs_emulator.url})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "3 passed" in proc.stdout, proc.stdout
    first, second = _results(tmp_path)
    assert first["mode"] == "external"
    assert first["url"] == second["url"] == gcs_emulator.url
    assert first["pid"] is None and first["servers"] == []  # no server process started
    # the buckets were made on the emulator this process runs, and it still runs
    bucket = str(first["bucket"])[len("gs://"):]
    assert gcs_emulator.client.bucket(bucket).blob("hello.txt").download_as_bytes() == b"hi"


def test_gcs_emulator_sets_storage_emulator_host(gcs_emulator: Emulator) -> None:
    assert os.environ["STORAGE_EMULATOR_HOST"] == gcs_emulator.url
    assert os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] == "false"
    assert gcs_emulator.running


_seen_buckets: list[str] = []


@pytest.mark.parametrize("round_", [1, 2, 3])
def test_gcs_bucket_is_fresh_and_empty(gcs_emulator: Emulator, gcs_bucket: str, round_: int) -> None:
    name = gcs_bucket.removeprefix("gs://")
    assert gcs_bucket == f"gs://{name}"
    assert name not in _seen_buckets
    bucket = gcs_emulator.client.get_bucket(name)  # it exists
    assert list(gcs_emulator.client.list_blobs(name)) == []  # and holds nothing
    bucket.blob(f"left-behind-{round_}").upload_from_string(b"x")  # the next test must not see this
    _seen_buckets.append(name)


# -- what the plugin does to a run, with pytester (a fresh pytest process in a folder of its own) --

_HNS = "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"


@pytest.fixture
def fresh_shell(monkeypatch: pytest.MonkeyPatch) -> None:
    """The environment of a fresh shell: nothing this session's plugin or emulator set."""
    for key in ("STORAGE_EMULATOR_HOST", "CLOUDIO_EMULATOR", _HNS):
        monkeypatch.delenv(key, raising=False)


def test_a_project_using_no_fixture_sees_no_environment_change(pytester: pytest.Pytester, fresh_shell: None) -> None:
    pytester.makeconftest(f"import os\nassert {_HNS!r} not in os.environ\n")
    pytester.makepyfile(test_plain=f"""
        import os

        import cloudio  # installed, imported, but no emulator fixture used

        assert {_HNS!r} not in os.environ


        def test_environment_untouched():
            assert {_HNS!r} not in os.environ
            assert "STORAGE_EMULATOR_HOST" not in os.environ
    """)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)


def test_opting_in_sets_the_variable_before_conftests_import_gcsfs(
    pytester: pytest.Pytester, fresh_shell: None
) -> None:
    pytester.makeini("[pytest]\ncloudio_emulator = true\n")
    pytester.makeconftest(f"import os\nassert os.environ[{_HNS!r}] == 'false'\nimport gcsfs\n")
    pytester.makepyfile(test_opted_in="""
        import gcsfs


        def test_gcsfs_from_the_conftest_works(gcs_emulator, gcs_bucket):
            assert gcsfs.GCSFileSystem is gcsfs.core.GCSFileSystem  # no gRPC bucket lookup
            fs = gcsfs.GCSFileSystem(endpoint_url=gcs_emulator.url, token="anon")
            fs.pipe(f"{gcs_bucket}/a.txt", b"abc")
            assert fs.cat(f"{gcs_bucket}/a.txt") == b"abc"
    """)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)


def test_gcsfs_imported_too_early_is_named_with_the_fix(pytester: pytest.Pytester, fresh_shell: None) -> None:
    pytester.makeconftest("import gcsfs  # before any fixture, without the ini option\n")
    pytester.makepyfile(test_late="""
        def test_uses_the_emulator(gcs_emulator):
            assert gcs_emulator.running
    """)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, warnings=1)
    result.stdout.fnmatch_lines(["*PytestConfigWarning: gcsfs was imported before*cloudio_emulator = true*"])


@_linux
def test_options_fixture_and_factory(pytester: pytest.Pytester, fresh_shell: None, tmp_path: Path) -> None:
    root = tmp_path / "gcs-data"
    pytester.makeconftest(f"""
        import pytest


        @pytest.fixture(scope="session")
        def gcs_emulator_options():
            return {{"mode": "binary", "backend": "filesystem", "root": {str(root)!r}}}
    """)
    pytester.makepyfile(test_factory=f"""
        import json
        from pathlib import Path


        def test_the_session_emulator_follows_the_options(gcs_emulator, gcs_bucket):
            bucket = gcs_bucket.removeprefix("gs://")
            gcs_emulator.client.bucket(bucket).blob("d/a.bin").upload_from_string(b"kept")
            assert (Path({str(root)!r}) / bucket / "d" / "a.bin").read_bytes() == b"kept"


        def test_the_factory_starts_more(gcs_emulator, gcs_emulator_factory):
            extra = [gcs_emulator_factory(mode="binary") for _ in range(2)]
            assert len({{gcs_emulator.url, *(e.url for e in extra)}}) == 3
            assert extra[0].create_bucket("other") == "gs://other"
            assert [b.name for b in gcs_emulator.client.list_buckets()].count("other") == 0
            Path("pids.json").write_text(json.dumps([gcs_emulator.pid, *(e.pid for e in extra)]))
    """)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)
    pids = json.loads((pytester.path / "pids.json").read_text())
    assert len(pids) == 3 and all(isinstance(p, int) for p in pids)
    assert all(_process_gone(p) for p in pids)  # all stopped when the session ended


def test_factory_without_keywords_returns_a_further_emulator(pytester: pytest.Pytester, fresh_shell: None) -> None:
    """docs/emulator.md: 'a callable taking Emulator's keywords and returning a further running emulator'."""
    pytester.makepyfile(test_factory_default="""
        def test_a_second_emulator_is_separate(gcs_emulator, gcs_emulator_factory):
            other = gcs_emulator_factory()
            assert other.url != gcs_emulator.url, (other.mode, other.url)
            other.create_bucket("only-on-the-other")
            assert "only-on-the-other" not in [b.name for b in gcs_emulator.client.list_buckets()]
    """)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
