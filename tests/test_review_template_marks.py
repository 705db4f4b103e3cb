"""Review of the deferred write marks (``to_zarr(..., compute=False)``: xarray's template pattern).

Each test asserts what must hold: a reader is refused while chunks of a write are half written (or none of a
started graph's chunks went up marked), a store written as xarray documents opens, no marker is left behind,
nothing hangs.
"""

from __future__ import annotations

import os
from urllib.parse import parse_qs, unquote, urlsplit

import dask
import dask.array as da
import numpy as np
import pytest
import xarray as xr
from outcomes import bounded, returned

import cloudio
from cloudio._paths import parse_gcs

MARKER = ".cloudio-write-in-progress"
ROWS, COLS, STEP = 16, 8, 4


def _marker_exists(emu, url: str) -> bool:
    if not url.startswith("gs://"):
        return os.path.exists(os.path.join(url, MARKER))
    p = parse_gcs(f"{url}/{MARKER}")
    return emu.client.bucket(p.bucket).get_blob(p.key) is not None


def _marker_text(emu, url: str) -> str:
    p = parse_gcs(f"{url}/{MARKER}")
    blob = emu.client.bucket(p.bucket).get_blob(p.key)
    return "" if blob is None else blob.download_as_bytes().decode()


def _template_ds(value: float = 0.0, rows: int = ROWS, start: int = 0) -> xr.Dataset:
    return xr.Dataset({"v": (("t", "x"), da.full((rows, COLS), value, dtype="f4", chunks=(STEP, COLS)))},
                      coords={"t": np.arange(start, start + rows), "x": np.arange(COLS)})


def _template(url: str, value: float = 0.0, rows: int = ROWS, **kwargs):
    kwargs.setdefault("mode", "w")
    return cloudio.to_zarr(_template_ds(value, rows), url, compute=False, consolidated=False,
                           encoding={"v": {"chunks": (STEP, COLS)}}, **kwargs)


def _part(i: int, value: float | None = None, lazy: bool = False) -> xr.Dataset:
    data = np.full((STEP, COLS), i + 1 if value is None else value, dtype="f4")
    return xr.Dataset({"v": (("t", "x"), da.from_array(data, chunks=(STEP, COLS)) if lazy else data)})


def _region(url: str, i: int, value: float | None = None, lazy: bool = False, **kwargs):
    return cloudio.to_zarr(_part(i, value, lazy), url, region={"t": slice(STEP * i, STEP * i + STEP)},
                           consolidated=False, **kwargs)


def _values(url: str, **kwargs) -> np.ndarray:
    return cloudio.open_zarr(url, consolidated=False, **kwargs).v.values


def _rows(values: list[float]) -> np.ndarray:
    return np.repeat(np.asarray(values, dtype="f4"), STEP)[:, None].repeat(COLS, 1)


def _events(emu, since: int, url: str) -> list[tuple[str, str, int]]:
    """(method, object name under the store, status) of each upload and delete the emulator logged for objects
    of the store at ``url``, after its first ``since`` requests, in the order logged."""
    p = parse_gcs(url)
    prefix = p.key.rstrip("/") + "/"
    out = []
    for r in emu.requests()[since:]:
        parts = urlsplit(r.path)
        if r.method == "POST" and parts.path.startswith("/upload/"):
            name = parse_qs(parts.query).get("name", [""])[0]
        elif r.method == "DELETE" and "/o/" in parts.path:
            name = unquote(parts.path.split("/o/", 1)[1])
        else:
            continue
        if name.startswith(prefix):
            out.append((r.method, name[len(prefix):], r.status))
    return out


def _chunk_events_marked(events: list[tuple[str, str, int]]) -> bool:
    """Whether the marker went up (an upload of it answered 200) before the first chunk upload or delete."""
    for method, name, status in events:
        if name == MARKER and method == "POST" and status == 200:
            return True
        if name.startswith("v/c/") and status < 300:
            return False
    return True  # no chunk changed


def _chunk_events(events: list[tuple[str, str, int]]) -> list[tuple[str, str, int]]:
    return [e for e in events if e[1].startswith("v/c/")]


# -- groups ------------------------------------------------------------------------------------------------


def test_a_group_template_filled_by_region_writes_of_that_group_opens(gcs_emulator, gcs_bucket):
    url = f"{gcs_bucket}/grp.zarr"
    _template(url, group="g")
    for i in range(4):
        _region(url, i, group="g")
    assert not _marker_exists(gcs_emulator, url)
    np.testing.assert_array_equal(_values(url, group="g"), _rows([1, 2, 3, 4]))


def test_region_writes_of_another_group_leave_a_group_template_refused(gcs_emulator, gcs_bucket):
    """Templates of groups a and b; only b's regions are written: a's deferred entry stays (store refused with
    the deferred message) until a's regions are written too; then nothing is left."""
    url = f"{gcs_bucket}/twogroups.zarr"
    _template(url, group="a")
    _template(url, group="b", mode="w")
    for i in range(4):
        _region(url, i, group="b")
    assert _marker_exists(gcs_emulator, url)
    with pytest.raises(cloudio.IncompleteWriteError) as info:
        cloudio.open_zarr(url, group="a", consolidated=False)
    assert "compute=False" in str(info.value)
    for i in range(4):
        _region(url, i, value=9.0, group="a")
    assert not _marker_exists(gcs_emulator, url)
    np.testing.assert_array_equal(_values(url, group="a"), _rows([9, 9, 9, 9]))
    np.testing.assert_array_equal(_values(url, group="b"), _rows([1, 2, 3, 4]))


def test_load_array_refuses_a_bare_template_and_reads_it_once_filled(gcs_emulator, gcs_bucket):
    url = f"{gcs_bucket}/load.zarr"
    _template(url)
    with pytest.raises(cloudio.IncompleteWriteError) as info:
        cloudio.load_array(f"{url}/v")
    assert "compute=False" in str(info.value) and "region" in str(info.value)
    for i in range(4):
        _region(url, i)
    np.testing.assert_array_equal(cloudio.load_array(f"{url}/v"), _rows([1, 2, 3, 4]))


def test_two_templates_of_one_group_are_both_taken_off_by_the_region_writes(gcs_emulator, gcs_bucket):
    url = f"{gcs_bucket}/twice-template.zarr"
    _template(url, value=1.0)
    _template(url, value=2.0)
    for i in range(4):
        _region(url, i)
    assert not _marker_exists(gcs_emulator, url)
    np.testing.assert_array_equal(_values(url), _rows([1, 2, 3, 4]))


# -- append templates --------------------------------------------------------------------------------------


def test_an_append_template_filled_by_region_writes_opens(gcs_emulator, gcs_bucket):
    """Rows 0-7 written; 8 rows appended with compute=False (a template of the new rows); region writes fill
    the appended rows: the store opens with every row."""
    url = f"{gcs_bucket}/append-tpl.zarr"
    first = xr.Dataset({"v": (("t", "x"), np.full((8, COLS), 5.0, dtype="f4"))},
                       coords={"t": np.arange(8), "x": np.arange(COLS)})
    cloudio.to_zarr(first, url, mode="w", consolidated=False, encoding={"v": {"chunks": (STEP, COLS)}})
    more = xr.Dataset({"v": (("t", "x"), da.zeros((8, COLS), dtype="f4", chunks=(STEP, COLS)))},
                      coords={"t": np.arange(8, 16)})
    cloudio.to_zarr(more, url, append_dim="t", compute=False, consolidated=False)
    with pytest.raises(cloudio.IncompleteWriteError):
        cloudio.open_zarr(url, consolidated=False)
    _region(url, 2)
    _region(url, 3)
    assert not _marker_exists(gcs_emulator, url)
    np.testing.assert_array_equal(_values(url), _rows([5, 5, 3, 4]))


# -- the graph computed after all --------------------------------------------------------------------------


def test_a_template_graph_computed_twice_is_marked_each_time(gcs_emulator, gcs_bucket):
    """The graph computed, a region write, the graph computed again: each computation puts the mark up before
    its first chunk upload and takes it off at the end; the values are the graph's."""
    url = f"{gcs_bucket}/twice.zarr"
    graph = _template(url, value=7.0)
    for _ in range(2):
        _region(url, 1)
        assert not _marker_exists(gcs_emulator, url)
        since = len(gcs_emulator.requests())
        with dask.config.set(scheduler="sync"):
            returned(lambda: dask.compute(graph))
        events = _events(gcs_emulator, since, url)
        assert _chunk_events(events), events
        assert _chunk_events_marked(events), events
        assert not _marker_exists(gcs_emulator, url)
        np.testing.assert_array_equal(_values(url), _rows([7, 7, 7, 7]))


def test_a_region_graph_computed_twice_is_marked_each_time(gcs_emulator, gcs_bucket):
    """A region write's compute=False graph (no template) computed twice: the first computation's last task took
    its mark off, so the second puts it up again before its first chunk upload, and takes it off at the end."""
    url = f"{gcs_bucket}/region-twice.zarr"
    _template(url)
    _region(url, 0)
    graph = cloudio.to_zarr(
        xr.Dataset({"v": (("t", "x"), da.full((STEP, COLS), 8.0, dtype="f4", chunks=(STEP, COLS)))}),
        url, region={"t": slice(STEP, 2 * STEP)}, consolidated=False, compute=False)
    assert _marker_exists(gcs_emulator, url)  # up since to_zarr returned: the first computation finds it there
    for _ in range(2):
        since = len(gcs_emulator.requests())
        with dask.config.set(scheduler="sync"):
            returned(lambda: dask.compute(graph))
        assert not _marker_exists(gcs_emulator, url)
    events = _events(gcs_emulator, since, url)  # the second computation's
    assert _chunk_events(events), events
    assert _chunk_events_marked(events), events
    np.testing.assert_array_equal(_values(url)[STEP:2 * STEP], 8.0)


def test_many_chunk_tasks_at_once_put_the_mark_up_once_and_take_it_off(gcs_emulator, gcs_bucket):
    """64 rows in 16 chunks, computed by 16 threads at once after a region write took the mark off: one upload
    of the marker puts it back before any chunk goes up, and it is gone afterwards."""
    url = f"{gcs_bucket}/threads.zarr"
    graph = _template(url, value=7.0, rows=64)
    _region(url, 0)
    assert not _marker_exists(gcs_emulator, url)
    since = len(gcs_emulator.requests())
    with dask.config.set(scheduler="threads", num_workers=16):
        returned(lambda: dask.compute(graph))
    events = _events(gcs_emulator, since, url)
    assert len({name for _, name, status in _chunk_events(events) if status == 200}) == 16, events
    assert _chunk_events_marked(events), events
    marker_uploads = [e for e in events if e[1] == MARKER and e[0] == "POST"]
    assert len(marker_uploads) == 1, events
    assert not _marker_exists(gcs_emulator, url)
    np.testing.assert_array_equal(_values(url), np.full((64, COLS), 7.0, dtype="f4"))


def test_a_graph_of_fill_values_deletes_chunks_only_while_marked(gcs_emulator, gcs_bucket):
    """A template of NaN (the fill value) computed after region writes: zarr deletes the regions' chunks (an
    empty chunk is not stored); those deletes happen marked too, and the store opens as the graph left it."""
    url = f"{gcs_bucket}/deletes.zarr"
    graph = _template(url, value=np.nan)
    for i in range(4):
        _region(url, i)
    assert not _marker_exists(gcs_emulator, url)
    since = len(gcs_emulator.requests())
    with dask.config.set(scheduler="sync"):
        returned(lambda: dask.compute(graph))
    events = _events(gcs_emulator, since, url)
    assert any(m == "DELETE" for m, _, _ in _chunk_events(events)), events
    assert _chunk_events_marked(events), events
    assert not _marker_exists(gcs_emulator, url)
    assert np.isnan(_values(url)).all()


def test_a_failed_put_back_of_the_mark_writes_no_chunk(gcs_emulator, gcs_bucket, fault_proxy, quick_retries):
    """A region write took the template's mark off; the graph is computed and every upload of the marker is
    refused (503): the graph fails without uploading a chunk (none unmarked); computed again it succeeds."""
    url = f"{gcs_bucket}/putback.zarr"
    graph = _template(url, value=7.0)
    _region(url, 0)
    fault_proxy.add("status", code=503, method="POST", path=r"/upload/.*name=putback\.zarr%2F\.cloudio-write",
                    times=None)
    since = len(gcs_emulator.requests())
    with dask.config.set(scheduler="threads"):
        _, err, _ = bounded(lambda: dask.compute(graph), 120)
    fault_proxy.clear()
    assert err is not None
    assert not _chunk_events(_events(gcs_emulator, since, url))
    np.testing.assert_array_equal(_values(url)[:STEP], _rows([1])[:STEP])
    since = len(gcs_emulator.requests())
    with dask.config.set(scheduler="threads"):
        returned(lambda: dask.compute(graph))
    events = _events(gcs_emulator, since, url)
    assert _chunk_events_marked(events), events
    assert not _marker_exists(gcs_emulator, url)
    np.testing.assert_array_equal(_values(url), _rows([7, 7, 7, 7]))


def test_one_refused_put_back_of_the_mark_is_retried_before_any_chunk(gcs_emulator, gcs_bucket, fault_proxy,
                                                                        quick_retries):
    url = f"{gcs_bucket}/putback1.zarr"
    graph = _template(url, value=7.0)
    _region(url, 0)
    rule = fault_proxy.add("status", code=503, method="POST",
                           path=r"/upload/.*name=putback1\.zarr%2F\.cloudio-write", times=1)
    since = len(gcs_emulator.requests())
    with dask.config.set(scheduler="threads"):
        _, err, _ = bounded(lambda: dask.compute(graph), 120)
    fault_proxy.clear()
    assert rule.hits == 1
    events = _events(gcs_emulator, since, url)
    assert _chunk_events_marked(events), events
    if err is None:
        assert not _marker_exists(gcs_emulator, url)
        np.testing.assert_array_equal(_values(url), _rows([7, 7, 7, 7]))
    else:  # failed: whatever went up went up marked, and the store says so
        assert _marker_exists(gcs_emulator, url) or not _chunk_events(events)


# -- region writes that fail ------------------------------------------------------------------------------


def test_a_region_write_failing_part_way_leaves_the_template_refused(gcs_emulator, gcs_bucket, fault_proxy,
                                                                      quick_retries):
    """Two rows of a region write go up, the third is refused (503, every try): the region write fails part way,
    and neither its mark nor the template's comes off."""
    url = f"{gcs_bucket}/region-fails.zarr"
    _template(url)
    _region(url, 0)  # (the template's mark is off: a second template puts one up again)
    _template(url)
    part = xr.Dataset({"v": (("t", "x"), da.full((12, COLS), 3.0, dtype="f4", chunks=(STEP, COLS)))})
    fault_proxy.add("status", code=503, method="POST", path=r"/upload/.*name=region-fails\.zarr%2Fv%2Fc%2F3%2F",
                    times=None)
    with dask.config.set(scheduler="sync"), pytest.raises(cloudio.CloudioError):
        returned(lambda: cloudio.to_zarr(part, url, region={"t": slice(4, 16)}, consolidated=False), 120)
    fault_proxy.clear()
    assert _marker_exists(gcs_emulator, url)
    with pytest.raises(cloudio.IncompleteWriteError):
        cloudio.open_zarr(url, consolidated=False)


def test_a_region_write_refused_before_writing_leaves_the_template_refused(gcs_emulator, gcs_bucket):
    url = f"{gcs_bucket}/region-refused.zarr"
    _template(url)
    bad = xr.Dataset({"v": (("t", "x"), np.ones((STEP, COLS), dtype="f4"))})
    with pytest.raises(cloudio.ConfigurationError, match="dimension sizes"):  # a region past the end
        cloudio.to_zarr(bad, url, region={"t": slice(ROWS, ROWS + STEP)}, consolidated=False)
    with pytest.raises(cloudio.ConfigurationError, match="dimension sizes"):  # a region of the wrong size
        cloudio.to_zarr(bad, url, region={"t": slice(0, 2 * STEP)}, consolidated=False)
    assert _marker_exists(gcs_emulator, url)
    with pytest.raises(cloudio.IncompleteWriteError) as info:
        cloudio.open_zarr(url, consolidated=False)
    assert "compute=False" in str(info.value)


# -- region writes as graphs -------------------------------------------------------------------------------


def test_a_lazy_region_graph_computed_later_is_marked_while_it_writes(gcs_emulator, gcs_bucket, fault_proxy,
                                                                      quick_retries):
    """A region write of Dask data with compute=False (not computed yet) is no template: a later region write
    leaves its mark up; computed then and failing part way, it keeps it: the store is refused, not read half
    written; computed again, it takes it off."""
    url = f"{gcs_bucket}/lazy-region.zarr"
    _template(url)
    _region(url, 0)
    lazy = cloudio.to_zarr(
        xr.Dataset({"v": (("t", "x"), da.full((8, COLS), 6.0, dtype="f4", chunks=(STEP, COLS)))}),
        url, region={"t": slice(8, 16)}, consolidated=False, compute=False)
    _region(url, 1)
    assert _marker_exists(gcs_emulator, url)
    fault_proxy.add("status", code=403, method="POST", path=r"/upload/.*name=lazy-region\.zarr%2Fv%2Fc%2F3%2F",
                    times=None)
    with dask.config.set(scheduler="sync"), pytest.raises(cloudio.CloudioError):
        returned(lambda: dask.compute(lazy), 120)
    fault_proxy.clear()
    assert _marker_exists(gcs_emulator, url)
    with pytest.raises(cloudio.IncompleteWriteError):
        cloudio.open_zarr(url, consolidated=False)
    with dask.config.set(scheduler="sync"):
        returned(lambda: dask.compute(lazy))
    assert not _marker_exists(gcs_emulator, url)
    np.testing.assert_array_equal(_values(url), _rows([1, 2, 6, 6]))


# -- local stores ------------------------------------------------------------------------------------------


def test_a_local_template_filled_by_region_writes_opens(gcs_emulator, tmp_path):
    url = str(tmp_path / "local.zarr")
    _template(url)
    with pytest.raises(cloudio.IncompleteWriteError):
        cloudio.open_zarr(url, consolidated=False)
    for i in range(4):
        _region(url, i)
    assert not _marker_exists(gcs_emulator, url)
    np.testing.assert_array_equal(_values(url), _rows([1, 2, 3, 4]))


def test_a_local_template_graph_computed_after_a_region_write_is_marked_while_it_writes(gcs_emulator, tmp_path):
    """On a local disk: each chunk of the graph is computed by a function that looks for the marker; once the
    first chunk went up, the later chunks find it; at the end it is gone."""
    url = str(tmp_path / "local-graph.zarr")
    seen: list[bool] = []

    def block(x: np.ndarray) -> np.ndarray:
        seen.append(os.path.exists(os.path.join(url, MARKER)))
        return np.full_like(x, 7.0)

    template = xr.Dataset({"v": (("t", "x"), da.zeros((ROWS, COLS), dtype="f4", chunks=(STEP, COLS))
                                 .map_blocks(block, dtype="f4"))},
                          coords={"t": np.arange(ROWS), "x": np.arange(COLS)})
    graph = cloudio.to_zarr(template, url, mode="w", compute=False, consolidated=False,
                            encoding={"v": {"chunks": (STEP, COLS)}})
    _region(url, 0)
    assert not _marker_exists(gcs_emulator, url)
    seen.clear()
    with dask.config.set(scheduler="sync"):
        returned(lambda: dask.compute(graph))
    assert len(seen) == 4 and any(seen[1:]), seen
    assert not _marker_exists(gcs_emulator, url)
    np.testing.assert_array_equal(_values(url), _rows([7, 7, 7, 7]))


# -- a failed write, and the marks of deferred writes -------------------------------------------------------


def test_a_deferred_write_failing_part_way_stays_refused_after_a_region_write(gcs_emulator, gcs_bucket,
                                                                             fault_proxy, quick_retries):
    """A store of ``v`` (a template filled by region writes). A compute=False write adds a NumPy-backed variable
    ``w`` (mode='a'), which xarray uploads at once, and fails part way (w's last chunk refused, every try): w is
    half written, the store refused. A region write of ``v`` that succeeds afterwards must not take that failed
    write's mark off: the store stays refused (it would open with w torn)."""
    url = f"{gcs_bucket}/eager-fails.zarr"
    _template(url)
    for i in range(4):
        _region(url, i)
    assert not _marker_exists(gcs_emulator, url)
    more = xr.Dataset({"w": (("t", "x"), np.full((ROWS, COLS), 2.0, dtype="f4"))})
    fault_proxy.add("status", code=503, method="POST", path=r"/upload/.*name=eager-fails\.zarr%2Fw%2Fc%2F3%2F",
                    times=None)
    with pytest.raises(cloudio.CloudioError):
        returned(lambda: cloudio.to_zarr(more, url, mode="a", compute=False, consolidated=False,
                                         encoding={"w": {"chunks": (STEP, COLS)}}), 120)
    fault_proxy.clear()
    with pytest.raises(cloudio.IncompleteWriteError):
        cloudio.open_zarr(url, consolidated=False)
    _region(url, 0, value=5.0)
    assert _marker_exists(gcs_emulator, url)
    with pytest.raises(cloudio.IncompleteWriteError):
        cloudio.open_zarr(url, consolidated=False)


def test_a_template_rewriting_a_failed_store_opens_once_its_regions_are_written(gcs_emulator, gcs_bucket,
                                                                               fault_proxy, quick_retries):
    """A write fails part way (the store stays refused, the error says: write it again with mode='w'). The job
    is run again as xarray's template pattern: a template with mode='w' (which empties the store) and region
    writes of every row. Everything in the store is then the second run's: it opens, no marker is left."""
    url = f"{gcs_bucket}/rerun.zarr"
    full = xr.Dataset({"v": (("t", "x"), np.full((ROWS, COLS), 9.0, dtype="f4"))},
                      coords={"t": np.arange(ROWS), "x": np.arange(COLS)})
    fault_proxy.add("status", code=503, method="POST", path=r"/upload/.*name=rerun\.zarr%2Fv%2Fc%2F3%2F",
                    times=None)
    with pytest.raises(cloudio.CloudioError):
        returned(lambda: cloudio.to_zarr(full, url, mode="w", consolidated=False,
                                         encoding={"v": {"chunks": (STEP, COLS)}}), 120)
    fault_proxy.clear()
    with pytest.raises(cloudio.IncompleteWriteError):
        cloudio.open_zarr(url, consolidated=False)
    _template(url)
    for i in range(4):
        _region(url, i)
    assert not _marker_exists(gcs_emulator, url), _marker_text(gcs_emulator, url)
    np.testing.assert_array_equal(_values(url), _rows([1, 2, 3, 4]))


def test_a_group_template_filled_through_the_groups_own_url_opens(gcs_emulator, gcs_bucket):
    """The template written to group g of the store; its regions written to the same group named by its URL
    (``<store>/g``): every chunk of the group is written, and the group opens either way."""
    url = f"{gcs_bucket}/spelled.zarr"
    _template(url, group="g")
    for i in range(4):
        _region(f"{url}/g", i)
    np.testing.assert_array_equal(_values(url, group="g"), _rows([1, 2, 3, 4]))
    np.testing.assert_array_equal(_values(f"{url}/g"), _rows([1, 2, 3, 4]))


# -- a cluster ---------------------------------------------------------------------------------------------


def test_a_template_graph_computed_twice_on_a_cluster_is_marked_before_its_chunks(proc_client, gcs_emulator,
                                                                                gcs_bucket):
    """The template's graph computed on two worker processes (a region write before), then, after another
    region write, computed again: the second computation's chunks, wherever they run, go up only once the
    mark is back up."""
    url = f"{gcs_bucket}/cluster-twice.zarr"
    graph = _template(url, value=7.0, rows=32)
    for i in range(2):
        _region(url, i)
        assert not _marker_exists(gcs_emulator, url)
        since = len(gcs_emulator.requests())
        dask.compute(graph)
        events = _events(gcs_emulator, since, url)
        assert _chunk_events(events), events
        assert _chunk_events_marked(events), events
    assert not _marker_exists(gcs_emulator, url)
