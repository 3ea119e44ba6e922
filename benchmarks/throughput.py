"""Training throughput: the lab's classic pipeline against the fast path, in one process and one run.

    python benchmarks/throughput.py --device cpu --subset 2048
    python benchmarks/throughput.py --json-out throughput.json          # CPU and, when present, CUDA

(a) classic: torchvision PIL transforms in a DataLoader with 2 workers, fp32, contiguous NCHW --
    the pipeline as the lab specifies it (loader "torch").
(b) typical: what a typical hand-written lab solution does: the same pipeline with min(8, usable cores)
    workers, fp32, eager.
(c) fast-eager (CUDA only): the fast path with the step run eagerly (--cuda-graph off).
(d) fast:    the split resident on the device with batched crop/flip (loader "device"), channels_last,
    precision "auto" as `cifarlab train` resolves it (bf16 on CUDA GPUs that support it; on a CPU with native
    bf16 the measured, cached choice of precision.choose_precision; fp32 on other CPUs), optional --compile, and on CUDA
    the whole training step captured as one CUDA graph (--cuda-graph auto).

On CUDA nothing is warmed up by the benchmark: the engine's one-time setup (cuDNN autotuning, graph
capture, compilation) runs before epoch 1's clock and is reported as setup_s; epoch 1 is reported
apart (first_epoch_s) and the steady figures are the epochs after it. On a CPU a few warm-up steps run
first and every timed epoch counts.

Each (device, batch size, pipeline) gets a fresh model and optimizer, a short warm-up (not counted),
then --repeats training epochs through the real engine (build_state + train_epoch). Per epoch:
images/s = training images / epoch_s, where epoch_s is the wall time of the training epoch --
iterator creation (DataLoader worker start-up) included, evaluation excluded, device synchronized at
both ends; data wait = time blocked on the loader's next batch (engine's data_s). Timing runs with
sync_timing off (no per-step device synchronization) for both pipelines; on a CPU that changes
nothing, as CPU ops finish before they return. Achieved FLOP/s = FLOPs per training image
(torch.utils.flop_counter via modelfacts.flop_facts) x images/s, set against the best dense matmul
rate measured on the same device in the run's precision ("% peak"), and MFU against the peak `cifarlab train`
uses (utilization.resolve_peak: the published dense peak of the card and precision -- fp32 on Ampere and later
counts as tf32, cuDNN's default for convolutions -- or, for a CPU or a card not in the table, a measured matmul
peak, "measured" in the table).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cifarlab.config import TRAIN_COMPILE_MODES, TrainConfig
from cifarlab.core.runtime import cpu_has_native_bf16, device_label, environment, resolve_device, seed_everything, usable_cpus
from cifarlab.data import build_loaders, load_data
from cifarlab.model.facts import flop_facts
from cifarlab.model.resnet import resnet18
from cifarlab.model.utilization import MEASURED, resolve_peak
from cifarlab.run.folder import write_json_atomic
from cifarlab.train.engine import build_state, seed_epoch, train_epoch
from cifarlab.train.precision import choose_precision

CPU_DEFAULT_SUBSET = 2048  # a full CPU epoch takes ~20 minutes on 2 cores
MATMUL_N = {"cpu": 1024, "cuda": 8192}
MATMUL_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Pipeline:
    name: str
    about: str
    changes: dict[str, Any]  # TrainConfig fields that define it


def pipelines(compile_mode: str, device: torch.device) -> list[Pipeline]:
    typical_workers = min(8, usable_cpus())
    rows = [
        Pipeline("classic", "DataLoader 2 workers + PIL transforms, fp32, contiguous",
                 dict(loader="torch", workers=2, precision="fp32", channels_last=False, compile="none", cuda_graph="off")),
        Pipeline("typical", f"a typical lab solution: DataLoader {typical_workers} workers + PIL, fp32, eager",
                 dict(loader="torch", workers=typical_workers, precision="fp32", channels_last=False, compile="none",
                      cuda_graph="off")),
    ]
    if device.type == "cuda":
        rows.append(Pipeline("fast-eager", f"fast path with the step run eagerly, compile {compile_mode}",
                             dict(loader="device", precision="auto", channels_last=True, compile=compile_mode,
                                  cuda_graph="off")))
    rows.append(Pipeline("fast", f"device-resident data + batched crop/flip, channels_last, precision auto, "
                                 f"compile {compile_mode}, captured step where CUDA",
                         dict(loader="device", precision="auto", channels_last=True, compile=compile_mode,
                              cuda_graph="auto")))
    return rows


@dataclass
class Result:
    device: str
    batch_size: int
    pipeline: str
    precision: str
    images: int
    epoch_s: list[float] = field(default_factory=list)
    images_per_s: list[float] = field(default_factory=list)
    data_s: list[float] = field(default_factory=list)
    warmup_s: float = 0.0
    setup_s: float | None = None  # the engine's one-time setup before epoch 1 (autotuning, capture)
    first_epoch_s: float | None = None  # epoch 1 (CUDA: no warm-up before it; not in the steady figures)
    step_mode: str = "eager"
    achieved_flop_s: float | None = None
    peak_flop_s: float | None = None
    mfu: float | None = None  # achieved / utilization.resolve_peak (published where known)
    mfu_peak: dict[str, Any] | None = None

    @property
    def median_ips(self) -> float:
        return statistics.median(self.images_per_s)

    @property
    def data_fraction(self) -> float:
        return statistics.median(d / e for d, e in zip(self.data_s, self.epoch_s))

    def to_dict(self) -> dict[str, Any]:
        return {
            "device": self.device, "batch_size": self.batch_size, "pipeline": self.pipeline,
            "precision": self.precision, "images_per_epoch": self.images, "warmup_s": self.warmup_s,
            "setup_s": self.setup_s, "first_epoch_s": self.first_epoch_s, "step_mode": self.step_mode,
            "epoch_s": self.epoch_s, "images_per_s": self.images_per_s, "data_s": self.data_s,
            "median_images_per_s": self.median_ips, "median_epoch_s": statistics.median(self.epoch_s),
            "median_data_fraction": self.data_fraction, "achieved_flop_s": self.achieved_flop_s,
            "peak_matmul_flop_s": self.peak_flop_s, "mfu": self.mfu, "mfu_peak": self.mfu_peak,
        }


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: torch.device, precision: str, min_s: float = 0.5, trials: int = 5) -> float:
    """Best observed FLOP/s of an n x n matmul in `precision` (2 n^3 FLOPs each) on `device`."""
    n = MATMUL_N.get(device.type, 1024)
    dtype = MATMUL_DTYPES[precision]
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    for _ in range(3):
        a @ b
    synchronize(device)
    best = 0.0
    for _ in range(trials):
        reps = 0
        start = time.perf_counter()
        while True:
            a @ b
            reps += 1
            synchronize(device)
            elapsed = time.perf_counter() - start
            if elapsed >= min_s / trials:
                break
        best = max(best, 2 * n**3 * reps / elapsed)
    return best


@dataclass
class Contender:
    """One pipeline at one batch size: its own fresh model, optimizer and loader."""

    pipeline: Pipeline
    cfg: TrainConfig
    state: Any
    loader: Any
    result: Result


def prepare(pipe: Pipeline, cfg: TrainConfig, data: Any, device: torch.device, warmup_steps: int | None) -> Contender:
    """Fresh model and loader; on a CPU a few warm-up steps that are not counted (allocator, oneDNN).
    On CUDA none: the engine's setup runs before epoch 1 and reports itself (setup_s)."""
    seed_everything(cfg.seed)
    loader, _ = build_loaders(cfg, data, device)
    state = build_state(cfg, device)
    start = time.perf_counter()
    if warmup_steps:
        seed_epoch(cfg.seed, 0, loader)
        train_epoch(cfg.replace(max_steps=warmup_steps), state, loader, 0)
    synchronize(device)
    result = Result(device=device.type, batch_size=cfg.batch_size, pipeline=pipe.name, precision=state.precision,
                    images=0, warmup_s=time.perf_counter() - start)
    return Contender(pipe, cfg, state, loader, result)


def timed_epoch(c: Contender, epoch: int) -> None:
    seed_epoch(c.cfg.seed, epoch, c.loader)
    record = train_epoch(c.cfg, c.state, c.loader, epoch)
    if record.status != "ok":
        raise RuntimeError(f"{c.pipeline.name} batch {c.cfg.batch_size}: epoch {epoch} {record.status}")
    c.result.images = record.images
    if record.setup_s is not None:
        c.result.setup_s = record.setup_s
    c.result.step_mode = record.step_mode
    if c.result.first_epoch_s is None:
        c.result.first_epoch_s = record.epoch_s
        if c.result.warmup_s == 0.0 and epoch == 1:
            return  # not warmed up (CUDA): epoch 1 is reported apart, not in the steady figures
    c.result.epoch_s.append(record.epoch_s)
    c.result.images_per_s.append(record.images_per_s)
    c.result.data_s.append(record.data_s)


def spread(values: list[float]) -> str:
    return f"{min(values):,.1f}-{max(values):,.1f}"


def table(results: list[Result]) -> str:
    head = (f"{'device':<6} {'batch':>5} {'pipeline':<10} {'step':<10} {'prec':<5} {'images':>6} {'img/s median':>12} "
            f"{'img/s min-max':>15} {'epoch_s med':>11} {'1st epoch s':>11} {'setup s':>7} {'data wait':>9} "
            f"{'TFLOP/s':>8} {'% peak':>7} {'MFU':>15} {'vs classic':>10} {'vs typical':>10}")
    lines = [head, "-" * len(head)]
    by_key = {(r.device, r.batch_size, r.pipeline): r for r in results}

    def ratio(r: Result, base: str) -> str:
        other = by_key.get((r.device, r.batch_size, base))
        return "" if other is None or other is r else f"{r.median_ips / other.median_ips:.2f}x"

    for r in results:
        tflops = f"{r.achieved_flop_s / 1e12:.3f}" if r.achieved_flop_s else "n/a"
        peak = f"{100 * r.achieved_flop_s / r.peak_flop_s:.1f}%" if r.achieved_flop_s and r.peak_flop_s else "n/a"
        first = f"{r.first_epoch_s:.2f}" if r.first_epoch_s is not None else "n/a"
        mfu = "n/a" if r.mfu is None or r.mfu_peak is None else (
            f"{100 * r.mfu:.1f}% {r.mfu_peak['precision']}" + (" meas." if r.mfu_peak["kind"] == MEASURED else ""))
        setup = f"{r.setup_s:.2f}" if r.setup_s is not None else "n/a"
        lines.append(
            f"{r.device:<6} {r.batch_size:>5} {r.pipeline:<10} {r.step_mode:<10} {r.precision:<5} {r.images:>6} "
            f"{r.median_ips:>12,.1f} {spread(r.images_per_s):>15} {statistics.median(r.epoch_s):>11.2f} {first:>11} "
            f"{setup:>7} {100 * r.data_fraction:>8.2f}% {tflops:>8} {peak:>7} {mfu:>15} {ratio(r, 'classic'):>10} "
            f"{ratio(r, 'typical'):>10}"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("all", "cpu", "cuda"), default="all",
                   help="all (default): CPU, plus CUDA when present")
    p.add_argument("--subset", type=int, metavar="N",
                   help=f"training images per epoch (default: {CPU_DEFAULT_SUBSET} on CPU, the whole split on CUDA)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[128, 512], metavar="N")
    p.add_argument("--repeats", type=int, default=3,
                   help="timed epochs per configuration (>= 3 for a spread; on CUDA epoch 1 is reported apart)")
    p.add_argument("--pipelines", nargs="+", metavar="NAME",
                   help="only these pipelines (classic, typical, fast-eager, fast); default all")
    p.add_argument("--warmup-steps", type=int, default=2,
                   help="CPU warm-up steps per configuration (CUDA and compiled runs warm up a whole epoch)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--compile", choices=TRAIN_COMPILE_MODES, default="none",
                   help="torch.compile mode for the fast path (default none)")
    p.add_argument("--dataset", choices=("auto", "cifar10", "synthetic"), default="auto")
    p.add_argument("--data", dest="data_dir", default="./data")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json-out", type=Path, metavar="PATH", help="also write the results as JSON")
    args = p.parse_args(argv)
    for flag in ("subset", "repeats", "warmup_steps", "threads"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1 (got {value})")
    if any(b < 1 for b in args.batch_sizes):
        p.error(f"--batch-sizes must all be >= 1 (got {args.batch_sizes})")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available here; use --device cpu")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = [resolve_device("cpu")] if args.device in ("all", "cpu") else []
    if args.device == "cuda" or (args.device == "all" and torch.cuda.is_available()):
        devices.append(resolve_device("cuda"))
    flops_per_image = flop_facts(resnet18())["train_flops_per_image"]
    load_before = os.getloadavg()
    print(f"ResNet-18 training FLOPs per image (torch.utils.flop_counter): {flops_per_image / 1e9:.3f} GFLOP")
    print(f"CPU: {device_label(torch.device('cpu'))}; native bf16 flags: {cpu_has_native_bf16()}; "
          f"load average at start {load_before[0]:.2f} (other processes share these cores)")
    results: list[Result] = []
    info: dict[str, Any] = {"flops_per_train_image": flops_per_image, "load_average_start": load_before,
                            "devices": {}, "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
    for device in devices:
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # as the runner does
        subset = args.subset if args.subset else (CPU_DEFAULT_SUBSET if device.type == "cpu" else None)
        base = TrainConfig(dataset=args.dataset, data_dir=args.data_dir, subset=subset, seed=args.seed,
                           device=device.type, evaluate=False, sync_timing=False)
        data = load_data(base)
        peaks: dict[str, float] = {}
        print(f"\n{device_label(device)}\ndata: {data.description}")
        info["devices"][device.type] = {"environment": environment(device), "data": data.description,
                                        "torch_threads": torch.get_num_threads(), "peak_matmul_flop_s": peaks}
        for batch in args.batch_sizes:
            if args.compile != "none":
                # A fresh compile per batch size: otherwise the second size recompiles the same frames as a
                # dynamic-shape graph (automatic dynamic shapes), a different program from a run at that size.
                torch.compiler.reset()
            contenders = []
            for pipe in pipelines(args.compile, device):
                if args.pipelines and pipe.name not in args.pipelines:
                    continue
                cfg = base.replace(batch_size=batch, **pipe.changes).validate()
                choice = choose_precision(cfg, device, say=lambda line: print(f"  {line}", flush=True))
                if cfg.precision == "auto":
                    print(f"  {pipe.name}: precision {choice.reason}")
                cfg = cfg.replace(precision=choice.precision)  # what `cifarlab train` runs with these flags
                precision = choice.precision
                if precision not in peaks:
                    peaks[precision] = matmul_peak(device, precision)
                    print(f"  measured {precision} matmul peak: {peaks[precision] / 1e12:.3f} TFLOP/s")
                warm = 0 if device.type == "cuda" else args.warmup_steps
                contenders.append(prepare(pipe, cfg, data, device, warm))
            # Epochs alternate between the pipelines, so a change in the machine's load during the
            # run (other processes share these cores) lands on both rather than on one.
            # On CUDA epoch 1 (no warm-up before it) is reported apart: one more epoch keeps --repeats steady ones.
            for epoch in range(1, args.repeats + (2 if device.type == "cuda" else 1)):
                for c in contenders:
                    timed_epoch(c, epoch)
            for c in contenders:
                r = c.result
                r.achieved_flop_s = flops_per_image * r.median_ips
                results.append(r)
                print(f"  batch {batch:>4} {c.pipeline.name:<8} ({c.pipeline.about}): {r.median_ips:,.1f} img/s "
                      f"(epochs {', '.join(f'{s:.2f}' for s in r.epoch_s)} s)", flush=True)
        # The peak is measured again after the runs and the better figure kept: on a shared machine one
        # measurement taken while other processes load the cores understates the device's peak.
        for precision in peaks:
            peaks[precision] = max(peaks[precision], matmul_peak(device, precision))
            print(f"  {precision} matmul peak, best of before and after the runs: {peaks[precision] / 1e12:.3f} TFLOP/s")
        for r in results:
            if r.device == device.type:
                r.peak_flop_s = peaks[r.precision]
                mfu_peak = resolve_peak(device, r.precision)
                if mfu_peak.kind == MEASURED:  # this benchmark's best of two longer measurements is the better one
                    mfu_peak = dataclasses.replace(mfu_peak, tflops=max(mfu_peak.tflops, peaks[r.precision] / 1e12))
                r.mfu, r.mfu_peak = (r.achieved_flop_s or 0.0) / 1e12 / mfu_peak.tflops, mfu_peak.to_dict()
                print(f"  MFU of {r.pipeline} batch {r.batch_size} against the {mfu_peak.label()}: "
                      f"{mfu_peak.tflops:,.3g} TFLOP/s ({mfu_peak.source.split(',')[0]})")
    load_after = os.getloadavg()
    print(f"\nmedians over {args.repeats} epochs after a warm-up; data wait = median share of the epoch spent blocked "
          f"on the loader; % peak = achieved / measured matmul peak in the run's precision; MFU = achieved / the peak "
          f"cifarlab train uses (published for known cards, 'meas.' = measured); "
          f"load average at end {load_after[0]:.2f}")
    print(table(results))
    if args.json_out:
        info["load_average_end"] = load_after
        info["results"] = [r.to_dict() for r in results]
        write_json_atomic(args.json_out, info)
        print(f"wrote {args.json_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
