"""The lab's plan and its time table.

Before the work: a quick calibration (a few steps of the fast and the classic pipeline with the lab's
base config; twice on CUDA, where the first run pays the process's one-time costs) and, per item, its runs
and epochs with an estimated time = runs x (per-run overhead + first-epoch warm-up + epochs x (iterator
start + steps x step time + evaluation)), all from the calibration. After the work: per item its status,
runs, planned and elapsed seconds and share of the lab's wall time, with the lab's own overhead (setup and
data loading, the calibration, results.json writes, report writing) as rows of their own, so the rows add
up to the wall time."""

from __future__ import annotations

import math
import time
from typing import Any, TextIO

from cifarlab.core.runtime import cache_state, inductor_cache_dir
from cifarlab.data import DataBundle, take
from cifarlab.lab.budget import COMPILE_ASSUMED_S, budget_blocks
from cifarlab.lab.context import Experiment, LabContext, PlannedRuns
from cifarlab.report.blocks import Block, Para, Table, fs
from cifarlab.run.runner import run_training
from cifarlab.train.engine import Hooks

# Steps of one epoch per calibration run: steps 2.. give the step time, step 1 the warm-up. On CUDA a step is
# milliseconds, so 10 steps cost little and average out the first replays.
CALIBRATION_STEPS = {"cuda": 10, "cpu": 3}
# Calibration runs per pipeline; the last one counts. On CUDA the first run in a process pays one-time costs no
# later run pays (CUDA context, lazy kernel loading, cuDNN's autotuning caches): on an H200 the plan charged
# every run that first run's ~10 s of warm-up and estimated 12m21s for a lab whose C1-C7 took 5m12s.
CALIBRATION_RUNS = {"cuda": 2, "cpu": 1}
# Test batches a calibration run evaluates, its time scaled to the whole split (None: the whole split). On a
# CPU the full preset's 10,000 test images took a minute per run; on CUDA they take under half a second, and
# a captured evaluation's one-time capture, scaled up from a few batches, would be charged 20 times over.
CALIBRATION_TEST_BATCHES: dict[str, int | None] = {"cuda": None, "cpu": 5}


CALIBRATED = ("classic", "fast", "cpu-classic")  # in the order they are timed


def calibrated_pipeline(ctx: LabContext, pipeline: str) -> str | None:
    """Which calibration estimates a planned pipeline (None: none of them). On a CPU-only machine C5's CPU run
    is the classic pipeline itself; on CUDA it gets a calibration of its own."""
    if pipeline == "cpu-classic" and ctx.device.type == "cpu":
        return "classic"
    return pipeline if pipeline in CALIBRATED else None


def calibrate(ctx: LabContext, pipelines: tuple[str, ...] = ("classic", "fast")) -> dict[str, Any]:
    """Time one epoch of a few steps of each pipeline asked for (run folders in <lab>/plan/), twice on CUDA
    (the second run counts; the first one's extra time is recorded as first_run_extra_s). "cpu-classic" (a
    CUDA machine's CPU, for C5) runs once, with a CPU's number of steps."""

    t0 = time.perf_counter()
    kind = "cuda" if ctx.device.type == "cuda" else "cpu"
    steps, runs = CALIBRATION_STEPS[kind], CALIBRATION_RUNS[kind]
    out: dict[str, Any] = {"steps": steps, "epochs": 1, "runs_per_pipeline": runs}
    builders = {"classic": ctx.classic, "fast": ctx.fast,
                "cpu-classic": lambda cfg: ctx.classic(cfg).replace(device="cpu", evaluate=False)}
    for name in pipelines:
        cfg = builders[name](ctx.base)
        first: dict[str, Any] | None = None
        n_runs, n_steps = runs, steps
        if name == "cpu-classic":
            n_runs = 1
            n_steps = out["cpu_steps"] = CALIBRATION_STEPS["cpu"]
        for i in range(n_runs):
            run_name = f"calibrate-{name}" + (f"-{i + 1}" if n_runs > 1 else "")
            measured = _calibration_run(ctx, cfg.replace(epochs=1, max_steps=n_steps, out_dir=str(ctx.lab_dir / "plan"),
                                                         name=run_name))
            first = first or measured
            out[name] = measured
        if n_runs > 1 and first is not None and out[name] is not None:
            out[name]["first_run_extra_s"] = max(0.0, first["run_s"] - out[name]["run_s"])
    out["elapsed_s"] = time.perf_counter() - t0
    return out


def _calibration_data(ctx: LabContext, cfg: Any) -> tuple[DataBundle, float]:
    """The lab's data with the test split cut to the run's device's CALIBRATION_TEST_BATCHES batches, and the
    factor that scales its evaluation time to the whole split."""
    test = ctx.data.test
    batches = CALIBRATION_TEST_BATCHES["cpu" if cfg.device == "cpu" or ctx.device.type != "cuda" else "cuda"]
    if batches is None:
        return ctx.data, 1.0
    sub = take(test, batches * cfg.test_batch_size, ctx.base.seed + 1)
    if len(sub) >= len(test):
        return ctx.data, 1.0
    data = DataBundle(train=ctx.data.train, test=sub, source=ctx.data.source,
                      description=f"{ctx.data.description}; calibration: {len(sub)} test images")
    return data, len(test) / len(sub)


def _calibration_run(ctx: LabContext, cfg: Any) -> dict[str, Any] | None:
    """One calibration run: the step time is the clock from the end of step 1 to the end of the epoch
    (synchronized), over steps 2..n; what step 1 took beyond that is the run's warm-up. Evaluation is timed
    on a few test batches and scaled to the whole test split."""
    marks: dict[str, float] = {}

    def on_step(epoch: int, step: int, total: int) -> None:
        marks.setdefault("step1", time.perf_counter())

    def on_epoch(record: Any, state: Any) -> None:
        marks["epoch_end"] = time.perf_counter() - (record.eval_s or 0.0)

    data, eval_scale = _calibration_data(ctx, cfg)
    t_run = time.perf_counter()
    result = run_training(cfg, hooks=Hooks(on_step=on_step, on_epoch=on_epoch, should_stop=ctx.should_stop), data=data)
    run_s = time.perf_counter() - t_run
    recs = [r for r in result.records if r.status == "ok"]
    if not recs or "step1" not in marks or "epoch_end" not in marks:
        return None
    rec = recs[0]
    steady_steps = max(1, rec.steps - 1)
    step_s = max(0.0, marks["epoch_end"] - marks["step1"]) / steady_steps
    return {
        "step_s": step_s,
        "start_s": rec.loader_start_s,
        "eval_s": (rec.eval_s or 0.0) * eval_scale,
        "eval_scale": eval_scale,
        "warmup_s": max(0.0, rec.epoch_s - rec.loader_start_s - rec.steps * step_s) + (rec.setup_s or 0.0),
        "run_overhead_s": max(0.0, run_s - rec.epoch_s - (rec.eval_s or 0.0) - (rec.setup_s or 0.0)),
        "run_s": run_s,
    }


def _group_estimate_s(ctx: LabContext, g: PlannedRuns, cal: dict[str, Any]) -> float | None:
    name = calibrated_pipeline(ctx, g.pipeline)
    c = cal.get(name) if name else None
    if g.runs == 0:
        return 0.0 if g.pipeline != "none" else None
    if not c:
        return None
    steps = math.ceil((g.images or len(ctx.data.train)) / ctx.base.batch_size)
    if ctx.base.max_steps:
        steps = min(steps, ctx.base.max_steps)
    epoch_s = c["start_s"] + steps * c["step_s"] + (c["eval_s"] if g.evaluate else 0.0)
    return g.runs * (c["run_overhead_s"] + c["warmup_s"] + g.epochs * epoch_s)


def make_plan(ctx: LabContext, keys: list[str], registry: dict[str, Experiment],
              cal: dict[str, Any] | None = None) -> dict[str, Any]:
    """Calibrate (when any item has a plan and no calibration is given) and estimate each item; stored in
    results.json as "plan". With `cal` (an earlier plan's calibration) it only re-estimates: milliseconds."""

    planned = {k: registry[k].plan(ctx) if registry[k].plan else None for k in keys}
    if cal is None:
        # Only the pipelines some item trains on (`--only c8` calibrates the fast one: on CUDA each costs seconds).
        needed = {calibrated_pipeline(ctx, g.pipeline) for groups in planned.values() for g in groups or [] if g.runs}
        pipelines = tuple(p for p in CALIBRATED if p in needed)
        cal = calibrate(ctx, pipelines) if pipelines else {"elapsed_s": 0.0}
    items = []
    for k in keys:
        groups = planned[k]
        if groups is None:
            items.append({"key": k, "title": registry[k].title, "runs": None, "describe": "not planned",
                          "estimate_s": None, "note": "this item has no plan"})
            continue
        estimates = [_group_estimate_s(ctx, g, cal) for g in groups]
        describe = "; ".join(f"{g.runs} run(s) x {g.epochs} epoch(s), {g.pipeline}" for g in groups if g.runs) or "no runs"
        items.append({
            "key": k, "title": registry[k].title, "runs": sum(g.runs for g in groups), "describe": describe,
            "estimate_s": sum(estimates) if estimates and all(e is not None for e in estimates) else (0.0 if not groups else None),
            "note": "; ".join(g.note for g in groups if g.note),
        })
    known = [i["estimate_s"] for i in items if i["estimate_s"] is not None]
    out = {"calibration": cal, "items": items, "estimate_s": sum(known),
           "unestimated": [i["key"] for i in items if i["estimate_s"] is None]}
    if any(i["key"] == "c8" and i["runs"] for i in items):  # what --budget assumes for the compiles left out
        assumed = COMPILE_ASSUMED_S["cuda" if ctx.device.type == "cuda" else "cpu"]
        out["c8_compile_assumed_s"] = {m: assumed[m] for m in ctx.preset.compile_modes if m in assumed}
        cache_dir = inductor_cache_dir()[0]
        out["c8_cache"] = {"dir": cache_dir, "entries": cache_state(cache_dir)["entries"]}
    return out


def _calibrated(cal: dict[str, Any]) -> str:
    """'3 steps of the fast and the classic pipeline' (+ ' and 3 of the classic pipeline on the CPU (C5)')."""
    names = [p for p in ("fast", "classic") if p in cal]
    parts = [f"{cal.get('steps', 0)} steps of the {' and the '.join(names)} pipeline"] if names else []
    if "cpu-classic" in cal:
        parts.append(f"{cal.get('cpu_steps', 0)} {'of' if names else 'steps of'} the classic pipeline on the CPU (C5)")
    return " and ".join(parts) or "no steps of any pipeline"


def print_plan(plan: dict[str, Any], out: TextIO, fmt: Any) -> None:
    cal = plan["calibration"]
    print(f"\nplan (estimates from {_calibrated(cal)}, calibrated in {cal['elapsed_s']:.1f} s; rough):", file=out)
    for i in plan["items"]:
        est = "?" if i["estimate_s"] is None else f"~{fmt(i['estimate_s'])}"
        note = f"  ({i['note']})" if i["note"] else ""
        print(f"   {i['key']:<4} {i['describe']:<44} {est:>8}{note}", file=out)
    rest = f" + what is not estimated ({', '.join(plan['unestimated'])})" if plan["unestimated"] else ""
    print(f"   total ~{fmt(plan['estimate_s'])}{rest}", file=out, flush=True)
    if plan.get("c8_compile_assumed_s"):
        modes = ", ".join(f"{m} ~{fmt(v)}" for m, v in plan["c8_compile_assumed_s"].items())
        print(f"   C8's compilation, not in the total: with cold caches {modes} (what --budget assumes; a quarter of "
              f"that with warm caches)", file=out, flush=True)
        if cache := plan.get("c8_cache"):
            state = f"warm ({cache['entries']:,} files)" if cache["entries"] else "cold (empty or absent)"
            print(f"   inductor's on-disk cache {cache['dir']} is {state} now", file=out, flush=True)


def time_table(doc: dict[str, Any], overhead_s: dict[str, float], wall_s: float) -> list[dict[str, Any]]:
    """Rows in the lab's order: setup, calibration, each item, bookkeeping, report; shares of wall_s."""

    plan = {i["key"]: i for i in doc.get("plan", {}).get("items", [])}
    rows: list[dict[str, Any]] = [
        {"part": "lab setup (data loading, device, lab folder)", "status": "", "runs": None, "planned_s": None,
         "elapsed_s": overhead_s.get("setup", 0.0)},
        {"part": "plan (calibration runs)", "status": "", "runs": None, "planned_s": None,
         "elapsed_s": overhead_s.get("plan", 0.0)},
    ]
    for key in doc.get("order", []):
        e = doc["experiments"].get(key, {})
        runs = e.get("runs", [])
        reused = sum(1 for r in runs if r.get("reused"))
        rows.append({"part": e.get("title", key), "key": key, "status": e.get("status", "not run"),
                     "runs": len(runs) - reused, "reused_runs": reused,
                     "planned_s": plan.get(key, {}).get("estimate_s"), "elapsed_s": e.get("elapsed_s", 0.0)})
    rows += [
        {"part": "lab bookkeeping (results.json writes, progress)", "status": "", "runs": None, "planned_s": None,
         "elapsed_s": overhead_s.get("bookkeeping", 0.0)},
        {"part": "report writing (report.md/.html, csv, plots)", "status": "", "runs": None, "planned_s": None,
         "elapsed_s": overhead_s.get("report", 0.0)},
    ]
    for r in rows:
        r["share"] = r["elapsed_s"] / wall_s if wall_s > 0 else None
    return rows


def _cells(r: dict[str, Any]) -> list[str]:
    runs = "" if r["runs"] is None else str(r["runs"]) + (f" (+{r['reused_runs']} reused)" if r.get("reused_runs") else "")
    share = "" if r["share"] is None else f"{r['share']:.0%}"
    return [r["part"], r["status"], runs, fs(r["planned_s"], 1) if r["planned_s"] is not None else "",
            fs(r["elapsed_s"], 1), share]


COLUMNS = ["part of the lab", "status", "runs trained", "planned s", "elapsed s", "share of wall time"]


def print_time_table(rows: list[dict[str, Any]], wall_s: float, out: TextIO) -> None:
    cells = [COLUMNS] + [_cells(r) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS))]
    print(f"\ntime table (lab wall time {wall_s:.1f} s):", file=out)
    for c in cells:
        print("   " + "  ".join(v.ljust(w) if i < 2 else v.rjust(w) for i, (v, w) in enumerate(zip(c, widths))), file=out)
    total = sum(r["elapsed_s"] for r in rows)
    last = ["sum of rows", "", "", "", fs(total, 1), f"{total / wall_s if wall_s else 0:.0%}"]
    print("   " + "  ".join(v.ljust(w) if i < 2 else v.rjust(w) for i, (v, w) in enumerate(zip(last, widths))),
          file=out, flush=True)


def time_table_blocks(doc: dict[str, Any]) -> list[Block]:
    """The header's time table; nothing for lab folders written before it existed."""

    rows = doc.get("time_table")
    if not rows:
        return budget_blocks(doc)
    wall = doc.get("elapsed_s") or 0.0
    total = sum(r["elapsed_s"] for r in rows)
    plan = doc.get("plan", {})
    cal = plan.get("calibration", {})
    text = (f"Where the lab's {fs(wall, 1)} s of wall time went (from the lab's start, once Python and torch are "
            f"loaded, to the report written: `time cifarlab lab` also counts those few seconds of interpreter start "
            f"and imports; the rows add up to {fs(total, 1)} s). 'Planned s' is the estimate printed before the work, "
            f"from {_calibrated(cal).replace(' steps of', ' timed steps of', 1)} with this lab's base config: "
            f"runs x (per-run overhead + first-epoch warm-up + epochs x (iterator start + steps x step time + evaluation)); it leaves out "
            + ("; ".join(f"{i['key']}: {i['note']}" for i in plan.get("items", []) if i.get("note")) or "nothing")
            + ". Reused runs (same config as an earlier item's) cost no time.")
    return [*budget_blocks(doc), Para(text), Table(COLUMNS, [_cells(r) for r in rows], csv="time_table")]
