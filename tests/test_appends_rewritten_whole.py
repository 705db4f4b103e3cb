"""What every append rewrites whole (coordinates and variables without ``append_dim``) is guarded against a late
copy, and the last writer wins there: an object another writer stored while the append ran is written over at
its generation, not refused (writers adding their own variables at once rewrite it alike)."""

from __future__ import annotations

import time

import numpy as np
import pytest
import xarray as xr
from outcomes import Outcome, two_writes_and_a_late_copy

import cloudio

pytestmark = pytest.mark.filterwarnings("ignore:Consolidated metadata is currently not part:UserWarning")


def _part(t0: int, x: int) -> xr.Dataset:
    return xr.Dataset({"v": (("t", "x"), np.full((2, 4), t0, "f4")), "s": (("x",), np.arange(4, dtype="f4") + x)},
                      coords={"t": [t0, t0 + 1], "x": np.arange(4) + x})


def _held_until_another_writer_changed(gcs_emulator, gcs_bucket, fault_proxy, name: str, url: str) -> Outcome:
    """An append of t=2..3 with x=10.. whose upload of ``name``'s chunk is held until another writer rewrote that
    object (with the first write's values) after the append listed it."""
    key = f"{url.split('/', 3)[3]}/{name}/c/0"
    held = fault_proxy.add("delay", method="POST", path=r"/upload/.*name=" + key.replace("/", "%2F") + r"(&|$)",
                           seconds=1.5, times=1)
    append = Outcome(lambda: cloudio.to_zarr(_part(2, 10), url, append_dim="t")).start()
    for _ in range(200):
        if held.hits:
            break
        time.sleep(0.02)
    assert held.hits == 1, "the append never uploaded the object"
    bucket = gcs_emulator.client.bucket(gcs_bucket.removeprefix("gs://"))
    bucket.blob(key).upload_from_string(b"\x00" * 32)  # another writer's own bytes, a new generation
    return append


def test_an_append_writes_over_a_coordinate_another_writer_changed_meanwhile(gcs_emulator, gcs_bucket, fault_proxy):
    url = f"{gcs_bucket}/whole-coord.zarr"
    cloudio.to_zarr(_part(0, 0), url, mode="w", encoding={"v": {"chunks": (2, 4)}})
    append = _held_until_another_writer_changed(gcs_emulator, gcs_bucket, fault_proxy, "x", url)
    assert append.finished(60), "the append hung"
    assert append.error is None, repr(append.error)
    got = cloudio.open_zarr(url)
    np.testing.assert_array_equal(got.x.values, np.arange(4) + 10)
    np.testing.assert_array_equal(got.t.values, [0, 1, 2, 3])


def test_an_append_writes_over_a_variable_without_the_dim_another_writer_changed_meanwhile(
        gcs_emulator, gcs_bucket, fault_proxy):
    url = f"{gcs_bucket}/whole-var.zarr"
    cloudio.to_zarr(_part(0, 0), url, mode="w", encoding={"v": {"chunks": (2, 4)}})
    append = _held_until_another_writer_changed(gcs_emulator, gcs_bucket, fault_proxy, "s", url)
    assert append.finished(60), "the append hung"
    assert append.error is None, repr(append.error)
    np.testing.assert_array_equal(cloudio.open_zarr(url).s.values, np.arange(4, dtype="f4") + 10)


@pytest.mark.parametrize("fmt", [2, 3])
def test_a_late_copy_of_the_groups_attributes_does_not_land_over_a_later_append(gcs_emulator, gcs_bucket,
                                                                                 fault_proxy, monkeypatch, fmt):
    """Every append writes the group's attributes again (format 3: its zarr.json; 2: .zattrs): the first append's
    upload of them held past the time limit arrives after the second append committed. The attributes must read
    as the second's."""
    monkeypatch.setenv("CLOUDIO_HTTP_TIMEOUT", "1")
    url = f"{gcs_bucket}/attrs{fmt}.zarr"

    def part(t0: int, version: int) -> xr.Dataset:
        return xr.Dataset({"v": (("t",), np.zeros(2, "f4"))}, coords={"t": [t0, t0 + 1]}, attrs={"version": version})

    cloudio.to_zarr(part(0, 0), url, mode="w", zarr_format=fmt, consolidated=False)
    document = f"attrs{fmt}.zarr%2F" + ("zarr.json" if fmt == 3 else ".zattrs")
    two_writes_and_a_late_copy(fault_proxy, r"/upload/.*name=" + document + r"(&|$)", lambda v: cloudio.to_zarr(
        part(2 * v, v), url, append_dim="t", zarr_format=fmt, consolidated=False))
    got = cloudio.open_zarr(url, consolidated=False)
    assert got.attrs["version"] == 2
    np.testing.assert_array_equal(got.t.values, [0, 1, 2, 3, 4, 5])
