"""The training and evaluation loop. Returns records; prints nothing.

What each per-epoch timing includes (lab C2), all in seconds of host wall-clock time:
- data_s:    blocked waiting for the next batch from the loader, including creating the loader's
             iterator (which starts worker processes) -- but not the host->device copy.
- h2d_s:     the host->device copy of the batch (and the channels_last re-layout), device synchronized.
- compute_s: zero_grad + forward + loss + backward + optimizer step (and the on-device loss/accuracy
             sums), device synchronized. On the captured path (capture.CapturedStep) this is one graph
             replay; the copy of the batch into the graph's static input buffers is charged to h2d_s.
- other_s:   everything else inside the epoch (loss/accuracy bookkeeping, hooks, progress output),
             computed as epoch_s - data_s - h2d_s - compute_s, so the four parts add up to epoch_s.
- epoch_s:   wall time of the training epoch, from before the iterator is created to after the last
             step has finished on the device. Evaluation is never inside it.
- eval_s:    the test-set evaluation after the epoch, timed on its own (on the fast path on CUDA, one
             captured forward graph per evaluation, its capture included: evalstep.EvalForward).

With sync_timing off (the fast path), the device is synchronized only at epoch boundaries: epoch_s
and data_s stay exact, but the split between h2d and compute is unknowable and is recorded as None
(timing_mode "async"); other_s then holds everything that is not data wait.

setup_s (not part of any epoch): the one-time work before epoch 1's clock -- on CUDA, warm-up steps
for every batch shape of the epoch (cuDNN autotuning, torch.compile compilation) and the capture of
the step's CUDA graph. Recorded on the first epoch record of the process (EpochRecord.setup_s).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
from torch import nn

from cifarlab.config import TrainConfig
from cifarlab.core.clock import DeviceClock, SegmentTimer
from cifarlab.data import EpochLoader
from cifarlab.model.optim import build_optimizer
from cifarlab.model.resnet import resnet18
from cifarlab.parallel import collectives as dist
from cifarlab.step.capture import StepRunner
from cifarlab.step.state import EpochRecord, TrainState
from cifarlab.train import steps

TIMED_SEGMENTS = ("data", "h2d", "compute")
# In async timing mode, how often (in steps) the device-side divergence flag is read back.
DIVERGENCE_CHECK_EVERY = 50


@dataclass
class Hooks:
    """Callbacks the caller may set; the engine itself never prints or writes files."""

    on_step: Callable[[int, int, int], None] | None = None  # (epoch, step done, steps in epoch)
    on_epoch: Callable[[EpochRecord, "TrainState"], None] | None = None
    should_stop: Callable[[], bool] | None = None  # polled after every step (Ctrl-C, SIGTERM)
    on_warning: Callable[[str], None] | None = None  # one line (e.g. graph capture fell back); default: stderr


def resolve_precision(requested: str, device: torch.device) -> str:
    """The precision rule without measurement: an explicit --precision wins; auto -> bf16 on CUDA GPUs that
    support it, fp32 on a CPU. Runs do not stop here for auto on a CPU with native bf16 (avx512_bf16 or
    amx_bf16): precision.choose_precision times a few steps of fp32 and bf16 on that CPU once (cached per
    machine, torch and model config) and picks bf16 only when it is measured faster by a clear margin,
    because the same flags have gone both ways (bf16 3.6x slower and 2.6x faster on 2-core Xeons with AMX,
    2.0x faster on an AMD EPYC with avx512_bf16). The runner passes that verdict to build_state."""
    if requested != "auto":
        return requested
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


def build_state(cfg: TrainConfig, device: torch.device, precision: str | None = None) -> TrainState:
    """A fresh model and optimizer for one run (never shared across sweep points). precision: the resolved
    one when the caller decided it (precision.choose_precision), else resolve_precision's rule."""
    model = resnet18(norm=cfg.norm).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(cfg.optimizer, model.parameters(), cfg.lr, cfg.momentum, cfg.weight_decay)
    precision = precision or resolve_precision(cfg.precision, device)
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    state = TrainState(model=model, optimizer=optimizer, scaler=scaler, device=device, precision=precision)
    if cfg.compile != "none":
        state.train_module = torch.compile(model, mode=cfg.compile)
    return state


def seed_epoch(seed: int, epoch: int, loader: Any) -> None:
    """Make epoch k's shuffling and augmentation depend only on (seed, k), not on what ran before:
    a resumed run then replays exactly the epochs an uninterrupted run would have."""
    epoch_seed = (seed * 1_000_003 + epoch) % 2**63
    # Under torchrun all ranks shuffle identically (one permutation, sharded) but must not draw the
    # same augmentation for different images: the augmentation RNGs get a per-rank seed (rank 0 and
    # single-process runs keep epoch_seed).
    aug_seed = dist.augmentation_seed(epoch_seed)
    torch.manual_seed(aug_seed)
    if isinstance(loader, EpochLoader):  # any other iterable replays whatever order it has
        loader.reseed(epoch, epoch_seed, aug_seed)


def warmup_lr(cfg: TrainConfig, epoch: int, step: int, steps_per_epoch: int) -> float:
    """Gradual warm-up (Goyal et al. 2017): over the first warmup_epochs epochs the learning rate
    rises linearly, per step, from lr * warmup_start_factor to lr; then it stays at lr."""
    total = cfg.warmup_epochs * steps_per_epoch
    done = (epoch - 1) * steps_per_epoch + step  # steps finished before this one
    if total <= 0 or done >= total:
        return cfg.lr
    f = cfg.warmup_start_factor
    return cfg.lr * (f + (1.0 - f) * done / total)


def ensure_step_runner(cfg: TrainConfig, state: TrainState, loader: Any, hooks: Hooks | None = None) -> StepRunner:
    """Build and set up the step runner once, before epoch 1's clock (its time is setup_s)."""
    if state.step_runner is None:
        state.step_runner = steps.prepare_step_runner(
            cfg, module=state.step_module, model=state.model, optimizer=state.optimizer, precision=state.precision,
            device=state.device, scaler=state.scaler, loader=loader, warn=hooks.on_warning if hooks else None)
    return state.step_runner


def _steps_in(loader: Any, max_steps: int | None) -> int:
    try:
        n = len(loader)
    except TypeError:
        n = 0
    return min(n, max_steps) if max_steps else n


def train_epoch(
    cfg: TrainConfig, state: TrainState, loader: Iterable, epoch: int, hooks: Hooks | None = None
) -> EpochRecord:
    hooks = hooks or Hooks()
    device = state.device
    runner = ensure_step_runner(cfg, state, loader, hooks)
    state.step_module.train()
    clock = DeviceClock(device, sync=cfg.sync_timing)
    steps_total = _steps_in(loader, cfg.max_steps)

    # Running sums stay on the device (runner.sums): reading them every step (.item()) would
    # synchronize the GPU each step and hide where the time goes. They are read once, after the
    # epoch's clock stops.
    runner.begin_epoch()
    images = steps = 0
    status = "ok"

    timer = SegmentTimer(clock)
    iterator = iter(loader)
    timer.lap("data")  # creating the iterator starts the loader's workers: that is loader wait too
    loader_start_s = timer.totals["data"]
    try:
        while cfg.max_steps is None or steps < cfg.max_steps:
            try:
                inputs, targets = next(iterator)
            except StopIteration:
                break
            timer.lap("data")

            inputs = inputs.to(device, non_blocking=True)
            targets = targets.to(device, non_blocking=True)
            if cfg.channels_last:
                inputs = inputs.contiguous(memory_format=torch.channels_last)
            batch = runner.load(inputs, targets)  # captured: copy into the graph's static buffers
            timer.lap("h2d")

            runner.step(warmup_lr(cfg, epoch, steps, steps_total) if cfg.warmup_epochs else None)
            timer.lap("compute")

            images += batch
            steps += 1
            if hooks.on_step is not None:
                hooks.on_step(epoch, steps, steps_total)
            # In synchronized mode the device is idle here anyway, so the check costs nothing extra.
            check_now = cfg.sync_timing or steps % DIVERGENCE_CHECK_EVERY == 0
            if check_now and int(runner.first_bad_step) >= 0:
                status = "diverged"
            elif hooks.should_stop is not None and hooks.should_stop():
                # after the epoch's last step the epoch is whole: train() keeps it, then stops (one process)
                status = "ok" if steps == steps_total and not dist.is_active() else "interrupted"
            if dist.is_active():
                # Every rank must stop at the same step, or the others wait forever in the next
                # all-reduce: agree (one tiny all-reduce, timed as other_s) at the same steps on all ranks.
                status = dist.agree_status(status) if check_now else "ok"
            timer.lap("other")
            if status != "ok":
                break
    except BaseException:
        # The traceback keeps this frame, and so the iterator and its worker processes, alive past Python's
        # exit handler, which terminate()s and joins daemonic children: shut them down here instead.
        shutdown = getattr(iterator, "_shutdown_workers", None)
        if callable(shutdown):
            shutdown()
        raise
    timer.stop()
    del iterator  # shut non-persistent workers down outside the timed region

    loss_total, correct_total, bad_step = runner.read_sums()
    parts = timer.breakdown(TIMED_SEGMENTS)
    epoch_s = timer.wall_s
    if dist.is_active():
        # Exact global metrics (sums and counts over all ranks, not an average of averages) and the
        # slowest rank's timings; the reduction runs after the clock stopped.
        parts.update(epoch_s=epoch_s, loader_start_s=loader_start_s)
        loss_total, correct_total, images, bad_step, parts = dist.reduce_epoch(
            loss_total, correct_total, images, bad_step, parts)
        epoch_s, loader_start_s = parts.pop("epoch_s"), parts.pop("loader_start_s")
    if bad_step >= 0:
        status = "diverged"
    setup_s = None if state.setup_reported else runner.setup_s
    state.setup_reported = True
    timing_mode = "synchronized" if clock.sync or device.type != "cuda" else "async"
    if timing_mode == "async":
        parts["other_s"] += parts["h2d_s"] + parts["compute_s"]
        parts["h2d_s"] = parts["compute_s"] = None
    return EpochRecord(
        epoch=epoch,
        status=status,
        train_loss=(loss_total / images) if images else math.nan,
        train_acc=(correct_total / images) if images else math.nan,
        test_loss=None,
        test_acc=None,
        images=images,
        steps=steps,
        epoch_s=epoch_s,
        data_s=parts["data_s"],
        h2d_s=parts["h2d_s"],
        compute_s=parts["compute_s"],
        other_s=parts["other_s"],
        loader_start_s=loader_start_s,
        eval_s=None,
        images_per_s=images / epoch_s if epoch_s > 0 else math.nan,
        timing_mode=timing_mode,
        diverged_step=bad_step if bad_step >= 0 else None,
        setup_s=setup_s,
        step_mode=runner.mode,
        lr=float(state.optimizer.param_groups[0]["lr"]),
    )


@torch.no_grad()
def evaluate(
    cfg: TrainConfig, state: TrainState, loader: Iterable, should_stop: Callable[[], bool] | None = None,
    warn: Callable[[str], None] | None = None,
) -> tuple[float, float, float] | None:
    """(mean loss, top-1 accuracy, seconds) on the whole loader, device synchronized at both ends. None when
    should_stop() turned true before the last batch (Ctrl-C, SIGTERM: a whole test set takes a minute on a
    CPU); a part of the test set would be a different number, so nothing is returned. Under torchrun the
    ranks' shards are evaluated whole (they stop together only at the step boundaries agreed in training)."""
    device = state.device
    # The plain module, never the compiled or DDP-wrapped one: a compiled module compiles again for eval
    # mode and the test batch (7.9 s on an H200 with --compile default, minutes with max-autotune) to save
    # a fraction of a second per evaluation; DDP's forward would start collectives that shards of unequal
    # length cannot match.
    model = state.model
    if state.eval_forward is None:
        state.eval_forward = steps.build_eval_forward(cfg, model, state.precision, device)
    forward = state.eval_forward
    had_fallen_back = forward.fallback_reason is not None
    if dist.is_active():
        dist.broadcast_buffers(model)  # rank 0's BatchNorm buffers, so every shard sees the same model
    model.eval()
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    clock = DeviceClock(device, sync=False)
    start = clock.barrier_now()
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    count = 0
    stop = should_stop if should_stop is not None and not dist.is_active() else None
    with forward.session():
        for inputs, targets in loader:
            if stop is not None and stop():
                return None
            inputs = inputs.to(device, non_blocking=True)
            targets = targets.to(device, non_blocking=True)
            if cfg.channels_last:
                inputs = inputs.contiguous(memory_format=torch.channels_last)
            outputs = forward(inputs)  # a captured graph's output: used up before the next call
            loss_sum += loss_fn(outputs.float(), targets).double()
            correct += (outputs.argmax(dim=1) == targets).sum()
            count += targets.shape[0]
    eval_s = clock.barrier_now() - start
    if forward.fallback_reason is not None and not had_fallen_back:
        (warn or steps.warn_stderr)(f"CUDA graph evaluation not used, evaluating eagerly: {forward.fallback_reason}")
    loss_total, correct_total = float(loss_sum), int(correct)
    if dist.is_active():  # each rank evaluated its own shard: sum them; eval_s of the slowest
        loss_total, correct_total, count, eval_s = dist.reduce_eval(loss_total, correct_total, count, eval_s)
    if count == 0:
        return math.nan, math.nan, eval_s
    return loss_total / count, correct_total / count, eval_s


def train(
    cfg: TrainConfig,
    state: TrainState,
    train_loader: Iterable,
    test_loader: Iterable | None,
    hooks: Hooks | None = None,
) -> str:
    """Train epochs state.epoch+1 .. cfg.epochs. Returns "completed", "diverged" or "interrupted"."""
    hooks = hooks or Hooks()
    if state.epoch < cfg.epochs:
        ensure_step_runner(cfg, state, train_loader, hooks)  # setup (timed apart) before epoch 1's clock
    for epoch in range(state.epoch + 1, cfg.epochs + 1):
        seed_epoch(cfg.seed, epoch, train_loader)
        record = train_epoch(cfg, state, train_loader, epoch, hooks)
        evaluation_stopped = False
        if record.status == "ok" and cfg.evaluate and test_loader is not None:
            measured = evaluate(cfg, state, test_loader, hooks.should_stop, hooks.on_warning)
            if measured is None:  # the epoch's training is whole and kept (checkpointed); its test figures are not
                evaluation_stopped = True
                (hooks.on_warning or steps.warn_stderr)(
                    f"epoch {epoch}: evaluation stopped by the signal; the epoch's training is kept, its test loss "
                    f"and accuracy are not recorded")
            else:
                record.test_loss, record.test_acc, record.eval_s = measured
        state.records.append(record)
        if record.status == "ok":
            state.epoch = epoch
        if hooks.on_epoch is not None:
            hooks.on_epoch(record, state)
        if record.status != "ok":
            return record.status
        if evaluation_stopped:
            return "interrupted"
        if epoch < cfg.epochs and hooks.should_stop is not None and not dist.is_active() and hooks.should_stop():
            return "interrupted"  # the signal came during the epoch's last step (or with no evaluation to stop)
    return "completed"
