"""One journal key per object, whatever the spelling; clear errors for what is not a GCS URL."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cloudio._paths import (
    BUCKET_RULE,
    GCSPath,
    check_bucket,
    is_gcs,
    normalize,
    parse_gcs,
)
from cloudio.errors import CloudioError, InvalidURLError


@pytest.mark.parametrize(
    "url",
    [
        "gs://bkt/d/a.tif",
        "gcs://bkt/d/a.tif",
        "/vsigs/bkt/d/a.tif",
        "/vsigs_streaming/bkt/d/a.tif",
        "https://storage.googleapis.com/bkt/d/a.tif",
        "https://storage.cloud.google.com/bkt/d/a.tif",
        "https://storage.googleapis.com/download/storage/v1/b/bkt/o/d%2Fa.tif?alt=media",
        "https://storage.googleapis.com/storage/v1/b/bkt/o/d%2Fa.tif",
        "https://storage.googleapis.com/download/storage/v1/b/bkt/o/d%2Fa.tif?alt=media#frag",
    ],
)
def test_every_spelling_is_one_key(url):
    assert normalize(url) == "gs://bkt/d/a.tif"
    p = parse_gcs(url)
    assert p == GCSPath("bkt", "d/a.tif")
    assert (p.url, p.vsi, p.fs_path) == ("gs://bkt/d/a.tif", "/vsigs/bkt/d/a.tif", "bkt/d/a.tif")
    assert is_gcs(url)


def test_the_emulators_own_urls_are_gcs_only_while_it_is_in_force(monkeypatch):
    url = "http://127.0.0.1:4443/bkt/d/a.tif"
    monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)
    assert not is_gcs(url)
    with pytest.raises(InvalidURLError, match="http"):
        normalize(url)
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", "http://127.0.0.1:4443")
    assert normalize(url) == "gs://bkt/d/a.tif"
    assert normalize("http://127.0.0.1:4443/download/storage/v1/b/bkt/o/d%2Fa.tif?alt=media") == "gs://bkt/d/a.tif"
    assert not is_gcs("http://127.0.0.1:9999/bkt/d/a.tif")  # another server is not GCS


def test_https_keys_are_unquoted_but_gs_keys_are_literal():
    assert normalize("https://storage.googleapis.com/bkt/a%20b.tif") == "gs://bkt/a b.tif"
    assert normalize("gs://bkt/a%20b.tif") == "gs://bkt/a%20b.tif"  # '%' is a legal key character


def test_prefixes_keep_their_trailing_slash_and_buckets_have_an_empty_key():
    assert normalize("gs://bkt/d/") == "gs://bkt/d/"
    assert normalize("/vsigs/bkt") == normalize("gs://bkt/") == "gs://bkt/"
    p = parse_gcs("gs://bkt/d/sub/")
    assert (p.key, p.name, p.parent, p.fs_path) == ("d/sub/", "sub", GCSPath("bkt", "d/"), "bkt/d/sub")
    assert parse_gcs("gs://bkt/a.tif").parent == GCSPath("bkt", "")
    assert parse_gcs("gs://bkt").fs_path == "bkt"


def test_is_under_matches_whole_segments():
    d = parse_gcs("gs://bkt/d/")
    assert parse_gcs("gs://bkt/d/a.tif").is_under(d)
    assert parse_gcs("gs://bkt/d").is_under(d)
    assert not parse_gcs("gs://bkt/dd/a.tif").is_under(d)
    assert not parse_gcs("gs://other/d/a.tif").is_under(d)
    assert parse_gcs("gs://bkt/x").is_under(parse_gcs("gs://bkt/"))
    assert parse_gcs("gs://bkt/d/").child("e/f.tif") == GCSPath("bkt", "d/e/f.tif")


@pytest.mark.parametrize(
    "url",
    ["gs://bkt/..", "gs://bkt/../other/k", "gs://bkt/a/../../k", "gs://bkt/d/x/../a.tif", "/vsigs/bkt/../k",
     "/vsigs/bkt/e/../d/a.tif", "https://storage.googleapis.com/bkt/a/../../k",
     "https://storage.googleapis.com/bkt/%2E%2E/k"],
)
def test_dotdot_segments_are_refused_not_resolved(url):
    """GCS keeps 'a/../k' literally while GDAL resolves it: two objects for one URL, so refused."""
    with pytest.raises(InvalidURLError) as e:
        normalize(url)
    assert url in str(e.value) and "'..'" in str(e.value)


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("gs://bkt/d//a.tif", "empty segment"),
        ("gs://bkt//a.tif", "empty segment"),
        ("gs://bkt//", "empty segment"),
        ("/vsigs/bkt/d//", "empty segment"),
        ("https://storage.googleapis.com/bkt/d%2F%2Fa.tif", "empty segment"),
        ("gs://bkt/./d/a.tif", "'.' segment"),
        ("gs://bkt/d/.", "'.' segment"),
        ("gs://bkt/d/a\n.tif", "control character"),
        ("gs://bkt/d/a.tif\x00.x", "control character"),
        ("gs://bkt/d/a\r", "control character"),
        ("gs://bkt/\ud800", "not valid Unicode"),
        ("gs://bkt/" + "k" * 1025, "1025 bytes"),
        ("gs:/bkt/d/a.tif", "not a well-formed GCS URL"),
        ("gs:bkt/d/a.tif", "not a well-formed GCS URL"),
        ("GS://bkt/d/a.tif", "not a well-formed GCS URL"),
        (" gs://bkt/d/a.tif", "not a well-formed GCS URL"),
        ("\ngcs://bkt/d/a.tif", "not a well-formed GCS URL"),
        ("Https://storage.googleapis.com/bkt/k", "not a well-formed GCS URL"),
        ("https:/storage.googleapis.com/bkt/k", "not a well-formed GCS URL"),
        ("https://storage.googleapis.com/bkt/k?generation=12", "generation"),
    ],
)
def test_urls_tools_would_read_as_another_object_are_refused(url, why):
    assert is_gcs(url)  # so that cloudio.open never hands them to rasterio
    with pytest.raises(InvalidURLError) as e:
        normalize(url)
    assert repr(url) in str(e.value) and why in str(e.value)


@pytest.mark.parametrize("key", ["a b ", "a%2Fb", "k?generation=5", "k#1", "d/", "ü/ß.tif", "a:b@c", "k" * 1024])
def test_legal_keys_stay_literal(key):
    assert parse_gcs(f"gs://bkt/{key}").key == key
    assert normalize(f"/vsigs/bkt/{key}") == f"gs://bkt/{key}"


def test_child_checks_its_name_like_any_key():
    for name in ("../../x", "e/../f", "./x", "a//b", "x\n"):
        with pytest.raises(InvalidURLError, match=r"gs://bkt/d/"):
            parse_gcs("gs://bkt/d/").child(name)


@pytest.mark.parametrize(
    "name",
    ["abc", "a-b_c.d", "0a9", "a" * 63, "a" * 63 + ".b", ".".join(["a" * 63] * 3) + "." + "b" * 30,
     "my.bucket.example.com", "x1.2.3.4", "gogle-ok"],
)
def test_bucket_names_gcs_accepts(name):
    assert len(name) <= 222
    check_bucket(name)
    assert parse_gcs(f"gs://{name}/k").bucket == name


@pytest.mark.parametrize(
    "name",
    ["b1", "ab", "a" * 64, "a" * 64 + ".b", ".".join(["a" * 63] * 3) + "." + "b" * 31,
     "Abc", "a b", "a*b", "-abc", "abc-", "_abc", "abc.", "192.168.5.4", "goog-data", "my-google-data",
     "my-g00gle-data", "mygoogle", "a/b"],
)
def test_bucket_names_gcs_refuses_with_one_rule_everywhere(name):
    with pytest.raises(InvalidURLError) as e:
        check_bucket(name)
    assert repr(name) in str(e.value) and BUCKET_RULE in str(e.value) and "3-63 characters" in str(e.value)
    if "/" not in name:
        with pytest.raises(InvalidURLError) as e:
            normalize(f"gs://{name}/k")
        assert repr(f"gs://{name}/k") in str(e.value) and BUCKET_RULE in str(e.value)


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("gs://", "names no bucket"),
        ("gs:///k", "names no bucket"),
        ("/vsigs/", "names no bucket"),
        ("gs://B_A_D/k", "not a valid GCS bucket name"),
        ("gs://ab/k", "not a valid GCS bucket name"),
        ("gs://-bkt/k", "not a valid GCS bucket name"),
        ("s3://bkt/k", "not supported"),
        ("az://bkt/k", "not supported"),
        ("memory://bkt/k", "not supported"),
        ("http://example.com/bkt/k", "not supported"),
    ],
)
def test_malformed_urls_raise_an_error_naming_the_url(url, why):
    with pytest.raises(InvalidURLError) as e:
        normalize(url)
    assert repr(url) in str(e.value)
    assert why in str(e.value)
    assert isinstance(e.value, CloudioError) and isinstance(e.value, ValueError)


def test_parse_rejects_non_gcs_and_missing_keys():
    with pytest.raises(InvalidURLError, match="https://example.com/bkt/k"):
        parse_gcs("https://example.com/bkt/k")
    with pytest.raises(InvalidURLError, match="/tmp/x"):
        parse_gcs("/tmp/x")
    with pytest.raises(InvalidURLError, match="names a bucket but no object"):
        parse_gcs("gs://bkt/", require_key=True)


@pytest.mark.parametrize("bad", [None, 42, b"gs://bkt/k", ["gs://bkt/k"]])
def test_non_strings_are_invalid_urls_not_type_errors(bad):
    with pytest.raises(InvalidURLError, match="not a URL or path"):
        normalize(bad)
    with pytest.raises(InvalidURLError):
        parse_gcs(bad)
    assert not is_gcs(bad)


def test_local_paths_pass_through_as_absolute_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert normalize(str(tmp_path / "a.tif")) == str(tmp_path / "a.tif")
    assert normalize(tmp_path / "a.tif") == str(tmp_path / "a.tif")
    assert normalize(Path("rel") / "a.tif") == os.path.join(str(tmp_path), "rel", "a.tif")
    assert normalize(f"file://{tmp_path}/a.tif") == str(tmp_path / "a.tif")
    assert not is_gcs(str(tmp_path / "a.tif"))
    assert not is_gcs("/vsimem/x.tif") and not is_gcs("/vsis3/bkt/k")
