"""Deletes, listings and existence checks through ``cloudio.zarr_store`` under faults, and what the metadata log
keeps after a delete: found by a review; each test failed before its fix.

Faults come from the proxy in front of the real emulator (tests/faultproxy.py). The promises under test
(README "Reliability", docs/design.md): a call through the store returns, or raises a ``cloudio.CloudioError``
naming the gs:// URL and the next step with the library's error as ``__cause__``, within cloudio's time
limit; the journal says what may have changed, and no more; a consolidated copy older than what this process
changed is not trusted.
"""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr
import zarr
from outcomes import bounded, returned

import cloudio

pytestmark = pytest.mark.filterwarnings("ignore:Consolidated metadata is currently not part:UserWarning")

LIMIT = 120  # seconds a call under faults may take before it counts as hung


def _ab(url: str) -> None:
    """A consolidated dataset of two variables ``a`` and ``b``."""
    cloudio.to_zarr(xr.Dataset({"a": ("x", np.arange(4.0)), "b": ("x", np.arange(4.0))}), url, mode="w")


# -- 1. a delete and the metadata log ------------------------------------------------------------------


def test_a_failed_delete_keeps_what_the_log_knows_of_the_rest_of_the_store(gcs_emulator, gcs_bucket, fault_proxy):
    """``del g["a"]`` with one DELETE refused: the variable c written in this process stays visible to open_zarr
    (the failure recorded a delete of the whole store, which wiped the metadata log: the old consolidated copy,
    without c, was trusted again)."""
    url = f"{gcs_bucket}/fdel.zarr"
    _ab(url)
    g = zarr.open_group(cloudio.zarr_store(url))
    g.create_array("c", shape=(4,), dtype="f8", dimension_names=["x"])[:] = 1.0
    assert "c" in cloudio.open_zarr(url)
    fault_proxy.add("status", code=403, method="DELETE", path=r"fdel\.zarr%2Fa%2Fzarr\.json", times=None)
    with pytest.raises(OSError):
        returned(lambda: g.__delitem__("a"), LIMIT)
    fault_proxy.clear()
    ds = cloudio.open_zarr(url)
    assert "c" in ds and ds["c"].values.tolist() == [1.0] * 4, ds
    assert "b" in ds


def test_a_deleted_member_is_not_listed_from_the_old_consolidated_copy(gcs_emulator, gcs_bucket):
    """``del g["b"]`` through a group opened without its consolidated copy: open_zarr no longer lists b (only
    b's own entries were dropped from the log, so the old copy, which lists b, was trusted)."""
    url = f"{gcs_bucket}/mdel.zarr"
    _ab(url)
    g = zarr.open_group(cloudio.zarr_store(url), use_consolidated=False)
    del g["b"]
    ds = cloudio.open_zarr(url)
    assert "b" not in ds and "a" in ds, ds


# -- 3. deletes and listings name the object -----------------------------------------------------------


def _array(url: str) -> zarr.Array:
    """A 4x4 int32 array of two chunks (c/0/0, c/1/0), none of them the fill value, opened for writing."""
    cloudio.save_array(np.arange(16, dtype="i4").reshape(4, 4) + 1, url, chunks=(2, 4))
    return zarr.open_array(cloudio.zarr_store(url), mode="r+")


def _records(seq: int, url: str) -> list[str]:
    from cloudio._journal import journal

    return [c.kind for c in journal().since(seq) if c.touches(url)]


def test_a_refused_chunk_delete_is_an_upload_error_naming_the_chunk(gcs_emulator, gcs_bucket, fault_proxy):
    """A write of nothing but the fill value deletes the chunk; its DELETE refused (403) is an UploadError naming
    the chunk's URL, not a TransientError, the library's error as its cause (was gcsfs's bare OSError
    'Forbidden'); nothing was deleted, so nothing is journaled."""
    from cloudio._journal import journal

    url = f"{gcs_bucket}/dr.zarr"
    z = _array(url)
    fault_proxy.add("status", code=403, method="DELETE", path=r"dr\.zarr%2Fc%2F0%2F0", times=None)
    seq = journal().seq
    with pytest.raises(cloudio.UploadError, match=rf"{url}/c/0/0\b") as info:
        returned(lambda: z.__setitem__((slice(0, 2), slice(None)), 0), LIMIT)
    assert not isinstance(info.value, cloudio.TransientError)
    assert info.value.__cause__ is not None and not isinstance(info.value.__cause__, cloudio.CloudioError)
    assert "credentials" in str(info.value), info.value
    assert _records(seq, f"{url}/c/0/0") == []
    fault_proxy.clear()
    assert cloudio.load_array(url)[0].tolist() == [1, 2, 3, 4]  # still stored


def test_a_chunk_delete_failing_past_the_retries_is_a_transient_error_and_journaled(gcs_emulator, gcs_bucket,
                                                                                     fault_proxy, monkeypatch):
    """Every DELETE answered 503: TransientError naming the chunk's URL (was gcsfs's bare HttpError); whether the
    server deleted it is not known, so it is journaled as invalidated."""
    from cloudio._journal import journal

    monkeypatch.setenv("CLOUDIO_HTTP_TIMEOUT", "1")
    url = f"{gcs_bucket}/dt.zarr"
    z = _array(url)
    fault_proxy.add("status", code=503, method="DELETE", path=r"dt\.zarr%2Fc%2F0%2F0", times=None)
    seq = journal().seq
    with pytest.raises(cloudio.TransientError, match=rf"{url}/c/0/0\b") as info:
        returned(lambda: z.__setitem__((slice(0, 2), slice(None)), 0), LIMIT)
    assert info.value.__cause__ is not None
    assert _records(seq, f"{url}/c/0/0") == ["invalidate"]


def test_a_refused_delete_of_a_member_is_an_upload_error_naming_the_object(gcs_emulator, gcs_bucket, fault_proxy):
    """``del g["a"]`` with the DELETE of a/zarr.json refused: UploadError naming that object (zarr's delete_dir
    raised gcsfs's bare OSError)."""
    url = f"{gcs_bucket}/mr.zarr"
    _ab(url)
    g = zarr.open_group(cloudio.zarr_store(url), use_consolidated=False)
    fault_proxy.add("status", code=403, method="DELETE", path=r"mr\.zarr%2Fa%2Fzarr\.json", times=None)
    with pytest.raises(cloudio.UploadError, match=rf"{url}/a/zarr\.json") as info:
        returned(lambda: g.__delitem__("a"), LIMIT)
    assert info.value.__cause__ is not None


def test_deleting_a_missing_key_is_no_error(gcs_emulator, gcs_bucket):
    """zarr's store contract: a key already gone deletes silently."""
    from zarr.core.sync import sync

    store = cloudio.zarr_store(f"{gcs_bucket}/gone.zarr")
    assert returned(lambda: sync(store.delete("c/0/0")), LIMIT) is None


@pytest.mark.parametrize("code", [403, 503])
@pytest.mark.parametrize("call", ["list", "list_prefix", "is_empty"])
def test_a_failed_listing_names_the_store(gcs_emulator, gcs_bucket, fault_proxy, monkeypatch, code, call):
    """A listing of the store refused (403) is a ReadError, failing past the retries (503) a TransientError,
    each naming the store's URL with the library's error as its cause (a 403 was gcsfs's bare OSError)."""
    from zarr.core.sync import sync

    monkeypatch.setenv("CLOUDIO_HTTP_TIMEOUT", "1")
    url = f"{gcs_bucket}/ls{code}.zarr"
    _array(url)
    store = cloudio.zarr_store(url)

    async def listed() -> object:
        if call == "is_empty":
            return await store.is_empty("")
        return [k async for k in (store.list() if call == "list" else store.list_prefix("c/"))]

    fault_proxy.add("status", code=code, method="GET", path=r"^/storage/v1/b/[^/]+/o\?", times=None)
    want = cloudio.TransientError if code == 503 else cloudio.ReadError
    with pytest.raises(want, match=rf"{url}\b") as info:
        returned(lambda: sync(listed()), LIMIT)
    assert info.value.__cause__ is not None
    if code == 403:
        assert not isinstance(info.value, cloudio.TransientError)



# -- 2. existence checks within cloudio's time limit ---------------------------------------------------


def test_exists_of_a_document_the_server_never_answers_is_a_transient_error_in_time(gcs_emulator, gcs_bucket,
                                                                                     fault_proxy, monkeypatch):
    """zarr asks the store whether a document exists (set_if_not_exists of every parent group, xarray's probes);
    the metadata GET hangs (CLOUDIO_HTTP_TIMEOUT=1): TransientError naming the object within cloudio's limit
    of one call (was aiohttp's bare timeout after about 40 s of gcsfs's retries and back-off)."""
    from zarr.core.sync import sync

    monkeypatch.setenv("CLOUDIO_HTTP_TIMEOUT", "1")
    url = f"{gcs_bucket}/exh.zarr"
    store = cloudio.zarr_store(url)
    fault_proxy.add("hang", method="GET", path=r"^/storage/v1/b/[^/]+/o/exh\.zarr%2Fzarr\.json", times=None)
    _, err, took = bounded(lambda: sync(store.exists("zarr.json")), LIMIT)
    assert isinstance(err, cloudio.TransientError) and f"{url}/zarr.json" in str(err), repr(err)
    assert err.__cause__ is not None
    assert took < 15, took


def test_set_if_not_exists_whose_look_never_answers_is_a_transient_error_in_time(gcs_emulator, gcs_bucket,
                                                                                  fault_proxy, monkeypatch):
    """The look before a create-if-absent hangs: TransientError naming the object in time, nothing written."""
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.sync import sync

    monkeypatch.setenv("CLOUDIO_HTTP_TIMEOUT", "1")
    url = f"{gcs_bucket}/sih.zarr"
    store = cloudio.zarr_store(url)
    fault_proxy.add("hang", method="GET", path=r"^/storage/v1/b/[^/]+/o/sih\.zarr%2Fg%2Fzarr\.json", times=None)
    doc = default_buffer_prototype().buffer.from_bytes(b'{"zarr_format": 3, "node_type": "group"}')
    _, err, took = bounded(lambda: sync(store.set_if_not_exists("g/zarr.json", doc)), LIMIT)
    assert isinstance(err, cloudio.TransientError) and f"{url}/g/zarr.json" in str(err), repr(err)
    assert took < 15, took
    sent = [r for r in fault_proxy.requests(r"sih\.zarr") if r[0] != "GET"]
    assert not sent, f"written after a failed look: {sent}"


def test_exists_refused_is_a_read_error_naming_the_object(gcs_emulator, gcs_bucket, fault_proxy):
    """The metadata GET of exists refused (403): ReadError naming the object (was gcsfs's bare OSError)."""
    from zarr.core.sync import sync

    url = f"{gcs_bucket}/exr.zarr"
    store = cloudio.zarr_store(url)
    fault_proxy.add("status", code=403, method="GET", path=r"^/storage/v1/b/[^/]+/o/exr\.zarr%2Fzarr\.json",
                    times=None)
    with pytest.raises(cloudio.ReadError, match=rf"{url}/zarr\.json") as info:
        returned(lambda: sync(store.exists("zarr.json")), LIMIT)
    assert info.value.__cause__ is not None and not isinstance(info.value, cloudio.TransientError)


def test_exists_answers_as_before(gcs_emulator, gcs_bucket):
    """No fault: a stored document exists, a missing one does not."""
    from zarr.core.sync import sync

    url = f"{gcs_bucket}/exa.zarr"
    _ab(url)
    store = cloudio.zarr_store(url)
    assert returned(lambda: sync(store.exists("zarr.json")), LIMIT) is True
    assert returned(lambda: sync(store.exists("nope/zarr.json")), LIMIT) is False



# -- 4. a store whose key holds glob characters, listed at the strong level ------------------------------

_GLOB = "[]*?{}\\"


def _metadata_listings(fault_proxy, prefix: str) -> list[dict[str, list[str]]]:
    """The query of each listing of metadata documents (with their metageneration, as open_zarr asks at the
    strong level) in the proxy's log whose prefix is ``prefix``."""
    from urllib.parse import parse_qs, urlsplit

    queries = [parse_qs(urlsplit(p).query) for _, p, _ in fault_proxy.requests(r"^/storage/v1/b/[^/]+/o\?")]
    return [q for q in queries if q.get("prefix") == [prefix] and "metageneration" in q.get("fields", [""])[0]]


def test_a_store_key_with_glob_characters_is_listed_without_a_glob_that_misses_it(gcs_emulator, gcs_bucket,
                                                                                   fault_proxy):
    """At the strong level open_zarr lists the store's metadata documents and write marker with
    ``matchGlob=<key>/**{...}``: on GCS, ``[1]`` in ``run[1].zarr`` is a character class, so the listing of
    that store matched nothing and the marker of a write that never finished was missed (the emulator ignores
    matchGlob). Such a key is listed without matchGlob and filtered here; the marker and documents are found."""
    from cloudio._paths import parse_gcs

    url = f"{gcs_bucket}/run[1].zarr"
    _ab(url)
    marker = parse_gcs(f"{url}/.cloudio-write-in-progress")
    gcs_emulator.client.bucket(marker.bucket).blob(marker.key).upload_from_string(b'{"operation": "to_zarr"}')
    with cloudio.session("strong"), pytest.raises(cloudio.IncompleteWriteError, match=r"run\[1\]\.zarr"):
        returned(lambda: cloudio.open_zarr(url), LIMIT)
    gcs_emulator.client.bucket(marker.bucket).blob(marker.key).delete()
    with cloudio.session("strong"):
        ds = returned(lambda: cloudio.open_zarr(url), LIMIT)
    assert sorted(ds.data_vars) == ["a", "b"], ds
    listed = _metadata_listings(fault_proxy, "run[1].zarr/")
    assert listed, fault_proxy.requests(r"/o\?")
    for query in listed:
        for glob in query.get("matchGlob", []):
            assert not any(c in glob.split("**")[0] for c in _GLOB), f"a glob that misses the key: {glob!r}"


def test_a_plain_store_key_is_still_listed_with_its_glob(gcs_emulator, gcs_bucket, fault_proxy):
    """The metadata listing of a key without glob characters keeps ``matchGlob`` (chunks stay out of it)."""
    url = f"{gcs_bucket}/plain.zarr"
    _ab(url)
    with cloudio.session("strong"):
        returned(lambda: cloudio.open_zarr(url), LIMIT)
    listed = _metadata_listings(fault_proxy, "plain.zarr/")
    assert listed and all(q.get("matchGlob", [""])[0].startswith("plain.zarr/**") for q in listed), listed
