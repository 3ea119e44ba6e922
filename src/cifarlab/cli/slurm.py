"""SLURM: `cifarlab slurm [options] -- train ...` writes the batch script that runs a training (or the lab) on a
cluster into the run folder and submits it with sbatch; inside an allocation, `cifarlab train` reads the SLURM
variables (slurm_rendezvous) so a `srun` of it over several nodes needs no launch flags.

The script (render_script; docs/cluster.md explains it line by line): one task per node running `cifarlab
train`, which runs torchrun; node 0 from `scontrol show hostnames "$SLURM_JOB_NODELIST"`, the rendezvous port
derived from the job id (two jobs on one node never both take 29500), the rendezvous id = the job id;
`--requeue` and `--signal=B:USR1@120`: 120 s before the time limit the batch shell gets USR1, passes it to the
training (every rank stops at the same step boundary, the finished epochs are checkpointed) and requeues the
job, which continues the same run folder (`--resume auto`). No torch here: submitting stays instant."""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

from cifarlab.cli.rendezvous import LAUNCH_FLAGS, MAX_NODES, Rendezvous, rendezvous_from_flags
from cifarlab.config.flags import PROG, config_from_args
from cifarlab.core.errors import UsageError
from cifarlab.core.fileio import write_text_atomic
from cifarlab.core.folders import create_run_dir

SCRIPT_NAME = "job.sbatch"
WARNING_LEAD_S = 120  # --signal=B:USR1@120: time for the stop at a step boundary and the checkpoint write
PORT_BASE, PORT_SPAN = 15000, 15000  # rendezvous ports 15000-29999: below Linux's ephemeral range (32768+)
# Exit code of `cifarlab train` stopped by SIGUSR1 (128 + 10): the batch script requeues on it; where scontrol
# is missing, slurm.conf's RequeueExit=138 does the same.
EXIT_PREEMPTED = 138
TIME_PATTERN = re.compile(r"^(\d+-)?\d{1,3}(:\d{2}){0,2}$")  # sbatch's --time: MM, MM:SS, HH:MM:SS, D-HH[:MM[:SS]]
NAME_PATTERN = re.compile(r"^[A-Za-z0-9_.@+-]{1,128}$")


def rendezvous_port(job_id: int) -> int:
    return PORT_BASE + job_id % PORT_SPAN


# ------------------------------------------------------------------------------------ hostlists


def expand_hostlist(hostlist: str) -> list[str]:
    """`n[1-3]`, `a,b`, `g[01-02,05]`, `r[1-2]-n[1-2]` -> host names, in SLURM's order (zero padding kept)."""
    hosts: list[str] = []
    depth, start = 0, 0
    for i, c in enumerate(hostlist + ","):
        depth += (c == "[") - (c == "]")
        if depth < 0:
            raise UsageError(f"SLURM hostlist {hostlist!r} has an unmatched ']'")
        if c == "," and depth == 0:
            if i > start:
                hosts += _expand_one(hostlist[start:i], hostlist)
            start = i + 1
    if depth != 0 or not hosts:
        raise UsageError(f"SLURM hostlist {hostlist!r} is not a list of hosts such as n[1-3] or a,b")
    return hosts


def _expand_one(pattern: str, whole: str) -> list[str]:
    m = re.search(r"\[([^\]]*)\]", pattern)
    if m is None:
        return [pattern]
    head, tail = pattern[:m.start()], pattern[m.end():]
    out: list[str] = []
    for part in m.group(1).split(","):
        lo, _, hi = part.partition("-")
        if not lo.isdigit() or (hi and not hi.isdigit()) or (hi and int(hi) < int(lo)):
            raise UsageError(f"SLURM hostlist {whole!r}: {part!r} is not a number or a range such as 1-3")
        width = len(lo)
        for n in range(int(lo), int(hi or lo) + 1):
            out += [head + str(n).zfill(width) + rest for rest in _expand_one(tail, whole)]
    return out


def hostnames(hostlist: str) -> list[str]:
    """SLURM's own expansion (`scontrol show hostnames`) where scontrol is on PATH and answers, else
    expand_hostlist (the same rules for the forms SLURM writes)."""
    if shutil.which("scontrol") is not None:
        proc = subprocess.run(["scontrol", "show", "hostnames", hostlist], capture_output=True, text=True, timeout=60)
        if proc.returncode == 0 and proc.stdout.split():
            return proc.stdout.split()
    return expand_hostlist(hostlist)


# ------------------------------------------------------------------------ inside an allocation


@dataclass(frozen=True)
class SlurmStep:
    """The SLURM variables of a `srun` step that `cifarlab train` runs in."""

    job_id: int
    nodes: int
    tasks: int
    node_id: int
    nodelist: str
    gpus_on_node: int
    restart_count: int


def _int_var(env: Mapping[str, str], name: str, default: int | None = None) -> int:
    value = env.get(name)
    if value is None and default is not None:
        return default
    # SLURM writes some counts as "2(x3)" (per-node task counts); the variables read here are plain numbers
    if value is None or not value.strip().isdigit():
        raise UsageError(f"SLURM variable {name}={value!r} is not a whole number; run inside a SLURM job (srun) "
                         f"or unset the SLURM_* variables")
    return int(value)


def slurm_step(env: Mapping[str, str] = os.environ) -> SlurmStep | None:
    """The step's variables, None outside a srun step (a login node, the batch script itself)."""
    if "SLURM_JOB_ID" not in env or "SLURM_STEP_ID" not in env:
        return None
    nodes = _int_var(env, "SLURM_STEP_NUM_NODES", _int_var(env, "SLURM_NNODES", 1))
    return SlurmStep(
        job_id=_int_var(env, "SLURM_JOB_ID"),
        nodes=nodes,
        tasks=_int_var(env, "SLURM_STEP_NUM_TASKS", _int_var(env, "SLURM_NTASKS", nodes)),
        node_id=_int_var(env, "SLURM_NODEID", 0),
        nodelist=env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or "",
        gpus_on_node=_int_var(env, "SLURM_GPUS_ON_NODE", 0),
        restart_count=_int_var(env, "SLURM_RESTART_COUNT", 0),
    )


def slurm_rendezvous(step: SlurmStep, nproc: int | None, max_restarts: int | None, max_nproc: int,
                     hosts: Callable[[str], list[str]] = hostnames) -> Rendezvous | None:
    """The launch a multi-node step implies (None for a one-node step: `cifarlab train` as anywhere else).
    Variables that disagree are one line naming them, never a rendezvous that waits for nodes that never come."""
    if step.nodes <= 1:
        return None
    if step.tasks != step.nodes:
        raise UsageError(f"SLURM_STEP_NUM_TASKS={step.tasks} on SLURM_STEP_NUM_NODES={step.nodes}: cifarlab runs one "
                         f"task per node (its torchrun starts that node's processes); use srun --ntasks-per-node=1")
    if not step.nodelist:
        raise UsageError("SLURM_JOB_NODELIST is not set; run `cifarlab train` through srun inside the job")
    names = hosts(step.nodelist)
    if len(names) != step.nodes:
        raise UsageError(f"SLURM nodelist {step.nodelist!r} names {len(names)} host(s) but the step has "
                         f"{step.nodes} node(s); run it through srun as the job's script does")
    if not 0 <= step.node_id < step.nodes:
        raise UsageError(f"SLURM_NODEID={step.node_id} is outside the step's {step.nodes} node(s)")
    per_node = nproc if nproc is not None else max(step.gpus_on_node, 1)
    return rendezvous_from_flags(step.nodes, per_node, f"{names[0]}:{rendezvous_port(step.job_id)}",
                                 str(step.job_id), max_restarts, max_nproc)


# ------------------------------------------------------------------------------------ the script


@dataclass(frozen=True)
class JobSpec:
    """`cifarlab slurm`'s options and the command it wraps."""

    nodes: int
    gpus_per_node: int
    cpus_per_task: int | None
    time: str | None
    partition: str | None
    account: str | None
    command: list[str]  # ["train", ...] or ["lab", ...]
    run_dir: Path
    workdir: Path
    python: str = sys.executable


def _q(word: str | Path) -> str:
    return shlex.quote(str(word))


def render_script(job: JobSpec) -> str:
    """The batch script, every line of it explained in docs/cluster.md."""
    kind = job.command[0]
    sb = [f"--job-name=cifarlab-{kind}", f"--nodes={job.nodes}", "--ntasks-per-node=1"]
    if job.gpus_per_node:
        sb.append(f"--gpus-per-node={job.gpus_per_node}")
    for flag, value in (("--cpus-per-task", job.cpus_per_task), ("--time", job.time),
                        ("--partition", job.partition), ("--account", job.account)):
        if value is not None:
            sb.append(f"{flag}={value}")
    sb += [f"--chdir={job.workdir}", f"--output={job.run_dir}/slurm-%j.out", "--open-mode=append"]
    train = kind == "train"
    if train:
        sb += ["--requeue", f"--signal=B:USR1@{WARNING_LEAD_S}"]
    lines = ["#!/bin/bash", f"# Written by `{PROG} slurm`; submit it again with: sbatch {_q(job.run_dir / SCRIPT_NAME)}"]
    lines += [f"#SBATCH {s}" for s in sb]
    lines += ["", f"run_dir={_q(job.run_dir)}",
              'head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
              f"port=$(({PORT_BASE} + SLURM_JOB_ID % {PORT_SPAN}))",
              'echo "cifarlab: job $SLURM_JOB_ID (requeued ${SLURM_RESTART_COUNT:-0} time(s)) on $SLURM_JOB_NODELIST,'
              ' started $(date -u +%FT%TZ), rendezvous $head_node:$port"']
    # the user's words quoted; the script's own variables expanded by the shell
    words = [_q(w) for w in [job.python, "-m", "cifarlab", *job.command]]
    if train:
        words += ["--run-dir", '"$run_dir"', "--resume", "auto"]
        if job.nodes > 1:
            words += ["--nnodes", str(job.nodes), "--rdzv-endpoint", '"$head_node:$port"', "--rdzv-id", "$SLURM_JOB_ID"]
        srun = ["srun", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    else:
        srun = ["srun", "--nodes=1", "--ntasks=1"]  # the lab runs on the allocation's first node
    command = " ".join([*srun, *words])
    if not train:
        return "\n".join([*lines, command, ""])
    lines += ["",
              "stop_requested=0",
              "on_time_limit_warning() {",
              "    stop_requested=1",
              f'    echo "cifarlab: USR1 at $(date -u +%FT%TZ): {WARNING_LEAD_S} s to the time limit; stopping at the next '
              'step, then requeueing"',
              '    kill -USR1 "$srun_pid" 2>/dev/null  # srun passes it to every task; torchrun to every worker',
              "}",
              "trap on_time_limit_warning USR1",
              f"{command} &",
              "srun_pid=$!",
              "while :; do  # a trapped signal ends `wait` early: wait again until srun has ended",
              '    wait "$srun_pid"; code=$?',
              '    kill -0 "$srun_pid" 2>/dev/null || break',
              "done",
              f'if [ "$stop_requested" = 1 ] || [ "$code" = {EXIT_PREEMPTED} ]; then',
              "    if command -v scontrol >/dev/null; then",
              '        echo "cifarlab: requeueing job $SLURM_JOB_ID; it continues $run_dir"',
              '        scontrol requeue "$SLURM_JOB_ID" && exit 0',
              "    fi",
              f'    echo "cifarlab: no scontrol: exit {EXIT_PREEMPTED} (slurm.conf RequeueExit={EXIT_PREEMPTED} requeues it)"',
              f"    exit {EXIT_PREEMPTED}",
              "fi",
              'echo "cifarlab: training ended with exit code $code at $(date -u +%FT%TZ)"',
              'exit "$code"',
              ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ the command


def add_slurm_parser(sub: argparse._SubParsersAction, run: Callable[[argparse.Namespace], int]) -> None:
    p = sub.add_parser("slurm", help="run `train ...` or `lab ...` as a SLURM batch job (writes and submits the script)",
                       usage=f"{PROG} slurm [options] -- train|lab ...")
    p.add_argument("--nodes", type=int, default=1, metavar="N", help="nodes (one torchrun agent each; default 1)")
    p.add_argument("--gpus-per-node", type=int, default=0, metavar="G",
                   help="GPUs per node, one process each (default 0: CPU, --nproc in the train flags or 1)")
    p.add_argument("--cpus-per-task", type=int, metavar="C", help="CPU cores per node's task (sbatch --cpus-per-task)")
    p.add_argument("--time", metavar="HH:MM:SS", help="time limit; USR1 120 s before it stops and requeues the job")
    p.add_argument("--partition", metavar="P", help="sbatch --partition")
    p.add_argument("--account", metavar="A", help="sbatch --account")
    p.add_argument("--dry-run", action="store_true", help="write the script into the run folder and print it; submit nothing")
    p.set_defaults(func=run)


def split_command(words: list[str]) -> tuple[list[str], list[str]]:
    """`slurm OPTIONS -- COMMAND...` -> (["slurm", OPTIONS...], COMMAND); no `--` is one line."""
    if "--" not in words:
        raise UsageError(f"{PROG} slurm needs the command after --, e.g. {PROG} slurm --nodes 2 -- train --epochs 5")
    i = words.index("--")
    return words[:i], words[i + 1:]


def job_spec(args: argparse.Namespace, command: list[str], parsed: argparse.Namespace) -> tuple[JobSpec, str]:
    """Check `cifarlab slurm`'s options and the wrapped command (parsed: its namespace) before anything is
    written; the run folder is created here. (the job, a note for the user or '')."""
    if not command or command[0] not in ("train", "lab"):
        raise UsageError(f"{PROG} slurm runs `train ...` or `lab ...` after --, not {' '.join(command[:1]) or 'nothing'}")
    if not 1 <= args.nodes <= MAX_NODES:
        raise UsageError(f"--nodes must be between 1 and {MAX_NODES} (got {args.nodes})")
    if not 0 <= args.gpus_per_node <= 64:
        raise UsageError(f"--gpus-per-node must be between 0 and 64 (got {args.gpus_per_node})")
    if args.cpus_per_task is not None and not 1 <= args.cpus_per_task <= 4096:
        raise UsageError(f"--cpus-per-task must be between 1 and 4096 (got {args.cpus_per_task})")
    if args.time is not None and not TIME_PATTERN.match(args.time):
        raise UsageError(f"--time {args.time!r} is not a SLURM time; write HH:MM:SS (or D-HH:MM:SS), e.g. 02:00:00")
    for flag, value in (("--partition", args.partition), ("--account", args.account)):
        if value is not None and not NAME_PATTERN.match(value):
            raise UsageError(f"{flag} {value!r} is not a SLURM name (letters, digits, '.', '_', '-')")
    note = ""
    if command[0] == "lab":
        out = Path(getattr(parsed, "out_dir", "runs"))
        if args.nodes > 1:
            note = "the lab runs on the allocation's first node only (its scaling suite uses that node's GPUs)"
        return JobSpec(args.nodes, args.gpus_per_node, args.cpus_per_task, args.time, args.partition, args.account,
                       command, create_run_dir(out, "lab-slurm").resolve(), Path.cwd()), note
    for flag in ("resume", "run_dir", "nnodes", "rdzv_endpoint", "rdzv_id"):
        if hasattr(parsed, flag):
            name = "--" + flag.replace("_", "-")
            raise UsageError(f"{name} is set by {PROG} slurm (one run folder per job, continued after a requeue; "
                             f"the rendezvous from the allocation); drop {name} after --")
    cfg = config_from_args(parsed)
    nproc = getattr(parsed, "nproc", None)
    if args.gpus_per_node and nproc is not None and nproc != args.gpus_per_node:
        raise UsageError(f"--nproc {nproc} after -- but --gpus-per-node {args.gpus_per_node}: one process per GPU; "
                         f"drop --nproc")
    per_node = args.gpus_per_node or nproc or 1
    # the same checks `cifarlab train` makes (one line here, not a failed job in the queue)
    rendezvous_from_flags(args.nodes, per_node, "node0:1" if args.nodes > 1 else None, None,
                          getattr(parsed, "max_restarts", None), 1024)
    words = list(command)
    if args.gpus_per_node and nproc is None:
        words += ["--nproc", str(args.gpus_per_node)]
    run_dir = create_run_dir(cfg.out_dir, cfg.name).resolve()
    return JobSpec(args.nodes, args.gpus_per_node, args.cpus_per_task, args.time, args.partition, args.account,
                   words, run_dir, Path.cwd()), note


def cmd_slurm(args: argparse.Namespace, parse: Callable[[list[str]], argparse.Namespace]) -> int:
    """`cifarlab slurm ... -- COMMAND`: the script into the run folder; --dry-run prints it, else sbatch submits it."""
    _, command = split_command(list(args.argv))
    parsed = parse(command) if command else argparse.Namespace()
    job, note = job_spec(args, command, parsed)
    script = job.run_dir / SCRIPT_NAME
    write_text_atomic(script, render_script(job))
    if note:
        print(f"{PROG}: note: {note}", file=sys.stderr)
    if args.dry_run:
        print(script.read_text(), end="")
        print(f"# written to {script}; submit it with: sbatch {_q(script)}", file=sys.stderr)
        return 0
    if shutil.which("sbatch") is None:
        raise UsageError(f"sbatch is not on PATH (not a SLURM login node?); the script is in {script}: copy the run "
                         f"folder to the cluster and run `sbatch {script.name}` there, or use --dry-run")
    proc = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        said = (proc.stderr or proc.stdout).strip().splitlines()
        raise UsageError(f"sbatch refused {script}: {said[-1] if said else f'exit code {proc.returncode}'}")
    job_id = proc.stdout.strip().split(";")[0]
    log = job.run_dir / f"slurm-{job_id}.out"
    print(f"submitted job {job_id}: {script}\n  follow it: squeue -j {job_id}; tail -f {log}\n"
          f"  run folder: {job.run_dir} (a requeued job continues it)\n  cancel it: scancel {job_id}")
    return 0


__all__ = ["LAUNCH_FLAGS", "add_slurm_parser", "cmd_slurm", "expand_hostlist", "hostnames", "render_script",
           "slurm_rendezvous", "slurm_step"]
