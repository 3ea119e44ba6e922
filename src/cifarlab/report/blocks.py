"""Document blocks (headings, paragraphs, notes, bullets, tables, images, code) and the small formatting
helpers every section uses (seconds, percentages, counts, run lookups in results.json)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


@dataclass
class Heading:
    text: str
    level: int = 2


@dataclass
class Para:
    text: str


@dataclass
class Note:
    text: str  # a call-out (blockquote): banners, skips, warnings


@dataclass
class Bullets:
    items: list[str]


@dataclass
class Table:
    columns: list[str]
    rows: list[list[Any]]
    csv: str | None = None  # written as csv/<name>.csv


@dataclass
class Image:
    file: str  # relative to the lab folder
    alt: str


@dataclass
class Code:
    text: str


Block = Heading | Para | Note | Bullets | Table | Image | Code


def finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def fs(x: Any, digits: int = 2) -> str:
    """Seconds (or any float) or 'n/a'."""
    return f"{x:.{digits}f}" if finite(x) else "n/a"


def pct(x: Any) -> str:
    return f"{100 * x:.1f}%" if finite(x) else "n/a"


def num(x: Any) -> str:
    return f"{x:,}" if isinstance(x, int) else "n/a"


def runs_of(entry: dict[str, Any]) -> list[dict[str, Any]]:
    return entry.get("runs", [])


def run_named(entry: dict[str, Any], label: str) -> dict[str, Any] | None:
    return next((r for r in runs_of(entry) if r["label"] == label), None)


def ok_records(run: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for r in run.get("records", []) if r.get("status") == "ok"]


def mean(values: list[Any]) -> float | None:
    vals = [v for v in values if finite(v)]
    return sum(vals) / len(vals) if vals else None
