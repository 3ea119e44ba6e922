"""The doctor's judgement, as pure functions over measured numbers: what one measurement holds, which
bottleneck class it shows (thresholds below, printed with every diagnosis), which changes address it,
and how measured candidates rank against the baseline's noise. No torch, no clocks, no files here:
doctor.py measures, doctor_report.py writes."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from cifarlab.config import TrainConfig
from cifarlab.core.errors import UsageError

# ---------------------------------------------------------------------------- classification thresholds
DATA_BOUND_SHARE = 0.20  # data wait >= 20% of the step: data-bound
COPY_BOUND_SHARE = 0.15  # host->device copy >= 15% of the step: copy-bound
HOST_OTHER_SHARE = 0.25  # host bookkeeping between steps (other) >= 25% of the step: host-bound
# A whole step costing less than this many trivial op dispatches (measured on this host, under the same
# load, right after the window): a ResNet-18 training step is ~1,000 ops, so a step that costs less than
# 1,000 of the cheapest ops is dispatch, Python and bookkeeping in every part (its data wait included),
# and this criterion outranks the others.
HOST_BOUND_DISPATCHES = 1000
HOST_BUSY_SHARE = 0.5  # ... provided the main thread ran or was ready to run >= 50% of the wall step (not waiting on a loader)
LAUNCH_BOUND_BUSY = 0.60  # CUDA: GPU kernels busy < 60% of the compute segment: launch-bound
MEMORY_LIMITED_SHARE = 0.90  # peak memory >= 90% of the GPU's (CPU: physical) memory: memory-limited
CPU_STARVED_SHARE = 0.75  # CPU training got < 75% of the core time its threads could use: contended

THRESHOLDS: dict[str, str] = {
    "data-bound": f"data wait >= {DATA_BOUND_SHARE:.0%} of the step",
    "copy-bound": f"host-to-device copy >= {COPY_BOUND_SHARE:.0%} of the step",
    "launch/host-bound": f"host bookkeeping (other) >= {HOST_OTHER_SHARE:.0%} of the step, or a step cheaper (in CPU "
                         f"time) than {HOST_BOUND_DISPATCHES} trivial op dispatches measured on this host, or on CUDA GPU kernels "
                         f"busy < {LAUNCH_BOUND_BUSY:.0%} of the compute segment",
    "memory-limited": f"peak memory >= {MEMORY_LIMITED_SHARE:.0%} of the device's memory",
    "compute-bound": "none of the above: the step is the model's own work",
    "CPU contended (finding)": f"CPU training process got < {CPU_STARVED_SHARE:.0%} of the core time its "
                               "threads could use",
}
CLASS_ORDER = ("data-bound", "copy-bound", "launch/host-bound", "memory-limited", "compute-bound")

# ------------------------------------------------------------------------------------ noise and ranking

PARTS = ("data", "h2d", "compute", "other")  # the parts of a step; they add up to step_ms


@dataclass
class Measurement:
    """One configuration measured as one (estimated) training epoch: plain numbers, so the classifier
    is a pure function. The parts are epoch totals in seconds; `windows` holds what was timed."""

    label: str
    steps: int  # steps per epoch
    images: float  # training images per epoch
    epoch_s: float
    data_s: float
    h2d_s: float | None
    compute_s: float | None
    other_s: float
    device_type: str = "cpu"
    torch_threads: int = 1
    usable_cpus: int = 1
    loader: str = "device"
    workers: int = 0
    windows: list[dict[str, Any]] = field(default_factory=list)
    timed_s: float | None = None  # wall time of the timed windows themselves (unweighted)
    loader_start_s: float | None = None
    warmup_steps: int = 0
    window_steps: int = 0  # the steps asked of each window (a window is shorter when the epoch is)
    cost_s: float | None = None  # wall time of the whole measurement (setup + warm-up + windows)
    process_cpu_s: float | None = None
    workers_cpu_s: float | None = None
    peak_memory_bytes: int | None = None
    memory_total_bytes: int | None = None
    gpu_busy_s: float | None = None  # kernel busy time scaled to the epoch (CUDA)
    dispatch_us: float | None = None  # median CPU time of one trivial torch op, measured after the windows
    main_run_s: float | None = None  # the training (main) thread on a CPU during the timed windows
    main_wait_s: float | None = None  # ... runnable but waiting for a free CPU (taken by other threads/processes)
    step_mode: str = "eager"  # engine's step runner: "eager" | "cuda-graph"
    setup_s: float | None = None  # the step runner's one-time setup (warm-up, capture), outside every window
    load_average: float | None = None  # 1-minute load average at the end of the windows (other processes too)
    status: str = "ok"  # ok | diverged

    @property
    def step_ms(self) -> float:
        return 1000.0 * self.epoch_s / self.steps if self.steps else float("nan")

    @property
    def images_per_s(self) -> float:
        return self.images / self.epoch_s if self.epoch_s > 0 else float("nan")

    def share(self, part: str) -> float | None:
        value = getattr(self, f"{part}_s")
        return None if value is None or self.epoch_s <= 0 else value / self.epoch_s

    def per_step_ms(self, part: str) -> float | None:
        value = getattr(self, f"{part}_s")
        return None if value is None or not self.steps else 1000.0 * value / self.steps

    @property
    def timed_steps(self) -> int:
        return sum(int(w["steps"]) for w in self.windows)

    @property
    def cpu_share(self) -> float | None:
        """CPU training: core time the process got / core time its threads could have used. Waiting on
        loader workers (torch loader, workers > 0) is idle by design and not counted as usable time."""
        wall = self.timed_s if self.timed_s is not None else self.epoch_s
        if self.loader == "torch" and self.workers > 0:
            wall -= sum(w["data_s"] for w in self.windows) if self.windows else self.data_s
        if self.process_cpu_s is None or self.device_type != "cpu" or wall <= 0:
            return None
        return self.process_cpu_s / (wall * max(1, min(self.torch_threads, self.usable_cpus)))

    @property
    def wanted_cpu_share(self) -> float | None:
        """Share of the timed wall time the main thread was running or waiting for a CPU (not blocked)."""
        if self.main_run_s is None or self.main_wait_s is None or not self.timed_s:
            return None
        return (self.main_run_s + self.main_wait_s) / self.timed_s

    @property
    def step_cpu_ms(self) -> float | None:
        """CPU time of the training process per timed step, per thread: immune to preemption by others."""
        if self.process_cpu_s is None or not self.timed_steps:
            return None
        return 1000.0 * self.process_cpu_s / self.timed_steps / max(1, min(self.torch_threads, self.usable_cpus))

    @property
    def workers_cores(self) -> float | None:
        wall = self.timed_s if self.timed_s is not None else self.epoch_s
        return None if self.workers_cpu_s is None or wall <= 0 else self.workers_cpu_s / wall

    @property
    def gpu_busy_share(self) -> float | None:
        if self.gpu_busy_s is None or not self.compute_s:
            return None
        return self.gpu_busy_s / self.compute_s

    @property
    def memory_share(self) -> float | None:
        if not self.peak_memory_bytes or not self.memory_total_bytes:
            return None
        return self.peak_memory_bytes / self.memory_total_bytes

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(timed_steps=self.timed_steps, workers_cores=self.workers_cores, step_cpu_ms=self.step_cpu_ms,
                 step_ms=self.step_ms, images_per_s=self.images_per_s, cpu_share=self.cpu_share,
                 gpu_busy_share=self.gpu_busy_share, memory_share=self.memory_share)
        return d


def from_epoch_record(label: str, record: Any, cfg: TrainConfig, device_type: str, torch_threads: int,
                      usable_cpus: int) -> Measurement:
    """A Measurement from an engine.EpochRecord of a real run (e.g. the lab's C4 runs), so classify()
    can judge it without a rerun; CPU, memory and GPU-busy facts are then unknown (None)."""
    return Measurement(label=label, steps=record.steps, images=record.images, epoch_s=record.epoch_s,
                       data_s=record.data_s, h2d_s=record.h2d_s, compute_s=record.compute_s, other_s=record.other_s,
                       device_type=device_type, torch_threads=torch_threads, usable_cpus=usable_cpus, loader=cfg.loader,
                       workers=cfg.workers if cfg.loader == "torch" else 0, loader_start_s=record.loader_start_s)


@dataclass
class Diagnosis:
    label: str  # one of CLASS_ORDER
    evidence: list[str]  # one sentence per criterion that fired (or why none did)
    findings: list[str]  # secondary facts: "CPU contended", workers oversubscribing
    tags: set[str] = field(default_factory=set)  # what candidates should address: data, copy, host, memory, compute, contention

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "evidence": self.evidence, "findings": self.findings,
                "addresses": sorted(self.tags), "thresholds": THRESHOLDS}


def pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def classify(m: Measurement) -> Diagnosis:
    """The bottleneck class of one measurement: the first of CLASS_ORDER whose criterion fires."""
    fired: list[tuple[str, str, str]] = []  # (class, tag, evidence)
    data, copy, other = m.share("data"), m.share("h2d"), m.share("other")
    if data is not None and data >= DATA_BOUND_SHARE:
        fired.append(("data-bound", "data", f"data wait (loader start-up included) is {pct(data)} of the step "
                      f"(>= {pct(DATA_BOUND_SHARE)})"))
    if copy is not None and copy >= COPY_BOUND_SHARE:
        fired.append(("copy-bound", "copy", f"host-to-device copy is {pct(copy)} of the step (>= {pct(COPY_BOUND_SHARE)})"))
    if other is not None and other >= HOST_OTHER_SHARE and m.compute_s is not None:
        fired.append(("launch/host-bound", "host",
                      f"host bookkeeping between steps is {pct(other)} of the step (>= {pct(HOST_OTHER_SHARE)})"))
    cost_ms, what = (m.step_cpu_ms, "of CPU per thread") if m.step_cpu_ms is not None else (m.step_ms, "")
    busy = m.gpu_busy_share
    # A cheap step is host-bound by the dispatch rule only where no GPU says otherwise: kernels busy most of
    # the compute segment (a captured step on an H200: 96%) mean the GPU, not the host, sets the pace.
    gpu_says_busy = busy is not None and busy >= LAUNCH_BOUND_BUSY
    if m.dispatch_us and not gpu_says_busy and 1000.0 * cost_ms < HOST_BOUND_DISPATCHES * m.dispatch_us:
        fired.append(("launch/host-bound", "host", f"a step costs {cost_ms:.2f} ms{' ' + what if what else ''}, as much as "
                      f"{1000.0 * cost_ms / m.dispatch_us:.0f} trivial op dispatches ({m.dispatch_us:.1f} us each here; "
                      f"< {HOST_BOUND_DISPATCHES}): fixed per-op and per-step host costs outweigh the math"))
    if busy is not None and busy < LAUNCH_BOUND_BUSY:
        fired.append(("launch/host-bound", "host", f"GPU kernels are busy only {pct(busy)} of the compute segment "
                      f"(< {pct(LAUNCH_BOUND_BUSY)}): the GPU waits for the host to launch work"))
    mem = m.memory_share
    if mem is not None and mem >= MEMORY_LIMITED_SHARE:
        fired.append(("memory-limited", "memory", f"peak memory is {pct(mem)} of the device's (>= {pct(MEMORY_LIMITED_SHARE)})"))
    findings: list[str] = []
    tags: set[str] = set()
    cpu = m.cpu_share
    if cpu is not None and cpu < CPU_STARVED_SHARE:
        tags.add("contention")
        text = (f"CPU contended: the training process got {pct(cpu)} of the core time its "
                f"{min(m.torch_threads, m.usable_cpus)} thread(s) could use (< {pct(CPU_STARVED_SHARE)})")
        if m.workers_cores is not None:
            text += f"; its {m.workers} loader workers used {m.workers_cores:.2f} cores meanwhile"
        if m.main_wait_s is not None and m.timed_s:
            text += f"; its main thread waited for a free core {pct(m.main_wait_s / m.timed_s)} of the time"
        if m.load_average is not None:
            text += f"; load average {m.load_average:.1f} on {m.usable_cpus} usable core(s) (all processes)"
        findings.append(text)
    if m.device_type == "cpu" and m.loader == "torch" and m.workers > 0 and m.workers + m.torch_threads > m.usable_cpus:
        tags.add("contention")
        used = (f" (measured: they used {m.workers_cores:.2f} cores during the timed steps; starting them costs "
                f"{m.loader_start_s:.2f} s per epoch)" if m.workers_cores is not None and m.loader_start_s is not None else "")
        findings.append(f"{m.workers} loader workers + {m.torch_threads} training threads on {m.usable_cpus} usable "
                        f"core(s): the workers can compete with training for the same cores{used}")
    if fired:
        label = min(fired, key=lambda f: CLASS_ORDER.index(f[0]))[0]
        busy_enough = m.wanted_cpu_share is None or m.wanted_cpu_share >= HOST_BUSY_SHARE
        if busy_enough and any("trivial op dispatches" in f[2] for f in fired):
            label = "launch/host-bound"
        tags |= {f[1] for f in fired}
        evidence = [f[2] for f in fired]
    else:
        label = "compute-bound"
        tags.add("compute")
        parts = ", ".join(f"{p} {pct(s)}" for p in PARTS if (s := m.share(p)) is not None)
        evidence = [f"no other criterion fired ({parts} of the step)"]
        if busy is not None:
            evidence.append(f"GPU kernels busy {pct(busy)} of the compute segment")
    return Diagnosis(label=label, evidence=evidence, findings=findings, tags=tags)


# ------------------------------------------------------------------------------------------ candidates


@dataclass(frozen=True)
class HostFacts:
    """What decides whether a candidate can run here (gathered by doctor.py)."""

    device_type: str
    usable_cpus: int
    precision: str  # the baseline's resolved precision
    cuda_bf16: bool = False
    cpu_bf16: bool = False
    cpu_fp16: bool = False
    cxx_compiler: bool = True
    has_cuda_graph_field: bool = False
    captured: bool = False  # the baseline's step already is one captured CUDA graph


@dataclass
class Candidate:
    key: str
    flags: list[str]
    changes: dict[str, Any]  # TrainConfig.replace(**changes)
    why: str
    addresses: tuple[str, ...]  # diagnosis tags it targets
    status: str = "proposed"  # proposed | measured | not applicable here | already set | cut | failed | over budget
    reason: str = ""  # for not applicable / cut / failed / over budget
    cost_factor: float = 1.0  # estimated cost relative to the baseline's measurement
    extra_cost_s: float = 0.0  # e.g. compilation
    note: str = ""
    measurements: list[Measurement] = field(default_factory=list)
    partial: dict[str, Any] | None = None  # over budget: what it had measured when its time limit stopped it


def _flag(name: str, value: Any) -> str:
    return f"--{name} {value}"


def propose(cfg: TrainConfig, host: HostFacts, diagnosis: Diagnosis, compile_s: dict[str, float]) -> list[Candidate]:
    """Every change cifarlab can make, each either runnable here or marked with the reason it is not;
    ordered so those that address the diagnosis come first (the budget cuts from the end)."""
    out: list[Candidate] = []
    cuda = host.device_type == "cuda"
    add = out.append
    if cfg.loader == "torch":
        cores = host.usable_cpus
        add(Candidate("loader-device", ["--loader device"], {"loader": "device"},
                      "device-resident data with batched crop/flip: no workers, no per-image PIL work, no copy",
                      ("data", "copy", "contention", "host")))
        down = sorted({0, max(cores - 1, 0), cores} - {cfg.workers})
        for w in [w for w in down if w < cfg.workers]:
            add(Candidate(f"workers-{w}", [_flag("workers", w)], {"workers": w},
                          f"fewer loader workers ({cfg.workers} -> {w}) leave cores to training", ("contention", "host", "compute")))
        up = min(max(1, 2 * cfg.workers), max(cores - 1, 1))
        if up > cfg.workers:
            add(Candidate(f"workers-{up}", [_flag("workers", up)], {"workers": up},
                          f"more loader workers ({cfg.workers} -> {up}, bounded by {cores} usable cores)", ("data",)))
        elif "data" in diagnosis.tags:
            add(Candidate("workers-up", ["--workers N"], {}, "more loader workers", ("data",), status="not applicable here",
                          reason=f"already {cfg.workers} workers on {cores} usable core(s); more would only compete"))
        if not cuda:
            add(Candidate("pin-memory", ["--pin-memory"], {}, "page-locked batches for faster copies", ("copy",),
                          status="not applicable here", reason="pinned memory speeds host-to-CUDA copies; this run trains on the CPU"))
        elif cfg.pin_memory is False:
            add(Candidate("pin-memory", ["--pin-memory"], {"pin_memory": True}, "page-locked batches for async copies", ("copy",)))
    if not cfg.channels_last:
        add(Candidate("channels-last", ["--channels-last"], {"channels_last": True}, "NHWC layout for convolutions", ("compute",)))
    if host.precision == "fp32":
        if cuda and host.cuda_bf16 or not cuda and host.cpu_bf16:
            # native bf16 on a CPU: measured from 3.6x slower to 2.6x faster than fp32; planned at the baseline's cost,
            # its time limit (doctor.py) stops it if it is the slow kind
            add(Candidate("bf16", ["--precision bf16"], {"precision": "bf16"}, "bf16 autocast", ("compute", "memory")))
        else:
            add(Candidate("bf16", ["--precision bf16"], {}, "bf16 autocast", ("compute", "memory"), status="not applicable here",
                          reason="this GPU does not support bf16" if cuda else
                          "this CPU has no avx512_bf16/amx_bf16: bf16 autocast would be emulated (about 10x slower)"))
        if cuda or host.cpu_fp16:
            add(Candidate("fp16", ["--precision fp16"], {"precision": "fp16"}, "fp16 autocast with a GradScaler",
                          ("compute", "memory"), cost_factor=1.0 if cuda else 4.0))
        else:
            add(Candidate("fp16", ["--precision fp16"], {}, "fp16 autocast", ("compute", "memory"), status="not applicable here",
                          reason="this CPU has no avx512_fp16/amx_fp16: fp16 autocast would be emulated"))
    if not cuda:
        add(Candidate("cuda-graph", ["--cuda-graph on"], {}, "captured step (CUDA graph replay)", ("host",),
                      status="not applicable here", reason="a captured step needs CUDA; this run trains on the CPU"))
    elif not host.has_cuda_graph_field:
        add(Candidate("cuda-graph", ["--cuda-graph on"], {}, "captured step (CUDA graph replay)", ("host",),
                      status="not applicable here", reason="this cifarlab has no captured step"))
    elif host.captured:
        add(Candidate("cuda-graph", ["--cuda-graph on"], {}, "captured step (CUDA graph replay)", ("host",),
                      status="already set", reason="the baseline's step already is one captured CUDA graph"))
    elif getattr(cfg, "cuda_graph", "off") != "on":
        add(Candidate("cuda-graph", ["--cuda-graph on"], {"cuda_graph": "on"}, "one graph launch per step instead of "
                      "hundreds of kernel launches", ("host",), extra_cost_s=compile_s["cuda_graph"]))
    if cfg.compile == "none":
        mode = "reduce-overhead" if cuda and "host" in diagnosis.tags else "default"
        if not cuda and not host.cxx_compiler:
            add(Candidate("compile", [_flag("compile", mode)], {}, "torch.compile", ("compute", "host"),
                          status="not applicable here", reason="no C++ compiler for inductor's CPU code"))
        else:
            add(Candidate("compile", [_flag("compile", mode)], {"compile": mode}, f"torch.compile ({mode}): fused kernels",
                          ("compute", "host"), extra_cost_s=compile_s[host.device_type]))
    if "memory" in diagnosis.tags and cfg.batch_size >= 2:
        b = cfg.batch_size // 2
        add(Candidate(f"batch-{b}", [_flag("batch-size", b), _flag("lr", _lr(cfg.lr * b / cfg.batch_size))],
                      {"batch_size": b, "lr": cfg.lr * b / cfg.batch_size}, "half the batch: room below the memory limit",
                      ("memory",), cost_factor=0.5, note="linear LR scaling: lr x new/old batch"))
    else:
        b = cfg.batch_size * 2
        add(Candidate(f"batch-{b}", [_flag("batch-size", b), _flag("lr", _lr(cfg.lr * 2))],
                      {"batch_size": b, "lr": cfg.lr * 2}, "twice the batch: per-step overhead paid half as often",
                      ("host", "compute", "data"), cost_factor=2.0,
                      note="linear LR scaling (lr x 2); accuracy per epoch changes with the batch, so this is a "
                           "throughput figure -- check accuracy before adopting it"))
    if cfg.sync_timing:
        if cuda:
            add(Candidate("no-sync-timing", ["--no-sync-timing"], {"sync_timing": False},
                          "no device synchronization at every clock read", ("host",),
                          note="the data/h2d/compute split is then unknown; epoch time and data wait stay exact"))
        else:
            add(Candidate("no-sync-timing", ["--no-sync-timing"], {}, "fewer host syncs", ("host",),
                          status="not applicable here", reason="on a CPU there is nothing to synchronize (sync timing is free)"))
    for c in out:
        if c.status == "proposed" and not c.changes:
            c.status, c.reason = "not applicable here", c.reason or "nothing to change"
    # stable sort: candidates that address the diagnosis first, in the order above
    return sorted(out, key=lambda c: 0 if set(c.addresses) & diagnosis.tags else 1)


def _lr(x: float) -> str:
    return f"{x:.6g}"


# ---------------------------------------------------------------------------------------- budget


def plan_round(costs_s: list[float], baseline_cost_s: float, left_s: float, rounds: int) -> list[int]:
    """Indices of the candidates (costs in priority order) to run in each of the `rounds` rounds left,
    keeping room for the baseline repeat after each round; one that does not fit is skipped, cheaper
    ones after it may still fit."""
    total, kept = rounds * baseline_cost_s, []
    for i, cost in enumerate(costs_s):
        if total + rounds * cost <= left_s:
            total += rounds * cost
            kept.append(i)
    return kept


MIN_CANDIDATES = 3  # rounds (repeats) are cut, down to 2, before the candidates measured fall below this many


def choose_repeats(costs_s: list[float], baseline_cost_s: float, left_s: float, repeats: int) -> int:
    need = min(MIN_CANDIDATES, len(costs_s))
    for r in range(repeats, 1, -1):
        if len(plan_round(costs_s, baseline_cost_s, left_s, r)) >= need:
            return r
    return 1


MAX_BUDGET_S = 7 * 24 * 3600.0  # a week: beyond it a number is a typo (1e308), not a diagnosis budget


def check_budget_s(budget_s: float) -> float:
    """--budget in seconds, or one UsageError line: a positive, finite number up to a week."""
    if isinstance(budget_s, bool) or not isinstance(budget_s, (int, float)) or not math.isfinite(budget_s) \
            or budget_s <= 0:
        raise UsageError(f"--budget must be a positive number of seconds (got {budget_s}), e.g. --budget 180")
    if budget_s > MAX_BUDGET_S:
        raise UsageError(f"--budget {budget_s:g} seconds is more than a week; give a number of seconds such as "
                         f"--budget 180, or leave --budget out for the default")
    return float(budget_s)
