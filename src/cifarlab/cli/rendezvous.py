"""Where the processes of a data-parallel run meet, and the torchrun command that gets them there: torchrun's
standalone rendezvous on one node (`--nproc G`), its c10d rendezvous across nodes (`--nnodes N --nproc G
--rdzv-endpoint HOST:PORT [--rdzv-id ID]`, one torchrun agent per node, the same command on every node), and
`--max-restarts K` (torchrun restarts the workers after one dies; they continue with `--resume auto`).
Every bad value is one line here, before any process starts. Inside a SLURM step the same values come
from the SLURM variables (slurm.py). No torch: the parsers stay instant."""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass

from cifarlab.core.errors import UsageError

MAX_NODES = 4096
MAX_RESTARTS = 100
# torchrun's grace between passing a stop signal to the workers and SIGKILL (its default 30 s can be short for
# a stop at the next step boundary plus rank 0's checkpoint write on a loaded node).
SHUTDOWN_TIMEOUT_S = 90
# The signals torchrun passes on to its workers: its own four, and SLURM's time-limit warning (--signal=USR1@T),
# which it would otherwise die of, leaving the workers orphaned.
TORCHRUN_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
RDZV_ID_PATTERN = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")

# The launch flags: `cifarlab train` runs torchrun with them; torchrun's workers never see them.
LAUNCH_FLAGS = ("--nproc", "--nnodes", "--rdzv-endpoint", "--rdzv-id", "--max-restarts")


def add_launch_options(p: argparse.ArgumentParser) -> None:
    """The multi-node and restart flags of `cifarlab train` (cli.py keeps --nproc and --resume beside them)."""
    g = p.add_argument_group("several nodes, restarts")
    g.add_argument("--nnodes", type=int, metavar="N",
                   help="nodes (one torchrun agent each, the same command on every node; 1: this node only)")
    g.add_argument("--rdzv-endpoint", metavar="HOST:PORT",
                   help="with --nnodes > 1: node 0's address and a free port, the same on every node")
    g.add_argument("--rdzv-id", metavar="ID", help="with --nnodes > 1: a name for this run's rendezvous (default cifarlab)")
    g.add_argument("--max-restarts", type=int, metavar="K",
                   help="restart the workers up to K times after one dies; they continue from the last checkpoint")
    g.add_argument("--run-dir", metavar="DIR",
                   help="train into exactly this folder (with --resume auto: continue it if it has a checkpoint)")


@dataclass(frozen=True)
class Rendezvous:
    """One torchrun launch: nproc processes on each of nnodes nodes."""

    nnodes: int = 1
    nproc: int = 1
    endpoint: str | None = None  # HOST:PORT of node 0's c10d store; None on one node (standalone)
    rdzv_id: str = "cifarlab"
    max_restarts: int = 0

    @property
    def world_size(self) -> int:
        return self.nnodes * self.nproc

    def torchrun_args(self) -> list[str]:
        """torchrun's own flags (before `-m cifarlab train ...`)."""
        if self.nnodes == 1:
            where = ["--standalone", "--nnodes", "1"]
        else:
            where = ["--nnodes", str(self.nnodes), "--rdzv_backend", "c10d", "--rdzv_endpoint", str(self.endpoint),
                     "--rdzv_id", self.rdzv_id]
        return [sys.executable, "-m", "torch.distributed.run", *where, "--nproc_per_node", str(self.nproc),
                "--max_restarts", str(self.max_restarts)]

    def torchrun_env(self) -> dict[str, str]:
        """Environment for torchrun (a variable the user set wins)."""
        env = {"TORCHELASTIC_SIGNALS_TO_HANDLE": TORCHRUN_SIGNALS, "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": str(SHUTDOWN_TIMEOUT_S)}
        if self.max_restarts:
            # Restarted workers must not meet in the store of the attempt before: with the agent's shared store
            # (torch's default) the new rank 1 read the dead rank 0's address and gloo's connect failed. Opting
            # out gives every rendezvous round a store of its own on a fresh port.
            env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
        return env

    def describe(self) -> str:
        where = "this node" if self.nnodes == 1 else f"{self.nnodes} nodes meeting at {self.endpoint} (id {self.rdzv_id})"
        restarts = f", up to {self.max_restarts} restart(s)" if self.max_restarts else ""
        return f"{self.world_size} processes: {self.nproc} per node on {where}{restarts}"


def check_endpoint(endpoint: str, flag: str = "--rdzv-endpoint") -> str:
    """HOST:PORT (an IPv6 host in brackets), port 1-65535; anything else is one line."""
    host, sep, port = endpoint.rpartition(":")
    if not sep or not host or not port:
        raise UsageError(f"{flag} {endpoint!r} has no port; write HOST:PORT, e.g. node0:29500")
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise UsageError(f"{flag} {endpoint!r}: the port must be a number from 1 to 65535, e.g. node0:29500")
    if any(c.isspace() for c in host) or (":" in host and not (host.startswith("[") and host.endswith("]"))):
        raise UsageError(f"{flag} {endpoint!r}: {host!r} is not a host name; write HOST:PORT ([ADDR]:PORT for IPv6)")
    return endpoint


def _whole(flag: str, value: object, low: int, high: int, hint: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise UsageError(f"{flag} must be between {low} and {high} (got {value}); {hint}")
    return value


def rendezvous_from_flags(nnodes: int | None, nproc: int | None, endpoint: str | None, rdzv_id: str | None,
                          max_restarts: int | None, max_nproc: int) -> Rendezvous:
    """The launch the flags ask for (nproc defaults to 1 per node), or one line naming the bad flag."""
    nodes = _whole("--nnodes", 1 if nnodes is None else nnodes, 1, MAX_NODES, "use 1 for this node only")
    per_node = _whole("--nproc", 1 if nproc is None else nproc, 1, max_nproc, "use the number of GPUs per node")
    restarts = _whole("--max-restarts", 0 if max_restarts is None else max_restarts, 0, MAX_RESTARTS,
                      "use 0 for no restarts")
    if nodes == 1:
        for flag, value in (("--rdzv-endpoint", endpoint), ("--rdzv-id", rdzv_id)):
            if value is not None:
                raise UsageError(f"{flag} is for --nnodes > 1 (one node meets on its own, torchrun --standalone); "
                                 f"drop {flag} or give --nnodes N")
        return Rendezvous(nproc=per_node, max_restarts=restarts)
    if endpoint is None:
        raise UsageError(f"--nnodes {nodes} needs --rdzv-endpoint HOST:PORT: node 0's address and a free port, "
                         f"the same on every node")
    if rdzv_id is not None and not RDZV_ID_PATTERN.match(rdzv_id):
        raise UsageError(f"--rdzv-id {rdzv_id!r}: use 1-128 letters, digits, '.', '_' or '-'")
    return Rendezvous(nnodes=nodes, nproc=per_node, endpoint=check_endpoint(endpoint), rdzv_id=rdzv_id or "cifarlab",
                      max_restarts=restarts)


def without_launch_flags(argv: list[str]) -> list[str]:
    """The user's train flags minus the launch flags (`--nproc N` or `--nproc=N`, ...): torchrun's workers
    must not launch again."""
    out: list[str] = []
    skip = False
    for word in argv:
        if skip:
            skip = False
            continue
        if word in LAUNCH_FLAGS:
            skip = True
            continue
        if word.split("=", 1)[0] in LAUNCH_FLAGS and "=" in word:
            continue
        out.append(word)
    return out
