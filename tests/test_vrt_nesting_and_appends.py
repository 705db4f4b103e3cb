"""VRTs nested in VRTs, a source deleted then written again elsewhere, and text appends: a review of earlier fixes;
each test failed before its fix."""

from __future__ import annotations

import pytest
from rasters import mosaic_vrt, put, seeded16, tif, vrts_over, write16

import cloudio
from cloudio.emulator import Emulator
from cloudio.errors import CloudioError


def test_open_outer_vrt_reads_nested_leaf_written_through_cloudio(gcs_emulator: Emulator, gcs_bucket: str) -> None:
    src, inner, outer = f"{gcs_bucket}/n/src.tif", f"{gcs_bucket}/n/inner.vrt", f"{gcs_bucket}/n/outer.vrt"
    vrts_over(src, 1, inner, outer)
    with cloudio.open(outer) as v:
        assert (v.read() == seeded16(1)).all()
        write16(src, seeded16(2))  # the leaf, through cloudio, same layout
        got = v.read()
    assert (got == seeded16(2)).all(), "the open outer VRT read its nested source's old pixels"



def test_vrt_source_deleted_then_rewritten_elsewhere_and_invalidated(gcs_emulator: Emulator, gcs_bucket: str) -> None:
    src, vrt = f"{gcs_bucket}/g/src.tif", f"{gcs_bucket}/g/v.vrt"
    vrts_over(src, 5, vrt)
    with cloudio.open(vrt) as v:
        assert (v.read() == seeded16(5)).all()
    cloudio.filesystem(src).rm(src)
    with pytest.raises(CloudioError):
        with cloudio.open(vrt) as v:
            v.read()
    # another writer puts the source back; the user tells cloudio, as the docs say
    from rasterio.io import MemoryFile
    with MemoryFile() as mem:
        with mem.open(driver="GTiff", width=64, height=64, count=1, dtype="uint16") as ds:
            ds.write(seeded16(6))
        put(gcs_emulator, src, bytes(mem.read()))
    cloudio.invalidate(src)
    with cloudio.open(vrt) as v:
        got = v.read()
    assert (got == seeded16(6)).all()


def _prime_nested(gcs_bucket: str) -> None:
    outer = f"{gcs_bucket}/pre/outer.vrt"
    vrts_over(f"{gcs_bucket}/pre/a.tif", 1, f"{gcs_bucket}/pre/inner.vrt", outer)
    with cloudio.open(outer) as o:
        o.read()



def test_nested_vrt_leaf_deleted_through_cloudio(gcs_emulator: Emulator, gcs_bucket: str) -> None:
    _prime_nested(gcs_bucket)
    src, inner, outer = f"{gcs_bucket}/nd/src.tif", f"{gcs_bucket}/nd/inner.vrt", f"{gcs_bucket}/nd2/outer.vrt"
    vrts_over(src, 10, inner, outer)
    with cloudio.open(outer) as v:
        assert (v.read() == seeded16(10)).all()
    cloudio.filesystem(src).rm(src)
    with pytest.raises(CloudioError) as e:
        with cloudio.open(outer) as v:
            v.read()
    assert src in str(e.value)



def test_local_vrt_over_local_vrt_over_gcs_source_reads(gcs_emulator: Emulator, gcs_bucket: str, tmp_path) -> None:
    """cloudio.open of a local VRT whose source is a local VRT over /vsigs/: the bucket of a source at every
    level is configured (it was only for the first)."""
    put(gcs_emulator, f"{gcs_bucket}/src.tif", tif(7))
    b = gcs_bucket[len("gs://"):]
    band = ('<VRTDataset rasterXSize="64" rasterYSize="64"><VRTRasterBand dataType="Byte" band="1">'
            '<SimpleSource><SourceFilename relativeToVRT="{rel}">{src}</SourceFilename>'
            '<SourceBand>1</SourceBand></SimpleSource></VRTRasterBand></VRTDataset>')
    (tmp_path / "inner.vrt").write_text(band.format(rel=0, src=f"/vsigs/{b}/src.tif"))
    (tmp_path / "outer.vrt").write_text(band.format(rel=1, src="inner.vrt"))
    with cloudio.open(str(tmp_path / "outer.vrt")) as ds:
        assert int(ds.read(1)[0, 0]) == 7


def test_text_append_whose_block_raised_is_not_torn(tmp_path) -> None:
    """Binary "ab" (and plain fsspec text "a") append all that was written, and so does cloudio's text "a"
    (it kept what the TextIOWrapper had flushed and dropped the rest)."""
    p = tmp_path / "log.txt"
    p.write_text("old")
    fs = cloudio.filesystem(str(tmp_path))
    with pytest.raises(RuntimeError):
        with fs.open(str(p), "a") as f:
            f.write("a" * 5000)
            f.write("b" * 5000)  # past the wrapper's chunk: flushed to the file
            f.write("c" * 10)    # still in the wrapper
            raise RuntimeError("boom")
    got = p.read_text()
    assert got in ("old", "old" + "a" * 5000 + "b" * 5000 + "c" * 10), (len(got), got[-12:])


def test_strong_open_of_a_rewritten_vrt_tracks_its_new_sources(gcs_emulator: Emulator, gcs_bucket: str) -> None:
    """A session-level open walked v.vrt's sources (a.tif); v.vrt is rewritten over b.tif and opened at the strong
    level: the handle follows b.tif, whose write through cloudio the next read sees (not a.tif's, kept from the
    session-level walk)."""
    a, b, vrt = f"{gcs_bucket}/w/a.tif", f"{gcs_bucket}/w/b.tif", f"{gcs_bucket}/w/v.vrt"
    write16(b, seeded16(2))
    vrts_over(a, 1, vrt)
    with cloudio.open(vrt) as v:
        assert (v.read() == seeded16(1)).all()
    cloudio.write_vrt(mosaic_vrt([(b, 0, 0)]), vrt)
    with cloudio.session("strong"), cloudio.open(vrt) as v:
        assert (v.read() == seeded16(2)).all()
        write16(b, seeded16(3))
        got = v.read()
    assert (got == seeded16(3)).all(), "the open VRT read its new source's old pixels"
