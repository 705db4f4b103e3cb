"""``to_zarr`` appends, region writes and added variables against a late copy of an abandoned upload, on the real
emulator: each chunk upload carries the generation its object had when the write began (``ifGenerationMatch``),
so a copy held on its way past the time limit, arriving after a later write, is refused instead of putting the
earlier values back. The listing that gives the generations covers only the chunks the write touches.

The autouse fixture of tests/conftest.py sends guarded uploads as multipart, so fake-gcs-server enforces them as
GCS does.
"""

from __future__ import annotations

import threading
import time
from urllib.parse import parse_qs, unquote, urlsplit

import numpy as np
import pytest
import xarray as xr
from outcomes import Outcome, bounded, two_writes_and_a_late_copy

import cloudio

pytestmark = pytest.mark.filterwarnings("ignore:Consolidated metadata is currently not part:UserWarning")


def _stored(t: int = 8) -> xr.Dataset:
    """v (t, x) in chunks of (2, 4), the static coordinate x, and s (x): no t."""
    return xr.Dataset({"v": (("t", "x"), np.zeros((t, 4), "f4")), "s": (("x",), np.arange(4.0))},
                      coords={"t": np.arange(t), "x": np.arange(4)})


def _region(value: int, start: int = 0, stop: int = 2) -> xr.Dataset:
    return xr.Dataset({"v": (("t", "x"), np.full((stop - start, 4), value, "f4"))})


def _first(url: str, fmt: int) -> None:
    cloudio.to_zarr(_stored(), url, mode="w", zarr_format=fmt, encoding={"v": {"chunks": (2, 4)}})


def _chunk(fmt: int, name: str, *index: int) -> str:
    """The pattern of ``name``'s chunk ``index`` in an upload's query (zarr's default key encodings)."""
    key = f"{name}/c/" + "/".join(map(str, index)) if fmt == 3 else f"{name}/" + ".".join(map(str, index))
    return key.replace("/", "%2F").replace(".", r"\.") + "(&|$)"


def _listings(emu, since: int) -> list[str]:
    """The prefix of each object listing the emulator logged after the first ``since`` requests."""
    out = []
    for r in emu.requests()[since:]:
        parts = urlsplit(r.path)
        if r.method == "GET" and parts.path.endswith("/o"):
            out.append(unquote(parse_qs(parts.query).get("prefix", [""])[0]))
    return out


@pytest.mark.parametrize("fmt", [3, 2])
def test_a_late_copy_of_a_region_write_does_not_land_over_a_later_one(gcs_emulator, gcs_bucket, fault_proxy,
                                                                      monkeypatch, fmt):
    """Region write 1 of t[0:2], its chunk upload held past the time limit (sent again); region write 2 of the
    same region; then the held copy of write 1 reaches the server: write 2's values stay."""
    monkeypatch.setenv("CLOUDIO_HTTP_TIMEOUT", "1")
    url = f"{gcs_bucket}/region{fmt}.zarr"
    _first(url, fmt)
    two_writes_and_a_late_copy(fault_proxy, f"name=region{fmt}\\.zarr%2F" + _chunk(fmt, "v", 0, 0),
                               lambda v: cloudio.to_zarr(_region(v), url, region={"t": slice(0, 2)}))
    got = cloudio.open_zarr(url).v.values
    np.testing.assert_array_equal(got[:2], 2, err_msg="the late copy of the first region write landed")
    np.testing.assert_array_equal(got[2:], 0)


@pytest.mark.parametrize("fmt", [3, 2])
def test_a_late_copy_of_an_append_does_not_land_over_a_later_region_write(gcs_emulator, gcs_bucket, fault_proxy,
                                                                          monkeypatch, fmt):
    """An append along t, its new chunk's upload held past the time limit; a region write over the appended part;
    then the held copy arrives: the region write's values stay, and the append's length too."""
    monkeypatch.setenv("CLOUDIO_HTTP_TIMEOUT", "1")
    url = f"{gcs_bucket}/append{fmt}.zarr"
    _first(url, fmt)
    more = _stored(2).assign_coords(t=[8, 9])
    more["v"][:] = 1

    def write(v: int) -> None:
        if v == 1:
            cloudio.to_zarr(more, url, append_dim="t")
        else:
            cloudio.to_zarr(_region(2, 8, 10), url, region={"t": slice(8, 10)})

    two_writes_and_a_late_copy(fault_proxy, f"name=append{fmt}\\.zarr%2F" + _chunk(fmt, "v", 4, 0), write)
    got = cloudio.open_zarr(url)
    assert got.sizes["t"] == 10
    np.testing.assert_array_equal(got.v.values[8:], 2, err_msg="the late copy of the append landed")


def test_a_late_copy_of_an_added_variable_does_not_land_over_a_later_region_write(gcs_emulator, gcs_bucket,
                                                                                  fault_proxy, monkeypatch):
    """mode="a" adds variable w, its chunk's upload held past the time limit; a region write of w; then the held
    copy arrives: the region write's values stay."""
    monkeypatch.setenv("CLOUDIO_HTTP_TIMEOUT", "1")
    url = f"{gcs_bucket}/added.zarr"
    _first(url, 3)

    def write(v: int) -> None:
        w = xr.Dataset({"w": (("t", "x"), np.full((8, 4), v, "f4"))})
        if v == 1:
            cloudio.to_zarr(w, url, mode="a", encoding={"w": {"chunks": (2, 4)}})
        else:
            cloudio.to_zarr(w.isel(t=slice(0, 2)), url, region={"t": slice(0, 2)})

    two_writes_and_a_late_copy(fault_proxy, r"name=added\.zarr%2F" + _chunk(3, "w", 0, 0), write)
    got = cloudio.open_zarr(url).w.values
    np.testing.assert_array_equal(got[:2], 2, err_msg="the late copy of the added variable landed")
    np.testing.assert_array_equal(got[2:], 1)


def test_a_chunk_another_writer_changed_during_a_region_write_is_not_overwritten(gcs_emulator, gcs_bucket,
                                                                                 fault_proxy):
    """While a region write's upload of v's chunk 0 is held on its way (its chunk 1 stored), another writer stores
    chunk 0: the held upload needs the generation the write found, so it is refused. to_zarr raises ConflictError
    naming the chunk, the other writer's object stays, and the store is marked incomplete instead of silently
    mixed."""
    url = f"{gcs_bucket}/raced.zarr"
    _first(url, 3)
    release = threading.Event()
    held = fault_proxy.add("delay", method="POST", path=r"name=raced\.zarr%2F" + _chunk(3, "v", 0, 0),
                           release=release, seconds=30, times=1)
    since = len(gcs_emulator.requests())
    writing = Outcome(lambda: cloudio.to_zarr(_region(5, 0, 4), url, region={"t": slice(0, 4)})).start()
    for _ in range(200):
        if held.hits and any("v%2Fc%2F1%2F0" in r.path for r in gcs_emulator.requests()[since:]):
            break
        time.sleep(0.05)
    assert held.hits == 1, writing.said()
    other = gcs_emulator.client.bucket(gcs_bucket[5:]).blob("raced.zarr/v/c/0/0")
    other.upload_from_string(b"another writer's chunk")
    release.set()
    assert writing.finished(60), writing.said()
    assert isinstance(writing.error, cloudio.ConflictError), writing.said()
    assert "raced.zarr/v/c/0/0" in str(writing.error) and "marked incomplete" in str(writing.error)
    other.reload()
    assert other.download_as_bytes() == b"another writer's chunk"
    with pytest.raises(cloudio.IncompleteWriteError, match="raced.zarr"):
        cloudio.open_zarr(url)


@pytest.mark.parametrize("fmt", [3, 2])
def test_the_generations_are_listed_only_for_the_chunks_a_region_write_touches(gcs_emulator, gcs_bucket, fmt):
    """A region write of t[4:6] lists the objects of v's row of chunks 2 (one listing, not the whole array; the
    group's listing is the write's own, as before); an append lists the appended rows and v's own metadata, and
    each variable without t (s, the coordinate x), which it rewrites whole, once (where the last writer wins), and
    the group's own documents, which a region write (mode "r+") leaves alone."""
    url = f"{gcs_bucket}/listed{fmt}.zarr"
    _first(url, fmt)
    since = len(gcs_emulator.requests())
    _, err, _ = bounded(lambda: cloudio.to_zarr(_region(3, 4, 6), url, region={"t": slice(4, 6)}))
    assert err is None, repr(err)
    row = f"listed{fmt}.zarr/v/c/2/" if fmt == 3 else f"listed{fmt}.zarr/v/2."
    assert [p for p in _listings(gcs_emulator, since) if "/v" in p] == [row]
    group_documents = f"listed{fmt}.zarr/" + ("zarr.json" if fmt == 3 else ".z")  # xarray writes them outside r+
    assert group_documents not in _listings(gcs_emulator, since)
    more = _stored(3).assign_coords(t=[8, 9, 10])
    since = len(gcs_emulator.requests())
    _, err, _ = bounded(lambda: cloudio.to_zarr(more, url, append_dim="t"))
    assert err is None, repr(err)
    listed = _listings(gcs_emulator, since)
    assert sorted(p for p in listed if "/s/" in p or "/x/" in p or p.endswith(("/s", "/x"))) == [
        f"listed{fmt}.zarr/s/", f"listed{fmt}.zarr/x/"], listed
    assert group_documents in listed, listed
    rows = [f"listed{fmt}.zarr/{name}/c/{i}/" if fmt == 3 else f"listed{fmt}.zarr/{name}/{i}." for name, i in
            [("v", 4), ("v", 5)]]
    assert set(rows) <= set(listed), listed
    got = cloudio.open_zarr(url)
    assert got.sizes["t"] == 11
    np.testing.assert_array_equal(got.v.values[4:6], 3)


def test_disjoint_region_writes_at_once_are_not_refused(gcs_emulator, gcs_bucket):
    """Eight region writes of disjoint rows of chunks, from eight threads at once, through their own store objects:
    none is refused (each guards only its own chunks), and every row reads back."""
    url = f"{gcs_bucket}/disjoint.zarr"
    cloudio.to_zarr(_stored(16), url, mode="w", encoding={"v": {"chunks": (2, 4)}})
    writers = [Outcome(lambda i=i: cloudio.to_zarr(_region(i + 1, 2 * i, 2 * i + 2), url,
                                                   region={"t": slice(2 * i, 2 * i + 2)})).start() for i in range(8)]
    for w in writers:
        assert w.finished(60), w.said()
        assert w.error is None, w.said()
    got = cloudio.open_zarr(url).v.values
    np.testing.assert_array_equal(got[:, 0], np.repeat(np.arange(1, 9), 2))


def test_a_region_write_of_many_rows_lists_the_variable_once_and_past_the_limit_not_at_all(gcs_emulator, gcs_bucket,
                                                                                          monkeypatch):
    """A region write touching 20 rows of chunks lists the variable whole, once, instead of 20 rows; past
    GUARD_LISTING_LIMIT objects it lists nothing and its uploads carry no generation (docs/consistency.md)."""
    from cloudio._zarr import xarray as cloudio_xarray

    url = f"{gcs_bucket}/many.zarr"
    cloudio.to_zarr(_stored(40), url, mode="w", encoding={"v": {"chunks": (2, 4)}})
    since = len(gcs_emulator.requests())
    _, err, _ = bounded(lambda: cloudio.to_zarr(_region(4, 0, 40), url, region={"t": slice(0, 40)}))
    assert err is None, repr(err)
    assert [p for p in _listings(gcs_emulator, since) if "/v" in p] == ["many.zarr/v/"]
    monkeypatch.setattr(cloudio_xarray, "GUARD_LISTING_LIMIT", 19)
    since = len(gcs_emulator.requests())
    _, err, _ = bounded(lambda: cloudio.to_zarr(_region(5, 0, 40), url, region={"t": slice(0, 40)}))
    assert err is None, repr(err)
    assert not [p for p in _listings(gcs_emulator, since) if "/v" in p]
    queries = [parse_qs(urlsplit(r.path).query) for r in gcs_emulator.requests()[since:] if r.method == "POST"]
    guards = [q.get("ifGenerationMatch") for q in queries if q.get("name", [""])[0].startswith("many.zarr/v/c/")]
    assert len(guards) == 20 and not any(guards), guards
    np.testing.assert_array_equal(cloudio.open_zarr(url).v.values, 5)


def test_a_pickled_store_carries_the_generations_listed_up_to_the_limit(gcs_emulator, gcs_bucket, monkeypatch):
    """The copy of a store a dask.distributed worker unpickles needs the generations its write listed: pickled
    inside ``expecting``, it carries them (and a carried copy naming the write too); past SHIPPED_GENERATIONS,
    none, and its uploads go unguarded (docs/consistency.md)."""
    import pickle

    from cloudio._zarr import store as cloudio_store
    from cloudio._zarr.changes import stopped_on_failure

    store = cloudio.zarr_store(f"{gcs_bucket}/shipped.zarr")
    with stopped_on_failure() as changes, store.expecting() as expect:
        expect("v/c/0/", {"v/c/0/0": 7, "v/c/0/1": 8})
        for copy in (pickle.loads(pickle.dumps(store)), pickle.loads(pickle.dumps(changes.carried(store)))):
            assert copy._expected("v/c/0/1") == 8 and copy._expected("v/c/0/2") == 0
            assert copy._expected("v/zarr.json") is None
        monkeypatch.setattr(cloudio_store, "SHIPPED_GENERATIONS", 1)
        assert pickle.loads(pickle.dumps(changes.carried(store)))._expected("v/c/0/1") is None
    assert pickle.loads(pickle.dumps(store))._expected("v/c/0/1") is None  # the write is over
    graph = store.with_own_expectations()  # a compute=False graph's: its generations stay, and travel with it
    with graph.expecting(kept=True) as expect:
        expect("v/c/0/", {"v/c/0/0": 7})
    shipped = pickle.loads(pickle.dumps(graph))
    assert shipped._expected("v/c/0/0") == 7 and shipped._kept and store._expected("v/c/0/0") is None


def test_past_the_limit_a_pickled_store_leaves_out_what_is_rewritten_whole_first(gcs_emulator, gcs_bucket,
                                                                                 monkeypatch):
    """An append listing a large static variable (rewritten whole, where the last writer wins) besides the rows it
    appends: past SHIPPED_GENERATIONS the static variable's generations stay behind, the appended rows' travel."""
    import pickle

    from cloudio._zarr import store as cloudio_store

    monkeypatch.setattr(cloudio_store, "SHIPPED_GENERATIONS", 3)
    store = cloudio.zarr_store(f"{gcs_bucket}/shipped-whole.zarr")
    with store.expecting() as expect:
        expect("v/c/4/", {"v/c/4/0": 7})
        expect("elev/", {f"elev/c/{i}/0": 10 + i for i in range(8)}, whole=True)
        copy = pickle.loads(pickle.dumps(store))
        assert copy._expected("v/c/4/0") == 7 and copy._expected("v/c/4/1") == 0
        assert copy._expected("elev/c/1/0") is None and not copy._whole
        assert store._expected("elev/c/1/0") == 11
