"""cloudio.session: the level in force (nested, per thread, from the environment) and its counters."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import cloudio
from cloudio._journal import journal
from cloudio._session import count, current_consistency, process_stats, session
from cloudio.errors import ConfigurationError, InvalidURLError


@pytest.fixture(autouse=True)
def _no_env_level(monkeypatch):
    monkeypatch.delenv("CLOUDIO_CONSISTENCY", raising=False)


def test_default_is_session_level():
    assert current_consistency() == "session"
    assert session().consistency == "session"


def test_nesting_restores_the_outer_level():
    with cloudio.session("strong") as outer:
        assert current_consistency() == "strong"
        with session(2.5):
            assert current_consistency() == 2.5
            with session("session"):
                assert current_consistency() == "session"
            assert current_consistency() == 2.5
        assert current_consistency() == "strong"
        assert outer.consistency == "strong"
    assert current_consistency() == "session"


def test_an_exception_still_restores_the_level():
    with pytest.raises(RuntimeError):
        with session("strong"):
            raise RuntimeError("boom")
    assert current_consistency() == "session"


def test_threads_without_a_session_use_the_most_recent_one():
    seen: list[object] = []
    with session(30):
        with ThreadPoolExecutor(2) as pool:  # worker threads entered no session themselves
            seen.append(pool.submit(current_consistency).result())
            with session("strong"):
                seen.append(pool.submit(current_consistency).result())
            seen.append(pool.submit(current_consistency).result())
    with ThreadPoolExecutor(1) as pool:
        seen.append(pool.submit(current_consistency).result())
    assert seen == [30, "strong", 30, "session"]


def test_a_threads_own_session_wins_over_the_process_fallback():
    got: dict[str, object] = {}
    entered, release = threading.Event(), threading.Event()

    def worker() -> None:
        with session("strong"):
            entered.set()
            release.wait(5)
            got["worker"] = current_consistency()

    with session(10):
        t = threading.Thread(target=worker)
        t.start()
        entered.wait(5)
        got["main"] = current_consistency()  # the main thread's own session, not the newest one
        release.set()
        t.join()
    assert got == {"worker": "strong", "main": 10}


@pytest.mark.parametrize("bad", ["weak", "", None, -1, -0.5, True, [1], "STRONG", "5", 1j])
def test_bad_levels_raise_configuration_error(bad):
    with pytest.raises(ConfigurationError, match="consistency="):
        session(bad)


@pytest.mark.parametrize("bad", [float("nan"), np.float64("nan"), float("-inf"), -1e-9])
def test_nan_and_negative_bounds_are_refused_naming_the_value(bad):
    with pytest.raises(ConfigurationError) as e:
        session(bad)
    assert f"consistency={bad!r}" in str(e.value)
    assert "seconds >= 0" in str(e.value) and "'session'" in str(e.value) and "'strong'" in str(e.value)


def test_an_infinite_bound_is_the_session_level():
    """Cached state is never older than infinity: no revalidation at all, as at "session"."""
    assert session(float("inf")).consistency == "session"
    with session(np.float64("inf")):
        assert current_consistency() == "session"


@pytest.mark.parametrize(("value", "level"), [(0, 0), (2.5, 2.5), (np.float64(3.0), 3.0), (np.int64(7), 7.0)])
def test_numbers_of_any_real_type_are_bounds(value, level):
    got = session(value).consistency
    assert got == level and type(got) in (int, float)


@pytest.mark.parametrize(
    ("raw", "level"), [("strong", "strong"), ("session", "session"), ("5", 5.0), (" 0.5 ", 0.5), ("inf", "session")]
)
def test_environment_gives_the_default_level(monkeypatch, raw, level):
    monkeypatch.setenv("CLOUDIO_CONSISTENCY", raw)
    assert current_consistency() == level
    with session("session"):
        assert current_consistency() == "session"  # explicit wins over the environment


@pytest.mark.parametrize(("raw", "why"), [("sometimes", "not a level"), ("-3", ">= 0"), ("nan", ">= 0")])
def test_bad_environment_level_raises_configuration_error(monkeypatch, raw, why):
    monkeypatch.setenv("CLOUDIO_CONSISTENCY", raw)
    with pytest.raises(ConfigurationError, match="CLOUDIO_CONSISTENCY") as e:
        current_consistency()
    assert why in str(e.value)


def test_counters_go_to_every_open_session_and_the_process():
    base_uploads = process_stats.uploads
    with session() as outer:
        count("opens")
        with session("strong") as inner:
            count("uploads")
            count("bytes_uploaded", 100)
            count("invalidations", 2, cache="gdal")
            count("invalidations", cache="fsspec")
        count("revalidations")
    count("opens")  # after both closed: only the process counters move
    assert inner.stats.as_dict() == {
        "opens": 0, "uploads": 1, "bytes_uploaded": 100, "revalidations": 0,
        "invalidations": {"gdal": 2, "fsspec": 1},
    }
    assert outer.stats.as_dict() == {
        "opens": 1, "uploads": 1, "bytes_uploaded": 100, "revalidations": 1,
        "invalidations": {"gdal": 2, "fsspec": 1},
    }
    assert process_stats.uploads == base_uploads + 1
    assert "consistency='strong'" in repr(inner)


def test_counters_from_worker_threads_are_counted():
    with session() as s:
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda _: count("opens"), range(100)))
    assert s.stats.opens == 100


def test_invalidate_records_a_prefix_change_under_the_normalized_key():
    seq = journal().seq
    cloudio.invalidate("/vsigs/bkt-session-test/d/")
    cloudio.invalidate("https://storage.googleapis.com/bkt-session-test/d/a.tif")
    changes = [(c.url, c.kind, c.prefix) for c in journal().since(seq)]
    assert changes == [
        ("gs://bkt-session-test/d/", "invalidate", True),
        ("gs://bkt-session-test/d/a.tif", "invalidate", True),
    ]


def test_invalidate_rejects_bad_urls():
    seq = journal().seq
    with pytest.raises(InvalidURLError, match="s3://bkt/k"):
        cloudio.invalidate("s3://bkt/k")
    assert journal().since(seq) == []


def test_state_reset_returns_a_fresh_process(gcs_bucket: str) -> None:
    """``cloudio._state.reset()``: sessions closed, endpoint stack empty, journal and buckets forgotten."""
    import os

    from cloudio import _config, _state
    from cloudio._journal import journal

    url = f"{gcs_bucket}/a.tif"
    with cloudio.open(url, "w", driver="GTiff", width=4, height=4, count=1, dtype="uint8") as ds:
        ds.write(np.full((1, 4, 4), 7, dtype="uint8"))
    outer = session("strong").__enter__()
    _config.push_endpoint("http://127.0.0.1:1")  # nothing listens: reset must drop it
    assert current_consistency() == "strong" and len(journal()) > 0
    _state.reset()
    assert current_consistency() == "session"
    assert _config.emulator_endpoint() == _config._parse_endpoint(os.environ["STORAGE_EMULATOR_HOST"], "env")
    assert len(journal()) == 0
    with cloudio.open(url) as ds:  # path options are set again for the emulator in force
        assert ds.read(1).tolist() == [[7] * 4] * 4
    outer.__exit__(None, None, None)  # exiting a session reset closed is harmless
    assert current_consistency() == "session"


def test_strong_fsspec_info_counts_its_metadata_request_as_a_revalidation(gcs_emulator, gcs_bucket):
    """``revalidations`` counts the metadata requests the strong level makes: the fsspec face's too."""
    fs = cloudio.filesystem(gcs_bucket)
    url = f"{gcs_bucket}/d/a.bin"
    fs.pipe(url, b"a" * 10)
    n = len(gcs_emulator.requests())
    with cloudio.session("strong") as s:
        assert fs.info(url)["size"] == 10
    made = [r for r in gcs_emulator.requests()[n:] if gcs_bucket.removeprefix("gs://") in r.path]
    assert len(made) == 1, made  # the strong level's one metadata request
    assert s.stats.revalidations == len(made), s.stats.as_dict()


def test_a_listing_asked_again_at_the_strong_level_counts_as_a_revalidation(gcs_emulator, gcs_bucket):
    fs = cloudio.filesystem(gcs_bucket)
    fs.pipe(f"{gcs_bucket}/d/a.bin", b"a")
    assert fs.ls(f"{gcs_bucket}/d", detail=False) == [f"{gcs_bucket.removeprefix('gs://')}/d/a.bin"]  # cached
    n = len(gcs_emulator.requests())
    with cloudio.session("strong") as s:
        fs.ls(f"{gcs_bucket}/d")
    made = [r for r in gcs_emulator.requests()[n:] if gcs_bucket.removeprefix("gs://") in r.path]
    assert len(made) == 1, made
    assert s.stats.revalidations == 1, s.stats.as_dict()


def test_reentering_one_session_object_restores_the_level_when_left(monkeypatch, gcs_emulator, gcs_bucket):
    """A session object kept in a module and entered again by a helper (nested) must not leave its level
    in force once both blocks are left."""
    from rasters import put

    fs = cloudio.filesystem(gcs_bucket)
    url = f"{gcs_bucket}/d/a.bin"
    fs.pipe(url, b"a" * 10)
    fs.ls(f"{gcs_bucket}/d")  # a cached listing: 10 bytes
    monkeypatch.setenv("CLOUDIO_CONSISTENCY", "strong")  # the process wants to see other writers
    relaxed = cloudio.session("session")
    with relaxed:
        with relaxed:
            assert current_consistency() == "session"
        assert current_consistency() == "session"
        count("uploads")
        assert relaxed.stats.uploads == 1  # still counting after the inner block
    assert relaxed.stats.uploads == 1
    put(gcs_emulator, url, b"b" * 25)  # another writer
    assert fs.info(url)["size"] == 25  # the environment's level (strong) again: the server's size
    assert current_consistency() == "strong"


def test_a_session_entered_again_counts_each_upload_once(gcs_emulator, gcs_bucket) -> None:
    """One session object entered again inside its own block: an upload made in the inner block is one
    upload, not two."""
    s = cloudio.session()
    before = process_stats.uploads
    with s:
        with s:
            with cloudio.open(f"{gcs_bucket}/d/a.tif", "w", driver="GTiff", width=64, height=64, count=1,
                              dtype="uint8") as ds:
                ds.write(np.full((1, 64, 64), 1, "uint8"))
    assert process_stats.uploads - before == 1
    assert s.stats.uploads == 1, s.stats.as_dict()


def _made(emu, n: int, bucket: str) -> list[tuple[str, str]]:
    return [(r.method, r.path) for r in emu.requests()[n:] if bucket.removeprefix("gs://") in r.path]


@pytest.mark.parametrize("op", ["ls", "exists", "find"])
def test_strong_revalidations_count_the_requests_made(gcs_emulator, gcs_bucket, op: str) -> None:
    """Stats.revalidations: the metadata requests the strong level makes. With the bucket's root and
    ``d`` listed before (both held), one strong ls/exists/find sends one request and must count one."""
    fs = cloudio.filesystem(gcs_bucket)
    fs.pipe(f"{gcs_bucket}/d/a.bin", b"a")
    fs.pipe(f"{gcs_bucket}/d/e/b.bin", b"b")
    fs.ls(gcs_bucket)
    fs.ls(f"{gcs_bucket}/d")
    n = len(gcs_emulator.requests())
    with cloudio.session("strong") as s:
        if op == "ls":
            fs.ls(f"{gcs_bucket}/d")
        elif op == "exists":
            assert fs.exists(f"{gcs_bucket}/d/a.bin")
        else:
            assert len(fs.find(f"{gcs_bucket}/d")) == 2
    made = _made(gcs_emulator, n, gcs_bucket)
    assert len(made) == 1, made
    assert s.stats.revalidations == len(made), (s.stats.as_dict(), made)
