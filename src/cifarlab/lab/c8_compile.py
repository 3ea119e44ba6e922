"""C8: torch.compile modes against eager, first epoch (compilation) vs steady epochs."""

from __future__ import annotations

from typing import Any

from cifarlab.config import COMPILE_MODES
from cifarlab.lab.context import Experiment, LabContext, LabInterrupted, PlannedRuns
from cifarlab.lab.sections import REF, REFERENCE, pipelines_para, runs_para
from cifarlab.report.blocks import Block, Note, Para, Table, finite, fs, mean, ok_records, run_named, runs_of
from cifarlab.report.plots import ReportContext


def c8_compile(ctx: LabContext) -> dict[str, Any]:
    p = ctx.preset
    if ctx.device.type == "cpu" and not p.compile_on_cpu:
        return {"skipped": (f"torch.compile not measured: on a CPU-only machine compiling ResNet-18 takes minutes "
                            f"per mode, beyond the {p.name} preset's time budget (the full preset runs it)")}
    base = ctx.fast(ctx.base).replace(epochs=p.compile_epochs, evaluate=False)
    failures: dict[str, str] = {}
    for mode in COMPILE_MODES:
        label = "eager" if mode == "none" else f"compile-{mode}"
        try:
            ctx.train("c8", label, base.replace(compile=mode), reuse=False)
        except LabInterrupted:
            raise
        except Exception as e:  # a backend that cannot compile here is a finding, not a crash
            failures[mode] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"
    return {"failures": failures, "epochs": p.compile_epochs}


def render_c8(entry: dict[str, Any], rc: ReportContext) -> list[Block]:
    res = entry.get("result", {})
    if res.get("skipped"):
        return [Note(f"Skipped: {res['skipped']}."), Para(f"{REF}: {REFERENCE['c8']}.")]
    runs = runs_of(entry)
    eager = run_named(entry, "eager")
    n = res.get("epochs", 0)
    first_steady = n // 2 + 1  # the lab: epochs 6-10 of 10

    def steady(r: dict[str, Any]) -> float | None:
        return mean([x["epoch_s"] for x in ok_records(r) if x["epoch"] >= first_steady])

    base = steady(eager) if eager else None
    rows = []
    for r in runs:
        recs = ok_records(r)
        st = steady(r)
        rows.append([r["label"], fs(recs[0]["epoch_s"], 3) if recs else "n/a", fs(st, 3),
                     f"{base / st:.2f}x" if finite(base) and finite(st) and st else "n/a", r["status"]])
    for mode, err in res.get("failures", {}).items():
        rows.append([f"compile-{mode}", "n/a", "n/a", "n/a", f"failed: {err}"])
    blocks: list[Block] = [
        pipelines_para(entry, rc.doc),
        Table(["mode", "first epoch s (incl. compilation)", f"steady s/epoch (epochs {first_steady}-{n})",
               "steady speed-up vs eager", "status"], rows, csv="c8_compile"),
        Para(f"{REF}: {REFERENCE['c8']}. The first epoch pays tracing and code generation (and, for "
             f"reduce-overhead, CUDA-graph capture); steady epochs run the fused kernels."),
    ]
    if res.get("failures"):
        blocks.append(Note("Compile failed for: " + "; ".join(f"{m} ({e})" for m, e in res["failures"].items())))

    def draw(fig: Any) -> None:
        ax = fig.subplots()
        labels = [r["label"] for r in runs]
        firsts = [ok_records(r)[0]["epoch_s"] if ok_records(r) else 0.0 for r in runs]
        steadies = [steady(r) or 0.0 for r in runs]
        xs = range(len(labels))
        ax.bar([x - 0.2 for x in xs], firsts, width=0.4, label="first epoch")
        ax.bar([x + 0.2 for x in xs], steadies, width=0.4, label="steady epoch")
        ax.set_xticks(list(xs), labels, fontsize=7)
        ax.set(ylabel="seconds", title="C8 torch.compile")
        ax.legend(fontsize=7)

    if runs:
        blocks.append(rc.plot("c8_compile", "C8 first vs steady epoch per compile mode", draw, size=(6, 3.6)))
    blocks.append(runs_para(entry))
    return blocks


def plan_c8(ctx: LabContext) -> list[PlannedRuns]:
    if ctx.device.type == "cpu" and not ctx.preset.compile_on_cpu:
        return []
    return [PlannedRuns("fast", 4, ctx.preset.compile_epochs, evaluate=False, note="compilation not included")]


ITEM = Experiment("c8", "C8 torch.compile", c8_compile, render_c8,
                  lambda p, cuda: 4 * p.compile_epochs if (cuda or p.compile_on_cpu) else 0, plan=plan_c8)
