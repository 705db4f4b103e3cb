"""cloudio.to_zarr / cloudio.open_zarr at the edges: encodings, concurrent appends, groups, refusals."""

from __future__ import annotations

import dask
import dask.array as da
import numpy as np
import pytest
import xarray as xr

import cloudio

pytestmark = [
    pytest.mark.filterwarnings("ignore:Consolidated metadata is currently not part:UserWarning"),
]


def test_encoding_argument_replaces_variable_encoding(gcs_bucket):
    """xarray replaces a variable's .encoding with encoding={name: ...}; the shard check must use the same grid.

    A dataset read from a sharded store carries ``shards`` in its encoding; written elsewhere with
    ``encoding={"v": {"chunks": (100,)}}`` xarray makes an unsharded array of 100-chunks, which the
    Dask chunks of 200 fit exactly.
    """
    src = f"{gcs_bucket}/src.zarr"
    dst = f"{gcs_bucket}/dst.zarr"
    data = np.arange(1000, dtype="f8")
    ds = xr.Dataset({"v": (("a",), data)})
    cloudio.to_zarr(ds, src, mode="w", zarr_format=3, consolidated=False,
                    encoding={"v": {"chunks": (50,), "shards": (250,)}})
    opened = cloudio.open_zarr(src).chunk({"a": 200})
    assert opened.v.encoding["shards"] == (250,)
    with dask.config.set(scheduler="threads"):
        cloudio.to_zarr(opened, dst, mode="w", zarr_format=3, consolidated=False, rechunk=False,
                        encoding={"v": {"chunks": (100,)}})
    got = cloudio.open_zarr(dst)
    assert got.v.encoding["chunks"] == (100,) and got.v.encoding.get("shards") is None
    assert got.v.values.tobytes() == data.tobytes()


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_group_append_guarded(gcs_bucket, zarr_format):
    url = f"{gcs_bucket}/grp.zarr"
    ds = xr.Dataset({"x": (("t",), np.arange(4.0))}, coords={"t": np.arange(4)})
    cloudio.to_zarr(ds, url, group="g", mode="w", zarr_format=zarr_format, consolidated=True)
    cloudio.to_zarr(ds.rename({"x": "y"}), url, group="g", mode="a")
    more = xr.Dataset({"x": (("t",), np.arange(4.0, 6.0)), "y": (("t",), np.arange(4.0, 6.0))},
                      coords={"t": np.arange(4, 6)})
    cloudio.to_zarr(more, url, group="g", append_dim="t")
    got = cloudio.open_zarr(url, group="g")
    assert sorted(got.data_vars) == ["x", "y"] and got.sizes["t"] == 6
    # what another process reads: the consolidated copy on the server
    cloudio._state.reset() if hasattr(cloudio, "_state") else None
    raw = xr.open_zarr(cloudio.zarr_store(url), group="g", consolidated=True)
    assert sorted(raw.data_vars) == ["x", "y"] and raw.sizes["t"] == 6


@pytest.mark.parametrize("safe_chunks", [True, False])
def test_encoding_argument_replaces_variable_encoding_rechunked(gcs_bucket, safe_chunks):
    """The same with rechunk=True (the default): cloudio's rechunk onto the stale 250-shard grid
    splits the 100-chunks it was meant to protect."""
    src = f"{gcs_bucket}/src.zarr"
    dst = f"{gcs_bucket}/dst.zarr"
    data = np.arange(1000, dtype="f8")
    cloudio.to_zarr(xr.Dataset({"v": (("a",), data)}), src, mode="w", zarr_format=3, consolidated=False,
                    encoding={"v": {"chunks": (50,), "shards": (250,)}})
    opened = cloudio.open_zarr(src).chunk({"a": 200})
    with dask.config.set(scheduler="threads"):
        cloudio.to_zarr(opened, dst, mode="w", zarr_format=3, consolidated=False, safe_chunks=safe_chunks,
                        encoding={"v": {"chunks": (100,)}})
    assert cloudio.open_zarr(dst).v.values.tobytes() == data.tobytes()



@pytest.mark.parametrize(("mode", "compute"), [("a", True), ("a", False), ("a-", True)])
def test_concurrent_append_keeps_every_variable(gcs_bucket, fault_proxy, mode, compute):
    """Two writers append different variables at once (docs/consistency.md, "Concurrent Zarr appends").

    Writer A lists the members before writer B's variable exists; its consolidated copy reaches the
    server after B's. A's write of it is guarded by generation (412, list again) whatever the mode and
    ``compute``: B's variable stays in it.
    """
    import threading
    import time

    url = f"{gcs_bucket}/race.zarr"
    key = url.split("/", 3)[3]
    ds = xr.Dataset({"x": (("t",), np.arange(4.0))}, coords={"t": np.arange(4)})
    cloudio.to_zarr(ds, url, mode="w", zarr_format=3, consolidated=True)
    # writer A's consolidated zarr.json reaches the server once writer B's write is done (the test releases it)
    release = threading.Event()
    rule = fault_proxy.add("delay", method="POST", path=rf"uploadType=\w+&name={key}%2Fzarr\.json(&|$)",
                           release=release, seconds=25)  # under the 30 s request limit: A does not send it again
    out: dict[str, object] = {}

    def writer_a() -> None:
        try:
            out["a"] = cloudio.to_zarr(xr.Dataset({"a": (("t",), np.ones(4))}), url, mode=mode,
                                       compute=compute)
        except BaseException as e:
            out["a"] = e

    t = threading.Thread(target=writer_a)
    t.start()
    try:
        deadline = time.monotonic() + 60  # A's write before its consolidation, slow on a loaded machine
        while not rule.hits and t.is_alive() and time.monotonic() < deadline:
            threading.Event().wait(0.02)
        assert rule.hits == 1, f"writer A never consolidated: {out.get('a')!r}"
        cloudio.to_zarr(xr.Dataset({"b": (("t",), np.full(4, 2.0))}), url, mode="a")  # writer B, guarded
    finally:
        release.set()
    t.join(60)
    assert not isinstance(out["a"], BaseException), out["a"]
    if not compute:
        out["a"].compute()  # type: ignore[union-attr]

    with cloudio.session("strong"):
        assert sorted(cloudio.open_zarr(url).data_vars) == ["a", "b", "x"]
    # what a fresh reader of the consolidated copy gets
    raw = xr.open_zarr(cloudio.zarr_store(url), consolidated=True)
    assert sorted(raw.data_vars) == ["a", "b", "x"]


_OTHER_PRELUDE = """
import os, sys
import numpy as np
BUCKET = os.environ["OTHER_BUCKET"]
SO = {"endpoint_url": "http://" + os.environ["STORAGE_EMULATOR_HOST"].split("://")[-1], "token": "anon"}
"""


def _other_writer(gcs_bucket: str, code: str) -> None:
    """Run ``code`` in a second Python process with plain zarr/xarray (no cloudio) against ``gcs_bucket``."""
    import os
    import subprocess
    import sys
    import textwrap

    script = _OTHER_PRELUDE + textwrap.dedent(code) + (
        "\nassert not any(m == 'cloudio' or m.startswith('cloudio.') for m in sys.modules)\n")
    env = {**os.environ, "OTHER_BUCKET": gcs_bucket.removeprefix("gs://")}
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, f"the other writer failed:\n{r.stderr[-3000:]}"


@pytest.mark.parametrize("then_attrs", [False, True])
def test_strong_group_sees_resize_behind_root_consolidated_copy(gcs_bucket, then_attrs):
    """At "strong", a consolidated copy older than a document it summarises is not trusted.

    xarray reads the consolidated copy at the store's root, also for group="g". Another process resizes
    g/a and then sets an attribute of g (plain zarr): g/zarr.json is now the newest document, and
    cloudio compares the members against it instead of against the root's copy.
    """
    url = f"{gcs_bucket}/grp.zarr"
    ds = xr.Dataset({"a": (("y", "x"), np.arange(16.0).reshape(4, 4))})
    cloudio.to_zarr(ds, url, group="g", mode="w", zarr_format=3)  # consolidated at the root
    _other_writer(gcs_bucket, """
        import zarr
        root = zarr.open_group(f"gs://{BUCKET}/grp.zarr", mode="r+", storage_options=SO, use_consolidated=False)
        g = root["g"]
        g["a"].append(np.full((2, 4), 99.0))
        if THEN_ATTRS:
            g.attrs["edited"] = "yes"
    """.replace("THEN_ATTRS", str(then_attrs)))
    with cloudio.session("strong"):
        got = cloudio.open_zarr(url, group="g")
        assert got["a"].shape == (6, 4)
        np.testing.assert_array_equal(got["a"].values[4:], np.full((2, 4), 99.0))
        assert got.attrs.get("edited") == ("yes" if then_attrs else None)


@pytest.mark.parametrize("backing", ["numpy", "dask"])
def test_region_auto_into_missing_store_is_a_cloudio_error(gcs_bucket, backing):
    """A region write needs an existing store; without one the error is cloudio's, Dask-backed or not."""
    url = f"{gcs_bucket}/missing.zarr"
    v = np.arange(10.0)
    data = da.from_array(v, chunks=5) if backing == "dask" else v
    ds = xr.Dataset({"v": (("t",), data)}, coords={"t": np.arange(10)})
    with pytest.raises(cloudio.CloudioError, match="missing.zarr"):
        cloudio.to_zarr(ds, url, region="auto", mode="r+")
    with pytest.raises(cloudio.BucketNotFoundError):
        cloudio.to_zarr(ds, "gs://cloudio-no-such-bucket-77/a.zarr", region="auto", mode="r+")


@pytest.mark.parametrize("zarr_format", [2, 3])
@pytest.mark.parametrize("backing", ["numpy", "dask"])
def test_roundtrip_times_strings_nan_attrs(gcs_bucket, zarr_format, backing):
    url = f"{gcs_bucket}/rt.zarr"
    times = np.array(["2020-01-01T00:00:00.123456789", "2020-01-02T06:00", "NaT", "2021-03-04T05:06:07"],
                     dtype="datetime64[ns]")
    vals = np.array([1.5, np.nan, -0.0, np.inf])
    strs = np.array(["a", "ünïcode", "", "long string value"], dtype=object)
    ints = np.array([1, 2, 3, 4], dtype="i8")
    wrap = (lambda a: da.from_array(a, chunks=2)) if backing == "dask" else (lambda a: a)
    ds = xr.Dataset(
        {"v": (("t",), wrap(vals), {"units": "K", "nested": [1, 2]}),
         "s": (("t",), strs),
         "i": (("t",), wrap(ints))},
        coords={"t": times, "td": (("t",), np.array([1, 2, -3, 4], dtype="timedelta64[s]"))},
        attrs={"title": "rt", "n": 3},
    )
    cloudio.to_zarr(ds, url, mode="w", zarr_format=zarr_format, consolidated=False)
    got = cloudio.open_zarr(url).load()
    assert got.t.values.tobytes() == times.tobytes()
    assert got.v.values.tobytes() == vals.tobytes()
    assert list(got.s.values) == list(strs)
    assert got.i.values.tobytes() == ints.tobytes()
    assert got.attrs == {"title": "rt", "n": 3}
    assert got.v.attrs["units"] == "K"
    # appended steps keep the encoding of the stored time axis
    more = ds.isel(t=[0, 1]).assign_coords(t=np.array(["2022-01-01T00:00:00.5", "2022-01-02"],
                                                       dtype="datetime64[ns]"))
    cloudio.to_zarr(more, url, append_dim="t")
    got = cloudio.open_zarr(url).load()
    assert got.t.values.tobytes() == np.concatenate([times, more.t.values]).tobytes()
    assert got.v.values.tobytes() == np.concatenate([vals, vals[:2]]).tobytes()


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_group_written_as_its_own_store_is_seen_through_group(gcs_bucket, zarr_format):
    """open_zarr(url, group="g") after a write to url + "/g": xarray reads the consolidated copy at url,
    which still holds g's old shapes; the copy at url/g is the one this process refreshed."""
    url = f"{gcs_bucket}/nested.zarr"
    ds = xr.Dataset({"x": (("t",), np.arange(4.0))}, coords={"t": np.arange(4)})
    cloudio.to_zarr(ds, url, group="g", mode="w", zarr_format=zarr_format, consolidated=True)
    assert cloudio.open_zarr(url, group="g").sizes["t"] == 4
    more = xr.Dataset({"x": (("t",), np.arange(4.0, 6.0))}, coords={"t": np.arange(4, 6)})
    cloudio.to_zarr(more, f"{url}/g", append_dim="t")
    assert cloudio.open_zarr(f"{url}/g").sizes["t"] == 6
    got = cloudio.open_zarr(url, group="g")
    assert got.sizes["t"] == 6
    np.testing.assert_array_equal(got.x.values, np.arange(6.0))


@pytest.fixture
def quick_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """gcsfs's back-off between retries shortened to 10 ms."""
    import asyncio
    import types

    import gcsfs.retry

    real_sleep = asyncio.sleep

    async def sleep(_seconds: float) -> None:
        await real_sleep(0.01)

    monkeypatch.setattr(gcsfs.retry, "asyncio", types.SimpleNamespace(sleep=sleep))


# zarr warns that the marker, listed as a member of g, is not a Zarr node; the point is what open_zarr returns
@pytest.mark.filterwarnings("ignore:Object at .cloudio-write-in-progress is not recognized")
def test_failed_write_to_a_group_store_refuses_open_through_group(gcs_bucket, fault_proxy, quick_retries):
    """A write to url + "/g" that failed part way leaves its marker at url/g. Opening the same data as
    open_zarr(url, group="g") must refuse it as open_zarr(url + "/g") does."""
    url = f"{gcs_bucket}/outer.zarr"
    ds = xr.Dataset({"x": (("t", "y"), np.zeros((8, 6)))}, coords={"t": np.arange(8)})
    cloudio.to_zarr(ds, url, group="g", mode="w", zarr_format=3, consolidated=False,
                    encoding={"x": {"chunks": (2, 6)}})
    fault_proxy.add("status", code=503, method="POST", path=r"/upload/.*name=outer\.zarr%2Fg%2Fx%2Fc%2F",
                    times=None, skip=2)
    with pytest.raises((cloudio.TransientError, cloudio.UploadError)):
        cloudio.to_zarr(ds.drop_vars("t") + 1.0, f"{url}/g", region={"t": slice(0, 8)}, mode="r+")
    fault_proxy.clear()
    with pytest.raises(cloudio.IncompleteWriteError):
        cloudio.open_zarr(f"{url}/g")
    with pytest.raises(cloudio.IncompleteWriteError):
        cloudio.open_zarr(url, group="g")


def test_mode_w_minus_onto_a_store_names_the_url_and_keeps_it(gcs_bucket):
    """``mode="w-"`` onto a stored dataset: a cloudio error naming the URL and the modes that would write
    (xarray's FileExistsError as the cause, and still a FileExistsError), the dataset left as it was."""
    url = f"{gcs_bucket}/kept.zarr"
    ds = xr.Dataset({"t": ("x", np.arange(4.0))})
    cloudio.to_zarr(ds, url)
    with pytest.raises(cloudio.AlreadyExistsError) as err:
        cloudio.to_zarr(ds * 2, url, mode="w-")
    assert isinstance(err.value, FileExistsError)
    assert url in str(err.value) and "mode='w'" in str(err.value), err.value
    assert isinstance(err.value.__cause__, FileExistsError)
    np.testing.assert_array_equal(cloudio.open_zarr(url).t.values, np.arange(4.0))


def test_open_zarr_of_an_array_says_to_load_it(gcs_bucket):
    """A store made by cloudio.save_array, opened with cloudio.open_zarr: cloudio's error naming the URL and
    the call that reads it (zarr's 'an array already exists' read as if something were being written)."""
    url = f"{gcs_bucket}/arr.zarr"
    cloudio.save_array(np.arange(16).reshape(4, 4), url, chunks=(2, 2))
    with pytest.raises(cloudio.ConfigurationError, match="load_array") as err:
        cloudio.open_zarr(url)
    assert url in str(err.value) and err.value.__cause__ is not None


@pytest.mark.parametrize("zarr_format", [2, 3])
@pytest.mark.parametrize("consolidated", [True, False])
def test_open_zarr_of_a_missing_group_names_the_group(gcs_bucket, zarr_format, consolidated):
    """Regression: ``cloudio.open_zarr(url, group="nope")`` on a store that exists but has no such group.

    open_zarr documents ``ObjectNotFoundError`` for "no Zarr store at url" and cloudio's errors name the URL
    and a next step. A missing group gets neither:

    * consolidated store: xarray/zarr's bare ``KeyError("'nope' not found in consolidated metadata.")``
      escapes (not a CloudioError, no URL), because ``cloudio_error`` maps only ``FileNotFoundError``;
    * ``consolidated=False``: the ``FileNotFoundError`` is mapped by ``_not_found`` to
      "gs://.../ds.zarr: no Zarr store there (no zarr.json, .zgroup or .zarray); check the URL", which is
      false (the store is there, with its zarr.json) and never mentions the group that is missing.
    """
    url = f"{gcs_bucket}/ds.zarr"
    ds = xr.Dataset({"v": (("t",), np.arange(3.0))}, coords={"t": np.arange(3)})
    cloudio.to_zarr(ds, url, mode="w", zarr_format=zarr_format, consolidated=consolidated)
    assert cloudio.open_zarr(url).v.values.tolist() == [0.0, 1.0, 2.0]  # the store itself is there

    with pytest.raises(cloudio.ObjectNotFoundError) as err:
        cloudio.open_zarr(url, group="nope", consolidated=consolidated)
    message = str(err.value)
    assert url in message
    assert "nope" in message, message  # the group that is missing, not "no Zarr store there"
