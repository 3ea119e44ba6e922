"""Run configuration: the only place defaults live.

A run is fully described by one frozen `TrainConfig`. Experiments derive their runs from a base
config with `dataclasses.replace`, so a sweep point can never inherit state from another point.
`validate()` turns every bad value into a `UsageError` whose message names the value and the fix.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from cifarlab.core.errors import UsageError

# The lab's data normalisation (LAB.md "Setup every edition shares").
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)
NUM_CLASSES = 10

DATASETS = ("cifar10", "synthetic", "auto")
DEVICES = ("auto", "cpu", "cuda")
NORMS = ("batch", "none")
LOADERS = ("torch", "device")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
COMPILE_MODES = ("none", "default", "reduce-overhead", "max-autotune")
# --compile also takes torch's max-autotune without its own CUDA graphs: on the captured step (capture.py) that
# is autotuned kernels inside cifarlab's whole-step graph, where max-autotune would step eagerly around torch's.
TRAIN_COMPILE_MODES = (*COMPILE_MODES, "max-autotune-no-cudagraphs")
CUDA_GRAPH_MODES = ("auto", "on", "off")  # the training step as one captured CUDA graph (capture.py)
# cifarlab export's formats (export.py builds each); checked here, before torch loads, for a one-line error.
EXPORT_FORMATS = ("torchscript-trace", "torchscript-script", "export", "onnx", "aoti")
# Defaults of export, infer-bench and inspect, here (torch-free) so the parsers' help and the code agree.
EXPORT_CHECK_IMAGES = 64  # test images in export's fixed check batch
INFER_BENCH_BATCH_SIZES = (1, 100, 128)
INFER_BENCH_ITERS = 20  # timed calls per variant and batch size
INFER_BENCH_WARMUP = 2  # TorchScript's profiling executor: 1st call profiles, 2nd optimizes
INSPECT_BATCH_SIZE = 32  # inspect's real backward pass
# The lab's five optimizers (C6); optim.OPTIMIZERS builds each, in this order.
OPTIMIZER_NAMES = ("sgd", "sgd-nesterov", "adagrad", "adadelta", "adam")

# Upper bounds that catch typos (an extra zero) before they become an out-of-memory crash.
MAX_WORKERS = 256
MAX_BATCH = 1 << 20
MAX_EPOCHS = 100_000


@dataclass(frozen=True)
class TrainConfig:
    """Everything one training run needs. Field names are the CLI flags with '-' for '_'."""

    # data
    data_dir: str = "./data"
    dataset: str = "cifar10"
    subset: int | None = None  # first-N-style stratified subset of the train split
    test_subset: int | None = None  # stratified subset of the test split
    loader: str = "device"  # device: split resident on the device (fast path); torch: DataLoader + PIL (C2-C4)
    workers: int = 2
    batch_size: int = 128
    test_batch_size: int = 100
    pin_memory: bool | None = None  # None: on when training on CUDA
    persistent_workers: bool = False
    prefetch_factor: int | None = None
    augment: bool = True  # random crop + flip on training batches (off: exact comparisons, e.g. DDP vs 1 process)
    # model
    norm: str = "batch"
    # optimizer (the lab: SGD lr 0.1, momentum 0.9, weight decay 5e-4)
    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    # gradual warm-up (large-batch training): lr ramps linearly per step from lr * warmup_start_factor
    # to lr over the first warmup_epochs epochs; 0 = no warm-up (the lab)
    warmup_epochs: int = 0
    warmup_start_factor: float = 0.1
    # training
    epochs: int = 5
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"  # auto: bf16 on CUDA GPUs with it; measured on CPUs with native bf16 (train/precision.py); else fp32
    channels_last: bool = True
    compile: str = "none"
    cuda_graph: str = "auto"  # auto: captured step on CUDA's fast path (engine.capture_blocker); on; off: eager
    sync_timing: bool = True  # synchronize the device at every clock read (exact C2 breakdown)
    max_steps: int | None = None  # cap on train steps per epoch (smoke runs)
    evaluate: bool = True
    checkpoint_every: int = 1  # epochs between checkpoints (and always after the last); 0 = never
    # several processes (torchrun): SyncBatchNorm instead of per-process BatchNorm (CUDA only), and
    # timing of DDP's gradient all-reduces by a communication hook
    sync_bn: bool = False
    comm_timing: bool = False
    # output
    out_dir: str = "runs"
    name: str = "train"
    tags: tuple[str, ...] = field(default_factory=tuple)

    def validate(self) -> "TrainConfig":
        _choice("dataset", self.dataset, DATASETS)
        _choice("device", self.device, DEVICES)
        _choice("norm", self.norm, NORMS)
        _choice("loader", self.loader, LOADERS)
        _choice("precision", self.precision, PRECISIONS)
        _choice("compile", self.compile, TRAIN_COMPILE_MODES)
        _choice("cuda-graph", self.cuda_graph, CUDA_GRAPH_MODES)
        if self.cuda_graph == "on" and self.device == "cpu":
            raise UsageError("--cuda-graph on needs a CUDA device (got --device cpu); use --cuda-graph auto or off")
        _choice("optimizer", self.optimizer, OPTIMIZER_NAMES)
        _int_range("workers", self.workers, 0, MAX_WORKERS, "use 0 to load in the main process")
        _int_range("batch-size", self.batch_size, 1, MAX_BATCH, "the lab uses 128")
        _int_range("test-batch-size", self.test_batch_size, 1, MAX_BATCH, "the lab uses 100")
        _int_range("epochs", self.epochs, 1, MAX_EPOCHS, "the lab uses 5")
        _int_range("checkpoint-every", self.checkpoint_every, 0, MAX_EPOCHS, "use 0 to turn checkpoints off")
        _int_range("seed", self.seed, 0, 2**63 - 1, "use a non-negative integer")
        for flag, value in (("subset", self.subset), ("test-subset", self.test_subset), ("max-steps", self.max_steps)):
            if value is not None:
                _int_range(flag, value, 1, 10**9, "leave it out to use everything")
        if self.prefetch_factor is not None:
            _int_range("prefetch-factor", self.prefetch_factor, 1, 1024, "the DataLoader default is 2")
            if self.workers == 0:
                raise UsageError("--prefetch-factor needs --workers >= 1 (got --workers 0); drop --prefetch-factor")
        if self.persistent_workers and self.workers == 0:
            raise UsageError("--persistent-workers needs --workers >= 1 (got --workers 0)")
        _float_range("lr", self.lr, 0.0, 1e3, "the lab uses 0.1", low_inclusive=False)
        _float_range("momentum", self.momentum, 0.0, 1.0, "the lab uses 0.9", high_inclusive=False)
        _float_range("weight-decay", self.weight_decay, 0.0, 1.0, "the lab uses 5e-4")
        _int_range("warmup-epochs", self.warmup_epochs, 0, MAX_EPOCHS, "use 0 for no warm-up")
        _float_range("warmup-start-factor", self.warmup_start_factor, 0.0, 1.0, "Goyal et al. start at lr / k",
                     low_inclusive=False)
        if not self.name or any(c in self.name for c in "/\\\0") or self.name in (".", "..") or _unprintable(self.name):
            raise UsageError(f"--name {self.name!r} is not a plain folder name; use letters, digits, '-' or '_'")
        if not self.out_dir or "\0" in self.out_dir:
            raise UsageError(f"--out {self.out_dir!r} is not a usable folder path")
        if not self.data_dir or "\0" in self.data_dir:
            raise UsageError(f"--data {self.data_dir!r} is not a usable folder path")
        return self

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["tags"] = list(self.tags)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise UsageError(f"unknown config keys {unknown}; this cifarlab knows {sorted(known)}")
        kwargs = dict(d)
        if "tags" in kwargs:
            kwargs["tags"] = tuple(kwargs["tags"])
        return cls(**kwargs)

    def replace(self, **changes: Any) -> "TrainConfig":
        return dataclasses.replace(self, **changes)


def export_format_names(text: str) -> list[str]:
    """--format 'a,b' -> the names, each once, in order; an empty or unknown name is a UsageError."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise UsageError(f"--format {text!r} names no format; choose from: {', '.join(EXPORT_FORMATS)}")
    for name in names:
        if name not in EXPORT_FORMATS:
            raise UsageError(f"--format {name!r} is not known; choose from: {', '.join(EXPORT_FORMATS)} (comma-separated)")
    return list(dict.fromkeys(names))


def _unprintable(name: str) -> bool:
    """Control characters (newlines in a folder name break every log line that shows it), names the
    file system cannot store, or too long for one path component once the timestamp is prepended."""
    try:
        encoded = name.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return len(encoded) > 200 or any(ord(c) < 32 or ord(c) == 127 for c in name)


def _choice(flag: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise UsageError(f"--{flag} {value!r} is not known; choose one of: {', '.join(choices)}")


def _int_range(flag: str, value: Any, low: int, high: int, hint: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise UsageError(f"--{flag} must be a whole number (got {value!r}); {hint}")
    if not low <= value <= high:
        raise UsageError(f"--{flag} must be between {low} and {high} (got {value}); {hint}")


def _float_range(
    flag: str,
    value: Any,
    low: float,
    high: float,
    hint: str,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UsageError(f"--{flag} must be a finite number (got {value!r}); {hint}")
    too_low = value < low or (value == low and not low_inclusive)
    too_high = value > high or (value == high and not high_inclusive)
    if too_low or too_high:
        lo = "[" if low_inclusive else "("
        hi = "]" if high_inclusive else ")"
        raise UsageError(f"--{flag} must be in {lo}{low}, {high}{hi} (got {value}); {hint}")


# ------------------------------------------------------------------------------------ the lab suite


@dataclass(frozen=True)
class LabPreset:
    """How big the lab's runs are. Every experiment derives its configs from one base config built
    from these fields, so a preset changes the size of the lab, never what it measures."""

    name: str
    about: str
    dataset: str | None  # forced dataset (smoke: synthetic); None: the lab's --dataset
    subset: int | None  # training images per run (None: the whole split)
    test_subset: int | None
    epochs: int  # epochs per run (the lab: 5)
    batch_size: int
    test_batch_size: int
    max_steps: int | None  # cap on steps per epoch
    repeats: int  # C3 repeats per worker count
    sweep_max_points: int | None  # C3: at most this many worker counts (None: until it stops improving)
    profile_steps: int  # C4: training steps recorded by torch.profiler
    cpu_subset: int  # C5: training images for the CPU measurement, extrapolated to a full epoch
    cpu_epochs: int  # C5: CPU epochs (the steady epochs after the first are extrapolated)
    compile_epochs: int  # C8: epochs per compile mode (the lab: 10)
    compile_on_cpu: bool  # C8 on a CPU-only machine (compiling ResNet-18 there takes minutes per mode)
    sweep_step: int = 4  # C3: workers 0, 4, 8, ...
    sweep_min_gain: float = 0.05  # C3 stop rule: a count must cut the data wait by >= 5% vs the best so far
    chance_margin: float = 0.05  # C6: final train top-1 below chance + this is flagged "stuck at chance"
    sweep_timed_steps: int | None = None  # C3: time this many steps per run after the iterator start and
    # extrapolate per epoch (None: whole epochs, as before)
    compile_modes: tuple[str, ...] = COMPILE_MODES  # C8: eager ("none") and the modes measured (--budget may cut)
    profile_timed_steps: int | None = None  # C4: 2 epochs of this many steps per run, the profiler in the first,
    # the second timed and extrapolated per epoch (None: whole epochs, the profiler in the first)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


LAB_PRESETS: dict[str, LabPreset] = {
    "smoke": LabPreset(
        name="smoke", about="synthetic, tiny: checks that every experiment runs (CI); numbers mean little",
        dataset="synthetic", subset=32, test_subset=16, epochs=2, batch_size=8, test_batch_size=16,
        max_steps=2, repeats=1, sweep_max_points=2, profile_steps=2, cpu_subset=16, cpu_epochs=2,
        compile_epochs=2, compile_on_cpu=False,
    ),
    "quick": LabPreset(
        name="quick", about="a 256-image subset, 2 epochs per run: the lab's shape in minutes on a CPU",
        dataset=None, subset=256, test_subset=128, epochs=2, batch_size=64, test_batch_size=128,
        max_steps=None, repeats=1, sweep_max_points=3, profile_steps=3, cpu_subset=128, cpu_epochs=2,
        compile_epochs=2, compile_on_cpu=False,
    ),
    "full": LabPreset(
        name="full", about="the lab as written: 5 epochs of full CIFAR-10 per run, batch 128",
        dataset=None, subset=None, test_subset=None, epochs=5, batch_size=128, test_batch_size=100,
        max_steps=None, repeats=3, sweep_max_points=None, profile_steps=20, cpu_subset=1280, cpu_epochs=2,
        compile_epochs=10, compile_on_cpu=True, sweep_timed_steps=100, profile_timed_steps=100,
    ),
}


@dataclass(frozen=True)
class LabConfig:
    """`cifarlab lab` options; preset None means full with a GPU, quick otherwise."""

    suite: str = "lab"
    preset: str | None = None
    only: tuple[str, ...] = ()
    repeats: int | None = None  # C3 repeats (None: the preset's)
    device: str = "auto"
    data_dir: str = "./data"
    dataset: str = "auto"
    out_dir: str = "runs"
    seed: int = 0
    budget_min: float | None = None  # --budget: size C3 and C8 to fit this many minutes (None: no budget)
    tensorboard: str | None = None  # --tensorboard [DIR]: None not asked for, "" the lab folder's tensorboard/


# ------------------------------------------------------------------------- the scaling suite


@dataclass(frozen=True)
class ScalingPreset:
    """Sizes of `cifarlab lab --suite scaling` (scaling.py), one per lab preset name. On a CPU each
    process is one "device" of one core (OMP_NUM_THREADS=1), so the ladder is capped by points."""

    first_batch: int  # per-device batch ladder: first, first*factor, ... until OOM or a cap
    batch_factor: int
    max_points_cpu: int  # ladder points on a CPU (no OOM to stop it; minutes per point)
    max_batch: int  # ladder cap on a GPU (a GPU that never runs out of memory still stops)
    timing_images: int | None  # train images per timing run (None: the whole split)
    timing_steps: int | None  # steps per epoch cap in timing runs (None: whole epochs)
    max_procs: int  # processes tried: 1, 2, 4, ... up to this and to the devices there are
    allreduce_elements: int  # the gradient all-reduce (ResNet-18: 11,173,962 fp32 = 44.7 MB)
    allreduce_iters: int  # timed all-reduces after allreduce_warmup untimed ones
    allreduce_warmup: int
    baseline_batch: int  # large-batch item: the single-device reference batch (the lab: 128)
    large_epochs: int  # large-batch item: epochs per run (the lab: 5)
    warmup_epochs: int  # large-batch item: gradual warm-up length
    large_images: int | None  # large-batch item: train images (None: the lab preset's subset)


SCALING_PRESETS: dict[str, ScalingPreset] = {
    # smoke: the ladder starts below the lab's 32 so that CI (2 cores) runs every item in about a minute
    "smoke": ScalingPreset(first_batch=4, batch_factor=4, max_points_cpu=2, max_batch=16, timing_images=128,
                           timing_steps=2, max_procs=4, allreduce_elements=11_173_962, allreduce_iters=3,
                           allreduce_warmup=1, baseline_batch=8, large_epochs=2, warmup_epochs=1,
                           large_images=128),
    "quick": ScalingPreset(first_batch=32, batch_factor=4, max_points_cpu=2, max_batch=1 << 16, timing_images=1024,
                           timing_steps=None, max_procs=4, allreduce_elements=11_173_962, allreduce_iters=5,
                           allreduce_warmup=2, baseline_batch=128, large_epochs=2, warmup_epochs=1,
                           large_images=1024),
    "full": ScalingPreset(first_batch=32, batch_factor=4, max_points_cpu=3, max_batch=1 << 16, timing_images=None,
                          timing_steps=None, max_procs=4, allreduce_elements=11_173_962, allreduce_iters=20,
                          allreduce_warmup=3, baseline_batch=128, large_epochs=5, warmup_epochs=1,
                          large_images=None),
}
