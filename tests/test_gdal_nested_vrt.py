"""A VRT whose source is another VRT, read at the strong and bounded levels while another writer changes the leaf.

GDAL names only a VRT's own sources in ``files`` (``outer.vrt`` lists
``inner.vrt``, not the ``src.tif`` behind it), so the check of a VRT's
sources must follow the VRTs among them down to the rasters the pixels come
from. The other writer is google-cloud-storage in this process: nothing is
journaled.
"""

from __future__ import annotations

from rasters import nested_vrt
from rasters import put as _put

import cloudio
from cloudio.emulator import Emulator, Request


def _key(url: str) -> tuple[str, str]:
    bucket, key = url[len("gs://"):].split("/", 1)
    return bucket, key


def _since(emu: Emulator, bucket: str, start: int) -> tuple[list[Request], int]:
    """The requests for ``bucket`` the emulator logged after the first ``start``, and the new start."""
    log = emu.requests()
    return [r for r in log[start:] if bucket in r.path], len(log)


def test_strong_nested_vrt_leaf_source_overwritten(gcs_bucket: str, gcs_emulator: Emulator) -> None:
    from rasters import tif

    outer, src = nested_vrt(gcs_emulator, gcs_bucket)
    with cloudio.session("strong"), cloudio.open(outer) as ds:
        assert ds.read(1).max() == 1
    _put(gcs_emulator, src, tif(2))
    with cloudio.session("strong"), cloudio.open(outer) as ds:
        assert ds.read(1).max() == 2


def test_bounded_nested_vrt_leaf_source_overwritten(gcs_bucket: str, gcs_emulator: Emulator) -> None:
    """A bound the last check is older than takes the strong level's path."""
    from rasters import tif

    outer, src = nested_vrt(gcs_emulator, gcs_bucket)
    with cloudio.session(0), cloudio.open(outer) as ds:
        assert ds.read(1).max() == 1
    _put(gcs_emulator, src, tif(2))
    with cloudio.session(3600), cloudio.open(outer) as ds:
        assert ds.read(1).max() == 1  # checked less than an hour ago: trusted
    with cloudio.session(0), cloudio.open(outer) as ds:
        assert ds.read(1).max() == 2


def test_strong_nested_vrt_costs_one_listing_per_object(gcs_bucket: str, gcs_emulator: Emulator) -> None:
    """One listing for each of outer.vrt, inner.vrt and src.tif; opening inner.vrt for its sources costs none."""
    from rasters import tif

    bucket = _key(gcs_bucket + "/x")[0]
    outer, src = nested_vrt(gcs_emulator, gcs_bucket)
    with cloudio.session("strong"), cloudio.open(outer) as ds:
        ds.read(1)
    _, start = _since(gcs_emulator, bucket, 0)

    with cloudio.session("strong") as s, cloudio.open(outer) as ds:
        assert ds.read(1).max() == 1
    unchanged, start = _since(gcs_emulator, bucket, start)
    listing = f"/storage/v1/b/{bucket}/o"
    assert s.stats.revalidations == 3
    assert [(r.method, r.path.split("?")[0]) for r in unchanged] == [("GET", listing)] * 3, unchanged

    _put(gcs_emulator, src, tif(2))
    _, start = _since(gcs_emulator, bucket, start)
    with cloudio.session("strong") as s, cloudio.open(outer) as ds:
        assert ds.read(1).max() == 2
    overwritten, _ = _since(gcs_emulator, bucket, start)
    assert s.stats.revalidations == 3
    assert sorted((r.method, r.path.split("?")[0]) for r in overwritten) == sorted(
        [("GET", listing)] * 3 + [("GET", f"/{bucket}/g/src.tif")]), overwritten  # and the new bytes
