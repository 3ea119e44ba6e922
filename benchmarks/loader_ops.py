"""The device loader batch by batch against in chunks: ops launched and seconds per epoch.

    PYTHONPATH=src python benchmarks/loader_ops.py [--device cuda] [--images 50000] [--batch-size 128]

For each chunk size (1 = batch by batch, the CPU default; 8192 = the CUDA default) one epoch of the fast
path's loader over random CIFAR-shaped images is iterated twice: once under torch.profiler to count the
top-level aten ops (views included) and the non-view ops (each launches a kernel on a GPU), once timed:
host seconds to iterate the epoch, and seconds until the device has finished (synchronized). The loader
alone, no training: what each batch costs before the step consumes it.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

from cifarlab.data.device import CUDA_CHUNK_IMAGES, DeviceLoader

VIEW_OPS = {"aten::slice", "aten::view", "aten::permute", "aten::select", "aten::unsqueeze", "aten::alias",
            "aten::detach", "aten::as_strided", "aten::expand", "aten::reshape", "aten::_unsafe_view"}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--images", type=int, default=50_000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--chunks", default=f"1,{CUDA_CHUNK_IMAGES}", help="comma-separated chunk sizes in images")
    args = p.parse_args()
    device = torch.device(args.device)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(args.images, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, size=args.images)
    print(f"device {device}; {args.images} images, batch {args.batch_size}; torch {torch.__version__}")
    print("| chunk (images) | batches | top-level ops | non-view ops | host s/epoch | device-done s/epoch |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for chunk in (int(c) for c in args.chunks.split(",")):
        loader = DeviceLoader(images, labels, args.batch_size, device, augment=True, shuffle=True, chunk_images=chunk)
        for _ in loader:  # first launch of every kernel (lazy loading) out of the measurement
            pass
        activities = [ProfilerActivity.CPU]
        with profile(activities=activities) as prof:
            batches = sum(1 for _ in loader)
        top = [e for e in prof.events() if e.cpu_parent is None]
        non_view = sum(1 for e in top if e.name not in VIEW_OPS)
        sync(device)
        t0 = time.perf_counter()
        for _ in loader:
            pass
        host_s = time.perf_counter() - t0
        sync(device)
        done_s = time.perf_counter() - t0
        print(f"| {loader.chunk_images} | {batches} | {len(top)} | {non_view} | {host_s:.4f} | {done_s:.4f} |")


if __name__ == "__main__":
    main()
