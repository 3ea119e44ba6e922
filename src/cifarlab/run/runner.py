"""One training run from a config to a finished run folder: the call behind `cifarlab train` and every
experiment point. Fresh seed, data loaders, model and optimizer every time."""

from __future__ import annotations

import contextlib
import errno
import math
import os
import socket
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from cifarlab.config import TrainConfig
from cifarlab.core.errors import UsageError
from cifarlab.core.fileio import read_json, write_json_atomic
from cifarlab.core.folders import create_run_dir, ensure_writable_dir, utc_now
from cifarlab.core.runtime import cache_state, compile_cache, device_label, environment, resolve_device, seed_everything
from cifarlab.data import DataBundle, build_loaders, load_data
from cifarlab.model import utilization
from cifarlab.parallel import collectives, ddp
from cifarlab.run.checkpoint import CHECKPOINT_NAME, load_checkpoint, restore, save_checkpoint
from cifarlab.run.folder import RunWriter
from cifarlab.run.tensorboard_log import TensorBoardTarget, open_for_run
from cifarlab.step.state import EpochRecord, TrainState
from cifarlab.train.engine import Hooks, build_state, train
from cifarlab.train.precision import PrecisionChoice, choose_precision
from cifarlab.train.steps import check_cuda_graph


@dataclass
class RunResult:
    path: Path
    status: str  # completed | diverged | interrupted | oom
    records: list[EpochRecord]
    config: TrainConfig
    data_description: str
    device_label: str
    precision: str
    error: str | None = None  # one line for the user when status is "oom"
    precision_reason: str = ""  # why this precision (precision.PrecisionChoice.reason)

    @property
    def finished(self) -> list[EpochRecord]:
        return [r for r in self.records if r.status == "ok"]


def prepare(cfg: TrainConfig) -> tuple[torch.device, DataBundle]:
    """Validation and the checks that can fail on user input, before anything is written."""
    cfg.validate()
    ensure_writable_dir(Path(cfg.out_dir))
    device = resolve_device(cfg.device)
    check_cuda_graph(cfg, device)
    return device, load_data(cfg)


def run_training(
    cfg: TrainConfig,
    hooks: Hooks | None = None,
    data: DataBundle | None = None,
    extra_status: dict[str, Any] | None = None,
    resume: str | Path | None = None,
    run_dir: str | Path | None = None,
    precision: PrecisionChoice | None = None,
    tensorboard: TensorBoardTarget | None = None,
) -> RunResult:
    """Train per cfg, writing the run folder as epochs finish. `data` may be passed in so a sweep
    reads the dataset once; the model, optimizer, loaders and RNG state are always new.

    resume: an existing run folder (cfg from checkpoint.resume_config) whose checkpoint.pt is loaded
    into the fresh state; training continues there with epoch state.epoch + 1; with --precision auto it keeps
    the precision it started with (run.json's), never a new calibration's.
    run_dir: a fresh run trains into exactly this folder (created if missing; autoresume.plan_run checked it)
    instead of a new time-stamped one under cfg.out_dir.
    precision: the caller's choice (it printed it in the banner); None: precision.choose_precision here,
    before the run's seed is set and outside every epoch (its seconds are in run.json's precision_choice).
    Out of memory ends the run with status "oom" (a scaling sweep records it as the limit); a full or
    read-only disk is a UsageError naming the folder.
    tensorboard: where this run's TensorBoard events go (a resumed run continues in the folder its run.json names)."""
    cfg.validate()
    if data is None:
        device, data = prepare(cfg)
    else:
        ensure_writable_dir(Path(cfg.out_dir))
        device = resolve_device(cfg.device)
    if device.type == "cuda":
        # Let cuDNN pick the fastest convolution algorithms for these fixed shapes.
        torch.backends.cudnn.benchmark = True
    if precision is None:
        precision = resumed_precision(cfg, resume) or choose_precision(cfg, device)
    seed_everything(cfg.seed)
    with _oom_as_usage_error(cfg, device):
        train_loader, test_loader = build_loaders(cfg, data, device, rank=collectives.rank(),
                                                  world=collectives.world_size() if collectives.is_active() else None)
        state = build_state(cfg, device, precision.precision)
    extra = dict(extra_status or {})
    extra.update(pid=os.getpid(), host=socket.gethostname())  # lets --resume refuse a run still alive
    extra.update(ddp.run_section(cfg))  # {} unless launched by torchrun
    extra["precision_choice"] = precision.to_dict()
    started, elapsed_before_s, previous = "", 0.0, {}
    if resume is not None:
        folder = Path(resume)
        restore(state, load_checkpoint(folder / CHECKPOINT_NAME), folder / CHECKPOINT_NAME)
        if state.epoch >= cfg.epochs:
            raise UsageError(f"--resume {str(folder)!r}: all {state.epoch} epochs are already finished; "
                             f"add --epochs N with N > {state.epoch} to train further")
        previous = read_json(folder / "run.json") if (folder / "run.json").is_file() else {}
        started = previous.get("started", "")
        before = previous.get("elapsed_s")
        elapsed_before_s = float(before) if isinstance(before, (int, float)) and math.isfinite(before) else 0.0
        extra["resumed"] = [*previous.get("resumed", []),
                            {"at": utc_now(), "from_epoch": state.epoch, "elapsed_before_s": elapsed_before_s}]
    # Under torchrun: DistributedDataParallel, built after a resume so every rank starts from the restored weights.
    ddp.wrap_model(cfg, state)
    label = device_label(device)
    # Under torchrun only rank 0 creates the folder and writes; the other ranks learn its path.
    writer = ddp.main_only(RunWriter(
        path=Path(resume) if resume is not None else ddp.on_main(lambda: _new_run_dir(cfg, run_dir)),
        config=cfg,
        environment=environment(device),
        data_description=data.description,
        device_label=label,
        precision=state.precision,
        started=started,
        elapsed_before_s=elapsed_before_s,
    ))
    # FLOPs per image and the peak of the precision used (a measured matmul where no published one applies)
    util = utilization.for_run(cfg.norm, device, state.precision, collectives.world_size() if collectives.is_active() else 1)
    extra["utilization"] = util.describe()
    with _disk_errors_as_usage_error(writer.path):
        tb = open_for_run(tensorboard, writer.path, previous.get("tensorboard"), state.records) if collectives.is_main() else None
    if tb is not None:
        extra["tensorboard"] = tb.describe()
    with _disk_errors_as_usage_error(writer.path):
        if resume is None:
            writer.write_header()
        else:
            # --epochs may have changed: config.json must say what this run now trains to
            write_json_atomic(writer.path / "config.json", cfg.to_dict())
            writer.write_records(state.records)
            writer.write_status("running", state.records, **extra)
    user_hooks = hooks or Hooks()

    def on_epoch(record: EpochRecord, st: TrainState) -> None:
        record.tflops, record.mfu = util.epoch(record.images, record.epoch_s)
        writer.write_records(st.records)
        if tb is not None:
            tb.after_epoch(record, st.records)
        if record.status == "ok" and checkpoint_due(cfg, st.epoch) and collectives.is_main():
            t0 = time.perf_counter()
            save_checkpoint(writer.path, cfg, st)
            extra["checkpoint"] = {"file": CHECKPOINT_NAME, "epoch": st.epoch, "write_s": time.perf_counter() - t0}
        ddp.after_epoch(record, st, extra)  # collective under torchrun: replica check, all-reduce timings
        writer.write_status("running", st.records, **extra)
        if user_hooks.on_epoch is not None:
            user_hooks.on_epoch(record, st)

    engine_hooks = Hooks(on_step=user_hooks.on_step, on_epoch=on_epoch, should_stop=user_hooks.should_stop,
                         on_warning=user_hooks.on_warning)
    if cfg.compile != "none" and "compile_cache" not in extra:  # inductor's cache: where, warm or not (unless the
        extra["compile_cache"] = compile_cache()                   # caller already looked, as `train` does)
    error = None
    try:
        status = train(cfg, state, train_loader, test_loader if cfg.evaluate else None, engine_hooks)
    except KeyboardInterrupt:
        status = "interrupted"
    except BaseException as e:
        if not is_out_of_memory(e):
            with contextlib.suppress(OSError):  # a full disk must not hide the original error
                extra["traceback_file"] = writer.write_traceback(e)
            with contextlib.suppress(OSError):  # ... nor cost run.json its "failed" when the traceback did not fit
                writer.write_records(state.records)
                writer.write_status("failed", state.records, error=f"{type(e).__name__}: {e}", **extra)
            if isinstance(e, OSError) and e.errno in DISK_ERRNOS:
                raise UsageError(disk_error_message(e, writer.path)) from None
            raise
        status, error = "oom", oom_message(cfg, e, device)
    finally:
        if tb is not None:
            tb.close()  # flushed however training ended
    if "compile_cache" in extra:
        extra["compile_cache"]["entries_after"] = cache_state(extra["compile_cache"]["dir"])["entries"]
    if state.step_runner is not None:  # eager or captured step, and why (a capture that fell back says so)
        extra["step"] = state.step_runner.describe()
    if state.eval_forward is not None:  # evaluation's forward: captured per evaluation or eager, and why
        extra["eval_step"] = state.eval_forward.describe()
    if status == "oom":
        release_device_memory(device)
    last = state.records[-1] if state.records else None
    if status == "diverged" and last is not None:
        extra["diverged"] = {"epoch": last.epoch, "step": last.diverged_step}
    with _disk_errors_as_usage_error(writer.path):
        writer.write_records(state.records)
        writer.write_status(status, state.records, error=error, **extra)
    return RunResult(
        path=writer.path,
        status=status,
        records=state.records,
        config=cfg,
        data_description=data.description,
        device_label=label,
        precision=state.precision,
        error=error,
        precision_reason=precision.reason,
    )


def resumed_precision(cfg: TrainConfig, resume: str | Path | None) -> PrecisionChoice | None:
    """--resume with --precision auto: the precision the run started with (its run.json), so a resumed run never
    changes precision because a calibration, a cache or the machine's load changed in between."""
    if resume is None or cfg.precision != "auto" or not (Path(resume) / "run.json").is_file():
        return None
    previous = read_json(Path(resume) / "run.json").get("precision")
    if previous not in ("fp32", "bf16", "fp16"):
        return None
    return PrecisionChoice(previous, "auto", f"{previous}: resumed run, the precision it started with")


def _new_run_dir(cfg: TrainConfig, run_dir: str | Path | None) -> Path:
    if run_dir is None:
        return create_run_dir(cfg.out_dir, cfg.name)
    return ensure_writable_dir(Path(run_dir), "--run-dir")


def checkpoint_due(cfg: TrainConfig, epoch: int) -> bool:
    """Every checkpoint_every-th finished epoch, and always the last one (so a run can be extended)."""
    k = cfg.checkpoint_every
    return k > 0 and (epoch % k == 0 or epoch == cfg.epochs)


# ------------------------------------------------------------------------ resource errors, one line

# A full disk, a read-only mount, no permission, a quota: the user must free space or pick another --out.
DISK_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT}
_OOM_TYPES: tuple[type[BaseException], ...] = tuple(
    {getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError), torch.cuda.OutOfMemoryError}
)


def is_out_of_memory(e: BaseException) -> bool:
    # CUDA raises torch.OutOfMemoryError; the CPU allocator raises a plain RuntimeError.
    return isinstance(e, _OOM_TYPES) or (isinstance(e, RuntimeError) and "can't allocate memory" in str(e))


def oom_message(cfg: TrainConfig, e: BaseException, device: torch.device) -> str:
    in_eval = any(frame.name == "evaluate" for frame in traceback.extract_tb(e.__traceback__))
    flag, size = ("--test-batch-size", cfg.test_batch_size) if in_eval else ("--batch-size", cfg.batch_size)
    phase = "evaluation" if in_eval else "training"
    return (f"out of memory on {device} at {flag} {size} ({phase}); "
            f"try a smaller {flag}, e.g. {max(1, size // 2)}")


def release_device_memory(device: torch.device) -> None:
    """After an OOM the next sweep point must start with the device's memory free again."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


@contextlib.contextmanager
def _oom_as_usage_error(cfg: TrainConfig, device: torch.device) -> Iterator[None]:
    try:
        yield
        return
    except BaseException as e:
        if not is_out_of_memory(e):
            raise
    release_device_memory(device)  # outside the except block, so the traceback's tensors are freed
    raise UsageError(f"out of memory on {device} while placing the data and model there (--loader {cfg.loader}); "
                     f"try --loader torch or a smaller --subset")


def disk_error_message(e: OSError, folder: Path) -> str:
    name = errno.errorcode.get(e.errno or 0, "?")
    fix = "free some space" if e.errno in (errno.ENOSPC, errno.EDQUOT) else "make it writable"
    return (f"cannot write the run folder {str(folder)!r}: {e.strerror or e} ({name}); earlier runs are untouched "
            f"-- {fix} or choose another --out")


@contextlib.contextmanager
def _disk_errors_as_usage_error(folder: Path) -> Iterator[None]:
    try:
        yield
    except OSError as e:
        if e.errno not in DISK_ERRNOS:
            raise
        raise UsageError(disk_error_message(e, folder)) from None
