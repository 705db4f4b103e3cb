"""What GDAL's /vsigs/ caches do, measured at the emulator, and what cloudio's GDAL consumer makes of it.

These pin the facts ``cloudio._gdal.consumer`` is built on (see its docstring): a
file-level clear leaves the neighbours cached, a directory clear does not,
a listing GDAL holds hides new names whatever GDAL_DISABLE_READDIR_ON_OPEN
says, and path-specific options reach listings only without a trailing '/'.
"""

from __future__ import annotations

import pytest
import rasterio
from rasterio.errors import RasterioIOError
from rasters import put, tif

import cloudio
from cloudio._gdal import bindings, endpoint, targets
from cloudio._gdal import consumer as gdal_consumer
from cloudio.emulator import Emulator


def vsi(url: str) -> str:
    return url.replace("gs://", "/vsigs/")


def value(path: str) -> int:
    with rasterio.open(path) as ds:
        return int(ds.read()[0, 0, 0])


def gets(emu: Emulator, since: int) -> list[str]:
    return [r.path for r in emu.requests()[since:] if r.method in ("GET", "HEAD")]


@pytest.fixture
def emu_bucket(gcs_emulator: Emulator, gcs_bucket: str) -> str:
    endpoint.ensure_endpoint(gcs_bucket[len("gs://"):])  # path-specific options, as cloudio.open sets them
    return gcs_bucket


def test_is_sidecar() -> None:
    assert targets.is_sidecar("a.tif.ovr", "a.tif")
    assert targets.is_sidecar("a.tif.aux.xml", "a.tif")
    assert targets.is_sidecar("a.TFW", "a.tif")
    assert targets.is_sidecar("a_rpc.txt", "a.tif")
    assert targets.is_sidecar("METADATA.DIM", "a.tif")
    assert targets.is_sidecar("a.tiff", "a.tif")  # would inherit a path-specific option set on a.tif
    assert not targets.is_sidecar("a.tif", "a.tif")
    assert not targets.is_sidecar("b.tif", "a.tif")
    assert not targets.is_sidecar("ab.tif", "a.tif")


def test_file_level_clear_keeps_neighbours_cached(gcs_emulator: Emulator, emu_bucket: str) -> None:
    for name, v in (("a.tif", 1), ("b.tif", 2), ("a2.tif", 3)):
        put(gcs_emulator, f"{emu_bucket}/d/{name}", tif(v))
    for name in ("a.tif", "b.tif", "a2.tif"):
        value(vsi(f"{emu_bucket}/d/{name}"))
    n = len(gcs_emulator.requests())
    bindings.clear(vsi(f"{emu_bucket}/d/a.tif"))
    for name in ("a.tif", "b.tif", "a2.tif"):
        value(vsi(f"{emu_bucket}/d/{name}"))
    assert [p.rsplit("/", 1)[-1] for p in gets(gcs_emulator, n)] == ["a.tif"]


def test_directory_clear_drops_everything_below(gcs_emulator: Emulator, emu_bucket: str) -> None:
    for name in ("a.tif", "b.tif"):
        put(gcs_emulator, f"{emu_bucket}/d/{name}", tif(1))
    for name in ("a.tif", "b.tif"):
        value(vsi(f"{emu_bucket}/d/{name}"))
    n = len(gcs_emulator.requests())
    bindings.clear(vsi(f"{emu_bucket}/d"))
    for name in ("a.tif", "b.tif"):
        value(vsi(f"{emu_bucket}/d/{name}"))
    paths = gets(gcs_emulator, n)
    assert sum("prefix=d" in p for p in paths) == 1  # the listing again
    assert sum(p.endswith(".tif") for p in paths) == 2  # and every object under it


@pytest.mark.characterization
def test_listing_hides_new_names_even_with_readdir_disabled(gcs_emulator: Emulator, emu_bucket: str) -> None:
    put(gcs_emulator, f"{emu_bucket}/d/a.tif", tif(1))
    value(vsi(f"{emu_bucket}/d/a.tif"))  # a normal open: GDAL lists d/ for sidecars
    put(gcs_emulator, f"{emu_bucket}/d/b.tif", tif(2))
    for option in ("NO", "YES", "EMPTY_DIR"):
        with rasterio.Env(GDAL_DISABLE_READDIR_ON_OPEN=option):
            with pytest.raises(RasterioIOError, match="does not exist"):
                value(vsi(f"{emu_bucket}/d/b.tif"))
    bindings.clear(vsi(f"{emu_bucket}/d/b.tif"))  # a file-level clear is not enough either
    with pytest.raises(RasterioIOError, match="does not exist"):
        value(vsi(f"{emu_bucket}/d/b.tif"))
    bindings.clear(vsi(f"{emu_bucket}/d"))  # only the directory clear is
    assert value(vsi(f"{emu_bucket}/d/b.tif")) == 2


def test_cloudio_opens_do_not_make_gdal_list(gcs_emulator: Emulator, emu_bucket: str) -> None:
    for i in range(3):
        put(gcs_emulator, f"{emu_bucket}/d/f{i}.tif", tif(i))
    n = len(gcs_emulator.requests())
    for i in range(3):
        with cloudio.open(f"{emu_bucket}/d/f{i}.tif") as ds:
            ds.read()
    paths = gets(gcs_emulator, n)
    listings = [p for p in paths if "prefix=" in p or p.split("?")[0].endswith("/o")]
    assert len(listings) == 1 and listings[0].startswith("/storage/v1/")  # cloudio's own, once
    assert len(paths) == 1 + 3


def test_path_specific_endpoint_reaches_listings(gcs_emulator: Emulator, emu_bucket: str) -> None:
    put(gcs_emulator, f"{emu_bucket}/d/a.tif", tif(1))
    assert gdal_consumer.listdir(f"{emu_bucket}/d/") == ["a.tif"]


def test_prefix_invalidation_leaves_other_prefixes_cached(gcs_emulator: Emulator, emu_bucket: str) -> None:
    for p in ("d", "e"):
        put(gcs_emulator, f"{emu_bucket}/{p}/a.tif", tif(1))
        with cloudio.open(f"{emu_bucket}/{p}/a.tif") as ds:
            ds.read()
    put(gcs_emulator, f"{emu_bucket}/d/a.tif", tif(5))
    cloudio.invalidate(f"{emu_bucket}/d/")
    n = len(gcs_emulator.requests())
    for p, v in (("d", 5), ("e", 1)):
        with cloudio.open(f"{emu_bucket}/{p}/a.tif") as ds:
            assert int(ds.read()[0, 0, 0]) == v
    assert all("/d/" in p or "prefix=d" in p for p in gets(gcs_emulator, n))


def _vrt(source: str, size: int = 64) -> bytes:
    return f"""<VRTDataset rasterXSize="{size}" rasterYSize="{size}">
  <VRTRasterBand dataType="Byte" band="1">
    <SimpleSource>
      <SourceFilename relativeToVRT="0">{source}</SourceFilename>
      <SourceBand>1</SourceBand>
    </SimpleSource>
  </VRTRasterBand>
</VRTDataset>""".encode()


def test_vrt_sees_new_and_overwritten_sources(emu_bucket: str) -> None:
    fs = cloudio.filesystem(emu_bucket)
    fs.pipe(f"{emu_bucket}/d/a.tif", tif(1))
    fs.pipe(f"{emu_bucket}/v/one.vrt", _vrt(vsi(f"{emu_bucket}/d/a.tif")))
    with cloudio.open(f"{emu_bucket}/v/one.vrt") as ds:
        assert int(ds.read()[0, 0, 0]) == 1  # GDAL opened d/a.tif itself, listing d/
    fs.pipe(f"{emu_bucket}/d/a.tif", tif(2))
    fs.pipe(f"{emu_bucket}/d/new.tif", tif(3))
    fs.pipe(f"{emu_bucket}/v/two.vrt", _vrt(vsi(f"{emu_bucket}/d/new.tif")))
    with cloudio.open(f"{emu_bucket}/v/one.vrt") as ds:
        assert int(ds.read()[0, 0, 0]) == 2
    with cloudio.open(f"{emu_bucket}/v/two.vrt") as ds:
        assert int(ds.read()[0, 0, 0]) == 3
