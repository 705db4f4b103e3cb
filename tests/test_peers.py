"""cloudio, tensorstore and plain zarr read each other's Zarr v3 stores bit-exactly (issue 15).

Three layouts, small versions of the ones ``benchmarks/bench_peers.py``
measures: sharded and uncompressed, sharded zstd with many small chunks per
shard, and unsharded small chunks (with partial edge chunks). Every writer's
store is read by every reader, including zarr on obstore's ``ObjectStore``
(reads only: obstore uploads through GCS's XML API, which the emulator does
not implement), and the writers store the same objects.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr
from zarr.storage import FsspecStore, ObjectStore

import cloudio
from cloudio._gcs.client import gcs_filesystem
from cloudio._paths import parse_gcs
from cloudio.emulator import Emulator

ts = pytest.importorskip("tensorstore", reason="tensorstore is not installed (the `test` extra has it)")
obstore_store = pytest.importorskip("obstore.store", reason="obstore is not installed (the `test` extra has it)")

LAYOUTS: dict[str, dict[str, Any]] = {
    "sharded-raw": {"shape": (256, 256), "chunks": (32, 32), "shards": (64, 64), "compressors": None},
    "sharded-zstd-small-chunks": {"shape": (256, 256), "chunks": (16, 16), "shards": (128, 128),
                                  "compressors": zarr.codecs.ZstdCodec(level=0)},
    "unsharded-small-chunks": {"shape": (190, 210), "chunks": (20, 20), "shards": None, "compressors": None},
    # shards of a MiB: cloudio reads them in threads, streamed from the socket (cut at both edges, or not)
    "sharded-raw-large": {"shape": (1000, 1300), "chunks": (128, 128), "shards": (512, 512), "compressors": None},
    "sharded-raw-large-whole": {"shape": (1024, 1024), "chunks": (128, 128), "shards": (512, 512),
                                "compressors": None},
}


def _data(layout: str) -> np.ndarray:
    """float32 noise, quantized where compressed so zstd has runs to find."""
    x = np.random.default_rng(15).standard_normal(LAYOUTS[layout]["shape"], dtype="f4")
    return np.round(x * 8) / 8 if LAYOUTS[layout]["compressors"] is not None else x


@pytest.fixture
def peers_env(gcs_emulator: Emulator, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Any:
    """Point tensorstore and obstore at the emulator, the way docs of both describe for testing."""
    monkeypatch.setenv("TENSORSTORE_GCS_HTTP_URL", gcs_emulator.url)
    monkeypatch.setenv("GOOGLE_AUTH_TOKEN_FOR_TESTING", "emulator")
    sa = tmp_path / "sa.json"
    sa.write_text(json.dumps({"gcs_base_url": gcs_emulator.url, "disable_oauth": True,
                              "client_email": "", "private_key": "", "private_key_id": ""}))
    return sa


def _metadata(layout: str, dtype: np.dtype) -> dict[str, Any]:
    """The zarr.json zarr writes for ``layout``: tensorstore gets exactly that."""
    kw = LAYOUTS[layout]
    z = zarr.create_array(zarr.storage.MemoryStore(), shape=kw["shape"], dtype=dtype, chunks=kw["chunks"],
                          shards=kw["shards"], compressors=kw["compressors"])
    return {k: v for k, v in z.metadata.to_dict().items() if v is not None}


def _kvstore(url: str) -> dict[str, Any]:
    p = parse_gcs(url)
    return {"driver": "gcs", "bucket": p.bucket, "path": p.key + "/"}


def write_cloudio(url: str, layout: str, data: np.ndarray) -> None:
    kw = LAYOUTS[layout]
    cloudio.save_array(data, url, chunks=kw["chunks"], shards=kw["shards"], compressors=kw["compressors"])


def write_tensorstore(url: str, layout: str, data: np.ndarray) -> None:
    t = ts.open({"driver": "zarr3", "kvstore": _kvstore(url), "metadata": _metadata(layout, data.dtype)},
                create=True, delete_existing=True).result()
    t.write(data).result()


def write_zarr(url: str, layout: str, data: np.ndarray) -> None:
    kw = LAYOUTS[layout]
    store = FsspecStore(gcs_filesystem(asynchronous=True), path=url.removeprefix("gs://"))
    z = zarr.create_array(store, shape=data.shape, dtype=data.dtype, chunks=kw["chunks"], shards=kw["shards"],
                          compressors=kw["compressors"])
    z[...] = data


def read_cloudio(url: str, sa: Path) -> np.ndarray:
    return cloudio.load_array(url)


def read_tensorstore(url: str, sa: Path) -> np.ndarray:
    return ts.open({"driver": "zarr3", "kvstore": _kvstore(url)}, open=True).result().read().result()


def read_zarr(url: str, sa: Path) -> np.ndarray:
    store = FsspecStore(gcs_filesystem(asynchronous=True), path=url.removeprefix("gs://"), read_only=True)
    return zarr.open_array(store, mode="r")[...]


def read_zarr_obstore(url: str, sa: Path) -> np.ndarray:
    p = parse_gcs(url)
    gcs = obstore_store.GCSStore(p.bucket, service_account_path=str(sa), client_options={"allow_http": True})
    return zarr.open_array(ObjectStore(gcs, read_only=True), path=p.key, mode="r")[...]


WRITERS: dict[str, Callable[[str, str, np.ndarray], None]] = {
    "cloudio": write_cloudio, "tensorstore": write_tensorstore, "zarr": write_zarr}
READERS: dict[str, Callable[[str, Path], np.ndarray]] = {
    "cloudio": read_cloudio, "tensorstore": read_tensorstore, "zarr": read_zarr, "zarr_obstore": read_zarr_obstore}


def _objects(emu: Emulator, url: str) -> dict[str, bytes]:
    """Every chunk or shard object under ``url`` (not zarr.json, whose JSON formatting differs), by key."""
    p = parse_gcs(url)
    return {b.name.removeprefix(p.key + "/"): b.download_as_bytes()
            for b in emu.client.list_blobs(p.bucket, prefix=p.key + "/") if not b.name.endswith("zarr.json")}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("writer", list(WRITERS))
def test_every_reader_reads_every_writers_store_bit_exactly(
    gcs_emulator: Emulator, gcs_bucket: str, peers_env: Path, writer: str, layout: str
) -> None:
    data = _data(layout)
    url = f"{gcs_bucket}/{writer}-{layout}.zarr"
    WRITERS[writer](url, layout, data)
    for reader, read in READERS.items():
        back = np.asarray(read(url, peers_env))
        assert back.dtype == data.dtype and back.shape == data.shape, (writer, reader)
        assert back.tobytes() == data.tobytes(), f"{reader} read of {writer}'s {layout} store differs"


def test_tensorstores_c_order_shards_read_in_one_get_each(gcs_emulator: Emulator, gcs_bucket: str,
                                                          peers_env: Path) -> None:
    """cloudio guesses zarr's chunk order while a shard streams in; tensorstore's C-order chunks are
    moved where their index says, without asking for the shard again."""
    layout = "sharded-raw-large-whole"
    data = _data(layout)
    url = f"{gcs_bucket}/ts-order.zarr"
    write_tensorstore(url, layout, data)
    p = parse_gcs(url)
    raw = gcs_emulator.client.bucket(p.bucket).blob(f"{p.key}/c/0/0").download_as_bytes()
    offsets = np.frombuffer(raw[-(16 * 16 + 4):-4], dtype="<u8").reshape(4, 4, 2)[..., 0]
    assert offsets[0, 1] < offsets[1, 0]  # C order, not Morton's: the guess is wrong, the chunks must move
    n0 = len(gcs_emulator.requests())
    back = read_cloudio(url, peers_env)
    shard_gets = [r for r in gcs_emulator.requests()[n0:] if r.method == "GET" and "%2Fc%2F" in r.path]
    assert len(shard_gets) == 4
    assert back.tobytes() == data.tobytes()


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_writers_store_the_same_objects(gcs_emulator: Emulator, gcs_bucket: str, peers_env: Path, layout: str) -> None:
    """Same keys and sizes from every writer; where nothing is compressed, cloudio's bytes are zarr's.

    tensorstore places a shard's chunks in another order (C order, where
    zarr and cloudio take Morton order; the index says where), and zstd
    builds may differ, so only sizes are compared there.
    """
    data = _data(layout)
    stored = {}
    for writer, write in WRITERS.items():
        url = f"{gcs_bucket}/same-{writer}.zarr"
        write(url, layout, data)
        stored[writer] = _objects(gcs_emulator, url)
    keys = {w: sorted(o) for w, o in stored.items()}
    assert keys["cloudio"] == keys["tensorstore"] == keys["zarr"], keys
    assert len(keys["cloudio"]) > 1
    if LAYOUTS[layout]["compressors"] is None:
        assert stored["cloudio"] == stored["zarr"]
        sizes = {w: {k: len(v) for k, v in o.items()} for w, o in stored.items()}
        assert sizes["cloudio"] == sizes["tensorstore"]
