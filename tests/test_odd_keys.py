"""Object keys that are unusual but legal on GCS, across cloudio's faces (each test found by a review).

Every test here failed before its fix (the first nine from a review of keys, the last four from a
review of that fix). Each one puts
objects on the real emulator (``put`` writes as "another writer") and checks
what a face of cloudio returns, lists, keeps or deletes. Where cloudio may
legitimately refuse a key, an :class:`~cloudio.errors.InvalidURLError` that
names the URL and changes nothing on the server is accepted as well.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import zarr
from affine import Affine
from rasters import put, tif

import cloudio
from cloudio.errors import CloudioError, InvalidURLError

_PAM = b'<PAMDataset><Metadata><MDI key="owner">sibling</MDI></Metadata></PAMDataset>'
_TFW = b"1\n0\n0\n-1\n0\n0\n"


def _names(emu, bucket: str) -> list[str]:
    return sorted(b.name for b in emu.client.list_blobs(bucket[len("gs://"):]))


def _bytes(emu, bucket: str, key: str) -> bytes:
    return emu.client.bucket(bucket[len("gs://"):]).blob(key).download_as_bytes()


def _write(url: str, value: int) -> None:
    with cloudio.open(url, "w", driver="GTiff", width=4, height=4, count=1, dtype="uint8") as ds:
        ds.write(np.full((1, 4, 4), value, "uint8"))


# -- fsspec: glob characters in a literal key --------------------------------------------------


def test_fs_rm_of_a_key_with_brackets_deletes_that_key_not_its_glob_match(gcs_emulator, gcs_bucket):
    """``fs.rm("gs://b/g/a[1].tif")`` deletes ``g/a1.tif`` and keeps ``g/a[1].tif``.

    fsspec's ``_expand_path`` (reached from ``rm``, ``cat``, ``copy``, ``get``...) reads any path with
    ``*``, ``?`` or ``[`` as a glob, and the tracked filesystem (cloudio/_fsspec/filesystem.py,
    ``_JournalingGCSMixin``) passes the user's literal key straight into it: ``[1]`` matches ``1``,
    so another object is deleted and the named one is left. cloudio's contract is one URL, one
    object (keys literal on every face, or refused with InvalidURLError).
    """
    put(gcs_emulator, f"{gcs_bucket}/g/a1.tif", tif(1, 4))
    put(gcs_emulator, f"{gcs_bucket}/g/a[1].tif", tif(2, 4))
    fs = cloudio.filesystem("gs://")
    try:
        fs.rm(f"{gcs_bucket}/g/a[1].tif")
    except InvalidURLError as e:
        assert "a[1].tif" in str(e)
        assert _names(gcs_emulator, gcs_bucket) == ["g/a1.tif", "g/a[1].tif"]
        return
    assert _names(gcs_emulator, gcs_bucket) == ["g/a1.tif"], "rm deleted another object than the one it named"


def test_fs_cat_of_a_key_with_brackets_reads_that_object(gcs_emulator, gcs_bucket):
    """``fs.cat("gs://b/g/a[1].tif")`` returns ``{".../g/a1.tif": <a1's bytes>}``, not the object named.

    Same root cause as the ``rm`` test: ``cat`` expands the path as a glob (fsspec ``_expand_path``),
    finds ``g/a1.tif`` and, the match differing from the path, returns a dict of another object's
    bytes. The object ``g/a[1].tif`` is never read.
    """
    put(gcs_emulator, f"{gcs_bucket}/g/a1.tif", tif(1, 4))
    literal = tif(2, 4)
    put(gcs_emulator, f"{gcs_bucket}/g/a[1].tif", literal)
    try:
        got = cloudio.filesystem("gs://").cat(f"{gcs_bucket}/g/a[1].tif")
    except InvalidURLError as e:
        assert "a[1].tif" in str(e)
        return
    assert got == literal, f"cat read {type(got).__name__} {list(got) if isinstance(got, dict) else ''}"


@pytest.mark.parametrize(("root", "sibling"), [("z/a[1]", "z/a1"), ("z/a*", "z/ab")])
def test_zarr_store_overwrite_at_a_root_with_glob_characters_keeps_the_sibling_store(
        gcs_emulator, gcs_bucket, root, sibling):
    """Overwriting an array in ``cloudio.zarr_store("gs://b/z/a[1]")`` destroys the array at ``z/a1``.

    ``JournaledStore.delete_dir`` / ``clear`` (cloudio/_zarr/store.py:461-474) hand over to zarr's
    ``FsspecStore``, which deletes with ``fs._rm(path, recursive=True)`` on the tracked gcsfs: the
    literal store path ``b/z/a[1]/zarr.json`` is globbed and matches ``b/z/a1/zarr.json`` (``*``
    matches ``ab``). A neighbour's metadata is deleted; the neighbour then cannot be loaded.
    """
    cloudio.save_array(np.arange(4, dtype="u1"), f"{gcs_bucket}/{sibling}")
    url = f"{gcs_bucket}/{root}"
    try:
        zarr.create_array(cloudio.zarr_store(url), shape=(4,), dtype="u1")[:] = 1
        zarr.create_array(cloudio.zarr_store(url), shape=(4,), dtype="u1", overwrite=True)[:] = 2
    except InvalidURLError as e:
        assert root in str(e)
    assert [n for n in _names(gcs_emulator, gcs_bucket) if n.startswith(sibling + "/")] == [
        f"{sibling}/c/0", f"{sibling}/zarr.json"]
    assert list(cloudio.load_array(f"{gcs_bucket}/{sibling}")[:]) == [0, 1, 2, 3]


# -- an object and a folder of the same name ---------------------------------------------------


def test_fs_open_reads_an_object_that_shares_its_name_with_a_folder(gcs_emulator, gcs_bucket):
    """After ``fs.ls`` of the parent, ``fs.open("gs://b/m/d").read()`` returns b"" for the object ``m/d``.

    With both ``m/d`` (an object) and ``m/d/x.tif`` on the server, gcsfs's listing holds a
    pseudo-directory *and* a file named ``b/m/d``, directory first; gcsfs's ``_info`` answers from
    the cached listing with the first one (size 0, type directory), and a file opened on it reads
    nothing. The tracked filesystem (cloudio/_fsspec/filesystem.py, ``_JournalingGCSMixin``) keeps
    gcsfs's ``_info``, so an object cloudio just wrote reads as empty through the fsspec face.
    """
    url = f"{gcs_bucket}/m/d"
    _write(url, 7)
    fs = cloudio.filesystem("gs://")
    fs.pipe(f"{gcs_bucket}/m/d/x.tif", tif(1, 4))
    fs.ls(f"{gcs_bucket}/m")
    with fs.open(url, "rb") as f:
        got = f.read()
    assert got == _bytes(gcs_emulator, gcs_bucket, "m/d"), f"read {len(got)} bytes of the object m/d"


# -- a key with a trailing '/' (read literally by every face, see tests/test_keys.py) -----------


def test_r_plus_of_a_trailing_slash_key_updates_that_object(gcs_emulator, gcs_bucket):
    """``cloudio.open("gs://b/x/t.tif/", "r+")`` raises IntegrityError ("downloaded bytes never matched").

    ``open("r", ...)`` reads the key ``x/t.tif/`` literally, but the update's download
    (cloudio/_gcs/transfer.py:598-600) goes through ``GCSPath.fs_path``, which strips the trailing
    '/' (cloudio/_paths.py:69): it downloads the *other* object ``x/t.tif`` and compares it with the
    metadata of ``x/t.tif/``. The user is told the data was corrupted on the way; nothing was.
    """
    put(gcs_emulator, f"{gcs_bucket}/x/t.tif", tif(1, 4))
    put(gcs_emulator, f"{gcs_bucket}/x/t.tif/", tif(2, 4))
    url = f"{gcs_bucket}/x/t.tif/"
    try:
        with cloudio.open(url, "r+") as ds:
            assert ds.read(1)[0, 0] == 2
            ds.write(np.full((1, 4, 4), 9, "uint8"))
    except InvalidURLError as e:
        assert "x/t.tif/" in str(e)
        return
    with cloudio.open(url) as ds:
        assert ds.read(1)[0, 0] == 9
    with cloudio.open(f"{gcs_bucket}/x/t.tif") as ds:
        assert ds.read(1)[0, 0] == 1


def test_a_write_to_a_trailing_slash_key_keeps_the_sidecars_of_the_object_without_it(gcs_emulator, gcs_bucket):
    """Writing ``gs://b/y/t.tif/`` deletes ``y/t.tif.aux.xml`` and ``y/t.tfw``, sidecars of ``y/t.tif``.

    After the upload, ``_drop_old_sidecars`` (cloudio/_gdal/write.py:235-256) looks for the old
    version's sidecars by ``path.name`` and ``path.parent``, which strip the trailing '/'
    (cloudio/_paths.py:72-79): the name is ``t.tif`` in ``y/``, so the sidecars of the *other* object
    ``y/t.tif`` are taken for this one's and deleted. (Sidecars GDAL writes for ``y/t.tif/`` are
    uploaded next to ``y/t.tif`` the same way, line 193-194.)
    """
    put(gcs_emulator, f"{gcs_bucket}/y/t.tif", tif(1, 4))
    put(gcs_emulator, f"{gcs_bucket}/y/t.tif.aux.xml", _PAM)
    put(gcs_emulator, f"{gcs_bucket}/y/t.tfw", _TFW)
    try:
        _write(f"{gcs_bucket}/y/t.tif/", 3)
    except InvalidURLError as e:
        assert "y/t.tif/" in str(e)
    kept = _names(gcs_emulator, gcs_bucket)
    assert {"y/t.tif", "y/t.tif.aux.xml", "y/t.tfw"} <= set(kept), f"left on the server: {kept}"


# -- a neighbour's name cloudio refuses for itself ---------------------------------------------


def test_a_sibling_with_a_tab_in_its_name_does_not_fail_a_write(gcs_emulator, gcs_bucket):
    """``cloudio.open("gs://b/d/a.tif", "w")`` raises InvalidURLError about ``d/a\\tnote``, after uploading.

    GCS allows a tab in a key (only CR and LF are forbidden); cloudio refuses such keys for itself,
    which is fine. But ``_drop_old_sidecars`` (cloudio/_gdal/write.py:256) builds
    ``path.parent.child(n)`` (which runs ``check_key``) for *every* name in the folder starting with
    the stem, before filtering the sidecars, so an unrelated neighbour makes a successful write
    raise, naming another object, and leaves the old version's real sidecars in place.
    """
    put(gcs_emulator, f"{gcs_bucket}/d/a\tnote", b"a note of someone else's")
    url = f"{gcs_bucket}/d/a.tif"
    _write(url, 4)
    with cloudio.open(url) as ds:
        assert ds.read(1)[0, 0] == 4


# -- very long keys ----------------------------------------------------------------------------


def test_a_1024_byte_key_whose_sidecar_cannot_exist_fails_cleanly_and_keeps_the_old_object(gcs_emulator,
                                                                                        gcs_bucket):
    """A PNG with a CRS written to a 1024-byte key deletes the object that was there and raises a
    confusing InvalidURLError ("the key is 1032 bytes long").

    GDAL writes ``<name>.aux.xml`` next to the PNG. ``_upload_all`` (cloudio/_gdal/write.py:188-200)
    uploads the object first, then builds the sidecar's key with ``path.parent.child(remote)``, which
    refuses a key over 1024 bytes; the except clause undoes the upload (deleting the object, whose old
    version is gone with it) and, formatting its UploadError, calls ``path.parent.child(remote)`` again,
    so the InvalidURLError escapes from the handler, about a key the user never wrote, with no next
    step. The sidecar's key could be checked before anything is uploaded.
    """
    key = "l/" + "a" * (1024 - len("l/") - len(".png")) + ".png"
    assert len(key.encode()) == 1024
    url = f"{gcs_bucket}/{key}"
    put(gcs_emulator, url, b"the old version")
    with pytest.raises(CloudioError) as e:
        with cloudio.open(url, "w", driver="PNG", width=4, height=4, count=1, dtype="uint8", crs="EPSG:32631",
                          transform=Affine(10, 0, 500000, 0, -10, 4000000)) as ds:
            ds.write(np.full((1, 4, 4), 3, "uint8"))
    assert "sidecar" in str(e.value), str(e.value)[-300:]
    assert _names(gcs_emulator, gcs_bucket) == [key], "the object that was there is gone"
    assert _bytes(gcs_emulator, gcs_bucket, key) == b"the old version"


def test_fs_copy_of_a_bracket_key_to_a_new_name_writes_that_name(gcs_emulator, gcs_bucket):
    """``fs.copy("d/a[1].tif", "e/x.tif")`` must write ``e/x.tif``, as for a key without brackets.

    ``_expand_path`` now takes the stored key literally, but fsspec's ``_copy`` still decides from
    ``has_magic(path1)`` that the source was a glob with one match, treats the destination as a
    folder and writes ``e/x.tif/a[1].tif``.
    """
    put(gcs_emulator, f"{gcs_bucket}/d/a[1].tif", b"literal")
    fs = cloudio.filesystem("gs://")
    fs.copy(f"{gcs_bucket}/d/a[1].tif", f"{gcs_bucket}/e/x.tif")
    assert _names(gcs_emulator, gcs_bucket) == ["d/a[1].tif", "e/x.tif"]
    assert _bytes(gcs_emulator, gcs_bucket, "e/x.tif") == b"literal"



def test_fs_get_of_a_bracket_key_to_a_local_file_writes_that_file(gcs_emulator, gcs_bucket, tmp_path):
    """``fs.get("d/a[1].tif", "/tmp/.../out.tif")`` must write the file ``out.tif``.

    Same root cause as the copy: fsspec's ``_get`` makes ``out.tif`` a folder holding ``a[1].tif``.
    """
    put(gcs_emulator, f"{gcs_bucket}/d/a[1].tif", b"literal")
    fs = cloudio.filesystem("gs://")
    out = tmp_path / "out.tif"
    fs.get(f"{gcs_bucket}/d/a[1].tif", str(out))
    assert out.is_file(), sorted(os.listdir(tmp_path)) + (sorted(os.listdir(out)) if out.is_dir() else [])
    assert out.read_bytes() == b"literal"



def test_fs_mv_of_a_bracket_key_to_a_new_name_renames_it(gcs_emulator, gcs_bucket):
    """``fs.mv("d/a[1].tif", "d/b.tif")`` must leave exactly ``d/b.tif`` (fsspec's mv is copy then rm)."""
    put(gcs_emulator, f"{gcs_bucket}/d/a[1].tif", b"literal")
    fs = cloudio.filesystem("gs://")
    fs.mv(f"{gcs_bucket}/d/a[1].tif", f"{gcs_bucket}/d/b.tif")
    assert _names(gcs_emulator, gcs_bucket) == ["d/b.tif"]



def test_fs_open_reads_an_object_named_like_a_folder_after_listing_that_folder(gcs_emulator, gcs_bucket):
    """With ``m/d`` (an object) and ``m/d/x.tif`` stored, ``fs.ls("m/d")`` then ``fs.open("m/d").read()``
    must return the object's bytes.

    The new ``_info`` looks for the object only in the *parent's* cached listing; gcsfs answers
    "directory" from the cached listing of ``m/d`` itself before any request, so the object reads as
    empty (half of the fix for objects named like folders).
    """
    put(gcs_emulator, f"{gcs_bucket}/m/d", b"the object d")
    put(gcs_emulator, f"{gcs_bucket}/m/d/x.tif", b"child")
    fs = cloudio.filesystem("gs://")
    assert fs.ls(f"{gcs_bucket}/m/d") == [f"{gcs_bucket[5:]}/m/d/x.tif"]
    with fs.open(f"{gcs_bucket}/m/d", "rb") as f:
        got = f.read()
    assert got == b"the object d", f"read {got!r}"
