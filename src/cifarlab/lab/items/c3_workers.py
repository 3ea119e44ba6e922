"""C3: the data-loader worker sweep (0, 4, 8, ... workers until the data wait stops improving)."""

from __future__ import annotations

import statistics
from typing import Any

from cifarlab.config import MAX_WORKERS, LabPreset
from cifarlab.core.runtime import usable_cpus
from cifarlab.lab.context import Experiment, LabContext, PlannedRuns, epoch_steps, median_of, timed_run
from cifarlab.lab.sections import REF, REFERENCE, measured_table, runs_para
from cifarlab.report.blocks import Block, Note, Para, finite, fs, run_named
from cifarlab.report.plots import ReportContext


def overlaps(a: list[float], b: list[float]) -> bool:
    """Do the min-max intervals of two samples overlap?"""
    return bool(a) and bool(b) and min(a) <= max(b) and min(b) <= max(a)


def c3_workers(ctx: LabContext) -> dict[str, Any]:
    """Workers 0, 4, 8, ... until the data wait stops improving; every point a fresh, seeded model. With the
    preset's sweep_timed_steps (and epochs longer than that) each run times that many steps after the
    iterator start and is extrapolated per epoch; a point whose first two repeats do not overlap the best
    point's interval needs no more repeats."""

    p = ctx.preset
    base = ctx.classic(ctx.base).replace(evaluate=False)
    steps_per_epoch = epoch_steps(ctx, base)
    sized = p.sweep_timed_steps is not None and steps_per_epoch > p.sweep_timed_steps
    if sized:
        base = base.replace(epochs=1, max_steps=p.sweep_timed_steps)
    points: list[dict[str, Any]] = []
    best: tuple[int, float, list[float]] | None = None
    workers = 0
    while True:
        runs: list[dict[str, Any]] = []
        timed: list[dict[str, Any]] = []  # sized runs: each run's timed steps, extrapolated per epoch
        values: list[float] = []
        for r in range(ctx.repeats):
            info = ctx.train("c3", f"workers-{workers}-r{r + 1}", base.replace(workers=workers, seed=base.seed + r))
            runs.append(info)
            if sized:
                timed.append(timed_run(info["records"], steps_per_epoch))
            v = timed[-1]["epoch_data_s"] if sized else info["summary"].get("mean_data_s")
            if v is not None:
                values.append(v)
            if best is not None and len(values) >= 2 and not overlaps(values, best[2]):
                break  # clearly apart from the best: more repeats would not change the decision
        data_s = median_of(values)
        point: dict[str, Any] = {"workers": workers, "runs": [r["label"] for r in runs], "median_data_s": data_s}
        if sized:
            point["timed"] = timed
            point["repeats_skipped"] = ctx.repeats - len(runs)
        points.append(point)
        if best is not None and not data_s < best[1] * (1 - p.sweep_min_gain):
            stop = f"{workers} workers did not cut the data wait by {p.sweep_min_gain:.0%} vs {best[0]} workers"
            break
        best = (workers, data_s, values)
        if p.sweep_max_points is not None and len(points) >= p.sweep_max_points:
            stop = f"the {p.name} preset caps the sweep at {p.sweep_max_points} worker counts"
            break
        workers += p.sweep_step
        if workers > MAX_WORKERS:
            stop = f"reached the {MAX_WORKERS}-worker limit"
            break
    ctx.shared["best_workers"] = best[0]
    extra: dict[str, Any] = {}
    if sized:
        extra["protocol"] = (
            f"each run: a fresh seeded model, one epoch of {p.sweep_timed_steps} timed steps; worker start-up "
            f"(creating the iterator) is reported apart; data wait per epoch = start-up + mean wait per step x "
            f"{steps_per_epoch} steps per epoch (**extrapolated**, not a measured whole epoch); up to "
            f"{ctx.repeats} repeats per point, stopping after 2 when the point's min-max interval does not "
            f"overlap the best point's")
        extra["steps_per_epoch"] = steps_per_epoch
    return {
        **extra,
        "points": points,
        "best_workers": best[0],
        "usable_cpus": usable_cpus(),
        "stop_rule": (f"workers 0, {p.sweep_step}, {2 * p.sweep_step}, ...; stop at the first count whose median "
                      f"data wait per epoch is not at least {p.sweep_min_gain:.0%} below the best so far "
                      f"(within noise is not an improvement); the best is the last count that improved"),
        "stop_reason": stop,
    }


def c3_points(entry: dict[str, Any]) -> list[dict[str, Any]]:
    """Per worker count: median and spread of data wait and epoch time over the repeats."""

    res = entry.get("result", {})
    out = []
    for p in res.get("points", []):
        runs = [run_named(entry, label) for label in p["runs"]]
        runs = [r for r in runs if r is not None]
        data = [r["summary"].get("mean_data_s") for r in runs]
        epoch = [r["summary"].get("mean_epoch_s") for r in runs]
        if "timed" in p:  # sized points: per-epoch figures extrapolated from the timed steps
            data = [t["epoch_data_s"] for t in p["timed"]]
            epoch = [t["epoch_s"] for t in p["timed"]]
        data = [d for d in data if finite(d)]
        epoch = [e for e in epoch if finite(e)]
        out.append({
            "workers": p["workers"], "repeats": len(runs),
            "data_s": statistics.median(data) if data else None, "data_min": min(data, default=None),
            "data_max": max(data, default=None), "data_std": statistics.stdev(data) if len(data) > 1 else None,
            "epoch_s": statistics.median(epoch) if epoch else None, "epoch_min": min(epoch, default=None),
            "epoch_max": max(epoch, default=None),
            "startup_s": statistics.median(s) if (s := [t["startup_s"] for t in p.get("timed", []) if finite(t["startup_s"])]) else None,
        })
    return out


def render_c3(entry: dict[str, Any], rc: ReportContext) -> list[Block]:
    res = entry["result"]
    cores = res["usable_cpus"]
    pts = c3_points(entry)

    def spread(lo: Any, hi: Any, n: int) -> str:
        return f"{fs(lo, 3)}-{fs(hi, 3)}" if n > 1 else "n/a (1 repeat)"

    rows = [[p["workers"], p["repeats"], fs(p["data_s"], 3), spread(p["data_min"], p["data_max"], p["repeats"]),
             fs(p["epoch_s"], 3), spread(p["epoch_min"], p["epoch_max"], p["repeats"]),
             fs(REFERENCE["c3_data_s"].get(p["workers"]), 2) if p["workers"] in REFERENCE["c3_data_s"] else "",
             "more workers than usable cores" if p["workers"] > cores else ""] for p in pts]
    over = [p["workers"] for p in pts if p["workers"] > cores]
    blocks: list[Block] = [
        *measured_table(
            entry, rc,
            f"Usable CPU cores (sched_getaffinity): **{cores}**. Every point trains a fresh, freshly seeded model "
            f"(repeat r uses seed base+r at every worker count, so points do identical work); "
            f"{rc.doc.get('repeats')} repeat(s) per point. Data wait and epoch time "
            f"are means per epoch of each run, then the median over repeats; spread is min-max over repeats.",
            ["workers", "repeats", "data wait s/epoch", "spread", "epoch s", "spread", f"{REF}: data-loading s",
             "warning"], rows, "c3_workers"),
        *([Para(f"Protocol: {res['protocol']}. Worker start-up per point (median): "
                + ", ".join(f"{q['workers']} workers {fs(q['startup_s'], 3)} s" for q in pts) + ".")]
          if res.get("protocol") else []),
        Para(f"Stop rule: {res['stop_rule']}. Stopped because {res['stop_reason']}. "
             f"**Best count: {res['best_workers']} workers** (used by C4 and C5)."),
    ]
    if over:
        blocks.append(Note(f"Warning: {', '.join(map(str, over))} worker(s) exceed the {cores} usable CPU core(s); "
                           f"those workers compete with the training process for the same cores, so the sweep "
                           f"measures contention, not loader parallelism."))
    blocks.append(Para("Why more workers stop helping: each worker is a process that needs a core to decode and "
                       "augment images; once workers + the training process exceed the cores, they time-share; "
                       "every worker also pays start-up (fork, import) at each epoch and batches travel through "
                       "shared memory (IPC). The reference ran on unknown hardware, probably with more cores."))

    def draw(fig: Any) -> None:
        ax = fig.subplots()
        xs = [p["workers"] for p in pts]
        for key, label in (("data", "data wait"), ("epoch", "epoch")):
            ys = [p[f"{key}_s"] if finite(p[f"{key}_s"]) else float("nan") for p in pts]
            lo = [y - (p[f"{key}_min"] if finite(p[f"{key}_min"]) else y) for y, p in zip(ys, pts)]
            hi = [(p[f"{key}_max"] if finite(p[f"{key}_max"]) else y) - y for y, p in zip(ys, pts)]
            ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=3, label=f"{label} s/epoch (ours)")
        ax.axvline(cores, color="grey", linestyle=":", label=f"{cores} usable cores")
        ax.set(xlabel="DataLoader workers", ylabel="seconds per epoch", title="C3 worker sweep")
        ax.set_xticks(xs)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)

    blocks += [rc.plot("c3_workers", "C3 data wait and epoch time vs workers", draw, size=(6, 3.6)), runs_para(entry)]
    return blocks


def sweep_epochs(p: LabPreset, cuda: bool) -> int:
    return p.epochs * p.repeats * min(p.sweep_max_points or 4, 4)


def plan_c3(ctx: LabContext) -> list[PlannedRuns]:
    p = ctx.preset
    points = min(p.sweep_max_points or 4, 4)
    note = f"{points} worker counts assumed; the stop rule decides"
    steps_per_epoch = epoch_steps(ctx, ctx.base)
    if p.sweep_timed_steps is not None and steps_per_epoch > p.sweep_timed_steps:  # sized runs: one epoch of timed steps
        return [PlannedRuns("classic", ctx.repeats * points, 1, evaluate=False,
                            images=p.sweep_timed_steps * ctx.base.batch_size, note=note)]
    return [PlannedRuns("classic", ctx.repeats * points, p.epochs, evaluate=False, note=note)]


ITEM = Experiment("c3", "C3 Data-loader worker sweep", c3_workers, render_c3, sweep_epochs, plan=plan_c3)
