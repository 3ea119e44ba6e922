"""The bare training step, eager vs one captured CUDA graph (issue 10): ResNet-18 (channels_last), one
fixed batch, the project's own step runners (capture.StepRunner / capture.CapturedStep), so what it
times is exactly the step the engine runs -- zero_grad, forward + loss under autocast, backward,
optimizer step and the on-device loss/accuracy sums -- with no data loading around it.

Per (batch size, step kind): a fresh seeded model, the runner's setup (warm-up, autotune, capture;
reported as setup_s, never in the step time), `--warmup` more untimed steps, then `--steps` steps
between two CUDA events (device time per step) and two host clock reads (the host's own time to issue
them). Prints a table and, with --json-out, writes the rows.

    PYTHONPATH=src python benchmarks/bare_step.py --batches 128,512 --json-out bare_step.json

Needs a CUDA device; on a machine without one it says so and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from cifarlab.capture import CapturedStep, StepRunner
from cifarlab.engine import resolve_precision
from cifarlab.models import resnet18
from cifarlab.optim import OPTIMIZERS, build_optimizer

KINDS = ("eager", "cuda-graph")


def measure(kind: str, batch: int, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    torch.manual_seed(0)
    model = resnet18().to(device).to(memory_format=torch.channels_last)
    optimizer = build_optimizer(args.optimizer, model.parameters(), args.lr, 0.9, 5e-4)
    precision = resolve_precision(args.precision, device)
    if kind == "eager":
        runner: StepRunner = StepRunner(model, optimizer, precision, device)
    else:
        runner = CapturedStep(model, optimizer, precision, device, batch_size=batch)
    setup_s = runner.setup([batch])
    g = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(batch, 3, 32, 32, device=device, generator=g).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,), device=device, generator=g)
    runner.begin_epoch()
    for _ in range(args.warmup):
        runner.load(x, y)
        runner.step()
    torch.cuda.synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t0 = time.perf_counter()
    start.record()
    for _ in range(args.steps):
        runner.load(x, y)
        runner.step()
    end.record()
    host_s = time.perf_counter() - t0  # time to issue the steps (the device may still be busy)
    torch.cuda.synchronize(device)
    wall_s = time.perf_counter() - t0
    ms = start.elapsed_time(end) / args.steps
    loss_sum, _, bad = runner.read_sums()
    return {
        "batch": batch, "kind": runner.mode, "asked": kind, "optimizer": args.optimizer, "precision": precision,
        "steps": args.steps, "ms_per_step": ms, "images_per_s": batch / (ms / 1e3),
        "host_ms_per_step": 1e3 * host_s / args.steps, "wall_ms_per_step": 1e3 * wall_s / args.steps,
        "setup_s": setup_s, "fallback_reason": runner.fallback_reason,
        "mean_loss": loss_sum / (batch * (args.steps + args.warmup)), "first_bad_step": bad,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", default="128,512", help="comma-separated batch sizes (default 128,512)")
    p.add_argument("--steps", type=int, default=200, help="timed steps per row (default 200)")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps after setup (default 10)")
    p.add_argument("--optimizer", default="sgd", choices=tuple(OPTIMIZERS))
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    p.add_argument("--json-out", type=Path, help="write the rows here as JSON")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bare_step.py: needs a CUDA device (none visible); nothing measured", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    torch.backends.cudnn.benchmark = True
    rows = [measure(kind, int(b), args, device) for b in args.batches.split(",") for kind in KINDS]
    by = {(r["batch"], r["asked"]): r for r in rows}
    print(f"device: {torch.cuda.get_device_name(device)}; torch {torch.__version__}; optimizer {args.optimizer}")
    print("| batch | step | ms/step (device) | host ms/step | img/s | setup s | graph vs eager |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        eager = by[(r["batch"], "eager")]
        ratio = "" if r["asked"] == "eager" else f"{eager['ms_per_step'] / r['ms_per_step']:.2f}x"
        print(f"| {r['batch']} | {r['kind']} | {r['ms_per_step']:.2f} | {r['host_ms_per_step']:.2f} | "
              f"{r['images_per_s']:,.0f} | {r['setup_s']:.2f} | {ratio} |")
        if r["fallback_reason"]:
            print(f"  (capture fell back: {r['fallback_reason']})")
    doc = {"schema": "cifarlab.bare_step/1", "device": torch.cuda.get_device_name(device), "torch": torch.__version__,
           "rows": rows}
    if args.json_out:
        args.json_out.write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
