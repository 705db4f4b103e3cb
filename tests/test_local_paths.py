"""cloudio with local paths, and local paths mixed with GCS: as the plain libraries behave on local files, plus
cloudio's errors, markers and journal. Found by a review; each test failed before its fix."""
from __future__ import annotations

import os
import warnings

import numpy as np
import pytest
from rasters import put, tif

import cloudio
from cloudio._journal import journal
from cloudio.errors import CloudioError

# -- Zarr: bad local targets get a CloudioError -------------------------------------------------

def _ds(name="v", values=None):
    import xarray as xr
    return xr.Dataset({name: (("t",), np.arange(4.0) if values is None else values)})


@pytest.mark.parametrize("write", [
    lambda f: cloudio.save_array(np.arange(4), str(f)),
    lambda f: cloudio.to_zarr(_ds(), str(f), mode="w", consolidated=False),
    lambda f: cloudio.save_array(np.arange(4), str(f / "a.zarr")),
    lambda f: cloudio.zarr_store(str(f)),
], ids=["save_array-onto-file", "to_zarr-onto-file", "save_array-under-file", "zarr_store-onto-file"])
def test_zarr_write_onto_a_local_file_raises_a_cloudio_error(tmp_path, write):
    """A file where the store's folder goes: cloudio's error naming the path (was the raw FileExistsError or
    NotADirectoryError of os.makedirs), the file untouched."""
    f = tmp_path / "x.tif"
    f.write_bytes(b"not zarr")
    with pytest.raises(CloudioError) as ei:
        write(f)
    assert str(f) in str(ei.value)
    assert isinstance(ei.value.__cause__, OSError)
    assert f.read_bytes() == b"not zarr"


# -- Zarr: local rewrites behave like plain zarr/xarray ---------------------------------------

def test_local_sharded_2d_store_rewritten_as_1d(tmp_path):
    """As plain zarr (create_array(..., overwrite=True)): on a local disk the new shard c/0 cannot be written
    while the old array's folder c/0/ is there, so the old objects go first and emptied folders with them
    (it raised IsADirectoryError, and every retry the same)."""
    p = str(tmp_path / "s.zarr")
    cloudio.save_array(np.arange(400).reshape(20, 20), p, chunks=5, shards=10)
    cloudio.save_array(np.arange(100), p, chunks=5, shards=10)
    np.testing.assert_array_equal(cloudio.load_array(p), np.arange(100))


def test_local_to_zarr_mode_w_twice_leaves_no_old_variable_behind(tmp_path):
    """As plain xarray: the old variable's folder is gone, no warning (emptied file by file, its empty folder
    was left, and zarr warned 'Object at v is not recognized' on every open)."""
    p = str(tmp_path / "ds.zarr")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        cloudio.to_zarr(_ds("v"), p, mode="w", consolidated=False)
        cloudio.to_zarr(_ds("w"), p, mode="w", consolidated=False)
        got = cloudio.open_zarr(p, consolidated=False)
    assert list(got.data_vars) == ["w"]
    assert not os.path.exists(os.path.join(p, "v"))
    assert [str(w.message) for w in seen if "not recognized" in str(w.message)] == []


def test_local_failed_to_zarr_refuses_reads_of_its_arrays(tmp_path):
    """A failed to_zarr leaves its marker at the dataset root; load_array of one of its arrays is refused, as on
    GCS (a marker file in a folder above the store counts)."""
    import dask
    import dask.array as da
    import xarray as xr

    def boom(block, block_info=None):
        if block_info[0]["chunk-location"][0] == 1:
            raise RuntimeError("boom")
        return block + 1

    failing = xr.Dataset({"v": (("t",), da.zeros(8, chunks=4, dtype="f8").map_blocks(boom, dtype="f8"))})
    p = str(tmp_path / "ds.zarr")
    with dask.config.set(scheduler="synchronous"):
        with pytest.raises(RuntimeError):
            cloudio.to_zarr(failing, p, mode="w", consolidated=False, encoding={"v": {"chunks": (4,)}})
    assert os.path.exists(os.path.join(p, ".cloudio-write-in-progress"))
    with pytest.raises(cloudio.IncompleteWriteError):
        cloudio.open_zarr(p)
    with pytest.raises(cloudio.IncompleteWriteError):
        cloudio.load_array(os.path.join(p, "v"))


def test_tilde_path_lands_where_plain_xarray_puts_it(tmp_path, monkeypatch):
    """'~' is the user's home, as xarray (backends.common._normalize_path) and fsspec read it (a literal
    './~/x.zarr' was made)."""
    import xarray as xr
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir()
    cwd.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    cloudio.to_zarr(_ds(), "~/x.zarr", mode="w", consolidated=False)
    assert (home / "x.zarr" / "zarr.json").exists()
    assert not (cwd / "~").exists()
    np.testing.assert_array_equal(xr.open_zarr("~/x.zarr", consolidated=False).v.values, np.arange(4.0))


# -- TrackedLocalFileSystem -------------------------------------------------------------------

def test_text_mode_w_exception_leaves_target(tmp_path):
    """An exception inside the with block of a text "w" open leaves the target untouched and journals nothing,
    as in binary mode (fsspec's TextIOWrapper closed the file without the exception: committed)."""
    fs = cloudio.filesystem(str(tmp_path))
    p = tmp_path / "t.txt"
    p.write_text("old")
    seq = journal().seq
    with pytest.raises(RuntimeError):
        with fs.open(str(p), "w") as f:
            f.write("partial")
            raise RuntimeError("boom")
    assert p.read_text() == "old"
    assert journal().since(seq) == []


def test_rm_partial_failure_journals_what_was_deleted(tmp_path):
    """rm of a list that fails part way journals what it deleted before the failure."""
    fs = cloudio.filesystem(str(tmp_path))
    a = tmp_path / "a.bin"
    a.write_bytes(b"a")
    seq = journal().seq
    with pytest.raises(FileNotFoundError):
        fs.rm([str(a), str(tmp_path / "missing.bin")])
    assert not a.exists()
    assert [(c.url, c.kind) for c in journal().since(seq)] == [(str(a), "delete")]


def test_overwrite_keeps_the_existing_files_mode(tmp_path):
    """Plain fsspec writes in place (mode kept); cloudio stages in a temp file and moves it over the
    target, keeping the mode the file had (it came back 0644)."""
    p = tmp_path / "script.sh"
    p.write_bytes(b"old")
    os.chmod(p, 0o755)
    cloudio.filesystem(str(tmp_path)).pipe(str(p), b"new")
    assert p.read_bytes() == b"new"
    assert oct(p.stat().st_mode & 0o777) == oct(0o755)


def test_write_through_a_symlink_updates_its_target(tmp_path):
    """Plain fsspec writes through the link; so does cloudio's commit, moving the staged file onto the file
    the link names (the link was replaced by a regular file)."""
    target = tmp_path / "real.bin"
    target.write_bytes(b"old")
    link = tmp_path / "link.bin"
    link.symlink_to(target)
    cloudio.filesystem(str(tmp_path)).pipe(str(link), b"new")
    assert link.is_symlink()
    assert target.read_bytes() == b"new"


# -- GDAL: a local VRT over GCS sources ---------------------------------------------------------

def test_local_vrt_pointing_at_gcs_sources_reads(gcs_emulator, gcs_bucket, tmp_path):
    """cloudio.open(local.vrt) gives the buckets of its /vsigs/ sources their options (emulator, credentials)
    before rasterio opens it (the read asked Google unsigned and failed)."""
    put(gcs_emulator, f"{gcs_bucket}/src.tif", tif(7))
    b = gcs_bucket[len("gs://"):]
    vrt = tmp_path / "local.vrt"
    vrt.write_text(
        '<VRTDataset rasterXSize="64" rasterYSize="64"><VRTRasterBand dataType="Byte" band="1">'
        f'<SimpleSource><SourceFilename relativeToVRT="0">/vsigs/{b}/src.tif</SourceFilename>'
        '<SourceBand>1</SourceBand></SimpleSource></VRTRasterBand></VRTDataset>')
    with cloudio.open(str(vrt)) as ds:
        assert int(ds.read(1)[0, 0]) == 7


def test_gcs_text_mode_w_exception_leaves_the_object(gcs_bucket):
    """The same through cloudio.filesystem on GCS (the partial text was uploaded)."""
    fs = cloudio.filesystem(gcs_bucket)
    url = f"{gcs_bucket}/t.txt"
    fs.pipe(url, b"old")
    with pytest.raises(RuntimeError):
        with fs.open(url, "w") as f:
            f.write("partial")
            raise RuntimeError("boom")
    assert fs.cat(url) == b"old"


def test_local_transaction_does_not_commit_a_file_whose_block_raised(tmp_path):
    fs = cloudio.filesystem("file")
    (tmp_path / "a.bin").write_bytes(b"previous")
    with fs.transaction:
        with pytest.raises(RuntimeError, match="boom"):
            with fs.open(str(tmp_path / "a.bin"), "wb") as f:  # as on GCS: the block raised, nothing is written
                f.write(b"partial")
                raise RuntimeError("boom")
        with fs.open(str(tmp_path / "b.bin"), "wb") as f:
            f.write(b"bbb")
    assert (tmp_path / "a.bin").read_bytes() == b"previous"
    assert (tmp_path / "b.bin").read_bytes() == b"bbb"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "b.bin"]  # no temporary file left behind
