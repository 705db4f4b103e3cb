"""xarray's template pattern through cloudio: ``to_zarr(template, compute=False)`` writes the metadata and never
computes its graph; region writes then fill the store, and the store opens once they finished.

The graph of a ``compute=False`` write that is computed after all (before or after region writes) marks the
store again while its chunks go up: readers never see its half-written chunks.
"""

from __future__ import annotations

import threading

import dask
import dask.array as da
import numpy as np
import pytest
import xarray as xr
import zarr
from outcomes import returned

import cloudio
from cloudio._paths import parse_gcs

MARKER = ".cloudio-write-in-progress"  # the documented name (docs/consistency.md)


def _marker_exists(emu, url: str) -> bool:
    p = parse_gcs(f"{url}/{MARKER}")
    return emu.client.bucket(p.bucket).get_blob(p.key) is not None


def _template(url: str, value: float = 0.0):
    """A Dask-backed template of 16 rows in chunks of 4, written with compute=False: its graph (not computed)."""
    template = xr.Dataset({"v": (("t", "x"), da.full((16, 8), value, dtype="f4", chunks=(4, 8)))},
                          coords={"t": np.arange(16), "x": np.arange(8)})
    return cloudio.to_zarr(template, url, mode="w", compute=False, consolidated=False,
                            encoding={"v": {"chunks": (4, 8)}})


def _region(url: str, i: int, **kwargs) -> object:
    part = xr.Dataset({"v": (("t", "x"), np.full((4, 8), i + 1, dtype="f4"))})
    return cloudio.to_zarr(part, url, region={"t": slice(4 * i, 4 * i + 4)}, consolidated=False, **kwargs)


def test_a_template_filled_by_region_writes_opens(gcs_emulator, gcs_bucket):
    """xarray's documented pattern: the template's graph is never computed; once the region writes finished the
    store opens through cloudio with their values, and no marker is left."""
    url = f"{gcs_bucket}/filled.zarr"
    _template(url)
    for i in range(4):
        _region(url, i)
    assert not _marker_exists(gcs_emulator, url)
    got = cloudio.open_zarr(url, consolidated=False).v.values
    np.testing.assert_array_equal(got, np.repeat(np.arange(1, 5, dtype="f4"), 4)[:, None].repeat(8, 1))


def test_a_template_filled_by_region_graphs_computed_together_opens(gcs_emulator, gcs_bucket):
    """The region writes as compute=False graphs of their own, computed together: the store opens after."""
    url = f"{gcs_bucket}/filled-lazy.zarr"
    _template(url)
    graphs = [_region(url, i, compute=False) for i in range(4)]
    with dask.config.set(scheduler="threads"):
        returned(lambda: dask.compute(*graphs))
    assert not _marker_exists(gcs_emulator, url)
    assert cloudio.open_zarr(url, consolidated=False).v.values[::4, 0].tolist() == [1, 2, 3, 4]


def test_a_template_no_region_was_written_to_is_refused_saying_what_to_do(gcs_emulator, gcs_bucket):
    """Before its graph or any region write ran, the store holds metadata only: refused, and the error says that
    the graph was not computed and what finishes the store."""
    url = f"{gcs_bucket}/bare.zarr"
    _template(url)
    with pytest.raises(cloudio.IncompleteWriteError) as info:
        cloudio.open_zarr(url, consolidated=False)
    msg = str(info.value)
    assert url in msg and "compute=False" in msg and "region" in msg and "compute" in msg


def test_a_graph_computed_after_a_region_write_marks_the_store_while_it_writes(gcs_emulator, gcs_bucket,
                                                                                 fault_proxy, quick_retries):
    """A region write took the template's mark off; the template's graph is then computed after all, and fails
    part way (the last row's upload refused): the store is marked again, and refused as incomplete."""
    url = f"{gcs_bucket}/late-graph.zarr"
    graph = _template(url, value=7.0)
    _region(url, 0)
    assert not _marker_exists(gcs_emulator, url)
    fault_proxy.add("status", code=403, method="POST", path=r"/upload/.*name=late-graph\.zarr%2Fv%2Fc%2F3%2F",
                    times=None)
    with dask.config.set(scheduler="sync"), pytest.raises(cloudio.CloudioError):
        returned(graph.compute)
    fault_proxy.clear()
    assert _marker_exists(gcs_emulator, url)
    with pytest.raises(cloudio.IncompleteWriteError) as info:
        cloudio.open_zarr(url, consolidated=False)
    assert "never finished" in str(info.value)


def test_a_region_write_leaves_the_mark_of_a_graph_being_computed(gcs_emulator, gcs_bucket, fault_proxy):
    """The template's graph is being computed (one chunk's answer held) when a region write of other rows
    finishes: the graph's chunks are still going up, so the store stays marked until the graph ends."""
    url = f"{gcs_bucket}/busy.zarr"
    graph = _template(url, value=7.0)
    release = threading.Event()
    held = fault_proxy.add("late", method="POST", path=r"/upload/.*name=busy\.zarr%2Fv%2Fc%2F0%2F",
                           release=release, seconds=20, times=1)
    done = threading.Event()

    def compute() -> None:
        with dask.config.set(scheduler="threads"):
            graph.compute()
        done.set()

    worker = threading.Thread(target=compute, daemon=True)
    worker.start()
    try:
        for _ in range(400):  # the held upload reached the proxy
            if held.hits:
                break
            threading.Event().wait(0.05)
        assert held.hits == 1
        for _ in range(400):  # and the graph's other rows were answered
            if len(fault_proxy.requests(r"/upload/.*name=busy\.zarr%2Fv%2Fc%2F[123]%2F")) == 3:
                break
            threading.Event().wait(0.05)
        _region(url, 3)
        assert _marker_exists(gcs_emulator, url)
        with pytest.raises(cloudio.IncompleteWriteError):
            cloudio.open_zarr(url, consolidated=False)
    finally:
        release.set()
    worker.join(60)
    assert done.is_set()
    assert not _marker_exists(gcs_emulator, url)
    assert cloudio.open_zarr(url, consolidated=False).v.values[:, 0].tolist() == [7.0] * 12 + [4.0] * 4


def test_region_writes_through_a_groups_own_url_fill_only_that_groups_template(gcs_emulator, gcs_bucket):
    """Templates of groups g and h in one store; region writes of every row through ``<store>/g`` (not
    ``group="g"``) take off g's deferred entry only, and h's keeps the store refused (an unfinished write of
    any group refuses the store's readers); once h's regions are written too, both groups open."""
    import json

    url = f"{gcs_bucket}/groups.zarr"
    for group in ("g", "h"):
        template = xr.Dataset({"v": (("t", "x"), da.zeros((16, 8), dtype="f4", chunks=(4, 8)))})
        cloudio.to_zarr(template, url, mode="w", group=group, compute=False, consolidated=False,
                        encoding={"v": {"chunks": (4, 8)}})
    for i in range(4):
        _region(f"{url}/g", i)
    p = parse_gcs(f"{url}/{MARKER}")
    marker = json.loads(gcs_emulator.client.bucket(p.bucket).blob(p.key).download_as_bytes())
    assert [(w["group"], w.get("deferred")) for w in marker["writers"]] == [("h", True)]
    with pytest.raises(cloudio.IncompleteWriteError, match="compute=False"):
        cloudio.open_zarr(url, group="h", consolidated=False)
    for i in range(4):
        _region(url, i, group="h")
    rows = np.repeat(np.arange(1, 5, dtype="f4"), 4).tolist()
    assert not _marker_exists(gcs_emulator, url)
    for where, group in ((url, "g"), (f"{url}/g", None), (url, "h")):
        assert cloudio.open_zarr(where, group=group, consolidated=False).v.values[:, 0].tolist() == rows


def test_a_region_graph_not_computed_keeps_the_store_refused_after_other_regions(gcs_emulator, gcs_bucket):
    """A region write with compute=False is no template: while its graph has not run, the other regions' writes
    leave its mark up (its rows would read as the fill value); once it ran, the store opens whole."""
    url = f"{gcs_bucket}/pending-region.zarr"
    _template(url)
    pending = _region(url, 0, compute=False)
    for i in range(1, 4):
        _region(url, i)
    with pytest.raises(cloudio.IncompleteWriteError, match="never finished"):
        cloudio.open_zarr(url, consolidated=False)
    with dask.config.set(scheduler="sync"):
        returned(pending.compute)
    assert cloudio.open_zarr(url, consolidated=False).v.values[::4, 0].tolist() == [1, 2, 3, 4]
    assert not _marker_exists(gcs_emulator, url)


def test_a_template_whose_mark_cannot_be_deferred_still_returns_its_graph(gcs_emulator, gcs_bucket, fault_proxy,
                                                                          quick_retries, caplog):
    """The marker's update as to_zarr(compute=False) returns keeps failing (503): the call still returns the graph
    (a warning says the store stays refused until it is computed), region writes do not open the store, and
    computing the graph does."""
    url = f"{gcs_bucket}/undeferred.zarr"
    fault_proxy.add("status", code=503, method="POST", path=r"/upload/.*name=undeferred\.zarr%2F\.cloudio-write",
                    times=None, skip=1)  # the mark goes up; changing it fails
    with caplog.at_level("WARNING", logger="cloudio._zarr.store"):
        graph = _template(url, value=7.0)
    fault_proxy.clear()
    assert "stays refused until the graph is computed" in caplog.text
    _region(url, 0)
    with pytest.raises(cloudio.IncompleteWriteError, match="never finished"):
        cloudio.open_zarr(url, consolidated=False)
    with dask.config.set(scheduler="sync"):
        returned(graph.compute)
    assert cloudio.open_zarr(url, consolidated=False).v.values[:, 0].tolist() == [7.0] * 16


def test_a_region_write_that_cannot_read_the_enclosing_marker_still_succeeds(gcs_emulator, gcs_bucket,
                                                                             fault_proxy, quick_retries, caplog):
    """A region write through ``<store>/g`` whose GET of ``<store>``'s marker keeps failing (503) is done all the
    same: it returns, warns that the template stays refused, and its values are stored."""
    url = f"{gcs_bucket}/enclosing.zarr"
    template = xr.Dataset({"v": (("t", "x"), da.zeros((16, 8), dtype="f4", chunks=(4, 8)))})
    cloudio.to_zarr(template, url, mode="w", group="g", compute=False, consolidated=False,
                    encoding={"v": {"chunks": (4, 8)}})
    fault_proxy.add("status", code=503, method="GET", path=r"/o/enclosing\.zarr%2F\.cloudio-write", times=None)
    with caplog.at_level("WARNING", logger="cloudio._zarr.store"):
        returned(lambda: _region(f"{url}/g", 0))
    fault_proxy.clear()
    assert "could not take the filled template off" in caplog.text
    with pytest.raises(cloudio.IncompleteWriteError, match="compute=False"):
        cloudio.open_zarr(url, group="g", consolidated=False)
    stored = zarr.open_array(cloudio.zarr_store(f"{url}/g", read_only=True), path="v", mode="r")
    assert stored[:4, 0].tolist() == [1.0] * 4
