"""Collectives used inside the training loop: who am I (rank, world size), the exact reductions of an
epoch's sums and timings, the stop status every rank agrees on, buffer broadcast and the per-rank
augmentation seed. Imports only torch (import-linter keeps it so): the engine and the loaders call
these on the ground floor; run-level DDP setup lives in `ddp`, the torchrun launcher in `launcher`.

Every function is a no-op (or returns the single-process answer) when no process group is active.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler

TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
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


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics), as DDP does before each
    training forward pass."""
    for buf in module.buffers():
        dist.broadcast(buf.data, src=0)
