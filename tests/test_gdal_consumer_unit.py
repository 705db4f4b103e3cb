"""GdalConsumer's decisions, against a recording fake of its GDAL calls (no emulator, no GDAL I/O).

The consumer decides which of GDAL's caches a change makes stale and what to
clear or set, and when; :mod:`cloudio._gdal.bindings` carries the calls out.
Each test drives the consumer as cloudio does (a listing, a plan before each
open, journal changes, datasets opened and closed) and asserts the exact
calls GDAL would have received. The same behaviour against real GDAL and the
emulator is pinned by test_gdal_cache.py and test_open_read.py.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator

import pytest

from cloudio._gdal.consumer import NEEDS_LISTING, GdalCalls, GdalConsumer
from cloudio._gdal.targets import Target, target
from cloudio._journal import Change, Kind
from cloudio._paths import parse_gcs

READDIR = "GDAL_DISABLE_READDIR_ON_OPEN"
_seq: Iterator[int] = itertools.count(1)
Call = tuple[str, ...]


class Recorder:
    """Records every GDAL call the consumer makes, in order; ``on_clear`` runs inside a clear."""

    def __init__(self, listings: dict[str, list[str]] | None = None) -> None:
        self.calls: list[Call] = []
        self.listings = listings or {}
        self.on_clear: Callable[[str], None] | None = None

    def clear(self, vsi: str) -> None:
        self.calls.append(("clear", vsi))
        if self.on_clear is not None:
            self.on_clear(vsi)

    def set_path_option(self, prefix: str, key: str, value: str) -> None:
        self.calls.append(("set", prefix, key, value))

    def clear_path_options(self, prefix: str) -> None:
        self.calls.append(("clear_options", prefix))

    def listdir(self, vsi: str) -> list[str]:
        self.calls.append(("listdir", vsi))
        return list(self.listings.get(vsi, []))

    def take(self) -> list[Call]:
        """The calls since the last take."""
        out, self.calls = self.calls, []
        return out


class Dataset:
    """Stands for a rasterio dataset: weakly referenced, open until ``closed``."""

    closed = False


@pytest.fixture
def rec() -> Recorder:
    return Recorder()


@pytest.fixture
def gdal(rec: Recorder) -> GdalConsumer:
    return GdalConsumer(GdalCalls(
        clear=rec.clear, set_path_option=rec.set_path_option,
        clear_path_options=rec.clear_path_options, listdir=rec.listdir,
    ))


def t(key: str) -> Target:
    return target(parse_gcs(f"gs://bkt/{key}"))


def change(url: str, kind: Kind = "write", prefix: bool = False) -> Change:
    return Change(next(_seq), url, kind, prefix=prefix)


def listed(gdal: GdalConsumer, rec: Recorder, names: list[str], *opened: str) -> None:
    """cloudio listed d/ (``names``) and opened ``opened`` there; forget the calls that took."""
    gdal.set_listing(parse_gcs("gs://bkt/d/x"), names)
    for name in opened:
        gdal.plan_read(t(f"d/{name}"))
    rec.take()


def test_a_new_name_in_a_directory_gdal_never_listed_clears_only_the_file(gdal: GdalConsumer, rec: Recorder) -> None:
    gdal.set_listing(parse_gcs("gs://bkt/d/a.tif"), ["a.tif"])
    assert gdal.plan_read(t("d/a.tif")) is False  # no sidecar: GDAL need not list d/
    assert rec.take() == [("set", "/vsigs/bkt/d/a.tif", READDIR, "EMPTY_DIR")]
    gdal.on_change(change("gs://bkt/d/b.tif"))
    assert gdal.plan_read(t("d/b.tif")) is False
    assert gdal.plan_read(t("d/a.tif")) is False
    assert rec.take() == [
        ("clear", "/vsigs/bkt/d/b.tif"),  # the file-level clear, never /vsigs/bkt/d
        ("set", "/vsigs/bkt/d/b.tif", READDIR, "EMPTY_DIR"),
    ]


def test_a_write_in_a_directory_gdal_listed_becomes_a_directory_clear_at_the_next_read_that_could_see_it(
    gdal: GdalConsumer, rec: Recorder
) -> None:
    listed(gdal, rec, ["a.tif", "a.tif.ovr"])
    assert gdal.plan_read(t("d/a.tif")) is True  # a sidecar: GDAL lists d/
    assert rec.take() == []
    gdal.on_change(change("gs://bkt/d/c.tif"))
    assert rec.take() == [("clear", "/vsigs/bkt/d/c.tif")]  # the directory clear waits for a read
    assert gdal.plan_read(t("d/a.tif")) is True
    assert rec.take() == [("clear", "/vsigs/bkt/d")]
    assert gdal.plan_read(t("d/a.tif")) is True
    assert rec.take() == []  # once


def test_a_delete_in_a_directory_gdal_listed(gdal: GdalConsumer, rec: Recorder) -> None:
    listed(gdal, rec, ["a.tif", "a.tif.ovr", "b.tif"], "a.tif")
    gdal.on_change(change("gs://bkt/d/b.tif", "delete"))
    gdal.plan_read(t("d/a.tif"))
    assert rec.take() == [("clear", "/vsigs/bkt/d/b.tif"), ("clear", "/vsigs/bkt/d")]


def test_a_delete_of_a_name_cloudio_never_listed_changes_no_listing(gdal: GdalConsumer, rec: Recorder) -> None:
    listed(gdal, rec, ["a.tif", "a.tif.ovr"], "a.tif")
    gdal.on_change(change("gs://bkt/d/gone.tif", "delete"))
    gdal.plan_read(t("d/a.tif"))
    assert rec.take() == [("clear", "/vsigs/bkt/d/gone.tif")]


def test_an_invalidate_of_a_prefix_clears_it_and_its_options_and_forgets_its_listing(
    gdal: GdalConsumer, rec: Recorder
) -> None:
    listed(gdal, rec, ["a.tif"], "a.tif")
    gdal.on_change(change("gs://bkt/d/", "invalidate", prefix=True))
    assert rec.take() == [("clear", "/vsigs/bkt/d"), ("clear_options", "/vsigs/bkt/d/a.tif")]
    assert gdal.plan_read(t("d/a.tif")) is NEEDS_LISTING  # cloudio's own listing went too
    assert rec.take() == []


def test_empty_dir_is_set_without_sidecars_and_removed_when_a_sidecar_appears(
    gdal: GdalConsumer, rec: Recorder
) -> None:
    gdal.set_listing(parse_gcs("gs://bkt/d/a.tif"), ["a.tif", "b.tif"])
    gdal.plan_read(t("d/a.tif"))
    assert rec.take() == [("set", "/vsigs/bkt/d/a.tif", READDIR, "EMPTY_DIR")]
    gdal.on_change(change("gs://bkt/d/a.tif.ovr"))
    assert rec.take() == [
        ("clear", "/vsigs/bkt/d/a.tif.ovr"),
        ("clear_options", "/vsigs/bkt/d/a.tif"),  # EMPTY_DIR on a.tif would also hide a.tif.ovr
    ]
    assert gdal.plan_read(t("d/a.tif")) is True  # GDAL now lists d/ to find the overview
    assert rec.take() == []


def test_datasets_open_across_a_write_are_recleared_at_each_open_until_closed(
    gdal: GdalConsumer, rec: Recorder
) -> None:
    a = t("d/a.tif")
    listed(gdal, rec, ["a.tif"], "a.tif")
    ds = Dataset()
    gdal.opened_dataset(a, ds, gdal.epoch(a))
    assert rec.take() == []
    gdal.on_change(change("gs://bkt/d/a.tif"))
    assert rec.take() == [("clear", "/vsigs/bkt/d/a.tif")]
    gdal.plan_read(a)
    gdal.plan_read(a)
    assert rec.take() == [("clear", "/vsigs/bkt/d/a.tif")] * 2  # what the old dataset may have put back
    ds.closed = True
    gdal.plan_read(a)
    assert rec.take() == [("clear", "/vsigs/bkt/d/a.tif")]  # once more after the close
    gdal.plan_read(a)
    assert rec.take() == []


def test_a_dataset_collected_counts_as_closed(gdal: GdalConsumer, rec: Recorder) -> None:
    a = t("d/a.tif")
    listed(gdal, rec, ["a.tif"], "a.tif")
    ds: Dataset | None = Dataset()
    gdal.opened_dataset(a, ds, gdal.epoch(a))
    gdal.on_change(change("gs://bkt/d/a.tif"))
    del ds
    gdal.plan_read(a)
    gdal.plan_read(a)
    assert rec.take() == [("clear", "/vsigs/bkt/d/a.tif")] * 2


def test_an_open_that_overlaps_a_write_clears_after_the_open(gdal: GdalConsumer, rec: Recorder) -> None:
    a = t("d/a.tif")
    listed(gdal, rec, ["a.tif"], "a.tif")
    before = gdal.epoch(a)  # the open begins
    gdal.on_change(change("gs://bkt/d/a.tif"))  # the write lands while GDAL opens
    gdal.opened_dataset(a, Dataset(), before)
    assert rec.take() == [("clear", "/vsigs/bkt/d/a.tif"), ("clear", "/vsigs/bkt/d/a.tif")]


def test_an_open_that_begins_during_the_clear_sees_an_odd_epoch_and_clears_after(
    gdal: GdalConsumer, rec: Recorder
) -> None:
    a = t("d/a.tif")
    listed(gdal, rec, ["a.tif"], "a.tif")
    during: list[int] = []
    rec.on_clear = lambda vsi: during.append(gdal.epoch(a))
    gdal.on_change(change("gs://bkt/d/a.tif"))
    rec.on_clear = None
    assert len(during) == 1 and during[0] & 1  # odd: a write is being applied
    gdal.opened_dataset(a, Dataset(), during[0])
    assert rec.take() == [("clear", "/vsigs/bkt/d/a.tif"), ("clear", "/vsigs/bkt/d/a.tif")]


def test_an_open_after_the_write_needs_no_clear(gdal: GdalConsumer, rec: Recorder) -> None:
    a = t("d/a.tif")
    listed(gdal, rec, ["a.tif"], "a.tif")
    gdal.on_change(change("gs://bkt/d/a.tif"))
    rec.take()
    gdal.opened_dataset(a, Dataset(), gdal.epoch(a))
    assert rec.take() == []


def test_gdal_listing_clears_a_listing_gdal_may_hold_then_lists(rec: Recorder, gdal: GdalConsumer) -> None:
    rec.listings["/vsigs/bkt/d"] = ["a.tif", "a.tif.ovr"]
    assert gdal.gdal_listing(parse_gcs("gs://bkt/d/")) == ["a.tif", "a.tif.ovr"]
    assert rec.take() == [("clear", "/vsigs/bkt/d"), ("listdir", "/vsigs/bkt/d")]
    assert gdal.gdal_listing(parse_gcs("gs://bkt/d/")) == ["a.tif", "a.tif.ovr"]
    assert rec.take() == [("listdir", "/vsigs/bkt/d")]  # GDAL's own listing is current
    gdal.on_change(change("gs://bkt/d/c.tif"))
    gdal.gdal_listing(parse_gcs("gs://bkt/d/"))
    assert rec.take() == [("clear", "/vsigs/bkt/d/c.tif"), ("clear", "/vsigs/bkt/d"), ("listdir", "/vsigs/bkt/d")]


# -- strong / bounded: the object and its sidecars, as one listing reported them -----------------


def test_revalidation_clears_what_changed_and_tells_gdal_of_a_new_sidecar(gdal: GdalConsumer, rec: Recorder) -> None:
    a = t("d/a.tif")
    gdal.set_listing(a.path, ["a.tif"])
    assert gdal.plan_read(a) is False  # no sidecar: GDAL is told not to list
    rec.take()
    assert gdal.revalidated(a.path, {"a.tif": 5}) is True  # never checked: GDAL's copy may be any version
    assert rec.take() == [("clear", "/vsigs/bkt/d/a.tif")]
    assert gdal.revalidated(a.path, {"a.tif": 5}) is False and rec.take() == []
    assert gdal.is_current(a.path, {"a.tif": 5})

    # another writer added an overview: GDAL must now look for sidecars
    assert not gdal.is_current(a.path, {"a.tif": 5, "a.tif.ovr": 7})
    assert rec.take() == []  # is_current changes nothing
    assert gdal.revalidated(a.path, {"a.tif": 5, "a.tif.ovr": 7}) is True
    assert ("clear", "/vsigs/bkt/d/a.tif.ovr") in rec.take()
    assert gdal.plan_read(a) is True  # GDAL lists the directory and finds the .ovr
    rec.take()

    # ... and replaced it, then deleted it
    gdal.revalidated(a.path, {"a.tif": 5, "a.tif.ovr": 8})
    assert rec.take() == [("clear", "/vsigs/bkt/d/a.tif.ovr")]
    gdal.revalidated(a.path, {"a.tif": 5})
    assert ("clear", "/vsigs/bkt/d/a.tif.ovr") in rec.take()
    assert gdal.plan_read(a) is False


def test_a_dropped_empty_dir_option_counts_its_directory_as_one_gdal_may_have_listed(
        gdal: GdalConsumer, rec: Recorder, monkeypatch: pytest.MonkeyPatch) -> None:
    """Past ``_EMPTY_DIR_MAX`` the oldest EMPTY_DIR option is removed. An open of its object may be under way
    then, planned with it: GDAL then lists the directory after all. A sidecar written there later must clear
    that listing at the next read that could see it (else GDAL misses the sidecar)."""
    from cloudio._gdal import consumer as consumer_module

    monkeypatch.setattr(consumer_module, "_EMPTY_DIR_MAX", 1)
    listed(gdal, rec, ["a.tif"], "a.tif")  # EMPTY_DIR on d/a.tif
    gdal.set_listing(parse_gcs("gs://bkt/e/x"), ["b.tif"])
    gdal.plan_read(t("e/b.tif"))  # its option pushes d/a.tif's out
    assert ("clear_options", "/vsigs/bkt/d/a.tif") in rec.take()
    gdal.on_change(change("gs://bkt/d/a.tif.ovr"))
    rec.take()
    assert gdal.plan_read(t("d/a.tif")) is True  # GDAL lists, for the sidecar
    assert ("clear", "/vsigs/bkt/d") in rec.take()  # and not from a listing made without it
