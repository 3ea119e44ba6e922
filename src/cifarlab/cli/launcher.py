"""`cifarlab train` under torchrun: with --nproc N start torchrun on this node with the user's own
train flags; under torchrun join the process group and run the ordinary train command in it, with
rank 0 alone printing. Multi-node: run torchrun yourself on every node (docs/distributed.md)."""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
from types import FrameType
from typing import Callable, Sequence

import torch

from cifarlab.config import TrainConfig
from cifarlab.core.errors import UsageError
from cifarlab.core.runtime import resolve_device, usable_cpus
from cifarlab.core.signals import StopOnSignal
from cifarlab.parallel.collectives import launched_by_torchrun
from cifarlab.parallel.ddp import session
from cifarlab.run.checkpoint import resume_config
from cifarlab.run.runner import prepare

MAX_NPROC = 1024


def run_train_command(
    args: argparse.Namespace, cfg: TrainConfig, train_here: Callable[[argparse.Namespace], int]
) -> int:
    """With --nproc N launch torchrun; under torchrun join the process group and run `train_here` in
    it, printing on rank 0 only; else just run it. `args.argv` holds the user's `train ...` words."""
    nproc = getattr(args, "nproc", None)
    if nproc is not None:
        if launched_by_torchrun():
            raise UsageError("--nproc starts torchrun itself; under torchrun leave it out")
        return launch(args, cfg, nproc)
    if not launched_by_torchrun():
        return train_here(args)
    with session(cfg.device) as info:
        if info.rank != 0:
            # Only rank 0 prints. Errors still reach the user: cli.main prints them after this
            # block has restored the streams.
            with open(os.devnull, "w") as null, contextlib.redirect_stdout(null), contextlib.redirect_stderr(null):
                return train_here(args)
        if getattr(args, "resume", None) is None:
            print(f"dist:   {info.world_size} processes ({info.backend}); --batch-size {cfg.batch_size} per process "
                  f"= global batch {cfg.batch_size * info.world_size}", flush=True)
        return train_here(args)


def without_nproc(argv: Sequence[str]) -> list[str]:
    """The user's train flags minus --nproc N / --nproc=N (torchrun's processes must not launch again)."""
    out: list[str] = []
    skip = False
    for word in argv:
        if skip:
            skip = False
            continue
        if word == "--nproc":
            skip = True
            continue
        if word.startswith("--nproc="):
            continue
        out.append(word)
    return out


def check_resume(args: argparse.Namespace, nproc: int) -> TrainConfig:
    """--resume RUN_DIR --nproc N, checked once here (the workers refused a bad one N times over, each after
    loading the data, and torchrun added its traceback): the folder and its config as every worker checks
    them, and N against the number of processes its checkpoint was trained with. The run's config."""
    given = {k: v for k, v in vars(args).items() if k in TrainConfig.__dataclass_fields__}
    # the checkpoint is read once, there; the folder is claimed by rank 0
    return resume_config(args.resume, given, claim=False, processes=nproc)


def torchrun_command(nproc: int, flags: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
            "--nproc_per_node", str(nproc), "-m", "cifarlab", "train", *flags]


def launch(args: argparse.Namespace, cfg: TrainConfig, nproc: int) -> int:
    """`cifarlab train --nproc N`: check what can be checked here (so bad input is one line, not N
    tracebacks), then run torchrun on this node with the user's own flags and return its exit code."""
    if isinstance(nproc, bool) or not 1 <= nproc <= MAX_NPROC:
        raise UsageError(f"--nproc must be between 1 and {MAX_NPROC} (got {nproc}); use the number of GPUs")
    if getattr(args, "resume", None) is None:
        device, _ = prepare(cfg)  # flags, --out and the dataset, once, before N processes start
    else:
        cfg = check_resume(args, nproc)
        device = resolve_device(cfg.device)
    env = dict(os.environ)
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
    words = list(getattr(args, "argv", None) or [])
    flags = without_nproc(words[1:] if words[:1] == ["train"] else words)
    with ForwardStopSignals() as forward:
        # torchrun in a session of its own: a terminal's Ctrl-C or a group's SIGTERM reaches it once, through
        # forward (as a `kill` of this process alone does), never twice (a second signal makes torchrun stop
        # waiting for its workers)
        proc = subprocess.Popen(torchrun_command(nproc, flags), env=env, start_new_session=True)
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

    def __init__(self) -> None:
        super().__init__()
        self._proc: subprocess.Popen | None = None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is None:  # once: torchrun ends its workers by SIGKILL if they have not stopped 30 s later
            self.received = signum
            self._send(signum)

    def _send(self, signum: int) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signum)

    def attach(self, proc: subprocess.Popen) -> None:
        self._proc = proc
        if self.received is not None:  # it came between Popen and here
            self._send(self.received)
