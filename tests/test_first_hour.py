"""A new user's first hour with cloudio: the README, the CLI, the Emulator, and the common mistakes (a key
forgotten, the wrong function for the object, bad arguments), each met by a clear error.

Every test talks to the real emulator (``gcs_emulator`` / ``gcs_bucket``, or an
``Emulator`` a subprocess starts); nothing of GCS is mocked.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
from rasterio.transform import Affine

import cloudio

REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "cloudio.cli"]
PROFILE = dict(driver="GTiff", width=8, height=8, count=1, dtype="uint8",
               crs="EPSG:32631", transform=Affine(10, 0, 500_000, 0, -10, 5_000_000))


def _env(emulator_url: str | None, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("STORAGE_EMULATOR_HOST", "CLOUDIO_EMULATOR")}
    env["COLUMNS"] = "400"
    if emulator_url is not None:
        env["STORAGE_EMULATOR_HOST"] = emulator_url
    env.update(extra)
    return env


def _cli(*args: str, emulator_url: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, env=_env(emulator_url), timeout=timeout)


def _write_tif(url: str, value: int = 1) -> None:
    with cloudio.open(url, "w", **PROFILE) as dst:
        dst.write(np.full((1, 8, 8), value, "uint8"))


def _names(bucket_url: str) -> list[str]:
    fs = cloudio.filesystem(bucket_url)
    return sorted(p.split("/", 1)[1] for p in fs.find(bucket_url.removeprefix("gs://")))


def test_open_of_a_zarr_store_does_not_say_it_does_not_exist(gcs_bucket):
    """``cloudio.open`` of a Zarr store GDAL cannot read says what it is and which function reads it (as
    ``open_zarr`` of a GeoTIFF points to ``cloudio.open``), not that the URL does not exist. (GDAL 3.12's Zarr
    driver reads this one: then it opens.)"""
    url = f"{gcs_bucket}/arr.zarr"
    cloudio.save_array(np.arange(10), url)
    try:
        with cloudio.open(url) as ds:
            assert ds.count >= 1
        return
    except cloudio.CloudioError as e:
        msg = str(e)
    assert url in msg
    assert "does not exist" not in msg, msg
    assert "load_array" in msg or "open_zarr" in msg, msg


def test_read_error_names_gdals_message_once(gcs_bucket):
    """A text object opened as a raster: the ReadError names the URL and GDAL's message once (rasterio chains
    the same message several times)."""
    url = f"{gcs_bucket}/notes.txt"
    cloudio.filesystem(gcs_bucket).pipe(url, b"hello, not a raster")
    with pytest.raises(cloudio.ReadError) as e:
        cloudio.open(url)
    msg = str(e.value)
    assert url in msg and isinstance(e.value.__cause__, Exception)
    assert msg.count("not recognized as being in a supported file format") == 1, msg


def test_every_error_in_cloudio_is_listed_in_cloudio_errors_all():
    """docs/api.md: every error is in ``cloudio`` and in ``cloudio.errors`` (``__all__`` included)."""
    import cloudio.errors

    errors = {n for n in cloudio.__all__ if n.endswith("Error")}
    assert errors - set(cloudio.errors.__all__) == set()


def test_save_array_with_shards_not_a_multiple_of_chunks_is_a_cloudio_error(gcs_bucket):
    """Arguments zarr refuses (chunks that do not divide shards) are a ConfigurationError naming the URL,
    zarr's ValueError its cause."""
    url = f"{gcs_bucket}/bad.zarr"
    with pytest.raises(cloudio.CloudioError) as e:
        cloudio.save_array(np.arange(10), url, chunks=(3,), shards=(4,))
    assert url in str(e.value)
    assert e.value.__cause__ is not None


def test_open_for_writing_with_an_unknown_driver_is_a_cloudio_error(gcs_bucket):
    """An unknown driver for a write is a ConfigurationError naming the URL and the driver (rasterio's
    DriverRegistrationError names neither)."""
    url = f"{gcs_bucket}/x.tif"
    with pytest.raises(cloudio.CloudioError) as e:
        cloudio.open(url, "w", **{**PROFILE, "driver": "NOPE"})
    assert url in str(e.value) and "NOPE" in str(e.value)
    assert e.value.__cause__ is not None


def test_load_array_of_a_0d_array_is_a_numpy_array(gcs_bucket):
    """``load_array`` returns a NumPy array, a 0-d one for a 0-d array (as ``lazy=True`` computes to)."""
    url = f"{gcs_bucket}/zero.zarr"
    cloudio.save_array(np.array(5.0), url)
    eager = cloudio.load_array(url)
    lazy = cloudio.load_array(url, lazy=True).compute()
    assert isinstance(lazy, np.ndarray) and lazy.shape == ()
    assert isinstance(eager, np.ndarray), type(eager)
    assert eager.shape == () and eager == 5.0


def test_open_of_an_empty_url_is_an_invalid_url_error():
    """An empty URL is bad input for ``cloudio.open`` as for the CLI."""
    with pytest.raises(cloudio.InvalidURLError):
        cloudio.open("")


def test_no_credentials_error_names_the_url(tmp_path):
    """Without an emulator or credentials, ``cloudio.open`` says so and names the URL it was given."""
    code = textwrap.dedent("""
        import cloudio
        try:
            cloudio.open("gs://some-bucket/scenes/a.tif")
        except cloudio.ConfigurationError as e:
            print(e)
    """)
    env = _env(None, HOME=str(tmp_path))
    for key in ("GOOGLE_APPLICATION_CREDENTIALS", "GS_NO_SIGN_REQUEST", "GCE_METADATA_HOST", "GCE_METADATA_IP"):
        env.pop(key, None)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert "no Google credentials" in r.stdout, r.stdout + r.stderr
    assert "gs://some-bucket/scenes/a.tif" in r.stdout, r.stdout


def test_python_dash_m_cloudio_runs_the_cli():
    """``python -m cloudio`` runs the CLI (as ``python -m cloudio.cli`` and the ``cloudio`` script do)."""
    r = subprocess.run([sys.executable, "-m", "cloudio", "--version"], capture_output=True, text=True,
                       env=_env(None), timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"cloudio {cloudio.__version__}"


def test_readme_example_runs_in_a_script_inside_an_emulator_block(tmp_path):
    """README: "in a script, ``with cloudio.Emulator() as emu: emu.create_bucket("readme")`` does both"."""
    text = (REPO / "README.md").read_text()
    code = re.findall(r"```python\n(.*?)```", text, re.S)[0]
    lines = code.splitlines()
    imports = [ln for ln in lines if ln.startswith(("import ", "from "))]
    body = [ln for ln in lines if not ln.startswith(("import ", "from "))]
    script = "\n".join(imports) + "\n\nwith cloudio.Emulator() as emu:\n    emu.create_bucket('readme')\n"
    script += "\n".join("    " + ln for ln in body) + "\nprint('README OK')\n"
    (tmp_path / "readme.py").write_text(script)
    r = subprocess.run([sys.executable, "readme.py"], cwd=tmp_path, capture_output=True, text=True,
                       env=_env(None), timeout=300)
    assert r.returncode == 0 and "README OK" in r.stdout, r.stdout[-2000:] + r.stderr[-4000:]


@pytest.mark.parametrize("url", ["gs://{b}", "gs://{b}/"])
def test_open_without_a_key_is_invalid_url_naming_it(gcs_bucket, url):
    url = url.format(b=gcs_bucket.removeprefix("gs://"))
    with pytest.raises(cloudio.InvalidURLError) as e:
        cloudio.open(url)
    assert url in str(e.value) and "key" in str(e.value)


@pytest.mark.parametrize("mode", ["a", "rb", "x"])
def test_open_with_a_mode_rasterio_lacks_names_the_url_and_the_modes(gcs_bucket, mode):
    url = f"{gcs_bucket}/a.tif"
    with pytest.raises(cloudio.ConfigurationError) as e:
        cloudio.open(url, mode)
    assert url in str(e.value) and "'r+'" in str(e.value)


def test_open_missing_object_and_bucket(gcs_bucket):
    url = f"{gcs_bucket}/nothing/here.tif"
    with pytest.raises(cloudio.ObjectNotFoundError) as e:
        cloudio.open(url)
    assert not isinstance(e.value, cloudio.BucketNotFoundError)
    assert url in str(e.value) and e.value.__cause__ is not None
    with pytest.raises(cloudio.BucketNotFoundError) as e:
        cloudio.open("gs://no-such-bucket-review/a.tif")
    assert "gs://no-such-bucket-review" in str(e.value) and "create" in str(e.value)
    assert isinstance(e.value, FileNotFoundError) and e.value.__cause__ is not None


def test_open_zarr_and_load_array_of_a_geotiff_say_to_use_open(gcs_bucket):
    url = f"{gcs_bucket}/a.tif"
    _write_tif(url)
    for fn in (cloudio.open_zarr, cloudio.load_array):
        with pytest.raises(cloudio.ConfigurationError) as e:
            fn(url)
        assert url in str(e.value) and "cloudio.open" in str(e.value)
        assert e.value.__cause__ is not None


def test_save_array_of_a_list_and_of_a_0d_array_round_trip_values(gcs_bucket):
    cloudio.save_array([[1.5, 2], [3, 4]], f"{gcs_bucket}/list.zarr")
    np.testing.assert_array_equal(cloudio.load_array(f"{gcs_bucket}/list.zarr"), [[1.5, 2.0], [3.0, 4.0]])
    cloudio.save_array(np.array(7, "int16"), f"{gcs_bucket}/zero.zarr")
    back = cloudio.load_array(f"{gcs_bucket}/zero.zarr")
    assert np.shape(back) == () and back == 7 and np.asarray(back).dtype == np.int16


def test_load_array_of_a_group_and_open_zarr_of_an_array_say_which_to_use(gcs_bucket):
    cloudio.save_array(np.arange(4), f"{gcs_bucket}/arr.zarr")
    cloudio.to_zarr(xr.Dataset({"v": ("x", np.arange(4))}), f"{gcs_bucket}/ds.zarr", mode="w", consolidated=False)
    with pytest.raises(cloudio.ConfigurationError, match="load_array"):
        cloudio.open_zarr(f"{gcs_bucket}/arr.zarr")
    with pytest.raises(cloudio.ConfigurationError, match="open_zarr"):
        cloudio.load_array(f"{gcs_bucket}/ds.zarr")


@pytest.mark.parametrize("level", ["bogus", "Strong", "5", -1, None, True, float("nan")])
def test_session_with_an_unusable_level_is_a_configuration_error(level):
    with pytest.raises(cloudio.ConfigurationError, match="session"):
        with cloudio.session(level):
            pass


def test_s3_urls_are_invalid_where_cloudio_needs_gcs():
    for fn in (cloudio.filesystem, cloudio.invalidate, cloudio.zarr_store, cloudio.load_array):
        with pytest.raises(cloudio.InvalidURLError, match="s3"):
            fn("s3://bucket/key")


def test_write_vrt_to_a_local_path_is_invalid_url(gcs_bucket):
    url = f"{gcs_bucket}/a.tif"
    _write_tif(url)
    with cloudio.open(url) as src:
        with pytest.raises(cloudio.InvalidURLError, match="not a GCS URL"):
            cloudio.write_vrt(src, "/tmp/review-first-hour.vrt")
    assert not Path("/tmp/review-first-hour.vrt").exists()


def test_emulator_start_and_stop_are_idempotent_and_restartable():
    from cloudio.emulator import Emulator

    emu = Emulator(mode="binary")
    with pytest.raises(cloudio.EmulatorError, match="not running"):
        emu.url
    assert emu.start() is emu
    url = emu.url
    assert emu.start() is emu and emu.url == url
    emu.create_bucket("review-one")
    emu.stop()
    emu.stop()
    with pytest.raises(cloudio.EmulatorError, match="not running"):
        emu.create_bucket("review-two")
    emu.start()
    try:
        assert emu.create_bucket("review-two") == "gs://review-two"
    finally:
        emu.stop()


def test_emulator_on_a_busy_port_names_the_port():
    import socket

    from cloudio.emulator import Emulator

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(cloudio.EmulatorError) as e:
            Emulator(mode="binary", port=port).start()
    assert str(port) in str(e.value) and "address already in use" in str(e.value)


def test_a_second_emulator_in_the_same_process(gcs_emulator):
    """Inside a running emulator's ``with`` block, ``Emulator()`` attaches to it and ``mode="binary"``
    starts a separate server; leaving either restores STORAGE_EMULATOR_HOST."""
    from cloudio.emulator import Emulator

    before = os.environ.get("STORAGE_EMULATOR_HOST")
    with Emulator(mode="binary") as outer:
        assert os.environ["STORAGE_EMULATOR_HOST"] == outer.url
        with Emulator() as attached:
            assert attached.mode == "external" and attached.url == outer.url
        assert os.environ["STORAGE_EMULATOR_HOST"] == outer.url
        assert outer.create_bucket("still-running") == "gs://still-running"  # not stopped by the attach
        with Emulator(mode="binary") as other:
            assert other.url != outer.url
        assert os.environ["STORAGE_EMULATOR_HOST"] == outer.url
    assert os.environ.get("STORAGE_EMULATOR_HOST") == before


@pytest.mark.parametrize("command", [[], ["demo"], ["check"], ["inspect"], ["emulator"]])
def test_every_subcommand_help_exits_0(command):
    r = _cli(*command, "--help")
    assert r.returncode == 0 and "usage: cloudio" in r.stdout, r.stderr


@pytest.mark.parametrize("args", [["inspect", "--bogus", "gs://b/a.tif"], ["bogus"], ["demo", "extra"],
                                  ["emulator", "--backend", "s3"], ["emulator", "--port", "abc"]])
def test_cli_unknown_option_or_value_is_exit_2(args):
    r = _cli(*args)
    assert r.returncode == 2 and "error:" in r.stderr and "Traceback" not in r.stderr, r.stderr


@pytest.mark.parametrize("args", [["check", "/tmp/a-local-dir"], ["check", "my-bucket/x"],
                                  ["demo", "--url", "s3://x/y"], ["inspect", "./no-such-file.tif"]])
def test_cli_local_path_where_a_gs_url_is_expected_is_exit_2(args):
    r = _cli(*args)
    assert r.returncode == 2, r.stdout + r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and args[-1] in lines[0] and "gs://" in lines[0], r.stderr


def test_cli_inspect_missing_bucket_and_object_are_exit_2(gcs_emulator, gcs_bucket):
    r = _cli("inspect", "gs://no-such-bucket-review/a.tif", emulator_url=gcs_emulator.url)
    assert r.returncode == 2 and "bucket gs://no-such-bucket-review does not exist" in r.stderr, r.stderr
    r = _cli("inspect", f"{gcs_bucket}/missing.tif", emulator_url=gcs_emulator.url)
    assert r.returncode == 2 and f"{gcs_bucket}/missing.tif" in r.stderr, r.stderr
    assert not gcs_emulator.has_bucket("no-such-bucket-review")


def test_cli_inspect_text_object_is_exit_2_and_says_what_it_takes(gcs_emulator, gcs_bucket):
    url = f"{gcs_bucket}/notes.txt"
    cloudio.filesystem(gcs_bucket).pipe(url, b"hello")
    r = _cli("inspect", url, emulator_url=gcs_emulator.url)
    assert r.returncode == 2 and "neither a Zarr store" in r.stderr and url in r.stderr, r.stderr
