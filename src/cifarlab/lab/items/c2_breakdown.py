"""C2: where an epoch's time goes on the classic pipeline (data wait, copy, compute, other)."""

from __future__ import annotations

from typing import Any

from cifarlab.lab.context import Experiment, LabContext, PlannedRuns
from cifarlab.lab.sections import REF, REFERENCE, pipelines_para, runs_para
from cifarlab.report.blocks import Block, Bullets, Para, Table, finite, fs, mean, ok_records, runs_of
from cifarlab.report.plots import ReportContext, stacked


def c2_breakdown(ctx: LabContext) -> dict[str, Any]:
    ctx.train("c2", f"classic-w{ctx.base.workers}", ctx.classic(ctx.base))
    return {}


def render_c2(entry: dict[str, Any], rc: ReportContext) -> list[Block]:
    run = runs_of(entry)[0]
    recs = ok_records(run)
    keys = ("data_s", "h2d_s", "compute_s", "other_s")
    rows, gaps = [], []
    for r in recs:
        parts = [r.get(k) for k in keys]
        total = sum(p for p in parts if finite(p))
        gaps.append(abs(total - r["epoch_s"]))
        rows.append([r["epoch"], *(fs(p, 3) for p in parts), fs(r["epoch_s"], 3), fs(total, 3), fs(r.get("eval_s"), 3)])
    means = [mean([r.get(k) for r in recs]) for k in keys]
    rows.append(["mean", *(fs(m, 3) for m in means), fs(mean([r["epoch_s"] for r in recs]), 3), "", ""])
    notes = rc.doc.get("timing_notes", {})
    return [
        pipelines_para(entry, rc.doc),
        Table(["epoch", "data wait s", "h2d copy s", "compute s", "other s", "epoch s", "sum of parts s",
               "eval s (not in epoch)"], rows, csv="c2_breakdown"),
        Para(f"The four parts add up to the epoch time by construction (largest gap over {len(recs)} epoch(s): "
             f"{max(gaps, default=0.0):.2e} s). {REF}: {REFERENCE['c2']}; an unsynchronized clock measures only "
             f"the time to enqueue GPU work, which is why that 'training' figure is tiny."),
        Bullets([f"**{k}**: {v}" for k, v in notes.items()]),
        rc.plot("c2_breakdown", "C2 per-epoch time split", lambda fig: stacked(
            fig.subplots(), [f"epoch {r['epoch']}" for r in recs],
            {k.removesuffix("_s"): [r.get(k) for r in recs] for k in keys}, "C2 per-epoch time split"),
            size=(6, 3.6)),
        runs_para(entry),
    ]


ITEM = Experiment("c2", "C2 Where an epoch's time goes", c2_breakdown, render_c2,
                  plan=lambda ctx: [PlannedRuns("classic", 1, ctx.preset.epochs)])
