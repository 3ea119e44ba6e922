"""C1: train ResNet-18 as the lab sets it up (fast path) and report per-epoch loss and top-1. The run keeps
a checkpoint of its last epoch only: E exports that trained model."""

from __future__ import annotations

from typing import Any

from cifarlab.lab.context import Experiment, LabContext, PlannedRuns, c1_config
from cifarlab.lab.mfu import has_mfu, mfu_cell, peaks_para, tflops_cell
from cifarlab.lab.sections import REF, REFERENCE, pipelines_para, runs_para, short_run_note
from cifarlab.report.blocks import Block, Table, finite, fs, ok_records, pct, runs_of
from cifarlab.report.plots import ReportContext, curves


def c1_training(ctx: LabContext) -> dict[str, Any]:
    ctx.train("c1", "sgd", c1_config(ctx))
    return {}


def render_c1(entry: dict[str, Any], rc: ReportContext) -> list[Block]:
    run = runs_of(entry)[0]
    recs = ok_records(run)
    rows = [[r["epoch"], fs(r["train_loss"], 4), pct(r["train_acc"]), fs(r.get("test_loss"), 4), pct(r.get("test_acc")),
             fs(r["epoch_s"]), fs(r.get("eval_s")), f"{r['images_per_s']:.1f}" if finite(r.get("images_per_s")) else "n/a"]
            for r in recs]
    utilization = has_mfu([run])  # lab folders from before runs recorded it: the table as it was
    if utilization:
        rows = [[*row, tflops_cell(r.get("tflops")), mfu_cell(r.get("mfu"))] for row, r in zip(rows, recs)]
    s = run["summary"]
    n = s.get("epochs_completed", 0)
    # the reference loss is at epoch 5 like its top-1 (labs from before run_size was stored: as they were)
    ref_loss = fs(REFERENCE["c1_train_loss"], 3) + (" (epoch 5)" if "run_size" in rc.doc else "")
    return [
        *short_run_note(rc.doc),
        pipelines_para(entry, rc.doc),
        Table(["epoch", "train loss", "train top-1", "test loss", "test top-1", "epoch s", "eval s (separate)",
               "images/s", *(["TFLOP/s", "MFU"] if utilization else [])], rows, csv="c1_epochs"),
        *(peaks_para([run]) if utilization else []),
        Table(["metric", "ours", REF],
              [[f"train top-1 after epoch {n}", pct(s.get("final_train_acc")), f"{pct(REFERENCE['c1_train_acc'])} (epoch 5)"],
               [f"train loss after epoch {n}", fs(s.get("final_train_loss"), 3), ref_loss],
               [f"test top-1 after epoch {n}", pct(s.get("final_test_acc")), "not given"]], csv="c1_summary"),
        rc.plot("c1_curves", "C1 loss and top-1 per epoch", lambda fig: curves(fig, [("SGD", run)], "C1")),
        runs_para(entry),
    ]


ITEM = Experiment("c1", "C1 Training: per-epoch loss and top-1", c1_training, render_c1,
                  plan=lambda ctx: [PlannedRuns("fast", 1, ctx.preset.epochs)])
