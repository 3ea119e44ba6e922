"""C8: torch.compile modes against eager: the one-time cost (setup before epoch 1 + what epoch 1 pays beyond a
steady epoch: compilation, autotuning, capture) reported apart from the steady epochs, and whether inductor's
on-disk cache was cold or warm before each compiled run."""

from __future__ import annotations

import os
from typing import Any

import torch

from cifarlab.config import COMPILE_MODES
from cifarlab.core.runtime import cache_state, inductor_cache_dir
from cifarlab.lab.context import Experiment, LabContext, LabInterrupted, PlannedRuns, save_traceback
from cifarlab.lab.mfu import has_mfu, mean_of, mfu_cell, peaks_para
from cifarlab.lab.sections import REF, REFERENCE, pipelines_para, runs_para
from cifarlab.report.blocks import Block, Note, Para, Table, finite, fs, mean, ok_records, run_named, runs_of
from cifarlab.report.plots import ReportContext


def cache_label(state: dict[str, Any] | None) -> str:
    """'cold' / 'warm (cache had N entries)' for the report (eager runs: '-')."""
    if not state:
        return "-"
    before = state.get("entries_before", 0)
    label = "cold" if not before else f"warm (cache had {before:,} entries)"
    if state.get("entries_after") is not None:
        label += f"; +{max(0, state['entries_after'] - before):,} written"
    return label


def c8_compile(ctx: LabContext) -> dict[str, Any]:
    p = ctx.preset
    if ctx.device.type == "cpu" and not p.compile_on_cpu:
        return {"skipped": (f"torch.compile not measured: on a CPU-only machine compiling ResNet-18 takes minutes "
                            f"per mode, beyond the {p.name} preset's time budget (the full preset runs it)")}
    if not any(m != "none" for m in p.compile_modes):
        return {"skipped": "torch.compile not measured: the --budget left no time for any compile mode"}
    base = ctx.fast(ctx.base).replace(epochs=p.compile_epochs, evaluate=False)
    cache_dir, cache_source = inductor_cache_dir()
    fx_cache_off = os.environ.get("TORCHINDUCTOR_FX_GRAPH_CACHE") == "0"
    failures: dict[str, str] = {}
    tracebacks: dict[str, str] = {}  # mode -> traceback file, relative to the lab folder
    cache: dict[str, dict[str, Any]] = {}
    for mode in p.compile_modes:
        label = "eager" if mode == "none" else f"compile-{mode}"
        if mode != "none":
            # Each mode compiles as a fresh process would (the on-disk caches aside): no frame cache, recompile
            # count or CUDA graph tree (with its memory pool) left in this process by the mode before it.
            torch.compiler.reset()
            before = cache_state(cache_dir)
            cache[mode] = {"entries_before": before["entries"], "existed": before["exists"]}
        try:
            ctx.train("c8", label, base.replace(compile=mode), reuse=False)
        except LabInterrupted:
            raise
        except Exception as e:  # a backend that cannot compile here is a finding, not a crash
            if ctx.should_stop():  # ... unless the stop signal broke the compile (its workers died of it)
                raise LabInterrupted(f"c8/{label}: {type(e).__name__} after the stop signal") from e
            failures[mode] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"
            if file := save_traceback(ctx.lab_dir, "c8", f"{label}.traceback.txt", e):
                tracebacks[mode] = file
            ctx.note(f"{label}: FAILED, {failures[mode]} (traceback: {file}; the report lists it; the next mode goes on)")
        finally:
            if mode in cache:
                cache[mode]["entries_after"] = cache_state(cache_dir)["entries"]
                cache[mode]["state"] = "warm" if cache[mode]["entries_before"] else "cold"
    not_run = {m: "cut by --budget" for m in COMPILE_MODES if m not in p.compile_modes}
    return {"failures": failures, **({"tracebacks": tracebacks} if tracebacks else {}),
            "epochs": p.compile_epochs, "steady_from": p.compile_epochs // 2 + 1,
            **({"not_run": not_run} if not_run else {}), "cache": cache, "cache_dir": cache_dir,
            "cache_dir_source": cache_source, "fx_graph_cache": not fx_cache_off}


def steady_stats(run: dict[str, Any], first_steady: int) -> dict[str, Any]:
    """Epoch 1, setup, the steady window's mean and min-max, and the one-time cost of one C8 run."""
    recs = ok_records(run)
    st = [x["epoch_s"] for x in recs if x["epoch"] >= first_steady and finite(x.get("epoch_s"))]
    first = recs[0]["epoch_s"] if recs else None
    setup = recs[0].get("setup_s") if recs else None
    steady = mean(st)
    once = ((setup or 0.0) + first - steady) if finite(first) and finite(steady) else None
    return {"first": first, "setup": setup, "steady": steady, "min": min(st, default=None), "max": max(st, default=None),
            "once": once, "step": (run.get("summary") or {}).get("step_mode") or (recs[0].get("step_mode") if recs else None)}


def _speedup(base: float | None, st: float | None) -> str:
    return f"{base / st:.2f}x" if finite(base) and finite(st) and st else "n/a"


def _cache_blocks(res: dict[str, Any]) -> list[Block]:
    fx = "" if res.get("fx_graph_cache", True) else " (the FX graph cache was off: TORCHINDUCTOR_FX_GRAPH_CACHE=0)"
    return [Para(
        f"Compilation cache: inductor's on-disk caches (FX graph and AOTAutograd artifacts, Triton kernels, "
        f"autotuning results) live in `{res['cache_dir']}` ({res.get('cache_dir_source', '?')}){fx}. Before each "
        f"compiled run the lab counted the files below it: **cold** = none, **warm (cache had N entries)** = N files "
        f"from earlier labs or runs, or from this lab's earlier modes (so warm says the cache was populated, not that "
        f"this mode's graphs were in it); '+M written' = files the run added (a compile from scratch writes many, a "
        f"cache hit few). A second lab on the same machine finds it warm and its one-time cost shrinks.")]


def render_c8(entry: dict[str, Any], rc: ReportContext) -> list[Block]:
    res = entry.get("result", {})
    if res.get("skipped"):
        return [Note(f"Skipped: {res['skipped']}."), Para(f"{REF}: {REFERENCE['c8']}.")]
    if "cache" not in res:  # lab folders written before setup_s and the cache state were recorded
        return _render_c8_v1(entry, rc)
    runs = runs_of(entry)
    eager = run_named(entry, "eager")
    n = res.get("epochs", 0)
    first_steady = res.get("steady_from", n // 2 + 1)  # the lab: epochs 6-10 of 10
    stats = {r["label"]: steady_stats(r, first_steady) for r in runs}
    base = stats["eager"]["steady"] if eager else None
    rows = []
    for r in runs:
        s = stats[r["label"]]
        mode = r.get("config", {}).get("compile", "none")
        rows.append([r["label"], s["step"] or "?", fs(s["setup"], 2), fs(s["first"], 3), fs(s["steady"], 3),
                     f"{fs(s['min'], 3)}-{fs(s['max'], 3)}", fs(s["once"], 2), _speedup(base, s["steady"]),
                     cache_label(res["cache"].get(mode)), r["status"]])
    utilization = has_mfu(runs)  # lab folders from before runs recorded it: the table as it was
    if utilization:  # steady epochs' mean, beside the status
        rows = [[*row[:-1], mfu_cell(mean_of(r, "mfu", first_steady)), row[-1]] for row, r in zip(rows, runs)]
    for mode, err in res.get("failures", {}).items():
        rows.append([f"compile-{mode}", "", "", "n/a", "n/a", "", "", "n/a", cache_label(res["cache"].get(mode)),
                     *(["n/a"] if utilization else []), f"failed: {err}"])
    for mode, why in res.get("not_run", {}).items():
        rows.append([f"compile-{mode}", "", "", "", "", "", "", "", "", *([""] if utilization else []), f"not run: {why}"])
    blocks: list[Block] = [
        pipelines_para(entry, rc.doc),
        Table(["mode", "step", "setup s (before epoch 1)", "epoch 1 s", f"steady s/epoch (mean, epochs {first_steady}-{n})",
               "steady spread s (min-max)", "one-time cost s (setup + epoch 1 - steady)", "steady speed-up vs eager",
               "compile cache", *([f"steady MFU (epochs {first_steady}-{n})"] if utilization else []), "status"], rows,
              csv="c8_compile"),
        *(peaks_para(runs) if utilization else []),
        Para(f"Protocol: each mode trains a fresh seeded model for {n} epochs on the fast path (no evaluation). "
             f"Setup is the one-time work the engine does before epoch 1's clock (on CUDA: cuDNN autotuning, "
             f"warm-up steps, the step's CUDA-graph capture, and with `--compile default` the compilation of the "
             f"kernels captured inside it; every compiled mode compiles in this warm-up, on a CPU too); whatever "
             f"one-time work is left lands in epoch 1 (for reduce-overhead / max-autotune, whose step runs eagerly "
             f"around torch's own graphs: torch's recording of those graphs on their first calls). So the one-time "
             f"cost = setup + (epoch 1 - steady mean) is the compile cost apart from "
             f"the epoch time, and the steady mean over epochs {first_steady}-{n} (spread min-max) is what a "
             f"compiled epoch costs after it. Step: cuda-graph = the whole step replayed as one captured graph, "
             f"eager = launched op by op. {REF}: {REFERENCE['c8']}."),
        *_cache_blocks(res),
    ]
    blocks += _failures_note(res)

    def draw(fig: Any) -> None:
        ax = fig.subplots()
        labels = [r["label"] for r in runs]
        xs = range(len(labels))
        for dx, key, name in ((-0.27, "once", "one-time cost"), (0.0, "first", "epoch 1"), (0.27, "steady", "steady epoch")):
            ax.bar([x + dx for x in xs], [stats[lb][key] or 0.0 for lb in labels], width=0.27, label=name)
        ax.set_xticks(list(xs), labels, fontsize=7)
        ax.set(ylabel="seconds", title="C8 torch.compile")
        ax.legend(fontsize=7)

    if runs:
        blocks.append(rc.plot("c8_compile", "C8 one-time cost, epoch 1 and steady epoch per compile mode", draw,
                              size=(6, 3.6)))
    blocks.append(runs_para(entry))
    return blocks


def _failures_note(res: dict[str, Any]) -> list[Block]:
    failures = res.get("failures") or {}
    files = res.get("tracebacks") or {}

    def one(mode: str, error: str) -> str:
        return f"{mode} ({error}{f'; traceback in `{files[mode]}`' if mode in files else ''})"

    return [Note("Compile failed for: " + "; ".join(one(m, e) for m, e in failures.items()))] if failures else []


def _render_c8_v1(entry: dict[str, Any], rc: ReportContext) -> list[Block]:
    """The section as lab folders without the cache state were rendered (kept byte for byte)."""
    res = entry.get("result", {})
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
        rows.append([r["label"], fs(recs[0]["epoch_s"], 3) if recs else "n/a", fs(st, 3), _speedup(base, st), r["status"]])
    for mode, err in res.get("failures", {}).items():
        rows.append([f"compile-{mode}", "n/a", "n/a", "n/a", f"failed: {err}"])
    blocks: list[Block] = [
        pipelines_para(entry, rc.doc),
        Table(["mode", "first epoch s (incl. compilation)", f"steady s/epoch (epochs {first_steady}-{n})",
               "steady speed-up vs eager", "status"], rows, csv="c8_compile"),
        Para(f"{REF}: {REFERENCE['c8']}. The first epoch pays tracing and code generation (and, for "
             f"reduce-overhead, CUDA-graph capture); steady epochs run the fused kernels."),
    ]
    blocks += _failures_note(res)

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
    p = ctx.preset
    if ctx.device.type == "cpu" and not p.compile_on_cpu:  # a row that says why it costs nothing
        return [PlannedRuns("fast", 0, 0, evaluate=False, note=f"skipped: the {p.name} preset does not compile on a CPU")]
    if not any(m != "none" for m in p.compile_modes):
        return [PlannedRuns("fast", 0, 0, evaluate=False, note="skipped: --budget left no compile mode")]
    return [PlannedRuns("fast", len(p.compile_modes), p.compile_epochs, evaluate=False, note="compilation not included")]


ITEM = Experiment("c8", "C8 torch.compile", c8_compile, render_c8,
                  lambda p, cuda: len(p.compile_modes) * p.compile_epochs if (cuda or p.compile_on_cpu) else 0,
                  plan=plan_c8)
