"""The practical Zarr tutorial's workflows, on GCS through cloudio.

Groups and attributes, codec comparison with stored sizes, chunking for time
versus space access (requests counted at the emulator), orthogonal /
boolean-mask / coordinate indexing, chunk-wise processing of a 1-D signal,
and a Dask parallel write, read and transpose of 256 MB.
"""

from __future__ import annotations

import dask
import dask.array as da
import numcodecs
import numpy as np
import pytest
import zarr
from zarr.codecs import BloscCodec, ZstdCodec

import cloudio
from cloudio._gcs.client import gcs_filesystem
from cloudio._paths import parse_gcs


def _stored_bytes(url: str) -> int:
    """Bytes the server holds under ``url`` (all chunks, shards and metadata)."""
    fs = gcs_filesystem()
    path = parse_gcs(url).fs_path
    fs.invalidate_cache(path)
    return sum(fs.du(path, total=False).values())


def test_groups_and_attributes(gcs_bucket):
    url = f"{gcs_bucket}/weather.zarr"
    root = zarr.open_group(cloudio.zarr_store(url), mode="w", attributes={"project": "tutorial"})
    climate = root.create_group("climate", attributes={"source": "station network"})
    temp = climate.create_group("temperature")
    daily = temp.create_array("daily", shape=(365, 10), chunks=(365, 5), dtype="f4",
                              attributes={"units": "degC", "long_name": "daily mean"})
    daily[...] = np.arange(3650, dtype="f4").reshape(365, 10) / 100
    climate.create_group("precipitation").create_array("daily", shape=(365, 10), dtype="f4",
                                                       attributes={"units": "mm"})
    daily.attrs["calibrated"] = True  # attributes can change after creation

    again = zarr.open_group(cloudio.zarr_store(url, read_only=True), mode="r")
    assert again.attrs.asdict() == {"project": "tutorial"}
    assert sorted(again["climate"].group_keys()) == ["precipitation", "temperature"]
    assert again["climate"].attrs["source"] == "station network"
    arr = again["climate/temperature/daily"]
    assert dict(arr.attrs) == {"units": "degC", "long_name": "daily mean", "calibrated": True}
    assert again["climate/precipitation/daily"].attrs["units"] == "mm"
    np.testing.assert_array_equal(arr[100], np.arange(1000, 1010, dtype="f4") / 100)
    members = sorted(path for path, _ in again.members(max_depth=None))
    assert members == ["climate", "climate/precipitation", "climate/precipitation/daily",
                       "climate/temperature", "climate/temperature/daily"]


def test_codec_comparison(gcs_bucket):
    """Compressible data stores smaller with every codec; noise does not shrink much."""
    n = 512
    yy, xx = np.mgrid[0:n, 0:n]
    smooth = (np.sin(xx / 40.0) * np.cos(yy / 30.0) * 100).round(1).astype("f4")
    noise = np.random.default_rng(0).standard_normal((n, n)).astype("f4")
    codecs = {
        "none": None,
        "blosc-lz4": [BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")],
        "blosc-zstd": [BloscCodec(cname="zstd", clevel=5, shuffle="shuffle")],
        "zstd": [ZstdCodec(level=3)],
    }
    sizes: dict[tuple[str, str], int] = {}
    for kind, data in (("smooth", smooth), ("noise", noise)):
        for name, compressors in codecs.items():
            url = f"{gcs_bucket}/codecs/{kind}-{name}.zarr"
            cloudio.save_array(data, url, chunks=(128, 128), compressors=compressors)
            assert cloudio.load_array(url).tobytes() == data.tobytes()
            sizes[kind, name] = _stored_bytes(url)
    raw = smooth.nbytes
    assert raw <= sizes["smooth", "none"] < raw + 4096  # chunks as they are, plus metadata
    for name in ("blosc-lz4", "blosc-zstd", "zstd"):
        assert sizes["smooth", name] < 0.6 * raw, (name, sizes)
        assert sizes["noise", name] > 0.75 * raw, (name, sizes)  # entropy does not compress
    assert sizes["smooth", "blosc-zstd"] < sizes["smooth", "blosc-lz4"]  # zstd trades speed for size


def test_v2_filters_delta_and_fixed_scale_offset(gcs_bucket):
    """Filters on Zarr v2: Delta shrinks a steadily rising series; FixedScaleOffset quantises."""
    # timestamps a minute apart with a few gaps: large values, tiny differences
    steps = np.where(np.random.default_rng(1).random(200_000) < 0.01, 120, 60)
    counter = (1_700_000_000 + np.cumsum(steps)).astype("i8")
    plain, delta = f"{gcs_bucket}/v2/plain.zarr", f"{gcs_bucket}/v2/delta.zarr"
    cloudio.save_array(counter, plain, chunks=(50_000,), zarr_format=2, compressors=numcodecs.Zstd(level=3))
    cloudio.save_array(counter, delta, chunks=(50_000,), zarr_format=2, compressors=numcodecs.Zstd(level=3),
                       filters=[numcodecs.Delta(dtype="i8")])
    np.testing.assert_array_equal(cloudio.load_array(delta), counter)
    assert _stored_bytes(delta) < 0.5 * _stored_bytes(plain)

    temps = (np.random.default_rng(2).uniform(-30, 45, 100_000)).astype("f8")
    fso = f"{gcs_bucket}/v2/fso.zarr"
    cloudio.save_array(temps, fso, chunks=(25_000,), zarr_format=2, compressors=numcodecs.Zstd(level=3),
                       filters=[numcodecs.FixedScaleOffset(offset=-30, scale=100, dtype="f8", astype="u2")])
    back = cloudio.load_array(fso)
    assert np.abs(back - temps).max() <= 0.005 + 1e-9  # lossy to 1/scale, by design
    assert _stored_bytes(fso) < 0.3 * temps.nbytes  # 2 bytes a value before compression
    meta = zarr.open_array(cloudio.zarr_store(fso, read_only=True)).metadata.to_dict()
    assert [f["id"] for f in meta["filters"]] == ["fixedscaleoffset"]


def test_time_series_chunked_for_time_or_space(gcs_emulator, gcs_bucket):
    """Same data, two layouts: the access that matches the chunks costs one request, the other hundreds."""
    nt, ny, nx = 365, 100, 200
    t = np.arange(nt, dtype="f4")[:, None, None]
    data = (10 + 15 * np.sin(2 * np.pi * t / 365) + np.arange(ny, dtype="f4")[None, :, None] / 10
            + np.zeros((1, 1, nx), "f4")).astype("f4")
    for_time, for_space = f"{gcs_bucket}/ts-time.zarr", f"{gcs_bucket}/ts-space.zarr"
    cloudio.save_array(data, for_time, chunks=(nt, 10, 20))  # one chunk holds a pixel's whole year
    cloudio.save_array(data, for_space, chunks=(1, ny, nx))  # one chunk holds one day's map

    def gets(url: str, sel) -> tuple[int, np.ndarray]:
        z = zarr.open_array(cloudio.zarr_store(url, read_only=True), mode="r")  # metadata read first
        before = len(gcs_emulator.requests())
        out = z[sel]
        return sum(1 for r in gcs_emulator.requests()[before:] if r.method == "GET"), out

    pixel = (slice(None), 42, 17)
    day = (200, slice(None), slice(None))
    n_ts_time, ts_a = gets(for_time, pixel)
    n_ts_space, ts_b = gets(for_space, pixel)
    n_map_time, map_a = gets(for_time, day)
    n_map_space, map_b = gets(for_space, day)
    np.testing.assert_array_equal(ts_a, data[pixel])
    np.testing.assert_array_equal(ts_b, data[pixel])
    np.testing.assert_array_equal(map_a, data[day])
    np.testing.assert_array_equal(map_b, data[day])
    assert n_ts_time == 1 and n_ts_space == nt  # a year at one pixel
    assert n_map_space == 1 and n_map_time == (ny // 10) * (nx // 20)  # one day's map


def test_indexing(gcs_bucket):
    url = f"{gcs_bucket}/idx.zarr"
    data = np.arange(60 * 80, dtype="i4").reshape(60, 80)
    cloudio.save_array(data, url, chunks=(16, 16), shards=(32, 32))
    z = zarr.open_array(cloudio.zarr_store(url), mode="r+")
    rows, cols = [1, 7, 33, 59], [0, 40, 79]
    np.testing.assert_array_equal(z.oindex[rows, cols], data[np.ix_(rows, cols)])  # orthogonal
    mask = data % 7 == 0
    np.testing.assert_array_equal(z.vindex[mask], data[mask])  # boolean mask
    np.testing.assert_array_equal(z.get_mask_selection(mask), data[mask])
    pts = ([3, 30, 59], [2, 64, 11])
    np.testing.assert_array_equal(z.vindex[pts], data[pts])  # coordinates
    np.testing.assert_array_equal(z.blocks[1, 2], data[32:60, 64:80])  # one block: a shard here
    np.testing.assert_array_equal(z[5:50:5, 70:], data[5:50:5, 70:])  # strided slices
    # writes by selection, seen by a fresh reader
    z.oindex[[0, 2], [1, 3]] = -1
    z.vindex[pts] = -2
    expect = data.copy()
    expect[np.ix_([0, 2], [1, 3])] = -1
    expect[pts] = -2
    np.testing.assert_array_equal(cloudio.load_array(url), expect)


def test_chunkwise_processing_of_a_signal(gcs_emulator, gcs_bucket):
    """Process a 1-D signal one chunk at a time: never more than a chunk in memory, one GET a chunk."""
    n, chunk = 1_000_000, 100_000
    rng = np.random.default_rng(3)
    signal = (np.sin(np.arange(n) / 500.0) + rng.normal(0, 0.1, n)).astype("f4")
    src, dst = f"{gcs_bucket}/signal.zarr", f"{gcs_bucket}/clipped.zarr"
    cloudio.save_array(signal, src, chunks=(chunk,))
    zin = zarr.open_array(cloudio.zarr_store(src, read_only=True), mode="r")
    zout = zarr.create_array(cloudio.zarr_store(dst), shape=zin.shape, dtype="f4", chunks=zin.chunks)
    total, peak, count = 0.0, -np.inf, 0
    before = len(gcs_emulator.requests())
    for i in range(zin.nchunks):
        block = zin.blocks[i]
        total += float(block.sum(dtype="f8"))
        peak = max(peak, float(block.max()))
        count += block.size
        zout.blocks[i] = np.clip(block, -0.5, 0.5) * 2
    reqs = gcs_emulator.requests()[before:]
    assert sum(1 for r in reqs if r.method == "GET") == zin.nchunks
    assert sum(1 for r in reqs if r.method == "POST") == zin.nchunks
    assert count == n and peak == float(signal.max())
    assert total / n == pytest.approx(float(signal.mean(dtype="f8")), rel=1e-9)
    np.testing.assert_array_equal(cloudio.load_array(dst), np.clip(signal, -0.5, 0.5) * 2)


@pytest.mark.slow
def test_dask_parallel_write_read_transpose_256mb(gcs_bucket):
    """The seed's big-array example scaled to this machine: 256 MB in, read back, transposed out."""
    n = 8192  # 8192 x 8192 float32 = 256 MiB
    data = np.random.default_rng(4).standard_normal((n, n), dtype="f4")
    src, dst = f"{gcs_bucket}/big.zarr", f"{gcs_bucket}/big-T.zarr"
    with dask.config.set(scheduler="threads", num_workers=4):
        cloudio.save_array(da.from_array(data, chunks=(1024, 1024)), src, chunks=(1024, 1024),
                           shards=(2048, 4096), compressors=None)
        lazy = cloudio.load_array(src, lazy=True)
        assert lazy.chunks == ((2048,) * 4, (4096,) * 2)  # one task per shard
        assert bool((lazy == data).all().compute())
        cloudio.save_array(lazy.T, dst, chunks=(1024, 1024), shards=(4096, 2048), compressors=None)
    back = cloudio.load_array(dst)
    assert back.tobytes() == np.ascontiguousarray(data.T).tobytes()
