"""C7: ResNet-18 with and without batch normalization."""

from __future__ import annotations

from typing import Any

from cifarlab.lab.context import Experiment, LabContext, PlannedRuns
from cifarlab.lab.sections import REF, REFERENCE, c6_flag, pipelines_para, runs_para, short_run_note, short_runs
from cifarlab.report.blocks import Block, Para, Table, finite, fs, pct, run_named
from cifarlab.report.plots import ReportContext, curves

FP32_LABEL = "no-batchnorm-fp32"


def c7_batchnorm(ctx: LabContext) -> dict[str, Any]:
    base = ctx.fast(ctx.base)
    ctx.train("c7", "batchnorm", base)
    nobn = ctx.train("c7", "no-batchnorm", base.replace(norm="none"))
    # A run that diverged in reduced precision (bf16 on a GPU) cannot say whether the model without BatchNorm at
    # this learning rate diverges or the precision does: the same run in fp32 on the same device tells them apart.
    if nobn["status"] == "diverged" and nobn["precision"] != "fp32":
        ctx.train("c7", FP32_LABEL, base.replace(norm="none", precision="fp32"))
    return {}


def _diverged_at(run: dict[str, Any]) -> str:
    """'epoch E, step S' of a diverged run's first non-finite loss (1-based), or '' when it did not diverge."""
    for r in run["records"]:
        if r.get("status") == "diverged":
            step = r.get("diverged_step")
            return f"epoch {r['epoch']}" + (f", step {step + 1}" if step is not None else "")
    return ""


def divergence_verdict(reduced: dict[str, Any], fp32: dict[str, Any]) -> str:
    """One sentence: is the reduced-precision run's divergence the model's (fp32 diverges too) or the precision's?"""
    where, where32 = _diverged_at(reduced), _diverged_at(fp32)
    head = f"Without BatchNorm the {reduced['precision']} run diverged at {where}; the same run in fp32 on the same device "
    if where32:
        return head + f"diverged too, at {where32}: the model without BatchNorm at this learning rate diverges, not the precision."
    s = fp32["summary"]
    return head + (f"trained all {s.get('epochs_completed')} epochs (final train loss {fs(s.get('final_train_loss'), 4)}, "
                   f"train top-1 {pct(s.get('final_train_acc'))}): the divergence is the precision's, not the model's.")


def render_c7(entry: dict[str, Any], rc: ReportContext) -> list[Block]:
    bn, nobn = run_named(entry, "batchnorm"), run_named(entry, "no-batchnorm")
    rows = []
    nobn32 = run_named(entry, FP32_LABEL)
    for label, r, ref in (("with BatchNorm", bn, None), ("without BatchNorm", nobn, REFERENCE["c7_acc"]),
                          ("without BatchNorm, fp32", nobn32, None)):
        if r is None:
            continue
        s = r["summary"]
        rows.append([label, fs(s.get("mean_epoch_s"), 3), fs(s.get("final_train_loss"), 4), pct(s.get("final_train_acc")),
                     pct(s.get("final_test_acc")), c6_flag(r, rc.preset.get("chance_margin", 0.05), short_runs(rc.doc)) or "ok",
                     f"{pct(ref)} train (epoch 5)" if ref else ""])
    blocks: list[Block] = [
        *short_run_note(rc.doc),
        pipelines_para(entry, rc.doc),
        Table(["model", "mean epoch s", "final train loss", "final train top-1", "final test top-1", "flag", REF],
              rows, csv="c7_batchnorm"),
    ]
    if nobn and nobn32:
        blocks.append(Para(divergence_verdict(nobn, nobn32)))
    if bn and nobn:
        a, b = bn["summary"].get("mean_epoch_s"), nobn["summary"].get("mean_epoch_s")
        if finite(a) and finite(b) and a:
            why = ("the cost of the 20 BatchNorm layers on this machine, plus run-to-run noise (other load on the "
                   "machine shows up here too)") if b < a else (
                   "removing the 20 BatchNorm layers saved no time here, so the difference is run-to-run noise "
                   "(other load on the machine shows up here too), not a cost of BatchNorm")
            blocks.append(Para(f"Epoch time without BatchNorm: {fs(b, 3)} s vs {fs(a, 3)} s with it "
                               f"({(b - a) / a:+.1%}), one run each: {why}."))

    def draw(fig: Any) -> None:
        curves(fig, [(lab, r) for lab, r in (("BN", bn), ("no BN", nobn), ("no BN, fp32", nobn32)) if r], "C7")

    blocks += [rc.plot("c7_batchnorm", "C7 with and without BatchNorm", draw, size=(10, 4)), runs_para(entry)]
    return blocks


def plan_c7(ctx: LabContext) -> list[PlannedRuns]:
    reused = ctx.fast_base_run_before("c7")  # the BatchNorm run is C1's configuration
    notes = [f"the BatchNorm run is {reused}, reused" if reused else "",
             "one more in fp32 if the no-BatchNorm run diverges in bf16" if ctx.device.type == "cuda" else ""]
    return [PlannedRuns("fast", 1 if reused else 2, ctx.preset.epochs, note="; ".join(n for n in notes if n))]


ITEM = Experiment("c7", "C7 Without batch normalization", c7_batchnorm, render_c7, lambda p, c: p.epochs, plan=plan_c7)
