"""Data-parallel training on torch.distributed, launched by torchrun (never DataParallel).

How a distributed run works (every process runs the same `cifarlab train`):
- torchrun starts N processes and sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT.
  `session()` joins the process group: NCCL with one GPU per process (cuda:LOCAL_RANK) on CUDA,
  gloo on CPU; it is torn down on success, error and Ctrl-C alike.
- `--batch-size` is per process; the global batch is world_size x batch_size and is logged.
- The model is wrapped in DistributedDataParallel; every rank starts from the same seed (and DDP
  broadcasts rank 0's weights anyway). Augmentation seeds are offset per rank (engine.seed_epoch)
  so ranks do not draw the same crops for different images.
- The train split is sharded by DistributedSampler (set_epoch every epoch). When the split is not a
  multiple of world_size it pads with up to world_size-1 repeated images so every rank runs the same
  number of steps; the epoch record's `images` counts what was actually trained on.
- Evaluation is sharded without padding (rank r takes test images r, r+N, ...), each image exactly
  once, after rank 0's BatchNorm buffers are broadcast so every rank evaluates the same model.
- Per-epoch metrics are exact sums and counts over all ranks; the timings are those of the slowest
  rank (largest epoch_s), so its parts still add up to its epoch_s.
- Only rank 0 creates the run folder, writes files and prints.

`cifarlab train --nproc N` runs `python -m torch.distributed.run --standalone --nproc_per_node N
-m cifarlab train ...` for the user. Multi-node: run torchrun yourself on every node (README).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Callable, Iterator, TypeVar

import torch
import torch.distributed as dist

from cifarlab.errors import UsageError

if TYPE_CHECKING:
    import argparse

    from cifarlab.config import TrainConfig
    from cifarlab.engine import EpochRecord, TrainState

T = TypeVar("T")

TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
# A collective that waits longer than this is a hung peer, not slow work (the slowest legitimate wait
# is another rank's file writes or evaluation shard).
DIST_TIMEOUT_S = 600
MAX_NPROC = 1024
# Status codes agreed across ranks (max wins): a rank that stops must not leave the others waiting
# in the next all-reduce.
STATUS_CODES = {"ok": 0, "interrupted": 1, "diverged": 2}
STATUS_NAMES = {v: k for k, v in STATUS_CODES.items()}


# ----------------------------------------------------------------------------- who and where am I


def launched_by_torchrun() -> bool:
    return all(k in os.environ for k in TORCHRUN_ENV)


def is_active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_active() else 0


def world_size() -> int:
    return dist.get_world_size() if is_active() else 1


def is_main() -> bool:
    return rank() == 0


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    backend: str
    device: torch.device


def _env_int(name: str) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value)
    except ValueError:
        raise UsageError(f"environment variable {name}={value!r} is not a whole number; launch with torchrun") from None


def setup(device_name: str) -> DistInfo:
    """Join the process group torchrun describes: NCCL + cuda:LOCAL_RANK on CUDA, gloo on CPU."""
    world, rank_, local = _env_int("WORLD_SIZE"), _env_int("RANK"), _env_int("LOCAL_RANK")
    use_cuda = device_name == "cuda" or (device_name == "auto" and torch.cuda.is_available())
    if use_cuda:
        if not torch.cuda.is_available():
            raise UsageError("--device cuda: no CUDA device is available here; use --device cpu (or auto)")
        if local >= torch.cuda.device_count():
            raise UsageError(f"process LOCAL_RANK={local} has no GPU ({torch.cuda.device_count()} on this node); "
                             "use --nproc_per_node <= the number of GPUs")
        torch.cuda.set_device(local)
        device, backend = torch.device("cuda", local), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not is_active():
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=DIST_TIMEOUT_S))
    return DistInfo(rank=rank_, local_rank=local, world_size=world, backend=backend, device=device)


def teardown() -> None:
    if is_active():
        dist.destroy_process_group()


@contextlib.contextmanager
def session(device_name: str) -> Iterator[DistInfo]:
    info = setup(device_name)
    try:
        yield info
    finally:  # success, exception and KeyboardInterrupt alike
        teardown()


# ------------------------------------------------------------------------------------ collectives


def _comm_device() -> torch.device:
    # NCCL only moves CUDA tensors; gloo moves CPU tensors.
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(values: list[float]) -> list[float]:
    """Element-wise sum over ranks in float64 (exact for counts below 2**53)."""
    t = torch.tensor(values, dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def all_gather_rows(values: list[float]) -> list[list[float]]:
    """One row of floats per rank, in rank order."""
    t = torch.tensor(values, dtype=torch.float64, device=_comm_device())
    rows = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(rows, t)
    return [r.tolist() for r in rows]


def agree_status(status: str) -> str:
    """The most severe status of any rank (diverged > interrupted > ok), the same on every rank."""
    t = torch.tensor([STATUS_CODES[status]], dtype=torch.int64, device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return STATUS_NAMES[int(t.item())]


def on_main(fn: Callable[[], T]) -> T:
    """Run fn on rank 0 only and give its result (or its UsageError) to every rank."""
    if not is_active():
        return fn()
    box: list[Any] = [None]
    if is_main():
        try:
            box[0] = ("ok", fn())
        except UsageError as e:
            box[0] = ("error", str(e))
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "error":
        raise UsageError(value)
    return value


class MainOnly:
    """Proxy that forwards method calls on rank 0 and turns them into no-ops elsewhere (file writers)."""

    def __init__(self, target: Any) -> None:
        self._target = target

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._target, name)
        if callable(value) and not is_main():
            return lambda *args, **kwargs: None
        return value


def main_only(target: T) -> T:
    return target if not is_active() else MainOnly(target)  # type: ignore[return-value]


# -------------------------------------------------------------------------------- epoch reduction

_TIMING_KEYS = ("epoch_s", "loader_start_s", "data_s", "h2d_s", "compute_s", "other_s")


def reduce_epoch(
    loss_sum: float, correct: int, images: int, bad_step: int, timings: dict[str, float]
) -> tuple[float, int, int, int, dict[str, float]]:
    """Global sums (loss*count, correct, images) and the slowest rank's timings.

    Each rank contributes one row; sums are taken column-wise, and the timing columns are taken from
    the row with the largest epoch_s so that data + h2d + compute + other still add up to epoch_s.
    The first diverged step is the smallest non-negative one of any rank.
    """
    row = [loss_sum, float(correct), float(images), float(bad_step)] + [float(timings[k]) for k in _TIMING_KEYS]
    rows = all_gather_rows(row)
    loss_total = sum(r[0] for r in rows)
    correct_total = int(round(sum(r[1] for r in rows)))
    images_total = int(round(sum(r[2] for r in rows)))
    bad = [int(r[3]) for r in rows if r[3] >= 0]
    slowest = max(rows, key=lambda r: r[4])
    return loss_total, correct_total, images_total, (min(bad) if bad else -1), dict(zip(_TIMING_KEYS, slowest[4:]))


def reduce_eval(loss_sum: float, correct: int, count: int, eval_s: float) -> tuple[float, int, int, float]:
    """Test-set sums over the shards; eval_s of the slowest shard."""
    rows = all_gather_rows([loss_sum, float(correct), float(count), eval_s])
    return (
        sum(r[0] for r in rows),
        int(round(sum(r[1] for r in rows))),
        int(round(sum(r[2] for r in rows))),
        max(r[3] for r in rows),
    )


# --------------------------------------------------------------------------- samplers and shards


def train_sampler(dataset: Any, seed: int) -> Any:
    """DistributedSampler when distributed (identical permutation on every rank, seeded by seed +
    epoch via set_epoch, each rank taking every N-th index), else None (the loader shuffles)."""
    if not is_active():
        return None
    from torch.utils.data import DistributedSampler

    return DistributedSampler(dataset, num_replicas=world_size(), rank=rank(), shuffle=True, seed=seed,
                              drop_last=False)


def eval_shard(n: int) -> list[int] | None:
    """Rank r's test indices r, r+N, r+2N, ...: every image exactly once over all ranks, no padding."""
    if not is_active():
        return None
    return list(range(rank(), n, world_size()))


def shard_indices(n: int, rank_: int, world: int) -> range:
    return range(rank_, n, world)


def augmentation_seed(epoch_seed: int) -> int:
    """Per-rank offset of the augmentation RNG seed; rank 0 (and every single-process run) keeps
    epoch_seed unchanged, so a 1-process run replays the non-distributed one."""
    r = rank()
    return epoch_seed if r == 0 else (epoch_seed ^ (r * 0x9E3779B97F4A7C15)) % 2**63


# ------------------------------------------------------------------------------ the DDP wrapper


def wrap_model(cfg: "TrainConfig", state: "TrainState") -> None:
    """Wrap the model in DistributedDataParallel (no-op when not distributed). With --compile the
    DDP module is compiled (the order torch recommends), replacing the single-process compile."""
    if not is_active():
        if cfg.sync_bn:
            raise UsageError("--sync-bn only means something with several processes; launch with --nproc N")
        return
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = state.model
    if cfg.sync_bn:
        if state.device.type != "cuda":
            raise UsageError("--sync-bn needs CUDA (torch's SyncBatchNorm has no CPU kernel); drop it on CPU")
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)  # keeps the same Parameter objects
        state.model = model
    ddp = DDP(model, device_ids=[state.device.index] if state.device.type == "cuda" else None)
    if cfg.comm_timing:
        timer = CommTimer(state.device)
        ddp.register_comm_hook(None, timer.hook)
        ddp.cifarlab_comm_timer = timer  # type: ignore[attr-defined]
    state.train_module = torch.compile(ddp, mode=cfg.compile) if cfg.compile != "none" else ddp


def find_comm_timer(state: "TrainState") -> "CommTimer | None":
    module = state.step_module
    module = getattr(module, "_orig_mod", module)  # under torch.compile
    return getattr(module, "cifarlab_comm_timer", None)


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics), as DDP does before each
    training forward pass."""
    for buf in module.buffers():
        dist.broadcast(buf.data, src=0)


@torch.no_grad()
def replica_divergence(module: torch.nn.Module) -> dict[str, float]:
    """Largest |difference| between ranks of any parameter element and of any floating buffer
    element (max over ranks minus min over ranks, element-wise). 0.0 means bit-identical."""
    out = {}
    for kind, tensors in (("params", list(module.parameters())),
                          ("buffers", [b for b in module.buffers() if b.is_floating_point()])):
        if not tensors:
            out[f"{kind}_max_abs_diff"] = 0.0
            continue
        flat = torch.cat([t.detach().reshape(-1).float() for t in tensors])
        hi, lo = flat.clone(), flat.clone()
        dist.all_reduce(hi, op=dist.ReduceOp.MAX)
        dist.all_reduce(lo, op=dist.ReduceOp.MIN)
        out[f"{kind}_max_abs_diff"] = float((hi - lo).abs().max())
    return out


# ------------------------------------------------------------------------ communication timing


class CommTimer:
    """A DDP communication hook that does what DDP's default hook does (average the gradient bucket
    with one all-reduce) and records when each all-reduce was handed over and when it completed.

    busy_s of an epoch is the length of the union of those [handed over, completed] intervals: the
    time during which at least one gradient all-reduce was in flight. Much of it overlaps backward
    compute (DDP launches a bucket as soon as its gradients are ready), so it is an upper bound on the
    communication that is *not* hidden. CPU/gloo: host clock at launch and in the completion callback.
    CUDA/NCCL: CUDA events on the current stream at launch and on the callback's stream (which
    waits for the all-reduce kernel), resolved when the epoch's timings are taken.
    """

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self._marks: list[tuple[Any, Any]] = []  # (start, end) per all-reduce
        self._ref: Any = None
        self.calls = 0

    def _mark(self) -> Any:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def hook(self, _state, bucket):  # type: ignore[no-untyped-def]  # DDP rejects non-GradBucket annotations
        if self.cuda and self._ref is None:
            self._ref = self._mark()
        start = self._mark()
        buffer = bucket.buffer()
        buffer.div_(dist.get_world_size())
        fut = dist.all_reduce(buffer, async_op=True).get_future()
        entry: list[Any] = [start, None]
        self._marks.append(entry)  # type: ignore[arg-type]
        self.calls += 1

        def done(f: Any) -> torch.Tensor:
            entry[1] = self._mark()
            return f.value()[0]

        return fut.then(done)

    def take(self) -> dict[str, float]:
        """busy_s, sum_s (plain sum of all-reduce durations) and the count since the last take()."""
        if self.cuda:
            torch.cuda.synchronize()
        intervals = []
        for start, end in self._marks:
            if end is None:
                continue
            if self.cuda:
                intervals.append((self._ref.elapsed_time(start) / 1e3, self._ref.elapsed_time(end) / 1e3))
            else:
                intervals.append((start, end))
        out = {"busy_s": union_length(intervals), "sum_s": sum(b - a for a, b in intervals),
               "allreduces": len(intervals)}
        self._marks, self._ref = [], None
        return out


def union_length(intervals: list[tuple[float, float]]) -> float:
    total, cur_start, cur_end = 0.0, None, None
    for a, b in sorted(intervals):
        if cur_end is None or a > cur_end:
            if cur_end is not None:
                total += cur_end - cur_start  # type: ignore[operator]
            cur_start, cur_end = a, b
        else:
            cur_end = max(cur_end, b)
    if cur_end is not None:
        total += cur_end - cur_start  # type: ignore[operator]
    return total


# ------------------------------------------------------------------- `cifarlab train` entry points


def run_train_command(args: "argparse.Namespace", train_here: Callable[["argparse.Namespace"], int]) -> int:
    """`cifarlab train`: with --nproc N launch torchrun; under torchrun join the process group and
    run the ordinary train command (`train_here`) in it, printing on rank 0 only; else just run it."""
    nproc = getattr(args, "nproc", None)
    if nproc is not None:
        if launched_by_torchrun():
            raise UsageError("--nproc starts torchrun itself; under torchrun leave it out")
        return launch(args, nproc)
    if not launched_by_torchrun():
        return train_here(args)
    from cifarlab.config import TrainConfig

    with session(getattr(args, "device", TrainConfig().device)) as info:
        if info.rank != 0:
            # Only rank 0 prints. Errors still reach the user: cli.main prints them after this
            # block has restored the streams.
            with open(os.devnull, "w") as null, contextlib.redirect_stdout(null), contextlib.redirect_stderr(null):
                return train_here(args)
        if getattr(args, "resume", None) is None:
            batch = getattr(args, "batch_size", TrainConfig().batch_size)
            print(f"dist:   {info.world_size} processes ({info.backend}); --batch-size {batch} per process "
                  f"= global batch {batch * info.world_size}", flush=True)
        return train_here(args)


def train_flags(cfg: "TrainConfig") -> list[str]:
    """The `cifarlab train` flags that reproduce cfg (only values that differ from the defaults),
    derived from the train parser itself so a new TrainConfig flag needs no change here."""
    import argparse

    from cifarlab.cli import build_parser
    from cifarlab.config import TrainConfig

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    train_parser = sub.choices["train"]
    defaults = TrainConfig()
    flags: list[str] = []
    handled: set[str] = set()
    for action in train_parser._actions:
        dest = action.dest
        if not hasattr(defaults, dest) or dest in handled:
            continue
        value, default = getattr(cfg, dest), getattr(defaults, dest)
        if isinstance(action, argparse._StoreConstAction):
            if value == action.const and value != default:
                flags.append(action.option_strings[0])
                handled.add(dest)
            continue
        handled.add(dest)
        if value == default:
            continue
        if isinstance(action, argparse.BooleanOptionalAction):
            flags.append(action.option_strings[0] if value else action.option_strings[1])
        else:
            flags += [action.option_strings[0], str(value)]
    missing = [k for k, v in cfg.to_dict().items()
               if k not in handled and v != defaults.to_dict()[k] and k != "tags"]
    if missing:
        raise UsageError(f"cannot pass {missing} to the torchrun processes (no train flag); run torchrun yourself")
    return flags


def torchrun_command(nproc: int, flags: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
            "--nproc_per_node", str(nproc), "-m", "cifarlab", "train", *flags]


def launch(args: "argparse.Namespace", nproc: int) -> int:
    """`cifarlab train --nproc N`: check what can be checked here (so bad input is one line, not N
    tracebacks), then run torchrun on this node and return its exit code."""
    from cifarlab.cli import config_from_args
    from cifarlab.runner import prepare
    from cifarlab.runtime import usable_cpus

    if isinstance(nproc, bool) or not 1 <= nproc <= MAX_NPROC:
        raise UsageError(f"--nproc must be between 1 and {MAX_NPROC} (got {nproc}); use the number of GPUs")
    cfg = config_from_args(args)
    resume = getattr(args, "resume", None)
    if resume is None:
        device, _ = prepare(cfg)  # flags, --out and the dataset, once, before N processes start
        flags = train_flags(cfg)
    else:
        from cifarlab.runtime import resolve_device

        device, flags = resolve_device(cfg.device), ["--resume", str(resume), *train_flags(cfg)]
    env = dict(os.environ)
    if device.type == "cuda":
        if nproc > torch.cuda.device_count():
            raise UsageError(f"--nproc {nproc} but only {torch.cuda.device_count()} GPU(s) here; "
                             "use at most one process per GPU")
    else:
        # Each CPU process is one "device": the usable cores are split between them.
        env.setdefault("OMP_NUM_THREADS", str(max(1, usable_cpus() // nproc)))
    proc = subprocess.Popen(torchrun_command(nproc, flags), env=env)
    try:
        return proc.wait()
    except KeyboardInterrupt:  # the terminal sent SIGINT to torchrun and the workers too
        try:
            proc.wait(timeout=60)
        except (subprocess.TimeoutExpired, KeyboardInterrupt):
            proc.kill()
        return 130


# ----------------------------------------------------------------------- the run folder's section


def run_section(cfg: "TrainConfig") -> dict[str, Any]:
    """run.json's "distributed" entry ({} when not distributed)."""
    if not is_active():
        return {}
    world = world_size()
    return {"distributed": {
        "world_size": world,
        "backend": dist.get_backend(),
        "batch_size_per_process": cfg.batch_size,
        "global_batch_size": cfg.batch_size * world,
        "train_sharding": "identical permutation on every rank (seed + epoch), rank r takes positions r, r+N, ...; "
                          "padded with up to N-1 repeated images when the split is not a multiple of N",
        "eval_sharding": "rank r evaluates test images r, r+N, ...: each exactly once, no padding; "
                         "rank 0's BatchNorm buffers broadcast first",
        "metrics": "sums and counts over all ranks",
        "timings": "the slowest rank (largest epoch_s); compute_s includes the gradient all-reduces "
                   "DDP overlaps with backward",
        "sync_bn": cfg.sync_bn,
        "replica_check": [],
        "comm_timing": [],
    }}


def after_epoch(record: "EpochRecord", state: "TrainState", extra: dict[str, Any]) -> None:
    """Collective, on every rank after every epoch: check the replicas still hold the same weights
    and collect the epoch's all-reduce timings into extra["distributed"]."""
    if not is_active() or "distributed" not in extra:
        return
    section = extra["distributed"]
    section["replica_check"].append({"epoch": record.epoch, **replica_divergence(state.model)})
    timer = find_comm_timer(state)
    if timer is not None:
        per_rank = all_gather_rows(list(timer.take().values()))
        section["comm_timing"].append({
            "epoch": record.epoch,
            "busy_s_per_rank": [r[0] for r in per_rank],
            "sum_s_per_rank": [r[1] for r in per_rank],
            "allreduces_per_rank": [int(r[2]) for r in per_rank],
        })
