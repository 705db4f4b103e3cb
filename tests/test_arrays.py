"""cloudio.save_array / load_array: NumPy and Dask arrays to Zarr and back."""

from __future__ import annotations

import dask
import dask.array as da
import numpy as np
import pytest
import zarr

import cloudio
from cloudio._paths import parse_gcs
from cloudio._zarr.shard_safety import aligned_chunks, misaligned_dims
from cloudio.errors import ObjectNotFoundError, UnsafeChunkingError


def test_numpy_roundtrip(gcs_bucket):
    url = f"{gcs_bucket}/np.zarr"
    data = np.arange(300 * 200, dtype="i8").reshape(300, 200)
    z = cloudio.save_array(data, url, chunks=(50, 50), shards=(100, 100))
    assert z.shards == (100, 100) and z.chunks == (50, 50)
    back = cloudio.load_array(url)
    assert isinstance(back, np.ndarray) and back.dtype == data.dtype
    np.testing.assert_array_equal(back, data)
    # save again: overwritten, new shape
    cloudio.save_array(data[:10], url)
    assert cloudio.load_array(url).shape == (10, 200)


def test_lazy_load_is_chunked_by_shard(gcs_bucket):
    url = f"{gcs_bucket}/lazy.zarr"
    data = np.random.default_rng(0).standard_normal((250, 130)).astype("f4")
    cloudio.save_array(data, url, chunks=(25, 26), shards=(100, 130))
    arr = cloudio.load_array(url, lazy=True)
    assert isinstance(arr, da.Array)
    assert arr.chunks == ((100, 100, 50), (130,))
    assert arr.compute().tobytes() == data.tobytes()
    # unsharded: by chunk; or as asked
    cloudio.save_array(data, f"{gcs_bucket}/plain.zarr", chunks=(50, 65))
    assert cloudio.load_array(f"{gcs_bucket}/plain.zarr", lazy=True).chunks == ((50,) * 5, (65, 65))
    assert cloudio.load_array(url, lazy=True, chunks=(250, 10)).chunks[0] == (250,)


@pytest.mark.parametrize("chunks", [(100, 100), ((37, 463, 500), (1000,)), ((999, 1), (1, 999))])
def test_dask_misaligned_chunks_written_exactly(gcs_bucket, chunks):
    url = f"{gcs_bucket}/dask.zarr"
    data = np.random.default_rng(1).standard_normal((1000, 1000)).astype("f4")
    with dask.config.set(scheduler="threads"):
        cloudio.save_array(da.from_array(data, chunks=chunks), url, chunks=(100, 100), shards=(500, 500))
    assert cloudio.load_array(url).tobytes() == data.tobytes()


def test_dask_rechunk_forbidden(gcs_bucket):
    url = f"{gcs_bucket}/forbid.zarr"
    arr = da.zeros((1000, 1000), chunks=(100, 100), dtype="f4")
    with pytest.raises(UnsafeChunkingError, match=r"shards of shape \(1000, 1000\)"):
        cloudio.save_array(arr, url, chunks=(100, 100), shards=(1000, 1000), rechunk=False)


def test_dask_default_chunks_follow_dask(gcs_bucket):
    url = f"{gcs_bucket}/dflt.zarr"
    arr = da.arange(1000, chunks=300, dtype="i4")
    z = cloudio.save_array(arr, url, shards=600)
    assert z.shards == (600,) and z.chunks == (300,)
    np.testing.assert_array_equal(cloudio.load_array(url), np.arange(1000, dtype="i4"))


def test_missing_array_raises(gcs_bucket):
    with pytest.raises(ObjectNotFoundError, match="no Zarr array"):
        cloudio.load_array(f"{gcs_bucket}/nothing.zarr")


def test_kwargs_reach_zarr(gcs_bucket):
    url = f"{gcs_bucket}/kw.zarr"
    z = cloudio.save_array(np.ones((4, 4), "u2"), url, zarr_format=2, compressors=None,
                           attributes={"units": "m"})
    assert z.metadata.zarr_format == 2
    again = zarr.open_array(cloudio.zarr_store(url, read_only=True))
    assert again.attrs["units"] == "m"


def test_alignment_rules():
    # boundaries 100..900 of 100-chunks do not fall on 1000-multiples: rechunked to one shard each
    assert misaligned_dims(((100,) * 20,), (1000,)) == [0]
    assert aligned_chunks(((100,) * 20,), (1000,)) == ((1000, 1000),)
    # offset 130 (region start): first chunk ends at the first shard boundary
    assert aligned_chunks(((100,) * 5 + (50,),), (200,), (130,)) == ((70, 200, 200, 80),)
    # append onto a partial shard: 150 stored, shards of 100
    assert aligned_chunks(((50,) * 5,), (100,), (150,)) == ((50, 100, 100),)
    # big chunks stay big: nearest shard multiple
    assert aligned_chunks(((2500, 2500),), (1000,)) == ((2000, 2000, 1000),)
    # aligned dims untouched, even when ragged
    assert aligned_chunks(((1000, 2000, 7),), (1000,)) == ((1000, 2000, 7),)


def test_numpy_hugepage_advice_is_restored(gcs_bucket):
    """load_array turns NumPy's huge-page hint off while zarr decodes, then puts it back."""
    from concurrent.futures import ThreadPoolExecutor

    hint = pytest.importorskip("numpy._core.multiarray")._set_madvise_hugepage
    url = f"{gcs_bucket}/hint.zarr"
    cloudio.save_array(np.arange(1000, dtype="f8"), url, chunks=(100,), shards=(500,))
    before = hint(True)
    try:
        with ThreadPoolExecutor(4) as pool:  # overlapping reads restore once, at the end
            outs = list(pool.map(lambda _: cloudio.load_array(url), range(8)))
        assert all((o == np.arange(1000)).all() for o in outs)
        assert hint(True) is True  # still on afterwards
        hint(False)
        cloudio.load_array(url)
        assert hint(False) is False  # a caller's "off" is kept too
    finally:
        hint(before)


@pytest.mark.parametrize("how", ["mapped while the shards arrive", "touched before (older kernels)", "zarr's path"])
def test_large_reads_fill_a_premapped_output_exactly(gcs_bucket, monkeypatch, how):
    """An output of the size whose pages load_array maps up front (here lowered to 1 MiB) reads back
    bit-exactly, whether its pages are mapped a slice at a time while the readers fill it, touched
    one by one before the read, or filled by zarr's own pipeline (a layout cloudio does not decode)."""
    from cloudio._zarr import arrays

    monkeypatch.setattr(arrays, "_PREFAULT_MIN_BYTES", 1 << 20)
    monkeypatch.setattr(arrays, "_POPULATE_SLICE", 64 << 10)  # many slices, interleaved with the copies
    if how.startswith("touched"):
        monkeypatch.setattr(arrays, "_libc_madvise", lambda: None)
    data = np.random.default_rng(3).standard_normal((1024, 1024)).astype("f4")  # shards of 1 MiB: threads
    url = f"{gcs_bucket}/mapped.zarr"
    extra = {"filters": [zarr.codecs.TransposeCodec(order=(1, 0))]} if how == "zarr's path" else {}
    cloudio.save_array(data, url, chunks=(256, 256), shards=(512, 512), **extra)
    back = cloudio.load_array(url)
    assert back.flags.writeable and back.shape == data.shape
    assert back.tobytes() == data.tobytes()


def test_a_dropped_outputs_memory_is_lent_to_the_next_read_and_fully_overwritten(gcs_bucket, monkeypatch):
    """A large output its caller dropped comes back, already mapped, as the next read's output of that
    size (no page of it is faulted in again); every element is then the new array's, the fill value
    included where no chunk is stored."""
    import gc
    import resource

    from cloudio._zarr import arrays

    monkeypatch.setattr(arrays, "_PREFAULT_MIN_BYTES", 1 << 20)
    monkeypatch.setenv("NUMPY_MADVISE_HUGEPAGE", "0")  # 4 KiB pages: a fresh 4 MiB output is 1,024 faults
    data = np.random.default_rng(5).standard_normal((1024, 1024)).astype("f4")
    cloudio.save_array(data, f"{gcs_bucket}/first.zarr", chunks=(256, 256), shards=(512, 512))
    sparse = np.zeros((1024, 1024), "f4")
    sparse[:10, :10] = 7  # one chunk stored; the rest is the fill value, stored nowhere
    cloudio.save_array(sparse, f"{gcs_bucket}/sparse.zarr", chunks=(256, 256), shards=(512, 512))
    cloudio.load_array(f"{gcs_bucket}/sparse.zarr")  # the shard buffers of such a read, kept
    first = cloudio.load_array(f"{gcs_bucket}/first.zarr")
    assert first.tobytes() == data.tobytes()
    where = first.ctypes.data
    del first
    gc.collect()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    again = cloudio.load_array(f"{gcs_bucket}/sparse.zarr")
    assert resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults < 512
    assert again.ctypes.data == where  # the same memory, lent again
    assert again.tobytes() == sparse.tobytes()  # nothing of the first array left in it


def test_an_output_still_referenced_is_never_lent_again(gcs_bucket, monkeypatch):
    """A view of an output keeps its memory the caller's: the next read gets other memory and the
    view's values stay as they were."""
    import gc

    from cloudio._zarr import arrays

    monkeypatch.setattr(arrays, "_PREFAULT_MIN_BYTES", 1 << 20)
    a = np.random.default_rng(6).standard_normal((1024, 1024)).astype("f4")
    b = -a
    cloudio.save_array(a, f"{gcs_bucket}/a.zarr", chunks=(256, 256), shards=(512, 512))
    cloudio.save_array(b, f"{gcs_bucket}/b.zarr", chunks=(256, 256), shards=(512, 512))
    view = cloudio.load_array(f"{gcs_bucket}/a.zarr")[100:200]  # the output itself is dropped at once
    gc.collect()
    other = cloudio.load_array(f"{gcs_bucket}/b.zarr")
    assert not np.shares_memory(view, other)
    assert view.tobytes() == a[100:200].tobytes() and other.tobytes() == b.tobytes()


@pytest.mark.parametrize("kernel", ["MADV_POPULATE_WRITE", "older"])
def test_mapping_an_outputs_pages_keeps_what_was_written(monkeypatch, kernel):
    """The call that maps load_array's output runs while readers fill it: it must not touch the bytes."""
    from cloudio._zarr import arrays

    monkeypatch.setattr(arrays, "_PREFAULT_MIN_BYTES", 1 << 20)
    monkeypatch.setattr(arrays, "_POPULATE_SLICE", 64 << 10)
    if kernel == "older":
        monkeypatch.setattr(arrays, "_libc_madvise", lambda: None)
    fresh = arrays._output((1024, 1024), "f4")
    assert fresh is not None
    out, populate = fresh
    data = np.random.default_rng(4).standard_normal((1024, 1024)).astype("f4")
    out[::3] = data[::3]  # some pages written, some not yet
    populate()
    out[1::3] = data[1::3]
    out[2::3] = data[2::3]
    populate()
    assert out.tobytes() == data.tobytes()


def test_unsafe_chunking_refused_before_anything_is_touched(gcs_emulator, gcs_bucket):
    """rechunk=False raises before the old array's zarr.json (or anything else) is overwritten."""
    url = f"{gcs_bucket}/keep.zarr"
    old = np.arange(1000 * 1000, dtype="f4").reshape(1000, 1000)
    cloudio.save_array(old, url, chunks=(100, 100), shards=(500, 500))
    before = len(gcs_emulator.requests())
    with pytest.raises(UnsafeChunkingError):
        cloudio.save_array(da.zeros((1000, 1000), chunks=(100, 100), dtype="f4"), url, chunks=(100, 100),
                           shards=(1000, 1000), rechunk=False)
    assert [r for r in gcs_emulator.requests()[before:] if r.method != "GET"] == []
    np.testing.assert_array_equal(cloudio.load_array(url), old)


def test_corrupt_metadata_is_a_cloudio_error(gcs_emulator, gcs_bucket):
    url = f"{gcs_bucket}/corrupt.zarr"
    cloudio.save_array(np.ones(10, "u1"), url)
    p = parse_gcs(f"{url}/zarr.json")
    gcs_emulator.client.bucket(p.bucket).blob(p.key).upload_from_string(b'{"zarr_format": 3, "node_ty')
    with pytest.raises(cloudio.IntegrityError, match=f"{url}.*not valid JSON") as info:
        cloudio.load_array(url)
    assert isinstance(info.value.__cause__, ValueError)
    with pytest.raises(cloudio.IntegrityError, match=url):
        cloudio.open_zarr(url, consolidated=False)


def test_load_array_of_a_group_names_the_right_call(gcs_bucket):
    url = f"{gcs_bucket}/grp.zarr"
    zarr.open_group(cloudio.zarr_store(url), mode="w").create_array("a", shape=(3,), dtype="u1")
    with pytest.raises(cloudio.ConfigurationError, match=f"{url} is a Zarr group.*open_zarr") as info:
        cloudio.load_array(url)
    assert info.value.__cause__ is not None
    assert cloudio.load_array(f"{url}/a").shape == (3,)


def test_load_array_missing_bucket(gcs_emulator):
    with pytest.raises(cloudio.BucketNotFoundError, match="cloudio-no-such-bucket-7.*create the bucket"):
        cloudio.load_array("gs://cloudio-no-such-bucket-7/a.zarr")


@pytest.mark.parametrize("zarr_format", [3, 2])
def test_load_asks_for_the_metadata_of_the_format_stored(gcs_emulator, gcs_bucket, zarr_format):
    """A v3 array opens with one metadata GET (its zarr.json) besides the write marker's; a v2 array, after
    that GET finds nothing, with zarr's probe of both formats."""
    from cloudio._zarr import last_seen

    url = f"{gcs_bucket}/fmt{zarr_format}.zarr"
    data = np.arange(40 * 30, dtype="f4").reshape(40, 30)
    cloudio.save_array(data, url, chunks=(40, 30), zarr_format=zarr_format)
    last_seen.forget_all()  # a first read in a process: the array is opened (tests/test_zarr_last_seen.py: after)
    n = len(gcs_emulator.requests())
    np.testing.assert_array_equal(cloudio.load_array(url), data)
    names = sorted(r.path.split("%2F")[-1].split("?")[0] for r in gcs_emulator.requests()[n:]
                   if r.method == "GET" and "%2Fc" not in r.path and "%2F0" not in r.path)
    if zarr_format == 3:
        assert names == [".cloudio-write-in-progress", "zarr.json"]
    else:
        assert names == [".cloudio-write-in-progress", ".zarray", ".zattrs", "zarr.json", "zarr.json"]
