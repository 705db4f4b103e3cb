"""Deletes, listings and existence checks through ``cloudio.zarr_store`` under faults, and what the metadata log
keeps after a delete: found by a review; each test failed before its fix.

Faults come from the proxy in front of the real emulator (tests/faultproxy.py). The promises under test
(README "Reliability", docs/design.md): a call through the store returns, or raises a ``cloudio.CloudioError``
naming the gs:// URL and the next step with the library's error as ``__cause__``, within cloudio's time
limit; the journal says what may have changed, and no more; a consolidated copy older than what this process
changed is not trusted.
"""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr
import zarr
from outcomes import returned

import cloudio

pytestmark = pytest.mark.filterwarnings("ignore:Consolidated metadata is currently not part:UserWarning")

LIMIT = 120  # seconds a call under faults may take before it counts as hung


def _ab(url: str) -> None:
    """A consolidated dataset of two variables ``a`` and ``b``."""
    cloudio.to_zarr(xr.Dataset({"a": ("x", np.arange(4.0)), "b": ("x", np.arange(4.0))}), url, mode="w")


# -- 1. a delete and the metadata log ------------------------------------------------------------------


def test_a_failed_delete_keeps_what_the_log_knows_of_the_rest_of_the_store(gcs_emulator, gcs_bucket, fault_proxy):
    """``del g["a"]`` with one DELETE refused: the variable c written in this process stays visible to open_zarr
    (the failure recorded a delete of the whole store, which wiped the metadata log: the old consolidated copy,
    without c, was trusted again)."""
    url = f"{gcs_bucket}/fdel.zarr"
    _ab(url)
    g = zarr.open_group(cloudio.zarr_store(url))
    g.create_array("c", shape=(4,), dtype="f8", dimension_names=["x"])[:] = 1.0
    assert "c" in cloudio.open_zarr(url)
    fault_proxy.add("status", code=403, method="DELETE", path=r"fdel\.zarr%2Fa%2Fzarr\.json", times=None)
    with pytest.raises(OSError):
        returned(lambda: g.__delitem__("a"), LIMIT)
    fault_proxy.clear()
    ds = cloudio.open_zarr(url)
    assert "c" in ds and ds["c"].values.tolist() == [1.0] * 4, ds
    assert "b" in ds


def test_a_deleted_member_is_not_listed_from_the_old_consolidated_copy(gcs_emulator, gcs_bucket):
    """``del g["b"]`` through a group opened without its consolidated copy: open_zarr no longer lists b (only
    b's own entries were dropped from the log, so the old copy, which lists b, was trusted)."""
    url = f"{gcs_bucket}/mdel.zarr"
    _ab(url)
    g = zarr.open_group(cloudio.zarr_store(url), use_consolidated=False)
    del g["b"]
    ds = cloudio.open_zarr(url)
    assert "b" not in ds and "a" in ds, ds
