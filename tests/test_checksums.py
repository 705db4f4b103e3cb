"""cloudio's CRC32C (``cloudio._gcs.checksums``, the ``crc32c`` package) against google-crc32c's, on every kind
of buffer cloudio sums: what GCS reports for an object must match what cloudio computes of its bytes."""

from __future__ import annotations

import base64
from pathlib import Path

import google_crc32c
import numpy as np
import pytest

from cloudio._gcs import checksums

DATA = np.random.default_rng(7).integers(0, 256, 3 * 2**20 + 5, dtype=np.uint8).tobytes()


def _gcs(data: bytes) -> str:
    return base64.b64encode(google_crc32c.value(data).to_bytes(4, "big")).decode()


@pytest.mark.parametrize("kind", ["bytes", "bytearray", "memoryview", "uint8", "float32", "slice"])
def test_every_buffer_kind_sums_as_google_crc32c_does(kind: str) -> None:
    data = DATA[: len(DATA) - len(DATA) % 4]
    given = {
        "bytes": data,
        "bytearray": bytearray(data),
        "memoryview": memoryview(data),
        "uint8": np.frombuffer(data, dtype=np.uint8),
        "float32": np.frombuffer(data, dtype=np.float32),
        "slice": memoryview(DATA)[: len(data)],
    }[kind]
    assert checksums.of(given) == _gcs(data)


def test_a_sum_continued_piece_by_piece_is_the_sum_of_the_whole() -> None:
    running = checksums.Running()
    crc = 0
    for start in range(0, len(DATA), 1_000_003):
        running.update(memoryview(DATA)[start:start + 1_000_003])
        crc = checksums.value(DATA[start:start + 1_000_003], crc)
    assert running.text() == checksums.text(crc) == _gcs(DATA)
    assert checksums.of(b"") == _gcs(b"") == "AAAAAA=="


def test_a_local_file_sums_as_its_bytes(tmp_path: Path) -> None:
    local = tmp_path / "f.bin"
    local.write_bytes(DATA * 2)  # past one block of the file read
    assert checksums.of_file(local) == _gcs(DATA * 2)


def test_the_header_names_the_crc32c_of_the_bytes_received() -> None:
    assert checksums.of_header({"X-Goog-Hash": "crc32c=n03x6A==,md5=Ojk9c3dhfxgoKVVHYwFbHQ=="}) == "n03x6A=="
    assert checksums.of_header({"X-Goog-Hash": "md5=Ojk9c3dhfxgoKVVHYwFbHQ=="}) is None
    # the hash of a gzip-stored object is of the stored bytes, not of the ones that arrive
    assert checksums.of_header({"X-Goog-Hash": "crc32c=n03x6A==", "X-Goog-Stored-Content-Encoding": "gzip"}) is None
