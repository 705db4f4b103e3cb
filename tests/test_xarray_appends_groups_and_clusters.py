"""The xarray / Dask face: repeated appends (v2, v3, every consolidated=), appends and overwrites on thread and
process clusters, compute=False, region="auto", strings and datetimes, URL spellings, missing stores; and the
errors for a group= that is an array or a mode="w-" group write, which named the store's root and another mode
(six cases failed before the fix; found by a review)."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest
import xarray as xr

import cloudio

pytestmark = [
    pytest.mark.filterwarnings("ignore:Consolidated metadata is currently not part:UserWarning"),
]


def _step(start: int, n: int) -> xr.Dataset:
    t = np.arange(start, start + n)
    return xr.Dataset(
        {"v": (("t", "y"), (t[:, None] * 10 + np.arange(3)).astype("f8"))},
        coords={"t": t, "y": np.arange(3)},
    )


# passes: pins repeated appends (v2/v3, consolidated None/True/False) read back whole
@pytest.mark.parametrize("zarr_format", [2, 3])
@pytest.mark.parametrize("consolidated", [None, True, False])
def test_repeated_appends(gcs_bucket, zarr_format, consolidated):
    url = f"{gcs_bucket}/app.zarr"
    cloudio.to_zarr(_step(0, 2), url, mode="w", zarr_format=zarr_format, consolidated=consolidated)
    for k in range(4):
        cloudio.to_zarr(_step(2 + 3 * k, 3), url, mode="a", append_dim="t", consolidated=consolidated)
        got = cloudio.open_zarr(url, consolidated=consolidated)
        assert got.sizes["t"] == 2 + 3 * (k + 1)
    expect = xr.concat([_step(0, 2)] + [_step(2 + 3 * k, 3) for k in range(4)], dim="t")
    for c in (None, True, False):
        got = cloudio.open_zarr(url, consolidated=c).load()
        np.testing.assert_array_equal(got.t.values, expect.t.values)
        np.testing.assert_array_equal(got.v.values, expect.v.values)


def _dstep(start: int, n: int, chunk: int) -> xr.Dataset:
    ds = _step(start, n)
    return ds.chunk({"t": chunk})


# passes: pins sharded Dask appends on thread/process clusters, read in client and worker
@pytest.mark.parametrize("which", ["thread", "proc"])
def test_cluster_repeated_sharded_appends(request, gcs_bucket, which):
    client = request.getfixturevalue(f"{which}_client")
    url = f"{gcs_bucket}/clu.zarr"
    cloudio.to_zarr(_dstep(0, 7, 3), url, mode="w", zarr_format=3, consolidated=None,
                    encoding={"v": {"chunks": (2, 3), "shards": (4, 3)}})
    parts = [_step(0, 7)]
    start = 7
    for n in (5, 1, 9):
        cloudio.to_zarr(_dstep(start, n, 2), url, append_dim="t", safe_chunks=False)
        parts.append(_step(start, n))
        start += n
        got = cloudio.open_zarr(url)
        assert got.sizes["t"] == start
    expect = xr.concat(parts, dim="t")
    got = cloudio.open_zarr(url).load()
    np.testing.assert_array_equal(got.t.values, expect.t.values)
    np.testing.assert_array_equal(got.v.values, expect.v.values)
    # a worker reads the same
    def read(u):
        import cloudio as c
        g = c.open_zarr(u).load()
        return g.t.values.tolist(), g.v.values.tolist()
    t, v = client.submit(read, url, pure=False).result()
    assert t == expect.t.values.tolist() and v == expect.v.values.tolist()


# passes: pins appends made on a worker are seen by the client
@pytest.mark.parametrize("which", ["thread", "proc"])
def test_worker_appends_client_reads(request, gcs_bucket, which):
    client = request.getfixturevalue(f"{which}_client")
    url = f"{gcs_bucket}/wa.zarr"
    cloudio.to_zarr(_step(0, 4), url, mode="w", zarr_format=3)
    assert cloudio.open_zarr(url).sizes["t"] == 4

    def app(u, s, n):
        import cloudio as c
        c.to_zarr(_step(s, n), u, append_dim="t")
        return c.open_zarr(u).sizes["t"]

    assert client.submit(app, url, 4, 3, pure=False).result() == 7
    got = cloudio.open_zarr(url).load()
    assert got.sizes["t"] == 7
    np.testing.assert_array_equal(got.t.values, np.arange(7))
    assert client.submit(app, url, 7, 2, pure=False).result() == 9
    got = cloudio.open_zarr(url, consolidated=True).load()
    np.testing.assert_array_equal(got.t.values, np.arange(9))


# passes: pins an append xarray refuses up front leaves no write marker
def test_refused_append_leaves_store_readable(gcs_bucket):
    url = f"{gcs_bucket}/bad.zarr"
    cloudio.to_zarr(_step(0, 4), url, mode="w", zarr_format=3)
    bad = xr.Dataset({"v": (("t", "y"), np.zeros((2, 5)))}, coords={"t": [4, 5], "y": np.arange(5)})
    with pytest.raises(ValueError):
        cloudio.to_zarr(bad, url, append_dim="t")
    got = cloudio.open_zarr(url).load()
    assert got.sizes["t"] == 4


# passes: pins mode='w'/'w-' of one group keeps the others
@pytest.mark.parametrize("zarr_format", [2, 3])
def test_groups_written_separately(gcs_bucket, zarr_format):
    url = f"{gcs_bucket}/grps.zarr"
    cloudio.to_zarr(_step(0, 4), url, group="a", mode="w", zarr_format=zarr_format)
    cloudio.to_zarr(_step(0, 2), url, group="b", mode="w-", zarr_format=zarr_format)
    cloudio.to_zarr(_step(0, 3), url, group="b", mode="w", zarr_format=zarr_format)
    cloudio.to_zarr(_step(4, 2), url, group="a", append_dim="t")
    assert cloudio.open_zarr(url, group="a").sizes["t"] == 6
    assert cloudio.open_zarr(url, group="b").sizes["t"] == 3
    np.testing.assert_array_equal(cloudio.open_zarr(url, group="a", consolidated=True).t.values, np.arange(6))


# passes: pins ObjectNotFoundError for a prefix with objects but no Zarr metadata
def test_open_zarr_on_prefix_without_metadata(gcs_bucket, gcs_emulator):
    from cloudio._paths import parse_gcs

    url = f"{gcs_bucket}/plain"
    p = parse_gcs(url)
    gcs_emulator.client.bucket(p.bucket).blob(p.key + "/readme.txt").upload_from_string(b"hi")
    with pytest.raises(cloudio.ObjectNotFoundError, match="plain"):
        cloudio.open_zarr(url)
    with pytest.raises(cloudio.ObjectNotFoundError, match="plain"):
        cloudio.open_zarr(url, consolidated=True)
    with pytest.raises(cloudio.ObjectNotFoundError, match="plain"):
        cloudio.open_zarr(url, consolidated=False)


# passes: pins save_array/load_array across client and workers after overwrites
@pytest.mark.parametrize("which", ["thread", "proc"])
def test_save_array_overwritten_elsewhere_load(request, gcs_bucket, which):
    client = request.getfixturevalue(f"{which}_client")
    url = f"{gcs_bucket}/arr.zarr"

    def save(u, n):
        import numpy as np

        import cloudio as c
        c.save_array(np.arange(n, dtype="i4") * n, u, chunks=(4,))
        return c.load_array(u).tolist()

    def load(u):
        import cloudio as c
        return c.load_array(u).tolist()

    assert client.submit(save, url, 10, pure=False).result() == (np.arange(10) * 10).tolist()
    cloudio.save_array(np.arange(7, dtype="i4") * 7, url, chunks=(4,))
    assert client.submit(load, url, pure=False).result() == (np.arange(7) * 7).tolist()
    assert client.submit(save, url, 12, pure=False).result() == (np.arange(12) * 12).tolist()
    np.testing.assert_array_equal(cloudio.load_array(url), np.arange(12) * 12)
    lazy = cloudio.load_array(url, lazy=True)
    assert lazy.compute().tolist() == (np.arange(12) * 12).tolist()


# passes: pins an append after a plain-xarray append elsewhere
def test_other_writer_appends_between_cloudio_appends(gcs_bucket, other_writer):
    url = f"{gcs_bucket}/ow.zarr"
    cloudio.to_zarr(_step(0, 4), url, mode="w", zarr_format=3)
    assert cloudio.open_zarr(url).sizes["t"] == 4
    other_writer("""
        import xarray as xr
        t = np.arange(4, 7)
        ds = xr.Dataset({"v": (("t", "y"), (t[:, None] * 10 + np.arange(3)).astype("f8"))},
                        coords={"t": t, "y": np.arange(3)})
        ds.to_zarr(f"gs://{BUCKET}/ow.zarr", append_dim="t", storage_options=SO)
    """)
    cloudio.to_zarr(_step(7, 2), url, append_dim="t")
    for c in (None, True, False):
        got = cloudio.open_zarr(url, consolidated=c).load()
        np.testing.assert_array_equal(got.t.values, np.arange(9))
        np.testing.assert_array_equal(got.v.values, xr.concat([_step(0, 9)], "t").v.values)


# passes: pins ObjectNotFoundError for a missing store at every consolidated/level
@pytest.mark.parametrize("consolidated", [None, True, False])
@pytest.mark.parametrize("level", ["session", "strong"])
def test_open_zarr_missing_store_errors(gcs_bucket, consolidated, level):
    url = f"{gcs_bucket}/missing.zarr"
    with cloudio.session(level):
        with pytest.raises(cloudio.ObjectNotFoundError, match="missing.zarr"):
            cloudio.open_zarr(url, consolidated=consolidated)


# passes: pins load_array of a dataset root / missing store errors
@pytest.mark.parametrize("lazy", [False, True])
def test_load_array_of_dataset_or_missing(gcs_bucket, lazy):
    url = f"{gcs_bucket}/ds.zarr"
    cloudio.to_zarr(_step(0, 3), url, mode="w", zarr_format=3)
    with pytest.raises(cloudio.ConfigurationError, match="ds.zarr"):
        cloudio.load_array(url, lazy=lazy)
    with pytest.raises(cloudio.ObjectNotFoundError, match="none.zarr"):
        cloudio.load_array(f"{gcs_bucket}/none.zarr", lazy=lazy)
    np.testing.assert_array_equal(cloudio.load_array(f"{url}/v", lazy=lazy), _step(0, 3).v.values)


# passes: pins compute=False appends on clusters, then a mode='w' rewrite
@pytest.mark.parametrize("which", ["thread", "proc"])
def test_cluster_compute_false_append(request, gcs_bucket, which):
    request.getfixturevalue(f"{which}_client")
    url = f"{gcs_bucket}/cf.zarr"
    cloudio.to_zarr(_dstep(0, 4, 2), url, mode="w", zarr_format=3,
                    encoding={"v": {"chunks": (2, 3), "shards": (4, 3)}})
    d = cloudio.to_zarr(_dstep(4, 6, 3), url, append_dim="t", compute=False, safe_chunks=False)
    d.compute()
    got = cloudio.open_zarr(url).load()
    np.testing.assert_array_equal(got.t.values, np.arange(10))
    np.testing.assert_array_equal(got.v.values, _step(0, 10).v.values)
    d = cloudio.to_zarr(_dstep(10, 2, 2), url, append_dim="t", compute=False)
    d.compute()
    got = cloudio.open_zarr(url, consolidated=True).load()
    np.testing.assert_array_equal(got.t.values, np.arange(12))
    # rewrite whole: the old data must be gone
    cloudio.to_zarr(_dstep(100, 3, 3), url, mode="w", zarr_format=3)
    got = cloudio.open_zarr(url).load()
    np.testing.assert_array_equal(got.t.values, np.arange(100, 103))


# passes: pins region='auto' behind a stale consolidated copy
@pytest.mark.parametrize("zarr_format", [2, 3])
def test_region_auto_numpy_after_appends(gcs_bucket, zarr_format):
    url = f"{gcs_bucket}/ra.zarr"
    cloudio.to_zarr(_step(0, 4), url, mode="w", zarr_format=zarr_format, consolidated=True)
    cloudio.to_zarr(_step(4, 4), url, append_dim="t", consolidated=False)
    upd = _step(5, 2)
    upd["v"] = -upd["v"]
    cloudio.to_zarr(upd.drop_vars("y"), url, region="auto")
    got = cloudio.open_zarr(url).load()
    exp = _step(0, 8).v.values.copy()
    exp[5:7] *= -1
    np.testing.assert_array_equal(got.v.values, exp)


# passes: pins datetimes, strings, NaN fill values, attrs through Dask appends
@pytest.mark.parametrize("zarr_format", [2, 3])
def test_dask_strings_times_append(gcs_bucket, zarr_format):
    url = f"{gcs_bucket}/st.zarr"

    def mk(start, n):
        t = np.datetime64("2020-01-01") + np.arange(start, start + n).astype("timedelta64[D]")
        s = np.array([f"s{i}" * (i % 3 + 1) for i in range(start, start + n)], dtype=object)
        f = np.where(np.arange(start, start + n) % 2, np.nan, np.arange(start, start + n, dtype="f4"))
        return xr.Dataset({"s": (("t",), s), "f": (("t",), da.from_array(f.astype("f4"), chunks=2),
                                                   {"units": "m"})},
                          coords={"t": t}, attrs={"k": "v"})

    cloudio.to_zarr(mk(0, 4), url, mode="w", zarr_format=zarr_format,
                    encoding={"f": {"_FillValue": -9999.0}})
    cloudio.to_zarr(mk(4, 3), url, append_dim="t")
    cloudio.to_zarr(mk(7, 5), url, append_dim="t")
    got = cloudio.open_zarr(url).load()
    exp = mk(0, 12)
    assert got.attrs == {"k": "v"} and got.f.attrs["units"] == "m"
    np.testing.assert_array_equal(got.t.values, exp.t.values)
    assert list(got.s.values) == list(exp.s.values)
    np.testing.assert_array_equal(got.f.values, exp.f.values)


# passes: pins gs://, trailing slash, /vsigs/ and https forms share the staleness record
@pytest.mark.parametrize("form", ["slash", "vsigs", "https"])
def test_url_forms_share_staleness(gcs_bucket, form):
    url = f"{gcs_bucket}/forms.zarr"
    bucket = gcs_bucket.removeprefix("gs://")
    other = {"slash": url + "/", "vsigs": f"/vsigs/{bucket}/forms.zarr",
             "https": f"https://storage.googleapis.com/{bucket}/forms.zarr",
             "double": f"{gcs_bucket}//forms.zarr"}[form]
    cloudio.to_zarr(_step(0, 4), url, mode="w", zarr_format=2, consolidated=True)
    assert cloudio.open_zarr(other).sizes["t"] == 4
    cloudio.to_zarr(_step(4, 3), other, append_dim="t", consolidated=False)
    assert cloudio.open_zarr(url, consolidated=True).sizes["t"] == 7
    cloudio.to_zarr(_step(7, 2), url, append_dim="t", consolidated=False)
    assert cloudio.open_zarr(other, consolidated=True).sizes["t"] == 9


def _w_open(u, consolidated=None):
    import cloudio as c
    g = c.open_zarr(u, consolidated=consolidated).load()
    return g.sizes["t"], sorted(g.data_vars), g.t.values.tolist()


def _w_append(u, s, n, consolidated):
    import cloudio as c
    ds = _step(s, n)
    c.to_zarr(ds.assign(w=ds.v), u, append_dim="t", consolidated=consolidated)
    return 1


def _w_newvar(u, consolidated):
    import cloudio as c
    c.to_zarr(_step(0, 7).rename({"v": "w"}), u, mode="a", consolidated=consolidated)
    return 1


# passes: pins stale consolidated copies are not trusted across the cluster
@pytest.mark.parametrize("which", ["thread", "proc"])
@pytest.mark.parametrize("zarr_format", [2, 3])
def test_cluster_stale_consolidated_copy(request, gcs_bucket, which, zarr_format):
    client = request.getfixturevalue(f"{which}_client")
    url = f"{gcs_bucket}/sc.zarr"
    cloudio.to_zarr(_step(0, 4), url, mode="w", zarr_format=zarr_format, consolidated=True)
    assert client.submit(_w_open, url, pure=False).result()[0] == 4
    # client appends, consolidated copy left stale: workers must not trust it
    cloudio.to_zarr(_step(4, 3), url, append_dim="t", consolidated=False)
    for c in (None, True):
        assert client.submit(_w_open, url, c, pure=False).result() == (7, ["v"], list(range(7)))
    # worker adds a variable without consolidating: the client must see it
    assert cloudio.open_zarr(url).sizes["t"] == 7
    client.submit(_w_newvar, url, False, pure=False).result()
    for c in (None, True):
        got = cloudio.open_zarr(url, consolidated=c)
        assert sorted(got.data_vars) == ["v", "w"]
    # worker appends without consolidating: the client and the other worker see it
    client.submit(_w_append, url, 7, 2, False, pure=False).result()
    got = cloudio.open_zarr(url, consolidated=True)
    assert got.sizes["t"] == 9
    for w in client.scheduler_info()["workers"]:
        assert client.submit(_w_open, url, True, workers=[w], pure=False).result()[0] == 9


@pytest.mark.parametrize("zarr_format", [2, 3])
@pytest.mark.parametrize("consolidated", [None, False])
def test_open_zarr_group_that_is_an_array(gcs_bucket, zarr_format, consolidated):
    url = f"{gcs_bucket}/ga.zarr"
    cloudio.to_zarr(_step(0, 3), url, mode="w", zarr_format=zarr_format, consolidated=consolidated)
    with pytest.raises(cloudio.CloudioError) as err:
        cloudio.open_zarr(url, group="v", consolidated=consolidated)
    msg = str(err.value)
    assert f"{url}/v" in msg or "'v'" in msg, msg
    # it must not tell the user to load the store's root, a group, as an array
    assert f"load_array({url!r})" not in msg, msg


@pytest.mark.parametrize("mode", ["a", "r+", "w-"])
def test_to_zarr_into_a_group_path_that_is_an_array(gcs_bucket, mode):
    url = f"{gcs_bucket}/ga2.zarr"
    cloudio.to_zarr(_step(0, 3), url, mode="w", zarr_format=3)
    with pytest.raises(cloudio.CloudioError) as err:
        cloudio.to_zarr(_step(0, 3), url, group="v", mode=mode)
    msg = str(err.value)
    # refused up front: the store is left readable
    np.testing.assert_array_equal(cloudio.open_zarr(url).v.values, _step(0, 3).v.values)
    if mode != "w-":
        assert "mode='w-'" not in msg, msg  # the user asked for another mode
    assert f"{url}/v" in msg or "'v'" in msg, msg


def test_mode_w_minus_onto_existing_group_names_group(gcs_bucket):
    url = f"{gcs_bucket}/gw.zarr"
    cloudio.to_zarr(_step(0, 3), url, group="g", mode="w", zarr_format=3)
    with pytest.raises(cloudio.AlreadyExistsError) as err:
        cloudio.to_zarr(_step(0, 3), url, group="g", mode="w-")
    msg = str(err.value)
    assert cloudio.open_zarr(url, group="g").sizes["t"] == 3
    assert f"{url}/g" in msg or "'g'" in msg, msg
