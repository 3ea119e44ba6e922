"""Run-level data parallelism (torch.distributed + DistributedDataParallel, launched by torchrun): join
and leave the process group, wrap the model, time DDP's gradient all-reduces, check after every epoch
that the replicas still agree, let rank 0 alone write, and fill run.json's "distributed" section.

How a distributed run works (every process runs the same `cifarlab train`):
- torchrun starts N processes and sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT.
  `session()` joins the process group: NCCL with one GPU per process (cuda:LOCAL_RANK) on CUDA,
  gloo on CPU; it is torn down on success, error and Ctrl-C alike.
- `--batch-size` is per process; the global batch is world_size x batch_size and is logged.
- The model is wrapped in DistributedDataParallel; every rank starts from the same seed (and DDP
  broadcasts rank 0's weights anyway). Augmentation seeds are offset per rank (engine.seed_epoch)
  so ranks do not draw the same crops for different images.
- The train split is sharded (DistributedSampler or the device loader's own shards, set_epoch every
  epoch). When the split is not a multiple of world_size it pads with up to world_size-1 repeated
  images so every rank runs the same number of steps; the epoch record's `images` counts them.
- Evaluation is sharded without padding (rank r takes test images r, r+N, ...), each image exactly
  once, after rank 0's BatchNorm buffers are broadcast so every rank evaluates the same model.
- Per-epoch metrics are exact sums and counts over all ranks; the timings are those of the slowest
  rank (largest epoch_s), so its parts still add up to its epoch_s (collectives.reduce_epoch).
- Only rank 0 creates the run folder, writes files and prints.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Iterator, TypeVar

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from cifarlab.config import TrainConfig
from cifarlab.core.errors import UsageError
from cifarlab.parallel.collectives import all_gather_rows, is_active, is_main, world_size
from cifarlab.step.state import EpochRecord, TrainState

T = TypeVar("T")

# A collective that waits longer than this is a hung peer, not slow work (the slowest legitimate wait
# is another rank's file writes or evaluation shard).
DIST_TIMEOUT_S = 600


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


# ------------------------------------------------------------------------------ the DDP wrapper


def wrap_model(cfg: TrainConfig, state: TrainState) -> None:
    """Wrap the model in DistributedDataParallel (no-op when not distributed). With --compile the
    DDP module is compiled (the order torch recommends), replacing the single-process compile."""
    if not is_active():
        if cfg.sync_bn:
            raise UsageError("--sync-bn only means something with several processes; launch with --nproc N")
        return
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


def find_comm_timer(state: TrainState) -> "CommTimer | None":
    module = state.step_module
    module = getattr(module, "_orig_mod", module)  # under torch.compile
    return getattr(module, "cifarlab_comm_timer", None)


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

# ----------------------------------------------------------------------- the run folder's section


def run_section(cfg: TrainConfig) -> dict[str, Any]:
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


def after_epoch(record: EpochRecord, state: TrainState, extra: dict[str, Any]) -> None:
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
