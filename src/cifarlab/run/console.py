"""Console output for runs: a banner, one line per epoch (stdout), a progress bar inside the epoch
(stderr, only on a terminal so logs stay clean)."""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

from cifarlab.config import TrainConfig
from cifarlab.core.runtime import device_label
from cifarlab.parallel import collectives
from cifarlab.step.state import EpochRecord, TrainState
from cifarlab.train.engine import Hooks, resolve_precision
from cifarlab.train.precision import PrecisionChoice


def fmt_s(value: float | None) -> str:
    return "   n/a" if value is None else f"{value:6.2f}s"


def epoch_line(r: EpochRecord, total_epochs: int) -> str:
    test = "" if r.test_acc is None else f"  test {100 * r.test_acc:5.1f}%"
    head = f"epoch {r.epoch}/{total_epochs}  loss {r.train_loss:.4f}  train {100 * r.train_acc:5.1f}%{test}"
    parts = (
        f"data {fmt_s(r.data_s)}  h2d {fmt_s(r.h2d_s)}  compute {fmt_s(r.compute_s)}  "
        f"other {fmt_s(r.other_s)}  = epoch {fmt_s(r.epoch_s)}  ({r.images_per_s:,.0f} img/s)"
    )
    tail = "" if r.eval_s is None else f"  eval {fmt_s(r.eval_s)}"
    # one-time warm-up / graph capture before this process's first epoch (a CPU's ~0 s is not shown)
    if r.setup_s is not None and (r.setup_s >= 0.005 or r.step_mode != "eager"):
        tail += f"  | setup {fmt_s(r.setup_s)} not in epoch ({r.step_mode} step)"
    status = "" if r.status == "ok" else f"  [{r.status.upper()}" + (
        f" at step {r.diverged_step}]" if r.diverged_step is not None else "]")
    return f"{head}  | {parts}{tail}{status}"


class ConsoleProgress:
    def __init__(self, total_epochs: int, out: TextIO | None = None, err: TextIO | None = None,
                 prefix: str = "") -> None:
        self.total_epochs = total_epochs
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self.prefix = prefix
        self.bar = hasattr(self.err, "isatty") and self.err.isatty()
        self._epoch_t0 = time.perf_counter()
        self._last_draw = 0.0

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
        if not self.bar:
            return
        now = time.perf_counter()
        if step == 1:
            self._epoch_t0 = now
        if now - self._last_draw < 0.2 and step != steps_total:
            return
        self._last_draw = now
        elapsed = now - self._epoch_t0
        frac = step / steps_total if steps_total else 0.0
        eta = elapsed / step * (steps_total - step) if step else 0.0
        filled = int(30 * frac)
        self.err.write(f"\r{self.prefix}epoch {epoch}/{self.total_epochs} [{'#' * filled}{'.' * (30 - filled)}] "
                       f"{step}/{steps_total} steps, ETA {eta:5.1f}s ")
        self.err.flush()

    def on_epoch(self, record: EpochRecord, state: TrainState) -> None:
        if self.bar:
            self.err.write("\r" + " " * 100 + "\r")
            self.err.flush()
        print(self.prefix + epoch_line(record, self.total_epochs), file=self.out)
        self.out.flush()

    def on_warning(self, message: str) -> None:
        print(f"{self.prefix}warning: {message}", file=self.err, flush=True)

    def hooks(self) -> Hooks:
        return Hooks(on_step=self.on_step, on_epoch=self.on_epoch, on_warning=self.on_warning)

    def finish(self, result: Any) -> None:
        print(f"{self.prefix}{result.status}: {len(result.finished)} epoch(s); run folder {result.path}", file=self.out)
