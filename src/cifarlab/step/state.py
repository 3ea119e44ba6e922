"""The types the training loop, DDP and checkpoints share: one epoch's record (what each timing holds:
train.engine's docstring) and the state a run trains (model, optimizer, captured step, evaluation forward).
They live below the loop and DDP so that neither imports the other for a type."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from cifarlab.step.capture import STEP_EAGER, StepRunner
from cifarlab.step.eval_forward import EvalForward


@dataclass
class EpochRecord:
    epoch: int
    status: str  # "ok" | "diverged" | "interrupted"
    train_loss: float  # mean over the epoch's training examples
    train_acc: float  # top-1, fraction in [0, 1], on augmented training batches
    test_loss: float | None
    test_acc: float | None
    images: int
    steps: int
    epoch_s: float
    data_s: float
    h2d_s: float | None
    compute_s: float | None
    other_s: float
    loader_start_s: float  # part of data_s: creating the iterator (worker start-up)
    eval_s: float | None
    images_per_s: float  # training images / epoch_s
    timing_mode: str  # "synchronized" | "async"
    diverged_step: int | None = None  # 0-based step of the first non-finite loss
    setup_s: float | None = None  # one-time setup before this epoch (first epoch of a process only)
    step_mode: str = STEP_EAGER  # "eager" | "cuda-graph" (capture.StepRunner.mode)
    lr: float | None = None  # the optimizer's learning rate after the epoch's last step
    tflops: float | None = None  # achieved: train FLOPs per image x images / epoch_s / 1e12 (model.utilization)
    mfu: float | None = None  # tflops / the peak of the precision used, all devices (run.json "utilization")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)



@dataclass
class TrainState:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: Any  # torch.amp.GradScaler or None
    device: torch.device
    precision: str  # resolved: fp32 | bf16 | fp16
    epoch: int = 0  # epochs completed
    records: list[EpochRecord] = field(default_factory=list)
    train_module: nn.Module | None = None  # compiled / wrapped module used for steps (else model)
    step_runner: StepRunner | None = None  # built and set up once, before the first epoch
    eval_forward: EvalForward | None = None  # built at the first evaluation
    setup_reported: bool = False  # setup_s already put on an epoch record

    @property
    def step_module(self) -> nn.Module:
        return self.train_module if self.train_module is not None else self.model

