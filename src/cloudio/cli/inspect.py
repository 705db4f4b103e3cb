"""``cloudio inspect URL [--plot out.png]``: what a Zarr store, a raster or a prefix holds.

A Zarr store (v2 or v3) prints as a tree of groups and arrays with shape,
dtype, chunks, shards, codecs, stored and logical bytes and the compression
ratio; a raster prints its profile and overviews, sizes as width x height
(the order of GDAL and rio info); a prefix (a URL ending in /, or one with
objects below it and none at it) lists the objects below it with their sizes.
``--plot`` writes a quicklook PNG: a 2-D slice (the first index of every
leading dimension, decimated to at most 1024 pixels a side) with a colour bar.
Exit status 2 when there is nothing at the URL, when it is neither a Zarr
store nor a raster, or when ``--var`` or ``--band`` names nothing it holds;
1 when a write to the Zarr store started and never finished (cloudio's
readers refuse it as incomplete: nothing is printed or plotted).
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Iterator
from typing import Any

from cloudio._paths import is_gcs, normalize, parse_gcs
from cloudio.cli._target import require_reachable_emulator
from cloudio.cli._ui import human_bytes, progress
from cloudio.errors import (
    BucketNotFoundError,
    ConfigurationError,
    IncompleteWriteError,
    InvalidURLError,
    NotARasterError,
    ObjectNotFoundError,
    ReadError,
    TransientError,
)

_MAX_PIXELS = 1024
#: a prefix listing prints at most this many objects (and counts the rest)
_MAX_LISTED = 200


HELP = "show a Zarr store as a tree, a raster's profile or a prefix's objects; --plot writes a quicklook PNG"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("url", help="gs://bucket/store.zarr, gs://bucket/image.tif, gs://bucket/prefix/ (to list it), "
                               "/vsigs/..., or a local path")
    p.add_argument("--plot", metavar="PNG", help="write a quicklook image (a 2-D slice with a colour bar)")
    p.add_argument("--var", help="Zarr: the array to plot (path inside the store; default: the first 2-D one)")
    p.add_argument("--band", type=int, help="raster: the band to plot (default 1)")


# -- opening -----------------------------------------------------------------------------------


def _check_exists_locally(url: str) -> None:
    if not is_gcs(url) and not url.startswith("/vsi") and not os.path.exists(normalize(url)):
        raise ObjectNotFoundError(f"{url!r} does not exist; give a gs:// URL or an existing local path")


_ZARR_META = ("zarr.json", ".zgroup", ".zarray")


def _has_zarr_metadata(url: str) -> bool:
    """Whether a Zarr node's metadata document sits at ``url`` (a plain existence check)."""
    if is_gcs(url):
        from cloudio._gcs.client import gcs_filesystem
        from cloudio._paths import parse_gcs

        fs = gcs_filesystem()
        base = parse_gcs(url).fs_path.rstrip("/")
        return any(fs.exists(f"{base}/{name}") for name in _ZARR_META)
    base = normalize(url)
    return any(os.path.exists(os.path.join(base, name)) for name in _ZARR_META)


def _open_zarr(url: str) -> Any | None:
    """The Zarr group or array at ``url``, or None when there is no Zarr metadata there.

    Refused as cloudio's readers refuse it (:class:`~cloudio.IncompleteWriteError`) when a write to the
    store, or to a store enclosing it, started and never finished: its tree and quicklook could mix old and
    new objects.
    """
    if url.startswith("/vsi") and not url.startswith(("/vsigs/", "/vsigs_streaming/")):
        return None
    if not _has_zarr_metadata(url):
        return None
    import zarr

    import cloudio
    from cloudio._zarr.store import check_complete, cloudio_errors

    store = cloudio.zarr_store(url, read_only=True)
    with cloudio_errors(store, writing=False, node="node", writer="cloudio.to_zarr or cloudio.save_array"):
        try:
            check_complete(store)  # the write marker, as cloudio.open_zarr and cloudio.load_array check it
        except IncompleteWriteError as e:
            detail = str(e).removeprefix(f"{store.root_url}: ")  # the reader's message names the store first
            raise IncompleteWriteError(f"{url} is an incomplete Zarr store, not shown: {detail}") from e
        return zarr.open(store=store, mode="r")  # damaged metadata: the library's own error and next step


def _object_size(url: str) -> int | None:
    """The size of the object or file at ``url``, for a message (None when it cannot be had)."""
    try:
        if is_gcs(url):
            import cloudio

            key = normalize(url)
            return int(cloudio.filesystem(key).info(key)["size"])
        return os.path.getsize(normalize(url))
    except (OSError, KeyError, TypeError, ValueError):
        return None


def _gdal_reason(e: BaseException) -> str:
    """GDAL's own first complaint, without the chain of retries cloudio's message repeats."""
    cause = e.__cause__ if isinstance(e.__cause__, Exception) else e
    return " ".join(str(cause).split(" <- ")[0].split())[:200]


def _open_raster(url: str) -> Any:
    import rasterio.errors

    import cloudio

    try:
        return cloudio.open(url)
    except ObjectNotFoundError as e:  # cloudio's own message names the URL and what it checked
        raise type(e)(f"{e} (no Zarr metadata there either)") from e
    except FileNotFoundError as e:
        raise ObjectNotFoundError(
            f"nothing at {url!r}: no Zarr metadata (zarr.json, .zgroup, .zarray) and no raster; check the URL"
        ) from e
    except TransientError:
        raise
    except (rasterio.errors.RasterioIOError, ReadError) as e:
        size = _object_size(url)
        what = f"exists ({human_bytes(size)})" if size is not None else "exists"
        raise NotARasterError(
            f"{url} {what} but is neither a Zarr store (no zarr.json, .zgroup or .zarray) nor a raster GDAL "
            f"can read (GDAL: {_gdal_reason(e)}); cloudio inspect takes a Zarr store (v2 or v3), a raster "
            "(GeoTIFF, VRT, ...) or a prefix ending in / to list"
        ) from e


# -- prefixes ----------------------------------------------------------------------------------


def _names_a_prefix(url: str) -> bool:
    """Whether ``url`` can only mean a prefix: a trailing ``/``, a bucket root, a local directory."""
    if is_gcs(url):
        return url.endswith("/") or not parse_gcs(url).key
    return not url.startswith("/vsi") and os.path.isdir(normalize(url))


def _objects_below(url: str) -> list[tuple[str, int]]:
    """(name relative to the prefix, size) of every object below ``url``, sorted by name."""
    if url.startswith("/vsi") and not is_gcs(url):
        return []
    if is_gcs(url):
        import cloudio

        path = parse_gcs(url)
        fs = cloudio.filesystem(path.url)
        base = path.fs_path
    else:
        import fsspec

        fs = fsspec.filesystem("file")
        base = normalize(url).rstrip("/")
    try:
        found = fs.find(base, detail=True)
    except FileNotFoundError:
        return []
    head = base + "/"
    return sorted((p[len(head):], int(info.get("size") or 0)) for p, info in found.items()
                  if p.startswith(head) and info.get("type") != "directory")


def prefix_listing(url: str, objects: list[tuple[str, int]]) -> str:
    """The objects below a prefix, one a line with its size, then their count and total size."""
    shown = objects[:_MAX_LISTED]
    sizes = [human_bytes(n) for _, n in shown]
    w = max(len(name) for name, _ in shown)
    sw = max(len(v) for v in sizes)
    prefix = url if url.endswith("/") else url + "/"
    lines = [f"{prefix}  (prefix)"]
    lines += [f"    {name.ljust(w)}  {v.rjust(sw)}" for (name, _), v in zip(shown, sizes, strict=True)]
    if len(objects) > len(shown):
        lines.append(f"    ... and {len(objects) - len(shown)} more")
    total = sum(n for _, n in objects)
    lines.append(f"{len(objects)} object{'s' if len(objects) != 1 else ''}, {human_bytes(total)}")
    return "\n".join(lines)


def _empty_prefix(url: str) -> ObjectNotFoundError:
    """The error for a prefix with nothing below it, naming the missing bucket when that is why."""
    if is_gcs(url):
        import cloudio

        bucket = parse_gcs(url).bucket
        if not cloudio.filesystem(url).exists(bucket):
            return BucketNotFoundError(
                f"{url}: bucket gs://{bucket} does not exist (or these credentials cannot see it); "
                "check the bucket name"
            )
    elif os.path.isdir(normalize(url)):
        return ObjectNotFoundError(f"{url} is an empty directory; nothing to inspect there")
    return ObjectNotFoundError(
        f"{url} does not exist: no object at it or below it (and no Zarr metadata); check the URL, "
        "or inspect the prefix above it to see what is there"
    )


# -- Zarr --------------------------------------------------------------------------------------


def _fmt_config(cfg: Any) -> str:
    if isinstance(cfg, dict):
        return ", ".join(f"{k}={_fmt_config(v)}" for k, v in cfg.items())
    if isinstance(cfg, (list, tuple)):
        return "x".join(str(v) for v in cfg) if all(isinstance(v, int) for v in cfg) else str(list(cfg))
    return str(getattr(cfg, "value", cfg))


def _fmt_codec(c: Any) -> str:
    if hasattr(c, "to_dict"):
        d = c.to_dict()
        name, cfg = d.get("name", type(c).__name__), dict(d.get("configuration") or {})
    elif hasattr(c, "get_config"):  # numcodecs (Zarr v2)
        cfg = dict(c.get_config())
        name = cfg.pop("id", type(c).__name__)
    else:
        return type(c).__name__
    return f"{name}({_fmt_config(cfg)})" if cfg else name


def codec_chain(arr: Any) -> str:
    """The codecs a chunk passes through, in order (inside the shard for sharded arrays)."""
    if getattr(arr.metadata, "zarr_format", 3) == 2:
        parts = [_fmt_codec(f) for f in (arr.filters or ())]
        parts += [_fmt_codec(c) for c in (arr.compressors or ())]
        return " > ".join(parts) if parts else "none"
    codecs = list(arr.metadata.codecs)
    if len(codecs) == 1 and type(codecs[0]).__name__ == "ShardingCodec":
        sh = codecs[0]
        inner = " > ".join(_fmt_codec(c) for c in sh.codecs)
        index = " > ".join(_fmt_codec(c) for c in sh.index_codecs)
        return f"{inner}  (per chunk in each shard; shard index: {index})"
    return " > ".join(_fmt_codec(c) for c in codecs)


def _shape(t: Any) -> str:
    return "(" + ", ".join(str(v) for v in t) + ")" if t is not None else "-"


def _array_lines(arr: Any) -> tuple[str, list[str], int, int]:
    stored = int(arr.nbytes_stored())
    logical = int(arr.nbytes)
    ratio = f"{logical / stored:.2f}x" if stored else "-"
    head = f"{arr.dtype}  {_shape(arr.shape)}"
    details = [f"chunks {_shape(arr.chunks)}" + (f"  shards {_shape(arr.shards)}" if arr.shards else "")
               + f"  zarr v{arr.metadata.zarr_format}"]
    details.append(f"codecs: {codec_chain(arr)}")
    details.append(f"stored {human_bytes(stored)}, logical {human_bytes(logical)}, ratio {ratio}")
    dims = getattr(arr.metadata, "dimension_names", None) or arr.attrs.get("_ARRAY_DIMENSIONS")
    if dims:
        details.append("dims: " + ", ".join(str(d) for d in dims))
    return head, details, stored, logical


def _attrs_line(node: Any) -> str | None:
    keys = [k for k in node.attrs.asdict() if not k.startswith("_ARRAY_DIMENSIONS")]
    if not keys:
        return None
    shown = ", ".join(keys[:8]) + (f", ... ({len(keys)} in all)" if len(keys) > 8 else "")
    return f"attrs: {shown}"


def _walk(node: Any, indent: str, out: list[str], totals: list[int]) -> None:
    members = sorted(node.members(), key=lambda kv: kv[0])
    for i, (name, child) in enumerate(members):
        last = i == len(members) - 1
        branch, cont = ("└── ", "    ") if last else ("├── ", "│   ")
        if hasattr(child, "shape"):
            head, details, stored, logical = _array_lines(child)
            totals[0] += stored
            totals[1] += logical
            out.append(f"{indent}{branch}{name}  {head}")
            attrs = _attrs_line(child)
            for d in details + ([attrs] if attrs else []):
                out.append(f"{indent}{cont}    {d}")
        else:
            out.append(f"{indent}{branch}{name}/  (group)")
            attrs = _attrs_line(child)
            if attrs:
                out.append(f"{indent}{cont}    {attrs}")
            _walk(child, indent + cont, out, totals)


def zarr_tree(url: str, node: Any) -> str:
    fmt = node.metadata.zarr_format
    if hasattr(node, "shape"):
        head, details, _, _ = _array_lines(node)
        return "\n".join([f"{url}  (Zarr v{fmt} array)  {head}", *("    " + d for d in details)])
    out = [f"{url}  (Zarr v{fmt} group)"]
    attrs = _attrs_line(node)
    if attrs:
        out.append(f"    {attrs}")
    totals = [0, 0]
    _walk(node, "", out, totals)
    stored, logical = totals
    ratio = f"{logical / stored:.2f}x" if stored else "-"
    out.append(f"total: stored {human_bytes(stored)} (array data and metadata), logical {human_bytes(logical)}, "
               f"ratio {ratio}")
    return "\n".join(out)


def _last_segment(url: str) -> str:
    """A root array's name: the store's own (``gs://b/t.zarr/`` -> ``t.zarr``)."""
    return url.rstrip("/").rsplit("/", 1)[-1] or url


def _arrays(node: Any, url: str, path: str = "") -> Iterator[tuple[str, Any]]:
    if hasattr(node, "shape"):
        yield path or node.basename or _last_segment(url), node
        return
    for name, child in sorted(node.members(), key=lambda kv: kv[0]):
        yield from _arrays(child, url, f"{path}/{name}" if path else name)


def _pick_array(node: Any, var: str | None, url: str) -> tuple[str, Any]:
    """The array ``--var`` names (default: the largest 2-D one); bad input names what there is."""
    arrays = list(_arrays(node, url))
    if not arrays:
        raise ConfigurationError(f"{url} holds no arrays to plot; drop --plot")
    if var is not None:
        found = [(n, a) for n, a in arrays if n == var.strip("/")]
        if not found:
            raise ConfigurationError(
                f"{url} has no array {var!r}; its arrays are: {', '.join(n for n, _ in arrays)} "
                "(pass one of them to --var)"
            )
        name, arr = found[0]
    else:
        name, arr = max(arrays, key=lambda na: (min(na[1].ndim, 2), na[1].size))
    if arr.ndim == 0:
        raise ConfigurationError(f"{url}: array {name!r} is a scalar; pick another with --var")
    return name, arr


def _check_band(ds: Any, band: int, url: str) -> None:
    if not 1 <= band <= ds.count:
        raise ConfigurationError(
            f"{url} has {ds.count} band{'s' if ds.count != 1 else ''} (1..{ds.count}); "
            f"--band {band} is not one of them"
        )


# -- rasters -----------------------------------------------------------------------------------


def raster_profile(url: str, ds: Any) -> str:
    p = ds.profile
    lines = [f"{url}  (raster, driver {ds.driver})"]
    rows = [
        ("size (width x height)",
         f"{ds.width} x {ds.height} pixels, {ds.count} band(s), {', '.join(sorted(set(ds.dtypes)))}"),
        ("crs", ds.crs.to_string() if ds.crs else "none"),
        ("transform", " ".join(f"{v:.12g}" for v in tuple(ds.transform)[:6])),
        ("resolution (x, y)", f"{ds.res[0]:.12g}, {ds.res[1]:.12g}"),
        ("bounds", "left {:.12g}, bottom {:.12g}, right {:.12g}, top {:.12g}".format(*ds.bounds)),
        ("nodata", str(ds.nodata)),
        # rasterio's block_shapes are (rows, cols): printed the other way, like the size
        ("blocks (width x height)", ", ".join(sorted({f"{w} x {h}" for h, w in ds.block_shapes}))
         + ("  (tiled)" if p.get("tiled") else "")),
        ("compression", str(ds.compression.value if ds.compression else "none")),
        ("interleave", str(ds.interleaving.value if ds.interleaving else "-")),
    ]
    for i in range(1, ds.count + 1):
        ovr = ds.overviews(i)
        desc = ds.descriptions[i - 1]
        label = f"band {i}" + (f" ({desc})" if desc else "")
        rows.append((label, f"{ds.dtypes[i - 1]}, overviews: {', '.join(map(str, ovr)) if ovr else 'none'}"))
    w = max(len(k) for k, _ in rows)
    lines += [f"    {k.ljust(w)}  {v}" for k, v in rows]
    return "\n".join(lines)


# -- plotting ----------------------------------------------------------------------------------


def _require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError as e:
        raise ConfigurationError(
            "cloudio inspect --plot needs matplotlib: pip install 'cloudio[cli]'"
        ) from e


def _check_png_folder(png: str) -> None:
    """The PNG can be written where asked, checked before any work (savefig would fail after it all)."""
    folder = os.path.dirname(os.path.abspath(png))
    if os.path.isdir(png):
        raise ConfigurationError(f"--plot {png} is a directory; give the PNG's file name (e.g. {png}/quicklook.png)")
    if not os.path.isdir(folder):
        raise ConfigurationError(f"--plot {png}: the folder {folder} does not exist; create it or write elsewhere")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigurationError(f"--plot {png}: the folder {folder} is not writable; write the PNG elsewhere")


def _save_plot(png: str, data: Any, title: str, label: str, xlabel: str = "", ylabel: str = "",
               extent: tuple[float, float, float, float] | None = None) -> None:
    """Draw ``data`` (1-D: a line; 2-D: an image with a colour bar as tall as the image) into ``png``.

    A bare Figure, not pyplot: no global figure registry, no GUI backend.
    """
    import numpy as np
    from matplotlib.figure import Figure
    from mpl_toolkits.axes_grid1 import make_axes_locatable

    fig = Figure(figsize=(7, 5.5), dpi=100)
    ax = fig.add_subplot()
    if data.ndim == 1:
        ax.plot(np.arange(data.shape[0]), data)
        ax.set_ylabel(label)
    else:
        im = ax.imshow(data, cmap="viridis", interpolation="nearest", extent=extent)
        if extent is not None:  # plain numbers, few enough to read
            ax.ticklabel_format(useOffset=False, style="plain")
            ax.locator_params(nbins=5)
        # an axes divided off the image's own follows its aspect: the bar is exactly as tall
        cax = make_axes_locatable(ax).append_axes("right", size=0.2, pad=0.1)  # inches
        fig.colorbar(im, cax=cax, label=label)
    ax.set_title(title, fontsize=10)
    if xlabel:
        ax.set_xlabel(xlabel)
    if ylabel:
        ax.set_ylabel(ylabel)
    fig.tight_layout()
    fig.savefig(png, format="png")


def _step(n: int) -> int:
    return max(1, math.ceil(n / _MAX_PIXELS))


def plot_zarr(node: Any, png: str, var: str | None, url: str) -> str:
    """Write the quicklook of one array of ``node`` to ``png``; return the array's name."""
    name, arr = _pick_array(node, var, url)
    lead = (0,) * max(arr.ndim - 2, 0)
    step = max(_step(n) for n in arr.shape[len(lead):])  # one step for both axes keeps the aspect
    tail = tuple(slice(None, None, step) for _ in arr.shape[len(lead):])
    data = arr[lead + tail]
    dims = list(getattr(arr.metadata, "dimension_names", None) or arr.attrs.get("_ARRAY_DIMENSIONS") or [])
    idx = ", ".join([*(f"{d}=0" if d else "0" for d in (dims[:len(lead)] or [""] * len(lead))),
                     *(f"::{s.step}" if s.step > 1 else ":" for s in tail)])
    title = f"{url}\n{name}[{idx}]  {arr.dtype}"
    xl = dims[-1] if dims else ""
    yl = dims[-2] if len(dims) >= 2 and arr.ndim >= 2 else ""
    # axes count the array's own indices, not the decimated picture's
    extent = (0, arr.shape[-1], arr.shape[-2], 0) if arr.ndim >= 2 else None
    _save_plot(png, data, title, f"{name} ({arr.dtype})", xl, yl, extent)
    return name


def plot_raster(ds: Any, png: str, band: int, url: str) -> None:
    _check_band(ds, band, url)
    step = max(_step(ds.width), _step(ds.height))
    shape = (max(1, ds.height // step), max(1, ds.width // step))
    data = ds.read(band, out_shape=shape, masked=True)
    title = f"{url}\nband {band}" + (f", decimated 1:{step}" if step > 1 else "") + f"  {ds.dtypes[band - 1]}"
    b = ds.bounds
    unit = f" ({ds.crs.to_string()})" if ds.crs else ""
    extent = (b.left, b.right, b.bottom, b.top) if ds.crs or not ds.transform.is_identity else None
    _save_plot(png, data, title, f"band {band} ({ds.dtypes[band - 1]})", f"x{unit}", f"y{unit}", extent)


# -- the command -------------------------------------------------------------------------------


def _list_prefix(url: str, objects: list[tuple[str, int]], args: argparse.Namespace) -> int:
    for option, given in (("--plot", args.plot), ("--band", args.band), ("--var", args.var)):
        if given is not None:
            raise ConfigurationError(
                f"{url} is a prefix holding {len(objects)} objects, not one Zarr store or raster; "
                f"give {option} the URL of one of them"
            )
    print(prefix_listing(url, objects))
    return 0


def run(args: argparse.Namespace) -> int:
    url: str = args.url
    if not url.strip():  # `cloudio inspect "$URL"` with URL unset: never list the working directory
        raise InvalidURLError("the URL is empty; give gs://bucket/key, gs://bucket/prefix/, /vsigs/... or a local path")
    normalize(url)  # a malformed URL fails here, naming itself
    _check_exists_locally(url)
    if is_gcs(url):
        require_reachable_emulator()
    if args.plot:
        _require_matplotlib()  # fail before any work when matplotlib is missing
        _check_png_folder(args.plot)  # or when the PNG cannot be written
    node = _open_zarr(url)
    if node is not None:
        if args.band is not None:
            raise ConfigurationError(f"{url} is a Zarr store; --band is for rasters (choose an array with --var)")
        if args.var is not None:
            _pick_array(node, args.var, url)  # a --var that names nothing fails before any work
        with progress(f"measuring {url}"):
            text = zarr_tree(url, node)
        print(text)
        if args.plot:
            name = plot_zarr(node, args.plot, args.var, url)
            print(f"quicklook of {name} written to {args.plot}")
        return 0
    if _names_a_prefix(url):
        objects = _objects_below(url)
        if not objects:
            raise _empty_prefix(url)
        return _list_prefix(url, objects, args)
    try:
        ds = _open_raster(url)
    except ObjectNotFoundError:
        objects = _objects_below(url)  # no object at the URL: perhaps a prefix without its '/'
        if not objects:
            raise
        return _list_prefix(url, objects, args)
    band = 1 if args.band is None else args.band
    with ds:
        if args.var is not None:
            raise ConfigurationError(
                f"{url} is a raster with {ds.count} band(s); --var is for Zarr stores (choose a band with --band)"
            )
        _check_band(ds, band, url)
        print(raster_profile(url, ds))
        if args.plot:
            plot_raster(ds, args.plot, band, url)
            print(f"quicklook of band {band} written to {args.plot}")
    return 0
