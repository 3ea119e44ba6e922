"""Which step runner a training run gets -- one captured CUDA graph per step or the eager step, and
why -- and its one-time setup before epoch 1 (warm-up, capture, the device loader's first launch),
whose seconds are the run's setup_s. The engine calls `prepare_step_runner` once per process.
"""

from __future__ import annotations

import sys
from typing import Any, Callable, Sequence

import torch
from torch import nn

from cifarlab.config import TrainConfig
from cifarlab.core.clock import DeviceClock
from cifarlab.core.errors import UsageError
from cifarlab.data import DeviceLoader, EpochLoader
from cifarlab.parallel import collectives as dist
from cifarlab.step.capture import CapturedStep, StepRunner
from cifarlab.step.eval_forward import EvalForward


def _graph_blocker(cfg: TrainConfig, device: torch.device, classic: str) -> str | None:
    """What stops any CUDA graph in this run, the step's or evaluation's (None: nothing); `classic` says why
    the classic pipeline stays eager unless --cuda-graph on."""
    if cfg.cuda_graph == "off":
        return "--cuda-graph off"
    if device.type != "cuda":
        return f"CUDA graphs need a CUDA device (this run: {device.type})"
    if cfg.loader != "device" and cfg.cuda_graph == "auto":
        return classic
    return None


def capture_blocker(cfg: TrainConfig, device: torch.device, scaler: Any = None) -> str | None:
    """Why this run's step cannot be one captured CUDA graph (None: it can)."""
    if blocker := _graph_blocker(cfg, device, "the classic pipeline (--loader torch) steps eagerly "
                                              "(--cuda-graph on captures it too)"):
        return blocker
    if dist.is_active():
        return "data parallel (several processes): eager step, DDP's bucketed all-reduce is not captured"
    if scaler is not None:
        return "fp16 GradScaler: its overflow check reads the device every step; eager step"
    if cfg.compile in ("reduce-overhead", "max-autotune"):
        return f"--compile {cfg.compile} captures CUDA graphs of its own; eager step around them"
    return None


def epoch_batch_sizes(loader: Any, cfg: TrainConfig) -> list[int]:
    """The batch sizes one epoch of `loader` yields: the full one and the last, partial one (if any); for an iterable
    that is no EpochLoader, the configured batch size."""
    return loader.epoch_batch_sizes() if isinstance(loader, EpochLoader) else [cfg.batch_size]


def sample_shape(loader: Any) -> tuple[int, int, int]:
    """(C, H, W) of one input image: the loader's, else CIFAR's."""
    return loader.sample_shape() if isinstance(loader, EpochLoader) else (3, 32, 32)


def check_cuda_graph(cfg: TrainConfig, device: torch.device) -> None:
    """--cuda-graph on asks for a capture only CUDA can do: one usage line, before anything is printed or written."""
    if cfg.cuda_graph == "on" and device.type != "cuda":
        raise UsageError(f"--cuda-graph on needs a CUDA device (this run uses {device.type}); use --cuda-graph auto or off")


def build_step_runner(cfg: TrainConfig, *, module: nn.Module, model: nn.Module, optimizer: torch.optim.Optimizer,
                      precision: str, device: torch.device, scaler: Any, loader: Any) -> StepRunner:
    """A CapturedStep where the run can be one CUDA graph per step, else the eager StepRunner (with
    the reason in .note; with --cuda-graph on also in .fallback_reason, since it was asked for)."""
    check_cuda_graph(cfg, device)
    blocker = capture_blocker(cfg, device, scaler)
    if blocker is None:
        return CapturedStep(module, optimizer, precision, device, model=model,
                            batch_size=epoch_batch_sizes(loader, cfg)[0], sample_shape=sample_shape(loader),
                            channels_last=cfg.channels_last)
    # A checkpoint of a captured run carries the capturable flags (fused / capturable=True) in its
    # param groups; an eager run goes back to the flags the optimizer was built with.
    for group in optimizer.param_groups:
        group.update({k: optimizer.defaults[k] for k in ("fused", "foreach", "capturable") if k in optimizer.defaults})
    runner = StepRunner(module, optimizer, precision, device, model=model, scaler=scaler, note=blocker)
    if cfg.cuda_graph == "on":
        runner.fallback_reason = blocker
    return runner


def prepare_step_runner(cfg: TrainConfig, *, module: nn.Module, model: nn.Module, optimizer: torch.optim.Optimizer,
                        precision: str, device: torch.device, scaler: Any, loader: Any,
                        warn: Callable[[str], None] | None = None) -> StepRunner:
    """Build the runner and run its setup; one warning line if a wanted capture did not happen."""
    runner = build_step_runner(cfg, module=module, model=model, optimizer=optimizer, precision=precision,
                               device=device, scaler=scaler, loader=loader)
    # Warm-up (autotune, compile, capture) on the fast path, and wherever torch.compile is asked for (its
    # compilation is setup, never epoch 1's); the classic pipeline's eager runs and DDP runs stay as the lab
    # wrote them (their first epoch pays its own one-time costs, e.g. cuDNN's autotuning).
    warm_up = (cfg.loader == "device" or isinstance(runner, CapturedStep) or cfg.compile != "none") \
        and not dist.is_active()
    sizes: Sequence[int] = epoch_batch_sizes(loader, cfg)
    runner.setup(sizes, sample_shape(loader), cfg.channels_last, warm_up=warm_up)
    if warm_up and device.type == "cuda":
        runner.setup_s = (runner.setup_s or 0.0) + warm_device_loader(loader, device)
    if runner.fallback_reason is not None:
        (warn or warn_stderr)(f"CUDA graph step not used, training eagerly: {runner.fallback_reason}")
    return runner


def eval_capture_blocker(cfg: TrainConfig, device: torch.device) -> str | None:
    """Why evaluation's forward is not one captured CUDA graph (None: it is)."""
    if blocker := _graph_blocker(cfg, device, "the classic pipeline (--loader torch) evaluates eagerly, "
                                              "as the lab's script does"):
        return blocker
    if dist.is_active():  # NCCL's watchdog thread queries events, which a global-mode capture forbids
        return "data parallel (several processes): each rank evaluates its shard eagerly"
    return None


def build_eval_forward(cfg: TrainConfig, model: nn.Module, precision: str, device: torch.device) -> EvalForward:
    """Evaluation's forward: captured per evaluation on the fast path on CUDA (a host-bound eager forward of
    batch 100 launches ~100 kernels), else eager with the reason in .note."""
    blocker = eval_capture_blocker(cfg, device)
    return EvalForward(model, precision, device, capture=blocker is None, note=blocker)


def warm_device_loader(loader: Any, device: torch.device) -> float:
    """Draw one batch from a device loader (its kernels' first launch: lazy module loading) and put
    its generator back, so epoch 1 draws exactly what it would have drawn. Returns the seconds spent."""
    if not isinstance(loader, DeviceLoader) or loader.generator.device.type != device.type:
        return 0.0
    generator = loader.generator
    clock = DeviceClock(device)
    t0 = clock.barrier_now()
    saved = generator.get_state()
    next(iter(loader), None)
    generator.set_state(saved)
    return clock.barrier_now() - t0


def warn_stderr(message: str) -> None:
    print(f"cifarlab: warning: {message}", file=sys.stderr, flush=True)
