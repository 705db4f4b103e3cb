"""Reads under faults: refusals, a server that never answers and failures past the retries are cloudio's errors
naming the object, whenever zarr reads (after open_zarr returned, a lazy load_array's compute, part of a shard)
and when GDAL reads a tile. Found by a review; each test failed before its fix. (A byte flipped in part of a
shard cannot be caught: GCS sends no checksum for a byte range; README "Reliability".)

Faults come from the proxy in front of the real emulator (tests/faultproxy.py). The promise under test
(README "Reliability", docs/design.md, docs/guide.md's error table): a read returns exactly the bytes
stored, or raises a ``cloudio.CloudioError`` naming the gs:// URL with the library's error as
``__cause__``; never wrong data silently.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from outcomes import returned

import cloudio
from cloudio._zarr import last_seen

SHAPE, SHARDS, CHUNKS = (1000, 1300), (256, 512), (128, 128)
_SHARD_GET = r"/o/[^?]*%2Fc%2F"
READ_LIMIT = 180  # seconds a read under faults may take before it counts as hung


def _data(dtype: str = "float32") -> np.ndarray:
    return np.random.default_rng(7).standard_normal(SHAPE).astype(dtype)


def _dataset(url: str, shards: tuple[int, int] | None) -> np.ndarray:
    """A dataset with one float32 variable ``v`` of raw (uncompressed) chunks, sharded or not."""
    import xarray as xr

    a = _data()
    enc: dict[str, Any] = {"chunks": CHUNKS, "compressors": None}
    if shards is not None:
        enc["shards"] = shards
    cloudio.to_zarr(xr.Dataset({"v": (("y", "x"), a)}), url, mode="w", consolidated=False, encoding={"v": enc})
    last_seen.forget_all()
    return a


# -- zarr partial-shard reads (byte ranges through gcsfs) ---------------------------------------------


def test_a_partial_read_refused_past_the_retries_is_a_transient_error(gcs_emulator, gcs_bucket, fault_proxy,
                                                                       quick_retries):
    """503 on every shard range GET: TransientError naming the store (was gcsfs's bare HttpError)."""
    url = f"{gcs_bucket}/r503.zarr"
    _dataset(url, SHARDS)
    ds = cloudio.open_zarr(url)
    fault_proxy.add("status", code=503, method="GET", path=_SHARD_GET, times=None)
    with pytest.raises(cloudio.TransientError, match=r"r503\.zarr") as info:
        returned(lambda: ds.v[:10, :10].values, READ_LIMIT)
    assert info.value.__cause__ is not None


def test_a_partial_read_the_server_never_answers_is_a_transient_error(gcs_emulator, gcs_bucket, fault_proxy,
                                                                       monkeypatch):
    """Every shard range GET hangs (CLOUDIO_HTTP_TIMEOUT=1): TransientError within the time limit of one call
    (was aiohttp's bare SocketTimeoutError, after about 40 s of gcsfs's retries and back-off)."""
    monkeypatch.setenv("CLOUDIO_HTTP_TIMEOUT", "1")
    url = f"{gcs_bucket}/hg.zarr"
    _dataset(url, SHARDS)
    ds = cloudio.open_zarr(url)
    fault_proxy.add("hang", method="GET", path=_SHARD_GET, times=None)
    with pytest.raises(cloudio.TransientError, match=r"hg\.zarr"):
        returned(lambda: ds.v[:10, :10].values, 240)


# -- lazy reads after open: refusals ------------------------------------------------------------------


def test_open_zarr_values_refused_with_403_is_a_read_error(gcs_emulator, gcs_bucket, fault_proxy):
    """Unsharded chunks are whole objects, read by JournaledStore.get -> fast.get_into, after open_zarr
    returned: a 403 is ReadError naming the object (was gcsfs's bare OSError('Forbidden: http://...'))."""
    url = f"{gcs_bucket}/r403.zarr"
    _dataset(url, None)
    ds = cloudio.open_zarr(url)
    fault_proxy.add("status", code=403, method="GET", path=_SHARD_GET, times=None)
    with pytest.raises(cloudio.ReadError, match=r"r403\.zarr") as info:
        returned(lambda: ds.v.values, READ_LIMIT)
    assert info.value.__cause__ is not None


def test_lazy_load_array_refused_with_403_is_a_read_error(gcs_emulator, gcs_bucket, fault_proxy):
    """load_array(lazy=True) returns da.from_zarr(z), whose compute reads after load_array returned: a refused
    shard GET is ReadError naming the store, as for the eager load_array."""
    url = f"{gcs_bucket}/l403.zarr"
    cloudio.save_array(_data(), url, chunks=CHUNKS, shards=SHARDS, compressors=None)
    last_seen.forget_all()
    lazy = cloudio.load_array(url, lazy=True)
    fault_proxy.add("status", code=403, method="GET", path=_SHARD_GET, times=None)
    with pytest.raises(cloudio.ReadError, match=r"l403\.zarr") as info:
        returned(lambda: lazy.compute(scheduler="sync"), READ_LIMIT)
    assert info.value.__cause__ is not None


# -- GDAL --------------------------------------------------------------------------------------------


def test_a_gdal_tile_read_refused_with_403_is_a_read_error_not_a_transient_one(gcs_emulator, gcs_bucket,
                                                                                fault_proxy):
    """Every tile range GET answered 403 after the open: GDAL says only 'got 0 bytes, expected 16384'; asked
    again, the server refuses: ReadError ('check permissions'), not TransientReadError ('retry later')."""
    from rasters import noise_tif, put

    url = f"{gcs_bucket}/d/a.tif"
    put(gcs_emulator, url, noise_tif())
    with cloudio.open(url) as ds:
        fault_proxy.add("status", code=403, method="GET", path=r"/d/a\.tif$", times=None)
        with pytest.raises(cloudio.ReadError, match=r"d/a\.tif") as info:
            returned(lambda: ds.read(window=((0, 300), (0, 300))), READ_LIMIT)
    assert not isinstance(info.value, cloudio.TransientError)


def test_a_gdal_read_of_a_truncated_geotiff_is_a_read_error_naming_the_cut_not_a_transient_one(
        gcs_emulator, gcs_bucket):
    """Another writer stored a GeoTIFF cut short (an interrupted copy): its later tiles lie past the object's
    end. GDAL says 'got N bytes, expected M', as for a broken download; but nothing is wrong on the network and
    no retry mends it: ReadError saying where the header places the block and how much is stored, not
    TransientReadError ('retry later')."""
    from rasters import noise_tif, put

    url = f"{gcs_bucket}/d/cut.tif"
    whole = noise_tif()
    put(gcs_emulator, url, whole[: len(whole) * 2 // 3])
    with cloudio.open(url) as ds:
        assert ds.read(window=((0, 128), (0, 128))).shape == (1, 128, 128)  # the first tiles are all there
        with pytest.raises(cloudio.ReadError) as info:
            returned(lambda: ds.read(), READ_LIMIT)
    assert not isinstance(info.value, cloudio.TransientError)
    said = str(info.value)
    assert url in said and f"holds {len(whole) * 2 // 3} bytes" in said and "Retry later" not in said, said
    assert "truncated" in said and "write it again" in said.lower(), said
