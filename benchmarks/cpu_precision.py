"""fp32 against bf16 training on a CPU, both against the typical lab script: accuracy curves and img/s.

    PYTHONPATH=src python benchmarks/cpu_precision.py                       # ~5 minutes on 2 busy cores
    PYTHONPATH=src python benchmarks/cpu_precision.py --data ./data --subset 2048 --epochs 5 --json-out p.json

Three contenders train the same ResNet-18 from the same initial weights (same seed), on the same real-format
CIFAR-10 files (--data; default: a temporary folder of cifarlab's synthetic class-coloured images written in the
CIFAR-10 on-disk format, so the real reader runs), same batches per epoch (seed_epoch), epochs interleaved
(typical, fp32, bf16, typical, ...) so that the load of other processes falls on all of them alike:

- typical:   what a typical hand-written lab solution does (benchmarks/throughput.py's "typical"): DataLoader with
             min(8, usable cores) workers + PIL transforms, fp32, contiguous NCHW, eager.
- fast-fp32: cifarlab's fast path (split resident in memory, batched crop/flip, channels_last), --precision fp32.
- fast-bf16: the same with --precision bf16 (autocast; fp32 master weights, loss and optimizer).

Per epoch: train loss and top-1 (on augmented batches), test loss and top-1 on --test-subset images, images/s =
training images / epoch_s (engine.train_epoch: loader iterator start-up included, evaluation excluded), and the
1-minute load average (all processes). The summary gives each contender's median img/s over the epochs and its
ratio to typical and to fast-fp32 (epoch 1 left out when there are more: it pays oneDNN's first call per
shape); ratios from one run, since absolute figures on a shared machine move with the
load. The typical script's PIL augmentation draws other random crops than the fast path's batched one, so its
curve differs by more than numerics; fast-fp32 vs fast-bf16 differ only in precision.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from cifarlab.config import TrainConfig
from cifarlab.core.fileio import write_json_atomic
from cifarlab.core.runtime import cpu_has_native_bf16, device_label, environment, seed_everything, usable_cpus
from cifarlab.data import build_loaders, load_data, write_synthetic_cifar
from cifarlab.train.engine import build_state, ensure_step_runner, evaluate, seed_epoch, train_epoch

CPU = torch.device("cpu")


def contenders() -> dict[str, dict[str, Any]]:
    typical_workers = min(8, usable_cpus())
    return {
        "typical": dict(loader="torch", workers=typical_workers, precision="fp32", channels_last=False),
        "fast-fp32": dict(loader="device", precision="fp32", channels_last=True),
        "fast-bf16": dict(loader="device", precision="bf16", channels_last=True),
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", help="a folder holding cifar-10-batches-py (default: real-format files built in a temp dir)")
    p.add_argument("--subset", type=int, default=256, help="training images (stratified)")
    p.add_argument("--test-subset", type=int, default=200, help="test images (stratified)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.05, help="SGD learning rate (the lab's 0.1 is for batch 128 and full epochs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", default="", help="comma-separated contenders (typical, fast-fp32, fast-bf16); default all")
    p.add_argument("--json-out", help="write every epoch row and the summary here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    chosen = {k: v for k, v in contenders().items() if not args.only or k in args.only.split(",")}
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = args.data or str(write_synthetic_cifar(Path(tmp), per_train_file=max(args.subset // 5 + 10, 20),
                                                  n_test=max(args.test_subset, 20), seed=args.seed))
        base = TrainConfig(data_dir=data_dir, dataset="cifar10", subset=args.subset, test_subset=args.test_subset,
                           batch_size=args.batch_size, test_batch_size=100, epochs=args.epochs, seed=args.seed, lr=args.lr,
                           device="cpu", sync_timing=True)
        data = load_data(base)
        print(f"CPU: {device_label(CPU)}; native bf16 flags: {cpu_has_native_bf16()}; torch {torch.__version__}")
        print(f"data: {data.description}; batch {args.batch_size}, lr {args.lr}; {args.epochs} epochs; load average at start "
              f"{os.getloadavg()[0]:.1f} on {usable_cpus()} usable cores")
        runs = {}
        for name, changes in chosen.items():
            cfg = base.replace(**changes).validate()
            seed_everything(cfg.seed)  # the same initial weights for every contender
            train_loader, test_loader = build_loaders(cfg, data, CPU)
            state = build_state(cfg, CPU)
            ensure_step_runner(cfg, state, train_loader)
            runs[name] = (cfg, state, train_loader, test_loader)
        rows: list[dict[str, Any]] = []
        print(f"\n{'epoch':>5} {'contender':<10} {'train loss':>10} {'train top1':>10} {'test loss':>9} "
              f"{'test top1':>9} {'img/s':>7} {'load':>5}")
        for epoch in range(1, args.epochs + 1):
            for name, (cfg, state, train_loader, test_loader) in runs.items():
                seed_epoch(cfg.seed, epoch, train_loader)
                record = train_epoch(cfg, state, train_loader, epoch)
                test_loss, test_acc, eval_s = evaluate(cfg, state, test_loader) or (float("nan"),) * 3
                row = {"epoch": epoch, "contender": name, "precision": state.precision, "train_loss": record.train_loss,
                       "train_acc": record.train_acc, "test_loss": test_loss, "test_acc": test_acc,
                       "images_per_s": record.images_per_s, "epoch_s": record.epoch_s, "eval_s": eval_s,
                       "status": record.status, "load_average": os.getloadavg()[0]}
                rows.append(row)
                print(f"{epoch:>5} {name:<10} {row['train_loss']:>10.4f} {100 * row['train_acc']:>9.1f}% "
                      f"{row['test_loss']:>9.4f} {100 * row['test_acc']:>8.1f}% {row['images_per_s']:>7.1f} "
                      f"{row['load_average']:>5.1f}", flush=True)
        summary = summarize(rows)
        print("\n| contender | img/s median (epochs 2+) | vs typical | vs fast-fp32 | final test top-1 | final train loss |")
        print("|---|---:|---:|---:|---:|---:|")
        for s in summary:
            print(f"| {s['contender']} | {s['images_per_s_median']:.1f} | {_ratio(s.get('vs_typical'))} | "
                  f"{_ratio(s.get('vs_fast_fp32'))} | {100 * s['final_test_acc']:.1f}% | {s['final_train_loss']:.4f} |")
        print(f"load average at the end {os.getloadavg()[0]:.1f} (1 min), {os.getloadavg()[1]:.1f} (5 min)")
        if args.json_out:
            write_json_atomic(Path(args.json_out), {"environment": environment(CPU), "args": vars(args),
                                                    "data": data.description, "rows": rows, "summary": summary})
    return 0


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per contender: median img/s over its epochs after the first, ratios to typical and fast-fp32 (when they ran), final figures."""
    names = list(dict.fromkeys(r["contender"] for r in rows))
    out = []
    for name in names:
        mine = [r for r in rows if r["contender"] == name]
        steady = mine[1:] or mine  # epoch 1 pays oneDNN's first call per shape (no warm-up on a CPU): not steady
        out.append({"contender": name, "images_per_s_median": statistics.median(r["images_per_s"] for r in steady),
                    "epochs_in_median": len(steady),
                    "final_test_acc": mine[-1]["test_acc"], "final_train_loss": mine[-1]["train_loss"]})
    by = {s["contender"]: s["images_per_s_median"] for s in out}
    for s in out:
        for base, key in (("typical", "vs_typical"), ("fast-fp32", "vs_fast_fp32")):
            if base in by:
                s[key] = s["images_per_s_median"] / by[base]
    return out


def _ratio(x: float | None) -> str:
    return "" if x is None else f"{x:.2f}x"


if __name__ == "__main__":
    sys.exit(main())
