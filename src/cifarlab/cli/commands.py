"""What each subcommand does once its flags are parsed: train (and its torchrun launch), inspect,
lab, report. cli.py holds the parsers and imports this module only when a command runs (torch)."""

from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Callable

from cifarlab.cli.export_commands import cmd_export, cmd_infer_bench
from cifarlab.cli.launcher import run_train_command
from cifarlab.config import INSPECT_BATCH_SIZE, LabConfig, TrainConfig
from cifarlab.config.flags import PROG, config_from_args
from cifarlab.core.errors import UsageError
from cifarlab.core.runtime import compile_cache, workers_warning
from cifarlab.core.signals import RaiseOnSignal, StopOnSignal
from cifarlab.doctor.measure import run_doctor
from cifarlab.lab.driver import run_lab
from cifarlab.lab.render import build_report
from cifarlab.model.facts import explain, inspect_model
from cifarlab.model.optim import OPTIMIZERS
from cifarlab.parallel.collectives import launched_by_torchrun, world_size
from cifarlab.run.autoresume import AUTO, plan_run
from cifarlab.run.checkpoint import CHECKPOINT_NAME, resume_config
from cifarlab.run.console import ConsoleProgress
from cifarlab.run.runner import DISK_ERRNOS, is_out_of_memory, prepare, resumed_precision, run_training
from cifarlab.run.tensorboard_log import DEFAULT_FOLDER, require, target_for
from cifarlab.train.precision import choose_precision

EXIT_DIVERGED = 3  # docs/runs.md "Exit codes"; interrupted: 128 + signal (130 SIGINT, 143 SIGTERM, 138 SIGUSR1); usage: 2


def cmd_train(args: argparse.Namespace) -> int:


    resume, run_dir, history = getattr(args, "resume", None), getattr(args, "run_dir", None), None
    # torchrun's workers: one stop can arrive twice (autoresume.py); the hard stop is torchrun's SIGKILL
    with StopOnSignal(insist=not launched_by_torchrun()) as stop:
        if resume == AUTO and run_dir is None:
            raise UsageError("--resume auto needs --run-dir DIR: the folder every start of the run continues")
        if run_dir is not None:
            if resume is not None and resume != AUTO:
                raise UsageError("--resume RUN_DIR continues that folder; drop --run-dir (or use --resume auto)")
            plan = plan_run(args, config_from_args(args), world_size())
            if plan.message:
                print(f"{PROG}: {plan.message}", flush=True)
            if plan.finished:
                return 0
            cfg, resume, history = plan.config, plan.resume, plan.history
        elif resume is not None:

            given = {k: v for k, v in vars(args).items() if k in TrainConfig.__dataclass_fields__}
            cfg = resume_config(resume, given)
        else:
            cfg = config_from_args(args)
        warning = workers_warning(cfg.workers) if cfg.loader == "torch" else None  # only it has workers
        if warning:

            print(f"{PROG}: warning: {warning}", file=sys.stderr)
            # torch says the same in a multi-line warning at every loader start: once is enough
            warnings.filterwarnings("ignore", message="This DataLoader will create", category=UserWarning)
        device, data = prepare(cfg)
        if stop.should_stop():
            print(f"{PROG}: interrupted ({stop.signal_name}) before training started; nothing written", file=sys.stderr)
            return stop.exit_code or 130
        progress = ConsoleProgress(total_epochs=cfg.epochs)
        # inductor's cache is looked at once (a walk of its folder): the banner says it, run.json records it
        cache = compile_cache() if cfg.compile != "none" else None
        # --precision auto on a CPU with native bf16: measured (or the cached verdict) before the banner says it
        precision = resumed_precision(cfg, resume) or choose_precision(cfg, device, say=lambda s: print(s, flush=True))
        progress.banner(cfg, data.description, device, cache, precision)
        tensorboard = target_for(getattr(args, "tensorboard", None), Path(cfg.out_dir) / DEFAULT_FOLDER)
        if tensorboard is not None:
            print(f"tensorboard: events under {tensorboard.root}/ (view: tensorboard --logdir {tensorboard.root})", flush=True)
        hooks = dataclasses.replace(progress.hooks(), should_stop=stop.should_stop)
        extra = {**(history or {}), **({"compile_cache": cache} if cache else {})}
        result = run_training(cfg, hooks=hooks, data=data, resume=resume, run_dir=run_dir, extra_status=extra or None,
                              precision=precision, tensorboard=tensorboard)
        progress.finish(result)
    return _train_outcome(result, stop.signal_name, stop.exit_code)


def _train_outcome(result: Any, signal_name: str | None, signal_exit: int | None) -> int:
    """One line on stderr for every ending but success, and the exit code that tells them apart."""

    if result.status == "completed":
        return 0
    if result.status == "oom":
        raise UsageError(result.error)
    done = len(result.finished)
    kept = f"records of {done} finished epoch(s) kept in {result.path}"
    if result.status == "diverged":
        bad = result.records[-1]
        print(f"{PROG}: training diverged: the loss became NaN/inf at epoch {bad.epoch}, step {bad.diverged_step} "
              f"(--lr {result.config.lr}); {kept}; try a smaller --lr", file=sys.stderr)
        return EXIT_DIVERGED
    if result.status == "interrupted":
        has_ckpt = (result.path / CHECKPOINT_NAME).is_file()
        how = f"continue with: {PROG} train --resume {result.path}" if has_ckpt else "no checkpoint yet to resume from"
        print(f"{PROG}: interrupted ({signal_name or 'KeyboardInterrupt'}); {kept}; {how}", file=sys.stderr)
        return signal_exit or 130
    raise RuntimeError(f"unexpected run status {result.status!r}")


def cmd_inspect(args: argparse.Namespace) -> int:

    names = tuple(args.optimizer or ["sgd", "adam"])
    for name in names:
        if name not in OPTIMIZERS:
            raise UsageError(f"--optimizer {name!r} is not known; choose one of: {', '.join(OPTIMIZERS)}")
    # BatchNorm in training mode needs more than one value per channel; every layer here has at least
    # 4x4 positions per image, so one image is enough (issue 11: the seed report's counts are one image's)
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1 (got {args.batch_size})")
    try:
        facts = inspect_model(names, norm="none" if args.no_batchnorm else "batch", batch_size=args.batch_size)
    except (RuntimeError, MemoryError) as e:  # numpy's failed allocation is a MemoryError, torch's CPU one a RuntimeError
        if not (isinstance(e, MemoryError) or is_out_of_memory(e)):
            raise
        smaller = INSPECT_BATCH_SIZE if args.batch_size > INSPECT_BATCH_SIZE else max(1, args.batch_size // 2)
        raise UsageError(f"out of memory at --batch-size {args.batch_size} (the inspection's backward pass); "
                         f"try a smaller --batch-size, e.g. {smaller}") from None
    if args.json:
        print(json.dumps(facts, indent=2))
        return 0
    print(f"ResNet-18 (CIFAR variant, norm={facts['norm']})")
    rows = [
        ("conv layers", f"{facts['conv_layers']} ({', '.join(f'{v} x {k}' for k, v in facts['conv_layers_by_kernel'].items())})"),
        ("batch-norm layers", facts["batchnorm_layers"]),
        ("last linear input", facts["last_linear_in_features"]),
        ("trainable parameters", f"{facts['trainable_parameters']:,} in {facts['trainable_parameter_tensors']} tensors"),
        ("forward FLOPs / image", f"{facts['forward_flops_per_image'] / 1e9:.3f} GFLOP ({facts['forward_macs_per_image'] / 1e9:.3f} GMAC)"),
        ("train-step FLOPs / image", f"{facts['train_flops_per_image'] / 1e9:.3f} GFLOP (forward + backward)"),
    ]
    for name, o in facts["optimizers"].items():
        rows.append((f"[{name}] gradient elements", f"{o['gradient_elements']:,} in {o['gradient_tensors']} tensors "
                     f"({o['gradient_nonzero_elements']:,} non-zero on a batch of {o['backward_batch_size']})"))
        rows.append((f"[{name}] optimizer state", f"{o['optimizer_state_elements']:,} elements "
                     f"({o['optimizer_state_per_parameter']:.0f}x params) {o['optimizer_state_by_buffer']}"))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")
    print()
    for q, a in explain(facts):
        print(f"{q}\n  {a}")
    return 0


def cmd_lab(args: argparse.Namespace) -> int:

    # Before torch loads: keeps the profiler library's (kineto) error chatter out of the lab's output.
    os.environ.setdefault("KINETO_LOG_LEVEL", "5")
    given = {k: v for k, v in vars(args).items() if k in LabConfig.__dataclass_fields__}
    if "tensorboard" in given:
        require()
    if "only" in given:
        given["only"] = tuple(x for x in given["only"].split(",") if x.strip())
        if not given["only"]:
            raise UsageError("--only needs at least one item, e.g. --only c1,c3")
    try:
        _, code = run_lab(LabConfig(**given))
    except OSError as e:  # results.json or the report could not be written: the lab folder's disk is full/read-only
        if e.errno not in DISK_ERRNOS:
            raise
        where = repr(str(e.filename)) if e.filename else "into the lab folder"
        raise UsageError(f"cannot write {where}: {e.strerror} ({errno.errorcode.get(e.errno or 0, '?')}); each file "
                         f"there is whole or absent -- free some space or choose another --out") from None
    return code


def cmd_report(args: argparse.Namespace) -> int:

    paths = build_report(Path(args.lab_dir))
    print(f"report rebuilt from {args.lab_dir}: {paths['md']}, {paths['html']}")
    return 0


def train_entry(args: argparse.Namespace) -> int:
    """`cifarlab train`: --nproc N launches torchrun; under torchrun the process group wraps cmd_train."""
    if getattr(args, "tensorboard", None) is not None:
        require()  # once, before torchrun's N processes would each say it
    return run_train_command(args, config_from_args(args), cmd_train)


def cmd_doctor(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    with RaiseOnSignal():  # a signal ends the diagnosis; run_doctor writes what was measured, then says so
        run_doctor(cfg, getattr(args, "budget", None), cfg.out_dir, sys.stdout)
    return 0


# subcommand name -> what runs it (the parsers live in cli.py; export's and infer-bench's in exportcli.py)
COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "train": train_entry, "inspect": cmd_inspect, "lab": cmd_lab, "report": cmd_report, "doctor": cmd_doctor,
    "export": cmd_export, "infer-bench": cmd_infer_bench,
}
