"""C6: the five optimizers (SGD, SGD-nesterov, Adagrad, Adadelta, Adam) from the same start."""

from __future__ import annotations

from typing import Any

from cifarlab.lab.context import Experiment, LabContext, PlannedRuns
from cifarlab.lab.sections import REF, REFERENCE, c6_flag, pipelines_para, runs_para, short_run_note, short_runs
from cifarlab.model.optim import OPTIMIZERS
from cifarlab.report.blocks import Block, Note, Para, Table, fs, pct, runs_of
from cifarlab.report.plots import ReportContext, curves


def c6_optimizers(ctx: LabContext) -> dict[str, Any]:

    for name in OPTIMIZERS:  # a diverged run comes back with status "diverged"; the lab moves on
        ctx.train("c6", name, ctx.fast(ctx.base).replace(optimizer=name))
    return {"chance_margin": ctx.preset.chance_margin}




def render_c6(entry: dict[str, Any], rc: ReportContext) -> list[Block]:
    margin = entry.get("result", {}).get("chance_margin", rc.preset.get("chance_margin", 0.05))
    rows, flagged = [], []
    for r in runs_of(entry):
        s = r["summary"]
        flag = c6_flag(r, margin, short_runs(rc.doc))
        if flag:
            flagged.append(r["label"])
        ref = REFERENCE["c6_acc"].get(r["label"])
        rows.append([r["label"], fs(s.get("mean_epoch_s"), 3), fs(s.get("final_train_loss"), 4), pct(s.get("final_train_acc")),
                     pct(s.get("final_test_acc")), flag or "ok", f"{pct(ref)} (epoch 5)" if ref is not None else ""])
    blocks: list[Block] = [
        *short_run_note(rc.doc),
        pipelines_para(entry, rc.doc),
        Para("All five with lr 0.1 and weight decay 5e-4; momentum 0.9 for SGD and SGD-nesterov (the others "
             "take none). 'Final' is the last finished epoch."),
        Table(["optimizer", "mean epoch s", "final train loss", "final train top-1", "final test top-1", "flag", REF],
              rows, csv="c6_optimizers"),
    ]
    if flagged:
        blocks.append(Note(f"Flagged: {', '.join(flagged)}. A NaN/inf loss stops that run and marks it diverged; "
                           f"'stuck at chance' means the final train top-1 stayed below chance + "
                           f"{margin:.0%}. At lr 0.1 Adam stuck near 25-30% is the expected finding, not a bug; "
                           f"in the short presets most runs are too short to leave chance."))
    blocks += [
        rc.plot("c6_optimizers", "C6 loss and top-1 per optimizer",
                lambda fig: curves(fig, [(r["label"], r) for r in runs_of(entry)], "C6"), size=(10, 4)),
        runs_para(entry),
    ]
    return blocks


def plan_c6(ctx: LabContext) -> list[PlannedRuns]:
    reused = ctx.fast_base_run_before("c6")  # the SGD run is C1's configuration
    n = len(OPTIMIZERS) - (1 if reused else 0)
    return [PlannedRuns("fast", n, ctx.preset.epochs, note=f"SGD is {reused}, reused" if reused else "")]


ITEM = Experiment("c6", "C6 Optimizers", c6_optimizers, render_c6, lambda p, c: 4 * p.epochs, plan=plan_c6)
