"""The front door and the docs: the README stays short and keeps the two commands (the test command being
exactly what CI runs), every relative link in the README and docs/ reaches a file (and a heading, where it
names one), and every docs page is listed in both indexes."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _anchor(heading: str) -> str:
    text = re.sub(r"[^\w\s-]", "", heading.strip().lower())
    return re.sub(r"\s", "-", text)


def _anchors(page: Path) -> set[str]:
    return {_anchor(line.lstrip("#")) for line in page.read_text().splitlines() if re.match(r"#{1,6} ", line)}


def test_readme_is_a_short_front_door_with_the_two_commands() -> None:
    readme = (ROOT / "README.md").read_text()
    assert readme.count("\n") <= 200
    assert "python3 -m venv .venv && .venv/bin/pip install -e . && .venv/bin/cifarlab lab" in readme
    ci = (ROOT / ".ci" / "run").read_text()
    ci_command = re.search(r"python3 -m venv \.venv && .*pytest -q", ci)
    assert ci_command is not None and ci_command.group(0) in readme


def test_every_relative_link_reaches_a_file_and_heading() -> None:
    broken = []
    for page in [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]:
        for target in LINK.findall(page.read_text()):
            if target.startswith(("http://", "https://", "mailto:")):
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


def test_every_docs_page_is_in_both_indexes() -> None:
    pages = {p.name for p in DOCS.glob("*.md")} - {"index.md"}
    index = set(LINK.findall((DOCS / "index.md").read_text()))
    readme = {t.removeprefix("docs/") for t in LINK.findall((ROOT / "README.md").read_text())}
    assert pages <= index, pages - index
    assert pages <= readme, pages - readme


def test_the_docs_site_builds_strictly(tmp_path: Path) -> None:
    """mkdocs (material theme) builds docs/ with --strict: a broken link, a missing page or an unknown anchor fails."""
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=ROOT, capture_output=True, text=True, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert (tmp_path / "site" / "gpu" / "index.html").is_file()


def test_the_quickstart_notebook_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """examples/notebook/quickstart.ipynb trains the smoke configuration through the Python API, plots its curves and
    inspects the model, executed as a notebook (nbclient, a real kernel) on the CPU."""
    nb = nbformat.read(str(ROOT / "examples" / "notebook" / "quickstart.ipynb"), as_version=4)
    # the kernel is a child process: it must import this checkout's cifarlab
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(ROOT / "src"), os.environ.get("PYTHONPATH", "")) if p))
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    text = "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []))
    assert "completed" in text and "Q1 conv layers: 20" in text and "Q3 parameters: 11,173,962" in text
