"""The deletes of a write (zarr's emptying before ``to_zarr(mode="w")``, ``save_array``'s sweep of what the new
array did not overwrite, a chunk zarr deletes for holding nothing but the fill value) each need the generation
the write listed (``ifGenerationMatch``), on the real emulator.

Why: a DELETE given up at the time limit and sent again may still reach the server later, after the write stored
the object again, and remove it. With the generation it was listed at, GCS refuses it then. fake-gcs-server
ignores the precondition on deletes, so these tests check what is sent (from the emulator's log), and what a
refusal (a 412, injected by the fault proxy as GCS would answer) does.
"""

from __future__ import annotations

from urllib.parse import parse_qs, unquote, urlsplit

import numpy as np
import pytest
import xarray as xr
from outcomes import bounded

import cloudio

pytestmark = pytest.mark.filterwarnings("ignore:Consolidated metadata is currently not part:UserWarning")


def _generations(emu, bucket: str, prefix: str) -> dict[str, int]:
    return {b.name: int(b.generation) for b in emu.client.list_blobs(bucket.removeprefix("gs://"), prefix=prefix)}


def _deletes(emu, since: int, prefix: str) -> dict[str, int | None]:
    """Each DELETE of an object under ``prefix`` the emulator logged after the first ``since`` requests: the
    object's name and the ifGenerationMatch it carried (None: by name)."""
    out: dict[str, int | None] = {}
    for r in emu.requests()[since:]:
        parts = urlsplit(r.path)
        if r.method != "DELETE" or "/o/" not in parts.path:
            continue
        name = unquote(parts.path.split("/o/", 1)[1])
        if name.startswith(prefix):
            guard = parse_qs(parts.query).get("ifGenerationMatch")
            out[name] = int(guard[0]) if guard else None
    return out


def _ds(n: int, value: int) -> xr.Dataset:
    return xr.Dataset({"v": (("y", "x"), np.full((n, n), value, "i4"))}, attrs={"v": value})


def test_zarrs_emptying_before_to_zarr_mode_w_deletes_each_object_at_its_generation(gcs_emulator, gcs_bucket):
    """to_zarr(mode="w") over a store of a larger array: zarr deletes what is stored first; each DELETE needs the
    generation the object had (the marker's own removal at the end included), and the new values read back."""
    url = f"{gcs_bucket}/emptied.zarr"
    kw = {"encoding": {"v": {"chunks": (32, 32)}}, "consolidated": False}
    cloudio.to_zarr(_ds(96, 1), url, mode="w", **kw)
    before = _generations(gcs_emulator, gcs_bucket, "emptied.zarr/")
    since = len(gcs_emulator.requests())
    _, err, _ = bounded(lambda: cloudio.to_zarr(_ds(64, 2), url, mode="w", **kw))
    assert err is None, repr(err)
    deleted = {k: g for k, g in _deletes(gcs_emulator, since, "emptied.zarr/").items()
               if not k.endswith(".cloudio-write-in-progress")}
    assert set(deleted) == set(before), (sorted(deleted), sorted(before))
    assert deleted == before
    assert (cloudio.open_zarr(url, consolidated=False).v.values == 2).all()


def test_save_array_sweeps_what_it_did_not_overwrite_at_the_generations_listed(gcs_emulator, gcs_bucket):
    """save_array of a smaller array over a larger one: the shards outside the new grid are deleted last, each
    at the generation its listing found."""
    url = f"{gcs_bucket}/swept.zarr"
    kw = {"chunks": (16, 16), "shards": (32, 32)}
    cloudio.save_array(np.full((96, 96), 1, "i4"), url, **kw)
    before = _generations(gcs_emulator, gcs_bucket, "swept.zarr/c/")
    since = len(gcs_emulator.requests())
    cloudio.save_array(np.full((64, 64), 2, "i4"), url, **kw)
    deleted = _deletes(gcs_emulator, since, "swept.zarr/c/")
    assert len(deleted) == 5 and deleted == {k: before[k] for k in deleted}, deleted
    np.testing.assert_array_equal(cloudio.load_array(url), 2)


def test_a_delete_refused_for_another_generation_stops_the_write_with_a_conflict(gcs_emulator, gcs_bucket,
                                                                                 fault_proxy):
    """A DELETE of zarr's emptying answered 412 (the object changed since it was listed, as GCS answers): to_zarr
    raises ConflictError naming the object and saying what to do, and the store is marked incomplete."""
    url = f"{gcs_bucket}/refused.zarr"
    kw = {"encoding": {"v": {"chunks": (32, 32)}}, "consolidated": False}
    cloudio.to_zarr(_ds(64, 1), url, mode="w", **kw)
    fault_proxy.add("status", code=412, method="DELETE", path=r"refused\.zarr%2Fv%2Fc%2F1%2F1", times=1)
    _, err, _ = bounded(lambda: cloudio.to_zarr(_ds(64, 2), url, mode="w", **kw))
    assert isinstance(err, cloudio.ConflictError), repr(err)
    assert "refused.zarr/v/c/1/1" in str(err) and "write again" in str(err)
    with pytest.raises(cloudio.IncompleteWriteError, match="refused.zarr"):
        cloudio.open_zarr(url, consolidated=False)
