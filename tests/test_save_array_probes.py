"""save_array checks its arguments on an array zarr makes in memory (the probe) before anything is written, and
writes that probe's documents: nothing of one write, nor a change made since, may reach another, and zarr's
warnings about the arguments come as Python's filters say. (A cache of probes, keyed by the arguments, failed
each of these once; it was dropped: its key could not hold all that decides zarr's documents and warnings.)"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import zarr

import cloudio

DATA = np.arange(40 * 30, dtype="f4").reshape(40, 30)


def _attrs(url: str) -> dict[str, object]:
    return dict(zarr.open_array(cloudio.zarr_store(url), mode="r").attrs)


def _order_warning() -> type[Warning]:
    """The class of zarr's warning about ``order=`` for a Zarr v3 array; the test is skipped if it gives none."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        zarr.create_array(zarr.storage.MemoryStore(), shape=(4,), dtype="f4", chunks=(2,), order="F")
    about_order = [w.category for w in caught if "order" in str(w.message)]
    if not about_order:
        pytest.skip("this zarr does not warn about order= for a Zarr v3 array")
    return about_order[0]


def test_attributes_changed_on_a_returned_array_do_not_reach_the_next_write(gcs_bucket: str) -> None:
    """zarr changes an array's attributes in place (``metadata.attributes.update``): on the probe's own
    metadata, the array the next write of the same arguments returns would hold them."""
    first = cloudio.save_array(DATA, f"{gcs_bucket}/probes/one.zarr", chunks=(10, 10), attributes={"k": 1})
    first.attrs["k"] = 2
    first.attrs["added"] = "here"
    second = cloudio.save_array(DATA, f"{gcs_bucket}/probes/two.zarr", chunks=(10, 10), attributes={"k": 1})
    assert dict(second.attrs) == {"k": 1}
    assert _attrs(f"{gcs_bucket}/probes/one.zarr") == {"k": 2, "added": "here"}
    assert _attrs(f"{gcs_bucket}/probes/two.zarr") == {"k": 1}


def test_an_attributes_dict_changed_between_writes_is_written_as_it_is_then(gcs_bucket: str) -> None:
    attributes = {"k": 1}
    cloudio.save_array(DATA, f"{gcs_bucket}/probes/a.zarr", chunks=(10, 10), attributes=attributes)
    attributes["k"] = 2
    cloudio.save_array(DATA, f"{gcs_bucket}/probes/b.zarr", chunks=(10, 10), attributes=attributes)
    assert _attrs(f"{gcs_bucket}/probes/a.zarr") == {"k": 1}
    assert _attrs(f"{gcs_bucket}/probes/b.zarr") == {"k": 2}


def test_zarr_config_set_between_writes_is_honoured(gcs_bucket: str) -> None:
    """The same arguments under another ``zarr.config`` make other documents (here, indented otherwise)."""
    fs = cloudio.filesystem(gcs_bucket)
    bucket = gcs_bucket.removeprefix("gs://")
    cloudio.save_array(DATA, f"{gcs_bucket}/probes/two.zarr", chunks=(10, 10))
    with zarr.config.set({"json_indent": 7}):
        cloudio.save_array(DATA, f"{gcs_bucket}/probes/seven.zarr", chunks=(10, 10))
    assert b'\n  "shape"' in fs.cat(f"{bucket}/probes/two.zarr/zarr.json")
    assert b'\n       "shape"' in fs.cat(f"{bucket}/probes/seven.zarr/zarr.json")
    np.testing.assert_array_equal(cloudio.load_array(f"{gcs_bucket}/probes/seven.zarr"), DATA)


def test_the_same_arguments_with_another_fill_value_or_dtype_make_their_own_array(gcs_bucket: str) -> None:
    cloudio.save_array(DATA, f"{gcs_bucket}/probes/f0.zarr", chunks=(10, 10), fill_value=0.0)
    cloudio.save_array(DATA, f"{gcs_bucket}/probes/f1.zarr", chunks=(10, 10), fill_value=np.float32(-1.5))
    cloudio.save_array(DATA.astype("f8"), f"{gcs_bucket}/probes/f8.zarr", chunks=(10, 10), fill_value=0.0)
    opened = {name: zarr.open_array(cloudio.zarr_store(f"{gcs_bucket}/probes/{name}.zarr"), mode="r")
              for name in ("f0", "f1", "f8")}
    assert (opened["f0"].fill_value, opened["f1"].fill_value) == (0.0, -1.5)
    assert (opened["f0"].dtype, opened["f8"].dtype) == (np.dtype("f4"), np.dtype("f8"))


@pytest.mark.parametrize(("first", "then"), [({"a": [1, 2]}, {"a": (1, 2)}), ({"1": "x"}, {1: "x"})])
def test_attributes_json_spells_alike_are_returned_as_given(gcs_bucket: str, first: dict[object, object],
                                                            then: dict[object, object]) -> None:
    """A tuple and a list, or a key 1 and "1", are one JSON document, but zarr returns attributes as given."""
    cloudio.save_array(DATA, f"{gcs_bucket}/probes/first.zarr", chunks=(10, 10), attributes=first)
    z = cloudio.save_array(DATA, f"{gcs_bucket}/probes/then.zarr", chunks=(10, 10), attributes=then)
    assert z.attrs.asdict() == then


def test_attributes_are_written_in_the_order_given(gcs_bucket: str) -> None:
    fs = cloudio.filesystem(gcs_bucket)
    bucket = gcs_bucket.removeprefix("gs://")
    cloudio.save_array(DATA, f"{gcs_bucket}/probes/ba.zarr", chunks=(10, 10), attributes={"b": 1, "a": 2})
    cloudio.save_array(DATA, f"{gcs_bucket}/probes/ab.zarr", chunks=(10, 10), attributes={"a": 2, "b": 1})
    for name, order in (("ba", ["b", "a"]), ("ab", ["a", "b"])):
        assert list(json.loads(fs.cat(f"{bucket}/probes/{name}.zarr/zarr.json"))["attributes"]) == order


def test_an_attributes_dict_changed_after_its_write_does_not_reach_a_later_write_of_its_earlier_value(
        gcs_bucket: str) -> None:
    """zarr keeps the attributes dict it is given, not a copy: a probe kept with it would take on the caller's
    later changes, and a write of the earlier value would return (and store on its next change) the later."""
    given = {"units": "m", "levels": [1]}
    cloudio.save_array(DATA, f"{gcs_bucket}/probes/given.zarr", chunks=(10, 10), attributes=given)
    given["units"] = "km"
    given["levels"].append(2)  # type: ignore[attr-defined]
    z = cloudio.save_array(DATA, f"{gcs_bucket}/probes/later.zarr", chunks=(10, 10),
                           attributes={"units": "m", "levels": [1]})
    assert dict(z.attrs) == {"units": "m", "levels": [1]}
    z.attrs["more"] = 1
    assert _attrs(f"{gcs_bucket}/probes/later.zarr") == {"units": "m", "levels": [1], "more": 1}


def test_zarr_warns_about_the_arguments_again_under_other_warning_filters(gcs_bucket: str) -> None:
    """After a write under an "ignore" filter, zarr's warning comes in each later ``pytest.warns`` (a
    ``warnings.catch_warnings`` whose filters read alike), as it does without a kept probe."""
    warning = _order_warning()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cloudio.save_array(DATA, f"{gcs_bucket}/probes/quiet.zarr", chunks=(10, 10), order="F")
    for name in ("first", "second"):
        with pytest.warns(warning, match="order"):
            cloudio.save_array(DATA, f"{gcs_bucket}/probes/{name}.zarr", chunks=(10, 10), order="F")


def test_zarr_warns_about_the_arguments_on_every_write_under_an_always_filter(gcs_bucket: str) -> None:
    _order_warning()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for name in ("one", "two"):
            cloudio.save_array(DATA, f"{gcs_bucket}/probes/{name}.zarr", chunks=(10, 10), order="F")
    assert len([w for w in caught if "order" in str(w.message)]) == 2


def test_a_nan_fill_value_pads_edge_chunks_with_its_own_bits(gcs_bucket: str) -> None:
    """Every NaN reads alike, and JSON writes each as "NaN"; the padding of edge chunks holds the fill's bits."""
    fs = cloudio.filesystem(gcs_bucket)
    bucket = gcs_bucket.removeprefix("gs://")
    a = np.zeros((15, 15), "f4")
    for name, bits in (("payload", 0x7FC00001), ("plain", 0x7FC00000)):
        fill = np.array([bits], "<u4").view("<f4")[0]
        z = cloudio.save_array(a, f"{gcs_bucket}/probes/{name}.zarr", chunks=(10, 10), fill_value=fill,
                               compressors=None)
        assert np.array([z.fill_value], "<f4").view("<u4")[0] == bits
        edge = np.frombuffer(fs.cat(f"{bucket}/probes/{name}.zarr/c/1/1"), "<u4").reshape(10, 10)
        assert edge[9, 9] == bits and edge[0, 0] == 0


def test_attributes_of_numpy_types_are_returned_as_given(gcs_bucket: str) -> None:
    cloudio.save_array(DATA, f"{gcs_bucket}/probes/py.zarr", chunks=(10, 10), attributes={"x": 1.0})
    z = cloudio.save_array(DATA, f"{gcs_bucket}/probes/np.zarr", chunks=(10, 10), attributes={"x": np.float64(1.0)})
    assert type(z.attrs["x"]) is np.float64
