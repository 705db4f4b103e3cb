"""Edges of this stop's fixes, found by a review of them: a local transaction ended by the block's own exception
(or discarded by hand), cat_file ranges past the end or of an empty object, get_gcps after an overwrite, a closed
dataset read after one, VRT cycles deeper than eight levels or through a VRT naming a local file, a pytest
gcs_emulator of the user's own, and a Zarr append whose variable is named like a subgroup. Each failed before its
fix; the others pin the fixes' behaviour."""

from __future__ import annotations

import pytest
import rasterio.errors
from rasters import overwritten_behind_a_listing
from rasters import put as _put

import cloudio

# --------------------------------------------------------------------------------------------
# (1) local fsspec transaction: a file whose with-block raised
# --------------------------------------------------------------------------------------------


def test_local_transaction_aborted_by_the_same_exception_raises_it_not_a_file_not_found(tmp_path):
    """The usual shape: the exception of a file's with-block leaves the transaction too. The transaction's end
    then discards every file; the one already discarded must not fail again (os.remove of its gone temp file),
    which hides the user's exception and leaves the other files' temporaries behind."""
    fs = cloudio.filesystem("file")
    (tmp_path / "a.bin").write_bytes(b"previous")
    with pytest.raises(RuntimeError, match="boom"):
        with fs.transaction:
            with fs.open(str(tmp_path / "b.bin"), "wb") as f:
                f.write(b"bbb")
            with fs.open(str(tmp_path / "a.bin"), "wb") as f:
                f.write(b"partial")
                raise RuntimeError("boom")
    assert (tmp_path / "a.bin").read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin"]  # b.bin discarded, no temporaries


def test_local_transaction_discarded_by_hand_after_a_block_raised(tmp_path):
    """fs.transaction.complete(commit=False) (or an abort of the transaction for another reason) after a file's
    block raised inside it must discard the rest, not fail on the file already discarded."""
    fs = cloudio.filesystem("file")
    fs.start_transaction()
    with pytest.raises(RuntimeError):
        with fs.open(str(tmp_path / "a.bin"), "wb") as f:
            f.write(b"partial")
            raise RuntimeError("boom")
    with fs.open(str(tmp_path / "b.bin"), "wb") as f:
        f.write(b"bbb")
    fs.transaction.complete(commit=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------
# (5) fsspec _cat_file / _cat_range
# --------------------------------------------------------------------------------------------


def test_cat_file_start_past_the_end_is_empty_whether_end_is_given_or_not(gcs_bucket):
    """fsspec's semantics (a slice): a range starting past the end is b''. cloudio answers b'' for
    start=100, end=-1 (its own placement) but the other spelling must agree."""
    fs = cloudio.filesystem(gcs_bucket)
    url = f"{gcs_bucket}/r/past.bin"
    fs.pipe(url, b"0123456789")
    assert fs.cat_file(url, start=100, end=-1) == b""
    assert fs.cat_file(url, start=100, end=200) == b""
    assert fs.cat_file(url, start=100) == b""


def test_cat_file_negative_range_of_a_generation(gcs_bucket):
    # passes: pins that generation= and the one from the metadata coalesce
    fs = cloudio.filesystem(gcs_bucket)
    url = f"{gcs_bucket}/r/g.bin"
    fs.pipe(url, b"0123456789")
    gen = fs.info(url)["generation"]
    assert fs.cat_file(url, start=-3, generation=gen) == b"789"
    assert fs.cat_file(url, start=2, end=-2, generation=int(gen)) == b"234567"


def test_cat_file_ranges_of_an_empty_object(gcs_bucket):
    # passes: pins empty objects through both placements
    fs = cloudio.filesystem(gcs_bucket)
    url = f"{gcs_bucket}/r/empty.bin"
    fs.pipe(url, b"")
    assert fs.cat_file(url, start=-3) == b""
    assert fs.cat_file(url, end=-1) == b""
    assert fs.cat_file(url, start=0, end=5) == b""


def test_tail_after_another_writers_overwrite_is_one_version(gcs_bucket, gcs_emulator):
    """fs.tail(path, n) is cat_file(start=-n)'s twin: after an outside overwrite of a listed object it must be the
    last n bytes of one version (or StaleDatasetError), never the new bytes at the old offsets."""
    fs = cloudio.filesystem(gcs_bucket)
    url = f"{gcs_bucket}/d/t.bin"
    overwritten_behind_a_listing(fs, gcs_emulator, url, b"0123456789", b"abcdefghijklmnopqrstuvwxy")
    assert fs.cat_file(url, start=-3) == b"wxy"
    try:
        got = fs.tail(url, 3)
    except cloudio.StaleDatasetError:
        return
    assert got in (b"789", b"wxy")


def test_cat_ranges_negative_after_another_writers_overwrite(gcs_bucket, gcs_emulator):
    # passes: pins that cat_ranges goes through the same placement as cat_file
    fs = cloudio.filesystem(gcs_bucket)
    url = f"{gcs_bucket}/d/cr.bin"
    overwritten_behind_a_listing(fs, gcs_emulator, url, b"0123456789", b"abcdefghijklmnopqrstuvwxy")
    assert fs.cat_ranges([url, url], [-3, 2], [None, -20]) == [b"wxy", b"cde"]


# --------------------------------------------------------------------------------------------
# (3) a dataset opened before an overwrite: per-handle accessors
# --------------------------------------------------------------------------------------------


def _write_gcps(url: str, v: int, off: int) -> None:
    import numpy as np
    from rasterio.control import GroundControlPoint as G
    from rasterio.crs import CRS

    gcps = [G(0, 0, 500000 + off, 4000000), G(0, 64, 500000 + off, 3999360), G(64, 0, 500640 + off, 4000000)]
    with cloudio.open(url, "w", driver="GTiff", width=64, height=64, count=1, dtype="uint8",
                      gcps=gcps, crs=CRS.from_epsg(32633)) as d:
        d.write(np.full((1, 64, 64), v, "uint8"))
        d.update_tags(version=str(v))


def test_get_gcps_after_overwrite_agrees_with_gcps(gcs_bucket):
    """rasterio's public get_gcps() is gcps' twin: after an overwrite the fresh open answers gcps, but get_gcps()
    still asks the old handle (new pixels with the old GCPs)."""
    url = f"{gcs_bucket}/gc2/a.tif"
    _write_gcps(url, 1, 0)
    with cloudio.open(url) as ds:
        assert ds.read(1)[0, 0] == 1
        _write_gcps(url, 2, 1000)
        assert ds.read(1)[0, 0] == 2
        assert ds.gcps[0][0].x == 501000
        assert ds.get_gcps()[0][0].x == 501000


def test_closed_dataset_opened_before_an_overwrite_reads_nothing(gcs_bucket):
    """A closed dataset raises, as rasterio's does ("Dataset is closed"); after an overwrite cloudio instead opened
    the object again for it (the pixels, tags, GCPs of the new version), a handle nothing closes."""
    url = f"{gcs_bucket}/gc3/a.tif"
    _write_gcps(url, 1, 0)
    ds = cloudio.open(url)
    assert ds.read(1)[0, 0] == 1
    _write_gcps(url, 2, 1000)
    assert ds.read(1)[0, 0] == 2  # through a fresh open, closed with ds
    ds.close()
    assert ds.closed
    with pytest.raises(rasterio.errors.RasterioIOError, match="closed"):
        ds.read(1)
    with pytest.raises(rasterio.errors.RasterioIOError, match="closed"):
        ds.gcps
    assert ds.__dict__.get("_cloudio_fresh") is None, "a fresh open made for a closed dataset, never closed"


# --------------------------------------------------------------------------------------------
# (2) write_vrt: a VRT that would read itself through nested VRTs
# --------------------------------------------------------------------------------------------


def test_cycle_through_eight_nested_vrts_is_refused(gcs_emulator, gcs_bucket):
    # passes: pins the depth _reads does compare (VRT_DEPTH levels below the direct sources)
    from rasters import mosaic_vrt, vrts_over

    base = f"{gcs_bucket}/deep8/base.tif"
    chain = [f"{gcs_bucket}/deep8/v{i}.vrt" for i in range(1, 9)]
    vrts_over(base, 6, *chain)
    with pytest.raises(cloudio.CloudioError, match="itself"):
        cloudio.write_vrt(mosaic_vrt([(chain[-1], 0, 0)]), base)


def test_cycle_through_nine_nested_vrts_is_refused(gcs_emulator, gcs_bucket):
    """base.tif <- v1 <- ... <- v9: a VRT over v9 written onto base.tif reads itself. _reads fetches v1's XML (its
    last loop round) and finds base.tif in it, but the loop ends before that level is compared."""
    from rasters import mosaic_vrt, seeded16, vrts_over

    base = f"{gcs_bucket}/deep/base.tif"
    chain = [f"{gcs_bucket}/deep/v{i}.vrt" for i in range(1, 10)]
    vrts_over(base, 6, *chain)
    with pytest.raises(cloudio.CloudioError, match="itself"):
        cloudio.write_vrt(mosaic_vrt([(chain[-1], 0, 0)]), base)
    with cloudio.open(base) as ds:
        assert (ds.read() == seeded16(6)).all()


def test_cycle_through_a_nested_vrt_with_a_source_cloudio_cannot_place_is_refused(gcs_emulator, gcs_bucket):
    """A nested VRT written by plain GDAL elsewhere may also name a file cloudio cannot make absolute (a local
    path); its other sources are still read by GDAL, the cycle through them too. _reads skips the whole nested
    VRT when absolute_sources raises for one of its sources."""
    from rasters import mosaic_vrt, seeded16, write16

    base, mid = f"{gcs_bucket}/loc/base.tif", f"{gcs_bucket}/loc/mid.vrt"
    write16(base, seeded16(8))
    root = gcs_bucket.removeprefix("gs://")
    xml = mosaic_vrt([(f"/vsigs/{root}/loc/base.tif", 0, 0), ("/data/local-only.tif", 64, 0)])
    _put(gcs_emulator, mid, xml.encode())
    with pytest.raises(cloudio.CloudioError, match="itself"):
        cloudio.write_vrt(mosaic_vrt([(mid, 0, 0)]), base)
    with cloudio.open(base) as ds:
        assert (ds.read() == seeded16(8)).all()


# --------------------------------------------------------------------------------------------
# (4) the pytest plugin's autouse _gcs_emulator_options_honoured
# --------------------------------------------------------------------------------------------


def test_plugin_autouse_fixture_tolerates_a_users_own_gcs_emulator(pytester: pytest.Pytester, monkeypatch) -> None:
    """A project that overrides ``gcs_emulator`` itself (its own server's URL, say) used to run; the new autouse
    fixture looks it up in a WeakKeyDictionary, and every test using the fixture errors with
    "cannot create weak reference to 'str' object"."""
    for key in ("STORAGE_EMULATOR_HOST", "CLOUDIO_EMULATOR", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"):
        monkeypatch.delenv(key, raising=False)
    pytester.makeconftest("""
        import pytest

        @pytest.fixture(scope="session")
        def gcs_emulator():
            return "http://127.0.0.1:4443"  # the project's own emulator, started by its CI
    """)
    pytester.makepyfile(test_own="""
        def test_uses_its_own(gcs_emulator):
            assert gcs_emulator == "http://127.0.0.1:4443"
    """)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)


def test_plugin_root_conftest_options_override_is_honoured(pytester: pytest.Pytester, monkeypatch) -> None:
    # passes: pins the documented way (a root conftest override) through two modules
    for key in ("STORAGE_EMULATOR_HOST", "CLOUDIO_EMULATOR", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"):
        monkeypatch.delenv(key, raising=False)
    pytester.makeconftest("""
        import pytest

        @pytest.fixture(scope="session")
        def gcs_emulator_options():
            return {"mode": None, "port": None, "backend": "filesystem"}
    """)
    for name in ("a", "b"):
        pytester.makepyfile(**{f"test_{name}": """
            import pytest

            @pytest.mark.parametrize("n", [1, 2])
            def test_it(gcs_bucket, n):
                assert gcs_bucket.startswith("gs://")
        """})
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=4)


# --------------------------------------------------------------------------------------------
# (7) Zarr errors with group / mode
# --------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:Consolidated metadata is currently not part:UserWarning")
def test_open_zarr_of_an_array_group_names_a_url_load_array_opens(gcs_bucket):
    # passes: pins that the URL the error tells to load_array is one load_array reads
    import numpy as np
    import xarray as xr

    url = f"{gcs_bucket}/z/s.zarr"
    cloudio.to_zarr(xr.Dataset({"v": (("x",), np.arange(4.0))}), url, mode="w")
    with pytest.raises(cloudio.ConfigurationError) as e:
        cloudio.open_zarr(url, group="v")
    assert f"cloudio.load_array('{url}/v')" in str(e.value)
    assert list(cloudio.load_array(f"{url}/v")[:]) == [0.0, 1.0, 2.0, 3.0]


@pytest.mark.filterwarnings("ignore:Consolidated metadata is currently not part:UserWarning")
def test_append_of_a_variable_named_like_a_subgroup_does_not_blame_the_group(gcs_bucket):
    """mode='a' into group g (a group) of a variable whose name is g's subgroup: zarr's ContainsGroupError is
    about g/sub, but the new ConfigurationError says g itself is "a group, not a group a dataset can be written
    into" (a contradiction naming the wrong node)."""
    import numpy as np
    import xarray as xr

    url = f"{gcs_bucket}/z/sub.zarr"
    cloudio.to_zarr(xr.Dataset({"a": (("x",), np.arange(3.0))}), url, mode="w", group="g")
    cloudio.to_zarr(xr.Dataset({"b": (("x",), np.arange(3.0))}), url, mode="w", group="g/sub")
    with pytest.raises(cloudio.CloudioError) as e:
        cloudio.to_zarr(xr.Dataset({"sub": (("x",), np.arange(3.0))}), url, mode="a", group="g")
    msg = str(e.value)
    assert "holds a group there, not a group" not in msg, msg  # g is a group: the clash is its member g/sub
    assert f"{url}/g/sub" in msg or "'sub'" in msg, msg


@pytest.mark.filterwarnings("ignore:Consolidated metadata is currently not part:UserWarning")
def test_append_refused_for_a_subgroup_clash_says_the_store_is_marked(gcs_bucket):
    """The same refusal comes from inside xarray's write, after the store was marked: it must not say "nothing was
    written", but that the store stays marked incomplete and how to clear it (it said "nothing was written")."""
    import numpy as np
    import xarray as xr

    url = f"{gcs_bucket}/z/sub2.zarr"
    cloudio.to_zarr(xr.Dataset({"a": (("x",), np.arange(3.0))}), url, mode="w", group="g")
    cloudio.to_zarr(xr.Dataset({"b": (("x",), np.arange(3.0))}), url, mode="w", group="g/sub")
    with pytest.raises(cloudio.CloudioError) as e:
        cloudio.to_zarr(xr.Dataset({"sub": (("x",), np.arange(3.0))}), url, mode="a", group="g")
    assert "nothing was written" not in str(e.value)  # it came from inside the write, after the store was marked
    assert "marked incomplete" in str(e.value) and "mode='w'" in str(e.value)
    with pytest.raises(cloudio.IncompleteWriteError):  # as the message says
        cloudio.open_zarr(url, group="g")


@pytest.mark.filterwarnings("ignore:Consolidated metadata is currently not part:UserWarning")
@pytest.mark.parametrize("mode", ["a", "r+"])
def test_refused_write_into_an_array_leaves_the_store_readable(gcs_bucket, mode):
    # passes: pins the refusal the change added (checked before the store is marked)
    """to_zarr(mode='a'/'r+', group=<an array>) is now a ConfigurationError saying "nothing was written"; the store
    must then read as before, not be marked as an incomplete write (every later open_zarr refused)."""
    import numpy as np
    import xarray as xr

    url = f"{gcs_bucket}/z/arr-{mode.replace('+', 'p')}.zarr"
    cloudio.to_zarr(xr.Dataset({"v": (("x",), np.arange(4.0))}), url, mode="w")
    kw = {"region": "auto"} if mode == "r+" else {}
    with pytest.raises(cloudio.ConfigurationError, match="nothing was written"):
        cloudio.to_zarr(xr.Dataset({"q": (("x",), np.arange(4.0))}), url, mode=mode, group="v", **kw)
    assert list(cloudio.open_zarr(url).data_vars) == ["v"]


@pytest.mark.filterwarnings("ignore:Consolidated metadata is currently not part:UserWarning")
def test_refused_w_minus_write_leaves_the_store_readable(gcs_bucket):
    # passes: pins the mode='w-' refusal naming the group, "nothing was written", for comparison with the mode='a' one
    import numpy as np
    import xarray as xr

    url = f"{gcs_bucket}/z/wm.zarr"
    cloudio.to_zarr(xr.Dataset({"v": (("x",), np.arange(4.0))}), url, mode="w", group="g")
    with pytest.raises(cloudio.AlreadyExistsError, match=f"{url}/g"):
        cloudio.to_zarr(xr.Dataset({"q": (("x",), np.arange(4.0))}), url, mode="w-", group="g")
    assert list(cloudio.open_zarr(url, group="g").data_vars) == ["v"]
