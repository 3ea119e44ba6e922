"""The standalone all-reduce benchmark of lab item S4, one torchrun process of it:
`python -m torch.distributed.run --nproc_per_node N -m cifarlab.lab.scaling.allreduce_bench allreduce ...`."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from cifarlab.core.fileio import write_json_atomic
from cifarlab.core.runtime import device_label
from cifarlab.parallel.collectives import all_gather_rows
from cifarlab.parallel.ddp import session

BYTES_PER_FP32 = 4


def _allreduce_main(argv: list[str]) -> int:
    """One torchrun process of the all-reduce benchmark."""


    p = argparse.ArgumentParser(prog="python -m cifarlab.lab.scaling.allreduce_bench allreduce")
    p.add_argument("--elements", type=int, required=True)
    p.add_argument("--iters", type=int, required=True)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    with session(a.device) as info:
        x = torch.ones(a.elements, dtype=torch.float32, device=info.device)

        def sync() -> None:
            if info.device.type == "cuda":
                torch.cuda.synchronize(info.device)

        for _ in range(a.warmup):  # connection set-up, NCCL communicator and buffer allocation
            dist.all_reduce(x)
        sync()
        times = []
        for _ in range(a.iters):
            dist.barrier()  # all ranks start together: the time is the all-reduce, not a late peer
            sync()
            t0 = time.perf_counter()
            dist.all_reduce(x)
            sync()
            times.append(time.perf_counter() - t0)
        rows = all_gather_rows(times)
        if info.rank == 0:
            write_json_atomic(Path(a.out), {
                "world_size": info.world_size, "backend": info.backend, "device": device_label(info.device),
                "elements": a.elements, "bytes": a.elements * BYTES_PER_FP32, "warmup": a.warmup,
                # per iteration, the slowest rank (the all-reduce is done when the last rank has it)
                "times_s": [max(r[i] for r in rows) for i in range(a.iters)],
            })
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] != "allreduce":
        print("usage: python -m cifarlab.lab.scaling.allreduce_bench allreduce --elements N --iters K --out FILE (under torchrun)",
              file=sys.stderr)
        return 2
    return _allreduce_main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
