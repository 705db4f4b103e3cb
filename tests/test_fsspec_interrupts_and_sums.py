"""The fsspec face, from a review: a put through gcsfs's own upload is summed as gcsfs reads the local file."""

from __future__ import annotations

import pytest

import cloudio
from cloudio._gcs import checksums


@pytest.mark.parametrize("size", [1000, 5 * 2**20 + 1000], ids=["one-request", "resumable"])
def test_a_put_of_a_file_changed_before_gcsfs_reads_it_stores_what_was_read(
        gcs_emulator, b, tmp_path, monkeypatch, journal_records, size):
    """``metadata=`` goes through gcsfs's own upload, which opens the local file itself. A file another process
    appends to just before gcsfs reads it (and after) is uploaded as gcsfs read it: that is what the server's
    CRC32C is compared with, and what is journaled. It was compared with a sum of the file made before, so the
    put raised IntegrityError about corruption on the way and deleted the object it had just stored."""
    import gcsfs.core

    local = tmp_path / "grows.bin"
    first = bytes(range(256)) * (size // 256) + b"a" * (size % 256)
    local.write_bytes(first)
    read = gcsfs.core.GCSFileSystem._put_file

    async def appended_first(self, lpath, *args, **kwargs):
        with open(lpath, "ab") as f:  # another process appends to it
            f.write(b"appended")
        out = await read(self, lpath, *args, **kwargs)
        with open(lpath, "ab") as f:  # and goes on appending once gcsfs has read it
            f.write(b"later")
        return out

    monkeypatch.setattr(gcsfs.core.GCSFileSystem, "_put_file", appended_first)
    fs = cloudio.filesystem(f"gs://{b}")
    fs.put(str(local), f"{b}/grows.bin", metadata={"who": "me"})

    blob = gcs_emulator.client.bucket(b).get_blob("grows.bin")
    assert blob is not None
    assert blob.download_as_bytes() == first + b"appended"
    assert blob.metadata == {"who": "me"}
    assert blob.crc32c == checksums.of(first + b"appended")
    mine = [(c.kind, c.size, c.generation) for c in journal_records if c.url == f"gs://{b}/grows.bin"]
    assert mine == [("write", size + 8, blob.generation)]

