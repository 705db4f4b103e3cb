"""A review of the guards of ``to_zarr`` appends, region writes and added variables against a late copy (each chunk
upload carries ``ifGenerationMatch`` = the generation its object had when the write began), across the variety of
real xarray usage, against the real emulator: looking for FALSE conflicts (a legitimate write refused because the
generation it expects is wrong) and for wrong values read back.

The autouse fixture of tests/conftest.py sends guarded uploads as multipart, so fake-gcs-server enforces their
precondition as GCS does: a wrong generation fails the write here as it would on GCS.

Each test is one scenario: the write(s) succeed, the values read back exactly, and where useful the chunk uploads
in the emulator's log carry a generation. Those marked xfail name the cause found in the source.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from typing import Any

import dask
import dask.array as da
import numpy as np
import pandas as pd
import pytest
import xarray as xr
import zarr
from outcomes import Outcome, returned, uploads_logged

import cloudio

pytestmark = [
    pytest.mark.filterwarnings("ignore:Consolidated metadata is currently not part:UserWarning"),
    # a write opening the group while an append (consolidated=False, then consolidated by cloudio) has rewritten the
    # root document without its consolidated copy: xarray reads the documents instead, and warns
    pytest.mark.filterwarnings("ignore:Failed to open Zarr store with consolidated metadata:RuntimeWarning"),
]

MARKER = ".cloudio-write-in-progress"


# ---------------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------------


def _assert_guarded(emu: Any, since: int, under: str, *, at_least: int = 1) -> list[tuple[str, str | None, int]]:
    """Every upload under ``under`` since ``since`` answered 200 and carried a generation; at least ``at_least``."""
    sent = uploads_logged(emu, since, under)
    assert len(sent) >= at_least, sent
    assert all(status == 200 for *_, status in sent), f"refused uploads: {[u for u in sent if u[2] != 200]}"
    assert all(guard is not None for _, guard, _ in sent), f"unguarded: {[u for u in sent if u[1] is None]}"
    return sent


def _all_ok(emu: Any, since: int, under: str) -> None:
    sent = uploads_logged(emu, since, under)
    assert all(status == 200 for *_, status in sent), f"refused uploads: {[u for u in sent if u[2] != 200]}"


def _bucket_of(url: str) -> str:
    return url.removeprefix("gs://").split("/", 1)[0]


def _together(fns: list[Callable[[], Any]], seconds: float = 120.0) -> list[Outcome]:
    """Run ``fns`` in threads released at once; wait for all; return their outcomes."""
    gate = threading.Barrier(len(fns))

    def released(fn: Callable[[], Any]) -> Callable[[], Any]:
        def run() -> Any:
            gate.wait(30)
            return fn()
        return run

    outcomes = [Outcome(released(fn)).start() for fn in fns]
    for o in outcomes:
        assert o.finished(seconds), o.said()
    return outcomes


def _none_raised(outcomes: list[Outcome]) -> None:
    failed = [o.said() for o in outcomes if o.error is not None]
    assert not failed, failed


def _base(t: int = 16, x: int = 8, *, start: int = 0) -> xr.Dataset:
    """v (t, x) float32 = 100 * t + x, a 1-D variable u (t), a static s (x), coordinates t and x."""
    tt = np.arange(start, start + t)
    v = (100 * tt[:, None] + np.arange(x)[None, :]).astype("f4")
    return xr.Dataset({"v": (("t", "x"), v), "u": (("t",), tt.astype("i8")), "s": (("x",), np.arange(x, dtype="f8"))},
                      coords={"t": tt, "x": np.arange(x)})


def _write_base(url: str, t: int = 16, x: int = 8, chunks: tuple[int, int] = (4, 8), **kw: Any) -> xr.Dataset:
    ds = _base(t, x)
    enc = {"v": {"chunks": chunks}, "u": {"chunks": (chunks[0],)}, **kw.pop("encoding", {})}
    returned(lambda: cloudio.to_zarr(ds, url, mode="w", encoding=enc, **kw))
    return ds


def _dask(ds: xr.Dataset, **chunks: int) -> xr.Dataset:
    return ds.chunk(chunks)


# ---------------------------------------------------------------------------------------------------------------
# 1. region="auto", and region dicts mixing slices and "auto"
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backing", ["numpy", "dask"])
def test_region_auto_writes_the_rows_it_matches(gcs_emulator, gcs_bucket, backing):
    """region="auto" with a dataset carrying its coordinates t[4:12] and x: the rows found from the stored index are
    written, every chunk upload guarded, the other rows untouched."""
    url = f"{gcs_bucket}/auto-{backing}.zarr"
    ds = _write_base(url)
    part = ds.isel(t=slice(4, 12)).drop_vars("s")
    part["v"] = part.v * 0 - 7
    part["u"] = part.u * 0 - 7
    if backing == "dask":
        part = _dask(part, t=4)
    since = len(gcs_emulator.requests())
    returned(lambda: cloudio.to_zarr(part, url, region="auto"))
    _assert_guarded(gcs_emulator, since, f"auto-{backing}.zarr/v/c/", at_least=2)
    got = cloudio.open_zarr(url).load()
    want = ds.v.values.copy()
    want[4:12] = -7
    np.testing.assert_array_equal(got.v.values, want)
    np.testing.assert_array_equal(got.u.values, np.r_[0:4, [-7] * 8, 12:16])
    np.testing.assert_array_equal(got.t.values, np.arange(16))


@pytest.mark.parametrize("backing", ["numpy", "dask"])
@pytest.mark.parametrize("region", ["t-auto-x-slice", "t-slice-x-auto"])
def test_region_dicts_mixing_slices_and_auto(gcs_emulator, gcs_bucket, backing, region):
    """region={"t": "auto", "x": slice(0, 8)} and region={"t": slice(8, 12), "x": "auto"} (x a part of the stored
    x, across several chunks of x): written where they say, nothing else changed."""
    url = f"{gcs_bucket}/mix.zarr"
    ds = _write_base(url, x=16, chunks=(4, 4))
    if region == "t-auto-x-slice":
        part, reg = ds[["v"]].isel(t=slice(8, 12), x=slice(0, 8)), {"t": "auto", "x": slice(0, 8)}
        part = part.drop_vars("x")
    else:
        part, reg = ds[["v"]].isel(t=slice(8, 12), x=slice(4, 12)), {"t": slice(8, 12), "x": "auto"}
        part = part.drop_vars("t")
    part["v"] = part.v * 0 - 1
    if backing == "dask":
        part = _dask(part, x=4)
    since = len(gcs_emulator.requests())
    returned(lambda: cloudio.to_zarr(part, url, region=reg))
    _assert_guarded(gcs_emulator, since, "mix.zarr/v/c/", at_least=2)
    want = ds.v.values.copy()
    if region == "t-auto-x-slice":
        want[8:12, 0:8] = -1
    else:
        want[8:12, 4:12] = -1
    np.testing.assert_array_equal(cloudio.open_zarr(url).v.values, want)


@pytest.mark.parametrize("group", [None, "a/b"])
def test_region_auto_of_rows_off_the_chunk_grid_with_dask(gcs_emulator, gcs_bucket, group):
    """region="auto" (mode="a": partial chunks allowed) of t[6:14], Dask chunks of 3, chunks of 4 stored, at the root
    and in group "a/b": the region cloudio finds for its rechunking must be xarray's, so each chunk is written by
    one task; the values read back, nothing refused."""
    url = f"{gcs_bucket}/autooff.zarr"
    ds = _write_base(url, group=group)
    part = ds[["v", "u"]].isel(t=slice(6, 14))
    part = _dask(part * 0 - 2 + part.t, t=3)
    since = len(gcs_emulator.requests())
    returned(lambda: cloudio.to_zarr(part, url, region="auto", mode="a", group=group))
    _assert_guarded(gcs_emulator, since, "autooff.zarr/" + (f"{group}/" if group else "") + "v/c/", at_least=3)
    got = cloudio.open_zarr(url, group=group).load()
    want = ds.v.values.copy()
    want[6:14] = (np.arange(6, 14) - 2)[:, None]
    np.testing.assert_array_equal(got.v.values, want)
    np.testing.assert_array_equal(got.u.values, np.r_[0:6, np.arange(6, 14) - 2, 14:16])


# ---------------------------------------------------------------------------------------------------------------
# 2. sharded arrays, a partial shard
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backing", ["numpy", "dask"])
@pytest.mark.parametrize("rows", [(20, 28), (12, 36), (60, 64)], ids=["inside-a-shard", "across-shards", "last"])
def test_region_writes_into_a_partial_shard(gcs_emulator, gcs_bucket, backing, rows):
    """v (64, 8) in chunks of (4, 8), shards of (16, 8), zarr v3; a region write of rows that fill no shard whole
    (zarr reads the shard and writes it back): the shard uploads carry the generation listed, the values read
    back, the rest of each shard kept."""
    url = f"{gcs_bucket}/shard.zarr"
    ds = _write_base(url, t=64, chunks=(4, 8), zarr_format=3, encoding={"v": {"chunks": (4, 8), "shards": (16, 8)}})
    a, b = rows
    part = ds[["v"]].isel(t=slice(a, b)).drop_vars(["t", "x"])
    part["v"] = part.v * 0 - 3
    kw: dict[str, Any] = {}
    if backing == "dask":  # (xarray refuses Dask chunks over a part of a shard in mode "r+": partial writes
        part, kw = _dask(part, t=4), {"mode": "a"}  # need mode "a")
    since = len(gcs_emulator.requests())
    returned(lambda: cloudio.to_zarr(part, url, region={"t": slice(a, b)}, **kw))
    sent = _assert_guarded(gcs_emulator, since, "shard.zarr/v/c/")
    assert all(guard != "0" for _, guard, _ in sent), sent  # every shard was there: its generation listed
    assert {name for name, *_ in sent} == {f"shard.zarr/v/c/{i}/0" for i in range(a // 16, -(-b // 16))}
    want = ds.v.values.copy()
    want[a:b] = -3
    np.testing.assert_array_equal(cloudio.open_zarr(url).v.values, want)


def test_append_to_a_sharded_array_ending_in_a_partial_shard(gcs_emulator, gcs_bucket):
    """Two appends of 6 rows to v (20, 8), shards of (16, 8): the partial last shard is rewritten twice (the
    generation listed, then the one the first append stored), new shards need no object."""
    url = f"{gcs_bucket}/shapp.zarr"
    ds = _write_base(url, t=20, zarr_format=3, encoding={"v": {"chunks": (4, 8), "shards": (16, 8)}})
    for start in (20, 26):
        more = _base(6, start=start).drop_vars("s")
        returned(lambda more=more: cloudio.to_zarr(more, url, append_dim="t"))
    got = cloudio.open_zarr(url)
    np.testing.assert_array_equal(got.v.values, np.concatenate([ds.v.values, _base(12, start=20).v.values]))
    np.testing.assert_array_equal(got.t.values, np.arange(32))


# ---------------------------------------------------------------------------------------------------------------
# 3. Zarr v2, "/" separators, v3 with other chunk key encodings
# ---------------------------------------------------------------------------------------------------------------


LAYOUTS = {
    "v2-dot": {"zarr_format": 2, "keys": None},
    "v2-slash": {"zarr_format": 2, "keys": {"name": "v2", "separator": "/"}},
    "v3-default": {"zarr_format": 3, "keys": None},
    "v3-v2-keys": {"zarr_format": 3, "keys": {"name": "v2", "separator": "."}},
    "v3-default-dot": {"zarr_format": 3, "keys": {"name": "default", "separator": "."}},
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_region_writes_and_appends_in_every_key_layout(gcs_emulator, gcs_bucket, layout):
    """v (t, x) in chunks of (1, 4), u (t) in chunks of 1, in each Zarr format and chunk key encoding: a region
    write of rows 1 to 10 (row 1's key begins row 10's: "u/c/1" / "u/1"), then two appends, then a region write
    over the appended part. Nothing refused; every chunk upload guarded; the values read back."""
    spec = LAYOUTS[layout]
    url = f"{gcs_bucket}/{layout}.zarr"
    keys = {"chunk_key_encoding": spec["keys"]} if spec["keys"] else {}
    enc = {"v": {"chunks": (1, 4), **keys}, "u": {"chunks": (1,), **keys}}
    ds = _base(16)
    returned(lambda: cloudio.to_zarr(ds, url, mode="w", zarr_format=spec["zarr_format"], encoding=enc))
    want = ds.copy(deep=True)
    part = ds[["v", "u"]].isel(t=slice(1, 11)).drop_vars(["t", "x"])
    part["v"], part["u"] = part.v * 0 - 1, part.u * 0 - 1
    since = len(gcs_emulator.requests())
    returned(lambda: cloudio.to_zarr(part, url, region={"t": slice(1, 11)}))
    sent = _assert_guarded(gcs_emulator, since, f"{layout}.zarr/", at_least=30)
    assert all(guard != "0" for name, guard, _ in sent if MARKER not in name), sent
    want["v"][1:11] = -1
    want["u"][1:11] = -1
    for start in (16, 19):
        more = _base(3, start=start)[["v", "u"]]
        since = len(gcs_emulator.requests())
        returned(lambda more=more: cloudio.to_zarr(more, url, append_dim="t"))
        _all_ok(gcs_emulator, since, f"{layout}.zarr/")
        want = xr.concat([want, more], dim="t", data_vars="minimal", coords="minimal")
    part = want[["v", "u"]].isel(t=slice(17, 21)).drop_vars(["t", "x"]) * 0 - 2
    returned(lambda: cloudio.to_zarr(part, url, region={"t": slice(17, 21)}))
    want["v"][17:21] = -2
    want["u"][17:21] = -2
    got = cloudio.open_zarr(url).load()
    np.testing.assert_array_equal(got.v.values, want.v.values)
    np.testing.assert_array_equal(got.u.values, want.u.values)
    np.testing.assert_array_equal(got.t.values, np.arange(22))


# ---------------------------------------------------------------------------------------------------------------
# 4. appends along a non-first axis, of datetime64 times, of strings
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("nx", [12, 80], ids=["rows-listed-one-by-one", "variable-listed-whole"])
@pytest.mark.parametrize("sharded", [False, True])
@pytest.mark.parametrize("backing", ["numpy", "dask"])
def test_appends_along_an_axis_that_is_not_the_first(gcs_emulator, gcs_bucket, sharded, backing, nx):
    """w (x, t) in chunks of (4, 4) (shards (8, 8)), appended along t (its second axis) three times by 5, 3 and 9:
    every row of chunks along x (3 rows, or 20: w listed whole, its document with it) has a partial last chunk
    rewritten and new ones added."""
    url = f"{gcs_bucket}/second-{sharded}-{backing}-{nx}.zarr"
    fmt = {"zarr_format": 3, "encoding": {"w": {"chunks": (4, 4), "shards": (8, 8)}}} if sharded else \
        {"encoding": {"w": {"chunks": (4, 4)}}}

    def part(start: int, n: int) -> xr.Dataset:
        tt = np.arange(start, start + n)
        w = (1000 * np.arange(nx)[:, None] + tt[None, :]).astype("f8")
        out = xr.Dataset({"w": (("x", "t"), w)}, coords={"t": tt, "x": np.arange(nx)})
        return _dask(out, t=4) if backing == "dask" else out

    returned(lambda: cloudio.to_zarr(part(0, 6), url, mode="w", **fmt))
    start = 6
    for n in (5, 3, 9):
        since = len(gcs_emulator.requests())
        returned(lambda s=start, n=n: cloudio.to_zarr(part(s, n).drop_vars("x"), url, append_dim="t"))
        _assert_guarded(gcs_emulator, since, url.split("/")[-1] + "/w/c/")
        start += n
    got = cloudio.open_zarr(url).load()
    np.testing.assert_array_equal(got.w.values, part(0, start).w.values)
    np.testing.assert_array_equal(got.t.values, np.arange(start))


@pytest.mark.parametrize("fmt", [3, 2])
def test_appends_of_datetime64_times(gcs_emulator, gcs_bucket, fmt):
    """A daily time coordinate (encoded with units xarray chose) and v (time, x), appended three times, the last
    with Dask: times and values read back exactly."""
    url = f"{gcs_bucket}/times.zarr"
    times = pd.date_range("2024-01-30", periods=20, freq="D")

    def part(a: int, b: int) -> xr.Dataset:
        return xr.Dataset({"v": (("time", "x"), np.arange(a * 4, b * 4, dtype="f4").reshape(b - a, 4))},
                          coords={"time": times[a:b], "x": np.arange(4)})

    returned(lambda: cloudio.to_zarr(part(0, 5), url, mode="w", zarr_format=fmt,
                                     encoding={"v": {"chunks": (3, 4)}, "time": {"chunks": (3,)}}))
    for a, b in ((5, 9), (9, 10), (10, 20)):
        p = part(a, b).drop_vars("x")
        if b == 20:
            p = _dask(p, time=3)
        since = len(gcs_emulator.requests())
        returned(lambda p=p: cloudio.to_zarr(p, url, append_dim="time"))
        _assert_guarded(gcs_emulator, since, "times.zarr/time/" + ("c/" if fmt == 3 else ""))
    got = cloudio.open_zarr(url).load()
    np.testing.assert_array_equal(got.time.values, times.values)
    np.testing.assert_array_equal(got.v.values, part(0, 20).v.values)


@pytest.mark.filterwarnings("ignore:The data type:zarr.errors.UnstableSpecificationWarning")
@pytest.mark.parametrize("fmt", [3, 2])
@pytest.mark.parametrize("kind", ["unicode", "object"])
def test_appends_and_region_writes_of_strings(gcs_emulator, gcs_bucket, kind, fmt):
    """A string variable name (t) (numpy unicode, or Python strings in an object array) beside v: appended twice
    (longer strings the second time), then a region write of the names: the strings read back."""
    url = f"{gcs_bucket}/str-{kind}.zarr"

    def names(a: int, b: int, tag: str) -> np.ndarray:
        out = np.array([f"{tag}{i:02d}" for i in range(a, b)])
        return out.astype(object) if kind == "object" else out

    def part(a: int, b: int, tag: str = "n") -> xr.Dataset:
        return xr.Dataset({"name": (("t",), names(a, b, tag)),
                           "v": (("t",), np.arange(a, b, dtype="f4"))}, coords={"t": np.arange(a, b)})

    returned(lambda: cloudio.to_zarr(part(0, 6), url, mode="w", zarr_format=fmt,
                                     encoding={"name": {"chunks": (4,)}, "v": {"chunks": (4,)}}))
    returned(lambda: cloudio.to_zarr(part(6, 9), url, append_dim="t"))
    if kind == "object":  # fixed-width strings cannot grow; Python strings can
        returned(lambda: cloudio.to_zarr(part(9, 13, "longer-name-"), url, append_dim="t"))
    else:
        returned(lambda: cloudio.to_zarr(part(9, 13), url, append_dim="t"))
    region = part(2, 10, "r").drop_vars("t")
    returned(lambda: cloudio.to_zarr(region, url, region={"t": slice(2, 10)}))
    got = cloudio.open_zarr(url).load()
    tail = [f"longer-name-{i}" for i in range(10, 13)] if kind == "object" else [f"n{i}" for i in range(10, 13)]
    assert list(got.name.values) == ["n00", "n01"] + [f"r{i:02d}" for i in range(2, 10)] + tail
    np.testing.assert_array_equal(got.v.values, np.arange(13))


# ---------------------------------------------------------------------------------------------------------------
# 5. several writes in a row: one store object, URLs; append, region over it, append
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("through", ["store-object", "url", "vsigs"])
def test_several_appends_in_a_row(gcs_emulator, gcs_bucket, through):
    """Five appends of 3 rows (chunks of 4: each rewrites the partial chunk the one before left) through one
    cloudio.zarr_store object, or through the URL (gs:// or /vsigs/) each time: none refused, each guarded."""
    url = f"{gcs_bucket}/row-{through}.zarr"
    _write_base(url, t=2)
    target = cloudio.zarr_store(url) if through == "store-object" else \
        url.replace("gs://", "/vsigs/") if through == "vsigs" else url
    for i in range(5):
        more = _base(3, start=2 + 3 * i).drop_vars("s")
        since = len(gcs_emulator.requests())
        returned(lambda more=more: cloudio.to_zarr(more, target, append_dim="t"))
        _assert_guarded(gcs_emulator, since, f"row-{through}.zarr/v/c/")
    got = cloudio.open_zarr(url).load()
    want = _base(17)
    np.testing.assert_array_equal(got.v.values, want.v.values)
    np.testing.assert_array_equal(got.u.values, want.u.values)
    np.testing.assert_array_equal(got.t.values, want.t.values)


@pytest.mark.parametrize("through", ["store-object", "url"])
@pytest.mark.parametrize("backing", ["numpy", "dask"])
def test_append_then_region_write_over_it_then_append(gcs_emulator, gcs_bucket, through, backing):
    """An append of 6 rows, a region write over the appended rows (and two before), another append: the region
    write needs the generations the append stored, the second append those the region write stored."""
    url = f"{gcs_bucket}/ara-{through}-{backing}.zarr"
    _write_base(url, t=10)
    target = cloudio.zarr_store(url) if through == "store-object" else url

    def maybe_dask(ds: xr.Dataset) -> xr.Dataset:
        return _dask(ds, t=2) if backing == "dask" else ds

    returned(lambda: cloudio.to_zarr(maybe_dask(_base(6, start=10).drop_vars("s")), target, append_dim="t"))
    region = _base(8, start=8)[["v", "u"]].drop_vars(["t", "x"]) * 0 - 5
    returned(lambda: cloudio.to_zarr(maybe_dask(region), target, region={"t": slice(8, 16)}))
    returned(lambda: cloudio.to_zarr(maybe_dask(_base(3, start=16).drop_vars("s")), target, append_dim="t"))
    got = cloudio.open_zarr(url).load()
    want = _base(19)
    want["v"][8:16] = -5
    want["u"][8:16] = -5
    np.testing.assert_array_equal(got.v.values, want.v.values)
    np.testing.assert_array_equal(got.u.values, want.u.values)
    np.testing.assert_array_equal(got.t.values, np.arange(19))


# ---------------------------------------------------------------------------------------------------------------
# 6. groups
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", [3, 2])
def test_appends_and_region_writes_in_a_nested_group(gcs_emulator, gcs_bucket, fmt):
    """group="a/b" (and a sibling root dataset with the same variable names): an append, a region write over it,
    an added variable, another append; the root's variables are untouched."""
    url = f"{gcs_bucket}/grp{fmt}.zarr"
    root = _write_base(url, t=8, zarr_format=fmt)
    inner = _base(8) * 2
    returned(lambda: cloudio.to_zarr(inner, url, group="a/b", mode="w", zarr_format=fmt,
                                     encoding={"v": {"chunks": (4, 8)}, "u": {"chunks": (4,)}}))
    since = len(gcs_emulator.requests())
    returned(lambda: cloudio.to_zarr(_base(3, start=8).drop_vars("s"), url, group="a/b", append_dim="t"))
    _assert_guarded(gcs_emulator, since, f"grp{fmt}.zarr/a/b/v/")
    region = _base(5, start=6)[["v"]].drop_vars(["t", "x"]) * 0 - 4
    returned(lambda: cloudio.to_zarr(region, url, group="a/b", region={"t": slice(6, 11)}))
    w = xr.Dataset({"w": (("t",), np.arange(11.0))})
    returned(lambda: cloudio.to_zarr(w, url, group="a/b", mode="a"))
    last = _base(2, start=11).drop_vars("s").assign(w=(("t",), np.array([11.0, 12.0])))
    returned(lambda: cloudio.to_zarr(last, url, group="a/b", append_dim="t"))
    got = cloudio.open_zarr(url, group="a/b").load()
    want = np.concatenate([inner.v.values, _base(5, start=8).v.values])
    want[6:11] = -4
    np.testing.assert_array_equal(got.v.values, want)
    np.testing.assert_array_equal(got.t.values, np.arange(13))
    np.testing.assert_array_equal(got.w.values, np.arange(13.0))
    top = cloudio.open_zarr(url).load()
    np.testing.assert_array_equal(top.v.values, root.v.values)


# ---------------------------------------------------------------------------------------------------------------
# 7. concurrent writers that must not refuse each other
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("through", ["url", "one-store-object"])
def test_threads_each_adding_its_own_variable_at_once(gcs_emulator, gcs_bucket, through):
    """Six threads started together, each adding its own variable w{i} (t, x) with mode="a" to one store, each
    dataset carrying the stored coordinates t and x and the static s (rewritten alike by all): none refused,
    every variable reads back."""
    url = f"{gcs_bucket}/adders-{through}.zarr"
    ds = _write_base(url)
    shared = cloudio.zarr_store(url) if through == "one-store-object" else None

    def add(i: int) -> None:
        new = ds[["s"]].assign(**{f"w{i}": (("t", "x"), np.full((16, 8), i, "f4"))})
        cloudio.to_zarr(new, shared if shared is not None else url, mode="a",
                        encoding={f"w{i}": {"chunks": (4, 8)}})

    _none_raised(_together([lambda i=i: add(i) for i in range(6)]))
    got = cloudio.open_zarr(url).load()
    for i in range(6):
        np.testing.assert_array_equal(got[f"w{i}"].values, np.full((16, 8), i, "f4"))
    np.testing.assert_array_equal(got.v.values, ds.v.values)


def test_threads_each_adding_its_own_variable_along_a_new_dimension(gcs_emulator, gcs_bucket):
    """Four threads at once, each adding w{i} (t, y) where y is a dimension not stored yet and without a coordinate
    (a new coordinate y written by all at once is refused by zarr itself, ContainsArrayError, as plain xarray
    refuses it: not a legitimate concurrent write): none refused."""
    url = f"{gcs_bucket}/newdim.zarr"
    ds = _write_base(url)

    def add(i: int) -> None:
        new = xr.Dataset({f"w{i}": (("t", "y"), np.full((16, 3), i, "f4"))}, coords={"t": ds.t})
        cloudio.to_zarr(new, url, mode="a")

    _none_raised(_together([lambda i=i: add(i) for i in range(4)]))
    got = cloudio.open_zarr(url).load()
    for i in range(4):
        np.testing.assert_array_equal(got[f"w{i}"].values, np.full((16, 3), i, "f4"))


def test_processes_each_adding_its_own_variable_at_once(gcs_emulator, gcs_bucket, tmp_path):
    """Four Python processes (cloudio in each, preconditions enforced as here) add their own variable with
    mode="a" to one store, released together once all have imported: none refused, every variable reads back."""
    url = f"{gcs_bucket}/procs.zarr"
    _write_base(url)
    go = tmp_path / "go"
    script = textwrap.dedent(f"""
        import pathlib, sys, time
        import numpy as np, xarray as xr
        import cloudio
        from cloudio._gcs import fast
        fast.EXPECTED_AS_MULTIPART = True
        i = int(sys.argv[1])
        new = xr.Dataset({{f"p{{i}}": (("t", "x"), np.full((16, 8), i, "f4"))}},
                         coords={{"t": np.arange(16), "x": np.arange(8)}})
        pathlib.Path({str(tmp_path)!r}, f"ready-{{i}}").touch()
        while not pathlib.Path({str(go)!r}).exists():
            time.sleep(0.01)
        cloudio.to_zarr(new, {url!r}, mode="a", encoding={{f"p{{i}}": {{"chunks": (4, 8)}}}})
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script, str(i)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=dict(os.environ)) for i in range(4)]
    try:
        deadline = time.monotonic() + 120
        while len(list(tmp_path.glob("ready-*"))) < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        go.touch()
        results = [p.communicate(timeout=180) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    failed = [(p.returncode, err[-2000:]) for p, (_, err) in zip(procs, results, strict=True) if p.returncode]
    assert not failed, failed
    got = cloudio.open_zarr(url).load()
    for i in range(4):
        np.testing.assert_array_equal(got[f"p{i}"].values, np.full((16, 8), i, "f4"))


@pytest.mark.parametrize("through", ["url", "one-store-object"])
@pytest.mark.parametrize("t", [16, 80], ids=["rows-listed-one-by-one", "variable-listed-whole"])
@pytest.mark.parametrize("backing", ["numpy", "dask"])
def test_disjoint_region_writes_along_a_non_first_axis_at_once(gcs_emulator, gcs_bucket, through, t, backing):
    """v (t, x=128) in chunks of (4, 32); four threads at once, each writing region {"x": slice(32 i, 32 i + 32)}
    (all rows of t: every writer lists the same rows of chunks along the first axis, or with 20 rows the whole
    variable, its metadata document included): they share no chunk, so none may be refused, and each part reads
    back."""
    url = f"{gcs_bucket}/cols-{through}-{t}-{backing}.zarr"
    ds = _write_base(url, t=t, x=128, chunks=(4, 32))
    shared = cloudio.zarr_store(url) if through == "one-store-object" else None

    def write(i: int) -> None:
        part = xr.Dataset({"v": (("t", "x"), np.full((t, 32), i + 1, "f4"))})
        if backing == "dask":
            part = _dask(part, t=8)
        cloudio.to_zarr(part, shared if shared is not None else url, region={"x": slice(32 * i, 32 * i + 32)})

    since = len(gcs_emulator.requests())
    _none_raised(_together([lambda i=i: write(i) for i in range(4)]))
    got = cloudio.open_zarr(url).v.values
    np.testing.assert_array_equal(got, np.repeat(np.arange(1, 5, dtype="f4"), 32)[None, :].repeat(t, 0))
    assert ds.sizes["x"] == 128
    _assert_guarded(gcs_emulator, since, url.split("/")[-1] + "/v/c/", at_least=t)


def test_disjoint_region_writes_along_both_axes_at_once(gcs_emulator, gcs_bucket):
    """Sixteen threads at once, each writing one (4, 4) block of v (16, 16) in chunks of (4, 4) (4 writers per row
    of chunks, each listing the same row): none refused, every block reads back."""
    url = f"{gcs_bucket}/blocks.zarr"
    _write_base(url, x=16, chunks=(4, 4))

    def write(i: int, j: int) -> None:
        part = xr.Dataset({"v": (("t", "x"), np.full((4, 4), 10 * i + j, "f4"))})
        cloudio.to_zarr(part, url, region={"t": slice(4 * i, 4 * i + 4), "x": slice(4 * j, 4 * j + 4)})

    _none_raised(_together([lambda i=i, j=j: write(i, j) for i in range(4) for j in range(4)]))
    got = cloudio.open_zarr(url).v.values
    want = np.kron(10 * np.arange(4)[:, None] + np.arange(4)[None, :], np.ones((4, 4))).astype("f4")
    np.testing.assert_array_equal(got, want)


def test_an_append_and_a_region_write_of_older_rows_at_once(gcs_emulator, gcs_bucket):
    """An append of 8 rows and a region write of rows 0 to 8, at once, three rounds: they share no chunk (the
    append lists the rows it adds and v's document; the region write its own rows): none refused."""
    url = f"{gcs_bucket}/apreg.zarr"
    _write_base(url)
    for r in range(3):
        n = 16 + 8 * r
        part = xr.Dataset({"v": (("t", "x"), np.full((8, 8), -r - 1, "f4"))})
        more = _base(8, start=n).drop_vars("s")
        _none_raised(_together([lambda m=more: cloudio.to_zarr(m, url, append_dim="t"),
                                lambda p=part: cloudio.to_zarr(p, url, region={"t": slice(0, 8)})]))
    got = cloudio.open_zarr(url).load()
    want = _base(40)
    want["v"][:8] = -3
    np.testing.assert_array_equal(got.v.values, want.v.values)


def test_an_append_and_an_added_variable_at_once(gcs_emulator, gcs_bucket):
    """An append along t and a writer adding a static variable z (x) with the coordinate x (both rewrite x whole,
    alike), at once, three rounds: none refused."""
    url = f"{gcs_bucket}/apadd.zarr"
    ds = _write_base(url)
    for r in range(3):
        more = _base(4, start=16 + 4 * r).drop_vars("s")
        z = ds[["s"]].rename(s=f"z{r}")
        _none_raised(_together([lambda m=more: cloudio.to_zarr(m, url, append_dim="t"),
                                lambda z=z: cloudio.to_zarr(z, url, mode="a")]))
    got = cloudio.open_zarr(url).load()
    np.testing.assert_array_equal(got.v.values, _base(28).v.values)
    for r in range(3):
        np.testing.assert_array_equal(got[f"z{r}"].values, np.arange(8.0))


def test_appends_along_different_dimensions_at_once(gcs_emulator, gcs_bucket):
    """Writer A appends a (t) along t, writer B appends b (s) along s, at once, four rounds: nothing shared but the
    group: none refused."""
    url = f"{gcs_bucket}/twodims.zarr"
    ds = xr.Dataset({"a": (("t",), np.arange(4.0)), "b": (("s",), -np.arange(4.0))},
                    coords={"t": np.arange(4), "s": np.arange(4)})
    returned(lambda: cloudio.to_zarr(ds, url, mode="w", encoding={"a": {"chunks": (3,)}, "b": {"chunks": (3,)}}))
    for r in range(4):
        lo, hi = 4 + 2 * r, 6 + 2 * r
        a = xr.Dataset({"a": (("t",), np.arange(lo, hi, dtype="f8"))}, coords={"t": np.arange(lo, hi)})
        b = xr.Dataset({"b": (("s",), -np.arange(lo, hi, dtype="f8"))}, coords={"s": np.arange(lo, hi)})
        _none_raised(_together([lambda a=a: cloudio.to_zarr(a, url, append_dim="t"),
                                lambda b=b: cloudio.to_zarr(b, url, append_dim="s")]))
    got = cloudio.open_zarr(url).load()
    np.testing.assert_array_equal(got.a.values, np.arange(12.0))
    np.testing.assert_array_equal(got.b.values, -np.arange(12.0))


def test_appends_to_two_groups_of_one_store_at_once(gcs_emulator, gcs_bucket):
    """Appends to groups g0 and g1 of one store at once (consolidated at the root: guarded, retried), three
    rounds: none refused, both groups read back."""
    url = f"{gcs_bucket}/twogroups.zarr"
    for g in ("g0", "g1"):
        returned(lambda g=g: cloudio.to_zarr(_base(4), url, group=g, mode="w" if g == "g0" else "a",
                                             encoding={"v": {"chunks": (4, 8)}, "u": {"chunks": (4,)}}))
    for r in range(3):
        more = _base(3, start=4 + 3 * r).drop_vars("s")
        _none_raised(_together([lambda g=g, m=more: cloudio.to_zarr(m, url, group=g, append_dim="t")
                                for g in ("g0", "g1")]))
    for g in ("g0", "g1"):
        np.testing.assert_array_equal(cloudio.open_zarr(url, group=g).v.values, _base(13).v.values)


def test_threads_adding_variables_through_one_store_object_several_rounds(gcs_emulator, gcs_bucket):
    """Eight threads share one cloudio.zarr_store object, each adding its own variable with mode="a", four rounds
    (xarray rewrites the root group's document in each write while others consolidate through the same object):
    none refused, every variable reads back."""
    url = f"{gcs_bucket}/shared-adders.zarr"
    ds = _write_base(url)
    store = cloudio.zarr_store(url)
    for r in range(4):
        def add(i: int, r: int = r) -> None:
            new = ds[["s"]].assign(**{f"w{r}_{i}": (("t",), np.full(16, 10 * r + i, "f4"))})
            cloudio.to_zarr(new, store, mode="a")

        _none_raised(_together([lambda i=i: add(i) for i in range(8)]))
    got = cloudio.open_zarr(url).load()
    for r in range(4):
        for i in range(8):
            np.testing.assert_array_equal(got[f"w{r}_{i}"].values, 10 * r + i)


def test_region_writes_and_added_variables_at_once(gcs_emulator, gcs_bucket):
    """Two region writes of disjoint rows and two writers adding variables, all at once: none refused."""
    url = f"{gcs_bucket}/mixed.zarr"
    ds = _write_base(url)

    def region(i: int) -> None:
        part = xr.Dataset({"v": (("t", "x"), np.full((8, 8), -i, "f4"))})
        cloudio.to_zarr(part, url, region={"t": slice(8 * i, 8 * i + 8)})

    def add(i: int) -> None:
        cloudio.to_zarr(ds[["s"]].assign(**{f"w{i}": (("t",), np.full(16, i, "f4"))}), url, mode="a")

    _none_raised(_together([lambda: region(0), lambda: region(1), lambda: add(0), lambda: add(1)]))
    got = cloudio.open_zarr(url).load()
    np.testing.assert_array_equal(got.v.values[:8], 0)
    np.testing.assert_array_equal(got.v.values[8:], -1)
    np.testing.assert_array_equal(got.w1.values, 1)


# ---------------------------------------------------------------------------------------------------------------
# 8. Dask: the threaded scheduler, compute=False
# ---------------------------------------------------------------------------------------------------------------


def test_dask_region_writes_and_appends_with_the_threaded_scheduler(gcs_emulator, gcs_bucket):
    """Dask-backed region write and append with dask's default threaded scheduler (chunks smaller than the Zarr
    chunks: cloudio rechunks): guarded, values read back."""
    url = f"{gcs_bucket}/threaded.zarr"
    ds = _write_base(url, t=32, chunks=(8, 8))
    with dask.config.set(scheduler="threads"):
        region = _dask(ds[["v", "u"]].isel(t=slice(8, 24)).drop_vars(["t", "x"]) * 0 - 9, t=2)
        since = len(gcs_emulator.requests())
        returned(lambda: cloudio.to_zarr(region, url, region={"t": slice(8, 24)}))
        _assert_guarded(gcs_emulator, since, "threaded.zarr/v/c/", at_least=2)
        more = _dask(_base(12, start=32).drop_vars("s"), t=3)
        since = len(gcs_emulator.requests())
        returned(lambda: cloudio.to_zarr(more, url, append_dim="t"))
        _assert_guarded(gcs_emulator, since, "threaded.zarr/v/c/", at_least=2)
    got = cloudio.open_zarr(url).load()
    want = _base(44)
    want["v"][8:24] = -9
    want["u"][8:24] = -9
    np.testing.assert_array_equal(got.v.values, want.v.values)
    np.testing.assert_array_equal(got.u.values, want.u.values)


@pytest.mark.parametrize("times", [1, 2])
def test_compute_false_region_write_computed_later(gcs_emulator, gcs_bucket, times):
    """to_zarr(region=..., compute=False), then compute() once or twice (a write in between through the URL, on
    other rows): nothing refused, the chunk uploads guarded, the values read back, the marker gone."""
    url = f"{gcs_bucket}/later{times}.zarr"
    ds = _write_base(url)
    region = _dask(ds[["v"]].isel(t=slice(4, 12)).drop_vars(["t", "x"]) * 0 - 6, t=4)
    delayed = cloudio.to_zarr(region, url, region={"t": slice(4, 12)}, compute=False)
    other = ds[["v"]].isel(t=slice(0, 4)).drop_vars(["t", "x"]) * 0 - 1
    returned(lambda: cloudio.to_zarr(other, url, region={"t": slice(0, 4)}))
    since = len(gcs_emulator.requests())
    for _ in range(times):
        returned(delayed.compute)
    sent = _assert_guarded(gcs_emulator, since, f"later{times}.zarr/v/c/", at_least=2 * times)
    assert len(sent) == 2 * times
    want = ds.v.values.copy()
    want[:4], want[4:12] = -1, -6
    np.testing.assert_array_equal(cloudio.open_zarr(url).v.values, want)
    assert gcs_emulator.client.bucket(_bucket_of(url)).get_blob(f"later{times}.zarr/{MARKER}") is None


@pytest.mark.parametrize("times", [1, 2])
def test_compute_false_append_computed_later(gcs_emulator, gcs_bucket, times):
    """to_zarr(append_dim="t", compute=False) (the documents resized at once), computed once or twice."""
    url = f"{gcs_bucket}/lapp{times}.zarr"
    _write_base(url, t=10)
    delayed = cloudio.to_zarr(_dask(_base(6, start=10).drop_vars("s"), t=2), url, append_dim="t", compute=False)
    for _ in range(times):
        returned(delayed.compute)
    got = cloudio.open_zarr(url).load()
    want = _base(16)
    np.testing.assert_array_equal(got.v.values, want.v.values)
    np.testing.assert_array_equal(got.t.values, want.t.values)


def test_two_compute_false_appends_computed_in_order(gcs_emulator, gcs_bucket):
    """Two appends prepared with compute=False (5 rows, then 6: they share the chunk of rows 12 to 15), computed in
    the order they were made: plain xarray writes the first graph's rows, then the second graph reads that chunk
    and adds its own (checked on a local path here). Nothing should be refused, and all 21 rows read back."""
    url = f"{gcs_bucket}/twolazy.zarr"
    _write_base(url, t=10)
    first = cloudio.to_zarr(_dask(_base(5, start=10).drop_vars("s"), t=5), url, append_dim="t", compute=False)
    second = cloudio.to_zarr(_dask(_base(6, start=15).drop_vars("s"), t=6), url, append_dim="t", compute=False)
    returned(first.compute)
    returned(second.compute)
    got = cloudio.open_zarr(url).load()
    want = _base(21)
    np.testing.assert_array_equal(got.v.values, want.v.values)
    np.testing.assert_array_equal(got.u.values, want.u.values)


def test_two_compute_false_appends_computed_in_order_plain_xarray(tmp_path):
    """The same two appends with plain xarray on a local path: all 21 rows read back (the baseline)."""
    path = str(tmp_path / "twolazy.zarr")
    _base(10).to_zarr(path, mode="w", encoding={"v": {"chunks": (4, 8)}, "u": {"chunks": (4,)}})
    first = _dask(_base(5, start=10).drop_vars("s"), t=5).to_zarr(path, append_dim="t", compute=False)
    second = _dask(_base(6, start=15).drop_vars("s"), t=6).to_zarr(path, append_dim="t", compute=False)
    first.compute()
    second.compute()
    got = xr.open_zarr(path, consolidated=False).load()
    np.testing.assert_array_equal(got.v.values, _base(21).v.values)


@pytest.mark.parametrize("order", ["in-order", "together"])
def test_compute_false_appends_on_the_chunk_grid(gcs_emulator, gcs_bucket, order):
    """Three appends of 4 rows prepared with compute=False onto chunks of 4 (no chunk shared by two of them),
    computed one by one in order or together with dask.compute: nothing refused, all rows read back."""
    url = f"{gcs_bucket}/lazygrid-{order}.zarr"
    _write_base(url, t=8)
    graphs = [cloudio.to_zarr(_dask(_base(4, start=8 + 4 * i).drop_vars("s"), t=4), url, append_dim="t",
                              compute=False) for i in range(3)]
    if order == "in-order":
        for g in graphs:
            returned(g.compute)
    else:
        returned(lambda: dask.compute(*graphs))
    got = cloudio.open_zarr(url).load()
    np.testing.assert_array_equal(got.v.values, _base(20).v.values)
    np.testing.assert_array_equal(got.u.values, _base(20).u.values)


def test_compute_false_region_write_computed_after_a_write_of_the_same_rows(gcs_emulator, gcs_bucket):
    """A region write of rows 4 to 12 prepared with compute=False; a region write of rows 4 to 8 made and finished;
    then the graph computed: the last write made wins, as with plain xarray (rows 4 to 12 read -6). Nothing of
    another writer is involved: the only change between the graph's listing and its upload is this process's own
    finished write."""
    url = f"{gcs_bucket}/lazyover.zarr"
    ds = _write_base(url)
    region = _dask(ds[["v"]].isel(t=slice(4, 12)).drop_vars(["t", "x"]) * 0 - 6, t=4)
    delayed = cloudio.to_zarr(region, url, region={"t": slice(4, 12)}, compute=False)
    first = ds[["v"]].isel(t=slice(4, 8)).drop_vars(["t", "x"]) * 0 - 1
    returned(lambda: cloudio.to_zarr(first, url, region={"t": slice(4, 8)}))
    returned(delayed.compute)
    want = ds.v.values.copy()
    want[4:12] = -6
    np.testing.assert_array_equal(cloudio.open_zarr(url).v.values, want)


@pytest.mark.parametrize("times", [1, 2])
def test_compute_false_region_write_computed_on_a_process_cluster(gcs_emulator, gcs_bucket, proc_client, times):
    """to_zarr(region=..., compute=False) computed once or twice on a dask.distributed cluster of worker processes
    (each task writes through a pickled copy of the store, carrying the generations listed): nothing refused."""
    url = f"{gcs_bucket}/cluster{times}.zarr"
    ds = _write_base(url)
    proc_client.run(_enforced_on_worker)
    region = _dask(ds[["v"]].isel(t=slice(4, 12)).drop_vars(["t", "x"]) * 0 - 8, t=4)
    delayed = cloudio.to_zarr(region, url, region={"t": slice(4, 12)}, compute=False)
    since = len(gcs_emulator.requests())
    for _ in range(times):
        returned(delayed.compute, 120)
        _forgotten(proc_client)
    # the second computation's uploads need the generations listed before the first: refused (412) by the
    # server, then taken as stored because the object holds the same bytes (transfer.py put_verified, _is)
    sent = uploads_logged(gcs_emulator, since, f"cluster{times}.zarr/v/c/")
    assert len(sent) >= 2 * times and all(guard is not None for _, guard, _ in sent), sent
    want = ds.v.values.copy()
    want[4:12] = -8
    np.testing.assert_array_equal(cloudio.open_zarr(url).v.values, want)


def test_dask_append_and_region_write_on_a_process_cluster(gcs_emulator, gcs_bucket, proc_client):
    """A Dask-backed append (its first chunk partial: read and rewritten on a worker) and a region write computed
    at once on worker processes: nothing refused, the chunk uploads guarded."""
    url = f"{gcs_bucket}/cluster-now.zarr"
    _write_base(url, t=10)
    proc_client.run(_enforced_on_worker)
    since = len(gcs_emulator.requests())
    returned(lambda: cloudio.to_zarr(_dask(_base(9, start=10).drop_vars("s"), t=3), url, append_dim="t"), 120)
    region = _dask(_base(8, start=4)[["v"]].drop_vars(["t", "x"]) * 0 - 1, t=4)
    returned(lambda: cloudio.to_zarr(region, url, region={"t": slice(4, 12)}), 120)
    _assert_guarded(gcs_emulator, since, "cluster-now.zarr/v/c/", at_least=5)
    want = _base(19)
    want["v"][4:12] = -1
    np.testing.assert_array_equal(cloudio.open_zarr(url).v.values, want.v.values)


def _forgotten(client: Any) -> None:
    """Wait until the scheduler has forgotten every task: it lets a computation's results go a moment after it
    returned, and the same graph computed again before that took them as they were (nothing uploaded again)."""
    deadline = time.monotonic() + 30
    while client.run_on_scheduler(lambda dask_scheduler: len(dask_scheduler.tasks)):
        assert time.monotonic() < deadline, "the scheduler kept the tasks of a computation that ended"
        time.sleep(0.05)


def _enforced_on_worker() -> None:
    """On a worker: guarded uploads sent as fake-gcs-server enforces them (as tests/conftest.py does here)."""
    from cloudio._gcs import fast

    fast.EXPECTED_AS_MULTIPART = True


# ---------------------------------------------------------------------------------------------------------------
# 9. variables transposed against the stored order
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backing", ["numpy", "dask"])
@pytest.mark.parametrize("write", ["region", "append"])
def test_variables_transposed_against_the_stored_order(gcs_emulator, gcs_bucket, backing, write):
    """v stored as (t, x) in chunks of (4, 4); written with dims (x, t): a region write of t[4:12] (the stored
    first axis is t, not the dataset's x), or an append along t."""
    url = f"{gcs_bucket}/tr-{write}-{backing}.zarr"
    ds = _write_base(url, x=8, chunks=(4, 4))
    if write == "region":
        part = (ds[["v"]].isel(t=slice(4, 12)).drop_vars(["t", "x"]) * 0 - 2).transpose("x", "t")
        kw: dict[str, Any] = {"region": {"t": slice(4, 12)}}
        want = ds.v.values.copy()
        want[4:12] = -2
    else:
        part = _base(6, start=16).drop_vars(["s", "x"]).transpose("x", "t")
        kw = {"append_dim": "t"}
        want = _base(22).v.values
    if backing == "dask":
        part = _dask(part, t=2, x=4)
    since = len(gcs_emulator.requests())
    returned(lambda: cloudio.to_zarr(part, url, **kw))
    _assert_guarded(gcs_emulator, since, f"tr-{write}-{backing}.zarr/v/c/", at_least=2)
    got = cloudio.open_zarr(url).v
    assert got.dims == ("t", "x")
    np.testing.assert_array_equal(got.values, want)


# ---------------------------------------------------------------------------------------------------------------
# 10. objects beyond the array's current shape
# ---------------------------------------------------------------------------------------------------------------


def test_append_back_to_a_larger_size_after_a_smaller_rewrite(gcs_emulator, gcs_bucket):
    """v written with 32 rows, rewritten with 10 rows (mode="w"), then appended back to 32 rows in two appends:
    the values read back are the new ones, never the first write's."""
    url = f"{gcs_bucket}/shrink.zarr"
    big = _base(32) * 0 + 1
    returned(lambda: cloudio.to_zarr(big, url, mode="w", encoding={"v": {"chunks": (4, 8)}}))
    _write_base(url, t=10)
    for a, b in ((10, 21), (21, 32)):
        returned(lambda a=a, b=b: cloudio.to_zarr(_base(b - a, start=a).drop_vars("s"), url, append_dim="t"))
    got = cloudio.open_zarr(url).load()
    want = _base(32)
    np.testing.assert_array_equal(got.v.values, want.v.values)
    np.testing.assert_array_equal(got.u.values, want.u.values)


def test_append_over_objects_left_beyond_the_shape(gcs_emulator, gcs_bucket):
    """v (10, 8) in chunks of (4, 8), and objects at v's chunk keys of rows 3 and 4 (beyond the shape: left by a
    writer that shrank it without deleting them): an append of 10 rows lists them and rewrites them with their
    generation. Nothing refused, the appended values read back."""
    url = f"{gcs_bucket}/left.zarr"
    ds = _write_base(url, t=10)
    bucket = gcs_emulator.client.bucket(_bucket_of(url))
    chunk = bucket.get_blob("left.zarr/v/c/0/0").download_as_bytes()
    for row in (3, 4):
        bucket.blob(f"left.zarr/v/c/{row}/0").upload_from_string(chunk)
    since = len(gcs_emulator.requests())
    returned(lambda: cloudio.to_zarr(_base(10, start=10).drop_vars("s"), url, append_dim="t"))
    sent = {name: guard for name, guard, _ in _assert_guarded(gcs_emulator, since, "left.zarr/v/c/")}
    assert sent["left.zarr/v/c/3/0"] not in (None, "0"), sent
    got = cloudio.open_zarr(url).load()
    np.testing.assert_array_equal(got.v.values, _base(20).v.values)
    assert ds.sizes["t"] == 10


def test_zarr_resize_smaller_then_append(gcs_emulator, gcs_bucket):
    """v (16, 8) resized by zarr to (6, 8) through cloudio's store (zarr deletes the chunks wholly outside; the
    partial chunk of rows 4 to 8 keeps its old rows 6 and 7 beyond the shape), then appended back to 16 rows: the
    appended rows read back."""
    url = f"{gcs_bucket}/resized.zarr"
    _write_base(url, t=16)
    group = zarr.open_group(cloudio.zarr_store(url), mode="r+")
    for name in ("v", "u", "t"):
        arr = group[name]
        arr.resize((6, *arr.shape[1:]))
    returned(lambda: cloudio.to_zarr(_base(10, start=6).drop_vars("s"), url, append_dim="t", consolidated=False))
    got = cloudio.open_zarr(url, consolidated=False).load()
    np.testing.assert_array_equal(got.v.values, _base(16).v.values)


# ---------------------------------------------------------------------------------------------------------------
# more: region writes with mode="a", appends with mode="a-", an append adding a variable, empty first writes
# ---------------------------------------------------------------------------------------------------------------


def test_region_write_with_mode_a(gcs_emulator, gcs_bucket):
    """region= with mode="a" (xarray rewrites the group's attributes then): nothing refused."""
    url = f"{gcs_bucket}/rega.zarr"
    ds = _write_base(url)
    part = ds[["v"]].isel(t=slice(4, 8)).drop_vars(["t", "x"]) * 0 - 1
    part.attrs["note"] = "region"
    returned(lambda: cloudio.to_zarr(part, url, region={"t": slice(4, 8)}, mode="a"))
    want = ds.v.values.copy()
    want[4:8] = -1
    np.testing.assert_array_equal(cloudio.open_zarr(url).v.values, want)


def test_append_with_mode_a_minus_adding_a_variable(gcs_emulator, gcs_bucket):
    """An append with mode="a-" (variables without t left alone) that also brings a new variable z (x)."""
    url = f"{gcs_bucket}/aminus.zarr"
    _write_base(url, t=8)
    more = _base(4, start=8).assign(z=(("x",), np.arange(8.0)))
    returned(lambda: cloudio.to_zarr(more, url, append_dim="t", mode="a-"))
    got = cloudio.open_zarr(url).load()
    np.testing.assert_array_equal(got.v.values, _base(12).v.values)
    np.testing.assert_array_equal(got.z.values, np.arange(8.0))


def test_append_to_a_variable_of_length_zero(gcs_emulator, gcs_bucket):
    """v stored with 0 rows, then two appends: nothing refused, the rows read back."""
    url = f"{gcs_bucket}/empty.zarr"
    returned(lambda: cloudio.to_zarr(_base(0), url, mode="w", encoding={"v": {"chunks": (4, 8)}}))
    for a, b in ((0, 5), (5, 9)):
        returned(lambda a=a, b=b: cloudio.to_zarr(_base(b - a, start=a).drop_vars("s"), url, append_dim="t"))
    np.testing.assert_array_equal(cloudio.open_zarr(url).v.values, _base(9).v.values)


def test_region_write_that_leaves_a_chunk_at_the_fill_value_then_writes_it_again(gcs_emulator, gcs_bucket):
    """A region write of NaN over a whole chunk (zarr deletes the object), then a region write over it again, then
    an append: nothing refused (the second region write finds no object there: generation 0)."""
    url = f"{gcs_bucket}/fill.zarr"
    ds = _write_base(url)
    nan = ds[["v"]].isel(t=slice(4, 8)).drop_vars(["t", "x"]) * np.nan
    returned(lambda: cloudio.to_zarr(nan, url, region={"t": slice(4, 8)}))
    assert gcs_emulator.client.bucket(_bucket_of(url)).get_blob("fill.zarr/v/c/1/0") is None
    back = ds[["v"]].isel(t=slice(2, 10)).drop_vars(["t", "x"])
    returned(lambda: cloudio.to_zarr(back, url, region={"t": slice(2, 10)}))
    returned(lambda: cloudio.to_zarr(_base(2, start=16).drop_vars("s"), url, append_dim="t"))
    np.testing.assert_array_equal(cloudio.open_zarr(url).v.values, _base(18).v.values)


# ---------------------------------------------------------------------------------------------------------------
# names with characters URLs escape; listings of more than one page
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["a b", "x+y", "p%q", "é", "k=v&w"])
def test_odd_variable_and_store_names(gcs_emulator, gcs_bucket, name):
    """A store whose path and variable name hold characters a URL escapes (the listing's prefix must name them as
    the uploads do, or it finds nothing and the upload expects no object there): a region write, an append and
    an added variable. Nothing refused, every chunk upload guarded with a generation found."""
    url = f"{gcs_bucket}/dir {name}/st+ore {name}.zarr"
    ds = xr.Dataset({name: (("t", "x"), np.arange(32.0).reshape(8, 4))}, coords={"t": np.arange(8)})
    returned(lambda: cloudio.to_zarr(ds, url, mode="w", encoding={name: {"chunks": (2, 4)}}))
    part = ds[[name]].isel(t=slice(2, 6)).drop_vars("t") * 0 - 1
    since = len(gcs_emulator.requests())
    returned(lambda: cloudio.to_zarr(part, url, region={"t": slice(2, 6)}))
    sent = _assert_guarded(gcs_emulator, since, f"dir {name}/st+ore {name}.zarr/{name}/c/", at_least=2)
    assert all(guard != "0" for _, guard, _ in sent), sent
    more = xr.Dataset({name: (("t", "x"), np.arange(32.0, 44.0).reshape(3, 4))}, coords={"t": np.arange(8, 11)})
    returned(lambda: cloudio.to_zarr(more, url, append_dim="t"))
    returned(lambda: cloudio.to_zarr(xr.Dataset({f"{name}2": (("t",), np.arange(11.0))}), url, mode="a"))
    got = cloudio.open_zarr(url).load()
    want = np.arange(44.0).reshape(11, 4)
    want[2:6] = -1
    np.testing.assert_array_equal(got[name].values, want)
    np.testing.assert_array_equal(got[f"{name}2"].values, np.arange(11.0))


def test_listings_of_more_than_one_page(gcs_emulator, gcs_bucket):
    """v (20, 120) in chunks of (1, 1): 2,400 objects. A region write of 2 rows (two row listings of 120) and one
    of all 20 rows with new values (the variable listed whole: three pages of 1,000): nothing refused, every
    upload guarded with the generation it found."""
    url = f"{gcs_bucket}/pages.zarr"
    ds = xr.Dataset({"v": (("t", "x"), np.arange(2400.0).reshape(20, 120))})
    returned(lambda: cloudio.to_zarr(ds, url, mode="w", encoding={"v": {"chunks": (1, 1)}}), 300)
    since = len(gcs_emulator.requests())
    returned(lambda: cloudio.to_zarr(ds * 0 - 1, url, region={"t": slice(0, 20)}), 300)
    sent = _assert_guarded(gcs_emulator, since, "pages.zarr/v/c/", at_least=2400)
    assert all(guard != "0" for _, guard, _ in sent), [u for u in sent if u[1] == "0"][:5]
    np.testing.assert_array_equal(cloudio.open_zarr(url).v.values, -1)


# ---------------------------------------------------------------------------------------------------------------
# the template pattern: metadata with compute=False, then region writes fill it
# ---------------------------------------------------------------------------------------------------------------


def _template(url: str) -> None:
    """xarray's template: Dask zeros written with compute=False (the metadata and coordinates only), the graph
    never computed."""
    template = xr.Dataset({"v": (("t", "x"), da.zeros((16, 8), dtype="f4", chunks=(4, 8)))},
                          coords={"t": np.arange(16), "x": np.arange(8)})
    cloudio.to_zarr(template, url, mode="w", compute=False, encoding={"v": {"chunks": (4, 8)}})


def _fill(url: str, regions: str) -> None:
    def part(i: int) -> xr.Dataset:
        return xr.Dataset({"v": (("t", "x"), da.full((4, 8), i + 1, dtype="f4", chunks=(4, 8)))})

    if regions == "at-once":
        _none_raised(_together([lambda i=i: cloudio.to_zarr(part(i), url, region={"t": slice(4 * i, 4 * i + 4)})
                                for i in range(4)]))
    else:
        graphs = [cloudio.to_zarr(part(i), url, region={"t": slice(4 * i, 4 * i + 4)}, compute=False)
                  for i in range(4)]
        returned(lambda: dask.compute(*graphs))


_FILLED = np.repeat(np.arange(1, 5, dtype="f4"), 4)[:, None].repeat(8, 1)


@pytest.mark.parametrize("regions", ["at-once", "lazy-together"])
def test_template_then_region_writes(gcs_emulator, gcs_bucket, regions):
    """xarray's documented pattern for parallel writes: the template, then region writes of disjoint rows fill it,
    from threads at once or as compute=False graphs computed together with dask.compute. Nothing refused; the
    filled values read back (through plain xarray on cloudio's store)."""
    url = f"{gcs_bucket}/template-{regions}.zarr"
    _template(url)
    _fill(url, regions)
    got = xr.open_zarr(cloudio.zarr_store(url, read_only=True), consolidated=False).v.values
    np.testing.assert_array_equal(got, _FILLED)


def test_template_then_region_writes_opens_with_cloudio(gcs_emulator, gcs_bucket):
    """The same pattern, then cloudio.open_zarr: the store is complete (every region written) and should open."""
    url = f"{gcs_bucket}/template-open.zarr"
    _template(url)
    _fill(url, "at-once")
    np.testing.assert_array_equal(cloudio.open_zarr(url).v.values, _FILLED)


# ---------------------------------------------------------------------------------------------------------------
# many variables: many listings at once; what appends rewrite whole
# ---------------------------------------------------------------------------------------------------------------


def test_a_region_write_of_many_variables_lists_many_rows_at_once(gcs_emulator, gcs_bucket):
    """60 variables (t, x) in chunks of (1, 4), a region write of 16 rows of each: 960 listings made at once as the
    write begins, then the uploads: nothing refused, every upload guarded with a generation found."""
    url = f"{gcs_bucket}/manyvars.zarr"
    names = [f"v{i:02d}" for i in range(60)]
    ds = xr.Dataset({n: (("t", "x"), np.full((20, 4), i, "f4")) for i, n in enumerate(names)})
    returned(lambda: cloudio.to_zarr(ds, url, mode="w", encoding={n: {"chunks": (1, 4)} for n in names}), 300)
    since = len(gcs_emulator.requests())
    returned(lambda: cloudio.to_zarr(ds.isel(t=slice(2, 18)) * -1, url, region={"t": slice(2, 18)}), 300)
    sent = _assert_guarded(gcs_emulator, since, "manyvars.zarr/v", at_least=960)
    assert all(guard != "0" for _, guard, _ in sent), [u for u in sent if u[1] == "0"][:5]
    got = cloudio.open_zarr(url).load()
    for i, n in enumerate(names):
        np.testing.assert_array_equal(got[n].values[2:18], -i)
        np.testing.assert_array_equal(got[n].values[[0, 1, 18, 19]], i)


@pytest.mark.parametrize("fmt", [3, 2])
def test_an_append_carrying_static_variables_and_coordinates(gcs_emulator, gcs_bucket, fmt):
    """Appends that carry the static s (x) and the coordinate x (rewritten whole by xarray, deliberately without a
    guard), with new values of s the second time: nothing refused, s holds the last append's values."""
    url = f"{gcs_bucket}/static{fmt}.zarr"
    _write_base(url, t=6, zarr_format=fmt)
    since = len(gcs_emulator.requests())
    for k, start in enumerate((6, 9)):
        more = _base(3, start=start)
        more["s"] = more.s + 10 * k
        returned(lambda more=more: cloudio.to_zarr(more, url, append_dim="t"))
    sent = uploads_logged(gcs_emulator, since, f"static{fmt}.zarr/s/")
    assert sent and all(status == 200 for *_, status in sent), sent
    got = cloudio.open_zarr(url).load()
    np.testing.assert_array_equal(got.v.values, _base(12).v.values)
    np.testing.assert_array_equal(got.s.values, np.arange(8.0) + 10)


# ---------------------------------------------------------------------------------------------------------------
# a guarded upload of an append or region write that failed once: its own retry is no conflict
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fault", ["503", "answer-lost", "answer-late"])
@pytest.mark.parametrize("write", ["region", "append", "added"])
def test_a_guarded_upload_that_failed_once_is_no_conflict(gcs_emulator, gcs_bucket, fault_proxy, monkeypatch,
                                                          fault, write):
    """The upload of v's chunk row 2 (a region write's, an append's partial chunk, an added variable's first
    chunk) fails once: a 503, an answer lost after it landed, an answer held past the time limit (it landed; the
    retry finds the generation its first try stored). The write succeeds with its values."""
    url = f"{gcs_bucket}/retry.zarr"
    ds = _write_base(url, t=10)
    name = "w" if write == "added" else "v"
    path = rf"name=retry\.zarr%2F{name}%2Fc%2F2%2F0"
    if fault == "503":
        rule = fault_proxy.add("status", code=503, method="POST", path=path, times=1)
    elif fault == "answer-lost":
        rule = fault_proxy.add("reset", method="POST", path=path, times=1)
    else:
        monkeypatch.setenv("CLOUDIO_HTTP_TIMEOUT", "1")
        rule = fault_proxy.add("late", method="POST", path=path, seconds=3, times=1)
    want = _base(10).v.values
    if write == "region":
        part = ds[["v"]].isel(t=slice(8, 10)).drop_vars(["t", "x"]) * 0 - 1
        returned(lambda: cloudio.to_zarr(part, url, region={"t": slice(8, 10)}))
        want = want.copy()
        want[8:10] = -1
    elif write == "append":
        returned(lambda: cloudio.to_zarr(_base(4, start=10).drop_vars("s"), url, append_dim="t"))
        want = _base(14).v.values
    else:
        w = xr.Dataset({"w": (("t", "x"), np.full((10, 8), 3, "f4"))})
        returned(lambda: cloudio.to_zarr(w, url, mode="a", encoding={"w": {"chunks": (4, 8)}}))
    assert rule.hits == 1
    got = cloudio.open_zarr(url).load()
    np.testing.assert_array_equal(got.v.values, want)
    if write == "added":
        np.testing.assert_array_equal(got.w.values, 3)
