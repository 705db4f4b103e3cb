"""A prefix change (``cloudio.invalidate``, a relayed prefix record) while a dataset of an object below is open.

``cloudio.invalidate`` always records a prefix change. Such a change must treat each object below that has
datasets open as a write of it (docs/design.md, "GDAL and threads"): the object's gate, its epoch odd while
GDAL's cache is cleared and even after, so that a dataset opened before never reads through its old handle
again. Before, only the clear was made: the old handle read the new bytes with the old layout and GDAL
aborted the process ("malloc(): invalid size (unsorted)"). The GDAL cases run in a subprocess each, so that
such an abort fails one test rather than the run.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator

import pytest

from cloudio._gdal.consumer import GdalCalls, GdalConsumer
from cloudio._gdal.gates import gates
from cloudio._gdal.targets import Target, target
from cloudio._journal import Change
from cloudio._paths import parse_gcs

HERE = os.path.dirname(__file__)
_seq: Iterator[int] = itertools.count(1)


def _run(code: str, bucket: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh Python process pointed at the test emulator (an abort of GDAL stays there)."""
    env = {**os.environ, "TEST_BUCKET": bucket,
           "PYTHONPATH": HERE + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                          timeout=120)


OPEN_OVERWRITE_READ = """
import os, numpy as np, cloudio
from google.auth.credentials import AnonymousCredentials
from google.cloud import storage
from rasters import tif

bucket = os.environ["TEST_BUCKET"]
endpoint = "http://" + os.environ["STORAGE_EMULATOR_HOST"].split("://")[-1]
client = storage.Client(project="other", credentials=AnonymousCredentials(),
                        client_options={{"api_endpoint": endpoint}})
blob = client.bucket(bucket.removeprefix("gs://")).blob("d/a.tif")
url = bucket + "/d/a.tif"
blob.upload_from_string(tif(1))
with cloudio.open(url) as ds:                  # the dataset knows the first version's layout
    blob.upload_from_string(tif(2, block=32))  # another writer replaces it (another block size)
    {announce}
    try:
        a = ds.read(1)
        print("READ", sorted(set(np.unique(a).tolist())), flush=True)
    except cloudio.StaleDatasetError:
        print("STALE", flush=True)
    except Exception as e:
        print("ERROR", type(e).__name__, e, flush=True)
"""


@pytest.mark.parametrize("announce", [
    "cloudio.invalidate(url)",  # the public way to say "someone else wrote here" (a prefix change of the object)
    'cloudio.invalidate(bucket + "/d/")',  # ... or of a prefix holding it
    # the same record as relayed from another process of a Dask cluster
    'from cloudio._journal import journal; journal().record(bucket + "/d/", "invalidate", prefix=True)',
])
def test_invalidate_with_a_dataset_open_neither_crashes_nor_tears(gcs_bucket: str, announce: str) -> None:
    """An overwrite announced as a prefix change is handled like a journaled overwrite: no abort, no torn read."""
    r = _run(OPEN_OVERWRITE_READ.format(announce=announce), gcs_bucket)
    assert r.returncode == 0, f"the reader process died (rc {r.returncode}): {r.stderr[-400:]}"
    assert "STALE" in r.stdout or "READ [2]" in r.stdout, r.stdout


def test_invalidate_control_object_level_record_is_handled(gcs_bucket: str) -> None:
    """The same scenario with the object-level record the strong level makes: a clean StaleDatasetError."""
    announce = 'from cloudio._journal import journal; journal().record(url, "invalidate")'
    r = _run(OPEN_OVERWRITE_READ.format(announce=announce), gcs_bucket)
    assert r.returncode == 0, r.stderr[-400:]
    assert "STALE" in r.stdout, r.stdout


# -- the consumer's side, against a fake of its GDAL calls (no emulator, no GDAL I/O) ------------------------


class _Dataset:
    """Stands for a rasterio dataset: weakly referenced, open until ``closed``."""

    closed = False


def _t(key: str) -> Target:
    return target(parse_gcs(f"gs://prefix-unit/{key}"))


def _prefix_change(url: str) -> Change:
    return Change(next(_seq), url, "invalidate", prefix=True)


def test_a_prefix_change_moves_the_epoch_of_each_object_below_with_a_dataset_open() -> None:
    """Odd while GDAL's cache is cleared, even and changed after: _io then never reads through the old handle."""
    during: list[tuple[str, int]] = []
    gdal = GdalConsumer(GdalCalls(
        clear=lambda vsi: during.append((vsi, gdal.epoch(_t("d/a.tif")))),
        set_path_option=lambda prefix, key, value: None, clear_path_options=lambda prefix: None,
        listdir=lambda vsi: [],
    ))
    a, beside, closed = _Dataset(), _Dataset(), _Dataset()
    gdal.opened_dataset(_t("d/a.tif"), a, 0)
    gdal.opened_dataset(_t("d2/a.tif"), beside, 0)  # the clear's string prefix reaches it; it is not below d/
    gdal.opened_dataset(_t("d/c.tif"), closed, 0)
    closed.closed = True
    gdal.on_change(_prefix_change("gs://prefix-unit/d/"))
    assert during == [("/vsigs/prefix-unit/d", 1)]  # one clear, the epoch odd meanwhile
    assert gdal.epoch(_t("d/a.tif")) == 2
    assert gdal.epoch(_t("d2/a.tif")) == 0
    assert gdal.epoch(_t("d/c.tif")) == 0  # no dataset open: nothing to move
    gdal.on_change(_prefix_change("gs://prefix-unit/d/a.tif"))  # cloudio.invalidate(url) of the object itself
    assert gdal.epoch(_t("d/a.tif")) == 4


def test_a_prefix_change_waits_for_gdal_io_in_flight_on_an_object_below() -> None:
    """The object's gate is taken, as for a write of it: a read in flight finishes before the clear."""
    events: list[str] = []
    gdal = GdalConsumer(GdalCalls(
        clear=lambda vsi: events.append("clear"),
        set_path_option=lambda prefix, key, value: None, clear_path_options=lambda prefix: None,
        listdir=lambda vsi: [],
    ))
    ds = _Dataset()
    gdal.opened_dataset(_t("e/a.tif"), ds, 0)
    vsi = _t("e/a.tif").vsi
    entered, leave = threading.Event(), threading.Event()

    def read() -> None:
        gates.enter(vsi)
        entered.set()
        leave.wait(5)
        events.append("read done")
        gates.exit(vsi)

    reader = threading.Thread(target=read)
    reader.start()
    entered.wait(5)
    change = threading.Thread(target=gdal.on_change, args=(_prefix_change("gs://prefix-unit/e/"),))
    change.start()
    change.join(0.3)
    assert events == []  # the change waits for the read
    leave.set()
    change.join(5)
    reader.join(5)
    assert events == ["read done", "clear"]
