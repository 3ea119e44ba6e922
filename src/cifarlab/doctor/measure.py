"""`cifarlab doctor`: measure where one training configuration's step time goes, classify the
bottleneck (doctor_advice.py), rerun every proposed change for the same number of steps with a fresh
model and the same seed, and recommend only what the reruns show beats the baseline's noise.

Timing rules are the lab's C2 rules: every window is engine.train_epoch itself (device synchronized
at each clock read when sync timing is on, so data + h2d + compute + other add up to the window),
after untimed warm-up steps, on a loader that is already running; evaluation never runs."""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import statistics
import time
import warnings
from pathlib import Path
from typing import TextIO

import torch

from cifarlab.config import TrainConfig
from cifarlab.core.errors import UsageError, raise_if_interrupted
from cifarlab.core.folders import create_run_dir
from cifarlab.core.runtime import cpu_flags, cpu_has_native_bf16, environment, seed_everything, usable_cpus
from cifarlab.core.signals import Stopped, signals_deferred
from cifarlab.core.text import one_line
from cifarlab.data import DataBundle, build_loaders
from cifarlab.doctor import outputs as doctor_report
from cifarlab.doctor.advice import Candidate, Diagnosis, HostFacts, Measurement, check_budget_s, choose_repeats, classify, plan_round, propose
from cifarlab.doctor.outputs import DoctorResult, noise_share, rank, summarize, verdict
from cifarlab.doctor.timing import (
    OVER_BUDGET,
    OverBudget,
    StepStream,
    TimeLimit,
    children_cpu_s,
    dispatch_us,
    gpu_busy_s,
    main_thread_sched_s,
    peak_rss_bytes,
    weighted,
    window_row,
)
from cifarlab.model.utilization import for_run
from cifarlab.run.runner import is_out_of_memory, oom_message, prepare, release_device_memory
from cifarlab.train.engine import build_state, ensure_step_runner, resolve_precision
from cifarlab.train.precision import choose_precision

DEFAULT_BUDGET_S = {"cuda": 60.0, "cpu": 180.0}
WARMUP_STEPS = {"cuda": 5, "cpu": 1}  # untimed: cuDNN algorithm search, allocator, caches
COMPILE_WARMUP_STEPS = 3  # compilation (and reduce-overhead's graph recording) happens in these
TARGET_WINDOW_S = 1.5  # steps per window: enough for this much time by the first estimate ...
MIN_STEPS, MAX_STEPS = 2, 100  # ... within these bounds
DEFAULT_REPEATS = 3
PROFILE_STEPS = 10  # CUDA busy fraction: steps recorded by torch.profiler (a window apart from the timed one)
# Estimated one-off cost (s) of compilation before the first timed step, used only to plan the budget.
COMPILE_COST_S = {"cuda": 60.0, "cpu": 240.0, "cuda_graph": 5.0}
FINISH_RESERVE_S = 5.0  # of the budget, kept for the end: the table, doctor.json, doctor.md and the chart
# A measurement's time limit: what is left of the budget (less the reserve for later baseline repeats), and
# never more than LIMIT_FACTOR x its estimate + LIMIT_SLACK_S, so one runaway candidate cannot eat the rest.
LIMIT_FACTOR, LIMIT_SLACK_S = 3.0, 15.0
# The first baseline measurement gets at least this long whatever the budget: without it the doctor can say nothing
# (a budget below one measurement, e.g. --budget 1, is overrun by the baseline and nothing else).
BASELINE_MIN_LIMIT_S = 60.0




def measure(cfg: TrainConfig, data: DataBundle, device: torch.device, steps: int | None, label: str,
            warmup_steps: int | None = None, gpu_profile: bool = False, limit_s: float | None = None) -> Measurement:
    """One configuration as one estimated epoch: a fresh seeded model and loader, untimed warm-up
    steps, then a new epoch's first min(steps, E) steps ('start': worker start-up and first batches
    included) and up to `steps` more on the same iterator ('steady'), E = steps per epoch. When the two
    windows do not cover the epoch, the steady one stands for the rest of it. steps None: chosen from
    the last warm-up step's time (TARGET_WINDOW_S within MIN_STEPS..MAX_STEPS).
    limit_s: stop it there (OverBudget, with what was timed so far): between steps, or HARD_GRACE_S later
    by interrupting a step (a compilation) that has not returned."""
    limit = TimeLimit(limit_s)
    with limit.hard():
        return _measure(cfg, data, device, steps, label, warmup_steps, gpu_profile, limit)


def _measure(cfg: TrainConfig, data: DataBundle, device: torch.device, steps: int | None, label: str,
             warmup_steps: int | None, gpu_profile: bool, limit: TimeLimit) -> Measurement:
    t_start = time.perf_counter()
    if warmup_steps is None:
        warmup_steps = COMPILE_WARMUP_STEPS if cfg.compile != "none" else WARMUP_STEPS[device.type]
    seed_everything(cfg.seed)
    train_loader, _ = build_loaders(cfg, data, device)
    state = build_state(cfg, device)
    # The step runner (eager, or one captured CUDA graph per step) and its one-time setup, built from the
    # real loader (its batch sizes and sample shape), before any window and outside them.
    runner = ensure_step_runner(cfg, state, train_loader)
    stream = StepStream(train_loader, cfg.seed)
    per_epoch = len(train_loader)
    try:
        limit.check()
        limit.phase = "untimed warm-up step(s)"
        if warmup_steps > 1:
            limit.check(stream.run(cfg, state, warmup_steps - 1, limit))
        last = stream.run(cfg, state, 1, limit) if warmup_steps else None
        limit.check(last)
        if steps is None:
            step_s = last.epoch_s if last is not None else TARGET_WINDOW_S
            steps = max(MIN_STEPS, min(MAX_STEPS, math.ceil(TARGET_WINDOW_S / max(step_s, 1e-6))))
        first_n = min(steps, per_epoch)
        steady_n = min(steps, per_epoch - first_n)
        stream.restart()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        cpu0, kids0, sched0 = time.process_time(), children_cpu_s(), main_thread_sched_s()
        limit.phase = "timed start window"
        first = stream.run(cfg, state, first_n, limit)
        limit.check(first)
        loader_start_s = stream.loader_start_s
        limit.phase = "timed steady window"
        steady = stream.run(cfg, state, steady_n, limit) if steady_n else None
        if steady is not None:
            limit.check(steady)
        cpu1, kids1, sched1 = time.process_time(), children_cpu_s(), main_thread_sched_s()
        load, op_us = os.getloadavg()[0], dispatch_us()
        if device.type == "cuda":
            peak, total = torch.cuda.max_memory_allocated(device), torch.cuda.get_device_properties(device).total_memory
        else:
            peak, total = peak_rss_bytes(), os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        cost_s = time.perf_counter() - t_start  # the profiled window below is not part of a rerun's cost
        busy_per_step = None
        if gpu_profile and device.type == "cuda":
            n = min(steps, PROFILE_STEPS)
            kernel_s = gpu_busy_s(stream, cfg, state, n)
            busy_per_step = None if kernel_s is None else kernel_s / n
    finally:
        stream.restart()
    windows = [window_row("start", first, 1.0)]
    if steady is not None:
        windows.append(window_row("steady", steady, (per_epoch - first.steps) / max(steady.steps, 1)))
    workers_cpu = None
    if cfg.loader == "torch" and cfg.workers > 0 and kids0 is not None and kids1 is not None:
        workers_cpu = kids1 - kids0  # workers started inside the start window, so kids0 holds none of theirs
    epoch_steps = round(weighted(windows, "steps") or 0)
    return Measurement(
        label=label, steps=epoch_steps, images=weighted(windows, "images") or 0.0,
        epoch_s=weighted(windows, "window_s") or 0.0, data_s=weighted(windows, "data_s") or 0.0,
        h2d_s=weighted(windows, "h2d_s"), compute_s=weighted(windows, "compute_s"),
        other_s=weighted(windows, "other_s") or 0.0, device_type=device.type, torch_threads=torch.get_num_threads(),
        usable_cpus=usable_cpus(), loader=cfg.loader, workers=cfg.workers if cfg.loader == "torch" else 0,
        windows=windows, timed_s=sum(w["window_s"] for w in windows), loader_start_s=loader_start_s,
        warmup_steps=warmup_steps, window_steps=steps, cost_s=cost_s, process_cpu_s=cpu1 - cpu0, workers_cpu_s=workers_cpu,
        peak_memory_bytes=peak, memory_total_bytes=total,
        gpu_busy_s=None if busy_per_step is None else busy_per_step * epoch_steps,
        dispatch_us=op_us, load_average=load, step_mode=runner.mode, setup_s=runner.setup_s,
        main_run_s=sched1[0] - sched0[0] if sched0 and sched1 else None,
        main_wait_s=sched1[1] - sched0[1] if sched0 and sched1 else None,
        status="diverged" if any(r is not None and r.status == "diverged" for r in (first, steady)) else "ok",
    )


def host_facts(cfg: TrainConfig, device: torch.device, baseline: Measurement) -> HostFacts:
    flags = cpu_flags()
    return HostFacts(
        device_type=device.type, usable_cpus=usable_cpus(), precision=resolve_precision(cfg.precision, device),
        cuda_bf16=device.type == "cuda" and torch.cuda.is_bf16_supported(),
        cpu_bf16=cpu_has_native_bf16(), cpu_fp16=bool(flags & {"avx512_fp16", "amx_fp16"}),
        cxx_compiler=any(shutil.which(c) for c in ("c++", "g++", "clang++")),
        has_cuda_graph_field="cuda_graph" in TrainConfig.__dataclass_fields__,
        captured=baseline.step_mode != "eager",
    )


def _say(stream: TextIO | None, text: str) -> None:
    if stream is not None:
        print(text, file=stream, flush=True)


def diagnose(cfg: TrainConfig, data: DataBundle, device: torch.device, budget_s: float | None = None,
             steps: int | None = None, only: list[str] | None = None, repeats: int = DEFAULT_REPEATS,
             stream: TextIO | None = None, started_at: float | None = None,
             progress: "DoctorProgress | None" = None) -> DoctorResult:
    """Baseline, classification, then each runnable candidate rerun for the same steps (round-robin
    over repeats, the baseline interleaved) within budget_s. `only`: candidate keys or key prefixes
    to consider (e.g. ["workers", "loader-device"]); the rest are listed as not asked for.
    started_at: time.perf_counter() when the budget started (default: now).
    Every measurement runs under a time limit from what is left of the budget (less FINISH_RESERVE_S and
    the later baseline repeats' share); one that cannot finish in it is stopped and reported "over budget"
    with its partial figures. progress: told the result so far after every measurement (doctor.json)."""
    t0 = started_at if started_at is not None else time.perf_counter()
    budget_s = check_budget_s(budget_s if budget_s is not None else DEFAULT_BUDGET_S[device.type])
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as in run_training: the same kernels a real run gets
    if cfg.loader == "torch":  # torch repeats our contention finding as a multi-line warning per loader start
        warnings.filterwarnings("ignore", message="This DataLoader will create", category=UserWarning)
    left = lambda: budget_s - FINISH_RESERVE_S - (time.perf_counter() - t0)  # noqa: E731
    _say(stream, "baseline r1 ..." + ("" if steps else " (its last warm-up step sets the steps per window)"))
    try:
        baseline = [measure(cfg, data, device, steps, "baseline r1", gpu_profile=True,
                            limit_s=max(left(), BASELINE_MIN_LIMIT_S))]
    except OverBudget as e:  # nothing to compare a change with: one line, what it measured in it
        raise UsageError(f"--budget {budget_s:.0f} s: the baseline measurement alone did not fit; {e.describe()}; "
                         f"give a larger --budget") from None
    except Exception as e:  # the configuration itself does not fit: one line, as `cifarlab train` says it
        if is_out_of_memory(e):
            release_device_memory(device)
            raise UsageError(oom_message(cfg, e, device)) from None
        raise
    steps = baseline[0].window_steps
    _say(stream, f"baseline r1: {doctor_report.measurement_line(baseline[0])}; windows of up to {steps} steps")
    diag = classify(baseline[0])
    _say(stream, f"diagnosis: {diag.label}: " + "; ".join(diag.evidence + diag.findings))
    cands = propose(cfg, host_facts(cfg, device, baseline[0]), diag, COMPILE_COST_S)
    if only is not None:
        for c in cands:
            if c.status == "proposed" and not any(c.key.startswith(k) for k in only):
                c.status, c.reason = "not asked for", f"only {', '.join(only)} requested"
    runnable = [c for c in cands if c.status == "proposed"]
    base_cost = lambda: statistics.median(m.cost_s or 0.0 for m in baseline)  # noqa: E731
    est = lambda c: (statistics.median(m.cost_s or 0.0 for m in c.measurements) if c.measurements  # noqa: E731
                     else base_cost() * c.cost_factor + c.extra_cost_s)
    _say(stream, f"plan: {len(runnable)} runnable candidate(s), up to {repeats} round(s) of {steps}-step windows, each "
                 f"round followed by a baseline repeat; {len(cands) - len(runnable)} listed without a run")
    cuts: list[str] = []
    over_keys: set[str] = set()  # measured in an earlier round, then stopped over budget: not run again

    def cut_reason(c: Candidate) -> str:
        need = f"budget: one run needs ~{est(c):.0f} s"
        if c.extra_cost_s and "compile" in c.changes and device.type == "cpu":  # estimated, never started to find out
            need += (f" (~{c.extra_cost_s:.0f} s estimated for torch.compile to compile the step on this CPU, "
                     f"~{est(c) - c.extra_cost_s:.0f} s to measure it)")
        return f"{need}; {max(left(), 0.0):.0f} s were left"

    def snapshot(status: str, stopped: Stopped | None = None) -> DoctorResult:
        return _result(cfg, data, device, budget_s, steps, baseline, diag, cands, cuts, repeats, t0, status, stopped)

    def report() -> None:  # after every measurement: doctor.json keeps what was measured if the doctor is stopped
        if progress is not None:
            progress.update(snapshot("running"))

    report()  # the baseline and the diagnosis are on disk before the first candidate starts
    stopped: Stopped | None = None
    try:
        for r in range(1, repeats + 1):  # re-planned every round from the costs measured so far
            eligible = [c for c in runnable if c.status in ("proposed", "measured", "cut") and c.key not in over_keys]
            costs = [est(c) for c in eligible]
            rounds = choose_repeats(costs, base_cost(), left(), repeats - r + 1)  # rounds still affordable, this one included
            kept = set(plan_round(costs, base_cost(), left(), rounds))
            reserve_runs = rounds  # this round's baseline repeat and the later rounds': the noise needs them
            if not kept and (r == 1 or len(baseline) >= 2):  # no room for a candidate plus a baseline repeat, and the
                # noise is known (or nothing ran yet): one more, unconfirmed figure beats leaving the budget unused
                kept, reserve_runs = set(plan_round(costs, 0.0, left(), 1)), 0
            if not kept:
                break
            for i, c in enumerate(eligible):
                reserve = base_cost() * reserve_runs
                if i not in kept or est(c) + reserve > left():
                    if not c.measurements:
                        c.status, c.reason = "cut", cut_reason(c)
                    continue
                limit_s = min(left() - reserve, LIMIT_FACTOR * est(c) + LIMIT_SLACK_S)
                try:
                    m = measure(cfg.replace(**c.changes), data, device, steps, f"{c.key} r{r}", limit_s=limit_s)
                except OverBudget as e:  # stopped: its partial figures are reported, it is not run again
                    c.partial = e.partial
                    if c.measurements:  # earlier rounds' figures stand; this repeat is a cut
                        cuts.append(f"{c.key} r{r}: {e.describe()}")
                        over_keys.add(c.key)
                    else:
                        c.status, c.reason = OVER_BUDGET, e.describe()
                    _say(stream, f"{c.key} r{r}: {e.describe()}")
                    report()
                    continue
                except Exception as e:  # noqa: BLE001 -- a candidate that fails here is reported, not fatal
                    raise_if_interrupted(e)  # a signal that a compiler wrapped in its own error
                    if is_out_of_memory(e):
                        release_device_memory(device)
                    c.status, c.reason = "failed", f"{type(e).__name__}: {one_line(e, 280)}"
                    _say(stream, f"{c.key} r{r}: failed: {c.reason}")
                    report()
                    continue
                c.measurements.append(m)
                c.status, c.reason = "measured", ""
                _say(stream, f"{c.key} r{r}: {doctor_report.measurement_line(m)}")
                report()
            if base_cost() <= left():
                label = f"baseline r{len(baseline) + 1}"
                try:
                    baseline.append(measure(cfg, data, device, steps, label, limit_s=left()))
                except OverBudget as e:
                    cuts.append(f"{label}: {e.describe()}")
                    _say(stream, f"{label}: {e.describe()}")
                    break
                _say(stream, f"baseline r{len(baseline)}: {doctor_report.measurement_line(baseline[-1])}")
                report()
    except Stopped as e:  # Ctrl-C / SIGTERM: what was measured so far becomes the result, and is written
        stopped = e
        _say(stream, f"stopped by {e.signal_name}: writing what was measured so far")
    for c in runnable:
        if c.status == "proposed" and stopped is not None:
            c.status, c.reason = "not run", f"interrupted by {stopped.signal_name} before it ran"
        elif c.status == "proposed":
            c.status, c.reason = "cut", cut_reason(c)
    return snapshot("stopped" if stopped is not None else "complete", stopped)


def _result(cfg: TrainConfig, data: DataBundle, device: torch.device, budget_s: float, steps: int,
            baseline: list[Measurement], diag: Diagnosis, cands: list[Candidate], extra_cuts: list[str], repeats: int,
            t0: float, status: str, stopped: Stopped | None = None) -> DoctorResult:
    """The doctor's result from what is measured so far (the end, or a snapshot while it runs)."""
    cuts = [f"{c.key} ({' '.join(c.flags)}): not run, {c.reason}" for c in cands if c.status == "cut"]
    cuts += [f"{c.key}: {len(c.measurements)} of {repeats} repeat(s) (budget)" for c in cands
             if c.status == "measured" and len(c.measurements) < repeats]
    if len(baseline) < repeats + 1:
        cuts.append(f"baseline: {len(baseline)} of {repeats + 1} repeat(s) (budget)")
    cuts += extra_cuts
    reps = max((len(c.measurements) for c in cands), default=0)
    base = summarize(baseline)
    assert base is not None
    noise, noise_note = noise_share(base)
    ranked = rank(cands, base)
    best = next((c for c, s, _ in ranked if verdict(s, base, noise) == "helps"), None)
    result = DoctorResult(
        config=cfg, device=str(device), environment=environment(device), data_description=data.description,
        budget_s=budget_s, steps=steps, warmup_steps=baseline[0].warmup_steps, repeats=reps, baseline=baseline,
        diagnosis=diag, candidates=cands, noise=noise, noise_note=noise_note, ranked=ranked, best=best,
        recommendation="", cuts=cuts, status=status, stopped=stopped,
        utilization=for_run(cfg.norm, device, resolve_precision(cfg.precision, device)),
    )
    result.recommendation = doctor_report.recommendation(result)
    result.elapsed_s = time.perf_counter() - t0
    return result


class DoctorProgress:
    """The doctor's folder while it runs: update() keeps the latest result and rewrites doctor.json (atomically)
    from it; save(status) rewrites it once more with that status -- the one function a stop (a signal handler,
    an error) calls so that what was measured stays on disk."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.latest: DoctorResult | None = None

    def update(self, result: DoctorResult) -> None:
        result.path = self.path
        self.latest = result
        self.save(result.status)

    def save(self, status: str) -> None:
        if self.latest is not None:
            self.latest.status = status
            with contextlib.suppress(OSError):  # a full disk: the final write says so in one line
                doctor_report.write_json(self.latest, self.path)


def run_doctor(cfg: TrainConfig, budget_s: float | None, out_dir: str | Path, stream: TextIO | None,
               steps: int | None = None, only: list[str] | None = None, repeats: int = DEFAULT_REPEATS) -> DoctorResult:
    """`cifarlab doctor`: validate, load the data once, diagnose, print the table, write the folder.
    The budget counts from here: loading the data is part of it."""
    t0 = time.perf_counter()
    if budget_s is not None:
        check_budget_s(budget_s)
    device, data = prepare(cfg.replace(out_dir=str(out_dir)))
    # --precision auto: what `cifarlab train` would run, its cached verdict (the doctor never calibrates)
    choice = choose_precision(cfg, device, measure=False)
    if choice.calibration is not None:
        cfg = cfg.replace(precision=choice.precision)
    _say(stream, f"doctor: {data.description} (training steps only: the test split is never evaluated)")
    _say(stream, f"device: {device}; loader {cfg.loader}" + (f", workers {cfg.workers}" if cfg.loader == "torch" else "")
         + f", batch {cfg.batch_size}; budget {budget_s if budget_s is not None else DEFAULT_BUDGET_S[device.type]:.0f} s")
    progress = DoctorProgress(create_run_dir(out_dir, "doctor"))
    if cfg.precision == "auto" or choice.calibration is not None:
        _say(stream, f"precision auto: {choice.reason}")
    _say(stream, f"folder: {progress.path} (doctor.json rewritten after every measurement)")
    try:
        result = diagnose(cfg, data, device, budget_s, steps=steps, only=only, repeats=repeats, stream=stream,
                          started_at=t0, progress=progress)
    except BaseException:
        if progress.latest is None:  # nothing measured yet: no folder left behind
            with contextlib.suppress(OSError):
                progress.path.rmdir()
        progress.save("stopped")  # an error: doctor.json keeps every measurement finished before it
        raise
    try:
        with signals_deferred():  # a Ctrl-C now would leave a folder without its report
            result.path = doctor_report.write_folder(result, out_dir, progress.path)
    except OSError as e:  # a full or read-only disk: each file is whole or absent (atomic writes)
        raise UsageError(f"cannot write the doctor's folder under {str(out_dir)!r}: {e.strerror or e}; no file is "
                         f"half-written -- free some space or choose another --out") from None
    _say(stream, doctor_report.console_text(result))
    if result.stopped is not None:
        not_run = [c.key for c in result.candidates if c.status == "not run"]
        raise Stopped(result.stopped.signum, f"the measurements taken so far are in {str(result.path / 'doctor.json')!r}"
                      + (f"; not run: {', '.join(not_run)}" if not_run else ""))
    return result
