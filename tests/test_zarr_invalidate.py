"""``cloudio.invalidate`` reaches the Zarr face: a consolidated copy another writer left stale is not trusted.

At the session level plain zarr (not cloudio) changes an array of a
consolidated store without consolidating again; the user announces it with
:func:`cloudio.invalidate`, as docs/consistency.md says. The next
``cloudio.open_zarr`` must read the new metadata, never the stale
consolidated copy (old shape, or new chunks decoded with the old dtype).
An open with nothing announced costs what it did.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from rasters import gcsfs_options as _so
from rasters import small_dataset as _dataset

import cloudio
from cloudio.emulator import Emulator, Request

zarr_warnings = pytest.mark.filterwarnings("ignore:Consolidated metadata is currently not part:UserWarning")


def _resized_behind_consolidated(url: str, emu: Emulator) -> None:
    """Another writer (plain zarr) appends two rows to ``a`` and ``y`` and does not consolidate again."""
    import zarr

    group = zarr.open_group(url, mode="r+", storage_options=_so(emu), use_consolidated=False)
    group["a"].append(np.full((2, 4), 99.0))
    group["y"].append(np.array([4, 5]))


def _retyped_behind_consolidated(url: str, emu: Emulator) -> None:
    """Another writer (plain zarr) replaces array ``a`` by one of another dtype of the same itemsize, and
    does not consolidate again: the consolidated copy still describes the old array."""
    import zarr

    group = zarr.open_group(url, mode="r+", storage_options=_so(emu), use_consolidated=False)
    old = group["a"]
    new = group.create_array("a", shape=old.shape, dtype="int64", chunks=old.chunks, overwrite=True,
                             dimension_names=("y", "x"),
                             attributes={k: v for k, v in old.attrs.items() if k != "_FillValue"})
    new[...] = np.arange(100, 116, dtype="int64").reshape(4, 4)


def _relayed(url: str) -> None:
    """An invalidation of ``url`` made in another process and relayed here (as :mod:`cloudio.dask` does)."""
    from cloudio._journal import Change, journal
    from cloudio._paths import normalize

    journal().replay([Change(seq=1, url=normalize(url), kind="invalidate", prefix=True, origin="worker@elsewhere")])


@zarr_warnings
def test_session_invalidate_after_array_resized_behind_consolidated(gcs_bucket: str, gcs_emulator: Emulator) -> None:
    url = f"{gcs_bucket}/s.zarr"
    cloudio.to_zarr(_dataset(), url, mode="w")
    assert cloudio.open_zarr(url)["a"].shape == (4, 4)
    _resized_behind_consolidated(url, gcs_emulator)
    cloudio.invalidate(url)
    with cloudio.session("session"):
        a = cloudio.open_zarr(url)["a"].values
    assert a.shape == (6, 4)


@zarr_warnings
def test_session_invalidate_then_open_zarr_never_decodes_new_chunks_with_old_metadata(
        gcs_bucket: str, gcs_emulator: Emulator) -> None:
    url = f"{gcs_bucket}/s.zarr"
    cloudio.to_zarr(_dataset(), url, mode="w")
    assert cloudio.open_zarr(url)["a"].dtype == np.float64
    _retyped_behind_consolidated(url, gcs_emulator)
    cloudio.invalidate(url)
    with cloudio.session("session"):
        try:
            a = cloudio.open_zarr(url)["a"].values
        except Exception as e:  # refusing is fine; silently wrong values are not
            pytest.skip(f"raised {e!r}")
    np.testing.assert_array_equal(a, np.arange(100, 116).reshape(4, 4))


@zarr_warnings
@pytest.mark.parametrize("announce", [
    pytest.param(lambda url, bucket: cloudio.invalidate(url + "/a"), id="inside-the-store"),
    pytest.param(lambda url, bucket: cloudio.invalidate(bucket), id="the-bucket"),
    pytest.param(lambda url, bucket: _relayed(url), id="relayed-from-dask"),
])
def test_every_announcement_covering_the_store_counts_and_keeps_counting(
        gcs_bucket: str, gcs_emulator: Emulator, announce: Callable[[str, str], None]) -> None:
    url = f"{gcs_bucket}/s.zarr"
    cloudio.to_zarr(_dataset(), url, mode="w")
    assert cloudio.open_zarr(url)["a"].shape == (4, 4)
    _resized_behind_consolidated(url, gcs_emulator)
    announce(url, gcs_bucket)
    with cloudio.session("session"):
        assert cloudio.open_zarr(url)["a"].shape == (6, 4)
        # the copy found out of date stays distrusted without a new announcement, as after this process's writes
        np.testing.assert_array_equal(cloudio.open_zarr(url)["a"].values[4:], np.full((2, 4), 99.0))


def _listings(requests: list[Request]) -> list[Request]:
    return [r for r in requests if r.method == "GET" and "/o?" in r.path]


@zarr_warnings
def test_open_without_announcement_costs_what_it_did(gcs_bucket: str, gcs_emulator: Emulator) -> None:
    import xarray as xr

    url = f"{gcs_bucket}/s.zarr"
    cloudio.to_zarr(_dataset(), url, mode="w")
    cloudio.to_zarr(_dataset(), f"{url}2", mode="w")
    bucket = gcs_bucket.removeprefix("gs://")
    seen = len(gcs_emulator.requests())

    def take() -> list[Request]:
        nonlocal seen
        log = gcs_emulator.requests()
        new, seen = log[seen:], len(log)
        return [r for r in new if bucket in r.path]

    xr.open_zarr(url, storage_options=_so(gcs_emulator))
    raw = take()
    with cloudio.session("session"):
        cloudio.open_zarr(url)
        quiet = take()
        cloudio.invalidate(f"{url}2")  # another store: "s.zarr2" is not under "s.zarr"
        cloudio.invalidate(f"{url}2/a")
        cloudio.open_zarr(url)
        elsewhere = take()
        cloudio.invalidate(url)
        cloudio.open_zarr(url)
        announced = take()
        cloudio.open_zarr(url)
        after = take()
    assert len(quiet) == len(raw) + 1, (quiet, raw)  # the write marker's GET, as before
    assert not _listings(quiet)
    assert sorted(r.path for r in elsewhere) == sorted(r.path for r in quiet)
    # one listing of the metadata documents, in place of the marker's GET; the members' own documents are then
    # read, not the consolidated copy (whose age says nothing of its content): zarr lists the group for them
    assert len(_listings(announced)) == 2, announced
    assert not any(r.path.startswith("/download/") and ".cloudio-write-in-progress" in r.path for r in announced)
    assert sorted(r.path for r in after) == sorted(r.path for r in quiet)  # checked once: the copy was current
