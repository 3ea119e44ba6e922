"""What the scaling items share: the preset, how many devices there are, the child-process environment,
and `run_train`, which runs one `cifarlab train` point in its own process (through torchrun for N
processes) and reads its run folder back."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from typing import Any

import torch

from cifarlab.config import SCALING_PRESETS, ScalingPreset, TrainConfig
from cifarlab.config.flags import train_flags
from cifarlab.core.runtime import usable_cpus
from cifarlab.lab.context import LabContext, LabInterrupted
from cifarlab.run.folder import load_run

SUITE = "scaling"


BYTES_PER_FP32 = 4


TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT",
                 "TORCHELASTIC_RUN_ID")


def spreset(ctx: LabContext) -> ScalingPreset:
    return SCALING_PRESETS.get(ctx.preset.name, SCALING_PRESETS["quick"])


def is_cuda(ctx: LabContext) -> bool:
    return getattr(ctx.device, "type", "cpu") == "cuda"


def devices_available(ctx: LabContext) -> int:
    if is_cuda(ctx):

        return torch.cuda.device_count()

    return usable_cpus()


def process_counts(ctx: LabContext) -> list[int]:
    """1, 2, 4, ... up to the preset's maximum and the devices (GPUs, or CPU cores) there are."""
    limit = min(spreset(ctx).max_procs, devices_available(ctx))
    counts, n = [], 1
    while n <= limit:
        counts.append(n)
        n *= 2
    return counts


def child_env(ctx: LabContext) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARS}
    if not is_cuda(ctx):
        env["OMP_NUM_THREADS"] = "1"  # one process = one "device" = one core
    return env


def timing_config(ctx: LabContext) -> TrainConfig:
    """Timing runs: the fast path with the exact synchronized split, 2 epochs (the 2nd is measured),
    no evaluation (it is never inside an epoch anyway; it only costs time here)."""
    sp = spreset(ctx)
    return ctx.fast(ctx.base).replace(
        dataset=ctx.data.source, subset=sp.timing_images, max_steps=sp.timing_steps, epochs=2, evaluate=False,
        sync_timing=True, checkpoint_every=0,
    )


def run_train(ctx: LabContext, key: str, label: str, cfg: TrainConfig, nproc: int | None = None) -> dict[str, Any]:
    """`cifarlab train` in a child process (through torchrun when nproc is given); the run folder is
    read back into the same run-info shape LabContext.train records."""

    out = ctx.lab_dir / key
    cfg = cfg.replace(out_dir=str(out), name=label)
    cmd = [sys.executable, "-m", "cifarlab", "train", *train_flags(cfg)]
    if nproc is not None:
        cmd += ["--nproc", str(nproc)]
    print(f"   {key}: {label} ({f'torchrun, {nproc} processes' if nproc else '1 process'})", flush=True)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=child_env(ctx), capture_output=True, text=True)
    except KeyboardInterrupt:
        raise LabInterrupted(f"{key}/{label}") from None
    folders = sorted(out.glob(f"*-{label}")) if out.is_dir() else []
    if not folders or not (folders[-1] / "run.json").is_file():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        if "out of memory" in proc.stderr:  # while placing the data/model, before a run folder exists
            info = {"label": label, "path": "(none: out of memory before training)", "status": "oom",
                    "config": cfg.to_dict(), "summary": {}, "records": [], "nproc": nproc or 1,
                    "error": tail[-1] if tail else "out of memory"}
            ctx.runs.setdefault(key, []).append(info)
            return info
        raise RuntimeError(f"{label}: no run folder written (exit {proc.returncode}): {' | '.join(tail)}")
    run = load_run(folders[-1])
    if proc.returncode == 130 or run["status"] == "interrupted":
        raise LabInterrupted(f"{key}/{label}")
    info = {
        "label": label,
        "path": os.path.relpath(folders[-1], ctx.lab_dir),
        "status": run["status"],
        "config": run["config"],
        "device": run.get("device"),
        "precision": run.get("precision"),
        "data": run.get("data"),
        "summary": run.get("summary", {}),
        "records": run["records"],
        "nproc": nproc or 1,
        "launch": "torchrun" if nproc is not None else "single process",
        "distributed": run.get("distributed"),
        "error": run.get("error"),
        "wall_s": time.perf_counter() - t0,
    }
    ctx.runs.setdefault(key, []).append(info)
    return info


def measured_epoch(info: dict[str, Any]) -> dict[str, Any] | None:
    """The 2nd epoch's record (the first pays one-off costs), else the last finished one."""
    ok = [r for r in info["records"] if r.get("status") == "ok"]
    return ok[1] if len(ok) > 1 else (ok[-1] if ok else None)


def point(info: dict[str, Any], batch: int, n: int) -> dict[str, Any]:
    rec = measured_epoch(info)
    p: dict[str, Any] = {"batch": batch, "nproc": n, "label": info["label"], "status": info["status"],
                         "error": info.get("error")}
    if info["status"] != "completed" or rec is None:
        return p
    no_data_s = rec["epoch_s"] - rec["data_s"]
    p.update(epoch=rec["epoch"], images=rec["images"], steps=rec["steps"], epoch_s=rec["epoch_s"],
             data_s=rec["data_s"], no_data_s=no_data_s, images_per_s=rec["images"] / rec["epoch_s"],
             images_per_s_no_data=rec["images"] / no_data_s if no_data_s > 0 else None)
    comm = [c for c in ((info.get("distributed") or {}).get("comm_timing") or []) if c["epoch"] == rec["epoch"]]
    if comm:
        p.update(comm_busy_s=max(comm[0]["busy_s_per_rank"]), comm_busy_min_s=min(comm[0]["busy_s_per_rank"]),
                 comm_sum_s=max(comm[0]["sum_s_per_rank"]), allreduces=comm[0]["allreduces_per_rank"][0])
    return p
