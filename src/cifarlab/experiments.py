"""The lab's experiments: C1-C8 and Q1-Q4, each one small function deriving its runs from one base config.

An experiment is `run(ctx) -> dict`: it trains through `LabContext.train` (which calls
`runner.run_training`, so every run is an ordinary run folder inside the lab folder) and returns only
the JSON-able facts its report section needs beyond the runs themselves (stop reasons, profiler
tables, skip notes). Its `render` function (in report.py) builds the section from results.json alone.

Other suites (e.g. the scaling suite in cifarlab.scaling) add experiments with `register` and suites
with `register_suite`; the plugin modules in SUITE_PLUGINS are imported on demand.
"""

from __future__ import annotations

import importlib
import os
import statistics
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from cifarlab import report
from cifarlab.config import COMPILE_MODES, MAX_WORKERS, LabPreset, TrainConfig
from cifarlab.runs import summarize

if TYPE_CHECKING:
    from cifarlab.data import DataBundle
    from cifarlab.engine import Hooks

# Modules that register more experiments / suites when imported (absent modules are skipped).
SUITE_PLUGINS = ("cifarlab.scaling",)
FULL_EPOCH_IMAGES = 50_000  # one CIFAR-10 training epoch (C5 extrapolates to it)


class LabInterrupted(KeyboardInterrupt):
    """A run inside the lab stopped on Ctrl-C: stop the lab after recording what finished."""


@dataclass(frozen=True)
class Experiment:
    key: str  # "c1" ... used by --only and as the folder name
    title: str
    run: Callable[["LabContext"], dict[str, Any]]
    render: Callable[[dict[str, Any], "report.ReportContext"], list[Any]]
    planned_epochs: Callable[[LabPreset, bool], int] = lambda preset, cuda: preset.epochs  # for the lab's ETA


@dataclass
class LabContext:
    """What an experiment may use: the base config, the data (loaded once per lab), the device."""

    base: TrainConfig  # the preset applied to TrainConfig defaults; classic pipeline
    preset: LabPreset
    data: "DataBundle"
    device: Any  # torch.device
    lab_dir: Path
    fast_loader: str  # "device" when the fast path is installed, else "torch"
    repeats: int
    progress_hooks: Callable[[str, str, TrainConfig], "Hooks"]
    should_stop: Callable[[], bool] = lambda: False  # Ctrl-C / SIGTERM seen: start no new run
    shared: dict[str, Any] = field(default_factory=dict)  # e.g. C3's best worker count, for C4/C5
    runs: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # key -> finished run infos
    _done: dict[TrainConfig, dict[str, Any]] = field(default_factory=dict)

    def fast(self, cfg: TrainConfig) -> TrainConfig:
        """The fast path (device-resident data when available, channels_last, auto precision,
        synchronization only at epoch boundaries)."""
        return cfg.replace(loader=self.fast_loader, channels_last=True, precision="auto", sync_timing=False)

    @staticmethod
    def classic(cfg: TrainConfig) -> TrainConfig:
        """The lab's classic pipeline as written (DataLoader + PIL transforms, fp32, contiguous NCHW) with
        the exact synchronized data/h2d/compute split."""
        return cfg.replace(loader="torch", sync_timing=True, channels_last=False, precision="fp32")

    def train(
        self, key: str, label: str, cfg: TrainConfig, data: "DataBundle | None" = None,
        hooks: "Hooks | None" = None, reuse: bool = True,
    ) -> dict[str, Any]:
        """One run through runner.run_training into <lab>/<key>/<time>-<label>. A config already run in
        this lab (e.g. C6's SGD = C1) is reused, not trained twice, unless reuse=False."""
        from cifarlab.runner import run_training

        if self.should_stop():
            raise LabInterrupted(f"{key}/{label} not started")
        identity = cfg.replace(name="run", out_dir="", tags=())
        if reuse and data is None and identity in self._done:
            info = {**self._done[identity], "label": label, "reused": True}
            self.runs.setdefault(key, []).append(info)
            return info
        cfg = cfg.replace(out_dir=str(self.lab_dir / key), name=label)
        with warnings.catch_warnings():
            # torch's multi-line "excessive worker creation" warning; the report states it per point
            warnings.filterwarnings("ignore", message="This DataLoader will create")
            result = run_training(cfg, hooks=_merge(self.progress_hooks(key, label, cfg), hooks),
                                  data=data or self.data)
        rows = [r.to_dict() for r in result.records]
        info = {
            "label": label,
            "path": os.path.relpath(result.path, self.lab_dir),
            "status": result.status,
            "config": cfg.to_dict(),
            "device": result.device_label,
            "precision": result.precision,
            "data": result.data_description,
            "summary": summarize(rows),
            "records": rows,
        }
        self.runs.setdefault(key, []).append(info)
        if data is None:
            self._done[identity] = info
        if result.status == "interrupted":
            raise LabInterrupted(f"{key}/{label}")
        return info

    def best_workers(self) -> tuple[int, str]:
        if "best_workers" in self.shared:
            return self.shared["best_workers"], "C3's best count"
        return self.base.workers, f"C3 not run in this lab; the default {self.base.workers} workers"


def _merge(a: "Hooks", b: "Hooks | None") -> "Hooks":
    from cifarlab.engine import Hooks

    if b is None:
        return a

    def both(f: Any, g: Any) -> Any:
        if f is None or g is None:
            return f or g
        return lambda *args: (f(*args), g(*args))[-1]

    stop = None
    if a.should_stop or b.should_stop:
        stop = lambda: bool((a.should_stop and a.should_stop()) or (b.should_stop and b.should_stop()))  # noqa: E731
    return Hooks(on_step=both(a.on_step, b.on_step), on_epoch=both(a.on_epoch, b.on_epoch), should_stop=stop)


def _median(values: list[float | None]) -> float:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else float("inf")


# ------------------------------------------------------------------------------------ experiments


def c1_training(ctx: LabContext) -> dict[str, Any]:
    ctx.train("c1", "sgd", ctx.fast(ctx.base))
    return {}


def c2_breakdown(ctx: LabContext) -> dict[str, Any]:
    ctx.train("c2", f"classic-w{ctx.base.workers}", ctx.classic(ctx.base))
    return {}


def c3_workers(ctx: LabContext) -> dict[str, Any]:
    """Workers 0, 4, 8, ... until the data wait stops improving; every point a fresh, seeded model."""
    from cifarlab.runtime import usable_cpus

    p = ctx.preset
    base = ctx.classic(ctx.base).replace(evaluate=False)
    points: list[dict[str, Any]] = []
    best: tuple[int, float] | None = None
    workers = 0
    while True:
        runs = [ctx.train("c3", f"workers-{workers}-r{r + 1}", base.replace(workers=workers, seed=base.seed + r))
                for r in range(ctx.repeats)]
        data_s = _median([r["summary"].get("mean_data_s") for r in runs])
        points.append({"workers": workers, "runs": [r["label"] for r in runs], "median_data_s": data_s})
        if best is not None and not data_s < best[1] * (1 - p.sweep_min_gain):
            stop = f"{workers} workers did not cut the data wait by {p.sweep_min_gain:.0%} vs {best[0]} workers"
            break
        best = (workers, data_s)
        if p.sweep_max_points is not None and len(points) >= p.sweep_max_points:
            stop = f"the {p.name} preset caps the sweep at {p.sweep_max_points} worker counts"
            break
        workers += p.sweep_step
        if workers > MAX_WORKERS:
            stop = f"reached the {MAX_WORKERS}-worker limit"
            break
    ctx.shared["best_workers"] = best[0]
    return {
        "points": points,
        "best_workers": best[0],
        "usable_cpus": usable_cpus(),
        "stop_rule": (f"workers 0, {p.sweep_step}, {2 * p.sweep_step}, ...; stop at the first count whose median "
                      f"data wait per epoch is not at least {p.sweep_min_gain:.0%} below the best so far "
                      f"(within noise is not an improvement); the best is the last count that improved"),
        "stop_reason": stop,
    }


def _profiled_train(ctx: LabContext, key: str, label: str, cfg: TrainConfig) -> dict[str, Any]:
    """A run with torch.profiler recording a window of steps; Chrome trace saved in the run folder."""
    from torch.profiler import ProfilerActivity, profile, schedule

    from cifarlab.engine import Hooks

    cuda = ctx.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    steps_per_epoch = -(-len(ctx.data.train) // cfg.batch_size)
    if cfg.max_steps:
        steps_per_epoch = min(steps_per_epoch, cfg.max_steps)
    active = max(1, min(ctx.preset.profile_steps, steps_per_epoch * cfg.epochs - 1))
    tmp = ctx.lab_dir / key / f".{label}.pt.trace.json"
    tmp.parent.mkdir(parents=True, exist_ok=True)
    captured: dict[str, Any] = {}

    def ready(prof: Any) -> None:
        prof.export_chrome_trace(str(tmp))
        captured["top_ops"] = _top_ops(prof, cuda)

    os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # kineto's start/stop chatter on stderr
    with profile(activities=activities, schedule=schedule(wait=0, warmup=1, active=active, repeat=1),
                 on_trace_ready=ready) as prof:
        info = ctx.train(key, label, cfg, hooks=Hooks(on_step=lambda e, s, n: prof.step()), reuse=False)
    trace = Path(ctx.lab_dir) / info["path"] / "profile.pt.trace.json"
    if tmp.exists():
        os.replace(tmp, trace)  # TensorBoard's profiler plugin reads *.pt.trace.json
    info["profile"] = {
        "trace": os.path.relpath(trace, ctx.lab_dir) if trace.exists() else None,
        "steps_recorded": active,
        "top_ops": captured.get("top_ops", []),
    }
    return info


def _top_ops(prof: Any, cuda: bool, n: int = 10) -> list[dict[str, Any]]:
    events = list(prof.key_averages())

    def device_us(e: Any) -> float:
        return float(getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0.0)) or 0.0)

    events.sort(key=(lambda e: device_us(e)) if cuda else (lambda e: e.self_cpu_time_total), reverse=True)
    return [{"name": e.key, "calls": e.count, "self_cpu_ms": e.self_cpu_time_total / 1e3,
             "cpu_total_ms": e.cpu_time_total / 1e3, "self_device_ms": device_us(e) / 1e3} for e in events[:n]]


def c4_profile(ctx: LabContext) -> dict[str, Any]:
    best, source = ctx.best_workers()
    base = ctx.classic(ctx.base).replace(evaluate=False)
    for workers in [1] + ([best] if best != 1 else []):  # 1 worker first: the report compares it to the best
        label = f"workers-{workers}" + ("-best" if workers == best else "")
        _profiled_train(ctx, "c4", label, base.replace(workers=workers))
    return {"best_workers": best, "best_from": source}


def c5_cpu_gpu(ctx: LabContext) -> dict[str, Any]:
    """CPU on a subset, extrapolated to a full epoch; GPU (fast path) when there is one."""
    from cifarlab.data import DataBundle, take

    p = ctx.preset
    workers, source = ctx.best_workers()
    train = take(ctx.data.train, p.cpu_subset, ctx.base.seed)
    cpu_data = DataBundle(train=train, test=ctx.data.test, source=ctx.data.source,
                          description=f"{ctx.data.description}; C5 CPU subset {len(train)} train images")
    ctx.train("c5", "cpu", ctx.classic(ctx.base).replace(device="cpu", workers=workers, subset=len(train),
                                                         epochs=p.cpu_epochs, evaluate=False), data=cpu_data)
    gpu = ctx.device.type == "cuda"
    if gpu:
        ctx.train("c5", "gpu", ctx.fast(ctx.base))
    return {"cpu_subset": len(train), "cpu_workers": workers, "cpu_workers_from": source,
            "full_epoch_images": FULL_EPOCH_IMAGES,
            "gpu_note": None if gpu else f"no GPU used (device {ctx.device.type}): CPU alone is reported"}


def c6_optimizers(ctx: LabContext) -> dict[str, Any]:
    from cifarlab.optim import OPTIMIZERS

    for name in OPTIMIZERS:  # a diverged run comes back with status "diverged"; the lab moves on
        ctx.train("c6", name, ctx.fast(ctx.base).replace(optimizer=name))
    return {"chance_margin": ctx.preset.chance_margin}


def c7_batchnorm(ctx: LabContext) -> dict[str, Any]:
    base = ctx.fast(ctx.base)
    ctx.train("c7", "batchnorm", base)
    ctx.train("c7", "no-batchnorm", base.replace(norm="none"))
    return {}


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


def q_facts(ctx: LabContext) -> dict[str, Any]:
    from cifarlab.modelfacts import explain, inspect_model, structure_facts

    from cifarlab.models import resnet18

    facts = inspect_model(("sgd", "adam"), norm="batch")
    no_bn = structure_facts(resnet18(norm="none"))  # C7's model: parameters only (gradient elements = parameters)
    return {"facts": facts, "facts_no_bn": no_bn, "answers": [list(qa) for qa in explain(facts)]}


# --------------------------------------------------------------------------------------- registry


def _sweep_epochs(p: LabPreset, cuda: bool) -> int:
    return p.epochs * p.repeats * min(p.sweep_max_points or 4, 4)


EXPERIMENTS: dict[str, Experiment] = {}
SUITES: dict[str, tuple[str, ...]] = {}


def register(experiment: Experiment) -> None:
    EXPERIMENTS[experiment.key] = experiment


def register_suite(name: str, keys: tuple[str, ...]) -> None:
    SUITES[name] = tuple(keys)


for _exp in (
    Experiment("c1", "C1 Training: per-epoch loss and top-1", c1_training, report.render_c1),
    Experiment("c2", "C2 Where an epoch's time goes", c2_breakdown, report.render_c2),
    Experiment("c3", "C3 Data-loader worker sweep", c3_workers, report.render_c3, _sweep_epochs),
    Experiment("c4", "C4 Profiling 1 worker vs the best", c4_profile, report.render_c4, lambda p, c: 2 * p.epochs),
    Experiment("c5", "C5 CPU vs GPU epoch time", c5_cpu_gpu, report.render_c5,
               lambda p, cuda: p.cpu_epochs + (p.epochs if cuda else 0)),
    Experiment("c6", "C6 Optimizers", c6_optimizers, report.render_c6, lambda p, c: 4 * p.epochs),
    Experiment("c7", "C7 Without batch normalization", c7_batchnorm, report.render_c7, lambda p, c: p.epochs),
    Experiment("c8", "C8 torch.compile", c8_compile, report.render_c8,
               lambda p, cuda: 4 * p.compile_epochs if (cuda or p.compile_on_cpu) else 0),
    Experiment("q", "Q1-Q4 Model facts", q_facts, report.render_q, lambda p, c: 1),
):
    register(_exp)
register_suite("lab", ("c1", "c2", "c3", "c4", "c5", "c6", "c7", "c8", "q"))


def load_plugins() -> None:
    """Import the modules that register other suites (missing ones are simply not installed)."""
    for name in SUITE_PLUGINS:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:
                raise
