"""`cifarlab lab`: run a suite of items (the lab: C1-C8, Q1-Q4) into one lab folder and write the report.

The lab folder: <out>/<UTC time>-lab-<suite>-<preset>/ holding results.json (rewritten atomically after
every item, so an interrupted lab still has a valid one), one sub-folder per item with ordinary run
folders inside, and the report (report.md, report.html, csv/, plots/)."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import torch

from cifarlab.config import LAB_PRESETS, LabConfig, LabPreset, TrainConfig
from cifarlab.core.errors import UsageError
from cifarlab.core.fileio import write_json_atomic
from cifarlab.core.folders import create_run_dir, utc_now
from cifarlab.core.runtime import device_label, environment, usable_cpus
from cifarlab.core.signals import StopOnSignal
from cifarlab.core.step_bar import StepBar
from cifarlab.data import LOADER_BUILDERS
from cifarlab.lab.budget import check_budget, fit_budget, print_budget
from cifarlab.lab.context import LabContext, save_traceback
from cifarlab.lab.plan import make_plan, print_plan, print_time_table, time_table
from cifarlab.lab.registry import EXPERIMENTS, SUITES
from cifarlab.lab.render import build_report
from cifarlab.run.console import epoch_line
from cifarlab.run.folder import TIMING_NOTES
from cifarlab.run.runner import prepare
from cifarlab.run.tensorboard_log import DEFAULT_FOLDER
from cifarlab.train.engine import Hooks

LAB_SCHEMA = "cifarlab.lab/1"


RESULTS_FILE = "results.json"


ALIASES = {"q1": "q", "q2": "q", "q3": "q", "q4": "q"}  # Q1-Q4 come from one model inspection


def fmt_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


@dataclass
class LabProgress:
    """One line per finished epoch with the lab's progress and a rough ETA (stdout); an in-epoch bar
    on stderr when it is a terminal. ETA: once the plan is known, the plan's estimates of the items not
    finished yet (less the time the current item has run), scaled by how the finished items compared with
    their estimates; before that (or for items without an estimate) mean seconds per epoch so far x epochs
    still planned."""

    planned: dict[str, int]
    out: TextIO = field(default_factory=lambda: sys.stdout)
    err: TextIO = field(default_factory=lambda: sys.stderr)
    done_epochs: int = 0
    position: str = ""
    should_stop: Any = None  # polled by the engine after every step (StopOnSignal)
    estimates_s: dict[str, float | None] = field(default_factory=dict)  # the plan's, per item key

    def __post_init__(self) -> None:
        self.t0 = time.perf_counter()
        self.step_bar = StepBar(self.err, batch_size=1, extra=self.status)  # the lab's progress beside the epoch's
        self._current_done = 0
        self._item_key = ""
        self._item_t0 = self.t0
        self._finished: list[tuple[float, float]] = []  # (estimate_s, elapsed_s) of finished estimated items

    def eta_s(self) -> float | None:
        left = [k for k, n in self.planned.items() if n or k == self._item_key]  # finished items' plans are zeroed
        if self.estimates_s:  # items the plan could not estimate (E, Q) count as 0 here; status() says "+ ?"
            est = sum(self.estimates_s[k] or 0.0 for k in left)
            est -= min(self.estimates_s.get(self._item_key) or 0.0, time.perf_counter() - self._item_t0)
            done_est = sum(e for e, _ in self._finished)
            scale = min(3.0, max(0.5, sum(a for _, a in self._finished) / done_est)) if done_est > 0 else 1.0
            return max(0.0, est) * scale
        if self.done_epochs == 0:
            return None
        # finished experiments' plans are zeroed, so this is what is left of the current and later ones
        remaining = max(0, sum(self.planned.values()) - self._current_done)
        return (time.perf_counter() - self.t0) / self.done_epochs * remaining

    def status(self) -> str:
        eta = self.eta_s()
        left = [k for k, n in self.planned.items() if n or k == self._item_key]
        unknown = " + ?" if self.estimates_s and any(self.estimates_s.get(k) is None for k in left) else ""
        return (f"lab {fmt_duration(time.perf_counter() - self.t0)} elapsed, "
                f"ETA {'?' if eta is None else '~' + fmt_duration(eta) + unknown}")

    def start(self, index: int, total: int, key: str, title: str) -> None:
        self.position = f"{index}/{total} {key}"
        self._current_done = 0
        self._item_key, self._item_t0 = key, time.perf_counter()
        print(f"\n== [{index}/{total}] {title}  ({self.status()})", file=self.out, flush=True)

    def finish(self, key: str, status: str, elapsed_s: float) -> None:
        estimate = self.estimates_s.get(key)
        if estimate and status == "completed":
            self._finished.append((estimate, elapsed_s))
        self.planned[key] = 0
        self._item_key = ""
        self._current_done = 0
        print(f"   {key}: {status} in {fmt_duration(elapsed_s)}", file=self.out, flush=True)

    def hooks(self, key: str, label: str, cfg: TrainConfig) -> Any:

        cores = usable_cpus()
        if cfg.loader == "torch" and cfg.workers > cores:
            print(f"   warning: {label}: {cfg.workers} loader workers on {cores} usable CPU core(s); they compete "
                  f"with training for the same cores", file=self.out, flush=True)

        def on_step(epoch: int, step: int, steps_total: int) -> None:
            self.step_bar.batch_size = cfg.batch_size
            self.step_bar.on_step(f"[{self.position}] {label} epoch {epoch}/{cfg.epochs}", epoch, step, steps_total)

        def on_epoch(record: Any, state: Any) -> None:
            self.done_epochs += 1
            self._current_done += 1
            self.step_bar.close()
            line = epoch_line(record, cfg.epochs, show_utilization=state.device.type == "cuda")
            print(f"   {label}: {line}  | {self.status()}", file=self.out, flush=True)

        return Hooks(on_step=on_step, on_epoch=on_epoch, should_stop=self.should_stop)


def resolve_keys(suite: str, only: tuple[str, ...]) -> list[str]:

    if suite not in SUITES:
        raise UsageError(f"--suite {suite!r} is not known; choose one of: {', '.join(SUITES)}")
    keys = list(SUITES[suite])
    if not only:
        return keys
    wanted = []
    for item in only:
        k = ALIASES.get(item.strip().lower(), item.strip().lower())
        if k not in keys:
            names = ", ".join(keys + list(a for a, t in ALIASES.items() if t in keys))
            raise UsageError(f"--only {item!r} is not an item of suite {suite!r}; choose from: {names}")
        wanted.append(k)
    return [k for k in keys if k in wanted]  # the suite's order, each once


def resolve_preset(name: str | None, device: str) -> LabPreset:
    if name is None:

        name = "full" if device != "cpu" and torch.cuda.is_available() else "quick"
    if name not in LAB_PRESETS:
        raise UsageError(f"--preset {name!r} is not known; choose one of: {', '.join(LAB_PRESETS)}")
    return LAB_PRESETS[name]


def base_config(lab: LabConfig, preset: LabPreset) -> TrainConfig:
    # Lab runs are measurements: no per-epoch checkpoints (90 MB each, dozens of runs).
    extra = {"checkpoint_every": 0} if "checkpoint_every" in TrainConfig.__dataclass_fields__ else {}
    return TrainConfig(
        data_dir=lab.data_dir, dataset=preset.dataset or lab.dataset, subset=preset.subset,
        test_subset=preset.test_subset, epochs=preset.epochs, batch_size=preset.batch_size,
        test_batch_size=preset.test_batch_size, max_steps=preset.max_steps, device=lab.device,
        seed=lab.seed, out_dir=lab.out_dir, name="lab", **extra,
    ).validate()


def run_size(base: TrainConfig, train_images: int) -> dict[str, int]:
    """Training images and steps one of the lab's runs sees (the report's 'too short to learn' test)."""
    steps = -(-train_images // base.batch_size)
    if base.max_steps:
        steps = min(steps, base.max_steps)
    images = min(train_images, steps * base.batch_size)
    return {"images_per_run": base.epochs * images, "steps_per_run": base.epochs * steps}


def data_banner(source: str, preset: LabPreset | None = None) -> str:
    if source == "synthetic" and preset is not None and preset.dataset == "synthetic":
        return (f"SYNTHETIC DATA: the {preset.name} preset always runs on a deterministic CIFAR-shaped stand-in "
                "(--data and --dataset are not used); timings are real, accuracies are NOT CIFAR-10 accuracies")
    if source == "synthetic":
        return ("SYNTHETIC DATA: CIFAR-10 was not available (or not asked for), so this lab ran on a deterministic "
                "CIFAR-shaped stand-in; timings are real, accuracies are NOT CIFAR-10 accuracies")
    return "CIFAR-10"


def run_lab(lab: LabConfig, out: TextIO | None = None) -> tuple[Path, int]:
    """Run the suite; returns (lab folder, exit code: 0 done, 3 an experiment failed, 130 interrupted)."""

    out = out or sys.stdout
    t_start = time.perf_counter()  # the lab's wall time: from here to the report written
    if lab.repeats is not None and (isinstance(lab.repeats, bool) or not 1 <= lab.repeats <= 100):
        raise UsageError(f"--repeats must be between 1 and 100 (got {lab.repeats}); the full preset uses 3")
    budget_s = check_budget(lab.budget_min)
    keys = resolve_keys(lab.suite, lab.only)
    preset = resolve_preset(lab.preset, lab.device)
    base = base_config(lab, preset)
    device, data = prepare(base)
    fast_loader = "device" if "device" in LOADER_BUILDERS else "torch"
    lab_dir = create_run_dir(lab.out_dir, f"lab-{lab.suite}-{preset.name}")
    cuda = device.type == "cuda"
    progress = LabProgress(planned={k: EXPERIMENTS[k].planned_epochs(preset, cuda) for k in keys}, out=out)
    ctx = LabContext(base=base, preset=preset, data=data, device=device, lab_dir=lab_dir, fast_loader=fast_loader,
                     repeats=lab.repeats or preset.repeats, progress_hooks=progress.hooks, keys=tuple(keys),
                     note=lambda message: print(f"   {message}", file=out, flush=True))
    if lab.tensorboard is not None:  # a given DIR holds many labs: each in its own folder, runs as <item>/<label>
        ctx.tensorboard = Path(lab.tensorboard) / lab_dir.name if lab.tensorboard else lab_dir / DEFAULT_FOLDER
    banner = data_banner(data.source, preset)
    env = environment(device)
    env["usable_cpus"] = usable_cpus()
    doc: dict[str, Any] = {
        "schema": LAB_SCHEMA,
        "suite": lab.suite,
        "preset": preset.to_dict(),
        "lab_config": {**lab.__dict__, "only": list(lab.only)},
        "base_config": base.to_dict(),
        "repeats": ctx.repeats,
        "status": "running",
        "started": utc_now(),
        "finished": None,
        "elapsed_s": 0.0,
        "machine": env,
        "device": device_label(device),
        "data": {"source": data.source, "description": data.description, "banner": banner,
                 "train_images": len(data.train), "test_images": len(data.test)},
        "fast_loader": fast_loader,
        "run_size": run_size(base, len(data.train)),
        "timing_notes": TIMING_NOTES,
        "order": keys,
        "experiments": {k: {"title": EXPERIMENTS[k].title, "status": "not run", "runs": []} for k in keys},
    }
    print(f"cifarlab lab: suite {lab.suite}, preset {preset.name} ({preset.about})", file=out)
    if data.source == "synthetic":
        print(f"!! {banner}", file=out)
    print(f"data: {data.description}", file=out)
    print(f"device: {device_label(device)}; fast path: "
          + ("device-resident loader" if fast_loader == "device" else "not installed, classic loader used instead"),
          file=out)
    print(f"lab folder: {lab_dir}", file=out, flush=True)
    if ctx.tensorboard is not None:
        doc["tensorboard"] = {"dir": str(ctx.tensorboard), "runs": "<item>/<label>, e.g. c6/adam"}
        print(f"tensorboard: tensorboard --logdir {ctx.tensorboard}", file=out, flush=True)
    overhead: dict[str, float] = {"setup": time.perf_counter() - t_start}
    # Ctrl-C / SIGTERM: the running step finishes, its run keeps its finished epochs, no new run starts;
    # a second signal raises KeyboardInterrupt at once (still caught per experiment).
    with StopOnSignal() as stop:
        progress.should_stop = ctx.should_stop = stop.should_stop
        t_plan = time.perf_counter()
        doc["plan"] = make_plan(ctx, keys, EXPERIMENTS)
        if budget_s is not None:  # --budget: a smaller preset for C3 and C8, re-estimated from the same calibration
            cal = doc["plan"]["calibration"]
            doc["budget"], doc["plan"] = fit_budget(ctx, doc["plan"], budget_s, time.perf_counter() - t_start,
                                                    lambda c: make_plan(c, keys, EXPERIMENTS, cal))
            doc["preset"], doc["repeats"] = ctx.preset.to_dict(), ctx.repeats
            progress.planned = {k: EXPERIMENTS[k].planned_epochs(ctx.preset, cuda) for k in keys}
        progress.estimates_s = {item["key"]: item["estimate_s"] for item in doc["plan"]["items"]}
        print_plan(doc["plan"], out, fmt_duration)
        if budget_s is not None:
            print_budget(doc["budget"], out, fmt_duration)
        overhead["plan"] = time.perf_counter() - t_plan
        t0 = time.perf_counter()
        write_json_atomic(lab_dir / RESULTS_FILE, doc)
        overhead["bookkeeping"] = time.perf_counter() - t0
        progress.t0 = t0  # the ETA covers the items, not the setup
        try:
            exit_code = _run_experiments(keys, EXPERIMENTS, ctx, doc, progress, stop, lab_dir, t_start, overhead)
        finally:
            if doc["status"] == "running":
                doc["status"] = "partial"  # an exception we did not expect ended the loop
            if stop.signal_name:
                doc["stopped_by"] = stop.signal_name
            t_write = time.perf_counter()
            doc["finished"] = utc_now()
            doc["elapsed_s"] = time.perf_counter() - t_start
            write_json_atomic(lab_dir / RESULTS_FILE, doc)
            overhead["bookkeeping"] += time.perf_counter() - t_write
    t_report = time.perf_counter()
    build_report(lab_dir)
    overhead["report"] = time.perf_counter() - t_report
    # The time table goes into results.json and the report's header; this last rewrite reuses the plots
    # just drawn (milliseconds), so the wall time ends with the report written.
    wall_s = time.perf_counter() - t_start
    doc["elapsed_s"] = wall_s
    doc["overhead_s"] = overhead
    doc["time_table"] = time_table(doc, overhead, wall_s)
    write_json_atomic(lab_dir / RESULTS_FILE, doc)
    paths = build_report(lab_dir, reuse_plots=True)
    print_time_table(doc["time_table"], wall_s, out)
    print(f"\nlab {doc['status']} in {fmt_duration(doc['elapsed_s'])}; report: {paths['md']} (also report.html, "
          f"results.json, csv/, plots/)", file=out)
    return lab_dir, exit_code


def _run_experiments(keys: list[str], registry: dict[str, Any], ctx: Any, doc: dict[str, Any],
                     progress: LabProgress, stop: Any, lab_dir: Path, t0: float, overhead: dict[str, float]) -> int:
    """Run each experiment, rewriting results.json after each; returns the lab's exit code."""

    exit_code = 0
    for i, key in enumerate(keys, 1):
        exp = registry[key]
        progress.start(i, len(keys), key, exp.title)
        t_exp = time.perf_counter()
        entry: dict[str, Any] = {"title": exp.title}
        try:
            entry["result"] = exp.run(ctx)
            entry["status"] = "skipped" if entry["result"].get("skipped") else "completed"
        except KeyboardInterrupt:
            entry["status"] = "interrupted"
        except UsageError:
            raise
        except Exception as e:  # one broken experiment must not cost the others' results
            entry["error"] = f"{type(e).__name__}: {e}"
            if stop.should_stop():
                # The stop signal broke what was running (a group SIGTERM kills Inductor's compile workers and
                # the compile raises): an interruption, not a failure of the experiment.
                entry["status"] = "interrupted"
            else:
                entry["status"] = "failed"
                entry["traceback_file"] = save_traceback(lab_dir, key, "traceback.txt", e)
                print(f"   {key} FAILED: {entry['error']} (traceback: {entry['traceback_file']})", file=sys.stderr)
                exit_code = 3
        entry["runs"] = ctx.runs.get(key, [])
        t_write = time.perf_counter()
        entry["elapsed_s"] = t_write - t_exp
        if entry["status"] == "interrupted" and stop.signal_name:
            entry["stopped_by"] = stop.signal_name  # the report names it (SIGTERM is not a Ctrl-C)
        doc["experiments"][key] = entry
        doc["elapsed_s"] = time.perf_counter() - t0
        write_json_atomic(lab_dir / RESULTS_FILE, doc)
        progress.finish(key, entry["status"], entry["elapsed_s"])
        overhead["bookkeeping"] += time.perf_counter() - t_write
        if entry["status"] == "interrupted" or stop.should_stop():
            doc["status"] = "interrupted"
            print("lab interrupted: finished experiments are kept; the rest are marked 'not run'", file=progress.out)
            return stop.exit_code or 130
    doc["status"] = "completed" if exit_code == 0 else "partial"
    return exit_code
