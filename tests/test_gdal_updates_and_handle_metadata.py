"""The GDAL/rasterio face: r+ updates, overviews, masks, .aux.xml, COG, odd keys, Env; and a dataset opened before an
overwrite reporting the new version's per-handle metadata (tag items, mask flags, GCPs, RPCs: four failed before
the fix, found by a review), as its pixels and tags."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio
from rasters import object_names, profile8, put, tif, write8

import cloudio

PROFILE = profile8()


def _tiled_without_overviews(url: str) -> None:
    """A 256 x 256 object of 3s in 64 x 64 tiles, read back without overviews."""
    write8(url, 3, size=256, tiled=True, blockxsize=64, blockysize=64)
    with cloudio.open(url) as r:
        assert r.overviews(1) == []


def _overviews_read_back(url: str, value: int) -> None:
    """A new open of ``url`` finds overviews 2 and 4, the coarsest level all ``value``."""
    with cloudio.open(url) as r:
        assert r.overviews(1) == [2, 4]
        assert (r.read(1, out_shape=(64, 64)) == value).all()


def _written_read_overwritten_read(first: str, read_first: str, overwrite: str, *read_then: str) -> None:
    """1s at 64 x 64 written to ``first`` and read through ``read_first``; 2s at 32 x 32 written over them
    through ``overwrite`` and read through each of ``read_then``, whole."""
    write8(first, 1)
    with cloudio.open(read_first) as r:
        assert r.read(1)[0, 0] == 1
    write8(overwrite, 2, size=32)
    for u in read_then:
        with cloudio.open(u) as r:
            assert r.shape == (32, 32) and r.read(1)[0, 0] == 2


def _pixel_after_overwrite(ds, overwrite):
    """``overwrite()``, then the pixel (0, 0) of ``ds``, opened before it; None where ``ds`` refuses with
    StaleDatasetError."""
    overwrite()
    try:
        return ds.read(1)[0, 0]
    except cloudio.StaleDatasetError:
        return None


# passes: pins r+ internal overviews uploaded and read back
def test_r_plus_build_overviews_is_uploaded_and_read(gcs_emulator, gcs_bucket):
    url = f"{gcs_bucket}/o/a.tif"
    _tiled_without_overviews(url)
    with cloudio.open(url, "r+") as ds:
        ds.build_overviews([2, 4], rasterio.enums.Resampling.nearest)
    _overviews_read_back(url, 3)


# passes: pins r+ with TIFF_USE_OVR writes an .ovr sidecar that a later open finds
def test_r_plus_external_ovr(gcs_emulator, gcs_bucket):
    url = f"{gcs_bucket}/o2/a.tif"
    _tiled_without_overviews(url)
    with rasterio.Env(TIFF_USE_OVR=True):
        with cloudio.open(url, "r+") as ds:
            ds.build_overviews([2, 4], rasterio.enums.Resampling.nearest)
    assert "o2/a.tif.ovr" in object_names(gcs_emulator, gcs_bucket)
    with cloudio.open(url) as r:
        assert r.overviews(1) == [2, 4]


# passes: pins 'w' GTiff build_overviews read back
def test_w_build_overviews(gcs_emulator, gcs_bucket):
    url = f"{gcs_bucket}/o3/a.tif"
    with cloudio.open(url, "w", **{**PROFILE, "width": 256, "height": 256}, tiled=True) as ds:
        ds.write(np.full((1, 256, 256), 5, "uint8"))
        ds.build_overviews([2, 4], rasterio.enums.Resampling.nearest)
    _overviews_read_back(url, 5)


# passes: pins a new .msk in a directory cloudio already listed (EMPTY_DIR) is read
def test_mask_sidecar_in_listed_dir(gcs_emulator, gcs_bucket):
    url = f"{gcs_bucket}/m/a.tif"
    write8(f"{gcs_bucket}/m/other.tif", 1)
    with cloudio.open(f"{gcs_bucket}/m/other.tif") as r:
        r.read()
    with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=False):
        with cloudio.open(url, "w", **PROFILE) as ds:
            ds.write(np.full((1, 64, 64), 1, "uint8"))
            m = np.full((64, 64), 255, "uint8")
            m[:32] = 0
            ds.write_mask(m)
    assert "m/a.tif.msk" in object_names(gcs_emulator, gcs_bucket)
    with cloudio.open(url) as r:
        dm = r.dataset_mask()
        assert (dm[:32] == 0).all() and (dm[32:] == 255).all()


# passes: pins tags, namespaced tags, band descriptions of a 'w' GTiff
def test_tags_and_descriptions_w(gcs_emulator, gcs_bucket):
    url = f"{gcs_bucket}/t/a.tif"
    with cloudio.open(url, "w", **{**PROFILE, "count": 2}) as ds:
        ds.write(np.full((2, 64, 64), 5, "uint8"))
        ds.update_tags(1, STATISTICS_MAXIMUM="5", STATISTICS_MINIMUM="5")
        ds.update_tags(foo="bar")
        ds.set_band_description(1, "red")
        ds.set_band_description(2, "nir")
        ds.update_tags(ns="custom", k="v")
    with cloudio.open(url) as r:
        assert r.descriptions == ("red", "nir")
        assert r.tags()["foo"] == "bar"
        assert r.tags(1)["STATISTICS_MAXIMUM"] == "5"
        assert r.tags(ns="custom") == {"k": "v"}


# passes: pins multi-band COG via driver='COG': pixels, overviews, tags, descriptions, LAYOUT=COG
def test_cog_multiband(gcs_emulator, gcs_bucket):
    url = f"{gcs_bucket}/c/a.tif"
    data = np.random.default_rng(1).integers(0, 255, (3, 600, 600), dtype="uint8")
    with cloudio.open(url, "w", driver="COG", width=600, height=600, count=3, dtype="uint8",
                      crs="EPSG:32633", transform=PROFILE["transform"], blocksize=256,
                      overview_resampling="nearest") as ds:
        ds.write(data)
        ds.set_band_description(1, "r")
        ds.update_tags(foo="bar")
    with cloudio.open(url) as r:
        assert r.count == 3 and (r.read() == data).all()
        assert r.overviews(1) == [2, 4]
        assert r.tags()["foo"] == "bar"
        assert r.descriptions[0] == "r"
        assert r.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"


# passes: pins stats() on a reader, then an overwrite: new stats
def test_statistics_of_a_reader(gcs_emulator, gcs_bucket):
    url = f"{gcs_bucket}/st/a.tif"
    write8(url, 7)
    with cloudio.open(url) as r:
        s = r.stats()[0]
        assert s.max == 7
    write8(url, 9)
    with cloudio.open(url) as r:
        assert r.stats()[0].max == 9
        assert r.read(1).max() == 9


# passes: pins keys with space, ?, unicode, %, # written, read, overwritten
@pytest.mark.parametrize("name", ["a b.tif", "q?x=1.tif", "ünï €.tif", "p%20c.tif", "h#x.tif"])
def test_odd_keys_write_read_overwrite(gcs_emulator, gcs_bucket, name):
    url = f"{gcs_bucket}/k/{name}"
    _written_read_overwritten_read(url, url, url, url)
    assert f"k/{name}" in object_names(gcs_emulator, gcs_bucket)


# passes: pins gs:// and /vsigs/ spellings share one journal key
def test_vsigs_and_gs_mixed(gcs_emulator, gcs_bucket):
    b = gcs_bucket[len("gs://"):]
    gs, vsi = f"{gcs_bucket}/x/a.tif", f"/vsigs/{b}/x/a.tif"
    _written_read_overwritten_read(gs, vsi, vsi, gs, vsi)


def test_get_tag_item_after_overwrite(gcs_bucket):
    """After an overwrite in the same layout, get_tag_item() is answered by the fresh open, as read() and tags()."""
    url = f"{gcs_bucket}/g/a.tif"
    def w(v):
        with cloudio.open(url, "w", **PROFILE) as d:
            d.write(np.full((1, 64, 64), v, "uint8"))
            d.update_tags(version=str(v))
    w(1)
    ds = cloudio.open(url)
    try:
        assert ds.read(1)[0, 0] == 1
        w(2)
        assert ds.read(1)[0, 0] == 2
        assert ds.tags()["version"] == "2"
        assert ds.get_tag_item("version") == "2"
    finally:
        ds.close()


# passes: pins compression and profile read through tags(), which the fresh open answers
def test_compression_and_profile_after_overwrite(gcs_bucket):
    """After an overwrite in the same layout but another compression, the dataset opened before it reports the
    new version's compression (GDAL's IMAGE_STRUCTURE metadata is per handle)."""
    url = f"{gcs_bucket}/g/c.tif"
    write8(url, 1, compress="deflate", tiled=True, blockxsize=32, blockysize=32)
    with cloudio.open(url) as ds:
        assert ds.compression.name == "deflate"
        write8(url, 2, compress="lzw", tiled=True, blockxsize=32, blockysize=32)
        assert ds.read(1)[0, 0] == 2
        assert ds.compression.name == "lzw"
        assert ds.profile["compress"] == "lzw"


# passes: pins a user's rasterio.Env around open/close of a writer is honoured
def test_user_env_not_overridden_on_write_close(gcs_emulator, gcs_bucket):
    url = f"{gcs_bucket}/e/a.tif"
    with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=False):
        ds = cloudio.open(url, "w", **PROFILE)
        ds.write(np.full((1, 64, 64), 1, "uint8"))
        ds.write_mask(np.zeros((64, 64), "uint8"))
        ds.close()
    assert "e/a.tif.msk" in object_names(gcs_emulator, gcs_bucket)


# passes: pins another writer's resize seen after invalidate / strong / bounded(0)
@pytest.mark.parametrize("level", ["session", "strong", 0])
def test_other_writer_different_size(gcs_emulator, gcs_bucket, level):
    url = f"{gcs_bucket}/ow/a.tif"
    write8(url, 1)
    with cloudio.open(url) as r:
        r.read()
    put(gcs_emulator, url, tif(2, 256))
    if level == "session":
        cloudio.invalidate(url)
    with cloudio.session(level):
        with cloudio.open(url) as r:
            assert r.shape == (256, 256) and (r.read(1) == 2).all()


# passes: pins statistics() writes no .aux.xml to the server; new stats after overwrite
def test_statistics_warned(gcs_emulator, gcs_bucket):
    import warnings
    url = f"{gcs_bucket}/st2/a.tif"
    write8(url, 7)
    with cloudio.open(url) as r:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert r.statistics(1).max == 7
    write8(url, 9)
    with cloudio.open(url) as r:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert r.statistics(1).max == 9


# passes: pins sharing=True opens while a stale shared dataset is held
def test_shared_third_open_with_stale_held(gcs_bucket):
    url = f"{gcs_bucket}/sh/a.tif"
    write8(url, 1)
    old = cloudio.open(url, sharing=True)
    try:
        old.read()
        write8(url, 2)
        with cloudio.open(url, sharing=True) as n1:
            assert n1.read(1)[0, 0] == 2
        with cloudio.open(url, sharing=True) as n2:
            assert n2.read(1)[0, 0] == 2
        n3 = cloudio.open(url, sharing=True)
        n4 = cloudio.open(url, sharing=True)
        assert n3.read(1)[0, 0] == 2 and n4.read(1)[0, 0] == 2
        n3.close()
        n4.close()
    finally:
        old.close()


# passes: pins r+ close renews a dataset opened before it
def test_r_plus_seen_by_dataset_opened_before(gcs_bucket):
    url = f"{gcs_bucket}/rp/a.tif"
    write8(url, 1)
    ds = cloudio.open(url)
    try:
        assert ds.read(1)[0, 0] == 1
        with cloudio.open(url, "r+") as u:
            u.write(np.full((1, 64, 64), 4, "uint8"))
        assert ds.read(1)[0, 0] == 4
    finally:
        ds.close()


# passes: pins r+ with an exception leaves the object as it was
def test_r_plus_exception_uploads_nothing(gcs_emulator, gcs_bucket):
    url = f"{gcs_bucket}/rp2/a.tif"
    write8(url, 1)
    gen = gcs_emulator.client.bucket(gcs_bucket[5:]).get_blob("rp2/a.tif").generation
    with pytest.raises(RuntimeError):
        with cloudio.open(url, "r+") as u:
            u.write(np.full((1, 64, 64), 4, "uint8"))
            raise RuntimeError("x")
    assert gcs_emulator.client.bucket(gcs_bucket[5:]).get_blob("rp2/a.tif").generation == gen
    with cloudio.open(url) as r:
        assert r.read(1)[0, 0] == 1


# passes: pins r+ with if_generation_match raises ConflictError when overwritten meanwhile
def test_r_plus_guarded_conflict(gcs_emulator, gcs_bucket):
    url = f"{gcs_bucket}/rp3/a.tif"
    write8(url, 1)
    gen = gcs_emulator.client.bucket(gcs_bucket[5:]).get_blob("rp3/a.tif").generation
    u = cloudio.open(url, "r+", if_generation_match=gen)
    u.write(np.full((1, 64, 64), 4, "uint8"))
    write8(url, 2)
    with pytest.raises(cloudio.ConflictError):
        u.close()
    with cloudio.open(url) as r:
        assert r.read(1)[0, 0] == 2


# passes: pins r+ write_mask with GDAL_TIFF_INTERNAL_MASK=False uploads a .msk that is read
def test_r_plus_external_mask(gcs_emulator, gcs_bucket):
    url = f"{gcs_bucket}/rm/a.tif"
    write8(url, 1)
    with cloudio.open(url) as r:
        assert r.dataset_mask().all()
    with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=False):
        with cloudio.open(url, "r+") as u:
            m = np.full((64, 64), 255, "uint8")
            m[:10] = 0
            u.write_mask(m)
    with cloudio.open(url) as r:
        assert (r.dataset_mask()[:10] == 0).all()


def test_mask_flags_after_overwrite(gcs_bucket):
    """mask_flag_enums comes from the fresh open with the new pixels and dataset_mask() (it was the old handle's
    all_valid while the new mask is all zero)."""
    url = f"{gcs_bucket}/mf/a.tif"
    write8(url, 1)
    ds = cloudio.open(url)
    try:
        ds.read()
        with cloudio.open(url, "w", **PROFILE) as d:
            d.write(np.full((1, 64, 64), 2, "uint8"))
            d.write_mask(np.zeros((64, 64), "uint8"))
        assert ds.read(1)[0, 0] == 2
        assert not ds.dataset_mask().any()
        assert ds.mask_flag_enums == ([rasterio.enums.MaskFlags.per_dataset],)
    finally:
        ds.close()


# passes: pins strong level sees a .msk deleted by another client
def test_strong_sidecar_msk_deleted_elsewhere(gcs_emulator, gcs_bucket):
    url = f"{gcs_bucket}/sm/a.tif"
    with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=False):
        with cloudio.open(url, "w", **PROFILE) as ds:
            ds.write(np.full((1, 64, 64), 1, "uint8"))
            ds.write_mask(np.zeros((64, 64), "uint8"))
    with cloudio.open(url) as r:
        assert not r.dataset_mask().any()
    gcs_emulator.client.bucket(gcs_bucket[5:]).blob("sm/a.tif.msk").delete()
    with cloudio.session("strong"):
        with cloudio.open(url) as r:
            assert r.dataset_mask().all()


# passes: pins driver inferred from an upper-case .TIF extension
def test_upper_ext(gcs_emulator, gcs_bucket):
    url = f"{gcs_bucket}/u/A.TIF"
    with cloudio.open(url, "w", width=8, height=8, count=1, dtype="uint8") as d:
        d.write(np.full((1, 8, 8), 3, "uint8"))
    with cloudio.open(url) as r:
        assert r.read(1)[0, 0] == 3


def test_gcps_after_overwrite(gcs_bucket):
    """New pixels come with the new version's GCPs, never the old georeferencing."""
    from rasterio.control import GroundControlPoint as G
    from rasterio.crs import CRS
    url = f"{gcs_bucket}/gc/a.tif"

    def w(v, off):
        gcps = [G(0, 0, 500000 + off, 4000000), G(0, 64, 500000 + off, 3999360), G(64, 0, 500640 + off, 4000000)]
        with cloudio.open(url, "w", driver="GTiff", width=64, height=64, count=1, dtype="uint8",
                          gcps=gcps, crs=CRS.from_epsg(32633)) as d:
            d.write(np.full((1, 64, 64), v, "uint8"))
    w(1, 0)
    ds = cloudio.open(url)
    try:
        assert ds.read(1)[0, 0] == 1
        assert ds.gcps[0][0].x == 500000
        px = _pixel_after_overwrite(ds, lambda: w(2, 1000))
        if px is None:
            return
        assert px == 2
        assert ds.gcps[0][0].x == 501000, "new pixels paired with the old version's GCPs"
    finally:
        ds.close()


# passes: pins PROFILE=BASELINE tags/descriptions in .aux.xml, renewed across an overwrite
def test_baseline_aux_xml_tags(gcs_emulator, gcs_bucket):
    url = f"{gcs_bucket}/bl/a.tif"

    def w(v):
        with cloudio.open(url, "w", **PROFILE, profile="BASELINE") as d:
            d.write(np.full((1, 64, 64), v, "uint8"))
            d.update_tags(version=str(v))
            d.set_band_description(1, f"b{v}")
    w(1)
    assert "bl/a.tif.aux.xml" in object_names(gcs_emulator, gcs_bucket)
    ds = cloudio.open(url)
    try:
        assert ds.tags()["version"] == "1" and ds.descriptions == ("b1",)
        w(2)
        assert ds.read(1)[0, 0] == 2
        assert ds.tags()["version"] == "2" and ds.descriptions == ("b2",)
    finally:
        ds.close()
    with cloudio.open(url) as r:
        assert r.tags()["version"] == "2" and r.descriptions == ("b2",)


# passes: pins .msk sidecars of odd keys uploaded, read, dropped on overwrite
@pytest.mark.parametrize("name", ["a b.tif", "q?x=1.tif", "ünï.tif"])
def test_odd_keys_mask_sidecar(gcs_emulator, gcs_bucket, name):
    url = f"{gcs_bucket}/km/{name}"
    with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=False):
        with cloudio.open(url, "w", **PROFILE) as ds:
            ds.write(np.full((1, 64, 64), 1, "uint8"))
            ds.write_mask(np.zeros((64, 64), "uint8"))
    assert f"km/{name}.msk" in object_names(gcs_emulator, gcs_bucket)
    with cloudio.open(url) as r:
        assert not r.dataset_mask().any()
    write8(url, 2)
    assert f"km/{name}.msk" not in object_names(gcs_emulator, gcs_bucket)
    with cloudio.open(url) as r:
        assert r.dataset_mask().all() and r.read(1)[0, 0] == 2


# passes: pins two reader threads vs an overwriting thread: no torn reads
def test_two_readers_while_third_overwrites(gcs_bucket):
    import threading
    url = f"{gcs_bucket}/th/a.tif"
    write8(url, 1, size=64)
    stop = threading.Event()
    bad: list[object] = []

    def reader():
        while not stop.is_set():
            try:
                with cloudio.open(url) as r:
                    a = r.read(1)
                    v = int(a[0, 0])
                    if a.min() != a.max() or a.shape != ((64, 64) if v % 2 else (128, 128)):
                        bad.append((v, a.shape, a.min(), a.max()))
            except cloudio.StaleDatasetError:
                pass
            except Exception as e:
                bad.append(repr(e))

    ts = [threading.Thread(target=reader) for _ in range(2)]
    for t in ts:
        t.start()
    try:
        for v in range(2, 30):
            write8(url, v, size=64 if v % 2 else 128)
    finally:
        stop.set()
        for t in ts:
            t.join()
    assert not bad, bad[:5]


def test_rpcs_after_overwrite(gcs_bucket):
    """New pixels come with the new version's RPCs."""
    from rasterio.rpc import RPC
    url = f"{gcs_bucket}/rpc/a.tif"

    def w(v, lon):
        rpc = RPC(height_off=0, height_scale=1, lat_off=45, lat_scale=1, line_den_coeff=[1] + [0] * 19,
                  line_num_coeff=[0, 0, 1] + [0] * 17, line_off=32, line_scale=32, long_off=lon, long_scale=1,
                  samp_den_coeff=[1] + [0] * 19, samp_num_coeff=[0, 1] + [0] * 18, samp_off=32, samp_scale=32)
        with cloudio.open(url, "w", driver="GTiff", width=64, height=64, count=1, dtype="uint8", rpcs=rpc) as d:
            d.write(np.full((1, 64, 64), v, "uint8"))
    w(1, 7.0)
    ds = cloudio.open(url)
    try:
        assert ds.read(1)[0, 0] == 1 and ds.rpcs.long_off == 7.0
        px = _pixel_after_overwrite(ds, lambda: w(2, 9.0))
        if px is None:
            return
        assert px == 2
        assert ds.rpcs.long_off == 9.0, "new pixels paired with the old version's RPCs"
    finally:
        ds.close()


# passes: pins PNG tags go to .aux.xml and read back
def test_png_aux_xml_tags(gcs_emulator, gcs_bucket):
    url = f"{gcs_bucket}/png/a.png"
    with cloudio.open(url, "w", driver="PNG", width=16, height=16, count=1, dtype="uint8") as d:
        d.write(np.full((1, 16, 16), 3, "uint8"))
        d.update_tags(k="v1")
    with cloudio.open(url) as r:
        assert r.tags().get("k") == "v1"


# passes: pins w+ with driver='COG' reads back before and after close
def test_w_plus_cog(gcs_emulator, gcs_bucket):
    url = f"{gcs_bucket}/wc/a.tif"
    with cloudio.open(url, "w+", driver="COG", width=32, height=32, count=2, dtype="uint8") as d:
        d.write(np.full((2, 32, 32), 3, "uint8"))
        assert d.read(2)[0, 0] == 3
    with cloudio.open(url) as r:
        assert r.count == 2 and r.read(2)[0, 0] == 3
