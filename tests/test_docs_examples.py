"""Every ``python`` block in ``docs/*.md`` runs (the convention is in docs/index.md).

Per page: a fresh emulator with every bucket the page's blocks name
(``gs://<bucket>/``), ``STORAGE_EMULATOR_HOST`` pointing at it, and one new
Python process running the page's script blocks in order in one namespace.
Tracebacks name the Markdown file and line. Blocks starting with
``# file: test_<name>.py`` are pytest files, run with ``python -m pytest``;
blocks starting with ``# not run:`` are skipped.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from cloudio.emulator import Emulator

DOCS = Path(__file__).resolve().parents[1] / "docs"
_FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)
_FILE = re.compile(r"#\s*file:\s*(test_\w+\.py)\s*$")
_BUCKET = re.compile(r"gs://([a-z0-9][a-z0-9._-]{1,61}[a-z0-9])(?=/|\"|'|$)")
_TIMEOUT = 300


@dataclass(frozen=True)
class Block:
    page: Path
    line: int  # 1-based line of the block's first code line in the page
    code: str

    @property
    def first_line(self) -> str:
        return self.code.split("\n", 1)[0].strip()

    @property
    def skipped(self) -> bool:
        return self.first_line.lower().startswith("# not run:")

    @property
    def test_file(self) -> str | None:
        m = _FILE.fullmatch(self.first_line)
        return m.group(1) if m else None


def blocks(page: Path) -> list[Block]:
    text = page.read_text()
    return [
        Block(page, text.count("\n", 0, m.start(1)) + 1, m.group(1))
        for m in _FENCE.finditer(text)
    ]


def _pages() -> list[Path]:
    """Every docs page, and the README (its example runs too)."""
    return [*sorted(DOCS.glob("*.md")), DOCS.parent / "README.md"]


def _child_env(emulator_url: str) -> dict[str, str]:
    env = dict(os.environ)
    for key in ("CLOUDIO_EMULATOR", "PYTEST_ADDOPTS"):
        env.pop(key, None)
    env["STORAGE_EMULATOR_HOST"] = emulator_url
    env["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"
    if env.get("PYTHONPATH"):  # a relative PYTHONPATH (PYTHONPATH=src) must survive the cwd change
        env["PYTHONPATH"] = os.pathsep.join(os.path.abspath(p) for p in env["PYTHONPATH"].split(os.pathsep) if p)
    return env


_DRIVER = '''
import sys
namespace = {"__name__": "__main__"}
for path, line, code_file in BLOCKS:
    code = open(code_file).read()
    # pad so that tracebacks show the Markdown file's own line numbers
    exec(compile("\\n" * (line - 1) + code, path, "exec"), namespace)
'''


def test_docs_have_runnable_examples() -> None:
    runnable = [b for p in _pages() for b in blocks(p) if not b.skipped]
    assert any(b.page.name == "emulator.md" for b in runnable)
    assert any(b.test_file for b in runnable)


def test_index_links_every_page_and_links_resolve() -> None:
    index = (DOCS / "index.md").read_text()
    linked = set(re.findall(r"\]\(([\w-]+\.md)\)", index))
    pages = {p.name for p in _pages() if p.parent == DOCS} - {"index.md"}
    assert pages <= linked, f"docs/index.md's page list lacks {sorted(pages - linked)}: add a line for each"
    for page in _pages():
        for target in re.findall(r"\]\(([\w./-]+\.md)(?:#[\w-]*)?\)", page.read_text()):
            assert (page.parent / target).exists(), f"{page.name} links to missing {target}"


def test_block_parser_finds_lines_and_kinds(tmp_path: Path) -> None:
    page = tmp_path / "p.md"
    page.write_text(
        "# t\n\n```python\nx = 1\n```\n\ntext\n\n```python\n# file: test_a.py\ndef test(): pass\n```\n"
        "```python\n# not run: signature\nf(x)\n```\n```bash\necho no\n```\n"
    )
    got = blocks(page)
    assert [(b.line, b.skipped, b.test_file) for b in got] == [
        (4, False, None), (10, False, "test_a.py"), (14, True, None)
    ]
    assert got[0].code == "x = 1\n"


def _pages_with_examples() -> list[Path]:
    """Pages with a block to run (api.md is generated from the docstrings and has none)."""
    return [p for p in _pages() if any(not b.skipped for b in blocks(p))]


@pytest.mark.parametrize("page", _pages_with_examples(), ids=lambda p: p.name)
def test_page_examples_run(page: Path, tmp_path: Path) -> None:
    page_blocks = [b for b in blocks(page) if not b.skipped]
    scripts = [b for b in page_blocks if b.test_file is None]
    test_files = [b for b in page_blocks if b.test_file is not None]
    buckets = sorted({m.group(1) for b in page_blocks for m in _BUCKET.finditer(b.code)})

    with Emulator(mode="binary") as emu:
        for name in buckets:
            emu.create_bucket(name)
        env = _child_env(emu.url)

        if scripts:
            entries = []
            for i, b in enumerate(scripts):
                code_file = tmp_path / f"block{i}.py"
                code_file.write_text(b.code)
                entries.append((str(b.page), b.line, str(code_file)))
            driver = tmp_path / "run_page.py"
            driver.write_text(f"BLOCKS = {entries!r}\n" + _DRIVER)
            proc = subprocess.run(
                [sys.executable, str(driver)], cwd=tmp_path, env=env,
                capture_output=True, text=True, timeout=_TIMEOUT,
            )
            assert proc.returncode == 0, (
                f"an example in {page.name} failed (see the traceback's {page.name} line; "
                f"mark fragments '# not run: why'):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
            )

        if test_files:
            folder = tmp_path / "pytest-files"
            folder.mkdir()
            for b in test_files:
                assert b.test_file is not None
                target = folder / b.test_file
                assert not target.exists(), f"{page.name}: two blocks named {b.test_file}"
                target.write_text(b.code)
            proc = subprocess.run(
                [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                 *sorted(b.test_file for b in test_files)],
                cwd=folder, env=env, capture_output=True, text=True, timeout=_TIMEOUT,
            )
            assert proc.returncode == 0, (
                f"a pytest example in {page.name} failed:\n{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}"
            )
