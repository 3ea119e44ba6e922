"""C4: torch.profiler on 1 worker vs C3's best count, and the explanation of the difference: each run
classified by the doctor's classifier (cifarlab.doctor.advice, the thresholds `cifarlab doctor` prints), and
the doctor's suggestion for the 1-worker run checked against the best-count run measured here.

With the preset's profile_timed_steps (the full preset: 100) each run is 2 epochs of that many steps: the
profiler records its window in epoch 1, epoch 2 runs without it and is extrapolated per epoch like C3's
points (start-up apart) -- on an H200 the two 5-epoch classic runs this replaces took 2 of the lab's minutes."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile, schedule

from cifarlab.config import TrainConfig
from cifarlab.core.runtime import usable_cpus
from cifarlab.doctor.advice import THRESHOLDS, classify, from_epoch_record
from cifarlab.lab.context import Experiment, LabContext, PlannedRuns, epoch_steps, timed_run
from cifarlab.lab.sections import measured_table, runs_para
from cifarlab.report.blocks import Block, Note, Para, Table, finite, fs, pct, runs_of
from cifarlab.report.plots import ReportContext, stacked
from cifarlab.run.traces import hta_available, place_trace, temporal_breakdown
from cifarlab.train.engine import Hooks


def _profiled_train(ctx: LabContext, key: str, label: str, cfg: TrainConfig) -> dict[str, Any]:
    """A run with torch.profiler recording a window of steps; Chrome trace saved in the run folder."""
    cuda = ctx.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    steps_per_epoch = epoch_steps(ctx, cfg)
    active = max(1, min(ctx.preset.profile_steps, steps_per_epoch * cfg.epochs - 1))
    tmp = ctx.lab_dir / key / f".{label}.pt.trace.json"
    tmp.parent.mkdir(parents=True, exist_ok=True)
    captured: dict[str, Any] = {}

    def ready(prof: Any) -> None:
        prof.export_chrome_trace(str(tmp))
        captured["top_ops"] = _top_ops(prof, cuda)

    os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # kineto's start/stop chatter on stderr
    with warnings.catch_warnings():
        # one cycle (repeat=1), so torch's "Profiler clears events at the end of each cycle" warning loses nothing
        warnings.filterwarnings("ignore", message="Profiler clears events")
        with profile(activities=activities, schedule=schedule(wait=0, warmup=1, active=active, repeat=1),
                     on_trace_ready=ready) as prof:
            info = ctx.train(key, label, cfg, hooks=Hooks(on_step=lambda e, s, n: prof.step()), reuse=False)
    run_dir = Path(ctx.lab_dir) / info["path"]
    # alone in <run>/traces/rank0.pt.trace.json: HTA reads every JSON file of the folder it is given, and
    # TensorBoard's profiler plugin reads *.pt.trace.json
    trace = place_trace(tmp, run_dir) if tmp.exists() else None
    info["profile"] = {
        "trace": os.path.relpath(trace, ctx.lab_dir) if trace else None,
        "trace_dir": os.path.relpath(trace.parent, ctx.lab_dir) if trace else None,
        "steps_recorded": active,
        "top_ops": captured.get("top_ops", []),
    }
    if trace is not None and cuda and hta_available():  # HTA's own view of the same GPU time, beside ours
        try:
            info["profile"]["hta_temporal_breakdown"] = temporal_breakdown(trace.parent)
        except Exception as e:  # noqa: BLE001 -- HTA failing on a trace is reported, the profile stays
            info["profile"]["hta_error"] = f"{type(e).__name__}: {str(e)[:300]}"
    return info


def _top_ops(prof: Any, cuda: bool, n: int = 10) -> list[dict[str, Any]]:
    events = list(prof.key_averages())

    def device_us(e: Any) -> float:
        return float(getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0.0)) or 0.0)

    events.sort(key=(lambda e: device_us(e)) if cuda else (lambda e: e.self_cpu_time_total), reverse=True)
    return [{"name": e.key, "calls": e.count, "self_cpu_ms": e.self_cpu_time_total / 1e3,
             "cpu_total_ms": e.cpu_time_total / 1e3, "self_device_ms": device_us(e) / 1e3} for e in events[:n]]


def sized_steps(ctx: LabContext) -> int | None:
    """Steps per epoch of C4's sized runs (None: whole epochs -- no sizing, or epochs no longer than that)."""
    n = ctx.preset.profile_timed_steps
    return n if n is not None and epoch_steps(ctx, ctx.base) > n >= ctx.preset.profile_steps + 1 else None


def c4_profile(ctx: LabContext) -> dict[str, Any]:
    best, source = ctx.best_workers()
    base = ctx.classic(ctx.base).replace(evaluate=False)
    steps_per_epoch = epoch_steps(ctx, base)
    sized = sized_steps(ctx)
    if sized is not None:
        base = base.replace(epochs=2, max_steps=sized)
    diagnoses: dict[str, Any] = {}
    timed: dict[str, Any] = {}
    for workers in [1] + ([best] if best != 1 else []):  # 1 worker first: the report compares it to the best
        label = f"workers-{workers}" + ("-best" if workers == best else "")
        cfg = base.replace(workers=workers)
        info = _profiled_train(ctx, "c4", label, cfg)
        diagnoses[label] = diagnose_run(label, info, cfg, ctx.device.type)
        if sized is not None:  # epoch 2: no profiler
            timed[label] = timed_run([r for r in info.get("records", []) if r.get("epoch") == 2], steps_per_epoch)
    out = {"best_workers": best, "best_from": source, "doctor": diagnoses, "doctor_thresholds": THRESHOLDS}
    if sized is not None:
        out.update(timed=timed, steps_per_epoch=steps_per_epoch, protocol=(
            f"each run: a fresh seeded model, 2 epochs of {sized} steps; torch.profiler records its window in "
            f"epoch 1; epoch 2 runs without it, and its figures are **extrapolated** to a {steps_per_epoch}-step "
            f"epoch (worker start-up + per-step time x steps; start-up reported apart), not measured whole epochs"))
    return out


def epoch_figures(res: dict[str, Any], run: dict[str, Any]) -> dict[str, Any]:
    """Per-epoch data / h2d / compute / other / total of a C4 run: extrapolated from its clean timed epoch
    when the run was sized, else the means over its epochs."""
    t = res.get("timed", {}).get(run["label"])
    if t is not None:
        return {"data": t["epoch_data_s"], "h2d": t["epoch_h2d_s"], "compute": t["epoch_compute_s"],
                "other": t["epoch_other_s"], "epoch": t["epoch_s"], "startup": t["startup_s"]}
    s = run["summary"]
    return {k: s.get(f"mean_{k}_s") for k in ("data", "h2d", "compute", "other", "epoch")} | {"startup": None}


def diagnose_run(label: str, info: dict[str, Any], cfg: TrainConfig, device_type: str) -> dict[str, Any] | None:
    """The doctor's class for a finished run, judged on its last finished epoch (no rerun: the CPU,
    memory and GPU-busy facts `cifarlab doctor` also measures are unknown here)."""
    done = [r for r in info.get("records", []) if r.get("status") == "ok"]
    if not done:
        return None
    record = SimpleNamespace(**done[-1])
    diagnosis = classify(from_epoch_record(label, record, cfg, device_type, torch.get_num_threads(), usable_cpus()))
    return {"epoch": done[-1]["epoch"], **diagnosis.to_dict()}


def hta_blocks(runs: list[dict[str, Any]]) -> list[Block]:
    """Where HTA finds the traces, and (CUDA, HTA installed) its temporal breakdown of each run's GPU time. Labs
    written before the traces had a folder of their own: nothing."""
    dirs = [(r["label"], r.get("profile", {})) for r in runs if r.get("profile", {}).get("trace_dir")]
    if not dirs:
        return []
    blocks: list[Block] = [Para("Each run's trace is alone in its folder, as Holistic Trace Analysis reads it: "
                                + "; ".join(f"`{p['trace_dir']}`" for _, p in dirs)
                                + " (`TraceAnalysis(trace_dir=...)`, or `tensorboard --logdir` for the profiler plugin).")]
    rows = [[label, row.get("rank", ""), fs(row.get("idle_time(us)", 0) / 1e3, 1), fs(row.get("compute_time(us)", 0) / 1e3, 1),
             fs(row.get("non_compute_time(us)", 0) / 1e3, 1), f"{row.get('idle_time_pctg', 'n/a')}%",
             f"{row.get('compute_time_pctg', 'n/a')}%", f"{row.get('non_compute_time_pctg', 'n/a')}%"]
            for label, p in dirs for row in p.get("hta_temporal_breakdown") or []]
    if rows:
        blocks.append(Table(["run", "rank", "GPU idle ms", "GPU compute ms", "GPU non-compute ms (memcpy, comm.)",
                             "idle", "compute", "non-compute"], rows, csv="c4_hta_temporal"))
        blocks.append(Para("HTA's temporal breakdown of the profiled window's GPU time (its own reading of the same "
                           "traces; the table above times the whole epoch from the host)."))
    errors = [f"{label}: {p['hta_error']}" for label, p in dirs if p.get("hta_error")]
    if errors:
        blocks.append(Note("HTA could not analyse: " + "; ".join(errors)))
    return blocks


def render_c4(entry: dict[str, Any], rc: ReportContext) -> list[Block]:
    res = entry["result"]
    runs = runs_of(entry)
    rows = []
    sized = "timed" in res
    for r in runs:
        f = epoch_figures(res, r)
        prof = r.get("profile", {})
        rows.append([r["label"], r["config"]["workers"], fs(f["data"], 3), fs(f["h2d"], 3), fs(f["compute"], 3),
                     fs(f["other"], 3), fs(f["epoch"], 3), *([fs(f["startup"], 3)] if sized else []),
                     prof.get("steps_recorded", "n/a"), f"`{prof.get('trace')}`" if prof.get("trace") else "none"])
    intro = (f"'Best' = {res['best_workers']} workers ({res['best_from']}). torch.profiler recorded one warm-up "
             f"step then the steps listed, in the training process only (loader workers are other processes: "
             f"their work shows up here only as the wait on `DataLoader.__next__`). Each trace is a Chrome trace "
             f"(open in chrome://tracing or Perfetto; TensorBoard's profiler plugin reads `*.pt.trace.json`).")
    if sized:
        intro += f" Protocol: {res['protocol']}."
        header = ["run", "workers", "data s/epoch (extrapolated)", "h2d s", "compute s", "other s", "epoch s",
                  "of which worker start-up s", "profiled steps", "trace"]
    else:
        header = ["run", "workers", "data s/epoch", "h2d s", "compute s", "other s (incl. profiler)", "epoch s",
                  "profiled steps", "trace"]
    blocks: list[Block] = [
        *measured_table(entry, rc, intro, header, rows, "c4_data_vs_compute"),
        Para(c4_explanation(res, runs, rc.doc.get("machine", {}).get("usable_cpus"))),
    ]
    if res.get("doctor"):  # labs written before the doctor existed have no classification
        blocks.append(Para(doctor_paragraph(res, runs)))
    blocks += hta_blocks(runs)
    for r in runs:
        ops = r.get("profile", {}).get("top_ops", [])
        blocks.append(Para(f"Top operators by self time, run `{r['label']}`:"))
        # a CPU run records no device activity: its 0.0 'device ms' would read as measured (labs from before
        # run_size was stored keep the column, as they rendered)
        device = not (str(r.get("device", "")).startswith("cpu") and "run_size" in rc.doc)
        blocks.append(Table(["operator", "calls", "self CPU ms", "CPU total ms"] + (["self device ms"] if device else []),
                            [[f"`{o['name'][:60]}`", o["calls"], fs(o["self_cpu_ms"], 1), fs(o["cpu_total_ms"], 1)]
                             + ([fs(o["self_device_ms"], 1)] if device else []) for o in ops],
                            csv=f"c4_top_ops_{r['label']}"))

    def draw(fig: Any) -> None:
        stacked(fig.subplots(), [f"{r['config']['workers']} worker(s)" for r in runs],
                {k: [epoch_figures(res, r)[k] for r in runs] for k in ("data", "h2d", "compute", "other")})
        fig.axes[0].set_title("C4 data vs compute per epoch")

    blocks += [rc.plot("c4_data_vs_compute", "C4 data vs compute per epoch", draw, size=(5, 3.6)), runs_para(entry)]
    return blocks


def c4_explanation(res: dict[str, Any], runs: list[dict[str, Any]], cores: Any) -> str:
    """One paragraph from the measured numbers: 1 worker vs the best count."""
    if not runs:
        return "No profiled run finished."
    one, best = runs[0], runs[-1]

    def part(r: dict[str, Any]) -> tuple[Any, Any, Any]:
        f = epoch_figures(res, r)
        return f["data"], f["compute"], f["epoch"]

    def share(d: Any, e: Any) -> str:
        return pct(d / e) if finite(d) and finite(e) and e else "n/a"

    d1, c1, e1 = part(one)
    text = (f"With 1 worker the training step waited {fs(d1, 3)} s per epoch on the loader ({share(d1, e1)} of "
            f"the epoch) and computed for {fs(c1, 3)} s.")
    if best is one:
        return text + " The best count is 1, so there is no second configuration to compare."
    d2, c2, e2 = part(best)
    n = best["config"]["workers"]
    text += f" With {n} workers (the best) it waited {fs(d2, 3)} s ({share(d2, e2)}) and computed for {fs(c2, 3)} s."
    if finite(d1) and finite(d2):
        text += (f" Going from 1 to {n} workers the wait {'fell' if d2 < d1 else 'rose'} by {abs(d2 - d1):.3f} s "
                 f"per epoch; epoch time {fs(e1, 3)} -> {fs(e2, 3)} s.")
    if finite(c1) and finite(c2) and c1 > 0:
        change = (c2 - c1) / c1
        if abs(change) < 0.10:
            text += (f" Compute is the same within 10% ({change:+.1%}, treated as run-to-run noise): the worker "
                     f"count changed the wait, not the work.")
        else:
            text += (f" Compute itself changed by {change:+.1%}: loader processes (and anything else running on "
                     f"the machine) compete with the training process for the {cores or '?'} usable core(s), so "
                     f"on this machine the worker count moves compute time, not only the wait.")
    return text


def profiled_in_epoch(run: dict[str, Any], epoch: int) -> bool:
    """Whether the profiler's window (one warm-up step, then the recorded steps) reached into `epoch`."""
    recorded = run.get("profile", {}).get("steps_recorded")
    if not isinstance(recorded, int):
        return False
    before = sum(r.get("steps") or 0 for r in run.get("records", []) if r.get("epoch", 0) < epoch)
    return 1 + recorded > before


def doctor_paragraph(res: dict[str, Any], runs: list[dict[str, Any]]) -> str:
    """The doctor's classification of each run, and its suggestion for the 1-worker run checked against
    the best-count run that this item measured."""
    parts = []
    for r in runs:
        d = res["doctor"].get(r["label"])
        if d:
            caveat = (" (this epoch ran profiled steps, so its host time includes the profiler's own work and its "
                      "trace export)" if profiled_in_epoch(r, d["epoch"]) else "")
            parts.append(f"`{r['label']}` (epoch {d['epoch']}): **{d['label']}** -- {'; '.join(d['evidence'])}{caveat}")
    rule = res["doctor_thresholds"].get("data-bound", "?")
    text = (f"The doctor's classifier (`cifarlab doctor`'s thresholds; data-bound: {rule}) on each run's last epoch: "
            + "; ".join(parts) + ".")
    one, best = (runs[0], runs[-1]) if runs else (None, None)
    d1 = res["doctor"].get(one["label"]) if one else None
    if d1 is None or best is one:
        return text
    e1, e2 = epoch_figures(res, one)["epoch"], epoch_figures(res, best)["epoch"]
    n = best["config"]["workers"]
    gain = f"{e1 / e2:.2f}x" if finite(e1) and finite(e2) and e2 else "n/a"
    if d1["label"] == "data-bound":
        return text + (f" For a data-bound step the doctor suggests more loader workers (or the device-resident loader); "
                       f"measured here, `--workers {n}` took the epoch from {fs(e1, 3)} to {fs(e2, 3)} s ({gain}).")
    return text + (f" The 1-worker step is not data-bound, so the doctor would not expect more workers to help; "
                   f"measured here, `--workers {n}` took the epoch from {fs(e1, 3)} to {fs(e2, 3)} s ({gain}).")


def plan_c4(ctx: LabContext) -> list[PlannedRuns]:
    sized = sized_steps(ctx)
    if sized is None:
        return [PlannedRuns("classic", 2, ctx.preset.epochs, evaluate=False, note="profiler overhead not included")]
    return [PlannedRuns("classic", 2, 2, evaluate=False, images=sized * ctx.base.batch_size,
                        note=f"2 epochs of {sized} steps per run; profiler overhead not included")]


ITEM = Experiment("c4", "C4 Profiling 1 worker vs the best", c4_profile, render_c4,
                  lambda p, c: 2 * (2 if p.profile_timed_steps else p.epochs), plan=plan_c4)
