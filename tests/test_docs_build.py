"""The documentation site builds strictly, and its API reference covers every public name.

``docs/api.md`` is generated from the docstrings by mkdocstrings (see
``mkdocs.yml``); this test is how the docs build runs in CI. ``--strict``
turns every warning into a failure: a broken relative link or anchor, a
reference to a public name that is not rendered, a docstring griffe cannot
parse.
"""

from __future__ import annotations

import html
import re
import subprocess
import sys
from pathlib import Path

import pytest

import cloudio

ROOT = Path(__file__).resolve().parents[1]

#: documented outside ``cloudio.__all__``: submodules a user imports by name
_EXTRA = ["cloudio.dask.install", "cloudio.flyte", "cloudio.flyte.register", "cloudio.emulator.Request"]


@pytest.fixture(scope="module")
def api_page(tmp_path_factory: pytest.TempPathFactory) -> str:
    site = tmp_path_factory.mktemp("site")
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(site)],
        cwd=ROOT, capture_output=True, text=True, timeout=240, check=False,
    )
    assert proc.returncode == 0, (
        f"`mkdocs build --strict` failed (run it in {ROOT} to see every warning):\n"
        f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    )
    return (site / "api" / "index.html").read_text()


def test_api_page_renders_every_public_name(api_page: str) -> None:
    anchors = set(re.findall(r'id="([\w.]+)"', api_page))
    wanted = [f"cloudio.{name}" for name in cloudio.__all__] + _EXTRA
    missing = [name for name in wanted if name not in anchors]
    assert not missing, f"docs/api.md renders no entry for {missing}: add a `::: <name>` line for each"


def test_api_page_has_no_raw_markup(api_page: str) -> None:
    """Sphinx roles in docstrings become links or code, never literal ``:func:`` text."""
    text = html.unescape(re.sub(r"<[^>]+>", "", api_page))
    assert not re.search(r":(func|class|meth|attr|mod|exc|data|obj):`", text)
    assert 'href="#cloudio.invalidate"' in api_page  # a role naming a public function is a link


def test_grouped_parameters_keep_one_row(api_page: str) -> None:
    """``mode, driver, ...`` in cloudio.open's docstring is one row, not twelve rows typed like ``mode``."""
    text = html.unescape(re.sub(r"<[^>]+>", "", api_page))
    assert "mode, driver, width, height, count" in text
    assert text.count("As for rasterio.open") == 1
