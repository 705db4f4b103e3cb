"""Verified uploads (cloudio._gcs.transfer) against the real emulator.

Faults are injected by a small HTTP proxy in front of the real emulator
(answer 503 once, flip a byte of the uploaded body, refuse with 403); the
emulator itself is never bypassed or mocked.
"""

from __future__ import annotations

import base64
import os
import uuid

import google_crc32c
import pytest
from faultproxy import FaultProxy

import cloudio
from cloudio._gcs.transfer import download, upload
from cloudio._journal import journal
from cloudio._paths import parse_gcs
from cloudio.emulator import Emulator

_UPLOAD = r"^/upload/"


def _uploads(proxy: FaultProxy) -> list[object]:
    """Statuses of the upload requests that reached the proxy, in order."""
    return [status for _, _, status in proxy.requests(_UPLOAD)]


def _crc(data: bytes) -> str:
    return base64.b64encode(google_crc32c.value(data).to_bytes(4, "big")).decode()


def _stored(emu: Emulator, url: str) -> bytes | None:
    p = parse_gcs(url)
    blob = emu.client.bucket(p.bucket).get_blob(p.key)
    return None if blob is None else blob.download_as_bytes()


def _server_meta(emu: Emulator, url: str) -> dict[str, object] | None:
    p = parse_gcs(url)
    blob = emu.client.bucket(p.bucket).get_blob(p.key)
    if blob is None:
        return None
    return {"size": blob.size, "crc32c": blob.crc32c, "generation": blob.generation}


def _records(url: str, since: int) -> list[object]:
    return [c for c in journal().since(since) if c.url == url]


def test_upload_bytes_verified_and_journaled(gcs_emulator: Emulator, gcs_bucket: str) -> None:
    url = f"{gcs_bucket}/d/a.bin"
    data = os.urandom(10_000)
    seq = journal().seq
    with cloudio.session() as s:
        up = upload(data, url)
    meta = _server_meta(gcs_emulator, url)
    assert _stored(gcs_emulator, url) == data
    assert meta == {"size": len(data), "crc32c": _crc(data), "generation": up.generation}
    assert up.crc32c == _crc(data) and up.size == len(data)
    [rec] = _records(url, seq)
    assert (rec.kind, rec.generation, rec.size) == ("write", up.generation, len(data))
    assert (s.stats.uploads, s.stats.bytes_uploaded) == (1, len(data))


def test_upload_file_resumable_in_chunks(gcs_emulator: Emulator, gcs_bucket: str, tmp_path) -> None:
    data = os.urandom(700_000)  # three 256 KiB chunks
    local = tmp_path / "big.bin"
    local.write_bytes(data)
    url = f"{gcs_bucket}/d/big.bin"
    n0 = len(gcs_emulator.requests())
    up = upload(local, url, chunk_size=256 * 1024, simple_limit=256 * 1024)
    reqs = gcs_emulator.requests()[n0:]
    assert _stored(gcs_emulator, url) == data
    assert _server_meta(gcs_emulator, url)["crc32c"] == _crc(data) == up.crc32c
    # one resumable session: the initiating POST plus one request per chunk
    uploads = [r for r in reqs if r.path.startswith("/upload/")]
    assert len(uploads) == 1 + 3


def test_upload_empty_object(gcs_emulator: Emulator, gcs_bucket: str) -> None:
    url = f"{gcs_bucket}/empty"
    up = upload(b"", url)
    assert _stored(gcs_emulator, url) == b"" and up.size == 0


def test_transient_503_is_retried(gcs_emulator: Emulator, gcs_bucket: str, fault_proxy: FaultProxy) -> None:
    url = f"{gcs_bucket}/d/retry.bin"
    data = os.urandom(5000)
    seq = journal().seq
    fault_proxy.add("status", code=503, path=_UPLOAD)
    up = upload(data, url)
    assert _uploads(fault_proxy) == [503, 200]
    assert _stored(gcs_emulator, url) == data
    assert [c.generation for c in _records(url, seq)] == [up.generation]


def test_corrupted_once_is_retried(gcs_emulator: Emulator, gcs_bucket: str, fault_proxy: FaultProxy) -> None:
    url = f"{gcs_bucket}/d/flip.bin"
    data = os.urandom(5000)
    seq = journal().seq
    fault_proxy.add("flip", where="request", path=_UPLOAD)
    up = upload(data, url)
    assert _uploads(fault_proxy) == [200, 200]  # the emulator took the corrupt body; cloudio sent it again
    assert _stored(gcs_emulator, url) == data
    assert [c.generation for c in _records(url, seq)] == [up.generation]


def test_corrupted_upload_raises_integrity_error_and_leaves_nothing(
    gcs_emulator: Emulator, gcs_bucket: str, fault_proxy: FaultProxy
) -> None:
    url = f"{gcs_bucket}/d/bad.bin"
    seq = journal().seq
    fault_proxy.add("flip", where="request", path=_UPLOAD, times=None)
    with pytest.raises(cloudio.IntegrityError) as ei:
        upload(os.urandom(5000), url, attempts=2)
    assert url in str(ei.value) and "CRC32C" in str(ei.value)
    assert _uploads(fault_proxy) == [200, 200]
    assert _stored(gcs_emulator, url) is None
    assert [c.kind for c in _records(url, seq)] == ["delete"]  # the journal says what the server holds


def test_a_try_after_a_corrupt_one_that_landed_unanswered_is_a_write_not_a_delete(
    gcs_emulator: Emulator, gcs_bucket: str, fault_proxy: FaultProxy
) -> None:
    """The first try is stored corrupt and deleted; the second lands, and its answer and every retry's
    are lost. The server holds what was sent: the upload succeeded, and the journal says "write" (it
    said "delete", and the error "nothing is stored there now")."""
    url = f"{gcs_bucket}/d/flip-then-lost.bin"
    data = os.urandom(5000)
    seq = journal().seq
    fault_proxy.add("flip", where="request", path=_UPLOAD)
    fault_proxy.add("reset", path=_UPLOAD)  # forwarded (it lands), its answer cut
    fault_proxy.add("status", code=503, path=_UPLOAD, times=None)
    up = upload(data, url)
    assert _uploads(fault_proxy)[:3] == [200, "reset", 503]
    assert _stored(gcs_emulator, url) == data
    assert [(c.kind, c.generation) for c in _records(url, seq)] == [("write", up.generation)]


def test_a_try_after_a_corrupt_one_that_failed_transiently_may_have_landed_and_says_so(
    gcs_emulator: Emulator, gcs_bucket: str, fault_proxy: FaultProxy
) -> None:
    """The first try is stored corrupt and deleted; the later ones fail transiently (503), an outcome
    cloudio counts as not known (as for any upload: a request given up may land late), and the server,
    asked, holds nothing yet. The previous object is gone and the new one may still land: the journal says
    "invalidate" and the error says both (it said "delete", "nothing is stored there now")."""
    url = f"{gcs_bucket}/d/flip-then-unknown.bin"
    seq = journal().seq
    fault_proxy.add("flip", where="request", path=_UPLOAD)
    fault_proxy.add("status", code=503, path=_UPLOAD, times=None)
    with pytest.raises(cloudio.TransientError) as ei:
        upload(os.urandom(5000), url)
    assert _stored(gcs_emulator, url) is None
    assert f"THE PREVIOUS OBJECT AT {url} IS GONE" in str(ei.value) and "may now hold" in str(ei.value)
    assert "nothing is stored there now" not in str(ei.value)
    assert [c.kind for c in _records(url, seq)] == ["invalidate"]


def test_a_conflict_after_a_corrupt_copy_was_deleted_is_not_journaled_as_a_delete(
    gcs_emulator: Emulator, gcs_bucket: str, fault_proxy: FaultProxy
) -> None:
    """A create-only upload (``if_generation_match=0``): the first try is stored corrupt and deleted;
    before the second arrives, another writer creates the object, and the second is refused (412). The
    server holds the other writer's object: the journal says "invalidate" (it said "delete"), and the error
    what became of the previous object (it said "Nothing was uploaded or journaled")."""
    import threading
    import time

    url = f"{gcs_bucket}/d/flip-then-conflict.bin"
    seq = journal().seq
    fault_proxy.add("flip", where="request", path=_UPLOAD)
    release = threading.Event()
    held = fault_proxy.add("delay", path=_UPLOAD, release=release, seconds=30)

    def other_writer() -> None:
        deadline = time.monotonic() + 30
        while not held.hits and time.monotonic() < deadline:
            time.sleep(0.01)
        p = parse_gcs(url)
        gcs_emulator.client.bucket(p.bucket).blob(p.key).upload_from_string(b"the other writer's")
        release.set()

    writer = threading.Thread(target=other_writer)
    writer.start()
    with pytest.raises(cloudio.ConflictError) as ei:
        upload(os.urandom(5000), url, if_generation_match=0)
    writer.join()
    assert url in str(ei.value) and "corrupt copy, which was deleted" in str(ei.value)
    assert "Nothing was uploaded" not in str(ei.value)
    assert _stored(gcs_emulator, url) == b"the other writer's"
    assert [c.kind for c in _records(url, seq)] == ["invalidate"]


def test_uploads_that_all_stored_corrupt_copies_leave_nothing_and_say_so(
    gcs_emulator: Emulator, gcs_bucket: str, fault_proxy: FaultProxy
) -> None:
    """Every try is stored corrupt and deleted: nothing is stored, the error says the previous object is
    gone, and the journal says "delete"."""
    url = f"{gcs_bucket}/d/flip-every-time.bin"
    seq = journal().seq
    fault_proxy.add("flip", where="request", path=_UPLOAD, times=None)
    with pytest.raises(cloudio.IntegrityError) as ei:
        upload(os.urandom(5000), url)
    assert _stored(gcs_emulator, url) is None
    assert "IS GONE" in str(ei.value) and "nothing is stored there now" in str(ei.value)
    assert [c.kind for c in _records(url, seq)] == ["delete"]


@pytest.mark.parametrize("size", [5000, 300 * 1024], ids=["one request", "resumable"])
def test_a_local_file_removed_after_its_upload_landed_unanswered_is_a_success(
    gcs_emulator: Emulator, gcs_bucket: str, fault_proxy: FaultProxy, tmp_path, size: int, quick_retries: None,
    monkeypatch: pytest.MonkeyPatch
) -> None:
    """The upload of a local file lands, its answer and every retry's are lost, and the file is removed
    meanwhile (a temporary file cleaned up): the server, asked, holds exactly the bytes the landed try
    read, so the upload succeeded and is journaled as a write. (It was a plain FileNotFoundError from
    summing the file again; then TransientError and "invalidate", as the file could not be summed.)"""
    import threading

    import cloudio._gcs.fast
    import cloudio._gcs.transfer

    for module in (cloudio._gcs.fast, cloudio._gcs.transfer):  # every retry is refused: no need to wait
        monkeypatch.setattr(module, "BACKOFF", 0.01)
    url = f"{gcs_bucket}/d/removed.bin"
    local = tmp_path / "removed.bin"
    data = os.urandom(size)
    local.write_bytes(data)
    seq = journal().seq
    where = "upload_id=" if size >= 256 * 1024 else _UPLOAD  # the resumable's last chunk, or the one request
    cut = fault_proxy.add("reset", path=where)  # forwarded (it lands), its answer cut
    resumable = size >= 256 * 1024
    fault_proxy.add("status", code=503, path="/upload/", times=None, skip=int(resumable))  # every retry (after
    # the resumable session's start)
    remover = threading.Thread(target=lambda: cut.answered.wait(30) and local.unlink())
    remover.start()
    up = upload(local, url, simple_limit=256 * 1024, chunk_size=512 * 1024)
    remover.join()
    assert not local.exists() and _stored(gcs_emulator, url) == data
    assert up.size == size and up.generation == _server_meta(gcs_emulator, url)["generation"]
    assert [(c.kind, c.generation) for c in _records(url, seq)] == [("write", up.generation)]


def test_a_corrupt_copy_kept_after_an_earlier_one_was_deleted_is_reported_corrupt(
    gcs_emulator: Emulator, gcs_bucket: str, fault_proxy: FaultProxy
) -> None:
    """Every try is stored corrupt; the first copy is deleted, deleting the second fails. The server holds
    corrupt bytes: IntegrityError says so, and the journal says "invalidate" (it said "delete", and the
    error "nothing is stored there now")."""
    url = f"{gcs_bucket}/d/flip-kept.bin"
    data = os.urandom(5000)
    seq = journal().seq
    fault_proxy.add("flip", where="request", path=_UPLOAD, times=None)
    fault_proxy.add("status", code=403, method="DELETE", skip=1, times=None)
    with pytest.raises(cloudio.IntegrityError) as ei:
        upload(data, url)
    held = _stored(gcs_emulator, url)
    assert held is not None and held != data and len(held) == len(data)
    assert "IS CORRUPT" in str(ei.value) and url in str(ei.value) and "GONE" not in str(ei.value)
    assert [c.kind for c in _records(url, seq)] == ["invalidate"]


def test_refused_upload_raises_upload_error(gcs_emulator: Emulator, gcs_bucket: str, fault_proxy: FaultProxy) -> None:
    url = f"{gcs_bucket}/d/refused.bin"
    seq = journal().seq
    fault_proxy.add("status", code=403, path=_UPLOAD, times=None)
    with pytest.raises(cloudio.UploadError) as ei:
        upload(b"x" * 100, url)
    assert url in str(ei.value) and "Nothing was journaled" in str(ei.value)
    assert _uploads(fault_proxy) == [403]  # not retried: a refusal is not transient
    assert _stored(gcs_emulator, url) is None
    assert _records(url, seq) == []


def test_missing_bucket(gcs_emulator: Emulator) -> None:
    url = f"gs://no-such-{uuid.uuid4().hex[:12]}/a.bin"
    with pytest.raises(cloudio.BucketNotFoundError) as ei:
        upload(b"abc", url)
    assert url in str(ei.value) and "create" in str(ei.value).lower()
    assert isinstance(ei.value, FileNotFoundError)


def test_bad_url(gcs_emulator: Emulator) -> None:
    for bad in ("gs://Bad_Bucket/a.bin", "gs://bucket-only", "s3://b/a.bin"):
        with pytest.raises(cloudio.InvalidURLError) as ei:
            upload(b"abc", bad)
        assert bad in str(ei.value)


def test_download_is_fresh_after_overwrite_elsewhere(gcs_emulator: Emulator, gcs_bucket: str, tmp_path) -> None:
    url = f"{gcs_bucket}/d/a.bin"
    upload(b"a" * 10, url)
    from cloudio._gcs.client import gcs_filesystem

    fs = gcs_filesystem()
    fs.ls(url[5:].rsplit("/", 1)[0])  # gcsfs now caches the 10-byte size
    p = parse_gcs(url)
    gcs_emulator.client.bucket(p.bucket).blob(p.key).upload_from_string(b"b" * 100)  # behind cloudio's back
    meta = download(url, tmp_path / "x")
    assert (tmp_path / "x").read_bytes() == b"b" * 100
    assert int(meta["size"]) == 100


def test_download_missing_object(gcs_emulator: Emulator, gcs_bucket: str, tmp_path) -> None:
    url = f"{gcs_bucket}/nope.bin"
    with pytest.raises(cloudio.ObjectNotFoundError) as ei:
        download(url, tmp_path / "x")
    assert url in str(ei.value)
    assert not isinstance(ei.value, cloudio.BucketNotFoundError)


# -- the same faults through cloudio.open(url, "w") -----------------------------------------------

def _profile(driver: str) -> dict[str, object]:
    from affine import Affine

    return dict(driver=driver, width=16, height=16, count=1, dtype="uint8", crs="EPSG:4326",
                transform=Affine(0.1, 0, 10, 0, -0.1, 50))


def test_corrupted_raster_write_raises_at_close_and_leaves_nothing(
    gcs_emulator: Emulator, gcs_bucket: str, fault_proxy: FaultProxy
) -> None:
    import numpy as np

    url = f"{gcs_bucket}/d/r.tif"
    seq = journal().seq
    fault_proxy.add("flip", where="request", path=_UPLOAD, times=None)
    with pytest.raises(cloudio.IntegrityError, match=url):
        with cloudio.open(url, "w", **_profile("GTiff")) as ds:
            ds.write(np.ones((1, 16, 16), "uint8"))
            local = ds.files[0]
    assert ds.closed and not os.path.exists(os.path.dirname(local))
    assert len(_uploads(fault_proxy)) == 3  # ATTEMPTS
    assert _stored(gcs_emulator, url) is None
    assert [c.kind for c in _records(url, seq)] == ["delete"]


def test_failed_sidecar_upload_removes_the_object_it_followed(
    gcs_emulator: Emulator, gcs_bucket: str, fault_proxy: FaultProxy
) -> None:
    """The object goes up first (a failed upload of it leaves the old dataset whole: tests/test_gdal_edges.py);
    its sidecar's refused upload then takes the object down again, journaled, and the error says so."""
    import numpy as np

    url = f"{gcs_bucket}/d/p.png"
    seq = journal().seq
    fault_proxy.add("status", code=403, path=_UPLOAD, skip=1)  # the PNG goes through, its .aux.xml is refused
    with pytest.raises(cloudio.UploadError, match=r"(?s)p\.png.*sidecar.*p\.png\.aux\.xml.*deleted again"):
        with cloudio.open(url, "w", **_profile("PNG")) as ds:
            ds.write(np.ones((1, 16, 16), "uint8"))
    assert _stored(gcs_emulator, url) is None
    assert _stored(gcs_emulator, url + ".aux.xml") is None
    assert [c.kind for c in _records(url, seq)] == ["write", "delete"]
    assert _records(url + ".aux.xml", seq) == []


def test_missing_local_file(gcs_emulator: Emulator, gcs_bucket: str, tmp_path) -> None:
    """Every way of uploading a local file that is not there raises LocalFileNotFoundError, a
    FileNotFoundError naming the file and the URL, the OS's error as its cause; nothing is sent or
    journaled. (It was a plain FileNotFoundError, and from a filesystem's put, the OS's bare message.)"""
    url, seq = f"{gcs_bucket}/x.bin", journal().seq
    missing = tmp_path / "nope.bin"
    fs = cloudio.filesystem(url)
    for put in (lambda: upload(missing, url), lambda: upload(str(tmp_path), url),
                lambda: fs.put(str(missing), url), lambda: fs.put_file(str(missing), url, metadata={"a": "b"})):
        with pytest.raises(cloudio.LocalFileNotFoundError) as ei:
            put()
        assert isinstance(ei.value, FileNotFoundError)
        assert str(tmp_path) in str(ei.value) and url in str(ei.value) and "nothing was sent" in str(ei.value)
    assert isinstance(ei.value.__cause__, FileNotFoundError)
    assert _stored(gcs_emulator, url) is None and _records(url, seq) == []


def test_upload_whose_answer_is_lost_leaves_no_stale_view(
    gcs_emulator: Emulator, gcs_bucket: str, fault_proxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server stored the new bytes, every answer was cut: the server is asked, holds exactly what was sent,
    so the upload succeeded (journaled as the write of the generation stored), and no old view is kept."""
    monkeypatch.setenv("CLOUDIO_HTTP_TIMEOUT", "1")
    url = f"{gcs_bucket}/d/lost.bin"
    old, new = b"o" * 10, b"n" * 100
    upload(old, url)
    fs = cloudio.filesystem(url)
    assert fs.ls(f"{gcs_bucket[5:]}/d", detail=True)[0]["size"] == 10  # the listing now caches 10 bytes
    fault_proxy.add("reset", method="POST", path=r"/upload/", times=None)  # forwarded, then the answer is cut
    seq = journal().seq
    up = upload(new, url)
    assert _stored(gcs_emulator, url) == new  # it did land
    blob = gcs_emulator.client.bucket(gcs_bucket[5:]).get_blob("d/lost.bin")
    assert (up.generation, up.size) == (blob.generation, 100)
    assert [(c.kind, c.generation) for c in journal().since(seq) if c.url == url] == [("write", blob.generation)]
    fault_proxy.clear()
    with fs.open(url, "rb") as f:
        assert f.read() == new  # not the new bytes cut at the cached 10


def test_upload_that_never_reached_the_server_says_its_outcome_is_unknown(
    gcs_emulator: Emulator, gcs_bucket: str, fault_proxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No answer, and the server (asked) holds the old bytes: TransientError naming the URL, the object's
    cached view dropped (journaled as an invalidation), the old bytes still there."""
    monkeypatch.setenv("CLOUDIO_HTTP_TIMEOUT", "1")
    url = f"{gcs_bucket}/d/unsent.bin"
    upload(b"o" * 10, url)
    fault_proxy.add("hang", method="POST", path=r"/upload/", times=None)  # never forwarded, never answered
    seq = journal().seq
    with pytest.raises(cloudio.TransientError, match="may or may not have been stored") as ei:
        upload(b"n" * 100, url)
    fault_proxy.clear()
    assert url in str(ei.value)
    assert _stored(gcs_emulator, url) == b"o" * 10
    assert [c.kind for c in journal().since(seq) if c.url == url] == ["invalidate"]
