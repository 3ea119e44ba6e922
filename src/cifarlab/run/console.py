"""Console output for runs: a banner, one line per epoch (stdout), a progress bar inside the epoch
(stderr, only on a terminal so logs stay clean: core.step_bar.StepBar, drawn by tqdm)."""

from __future__ import annotations

import sys
from typing import Any, TextIO

from cifarlab.config import TrainConfig
from cifarlab.core.runtime import device_label
from cifarlab.core.step_bar import StepBar
from cifarlab.model.utilization import for_run
from cifarlab.parallel import collectives
from cifarlab.step.state import EpochRecord, TrainState
from cifarlab.train.engine import Hooks, resolve_precision
from cifarlab.train.precision import PrecisionChoice


def fmt_s(value: float | None) -> str:
    return "   n/a" if value is None else f"{value:6.2f}s"


def epoch_line(r: EpochRecord, total_epochs: int, show_utilization: bool = False) -> str:
    """One epoch on one line; show_utilization (GPUs) adds the achieved TFLOP/s and MFU (run.json "utilization")."""
    test = "" if r.test_acc is None else f"  test {100 * r.test_acc:5.1f}%"
    head = f"epoch {r.epoch}/{total_epochs}  loss {r.train_loss:.4f}  train {100 * r.train_acc:5.1f}%{test}"
    parts = (
        f"data {fmt_s(r.data_s)}  h2d {fmt_s(r.h2d_s)}  compute {fmt_s(r.compute_s)}  "
        f"other {fmt_s(r.other_s)}  = epoch {fmt_s(r.epoch_s)}  ({r.images_per_s:,.0f} img/s)"
    )
    if show_utilization and r.tflops is not None and r.mfu is not None:
        parts += f"  {r.tflops:.2f} TFLOP/s, MFU {100 * r.mfu:.1f}%"
    tail = "" if r.eval_s is None else f"  eval {fmt_s(r.eval_s)}"
    # one-time warm-up / graph capture before this process's first epoch (a CPU's ~0 s is not shown)
    if r.setup_s is not None and (r.setup_s >= 0.005 or r.step_mode != "eager"):
        tail += f"  | setup {fmt_s(r.setup_s)} not in epoch ({r.step_mode} step)"
    status = "" if r.status == "ok" else f"  [{r.status.upper()}" + (
        f" at step {r.diverged_step}]" if r.diverged_step is not None else "]")
    return f"{head}  | {parts}{tail}{status}"


def utilization_line(cfg: TrainConfig, device: Any, precision: str) -> str:
    """What the epoch lines' TFLOP/s and MFU are taken against (precision: the run's, resolved)."""
    util = for_run(cfg.norm, device, precision)
    peak = util.peak
    return (f"flops:  {util.flops_per_image / 1e9:.3f} GFLOP per training image (forward + backward); MFU against the "
            f"{peak.label()}, {peak.tflops:,.1f} TFLOP/s per device ({peak.source.split(',')[0]})")


class ConsoleProgress:
    def __init__(self, total_epochs: int, out: TextIO | None = None, err: TextIO | None = None,
                 prefix: str = "") -> None:
        self.total_epochs = total_epochs
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self.prefix = prefix
        self.step_bar = StepBar(self.err, batch_size=1)  # banner() sets the batch size
        self.show_utilization = False  # set by banner(): on GPUs

    def banner(self, cfg: TrainConfig, data_description: str, device: Any,
               compile_cache: dict[str, Any] | None = None, precision: PrecisionChoice | None = None) -> None:
        """The run's data, device, model, the precision and why (precision.choose_precision's choice; without
        it the unmeasured rule) and (with --compile) inductor's cache as runtime.compile_cache found it."""
        if device.type != "cuda":
            mode = "synchronized (exact data/h2d/compute split; CPU ops finish before they return)"
        elif cfg.sync_timing:
            mode = "synchronized (exact data/h2d/compute split)"
        else:
            mode = "async (--no-sync-timing: epoch and data wait exact, h2d/compute not split)"
        if cfg.loader == "device":
            loader = f"loader device (split resident on {device.type}, batched crop/flip; --workers does not apply)"
        else:
            loader = f"loader torch (DataLoader + PIL transforms), workers {cfg.workers}"
        resolved = precision.precision if precision is not None else resolve_precision(cfg.precision, device)
        shown = resolved if resolved == cfg.precision else f"{resolved} ({cfg.precision})"
        print(f"{self.prefix}data:   {data_description}", file=self.out)
        print(f"{self.prefix}device: {device_label(device)}; {loader}, batch {cfg.batch_size}; timing {mode}",
              file=self.out)
        print(f"{self.prefix}model:  ResNet-18 norm={cfg.norm}; optimizer {cfg.optimizer} lr {cfg.lr} "
              f"momentum {cfg.momentum} wd {cfg.weight_decay}; precision {shown}, "
              f"channels_last {cfg.channels_last}, compile {cfg.compile}", file=self.out)
        if precision is not None and cfg.precision == "auto":
            spent = f"; {precision.calibration_s:.1f} s of calibration, setup, not in any epoch" if precision.calibration_s else ""
            print(f"{self.prefix}precision: {precision.reason}{spent}", file=self.out)
        self.step_bar.batch_size = cfg.batch_size
        self.show_utilization = device.type == "cuda"
        if self.show_utilization:
            print(f"{self.prefix}{utilization_line(cfg, device, resolved)}", file=self.out)
        if compile_cache:
            files = compile_cache["entries_before"]
            state = f"warm, {files:,} file(s)" if files else "cold"
            # under torchrun the runs keep no warm-up before epoch 1 (steps.prepare_step_runner), so it compiles there
            lands = ("in epoch 1 (data parallel: no warm-up before it)" if collectives.launched_by_torchrun()
                     else "setup_s, apart from the epochs")
            print(f"{self.prefix}compile: torch.compile mode {cfg.compile}; inductor's on-disk cache {compile_cache['dir']} "
                  f"({state}; {compile_cache['source']}): its time is {lands}, and a rerun of this "
                  f"config compiles from the cache", file=self.out)
        self.out.flush()

    def on_step(self, epoch: int, step: int, steps_total: int) -> None:
        self.step_bar.on_step(f"{self.prefix}epoch {epoch}/{self.total_epochs}", epoch, step, steps_total)

    def on_epoch(self, record: EpochRecord, state: TrainState) -> None:
        self.step_bar.close()
        print(self.prefix + epoch_line(record, self.total_epochs, self.show_utilization), file=self.out)
        self.out.flush()

    def on_warning(self, message: str) -> None:
        print(f"{self.prefix}warning: {message}", file=self.err, flush=True)

    def hooks(self) -> Hooks:
        return Hooks(on_step=self.on_step, on_epoch=self.on_epoch, on_warning=self.on_warning)

    def finish(self, result: Any) -> None:
        print(f"{self.prefix}{result.status}: {len(result.finished)} epoch(s); run folder {result.path}", file=self.out)
