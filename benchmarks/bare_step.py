"""The bare training step, eager vs one captured CUDA graph (issue 10): ResNet-18 (channels_last), one
fixed batch, the project's own step runners (capture.StepRunner / capture.CapturedStep), so what it
times is exactly the step the engine runs -- zero_grad, forward + loss under autocast, backward,
optimizer step and the on-device loss/accuracy sums -- with no data loading around it.

Per (batch size, step kind): a fresh seeded model, the runner's setup (warm-up, autotune, compilation,
capture; reported as setup_s, never in the step time), `--warmup` more untimed steps, then `--steps` steps
between two CUDA events (device time per step) and two host clock reads (the host's own time to issue
them). Prints a table and, with --json-out, writes the rows.

    PYTHONPATH=src python benchmarks/bare_step.py --batches 128,512 --json-out bare_step.json

Kinds: `eager`, `cuda-graph` (the engine's captured step), `compile+cuda-graph` (torch.compile(model,
mode=--compile-mode, dynamic=False) inside the same captured step, as `cifarlab train --compile default`
runs it; dynamo is reset before each such row, so its setup_s is a whole compile -- cold, or warm from
inductor's on-disk cache when an earlier row or run compiled the same graph).

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
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from cifarlab.model.optim import OPTIMIZERS, build_optimizer
from cifarlab.model.resnet import resnet18
from cifarlab.step.capture import CapturedStep, StepRunner
from cifarlab.train.engine import resolve_precision

KINDS = ("eager", "cuda-graph", "compile+cuda-graph")
# Kernel name fragments per category, checked in this order (cuDNN's BatchNorm kernels carry "cudnn" too).
KERNEL_CATEGORIES = (
    ("batch norm", ("bn_", "batch_norm", "batchnorm", "welford")),
    ("convolution", ("conv", "dgrad", "wgrad", "fprop", "implicit", "xmma", "cudnn", "cutlass", "nhwc")),
    ("matmul", ("gemm", "nvjet", "cublas")),
    ("optimizer (multi-tensor)", ("multi_tensor", "foreach")),
    ("copy / set", ("memcpy", "memset")),
)


def kernel_category(name: str) -> str:
    low = name.lower()
    return next((cat for cat, parts in KERNEL_CATEGORIES if any(p in low for p in parts)), "elementwise / reduce / other")


def kernel_profile(runner: StepRunner, x: torch.Tensor, y: torch.Tensor, steps: int) -> dict[str, Any]:
    """GPU kernel time per step of `steps` eager steps under torch.profiler, by category, and how busy the GPU was
    over the profiled span (union of kernel intervals). The captured graph runs the same kernels, so a captured step
    close to this kernel sum is bound by the kernels themselves, not by launches."""
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            runner.load(x, y)
            runner.step()
        torch.cuda.synchronize()
    spans = sorted((e.time_range.start, e.time_range.end, e.name) for e in prof.events() if e.device_type == DeviceType.CUDA)
    if not spans:
        return {"steps": steps, "kernel_ms_per_step": None, "note": "the profiler saw no CUDA kernels"}
    per_cat: dict[str, float] = {}
    per_kernel: dict[str, float] = {}
    busy_us, reach = 0.0, spans[0][0]
    for start, end, name in spans:
        per_cat[kernel_category(name)] = per_cat.get(kernel_category(name), 0.0) + (end - start)
        per_kernel[name] = per_kernel.get(name, 0.0) + (end - start)
        busy_us += max(0.0, end - max(start, reach))
        reach = max(reach, end)
    span_us = spans[-1][1] - spans[0][0]
    total_us = sum(per_cat.values())
    top = sorted(per_kernel.items(), key=lambda kv: -kv[1])[:12]
    return {
        "steps": steps, "kernels": len(spans) // steps, "kernel_ms_per_step": total_us / steps / 1e3,
        "busy_fraction": busy_us / span_us if span_us else None,
        "by_category_ms_per_step": {k: v / steps / 1e3 for k, v in sorted(per_cat.items(), key=lambda kv: -kv[1])},
        "top_kernels_ms_per_step": [{"name": n[:120], "ms": v / steps / 1e3} for n, v in top],
    }


def measure(kind: str, batch: int, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    torch.manual_seed(0)
    model = resnet18().to(device).to(memory_format=torch.channels_last)
    optimizer = build_optimizer(args.optimizer, model.parameters(), args.lr, 0.9, 5e-4)
    precision = resolve_precision(args.precision, device)
    module: torch.nn.Module = model
    if kind.startswith("compile+"):
        torch._dynamo.reset()  # this row's setup pays its own compile (inductor's disk cache may serve it)
        module = torch.compile(model, mode=args.compile_mode, dynamic=False)
    if kind == "eager":
        runner: StepRunner = StepRunner(module, optimizer, precision, device, model=model)
    else:
        runner = CapturedStep(module, optimizer, precision, device, batch_size=batch, model=model)
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
    kernels = kernel_profile(runner, x, y, args.kernel_steps) if args.kernel_steps and kind == "eager" else None
    loss_sum, _, bad = runner.read_sums()
    return {
        "batch": batch, "kind": runner.mode, "asked": kind,
        "compile": args.compile_mode if kind.startswith("compile+") else None, "optimizer": args.optimizer, "precision": precision,
        "steps": args.steps, "ms_per_step": ms, "images_per_s": batch / (ms / 1e3),
        "host_ms_per_step": 1e3 * host_s / args.steps, "wall_ms_per_step": 1e3 * wall_s / args.steps,
        "setup_s": setup_s, "fallback_reason": runner.fallback_reason,
        "mean_loss": loss_sum / (batch * (args.steps + args.warmup + (args.kernel_steps if kernels else 0))),
        "first_bad_step": bad, "kernel_profile": kernels,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", default="128,512", help="comma-separated batch sizes (default 128,512)")
    p.add_argument("--steps", type=int, default=200, help="timed steps per row (default 200)")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps after setup (default 10)")
    p.add_argument("--optimizer", default="sgd", choices=tuple(OPTIMIZERS))
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    p.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated step kinds (default {','.join(KINDS)})")
    p.add_argument("--compile-mode", default="default", help="torch.compile mode of the compile+ kinds (default default)")
    p.add_argument("--kernel-steps", type=int, default=20,
                   help="eager steps profiled for GPU kernel time by category after the eager row (0: none; default 20)")
    p.add_argument("--json-out", type=Path, help="write the rows here as JSON")
    args = p.parse_args(argv)
    kinds = [k for k in args.kinds.split(",") if k]
    if not kinds or set(kinds) - set(KINDS) or "eager" not in kinds:
        p.error(f"--kinds must list eager and any of {', '.join(KINDS)} (got {args.kinds!r})")
    if not torch.cuda.is_available():
        print("bare_step.py: needs a CUDA device (none visible); nothing measured", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    torch.backends.cudnn.benchmark = True
    rows = [measure(kind, int(b), args, device) for b in args.batches.split(",") for kind in kinds]
    by = {(r["batch"], r["asked"]): r for r in rows}
    print(f"device: {torch.cuda.get_device_name(device)}; torch {torch.__version__}; optimizer {args.optimizer}")
    print("| batch | asked | step | ms/step (device) | host ms/step | img/s | setup s | vs eager |")
    print("| ---: | --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        eager = by[(r["batch"], "eager")]
        ratio = "" if r["asked"] == "eager" else f"{eager['ms_per_step'] / r['ms_per_step']:.2f}x"
        print(f"| {r['batch']} | {r['asked']} | {r['kind']} | {r['ms_per_step']:.2f} | {r['host_ms_per_step']:.2f} | "
              f"{r['images_per_s']:,.0f} | {r['setup_s']:.2f} | {ratio} |")
        if r["fallback_reason"]:
            print(f"  (capture fell back: {r['fallback_reason']})")
    for r in rows:
        k = r["kernel_profile"]
        if not k or k.get("kernel_ms_per_step") is None:
            continue
        captured = [c for c in rows if c["batch"] == r["batch"] and c["asked"] != "eager"]
        vs = "; ".join(f"{c['asked']} step {c['ms_per_step']:.2f} ms = {k['kernel_ms_per_step'] / c['ms_per_step']:.0%} "
                       f"of it in these kernels" for c in captured)
        print(f"batch {r['batch']}, eager kernels: {k['kernel_ms_per_step']:.2f} ms of GPU kernel time per step "
              f"({k['kernels']} kernels/step; GPU busy {k['busy_fraction']:.0%} of the profiled span)" + (f"; {vs}" if vs else ""))
        for cat, ms in k["by_category_ms_per_step"].items():
            print(f"   {cat:<30} {ms:7.3f} ms/step  {ms / k['kernel_ms_per_step']:6.1%}")
        for t in k["top_kernels_ms_per_step"][:6]:
            print(f"      {t['ms']:7.3f} ms  {t['name'][:100]}")
    doc = {"schema": "cifarlab.bare_step/1", "device": torch.cuda.get_device_name(device), "torch": torch.__version__,
           "rows": rows}
    if args.json_out:
        args.json_out.write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
