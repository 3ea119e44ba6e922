"""Plot helpers: `ReportContext.plot` draws a figure into plots/<name>.png (matplotlib's Agg backend, no
display needed; matplotlib is imported inside the drawing functions on purpose, so commands that
never plot do not pay for it), plus the two shapes the lab draws: per-epoch curves and stacked bars."""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from cifarlab.core.fileio import write_bytes_atomic
from cifarlab.report.blocks import Image, finite, ok_records


def pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend (files only, no display): the one plotting setup the report,
    the doctor's chart and infer-bench's chart share. Imported on first use on purpose: it costs about a
    second and commands that never plot do not pay for it."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    return plt


@dataclass
class ReportContext:
    lab_dir: Path
    doc: dict[str, Any]
    plots: list[str] = field(default_factory=list)

    @property
    def preset(self) -> dict[str, Any]:
        return self.doc.get("preset", {})

    def plot(self, name: str, alt: str, draw: Callable[[Any], None], size: tuple[float, float] = (8, 3.6)) -> Image:
        """Draw into a new figure with draw(fig) and save plots/<name>.png."""
        plt = pyplot()
        fig = plt.figure(figsize=size, dpi=100)
        try:
            draw(fig)
            fig.tight_layout()
            buf = io.BytesIO()
            fig.savefig(buf, format="png", metadata={"Software": None})
        finally:
            plt.close(fig)
        (self.lab_dir / "plots").mkdir(exist_ok=True)
        write_bytes_atomic(self.lab_dir / "plots" / f"{name}.png", buf.getvalue())
        self.plots.append(f"plots/{name}.png")
        return Image(f"plots/{name}.png", alt)


def curves(fig: Any, runs: list[tuple[str, dict[str, Any]]], title: str = "") -> None:
    ax_loss, ax_acc = fig.subplots(1, 2)
    for label, run in runs:
        recs = ok_records(run) or [r for r in run.get("records", [])]
        ep = [r["epoch"] for r in recs]
        loss = [r["train_loss"] if finite(r.get("train_loss")) else float("nan") for r in recs]
        ax_loss.plot(ep, loss, marker="o", label=label)
        line = ax_acc.plot(ep, [100 * (r.get("train_acc") or float("nan")) for r in recs], marker="o",
                           label=f"{label} train")[0]
        test = [100 * r["test_acc"] if finite(r.get("test_acc")) else float("nan") for r in recs]
        if any(math.isfinite(t) for t in test):
            ax_acc.plot(ep, test, marker="x", linestyle="--", color=line.get_color(), label=f"{label} test")
    ax_loss.set(xlabel="epoch", ylabel="train loss", title=f"{title} loss".strip())
    ax_acc.set(xlabel="epoch", ylabel="top-1 (%)", title=f"{title} top-1".strip())
    ax_acc.axhline(10, color="grey", linewidth=0.8, linestyle=":")
    from matplotlib.ticker import MaxNLocator

    for ax in (ax_loss, ax_acc):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)


def stacked(ax: Any, labels: list[str], parts: dict[str, list[float]], title: str = "") -> None:
    ax.set_title(title)
    bottom = [0.0] * len(labels)
    for name, values in parts.items():
        vals = [v if finite(v) else 0.0 for v in values]
        ax.bar(labels, vals, bottom=bottom, label=name)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set_ylabel("seconds")
    ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3)
