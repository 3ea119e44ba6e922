"""Data parallelism: the collectives the training loop uses (collectives: rank, world size, exact
reductions; imports nothing from cifarlab) and run-level DDP under torchrun (ddp: join and leave the
process group, wrap the model, time the gradient all-reduce)."""

from cifarlab.parallel.collectives import is_active, is_main, launched_by_torchrun, rank, world_size
from cifarlab.parallel.ddp import CommTimer, DistInfo, session, wrap_model

__all__ = ["CommTimer", "DistInfo", "is_active", "is_main", "launched_by_torchrun", "rank", "session", "world_size",
           "wrap_model"]
