"""`cifarlab train` under torchrun: with --nproc G (and --nnodes N --rdzv-endpoint HOST:PORT on several nodes,
rendezvous.py; or the SLURM variables of a multi-node srun step, slurm.py) start torchrun with the user's own
train flags; under torchrun join the process group and run the ordinary train command in it, with rank 0 alone
printing. With --max-restarts K the workers train with --run-dir DIR --resume auto, so that workers torchrun
restarts after one died continue from the last checkpoint (autoresume.py)."""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
from types import FrameType
from typing import Callable

import torch

from cifarlab.cli.rendezvous import (
    LAUNCH_FLAGS,
    Rendezvous,
    rendezvous_from_flags,
    without_launch_flags,
)
from cifarlab.cli.slurm import slurm_rendezvous, slurm_step
from cifarlab.config import TrainConfig
from cifarlab.core.errors import UsageError
from cifarlab.core.folders import create_run_dir
from cifarlab.core.runtime import resolve_device, usable_cpus
from cifarlab.core.signals import StopOnSignal
from cifarlab.parallel.collectives import launched_by_torchrun
from cifarlab.parallel.ddp import session
from cifarlab.run.autoresume import AUTO, plan_run, worker_mark
from cifarlab.run.checkpoint import resume_config
from cifarlab.run.runner import prepare

MAX_NPROC = 1024


def run_train_command(
    args: argparse.Namespace, cfg: TrainConfig, train_here: Callable[[argparse.Namespace], int]
) -> int:
    """With launch flags (or in a multi-node SLURM step) launch torchrun; under torchrun join the process
    group and run `train_here` in it, printing on rank 0 only; else just run it. `args.argv` holds the
    user's `train ...` words."""
    rendezvous = launch_plan(args)
    if rendezvous is not None:
        return launch(args, cfg, rendezvous)
    if not launched_by_torchrun():
        return train_here(args)
    with session(cfg.device) as info, worker_mark(getattr(args, "run_dir", None), info.rank):
        if info.rank != 0:
            # Only rank 0 prints. Errors still reach the user: cli.main prints them after this
            # block has restored the streams.
            with open(os.devnull, "w") as null, contextlib.redirect_stdout(null), contextlib.redirect_stderr(null):
                return train_here(args)
        if getattr(args, "resume", None) in (None, AUTO):  # a resumed run's banner says the rest
            print(f"dist:   {info.world_size} processes ({info.backend}); --batch-size {cfg.batch_size} per process "
                  f"= global batch {cfg.batch_size * info.world_size}", flush=True)
        return train_here(args)


def launch_plan(args: argparse.Namespace) -> Rendezvous | None:
    """The torchrun launch the flags ask for, or a multi-node SLURM step implies; None: train in this process."""
    given = {flag: getattr(args, flag[2:].replace("-", "_"), None) for flag in LAUNCH_FLAGS}
    if launched_by_torchrun():
        named = [flag for flag, value in given.items() if value is not None]
        if named:
            raise UsageError(f"{named[0]} starts torchrun itself; under torchrun leave it out")
        return None
    nproc, restarts = given["--nproc"], given["--max-restarts"]
    step = slurm_step()
    if step is not None and all(given[f] is None for f in ("--nnodes", "--rdzv-endpoint", "--rdzv-id")):
        from_slurm = slurm_rendezvous(step, nproc, restarts, MAX_NPROC)
        if from_slurm is not None:
            return from_slurm
    if all(value is None for value in given.values()):
        return None
    return rendezvous_from_flags(given["--nnodes"], nproc, given["--rdzv-endpoint"], given["--rdzv-id"], restarts,
                                 MAX_NPROC)


def check_resume(args: argparse.Namespace, nproc: int) -> TrainConfig:
    """--resume RUN_DIR --nproc N, checked once here (the workers refused a bad one N times over, each after
    loading the data, and torchrun added its traceback): the folder and its config as every worker checks
    them, and N against the number of processes its checkpoint was trained with. The run's config."""
    given = {k: v for k, v in vars(args).items() if k in TrainConfig.__dataclass_fields__}
    # the checkpoint is read once, there; the folder is claimed by rank 0
    return resume_config(args.resume, given, claim=False, processes=nproc)


def torchrun_command(nproc: int, flags: list[str], rendezvous: Rendezvous | None = None) -> list[str]:
    return [*(rendezvous or Rendezvous(nproc=nproc)).torchrun_args(), "-m", "cifarlab", "train", *flags]


def worker_flags(args: argparse.Namespace, cfg: TrainConfig, rendezvous: Rendezvous) -> list[str]:
    """The user's train flags for torchrun's workers. With restarts they train `--run-dir DIR --resume auto`:
    workers restarted after one died find the run and continue it from its checkpoint."""
    words = list(getattr(args, "argv", None) or [])
    flags = without_launch_flags(words[1:] if words[:1] == ["train"] else words)
    resume = getattr(args, "resume", None)
    if rendezvous.max_restarts == 0 or resume is not None and resume != AUTO:
        return flags  # an explicit --resume RUN_DIR continues that folder after a restart too
    if getattr(args, "run_dir", None) is None:
        if rendezvous.nnodes > 1:
            raise UsageError("--max-restarts on several nodes needs --run-dir DIR (a folder every node sees), so "
                             "that restarted workers find the run")
        flags += ["--run-dir", str(create_run_dir(cfg.out_dir, cfg.name))]
    return flags + (["--resume", AUTO] if resume is None else [])


def launch(args: argparse.Namespace, cfg: TrainConfig, rendezvous: Rendezvous) -> int:
    """Check what can be checked here (so bad input is one line, not N tracebacks), then run torchrun on this
    node with the user's own flags and return its exit code."""
    nproc = rendezvous.nproc
    resume = getattr(args, "resume", None)
    if getattr(args, "run_dir", None) is not None or resume == AUTO:
        if getattr(args, "run_dir", None) is None:
            raise UsageError("--resume auto needs --run-dir DIR: the folder every start of the run continues")
        plan = plan_run(args, cfg, rendezvous.world_size, claim=False)
        if plan.finished:
            print(f"cifarlab: {plan.message}", flush=True)
            return 0
        cfg = plan.config
        device = resolve_device(cfg.device) if plan.resume is not None else prepare(cfg)[0]
    elif resume is None:
        device, _ = prepare(cfg)  # flags, --out and the dataset, once, before N processes start
    else:
        cfg = check_resume(args, rendezvous.world_size)
        device = resolve_device(cfg.device)
    env = dict(os.environ)
    env = {**rendezvous.torchrun_env(), **env}
    if device.type == "cuda":
        if nproc > torch.cuda.device_count():
            raise UsageError(f"--nproc {nproc} but only {torch.cuda.device_count()} GPU(s) here; "
                             "use at most one process per GPU")
    else:
        if cfg.sync_bn:  # the workers would each refuse it, after starting, N error lines and torchrun's traceback
            raise UsageError("--sync-bn needs CUDA (torch's SyncBatchNorm has no CPU kernel); drop it on CPU")
        if nproc > usable_cpus():  # 64 processes on 2 cores each load torch and the data: the machine stalls
            raise UsageError(f"--nproc {nproc} but only {usable_cpus()} usable CPU core(s) and no GPU here; on a "
                             f"CPU each process is one core: use --nproc {usable_cpus()} or fewer")
        # Each CPU process is one "device": the usable cores are split between them.
        env.setdefault("OMP_NUM_THREADS", str(max(1, usable_cpus() // nproc)))
    flags = worker_flags(args, cfg, rendezvous)
    if rendezvous.nnodes > 1 or rendezvous.max_restarts:
        print(f"launch: {rendezvous.describe()}", flush=True)
    # In a SLURM step every process of the step gets the step's signals (torchrun and the workers too): passing
    # them on would stop torchrun twice, the second time in the middle of its own shutdown.
    with ForwardStopSignals(forward=slurm_step() is None) as forward:
        # torchrun in a session of its own: a terminal's Ctrl-C or a group's SIGTERM reaches it once, through
        # forward (as a `kill` of this process alone does), never twice (a second signal makes torchrun stop
        # waiting for its workers)
        proc = subprocess.Popen(torchrun_command(nproc, flags, rendezvous), env=env, start_new_session=True)
        forward.attach(proc)
        code = proc.wait()
    return 128 + forward.received if forward.received is not None else code


class ForwardStopSignals(StopOnSignal):
    """While torchrun runs: pass SIGINT and SIGTERM on to it (it passes them to the workers, which stop at
    the same step and write the finished epochs) and keep waiting until it has ended, so this process never
    exits while the workers still train or write -- a `kill` of the launcher alone once left torchrun and
    its workers training on, orphaned. Only the first signal is passed on, and a second one does not abort
    the wait. `received` is its number (exit code 128 + it). Installing and restoring the handlers (a
    signal the shell told us to ignore stays ignored) is StopOnSignal's."""

    def __init__(self, forward: bool = True) -> None:
        super().__init__()
        self.forward = forward
        self._proc: subprocess.Popen | None = None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is None:  # once: torchrun ends its workers by SIGKILL if they have not stopped 30 s later
            self.received = signum
            self._send(signum)

    def _send(self, signum: int) -> None:
        if self.forward and self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signum)

    def attach(self, proc: subprocess.Popen) -> None:
        self._proc = proc
        if self.received is not None:  # it came between Popen and here
            self._send(self.received)
