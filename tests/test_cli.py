"""The ``cloudio`` command, run as a user runs it: a separate process, exit codes and output.

``demo`` and ``check`` without a URL start their own embedded emulator (the
subprocess gets no ``STORAGE_EMULATOR_HOST``); the other tests point the
subprocess at the session's emulator through ``STORAGE_EMULATOR_HOST``.
"""

from __future__ import annotations

import json
import os
import re
import signal
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

import cloudio

CLI = [sys.executable, "-m", "cloudio.cli"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _env(emulator_url: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("STORAGE_EMULATOR_HOST", "CLOUDIO_EMULATOR")}
    env["COLUMNS"] = "400"  # wide enough that no table cell wraps: one row per line
    if emulator_url is not None:
        env["STORAGE_EMULATOR_HOST"] = emulator_url
    return env


def run_cli(*args: str, emulator_url: str | None = None, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, env=_env(emulator_url), timeout=timeout)


def _error_lines(r: subprocess.CompletedProcess[str]) -> list[str]:
    """The non-blank lines of stderr, which must be exactly one (the error, no traceback)."""
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, r.stderr
    return lines


# -- demo and check on their own embedded emulator -----------------------------------------


def test_demo_exits_zero_and_shows_both_sides():
    r = run_cli("demo")
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert "cloudio: right at every step (5/5)" in out
    for step in ("Write a GeoTIFF", "WarpedVRT", "Overwrite a GeoTIFF", "Sharded Zarr v3", "Append a variable"):
        assert step in out
    # the raw side really is stale or wrong where docs/design.md measured it
    assert "STALE: 64x64, value 1 (the old file)" in out or "Read failed" in out
    assert re.search(r"WRONG: .*safe_chunks=False: [\d,]+ of 160,000 values wrong", out)
    assert "does not exist in the file system" in out  # the VRT GDAL cannot reopen (rasterio #3254)
    assert "ok: 128x128, value 2" in out
    assert re.search(r"requests\s*$", out.splitlines()[3]) and "raw / cloudio" in out  # a two-line header
    assert "Traceback" not in r.stderr
    assert "[5/5]" in r.stderr  # progress went to stderr


def test_check_all_cases_consistent():
    r = run_cli("check")
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.strip().splitlines()
    assert lines[-1] == "6/6 cases consistent"
    for name in ("overwrite", "delete", "new-object", "vrt", "zarr-member", "sharded-dask"):
        assert re.search(rf"^{name}: ", r.stdout, re.M), name
    assert "STALE: exists() is still True" in r.stdout
    assert "ok: exists() is False" in r.stdout
    assert "Traceback" not in r.stderr and "Exception ignored" not in r.stderr, r.stderr


def test_check_json_parses():
    r = run_cli("check", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["ok"] is True
    assert doc["consistent"] == doc["total"] == 6
    names = [c["name"] for c in doc["cases"]]
    assert names == ["overwrite", "delete", "new-object", "vrt", "zarr-member", "sharded-dask"]
    for c in doc["cases"]:
        assert c["consistent"] is True
        assert c["cloudio"]["verdict"] == "correct"
        assert c["raw"]["verdict"] in ("correct", "stale", "wrong", "error")
        assert isinstance(c["cloudio"]["requests"], int)
    # at least the listing cases are stale with raw gcsfs
    verdicts = {c["name"]: c["raw"]["verdict"] for c in doc["cases"]}
    assert verdicts["delete"] == verdicts["new-object"] == "stale"


def test_check_on_a_bucket_prefix_cleans_up(gcs_emulator, gcs_bucket):
    prefix = f"{gcs_bucket}/ci"
    r = run_cli("check", prefix, emulator_url=gcs_emulator.url)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.strip().splitlines()[-1] == "6/6 cases consistent"
    assert f"in {prefix}/cloudio-check-" in r.stdout
    bucket = gcs_bucket.removeprefix("gs://")
    left = list(gcs_emulator.client.list_blobs(bucket))
    assert left == [], [b.name for b in left]


# -- inspect -----------------------------------------------------------------------------------


def _field() -> np.ndarray:
    y, x = np.mgrid[0:120, 0:160]
    return (np.sin(x / 15.0) * np.cos(y / 20.0)).astype("float32")


@pytest.fixture
def zarr_url(gcs_bucket):
    import zarr

    url = f"{gcs_bucket}/tree.zarr"
    g = zarr.open_group(cloudio.zarr_store(url), mode="w", zarr_format=3, attributes={"title": "cli test"})
    a = g.create_array("temperature", shape=(3, 120, 160), chunks=(1, 40, 40), shards=(1, 120, 160),
                       dtype="float32", dimension_names=("time", "y", "x"),
                       compressors=zarr.codecs.ZstdCodec(level=3))
    a[:] = np.stack([_field()] * 3)
    g.create_group("masks").create_array("land", shape=(120, 160), chunks=(60, 80), dtype="uint8")[:] = (
        _field() > 0
    ).astype("uint8")
    return url


@pytest.fixture
def raster_url(gcs_bucket):
    from rasterio.io import MemoryFile
    from rasterio.transform import Affine

    url = f"{gcs_bucket}/img.tif"
    with MemoryFile() as mf:
        with mf.open(driver="GTiff", width=160, height=120, count=1, dtype="float32", crs="EPSG:32631",
                     transform=Affine(10, 0, 500000, 0, -10, 5000000), tiled=True, blockxsize=64,
                     blockysize=64, compress="deflate") as dst:
            dst.write(_field(), 1)
            dst.build_overviews([2, 4])
        cloudio.filesystem(url).pipe(url, mf.read())
    return url


def test_inspect_zarr_tree(gcs_emulator, zarr_url):
    r = run_cli("inspect", zarr_url, emulator_url=gcs_emulator.url)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert out.startswith(f"{zarr_url}  (Zarr v3 group)")
    assert "temperature  float32  (3, 120, 160)" in out
    assert "chunks (1, 40, 40)  shards (1, 120, 160)" in out
    assert "zstd(level=3" in out and "crc32c" in out
    assert "masks/  (group)" in out and "land  uint8  (120, 160)" in out
    assert "dims: time, y, x" in out
    m = re.search(r"total: stored ([\d.]+) (KiB|MiB|B) .*logical ([\d.]+) (KiB|MiB|B), ratio ([\d.]+)x", out)
    assert m, out
    assert float(m.group(5)) > 1.0  # zstd on a smooth field compresses


def test_inspect_raster_profile(gcs_emulator, raster_url):
    r = run_cli("inspect", raster_url, emulator_url=gcs_emulator.url)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr and "Exception ignored" not in r.stderr, r.stderr
    out = r.stdout
    assert "(raster, driver GTiff)" in out
    assert "160 x 120 pixels, 1 band(s), float32" in out
    assert "EPSG:32631" in out
    assert "overviews: 2, 4" in out
    assert "DEFLATE" in out


def _png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == PNG_SIGNATURE
    assert head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])


@pytest.mark.parametrize("which", ["zarr", "raster"])
def test_inspect_plot_writes_png(gcs_emulator, request, tmp_path, which):
    pytest.importorskip("matplotlib")
    url = request.getfixturevalue(f"{which}_url")
    png = tmp_path / "quick.png"
    r = run_cli("inspect", url, "--plot", str(png), emulator_url=gcs_emulator.url)
    assert r.returncode == 0, r.stderr
    assert f"written to {png}" in r.stdout
    w, h = _png_size(png)
    assert (w, h) == (700, 550)
    assert png.stat().st_size > 10_000  # an image with a colour bar, not an empty canvas


@pytest.fixture
def strip_raster_url(gcs_bucket):
    """A raster whose blocks are not square (128 wide, 32 high), so their order shows."""
    from rasterio.io import MemoryFile

    url = f"{gcs_bucket}/strips.tif"
    with MemoryFile() as mf:
        with mf.open(driver="GTiff", width=160, height=120, count=1, dtype="uint8", tiled=True,
                     blockxsize=128, blockysize=32) as dst:
            dst.write(np.ones((120, 160), "uint8"), 1)
        cloudio.filesystem(url).pipe(url, mf.read())
    return url


def test_inspect_raster_shapes_are_width_by_height(gcs_emulator, strip_raster_url):
    """Size and blocks print in one order, width x height (as ``rio info`` and GDAL do), and say so."""
    r = run_cli("inspect", strip_raster_url, emulator_url=gcs_emulator.url)
    assert r.returncode == 0, r.stderr
    rows = {line.strip().split("  ")[0]: line for line in r.stdout.splitlines()[1:]}
    assert "160 x 120 pixels" in rows["size (width x height)"], r.stdout
    assert "128 x 32" in rows["blocks (width x height)"], r.stdout


def test_inspect_a_prefix_lists_its_objects(gcs_emulator, gcs_bucket):
    fs = cloudio.filesystem(gcs_bucket)
    fs.pipe(f"{gcs_bucket}/folder/a.bin", b"0123456789")
    fs.pipe(f"{gcs_bucket}/folder/sub/b.bin", b"x" * 3000)
    for url in (f"{gcs_bucket}/folder/", f"{gcs_bucket}/folder"):
        r = run_cli("inspect", url, emulator_url=gcs_emulator.url)
        assert r.returncode == 0, r.stdout + r.stderr
        out = r.stdout
        assert out.startswith(f"{gcs_bucket}/folder/  (prefix)"), out
        assert re.search(r"^\s+a\.bin\s+10 B$", out, re.MULTILINE), out
        assert re.search(r"^\s+sub/b\.bin\s+2\.9 KiB$", out, re.MULTILINE), out
        assert "2 objects, 2.9 KiB" in out


@pytest.mark.parametrize("where", ["prefix", "bucket"])
def test_inspect_an_empty_prefix_does_not_exist(gcs_emulator, gcs_bucket, where):
    url = f"{gcs_bucket}/nothing/" if where == "prefix" else "gs://no-such-bucket-cli/"
    r = run_cli("inspect", url, emulator_url=gcs_emulator.url)
    assert r.returncode == 2, r.stdout + r.stderr
    lines = _error_lines(r)
    assert url in lines[0] and "does not exist" in lines[0], r.stderr


def test_inspect_a_file_that_is_no_raster_is_exit_2(gcs_emulator, gcs_bucket):
    url = f"{gcs_bucket}/notes.txt"
    cloudio.filesystem(url).pipe(url, b"plain text, not a raster\n")
    r = run_cli("inspect", url, emulator_url=gcs_emulator.url)
    assert r.returncode == 2, r.stdout + r.stderr
    lines = _error_lines(r)
    assert url in lines[0] and "25 B" in lines[0], r.stderr
    assert "neither a Zarr store" in lines[0] and "nor a raster" in lines[0], r.stderr
    assert "Traceback" not in r.stderr


def test_inspect_an_unknown_var_is_exit_2_and_names_the_arrays(gcs_emulator, zarr_url, tmp_path):
    r = run_cli("inspect", zarr_url, "--plot", str(tmp_path / "q.png"), "--var", "nope",
                emulator_url=gcs_emulator.url)
    assert r.returncode == 2, r.stdout + r.stderr
    lines = _error_lines(r)
    assert zarr_url in lines[0] and "'nope'" in lines[0], r.stderr
    assert "masks/land" in lines[0] and "temperature" in lines[0], r.stderr


def test_inspect_an_unknown_band_is_exit_2_and_names_the_band_count(gcs_emulator, raster_url, tmp_path):
    r = run_cli("inspect", raster_url, "--plot", str(tmp_path / "q.png"), "--band", "3",
                emulator_url=gcs_emulator.url)
    assert r.returncode == 2, r.stdout + r.stderr
    lines = _error_lines(r)
    assert raster_url in lines[0] and "1 band" in lines[0] and "--band 3" in lines[0], r.stderr
    assert not (tmp_path / "q.png").exists()


def test_quicklook_of_a_root_array_is_titled_by_the_url_and_its_colour_bar_fits(gcs_bucket, tmp_path,
                                                                                 monkeypatch):
    """A wide root array: the title names the store, the colour bar is no taller than the image."""
    pytest.importorskip("matplotlib")
    import matplotlib.figure
    import zarr

    from cloudio.cli.inspect import plot_zarr

    url = f"{gcs_bucket}/wide.zarr"
    z = zarr.create_array(cloudio.zarr_store(url), shape=(100, 400), dtype="f4", chunks=(100, 200))
    z[...] = np.arange(400, dtype="f4")[None, :]
    saved: list[matplotlib.figure.Figure] = []
    savefig = matplotlib.figure.Figure.savefig

    def keep(fig: matplotlib.figure.Figure, *args: object, **kwargs: object) -> None:
        saved.append(fig)
        savefig(fig, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", keep)
    node = zarr.open(store=cloudio.zarr_store(url, read_only=True), mode="r")
    assert plot_zarr(node, str(tmp_path / "wide.png"), None, url) == "wide.zarr"
    (fig,) = saved
    (image_ax,) = [ax for ax in fig.axes if ax.images]
    (bar_ax,) = [ax for ax in fig.axes if ax is not image_ax]
    title = image_ax.get_title().splitlines()
    assert title[0] == url and title[1].startswith("wide.zarr["), title
    image, bar = image_ax.get_window_extent(), bar_ax.get_window_extent()
    assert bar.height <= image.height + 1, (bar.height, image.height)
    assert bar.height >= 0.8 * image.height, (bar.height, image.height)
    assert bar.x0 >= image.x1  # to the right of the image


@pytest.mark.parametrize("command", [[], ["demo"], ["check"], ["inspect"], ["emulator"]])
def test_help_shows_no_rest_markup(command, capsys):
    from cloudio.cli import main

    with pytest.raises(SystemExit) as exit_:
        main([*command, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "usage: cloudio" in out
    assert "``" not in out, out


# -- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize("args, named", [
    (["inspect", "gs://x"], "gs://x"),
    (["inspect", "s3://bucket/key.tif"], "s3://bucket/key.tif"),
    (["check", "not-a-url"], "not-a-url"),
    (["demo", "--url", "gs://UPPER/prefix"], "gs://UPPER/prefix"),
])
def test_bad_url_is_one_line_exit_2(args, named):
    r = run_cli(*args)
    assert r.returncode == 2, r.stdout + r.stderr
    lines = _error_lines(r)
    assert named in lines[0] and "error" in lines[0]
    assert "Traceback" not in r.stderr


def test_missing_object_names_it(gcs_emulator, gcs_bucket):
    url = f"{gcs_bucket}/nothing/here.tif"
    r = run_cli("inspect", url, emulator_url=gcs_emulator.url)
    assert r.returncode == 2, r.stdout + r.stderr
    lines = _error_lines(r)
    assert url.removeprefix("gs://") in lines[0], r.stderr


def test_debug_shows_traceback():
    r = run_cli("inspect", "gs://x", "--debug")
    assert r.returncode == 2
    assert "Traceback" in r.stderr and "InvalidURLError" in r.stderr


def test_no_command_prints_help():
    r = run_cli()
    assert r.returncode == 2
    assert "demo" in r.stderr and "check" in r.stderr and "inspect" in r.stderr


# -- emulator ----------------------------------------------------------------------------------


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc to find the server process")
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_emulator_command_prints_export_and_stops_cleanly(sig):
    p = subprocess.Popen([*CLI, "emulator", "--bucket", "dev", "dev-two"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(None))
    try:
        line = p.stdout.readline().strip()  # type: ignore[union-attr]
        m = re.fullmatch(r"export STORAGE_EMULATOR_HOST=(http://127\.0\.0\.1:\d+)", line)
        assert m, line
        url = m.group(1)
        with urllib.request.urlopen(f"{url}/storage/v1/b/dev-two", timeout=5):  # several names at once
            pass
        with urllib.request.urlopen(f"{url}/storage/v1/b/dev", timeout=5) as resp:  # bucket created
            assert json.load(resp)["name"] == "dev"
        servers = _children(p.pid)
        assert servers, "the fake-gcs-server child process"
        p.send_signal(sig)
        rc = p.wait(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert rc == 0, p.stderr.read()  # type: ignore[union-attr]
    assert "emulator stopped" in p.stderr.read()  # type: ignore[union-attr]
    deadline = time.monotonic() + 5
    while any(_alive(pid) for pid in servers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_alive(pid) for pid in servers)
    with pytest.raises((urllib.error.URLError, OSError)):
        urllib.request.urlopen(f"{url}/storage/v1/b", timeout=2)


def test_emulator_command_on_a_busy_port_fails_without_export(gcs_emulator):
    port = gcs_emulator.url.rsplit(":", 1)[1]
    r = run_cli("emulator", "--port", port, timeout=60)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "export" not in r.stdout and "is running" not in r.stderr
    assert "bind: address already in use" in r.stderr and port in r.stderr


@pytest.mark.parametrize("command", ["check", "demo"])
def test_missing_bucket_is_exit_2_and_not_created(gcs_emulator, command):
    args = (command, "gs://missing-bucket-cli/x") if command == "check" else (command, "--url", "gs://missing-bucket-cli/x")
    r = run_cli(*args, emulator_url=gcs_emulator.url, timeout=60)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "bucket does not exist" in r.stderr and "gs://missing-bucket-cli" in r.stderr
    assert not gcs_emulator.has_bucket("missing-bucket-cli")


def test_demo_below_a_bucket_prefix_cleans_up(gcs_emulator, gcs_bucket):
    r = run_cli("demo", "--url", f"{gcs_bucket}/demo", emulator_url=gcs_emulator.url)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "cloudio: right at every step (5/5)" in r.stdout
    assert "requests" not in r.stdout.splitlines()[3]  # an attached emulator's log is not ours to count
    left = list(gcs_emulator.client.list_blobs(gcs_bucket.removeprefix("gs://")))
    assert left == [], [b.name for b in left]


# -- in-process pieces -------------------------------------------------------------------------


def test_table_wraps_to_the_width():
    from cloudio.cli._ui import table

    text = table(["a", "b"], [["short", "a long cell " * 10], ["x", "y"]], max_width=60)
    lines = text.splitlines()
    assert all(len(line) <= 60 for line in lines)
    assert lines[0].split() == ["a", "b"]
    assert "x" in lines[-1] and "y" in lines[-1]
    assert sum("a long cell" in line for line in lines) > 1  # the long cell wrapped onto several lines


def test_main_returns_exit_status_in_process(capsys):
    from cloudio.cli import main

    assert main(["inspect", "gs://x"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "gs://x" in err


def test_unreachable_emulator_is_one_line_at_once():
    import socket

    with socket.socket() as s:  # a port nothing listens on once closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    r = run_cli("inspect", "gs://some-bucket/a.tif", emulator_url=url, timeout=30)
    assert r.returncode == 1
    lines = _error_lines(r)
    assert url in lines[0] and "cloudio emulator" in lines[0], r.stderr


def test_progress_on_a_terminal_is_a_rich_spinner_then_a_tick():
    """FORCE_COLOR makes rich treat stderr as a terminal, as an interactive shell would."""
    env = _env(None)
    env["FORCE_COLOR"] = "1"
    code = (
        "from cloudio.cli._ui import progress\n"
        "with progress('counting', 1, 2):\n"
        "    pass\n"
        "try:\n"
        "    with progress('failing', 2, 2):\n"
        "        raise ValueError('x')\n"
        "except ValueError:\n"
        "    pass\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "\x1b[" in r.stderr  # styled for a terminal
    assert "\u2713" in r.stderr and "[1/2] counting" in r.stderr
    assert "\u2717" in r.stderr and "[2/2] failing" in r.stderr
    assert r.stdout == ""  # progress never mixes into results


def test_zarr_quicklook_keeps_the_aspect_of_a_decimated_array(tmp_path):
    """A 600 x 2400 array, decimated 1:3 on both axes, is still drawn four times wider than high."""
    pytest.importorskip("matplotlib")
    import matplotlib.image
    import zarr

    from cloudio.cli.inspect import plot_zarr

    z = zarr.create_array(zarr.storage.MemoryStore(), shape=(600, 2400), dtype="f4", chunks=(600, 600))
    z[...] = np.arange(2400, dtype="f4")[None, :]
    png = tmp_path / "wide.png"
    plot_zarr(z, str(png), None, "memory://wide")
    rgb = matplotlib.image.imread(png)[..., :3]
    coloured = (rgb.max(axis=2) - rgb.min(axis=2)) > 0.2  # viridis pixels, not the white/grey frame
    rows, cols = np.nonzero(coloured[:, : int(rgb.shape[1] * 0.8)])  # left of the colour bar
    aspect = (cols.max() - cols.min()) / (rows.max() - rows.min())
    assert 3.6 < aspect < 4.4, aspect


# -- the cases behind demo and check -----------------------------------------------------------


def test_raw_vrt_failure_is_gdals_listing_cache(gcs_emulator, gcs_bucket):
    """The raw side's 'does not exist' is GDAL's cached listing of the folder (GDAL #11351).

    The VRT really is on the server (uploaded by another client); GDAL's listing
    of its folder lacks it; clearing the VRT's own entry changes nothing;
    clearing the folder's listing makes the same raw reopen work.
    """
    import rasterio

    from cloudio._gdal import bindings, targets
    from cloudio._paths import parse_gcs
    from cloudio.cli.cases import RAW, Context, vrt_next_to_source

    ctx = Context(f"{gcs_bucket}/run/", gcs_emulator)
    result = vrt_next_to_source(ctx)
    assert result.raw.verdict == "error", result.raw
    assert "does not exist in the file system" in result.raw.detail
    assert result.cloudio.correct, result.cloudio
    vrt_url = ctx.url(RAW, "warp/scene_4326.vrt")
    assert ctx.other_fs().cat(vrt_url).startswith(b"<VRTDataset")  # on the server: not an upload failure
    vrt = parse_gcs(vrt_url)
    folder = targets.dir_key(vrt)
    with ctx.gdal_env():
        assert "scene_4326.vrt" not in bindings.vsi_readdir(folder + "/")  # GDAL's cached listing
        bindings.clear(vrt.vsi)  # the VRT's own cache entry alone: still "does not exist"
        with pytest.raises(rasterio.errors.RasterioIOError, match="does not exist"):
            rasterio.open(vrt.vsi)
        bindings.clear(folder)  # the folder's listing: the same raw reopen now works
        with rasterio.open(vrt.vsi) as v:
            assert v.crs == "EPSG:4326" and v.read(1).any()


# -- the set-up scripts ------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]


def test_setup_script_says_what_it_installs_and_how_long(tmp_path):
    """A fresh install is announced (what, how long) on stderr; a current one is silent."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    calls = tmp_path / "calls"
    stub = venv / "bin" / "python"  # a stand-in interpreter: records what pip would have been asked
    stub.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    stub.chmod(0o755)
    cmd = ["bash", "-c", f'source "{ROOT}/scripts/_venv.sh"']
    env = {**os.environ, "VENV": str(venv)}
    first = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert first.returncode == 0, first.stderr
    assert "installing cloudio[test]" in first.stderr and "minutes" in first.stderr
    assert re.search(r"installed in \d+ s", first.stderr)
    assert "-e " in calls.read_text()
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and again.stderr == ""


def test_license_is_an_spdx_string_setuptools_understands():
    """setuptools >= 77 warns about a TOML-table license; an SPDX string needs that floor."""
    import tomllib

    doc = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert doc["project"]["license"] == "MIT"
    floor = [r for r in doc["build-system"]["requires"] if r.startswith("setuptools")]
    assert floor == ["setuptools>=77"]


# -- a new user's first hour: prefixes with glob characters, ports, variables, inspect input ------


def _run_cli_with(*args: str, emulator_url: str | None = None, cwd: str | None = None, timeout: float = 60,
                  **extra: str) -> subprocess.CompletedProcess[str]:
    """``run_cli`` with further variables set, in another working directory if asked."""
    env = {k: v for k, v in _env(emulator_url).items() if k not in ("CLOUDIO_EMULATOR_START_TIMEOUT", "PYTEST_ADDOPTS")}
    if env.get("PYTHONPATH"):  # a relative PYTHONPATH must survive a change of cwd
        env["PYTHONPATH"] = os.pathsep.join(os.path.abspath(p) for p in env["PYTHONPATH"].split(os.pathsep) if p)
    env.update(extra)
    return subprocess.run([*CLI, *args], capture_output=True, text=True, env=env, timeout=timeout, cwd=cwd)


def test_check_below_a_prefix_with_a_question_mark_removes_what_it_wrote(gcs_emulator, gcs_bucket):
    """GCS keys may hold '?' (cloudio reads and writes such keys); the run's cleanup must too."""
    bucket = gcs_bucket.removeprefix("gs://")
    r = run_cli("check", f"{gcs_bucket}/what?/smoke", emulator_url=gcs_emulator.url, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.strip().splitlines()[-1] == "6/6 cases consistent"
    left = [b.name for b in gcs_emulator.client.list_blobs(bucket)]
    assert left == [], f"{len(left)} objects left behind; stderr: {r.stderr[-400:]}"
    assert "delete it by hand" not in r.stderr


@pytest.mark.parametrize("port", ["70000", "-1"])
def test_emulator_command_with_an_impossible_port_is_exit_2(port):
    r = run_cli("emulator", f"--port={port}", timeout=60)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "--port" in r.stderr and "export" not in r.stdout
    assert "check the port is free" not in r.stderr, r.stderr


@pytest.mark.parametrize("variable, value", [
    ("CLOUDIO_EMULATOR", "bogus"),
    ("CLOUDIO_EMULATOR_START_TIMEOUT", "soon"),
])
@pytest.mark.parametrize("command", ["emulator", "check"])
def test_unusable_emulator_variable_is_exit_2(command, variable, value):
    """cloudio/cli/__init__.py: exit 2 for 'an option or environment variable with an unusable value'."""
    r = _run_cli_with(command, **{variable: value})
    assert variable in r.stderr, r.stderr
    assert r.returncode == 2, r.stdout + r.stderr


def test_inspect_an_empty_url_is_bad_input(tmp_path):
    """`cloudio inspect "$URL"` with URL unset must not list the working directory and succeed."""
    (tmp_path / "private.txt").write_text("x")
    r = _run_cli_with("inspect", "", cwd=str(tmp_path))
    assert "private.txt" not in r.stdout
    assert r.returncode == 2, r.stdout + r.stderr


def test_inspect_plot_into_a_missing_folder_is_bad_input_before_any_work(gcs_emulator, gcs_bucket, tmp_path):
    url = f"{gcs_bucket}/p/a.tif"
    with cloudio.open(url, "w", driver="GTiff", width=8, height=8, count=1, dtype="uint8") as dst:
        dst.write(np.ones((1, 8, 8), "uint8"))
    png = tmp_path / "no-such-folder" / "q.png"
    r = run_cli("inspect", url, "--plot", str(png), emulator_url=gcs_emulator.url, timeout=60)
    assert str(png) in r.stderr
    assert r.returncode == 2, r.stdout + r.stderr
