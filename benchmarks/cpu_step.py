"""The bare training step on the CPU per memory layout and precision: what `--channels-last` and
`--precision bf16` buy on this CPU, measured with the engine's own eager step (capture.StepRunner:
zero_grad, forward + loss under autocast, backward, optimizer step, on-device sums) on one fixed batch,
no data loading around it.

Why it exists: the fast path's `--precision auto` is fp32 on every CPU, because on a 2-core Xeon with
amx_bf16 bf16 autocast trained 3.6x slower than fp32 (engine.resolve_precision), while on a 2-core AMD
EPYC with avx512_bf16 it looked twice as fast. Rerun it on your CPU before choosing.

Per round, every (layout, precision) row gets a fresh seeded model, `--warmup` untimed steps, then
`--steps` timed steps (each its own clock read; the median is reported, with the min-max). Rounds repeat
the rows in the same order, so a change in machine load hits all rows; the table shows the median over
rounds of each row's median and its ratio to channels_last fp32 (the fast path's CPU default).

    PYTHONPATH=src python benchmarks/cpu_step.py --batch 128 --rounds 2 --json-out cpu_step.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from cifarlab.core.runtime import cpu_has_native_bf16, environment
from cifarlab.model.optim import build_optimizer
from cifarlab.model.resnet import resnet18
from cifarlab.step.capture import StepRunner

ROWS = (("channels_last", "fp32"), ("channels_last", "bf16"), ("contiguous", "fp32"), ("contiguous", "bf16"))
BASELINE = ("channels_last", "fp32")


def measure(layout: str, precision: str, batch: int, warmup: int, steps: int) -> list[float]:
    """Seconds per timed step for one fresh model."""
    torch.manual_seed(0)
    device = torch.device("cpu")
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    model = resnet18().to(memory_format=fmt)
    optimizer = build_optimizer("sgd", model.parameters(), 0.01, 0.9, 5e-4)
    runner = StepRunner(model, optimizer, precision, device)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, 32, 32, generator=g).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (batch,), generator=g)
    runner.begin_epoch()
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        runner.load(x, y)
        runner.step()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=4, help="timed steps per row and round (default 4)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (default 1)")
    p.add_argument("--rounds", type=int, default=2, help="times every row is measured (default 2)")
    p.add_argument("--json-out", type=Path)
    args = p.parse_args(argv)
    if min(args.batch, args.steps, args.rounds) < 1 or args.warmup < 0:
        p.error("--batch, --steps and --rounds must be >= 1 and --warmup >= 0")
    medians: dict[tuple[str, str], list[float]] = {row: [] for row in ROWS}
    spans: dict[tuple[str, str], list[float]] = {row: [] for row in ROWS}
    for _ in range(args.rounds):
        for row in ROWS:
            times = measure(*row, args.batch, args.warmup, args.steps)
            medians[row].append(statistics.median(times))
            spans[row] += times
    env = environment(torch.device("cpu"))
    print(f"cpu: {env.get('cpu_model')}, {env.get('cpu_count_usable')} usable cores, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads); native bf16 flags: {cpu_has_native_bf16()}; batch {args.batch}")
    print("| layout | precision | s/step (median) | min-max s | images/s | vs channels_last fp32 |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    base = statistics.median(medians[BASELINE])
    out_rows: list[dict[str, Any]] = []
    for row in ROWS:
        s = statistics.median(medians[row])
        out_rows.append({"layout": row[0], "precision": row[1], "s_per_step": s, "min_s": min(spans[row]),
                         "max_s": max(spans[row]), "images_per_s": args.batch / s, "speedup_vs_baseline": base / s})
        print(f"| {row[0]} | {row[1]} | {s:.3f} | {min(spans[row]):.3f}-{max(spans[row]):.3f} | "
              f"{args.batch / s:,.1f} | {base / s:.2f}x |")
    if args.json_out:
        doc = {"schema": "cifarlab.cpu_step/1", "environment": env, "batch": args.batch, "steps": args.steps,
               "warmup": args.warmup, "rounds": args.rounds, "rows": out_rows}
        args.json_out.write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
