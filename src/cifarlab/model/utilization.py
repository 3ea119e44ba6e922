"""How far from the hardware's peak a run is: FLOPs per training image (counted once, by torch's flop counter),
achieved TFLOP/s per epoch and MFU (model FLOP utilization) against the peak for the precision actually used.

- FLOPs: torch.utils.flop_counter.FlopCounterMode over one real forward + loss + backward of the model on a
  batch (a multiply-add is 2 FLOPs; convolutions and matrix products only, as every MFU figure counts them).
  For a run it is counted on the "meta" device: the same operators and shapes, no arithmetic, no memory.
  The optimizer step, BatchNorm, ReLU and pooling are not counted (a few percent of the work, none of it on
  tensor cores).
- achieved TFLOP/s of an epoch = train FLOPs per image x training images / epoch_s (the whole epoch: data
  wait included, so it is what the run got, not what the kernels did) / 1e12.
- MFU = achieved TFLOP/s / (peak TFLOP/s per device x devices). The peak: peaks.py's published dense figure
  for the card and precision; fp32 on CUDA is tf32 where cuDNN may use tensor cores for convolutions (torch's
  default, torch.backends.cudnn.allow_tf32, compute capability >= 8.0). A device the table does not know,
  or a CPU, gets a measured matmul peak for that precision (labelled "measured peak"), measured once per
  process.
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from cifarlab.core.runtime import cpu_model
from cifarlab.model.peaks import published_peak
from cifarlab.model.resnet import resnet18

FLOPS_NOTE = ("torch.utils.flop_counter over one forward + loss + backward (multiply-add = 2 FLOPs; convolutions "
              "and matrix products; the optimizer step and elementwise ops not counted)")
MEASURED = "measured peak"
PUBLISHED = "published peak"
_DTYPES = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def count_flops(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[int, int]:
    """(forward FLOPs per image, forward + backward FLOPs per image) of `model` on this batch, by torch's flop
    counter. The forward is counted in eval mode on the first image, the training step in train mode on the
    whole batch (BatchNorm in training needs more than one value per channel); gradients are cleared after."""
    was_training = model.training
    model.eval()
    with FlopCounterMode(display=False) as forward:
        model(inputs[:1])
    model.train()
    with FlopCounterMode(display=False) as step:
        nn.functional.cross_entropy(model(inputs), targets).backward()
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    return forward.get_total_flops(), step.get_total_flops() // len(inputs)


@functools.lru_cache(maxsize=None)
def train_flops_per_image(norm: str = "batch") -> int:
    """Forward + backward FLOPs per training image of the lab's ResNet-18 (about 3.33 GFLOP), counted on the meta
    device: no arithmetic runs, so it costs milliseconds on any machine. Once per process and norm."""
    with torch.device("meta"):
        model = resnet18(norm=norm)
        inputs, targets = torch.empty(2, 3, 32, 32), torch.zeros(2, dtype=torch.long)
    return count_flops(model, inputs, targets)[1]


def achieved_tflops(flops_per_image: float, images: int, seconds: float) -> float | None:
    """FLOP/s over `seconds` in TFLOP/s; None when there is no time to divide by."""
    if not seconds > 0 or not math.isfinite(seconds):
        return None
    return flops_per_image * images / seconds / 1e12


def mfu(tflops: float | None, peak_tflops: float | None, devices: int = 1) -> float | None:
    """Achieved over peak (a fraction in [0, 1] when the peak is right), None when either is unknown."""
    if tflops is None or not peak_tflops or devices < 1:
        return None
    return tflops / (peak_tflops * devices)


@dataclass(frozen=True)
class Peak:
    """The peak a run's MFU is taken against."""

    tflops: float  # per device
    precision: str  # fp32 | tf32 | bf16 | fp16: the arithmetic the peak is for
    kind: str  # "published peak" (peaks.py) or "measured peak" (a matmul measured here)
    device_name: str  # as the device reports it
    card: str | None  # the table's card (published peaks)
    source: str  # datasheet, or how the measurement was made
    why: str  # why this precision (e.g. fp32 on Ampere counts as tf32)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def label(self) -> str:
        """"bf16 peak of the H100 SXM" / "fp32 measured peak" for sentences."""
        return f"{self.precision} peak of the {self.card}" if self.kind == PUBLISHED else f"{self.precision} {MEASURED}"


def peak_precision(precision: str, device: torch.device) -> tuple[str, str]:
    """The arithmetic a run in `precision` (fp32 | bf16 | fp16, resolved) actually uses, and why."""
    if precision != "fp32":
        return precision, f"autocast {precision}: convolutions and matmuls on {precision} tensor cores"
    if device.type == "cuda" and torch.backends.cudnn.allow_tf32 and torch.cuda.get_device_capability(device) >= (8, 0):
        return "tf32", ("fp32 on compute capability >= 8.0 with torch.backends.cudnn.allow_tf32 (torch's default): "
                        "cuDNN runs the convolutions on TF32 tensor cores")
    return "fp32", "fp32 arithmetic"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_model()


def resolve_peak(device: torch.device, precision: str) -> Peak:
    """The published peak for this device and precision, else a measured matmul peak."""
    used, why = peak_precision(precision, device)
    name = device_name(device)
    found = published_peak(name, used) if device.type == "cuda" else None
    if found is not None:
        card, tflops = found
        return Peak(tflops, used, PUBLISHED, name, card.name, card.source, why)
    n, tflops = measured_matmul_tflops(str(device), used)
    how = ("card not in cifarlab's table" if device.type == "cuda"
           else f"CPU: one thread's best x {torch.get_num_threads()} threads")
    return Peak(tflops, used, MEASURED, name, None,
                f"best of timed {n}x{n} {used} matmuls (torch.matmul) on this device ({how})", why)


@functools.lru_cache(maxsize=None)
def measured_matmul_tflops(device: str, precision: str, budget_s: float = 0.5) -> tuple[int, float]:
    """(matrix size, best TFLOP/s) of square matmuls in `precision` on `device`, over about budget_s seconds.
    Once per process and (device, precision): a lab's runs share it.

    On a CPU one thread is timed and its best multiplied by torch's thread count: on a machine other jobs share,
    a multi-threaded matmul waits for its slowest thread's turn (2 threads under a load of 11 on 2 cores: 6-10
    GFLOP/s, against 190 idle), while one thread still finds whole time slices (95-100 GFLOP/s per thread, the
    idle rate); a matmul scales with cores, so that product is the peak the training's threads could reach."""
    dev = torch.device(device)
    n = 4096 if dev.type == "cuda" else 512
    a = torch.randn(n, n, device=dev, dtype=_DTYPES[precision])
    b = torch.randn(n, n, device=dev, dtype=_DTYPES[precision])
    tf32_before, threads = torch.backends.cuda.matmul.allow_tf32, torch.get_num_threads()
    torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
    if dev.type == "cpu":
        torch.set_num_threads(1)
    try:
        torch.matmul(a, b)  # first call: library load, kernel choice
        best = math.inf
        t_end = time.perf_counter() + budget_s
        for _ in range(1000):
            _sync(dev)
            t0 = time.perf_counter()
            for _ in range(4 if dev.type == "cuda" else 1):
                torch.matmul(a, b)
            _sync(dev)
            best = min(best, (time.perf_counter() - t0) / (4 if dev.type == "cuda" else 1))
            if time.perf_counter() > t_end:
                break
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32_before
        torch.set_num_threads(threads)
    return n, 2 * n**3 / best / 1e12 * (threads if dev.type == "cpu" else 1)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass(frozen=True)
class Utilization:
    """One run's FLOPs per image and peak: fills each epoch record's tflops and mfu."""

    flops_per_image: int
    peak: Peak
    devices: int = 1  # processes of a data-parallel run, one device each

    def epoch(self, images: int, epoch_s: float) -> tuple[float | None, float | None]:
        """(achieved TFLOP/s, MFU) of an epoch of `images` training images in epoch_s seconds."""
        tflops = achieved_tflops(self.flops_per_image, images, epoch_s)
        return tflops, mfu(tflops, self.peak.tflops, self.devices)

    def describe(self) -> dict[str, Any]:
        """run.json's "utilization" section."""
        return {"train_flops_per_image": self.flops_per_image, "flops_counted_by": FLOPS_NOTE,
                "peak": self.peak.to_dict(), "devices": self.devices,
                "tflops": "train_flops_per_image x images / epoch_s / 1e12 (whole epoch, data wait included)",
                "mfu": "tflops / (peak.tflops x devices)"}


def for_run(norm: str, device: torch.device, precision: str, devices: int = 1) -> Utilization:
    return Utilization(train_flops_per_image(norm), resolve_peak(device, precision), devices)
