"""Blocks -> the report's files in a folder: report.md, report.html and one CSV per table that names
one (csv/<name>.csv). Plots are already in plots/ (ReportContext.plot wrote them)."""

from __future__ import annotations

from pathlib import Path

from cifarlab.core.fileio import write_csv_atomic, write_text_atomic
from cifarlab.report.blocks import Block, Table
from cifarlab.report.html import to_html
from cifarlab.report.markdown import plain, to_markdown


def write_report(folder: Path, blocks: list[Block]) -> dict[str, Path]:
    """Write the report files atomically; returns {"md": path, "html": path}."""
    folder = Path(folder)
    (folder / "csv").mkdir(exist_ok=True)
    for b in blocks:
        if isinstance(b, Table) and b.csv:
            write_csv_atomic(folder / "csv" / f"{b.csv}.csv",
                             [dict(zip(b.columns, (plain(c) for c in row))) for row in b.rows])
    write_text_atomic(folder / "report.md", to_markdown(blocks))
    write_text_atomic(folder / "report.html", to_html(blocks, folder))
    return {"md": folder / "report.md", "html": folder / "report.html"}
