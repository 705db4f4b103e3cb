"""cloudio.to_zarr / open_zarr: freshness after every kind of write, shards, shard-safe Dask writes."""

from __future__ import annotations

import dask
import dask.array as da
import numpy as np
import pytest
import xarray as xr
import zarr

import cloudio
from cloudio._paths import parse_gcs
from cloudio.errors import CloudioError, UnsafeChunkingError

pytestmark = [
    # zarr warns that consolidated metadata is not in the v3 spec each time it writes it;
    # the freshness tests write it on purpose
    pytest.mark.filterwarnings("ignore:Consolidated metadata is currently not part:UserWarning"),
]


def _ds(nt: int = 4, start: int = 0, scale: float = 1.0) -> xr.Dataset:
    t = np.arange(start, start + nt)
    x = (np.arange(nt * 6, dtype="f8").reshape(nt, 6) + start * 6) * scale
    return xr.Dataset({"x": (("t", "y"), x)}, coords={"t": t, "y": np.arange(6)})


@pytest.mark.parametrize("zarr_format", [2, 3])
@pytest.mark.parametrize("consolidated", [True, False, None, "mixed"])
def test_open_zarr_sees_every_write(gcs_bucket, zarr_format, consolidated):
    """New variables, appended steps, overwritten values, a mode="w" rewrite: all seen at once."""
    url = f"{gcs_bucket}/fresh.zarr"
    first = True if consolidated == "mixed" else consolidated
    later = False if consolidated == "mixed" else consolidated

    cloudio.to_zarr(_ds(), url, mode="w", zarr_format=zarr_format, consolidated=first)
    assert cloudio.open_zarr(url).sizes["t"] == 4  # everything cached that can be

    # a new variable
    cloudio.to_zarr(_ds().rename({"x": "z"}), url, mode="a", consolidated=later)
    assert sorted(cloudio.open_zarr(url).data_vars) == ["x", "z"]

    # appended steps
    step = _ds(3, start=4)
    cloudio.to_zarr(step.assign(z=step.x), url, append_dim="t", consolidated=later)
    got = cloudio.open_zarr(url)
    assert got.sizes["t"] == 7
    np.testing.assert_array_equal(got.x.values, np.arange(7 * 6, dtype="f8").reshape(7, 6))
    np.testing.assert_array_equal(got.t.values, np.arange(7))

    # overwritten values, in place (region)
    cloudio.to_zarr(_ds(2, start=1, scale=-1.0).drop_vars("y"), url, region={"t": slice(1, 3)}, mode="r+",
                    consolidated=later)
    got = cloudio.open_zarr(url).x.values
    np.testing.assert_array_equal(got[1:3], -np.arange(6, 18, dtype="f8").reshape(2, 6))
    np.testing.assert_array_equal(got[3:], np.arange(18, 42, dtype="f8").reshape(4, 6))

    # rewritten from scratch with another shape and variable
    new = xr.Dataset({"w": (("a",), np.arange(5, dtype="i2"))})
    cloudio.to_zarr(new, url, mode="w", zarr_format=zarr_format, consolidated=later)
    got = cloudio.open_zarr(url)
    assert list(got.data_vars) == ["w"] and dict(got.sizes) == {"a": 5}
    np.testing.assert_array_equal(got.w.values, np.arange(5, dtype="i2"))


def test_consolidated_true_does_not_return_stale_metadata(gcs_bucket):
    """Asking for consolidated metadata this process made stale still returns the new state."""
    url = f"{gcs_bucket}/c.zarr"
    cloudio.to_zarr(_ds(), url, mode="w", zarr_format=2, consolidated=True)
    cloudio.to_zarr(_ds(3, start=4), url, append_dim="t", consolidated=False)
    assert xr.open_zarr(cloudio.zarr_store(url), consolidated=True).sizes["t"] == 4  # raw: stale
    assert cloudio.open_zarr(url, consolidated=True).sizes["t"] == 7


def test_zarr_level_writes_are_seen_by_open_zarr(gcs_bucket):
    """Writes made with plain zarr on cloudio's store reach open_zarr too."""
    url = f"{gcs_bucket}/z.zarr"
    cloudio.to_zarr(_ds(), url, mode="w", zarr_format=3, consolidated=True)
    assert list(cloudio.open_zarr(url).data_vars) == ["x"]
    g = zarr.open_group(cloudio.zarr_store(url), mode="a", use_consolidated=False)
    a = g.create_array("q", shape=(4,), dtype="i4", dimension_names=["t"])
    a[...] = [1, 2, 3, 4]
    got = cloudio.open_zarr(url)
    assert sorted(got.data_vars) == ["q", "x"]
    np.testing.assert_array_equal(got.q.values, [1, 2, 3, 4])


def test_shards_encoding_roundtrip(gcs_bucket):
    url = f"{gcs_bucket}/sh.zarr"
    data = np.arange(400 * 300, dtype="f4").reshape(400, 300)
    ds = xr.Dataset({"v": (("a", "b"), data)})
    cloudio.to_zarr(ds, url, mode="w", zarr_format=3, consolidated=False,
                    encoding={"v": {"chunks": (50, 50), "shards": (200, 150)}})
    got = cloudio.open_zarr(url)
    assert got.v.encoding["shards"] == (200, 150)
    assert got.v.encoding["chunks"] == (50, 50)
    assert zarr.open_array(cloudio.zarr_store(url), path="v").shards == (200, 150)
    np.testing.assert_array_equal(got.v.values, data)
    # the encoding travels: writing what was read keeps the shards
    cloudio.to_zarr(got, f"{gcs_bucket}/copy.zarr", mode="w", consolidated=False)
    again = cloudio.open_zarr(f"{gcs_bucket}/copy.zarr")
    assert again.v.encoding["shards"] == (200, 150)
    np.testing.assert_array_equal(again.v.values, data)


def _dask_ds(n: int, chunks) -> tuple[xr.Dataset, np.ndarray]:
    data = np.random.default_rng(n).standard_normal((n, n)).astype("f4")
    return xr.Dataset({"v": (("a", "b"), da.from_array(data, chunks=chunks))}), data


@pytest.mark.parametrize("chunks", [(100, 100), ((300, 700, 250, 750), (999, 1, 1000))])
def test_safe_chunks_false_cannot_lose_data(gcs_bucket, chunks):
    """The design's failing case: Dask chunks smaller than shards, safe_chunks=False -> exact data."""
    url = f"{gcs_bucket}/unsafe.zarr"
    ds, data = _dask_ds(2000, chunks)
    with dask.config.set(scheduler="threads"):
        cloudio.to_zarr(ds, url, mode="w", zarr_format=3, consolidated=False, safe_chunks=False,
                        encoding={"v": {"chunks": (100, 100), "shards": (1000, 1000)}})
    back = cloudio.open_zarr(url).v.values
    assert back.tobytes() == data.tobytes()


def test_rechunk_false_raises_clear_error(gcs_bucket):
    url = f"{gcs_bucket}/norechunk.zarr"
    ds, _ = _dask_ds(2000, (100, 100))
    with pytest.raises(UnsafeChunkingError) as err:
        cloudio.to_zarr(ds, url, mode="w", zarr_format=3, safe_chunks=False, rechunk=False,
                        encoding={"v": {"chunks": (100, 100), "shards": (1000, 1000)}})
    msg = str(err.value)
    assert isinstance(err.value, CloudioError)
    for part in ("'v'", "(100 x20)", "(1000, 1000)", url, "rechunk"):
        assert part in msg, (part, msg)
    # aligned chunks pass with rechunk=False
    ds2, data = _dask_ds(2000, (1000, 2000))
    cloudio.to_zarr(ds2, url, mode="w", zarr_format=3, rechunk=False, consolidated=False,
                    encoding={"v": {"chunks": (100, 100), "shards": (1000, 1000)}})
    assert cloudio.open_zarr(url).v.values.tobytes() == data.tobytes()


def test_region_write_misaligned_offset(gcs_bucket):
    """A region starting mid-shard: each shard still written by one task; neighbours untouched."""
    url = f"{gcs_bucket}/region.zarr"
    base = np.zeros((1000, 100), dtype="f4")
    ds = xr.Dataset({"v": (("a", "b"), da.from_array(base, chunks=(200, 100)))})
    cloudio.to_zarr(ds, url, mode="w", zarr_format=3, consolidated=False,
                    encoding={"v": {"chunks": (50, 50), "shards": (200, 100)}})
    patch = np.arange(550 * 100, dtype="f4").reshape(550, 100) + 1
    upd = xr.Dataset({"v": (("a", "b"), da.from_array(patch, chunks=(100, 100)))})
    with dask.config.set(scheduler="threads"):
        cloudio.to_zarr(upd, url, region={"a": slice(130, 680)}, mode="r+", safe_chunks=False)
    expect = base.copy()
    expect[130:680] = patch
    assert cloudio.open_zarr(url).v.values.tobytes() == expect.tobytes()
    with pytest.raises(UnsafeChunkingError, match="offset"):
        cloudio.to_zarr(upd, url, region={"a": slice(130, 680)}, mode="r+", rechunk=False)


def test_append_onto_partial_last_shard(gcs_bucket):
    url = f"{gcs_bucket}/append.zarr"
    rng = np.random.default_rng(0)
    a = rng.standard_normal((150, 40)).astype("f4")
    b = rng.standard_normal((250, 40)).astype("f4")
    ds = xr.Dataset({"v": (("t", "x"), da.from_array(a, chunks=(50, 40)))})
    cloudio.to_zarr(ds, url, mode="w", zarr_format=3, consolidated=False,
                    encoding={"v": {"chunks": (10, 40), "shards": (100, 40)}})
    more = xr.Dataset({"v": (("t", "x"), da.from_array(b, chunks=(50, 40)))})
    with dask.config.set(scheduler="threads"):
        cloudio.to_zarr(more, url, append_dim="t", safe_chunks=False)
    got = cloudio.open_zarr(url).v.values
    assert got.tobytes() == np.concatenate([a, b]).tobytes()


def test_compute_false_is_shard_safe_and_journaled(gcs_bucket):
    url = f"{gcs_bucket}/delayed.zarr"
    ds, data = _dask_ds(1000, (100, 100))
    delayed = cloudio.to_zarr(ds, url, mode="w", zarr_format=3, consolidated=False, compute=False,
                              safe_chunks=False, encoding={"v": {"chunks": (100, 100), "shards": (500, 500)}})
    with pytest.raises(cloudio.IncompleteWriteError, match=url):  # metadata only so far: not readable
        cloudio.open_zarr(url)
    with dask.config.set(scheduler="threads"):
        delayed.compute()
    assert cloudio.open_zarr(url).v.values.tobytes() == data.tobytes()


def test_ragged_chunks_without_encoding(gcs_bucket):
    """xarray refuses ragged Dask chunks as Zarr chunks; cloudio picks a regular grid instead."""
    url = f"{gcs_bucket}/ragged.zarr"
    data = np.arange(1000, dtype="i4")
    ds = xr.Dataset({"v": (("a",), da.from_array(data, chunks=((100, 300, 200, 400),)))})
    cloudio.to_zarr(ds, url, mode="w", consolidated=False)
    got = cloudio.open_zarr(url)
    assert got.v.encoding["chunks"] == (400,)
    np.testing.assert_array_equal(got.v.values, data)


def test_local_path(tmp_path):
    path = tmp_path / "l.zarr"
    cloudio.to_zarr(_ds(), str(path), mode="w", consolidated=False)
    cloudio.to_zarr(_ds(2, start=4), str(path), append_dim="t", consolidated=False)
    assert cloudio.open_zarr(str(path)).sizes["t"] == 6


def test_region_auto_and_group(gcs_bucket):
    """region="auto" finds the offset from the stored index; shards stay one task each; groups work."""
    url = f"{gcs_bucket}/auto.zarr"
    t = np.arange(600)
    base = xr.Dataset({"v": (("t",), da.zeros(600, chunks=200, dtype="f8"))}, coords={"t": t})
    cloudio.to_zarr(base, url, group="g", mode="w", zarr_format=3, consolidated=False,
                    encoding={"v": {"chunks": (50,), "shards": (200,)}})
    upd = xr.Dataset({"v": (("t",), da.arange(150, 470, chunks=40, dtype="f8"))}, coords={"t": t[150:470]})
    with dask.config.set(scheduler="threads"):
        cloudio.to_zarr(upd, url, group="g", region="auto", mode="r+", safe_chunks=False)
    got = cloudio.open_zarr(url, group="g").v.values
    expect = np.zeros(600)
    expect[150:470] = np.arange(150, 470)
    np.testing.assert_array_equal(got, expect)
    with pytest.raises(UnsafeChunkingError, match="offset"):
        cloudio.to_zarr(upd, url, group="g", region="auto", mode="r+", safe_chunks=False, rechunk=False)


def test_append_with_dims_in_another_order(gcs_bucket):
    """xarray transposes to the stored order; the shard check uses that order too."""
    url = f"{gcs_bucket}/order.zarr"
    a = np.arange(100 * 30, dtype="f4").reshape(100, 30)
    ds = xr.Dataset({"v": (("t", "x"), da.from_array(a, chunks=(50, 30)))})
    cloudio.to_zarr(ds, url, mode="w", zarr_format=3, consolidated=False,
                    encoding={"v": {"chunks": (10, 10), "shards": (40, 30)}})
    b = np.arange(70 * 30, dtype="f4").reshape(70, 30) + 10_000
    more = xr.Dataset({"v": (("x", "t"), da.from_array(b.T, chunks=(30, 7)))})
    with dask.config.set(scheduler="threads"):
        cloudio.to_zarr(more, url, append_dim="t", safe_chunks=False)
    got = cloudio.open_zarr(url).v.values
    assert got.tobytes() == np.concatenate([a, b]).tobytes()


def test_open_zarr_missing_store_bucket_or_not_zarr(gcs_emulator, gcs_bucket):
    """cloudio's errors, as clear as cloudio.open's, with zarr's or xarray's as the cause."""
    url = f"{gcs_bucket}/nothing.zarr"
    with pytest.raises(cloudio.ObjectNotFoundError, match=f"{url}: no Zarr store there.*to_zarr") as info:
        cloudio.open_zarr(url)
    assert not isinstance(info.value, cloudio.BucketNotFoundError) and info.value.__cause__ is not None
    with pytest.raises(cloudio.BucketNotFoundError, match="cloudio-no-such-bucket-8.*create the bucket"):
        cloudio.open_zarr("gs://cloudio-no-such-bucket-8/a.zarr")
    tif = f"{gcs_bucket}/image.tif"
    p = parse_gcs(tif)
    gcs_emulator.client.bucket(p.bucket).blob(p.key).upload_from_string(b"II*\x00not really a tiff")
    with pytest.raises(cloudio.ConfigurationError, match=r"image.tif is a single object.*cloudio.open"):
        cloudio.open_zarr(tif)


def test_to_zarr_missing_bucket(gcs_emulator):
    with pytest.raises(cloudio.BucketNotFoundError, match="(?i)cloudio-no-such-bucket-9.*create the bucket"):
        cloudio.to_zarr(_ds(), "gs://cloudio-no-such-bucket-9/a.zarr")


def test_to_zarr_mode_w_minus_into_a_fresh_store(gcs_bucket):
    """The write-in-progress mark is cloudio's, not data: mode="w-" sees an empty store."""
    url = f"{gcs_bucket}/fresh.zarr"
    ds = xr.Dataset({"t": (("y",), np.arange(4.0))})
    cloudio.to_zarr(ds, url, mode="w-", zarr_format=3, consolidated=False)
    assert (cloudio.open_zarr(url, consolidated=False)["t"].values == np.arange(4.0)).all()
    with pytest.raises(FileExistsError):  # and a store that holds data still refuses w-
        cloudio.to_zarr(ds, url, mode="w-", zarr_format=3, consolidated=False)
