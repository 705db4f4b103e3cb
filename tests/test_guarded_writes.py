"""Guarded writes: ``if_generation_match=`` on every write face; a lost race is a ConflictError.

fake-gcs-server enforces ``ifGenerationMatch`` only on multipart uploads (it
ignores it on media and resumable uploads, and on deletes: probed against
the emulator this suite runs). cloudio sends guarded small writes as one
multipart request and checks the generation before a resumable one; each
test asserts from the emulator's own request log that the precondition
was sent, since real GCS enforces it on every path.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from google.cloud import storage
from outcomes import settled

import cloudio
from cloudio._journal import Change
from cloudio.emulator import Emulator, Request


def _blob(emulator: Emulator, url: str) -> storage.Blob:
    bucket, key = url.removeprefix("gs://").split("/", 1)
    blob = emulator.client.bucket(bucket).get_blob(key)
    assert blob is not None, url
    return blob


def _other_writer(emulator: Emulator, url: str, data: bytes) -> int:
    """Overwrite ``url`` with the plain google-cloud-storage client: another writer; its generation."""
    bucket, key = url.removeprefix("gs://").split("/", 1)
    blob = emulator.client.bucket(bucket).blob(key)
    blob.upload_from_string(data)
    return int(blob.generation)


class Log:
    """The emulator's requests for one bucket since the last :meth:`take`, once its log settled (a multipart
    upload names its object in the body, not in the path)."""

    def __init__(self, emulator: Emulator, bucket: str) -> None:
        self.emulator, self.bucket = emulator, bucket.removeprefix("gs://")
        self._seen = len(settled(emulator))

    def take(self) -> list[Request]:
        log = settled(self.emulator)
        new, self._seen = log[self._seen:], len(log)
        return [r for r in new if f"/b/{self.bucket}/" in r.path]


def _uploads(requests: list[Request]) -> list[Request]:
    return [r for r in requests if r.method in ("POST", "PUT") and "/upload/" in r.path]


def _write_tif(url: str, value: int, **kwargs: Any) -> None:
    with cloudio.open(url, "w", driver="GTiff", width=8, height=8, count=1, dtype="uint8", **kwargs) as ds:
        ds.write(np.full((1, 8, 8), value, dtype="uint8"))


def _pixel(url: str) -> int:
    with cloudio.open(url) as ds:
        return int(ds.read(1)[0, 0])


@pytest.fixture
def heard(journal_records: list[Change]) -> Iterator[list[Change]]:
    yield journal_records


# -- cloudio.open(url, "w", if_generation_match=...) -----------------------------------------


def test_open_w_guarded_by_the_generation_read_wins_then_loses(gcs_emulator: Emulator, gcs_bucket: str,
                                                                heard: list[Change]) -> None:
    url = f"{gcs_bucket}/guard/a.tif"
    _write_tif(url, 1)
    first = int(_blob(gcs_emulator, url).generation)
    log = Log(gcs_emulator, gcs_bucket)
    _write_tif(url, 2, if_generation_match=first)  # nobody else wrote: the guard holds
    ups = _uploads(log.take())
    assert [r.status for r in ups] == [200]
    assert f"ifGenerationMatch={first}" in ups[0].path and "uploadType=multipart" in ups[0].path
    assert _pixel(url) == 2
    second = int(_blob(gcs_emulator, url).generation)

    theirs = _other_writer(gcs_emulator, url, _blob(gcs_emulator, url).download_as_bytes())
    log.take()
    heard.clear()
    with pytest.raises(cloudio.ConflictError) as info:
        _write_tif(url, 3, if_generation_match=second)
    err = info.value
    assert (err.url, err.expected, err.actual) == (url, second, theirs)
    assert url in str(err) and str(second) in str(err) and str(theirs) in str(err)
    assert isinstance(err.__cause__, FileExistsError)  # gcsfs's 412
    assert [r for r in heard if r.url == url and r.kind != "read"] == []  # nothing journaled
    assert int(_blob(gcs_emulator, url).generation) == theirs
    ups = _uploads(log.take())
    assert [(r.status, f"ifGenerationMatch={second}" in r.path) for r in ups] == [(412, True)]


def test_open_w_if_generation_match_0_creates_only(gcs_emulator: Emulator, gcs_bucket: str) -> None:
    url = f"{gcs_bucket}/guard/new.tif"
    _write_tif(url, 5, if_generation_match=0)
    gen = int(_blob(gcs_emulator, url).generation)
    with pytest.raises(cloudio.ConflictError) as info:
        _write_tif(url, 6, if_generation_match=0)
    assert (info.value.expected, info.value.actual) == (0, gen)
    assert "does not exist" in str(info.value) or "generation 0" in str(info.value)
    assert _pixel(url) == 5


def test_open_w_guard_with_sidecars_uploads_nothing_on_conflict(gcs_emulator: Emulator, gcs_bucket: str) -> None:
    """A PNG with a georeference gets an .aux.xml sidecar: a lost race must not upload it either."""
    from affine import Affine

    url = f"{gcs_bucket}/guard/p.png"
    _other_writer(gcs_emulator, url, b"not yours")
    log = Log(gcs_emulator, gcs_bucket)
    with pytest.raises(cloudio.ConflictError):
        with cloudio.open(url, "w", driver="PNG", width=4, height=4, count=1, dtype="uint8", crs="EPSG:4326",
                          transform=Affine(1.0, 0.0, 0.0, 0.0, -1.0, 4.0), if_generation_match=0) as ds:
            ds.write(np.ones((1, 4, 4), dtype="uint8"))
    assert _uploads(log.take()) == []
    assert _blob(gcs_emulator, url).download_as_bytes() == b"not yours"
    assert not gcs_emulator.client.bucket(gcs_bucket[5:]).blob("guard/p.png.aux.xml").exists()


def test_open_w_rejects_a_non_generation(gcs_bucket: str) -> None:
    with pytest.raises(cloudio.ConfigurationError, match="if_generation_match"):
        _write_tif(f"{gcs_bucket}/guard/x.tif", 1, if_generation_match="latest")


# -- write_vrt --------------------------------------------------------------------------------


def test_write_vrt_guarded(gcs_emulator: Emulator, gcs_bucket: str, heard: list[Change]) -> None:
    src = f"{gcs_bucket}/guard/src.tif"
    _write_tif(src, 7)
    vrt = f"{gcs_bucket}/guard/v.vrt"
    log = Log(gcs_emulator, gcs_bucket)
    cloudio.write_vrt(src, vrt, if_generation_match=0)
    gen = int(_blob(gcs_emulator, vrt).generation)
    assert [("ifGenerationMatch=0" in r.path, r.status) for r in _uploads(log.take())] == [(True, 200)]
    theirs = _other_writer(gcs_emulator, vrt, b"<VRTDataset/>")
    log.take()
    heard.clear()
    with pytest.raises(cloudio.ConflictError) as info:
        cloudio.write_vrt(src, vrt, if_generation_match=gen)
    assert (info.value.expected, info.value.actual) == (gen, theirs)
    assert [r for r in heard if r.url == vrt and r.kind != "read"] == []
    assert _blob(gcs_emulator, vrt).download_as_bytes() == b"<VRTDataset/>"
    assert [(f"ifGenerationMatch={gen}" in r.path, r.status) for r in _uploads(log.take())] == [(True, 412)]


# -- cloudio.filesystem(...).pipe / put ---------------------------------------------------------


def test_filesystem_pipe_guarded(gcs_emulator: Emulator, gcs_bucket: str, heard: list[Change]) -> None:
    fs = cloudio.filesystem(gcs_bucket)
    url = f"{gcs_bucket}/guard/p.bin"
    path = url.removeprefix("gs://")
    log = Log(gcs_emulator, gcs_bucket)
    fs.pipe(path, b"one", if_generation_match=0)
    gen = int(fs.info(path)["generation"])
    fs.pipe(path, b"two", if_generation_match=gen)
    assert fs.cat(path) == b"two"
    theirs = _other_writer(gcs_emulator, url, b"theirs")
    heard.clear()
    ups = _uploads(log.take())[:-1]  # the other writer's upload is the last one
    with pytest.raises(cloudio.ConflictError) as info:
        fs.pipe(path, b"three", if_generation_match=gen)
    assert (info.value.url, info.value.expected, info.value.actual) == (url, gen, theirs)
    assert [r for r in heard if r.url == url and r.kind != "read"] == []
    assert fs.cat(path) == b"theirs"
    ups += _uploads(log.take())
    assert [r.status for r in ups] == [200, 200, 412]
    assert all("ifGenerationMatch=" in r.path and "uploadType=multipart" in r.path for r in ups)


def test_a_refused_guarded_write_asks_the_server_once(gcs_emulator: Emulator, gcs_bucket: str) -> None:
    """A 412 costs one metadata GET: its answer tells both whether an earlier try of this write stored the
    object and, when not, the generation the ConflictError names."""
    fs = cloudio.filesystem(gcs_bucket)
    url = f"{gcs_bucket}/guard/once.bin"
    path = url.removeprefix("gs://")
    fs.pipe(path, b"one", if_generation_match=0)
    theirs = _other_writer(gcs_emulator, url, b"theirs")
    log = Log(gcs_emulator, gcs_bucket)
    with pytest.raises(cloudio.ConflictError) as info:
        fs.pipe(path, b"two", if_generation_match=theirs - 1)
    assert info.value.actual == theirs
    asked = [r for r in log.take() if r.method == "GET" and "/o/guard%2Fonce.bin" in r.path]
    assert len(asked) == 1, [r.path for r in asked]


def test_filesystem_put_large_file_is_checked_first(gcs_emulator: Emulator, gcs_bucket: str, tmp_path: Path,
                                                     heard: list[Change]) -> None:
    """Above 8 MiB the upload is resumable, where the emulator ignores the precondition: checked first too."""
    local = tmp_path / "big.bin"
    local.write_bytes(os.urandom(9 * 2**20))
    fs = cloudio.filesystem(gcs_bucket)
    url = f"{gcs_bucket}/guard/big.bin"
    path = url.removeprefix("gs://")
    theirs = _other_writer(gcs_emulator, url, b"small")
    log = Log(gcs_emulator, gcs_bucket)
    heard.clear()
    with pytest.raises(cloudio.ConflictError) as info:
        fs.put(str(local), path, if_generation_match=0)
    assert (info.value.expected, info.value.actual) == (0, theirs)
    assert _uploads(log.take()) == []  # refused before a byte was sent
    assert [r for r in heard if r.url == url and r.kind != "read"] == []
    fs.put(str(local), path, if_generation_match=theirs)
    ups = _uploads(log.take())
    assert ups[0].method == "POST" and "uploadType=resumable" in ups[0].path
    assert f"ifGenerationMatch={theirs}" in ups[0].path
    assert fs.cat(path) == local.read_bytes()


# -- two writers, one generation: exactly one wins ---------------------------------------------


def _race_writer(barrier: Any, url: str, generation: int, payload: bytes, out: Any) -> None:
    import cloudio as c

    fs = c.filesystem(url)
    barrier.wait()
    try:
        fs.pipe(url.removeprefix("gs://"), payload, if_generation_match=generation)
        out.put(("won", payload))
    except c.ConflictError as e:
        out.put(("lost", e.actual))


def test_two_processes_racing_on_one_generation_one_wins(gcs_emulator: Emulator, gcs_bucket: str) -> None:
    ctx = multiprocessing.get_context("spawn")
    url = f"{gcs_bucket}/guard/race.bin"
    fs = cloudio.filesystem(gcs_bucket)
    fs.pipe(url.removeprefix("gs://"), b"start")
    for round_ in range(4):
        gen = int(_blob(gcs_emulator, url).generation)
        barrier, out = ctx.Barrier(2), ctx.Queue()
        procs = [ctx.Process(target=_race_writer, args=(barrier, url, gen, f"{round_}-{i}".encode(), out))
                 for i in range(2)]
        for p in procs:
            p.start()
        results = [out.get(timeout=120) for _ in procs]
        for p in procs:
            p.join(timeout=60)
            assert p.exitcode == 0
        won = [r[1] for r in results if r[0] == "won"]
        lost = [r[1] for r in results if r[0] == "lost"]
        assert len(won) == 1 and len(lost) == 1, results
        stored = _blob(gcs_emulator, url)
        assert stored.download_as_bytes() == won[0]  # no lost update: the winner's bytes are what is stored
        assert lost[0] == int(stored.generation)
