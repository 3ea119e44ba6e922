"""The training step runner: one step (zero_grad, forward, loss, backward, optimizer step, and the
on-device loss / correct / first-non-finite-step sums) run eagerly (`StepRunner`) or replayed as one
captured CUDA graph (`CapturedStep`), behind one interface so the engine has one code path.

Per epoch: `begin_epoch()`; per batch `load(inputs, targets)` (timed as h2d: for the graph, the copy
into its static input buffers) and `step(lr)` (timed as compute); `read_sums()` after the clock stops.
`setup()` runs once before epoch 1, timed apart (`setup_s`): on CUDA, warm-up for every batch shape
(cuDNN autotuning, torch.compile) and, for `CapturedStep`, the capture.

Warm-up never changes the run (`trainstate.preserved_training_state`): weights, buffers and optimizer state are
copied back in place, and state the warm-up created is zeroed -- for the lab's five optimizers exactly
a fresh state -- so a captured run starts from the weights an eager run from the same seed starts from.

Why each optimizer can be captured (torch >= 2.4; `CAPTURE_FLAGS`): the learning rate must be a device
tensor the graph reads (so --warmup-epochs changes it without recapture) and no step may read a value
back to the host. SGD: its fused kernel (tensor-lr overload). Adam and Adadelta: capturable=True (device
step counters, tensor lr inside their foreach math). Adagrad: optim.CapturableAdagrad's capturable path
(torch's foreach Adagrad reads its counters on the host; its fused kernel is CPU-only in torch 2.11). The partial
last batch runs eagerly on the same weights, optimizer state and sums (exact semantics: mean loss over
its real images). Anything that fails during setup falls back to eager with `fallback_reason` set.

Evaluation's forward pass is captured in `evalstep`.
"""

from __future__ import annotations

import contextlib
from typing import Any, Sequence

import torch
from torch import nn

from cifarlab.core.clock import DeviceClock
from cifarlab.core.text import one_line
from cifarlab.step.warmup import optimizer_params, preserved_training_state

STEP_EAGER = "eager"
STEP_GRAPH = "cuda-graph"
# Optimizer flags for the captured step, by class name, the first found along the class's MRO (sgd and
# sgd-nesterov are both SGD; a plain torch.optim.Adagrad has no entry: it cannot be captured).
CAPTURE_FLAGS: dict[str, dict[str, bool]] = {
    "SGD": {"fused": True, "foreach": False},
    "CapturableAdagrad": {"capturable": True, "foreach": True, "fused": False},
    "Adam": {"capturable": True, "foreach": True, "fused": False},
    "Adadelta": {"capturable": True, "foreach": True},
}
CAPTURE_WARMUP_STEPS = 3  # eager steps on the capture stream before capture (the torch docs use 3)


def autocast_context(precision: str, device: torch.device, cache_enabled: bool = True) -> contextlib.AbstractContextManager:
    """fp32: no autocast. A captured step needs cache_enabled=False: the autocast weight-cast cache is
    cleared on leaving the context, which would free tensors the graph still reads."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype, cache_enabled=cache_enabled)


class StepSums:
    """The epoch's running sums, on the device (read once per epoch): loss x images (float64), correct
    top-1 (int64), the 0-based index of the first step with a non-finite loss (-1: none yet) and the
    step counter that index is taken from. Updated in place, so a graph can hold their addresses."""

    def __init__(self, device: torch.device) -> None:
        self.loss_sum = torch.zeros((), device=device, dtype=torch.float64)
        self.correct = torch.zeros((), device=device, dtype=torch.int64)
        self.first_bad_step = torch.full((), -1, device=device, dtype=torch.int64)
        self.step_index = torch.zeros((), device=device, dtype=torch.int64)

    def reset(self) -> None:
        self.loss_sum.zero_()
        self.correct.zero_()
        self.first_bad_step.fill_(-1)
        self.step_index.zero_()

    def add(self, loss: torch.Tensor, outputs: torch.Tensor, targets: torch.Tensor) -> None:
        """Device ops only (no host read), so it can sit inside a captured graph."""
        loss_d = loss.detach()
        self.loss_sum.add_(loss_d.double() * targets.shape[0])
        self.correct.add_((outputs.detach().argmax(dim=1) == targets).sum())
        first = (~torch.isfinite(loss_d)) & (self.first_bad_step < 0)
        self.first_bad_step.copy_(torch.where(first, self.step_index, self.first_bad_step))
        self.step_index.add_(1)

    def read(self) -> tuple[float, int, int]:
        return float(self.loss_sum), int(self.correct), int(self.first_bad_step)


# ------------------------------------------------------------------------------------- eager


class StepRunner:
    """The eager step, exactly the engine's historical loop: lr set per step when given,
    zero_grad(set_to_none=True), forward and loss under autocast, backward (scaled for fp16), step."""

    mode = STEP_EAGER

    def __init__(
        self,
        module: nn.Module,
        optimizer: torch.optim.Optimizer,
        precision: str,
        device: torch.device,
        *,
        model: nn.Module | None = None,
        scaler: Any = None,
        loss_fn: nn.Module | None = None,
        note: str | None = None,
    ) -> None:
        self.module = module  # what runs the step (compiled / DDP-wrapped, or the model itself)
        self.model = model if model is not None else module  # the plain module: what warm-up restores
        self.optimizer = optimizer
        self.precision = precision
        self.device = device
        self.scaler = scaler
        self.loss_fn = loss_fn if loss_fn is not None else nn.CrossEntropyLoss()
        self.sums = StepSums(device)
        self.setup_s: float | None = None
        self.note = note  # why this run steps eagerly (None: nothing asked for more)
        self.fallback_reason: str | None = None  # a capture was attempted and failed: why
        self.full_batch: int | None = None  # the epoch's full batch size (setup's first size)
        self._batch: tuple[torch.Tensor, torch.Tensor] | None = None

    # --- the interface the engine uses
    def setup(self, batch_sizes: Sequence[int] = (), sample_shape: Sequence[int] = (3, 32, 32),
              channels_last: bool = True, warm_up: bool = True) -> float:
        """On CUDA, and on a CPU when the module is torch.compile's: one forward + backward per batch shape
        (cuDNN autotune, compilation) that changes nothing -- no optimizer step and no GradScaler update,
        BatchNorm statistics restored -- so that work is setup_s, not epoch 1's. Returns setup_s (device
        synchronized at both ends)."""
        t0 = DeviceClock(self.device).barrier_now()
        self.full_batch = int(batch_sizes[0]) if batch_sizes else None
        if warm_up and (self.device.type == "cuda" or self.compiles_model):
            with preserved_training_state(self.model, self.optimizer, keep_new_state=lambda: False):
                for b in dict.fromkeys(batch_sizes):
                    module = self.module_for(b)
                    if self.device.type != "cuda" and module is self.model:
                        continue  # a CPU has no autotuning: only the compiled shape needs its warm-up
                    x, y = _sample_batch(b, sample_shape, channels_last, self.device)
                    # No gradient kept from the previous shape: under torch.compile's own CUDA graphs
                    # (reduce-overhead) a compiled backward's gradients live in its graph pool, and the
                    # next compiled call would overwrite them before this backward accumulates into them.
                    self.model.zero_grad(set_to_none=True)
                    with autocast_context(self.precision, self.device):
                        loss = self.loss_fn(module(x), y)
                    loss.backward()
            self.optimizer.zero_grad(set_to_none=True)
        self.setup_s = DeviceClock(self.device).barrier_now() - t0
        return self.setup_s

    def begin_epoch(self) -> None:
        self.sums.reset()

    def load(self, inputs: torch.Tensor, targets: torch.Tensor) -> int:
        self._batch = (inputs, targets)
        return int(targets.shape[0])

    def step(self, lr: float | None = None) -> None:
        if self._batch is None:
            raise RuntimeError("step() before load()")
        inputs, targets = self._batch
        self._batch = None
        self._eager_step(inputs, targets, lr, self.sums)

    @property
    def first_bad_step(self) -> torch.Tensor:
        return self.sums.first_bad_step

    def read_sums(self) -> tuple[float, int, int]:
        """(loss x images, correct, first bad step or -1): one device read, after the epoch."""
        return self.sums.read()

    @property
    def compiles_model(self) -> bool:
        """Whether the step's module is torch.compile's wrapper of the plain model (not DDP's, not the model)."""
        return getattr(self.module, "_orig_mod", None) is self.model

    def module_for(self, batch: int) -> nn.Module:
        """The step's module for full batches; the plain model for the partial last batch when the module
        is torch.compile's wrapper of that model: a second input shape would cost a second compile (dynamic
        shapes; with max-autotune, minutes of autotuning) for one step an epoch. DDP wrappers are kept."""
        if self.full_batch is not None and batch != self.full_batch and self.compiles_model:
            return self.model
        return self.module

    def describe(self) -> dict[str, Any]:
        """For run.json: how steps ran and why."""
        return {"step": self.mode, "setup_s": self.setup_s, "note": self.note, "fallback_reason": self.fallback_reason}

    # --- internals
    def _eager_step(self, inputs: torch.Tensor, targets: torch.Tensor, lr: float | None, sums: StepSums) -> None:
        if lr is not None:
            for group in self.optimizer.param_groups:
                group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        with autocast_context(self.precision, self.device):
            outputs = self.module_for(int(inputs.shape[0]))(inputs)
            loss = self.loss_fn(outputs, targets)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        sums.add(loss, outputs, targets)


# ------------------------------------------------------------------------------------ captured


def capture_flags(optimizer: torch.optim.Optimizer) -> dict[str, bool]:
    for cls in type(optimizer).__mro__:
        if cls.__name__ in CAPTURE_FLAGS:
            return CAPTURE_FLAGS[cls.__name__]
    raise RuntimeError(f"no capturable configuration known for {type(optimizer).__name__}")


def prepare_optimizer(optimizer: torch.optim.Optimizer, lr: torch.Tensor) -> None:
    """Switch an optimizer to its capturable variant in place (`CAPTURE_FLAGS`), its lr to the device
    tensor `lr`, and existing step counters (e.g. from a resumed checkpoint) to the parameters'
    device, as the fused / capturable kernels require."""
    flags = capture_flags(optimizer)
    for group in optimizer.param_groups:
        group.update(flags)
        group["lr"] = lr
    for p in optimizer_params(optimizer):
        state = optimizer.state.get(p, {})
        if torch.is_tensor(state.get("step")) and state["step"].device != p.device:
            state["step"] = state["step"].to(device=p.device, dtype=torch.float32)
    # Adam/Adadelta warn once when a capturable instance steps outside a capture (warm-up, last batch).
    optimizer._warned_capturable_if_run_uncaptured = True  # type: ignore[attr-defined]


class CapturedStep(StepRunner):
    """The whole step as one CUDA graph over static input/target buffers of the full batch size; the
    lr lives in `lr_tensor` (filled between replays when it changes). Batches of another size (the
    last, partial one) run eagerly on the same state. After a failed setup it is a plain StepRunner."""

    mode = STEP_GRAPH

    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer, precision: str, device: torch.device,
                 *, batch_size: int, sample_shape: Sequence[int] = (3, 32, 32), channels_last: bool = True,
                 model: nn.Module | None = None, loss_fn: nn.Module | None = None,
                 warmup_steps: int = CAPTURE_WARMUP_STEPS) -> None:
        super().__init__(module, optimizer, precision, device, model=model, loss_fn=loss_fn)
        if precision == "fp16":
            raise ValueError("fp16 needs a GradScaler, whose inf check reads the device: use StepRunner")
        self.batch_size = batch_size
        self.sample_shape = tuple(sample_shape)
        self.channels_last = channels_last
        self.warmup_steps = warmup_steps
        self.graph: Any = None  # torch.cuda.CUDAGraph once captured
        self.lr_tensor: torch.Tensor | None = None
        self._lr_value: float | None = None
        self._static_x, self._static_y = _sample_batch(batch_size, self.sample_shape, channels_last, device)
        self._eager_next = False

    @property
    def captured(self) -> bool:
        return self.graph is not None

    def setup(self, batch_sizes: Sequence[int] = (), sample_shape: Sequence[int] | None = None,
              channels_last: bool | None = None, warm_up: bool = True) -> float:
        t0 = DeviceClock(self.device).barrier_now()
        groups_before = [dict(g) for g in self.optimizer.param_groups]  # flags and lr (shallow)
        steps_before = {id(p): s["step"] for p, s in self.optimizer.state.items() if "step" in s}
        try:
            self._warm_up_and_capture([b for b in dict.fromkeys(batch_sizes) if b != self.batch_size])
        except Exception as e:  # any failure: eager from here, with the optimizer as it was
            self.graph = None
            self.fallback_reason = f"{type(e).__name__}: {one_line(e)}"
            self.mode = STEP_EAGER
            for group, before in zip(self.optimizer.param_groups, groups_before):
                group.clear()
                group.update(before)
            for p, s in self.optimizer.state.items():
                if id(p) in steps_before:
                    s["step"] = steps_before[id(p)]
            if self.device.type == "cuda":
                with contextlib.suppress(Exception):
                    # a capture_end() that raised leaves torch.cuda.graph's side stream current
                    torch.cuda.set_stream(torch.cuda.default_stream(self.device))
                    torch.cuda.synchronize(self.device)
        self.setup_s = DeviceClock(self.device).barrier_now() - t0
        return self.setup_s

    def _warm_up_and_capture(self, other_batch_sizes: list[int]) -> None:
        if self.device.type != "cuda":
            raise RuntimeError(f"CUDA graphs need a CUDA device, not {self.device.type}")
        base_lr = float(self.optimizer.param_groups[0]["lr"])
        self.lr_tensor = torch.full((), base_lr, device=self.device, dtype=torch.float32)
        self._lr_value = base_lr
        prepare_optimizer(self.optimizer, self.lr_tensor)
        self.module.train()
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream(device=self.device)
        done = [False]
        # Zero new state only when the graph exists (it holds those tensors); otherwise drop it.
        with preserved_training_state(self.model, self.optimizer, keep_new_state=lambda: done[0]):
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                scratch = StepSums(self.device)
                for _ in range(self.warmup_steps):
                    self._graph_body(scratch)
                for b in other_batch_sizes:  # autotune / compile the partial batch's shape too
                    x, y = _sample_batch(b, self.sample_shape, self.channels_last, self.device)
                    self._eager_partial(x, y, scratch)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            for group in self.optimizer.param_groups:
                group["lr"] = self.lr_tensor  # the eager partial warm-up set a float
            with torch.cuda.graph(graph, stream=stream):
                self._graph_body(self.sums)
            torch.cuda.synchronize(self.device)
            done[0] = True
        # The graph read lr from lr_tensor's memory; the groups get a float back (checkpoints, eager
        # last batch), set from the same value before each eager step.
        for group in self.optimizer.param_groups:
            group["lr"] = base_lr
        self.graph = graph

    def _graph_body(self, sums: StepSums) -> None:
        # set_to_none=False: the gradients stay the tensors the graph writes (static addresses).
        self.optimizer.zero_grad(set_to_none=False)
        with autocast_context(self.precision, self.device, cache_enabled=False):
            outputs = self.module(self._static_x)
            loss = self.loss_fn(outputs, self._static_y)
        loss.backward()
        self.optimizer.step()
        sums.add(loss, outputs, self._static_y)

    def _eager_partial(self, inputs: torch.Tensor, targets: torch.Tensor, sums: StepSums) -> None:
        """The partial batch: eager on the plain model (same weights) even when the graph holds a compiled
        module (see StepRunner.module_for; here the model is used whatever wraps it: no DDP is captured)."""
        for group in self.optimizer.param_groups:
            group["lr"] = self._lr_value
        self.optimizer.zero_grad(set_to_none=False)
        with autocast_context(self.precision, self.device, cache_enabled=False):
            outputs = self.model(inputs)
            loss = self.loss_fn(outputs, targets)
        loss.backward()
        self.optimizer.step()
        sums.add(loss, outputs, targets)

    def load(self, inputs: torch.Tensor, targets: torch.Tensor) -> int:
        if not self.captured:
            return super().load(inputs, targets)
        if inputs.shape == self._static_x.shape:
            self._static_x.copy_(inputs, non_blocking=True)  # device->device, no host sync
            self._static_y.copy_(targets, non_blocking=True)
            self._eager_next = False
        else:
            self._batch = (inputs, targets)
            self._eager_next = True
        return int(targets.shape[0])

    def step(self, lr: float | None = None) -> None:
        if not self.captured:
            super().step(lr)
            return
        if lr is not None and lr != self._lr_value:
            self._lr_value = lr
            assert self.lr_tensor is not None
            self.lr_tensor.fill_(lr)  # a device-side fill, ordered before the replay on this stream
        if self._eager_next:
            inputs, targets = self._batch  # type: ignore[misc]
            self._batch = None
            self._eager_partial(inputs, targets, self.sums)
        else:
            self.graph.replay()


# ----------------------------------------------------------------------------------- helpers


def _sample_batch(batch: int, shape: Sequence[int], channels_last: bool, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A deterministic, RNG-free batch (warm-up must not move any random stream): a smooth pattern
    of normalized-image scale and labels 0..9 in turn."""
    n = batch
    for d in shape:
        n *= d
    x = torch.arange(n, device=device, dtype=torch.float32).mul_(0.01).sin_().view(batch, *shape)
    if channels_last and len(shape) == 3:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.arange(batch, device=device, dtype=torch.int64) % 10
    return x, y
