"""The follow-up multi-GPU lab: `cifarlab lab --suite scaling` (items s1-s6).

s1 batch-size scaling on one device   per-device batch first, first*4, ... until out of memory (the run
                                      ends with status "oom": recorded, the ladder stops) or a preset cap;
                                      2nd-epoch time without the data wait (h2d + compute + update).
s2 speedup on 1, 2, 4 devices         at each per-device batch, everything counted (epoch_s); weak scaling.
s3 compute vs communication           estimate (T1 / N at equal work) and a direct measurement (a DDP
                                      communication hook timing every gradient all-reduce), side by side.
s4 all-reduce bandwidth               a standalone all-reduce of the gradient size, ring bus bandwidth.
s5 large-batch accuracy               largest per-device batch on all devices vs the baseline batch on one,
                                      then linear learning-rate scaling, then + gradual warm-up.
s6 short answers                      set_epoch, BatchNorm buffers, whether gradients alone suffice:
                                      generated from measurements (sampler orders, replica checks).

Every training point is a separate `cifarlab train` process (with --nproc N through torchrun), so
each point starts with a fresh model, a clean device and its own run folder inside the lab folder.
A "device" is one GPU, or on a machine without GPUs one CPU core: every process then gets
OMP_NUM_THREADS=1, so N processes use N cores. The standalone all-reduce benchmark is this module
run under torchrun (`python -m cifarlab.scaling allreduce ...`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cifarlab import report
from cifarlab.config import SCALING_PRESETS, ScalingPreset, TrainConfig
from cifarlab.report import Bullets, Note, Para, Table, fs, pct, runs_of

if TYPE_CHECKING:
    from cifarlab.experiments import LabContext

SUITE = "scaling"
BYTES_PER_FP32 = 4
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT",
                 "TORCHELASTIC_RUN_ID")


# ------------------------------------------------------------------------------------------ helpers


def spreset(ctx: "LabContext") -> ScalingPreset:
    return SCALING_PRESETS.get(ctx.preset.name, SCALING_PRESETS["quick"])


def is_cuda(ctx: "LabContext") -> bool:
    return getattr(ctx.device, "type", "cpu") == "cuda"


def devices_available(ctx: "LabContext") -> int:
    if is_cuda(ctx):
        import torch

        return torch.cuda.device_count()
    from cifarlab.runtime import usable_cpus

    return usable_cpus()


def process_counts(ctx: "LabContext") -> list[int]:
    """1, 2, 4, ... up to the preset's maximum and the devices (GPUs, or CPU cores) there are."""
    limit = min(spreset(ctx).max_procs, devices_available(ctx))
    counts, n = [], 1
    while n <= limit:
        counts.append(n)
        n *= 2
    return counts


def child_env(ctx: "LabContext") -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARS}
    if not is_cuda(ctx):
        env["OMP_NUM_THREADS"] = "1"  # one process = one "device" = one core
    return env


def timing_config(ctx: "LabContext") -> TrainConfig:
    """Timing runs: the fast path with the exact synchronized split, 2 epochs (the 2nd is measured),
    no evaluation (it is never inside an epoch anyway; it only costs time here)."""
    sp = spreset(ctx)
    return ctx.fast(ctx.base).replace(
        dataset=ctx.data.source, subset=sp.timing_images, max_steps=sp.timing_steps, epochs=2, evaluate=False,
        sync_timing=True, checkpoint_every=0,
    )


def run_train(ctx: "LabContext", key: str, label: str, cfg: TrainConfig, nproc: int | None = None) -> dict[str, Any]:
    """`cifarlab train` in a child process (through torchrun when nproc is given); the run folder is
    read back into the same run-info shape LabContext.train records."""
    from cifarlab.distributed import train_flags
    from cifarlab.experiments import LabInterrupted
    from cifarlab.runs import load_run

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


def _point(info: dict[str, Any], batch: int, n: int) -> dict[str, Any]:
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


# ---------------------------------------------------------------------------------- s1: one device


def single_device_ladder(ctx: "LabContext", key: str) -> dict[str, Any]:
    sp = spreset(ctx)
    cfg = timing_config(ctx)
    n_train = sp.timing_images or len(ctx.data.train)  # what the child processes load
    points: list[dict[str, Any]] = []
    batch = sp.first_batch
    while True:
        info = run_train(ctx, key, f"batch-{batch}", cfg.replace(batch_size=batch))
        points.append(_point(info, batch, 1))
        if info["status"] == "oom":
            stop = f"out of memory at per-device batch {batch} (caught by the run, recorded as status 'oom')"
            break
        if info["status"] != "completed":
            stop = f"the batch-{batch} run ended '{info['status']}'"
            break
        nxt = batch * sp.batch_factor
        if not is_cuda(ctx) and len(points) >= sp.max_points_cpu:
            stop = (f"CPU: no out-of-memory to stop the ladder, so the {ctx.preset.name} preset caps it at "
                    f"{sp.max_points_cpu} points")
            break
        if nxt > sp.max_batch:
            stop = f"the {ctx.preset.name} preset caps the per-device batch at {sp.max_batch}"
            break
        if nxt > n_train:
            stop = f"a per-device batch of {nxt} would exceed the {n_train} training images"
            break
        batch = nxt
    ok = [p for p in points if p["status"] == "completed"]
    result = {"points": points, "stop_reason": stop, "largest_batch": max((p["batch"] for p in ok), default=None),
              "device_kind": "GPU" if is_cuda(ctx) else "CPU core (1 thread)", "train_images": n_train}
    ctx.shared["scaling_s1"] = result
    return result


def s1_batch_scaling(ctx: "LabContext") -> dict[str, Any]:
    return single_device_ladder(ctx, "s1")


def _s1(ctx: "LabContext", key: str) -> dict[str, Any]:
    return ctx.shared.get("scaling_s1") or single_device_ladder(ctx, key)


# --------------------------------------------------------------------------------- s2 / s3: N devices


def multi_device_points(ctx: "LabContext", key: str) -> dict[str, Any]:
    s1 = _s1(ctx, key)
    cfg = timing_config(ctx).replace(comm_timing=True)
    counts = process_counts(ctx)
    base = {p["batch"]: p for p in s1["points"] if p["status"] == "completed"}
    points = [dict(p) for p in base.values()]
    for n in counts[1:]:
        for batch in base:
            info = run_train(ctx, key, f"n{n}-batch-{batch}", cfg.replace(batch_size=batch), nproc=n)
            points.append(_point(info, batch, n))
    for p in points:
        one = base.get(p["batch"])
        if p.get("images_per_s") and one and one.get("images_per_s"):
            p["speedup"] = p["images_per_s"] / one["images_per_s"]
            p["efficiency"] = p["speedup"] / p["nproc"]
    result = {"points": points, "counts": counts, "devices_available": devices_available(ctx),
              "device_kind": s1["device_kind"]}
    ctx.shared["scaling_s2"] = result
    return result


def s2_speedup(ctx: "LabContext") -> dict[str, Any]:
    return multi_device_points(ctx, "s2")


def s3_compute_vs_comm(ctx: "LabContext") -> dict[str, Any]:
    s2 = ctx.shared.get("scaling_s2") or multi_device_points(ctx, "s3")
    ones = {p["batch"]: p for p in s2["points"] if p["nproc"] == 1 and p.get("no_data_s")}
    rows = []
    for p in s2["points"]:
        one = ones.get(p["batch"])
        if p["nproc"] == 1 or not p.get("no_data_s") or one is None:
            continue
        # Equal global work: the 1-device time for the images the N devices processed, split N ways.
        compute_s = one["no_data_s"] * (p["images"] / one["images"]) / p["nproc"]
        comm_est_s = p["no_data_s"] - compute_s
        rows.append({"batch": p["batch"], "nproc": p["nproc"], "t1_s": one["no_data_s"], "t1_images": one["images"],
                     "tn_s": p["no_data_s"], "tn_images": p["images"], "compute_est_s": compute_s,
                     "comm_est_s": comm_est_s, "comm_busy_s": p.get("comm_busy_s"),
                     "comm_busy_min_s": p.get("comm_busy_min_s"), "comm_sum_s": p.get("comm_sum_s"),
                     "allreduces": p.get("allreduces"),
                     "gap_s": (comm_est_s - p["comm_busy_s"]) if p.get("comm_busy_s") is not None else None})
    return {"rows": rows, "skipped": None if rows else "only one device: no communication to measure"}


# ---------------------------------------------------------------------------------- s4: all-reduce


def allreduce_bench(ctx: "LabContext", n: int) -> dict[str, Any]:
    from cifarlab.experiments import LabInterrupted

    sp = spreset(ctx)
    out = ctx.lab_dir / "s4" / f"allreduce-n{n}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc_per_node", str(n),
           "-m", "cifarlab.scaling", "allreduce", "--elements", str(sp.allreduce_elements),
           "--iters", str(sp.allreduce_iters), "--warmup", str(sp.allreduce_warmup),
           "--device", "cuda" if is_cuda(ctx) else "cpu", "--out", str(out)]
    try:
        proc = subprocess.run(cmd, env=child_env(ctx), capture_output=True, text=True)
    except KeyboardInterrupt:
        raise LabInterrupted(f"s4/allreduce-n{n}") from None
    if proc.returncode != 0 or not out.is_file():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"all-reduce benchmark on {n} processes failed (exit {proc.returncode}): {' | '.join(tail)}")
    return json.loads(out.read_text())


def ring_bus_gbps(n: int, nbytes: int, seconds: float) -> float:
    """Ring all-reduce: each rank sends (and receives) 2(N-1)/N * S bytes; GB/s = 1e9 bytes/s."""
    return 2 * (n - 1) / n * nbytes / seconds / 1e9


def s4_allreduce(ctx: "LabContext") -> dict[str, Any]:
    counts = [n for n in process_counts(ctx) if n > 1]
    if not counts:
        return {"skipped": f"one device ({spreset(ctx).max_procs} allowed, {devices_available(ctx)} here): "
                           "an all-reduce needs at least two processes"}
    rows = []
    for n in counts:
        r = allreduce_bench(ctx, n)
        t = statistics.median(r["times_s"])
        rows.append({**r, "median_s": t, "min_s": min(r["times_s"]), "algbw_gbps": r["bytes"] / t / 1e9,
                     "busbw_gbps": ring_bus_gbps(n, r["bytes"], t)})
    return {"rows": rows}


def _allreduce_main(argv: list[str]) -> int:
    """One torchrun process of the all-reduce benchmark."""
    import torch
    import torch.distributed as dist

    from cifarlab import distributed
    from cifarlab.runs import write_json_atomic
    from cifarlab.runtime import device_label

    p = argparse.ArgumentParser(prog="python -m cifarlab.scaling allreduce")
    p.add_argument("--elements", type=int, required=True)
    p.add_argument("--iters", type=int, required=True)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    with distributed.session(a.device) as info:
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
        rows = distributed.all_gather_rows(times)
        if info.rank == 0:
            write_json_atomic(Path(a.out), {
                "world_size": info.world_size, "backend": info.backend, "device": device_label(info.device),
                "elements": a.elements, "bytes": a.elements * BYTES_PER_FP32, "warmup": a.warmup,
                # per iteration, the slowest rank (the all-reduce is done when the last rank has it)
                "times_s": [max(r[i] for r in rows) for i in range(a.iters)],
            })
    return 0


# ----------------------------------------------------------------------------- s5: large batches


def s5_large_batch(ctx: "LabContext") -> dict[str, Any]:
    sp = spreset(ctx)
    s1 = _s1(ctx, "s5")
    n = max(process_counts(ctx))
    images = sp.large_images or ctx.preset.subset
    n_train = images or len(ctx.data.train)
    batch = s1["largest_batch"] or sp.first_batch
    note = None
    while batch * n > n_train and batch > 1:  # at least one full global batch per epoch
        batch //= sp.batch_factor
        note = f"per-device batch reduced to {batch} so that one global batch fits the {n_train} training images"
    batch = max(batch, 1)
    base_lr = ctx.base.lr
    global_batch = batch * n
    k = global_batch / sp.baseline_batch
    cfg = ctx.fast(ctx.base).replace(dataset=ctx.data.source, subset=images, epochs=sp.large_epochs, evaluate=True,
                                     checkpoint_every=0, sync_timing=False)
    nproc = n if n > 1 else None
    plan = [
        ("baseline", f"baseline-b{sp.baseline_batch}-n1", cfg.replace(batch_size=sp.baseline_batch), None),
        ("large", f"large-b{batch}x{n}", cfg.replace(batch_size=batch), nproc),
        ("linear-lr", f"large-b{batch}x{n}-lr{base_lr * k:g}", cfg.replace(batch_size=batch, lr=base_lr * k), nproc),
        ("linear-lr+warmup", f"large-b{batch}x{n}-lr{base_lr * k:g}-warmup{sp.warmup_epochs}",
         cfg.replace(batch_size=batch, lr=base_lr * k, warmup_epochs=sp.warmup_epochs,
                     warmup_start_factor=min(1.0, 1 / k)), nproc),
    ]
    runs = []
    for role, label, c, procs in plan:
        info = run_train(ctx, "s5", label, c, nproc=procs)
        runs.append({"role": role, "label": label})
    return {"runs": runs, "nproc": n, "per_device_batch": batch, "global_batch": global_batch,
            "baseline_batch": sp.baseline_batch, "k": k, "base_lr": base_lr, "scaled_lr": base_lr * k,
            "warmup_epochs": sp.warmup_epochs, "warmup_start_lr": base_lr * k * min(1.0, 1 / k),
            "epochs": sp.large_epochs, "train_images": n_train, "note": note}


# ------------------------------------------------------------------------------- s6: short answers


def set_epoch_demo(n: int = 16, world: int = 2) -> dict[str, Any]:
    """Rank 0's indices in epochs 1 and 2 from a real DistributedSampler, with and without set_epoch."""
    from torch.utils.data import DistributedSampler

    def orders(call_set_epoch: bool) -> list[list[int]]:
        s = DistributedSampler(range(n), num_replicas=world, rank=0, shuffle=True, seed=0)
        out = []
        for epoch in (1, 2):
            if call_set_epoch:
                s.set_epoch(epoch)
            out.append(list(s))
        return out

    without, with_ = orders(False), orders(True)
    return {"n": n, "world": world, "without": without, "with": with_,
            "without_same": without[0] == without[1], "with_same": with_[0] == with_[1]}


def replica_evidence(ctx: "LabContext") -> list[dict[str, Any]]:
    rows = []
    for key, infos in ctx.runs.items():
        for info in infos:
            d = info.get("distributed") or {}
            for c in d.get("replica_check") or []:
                rows.append({"run": f"{key}/{info['label']}", "nproc": d.get("world_size"), "epoch": c["epoch"],
                             "evaluated": bool(info["config"].get("evaluate")),
                             "params_max_abs_diff": c["params_max_abs_diff"],
                             "buffers_max_abs_diff": c["buffers_max_abs_diff"]})
    return rows


def s6_answers(ctx: "LabContext") -> dict[str, Any]:
    evidence = replica_evidence(ctx)
    if not evidence and max(process_counts(ctx)) > 1:
        info = run_train(ctx, "s6", "replicas-n2", timing_config(ctx).replace(batch_size=spreset(ctx).first_batch),
                         nproc=2)
        evidence = replica_evidence(ctx)
        if info["status"] != "completed":
            evidence = evidence or []
    return {"set_epoch": set_epoch_demo(), "replicas": evidence}


# ------------------------------------------------------------------------------------------ report


def _s1_rows(points: list[dict[str, Any]]) -> list[list[Any]]:
    return [[p["batch"], p["status"], p.get("images", ""), p.get("steps", ""), fs(p.get("epoch_s"), 3),
             fs(p.get("data_s"), 3), fs(p.get("no_data_s"), 3),
             f"{p['images_per_s_no_data']:.1f}" if p.get("images_per_s_no_data") else "n/a",
             (p.get("error") or "")[:80]] for p in points]


def render_s1(entry: dict[str, Any], rc: report.ReportContext) -> list[Any]:
    res = entry["result"]
    ok = [p for p in res["points"] if p["status"] == "completed"]

    def draw(fig: Any) -> None:
        ax = fig.subplots()
        ax.plot([p["batch"] for p in ok], [p["images_per_s_no_data"] or 0 for p in ok], marker="o")
        ax.set_xscale("log", base=2)
        ax.set(xlabel="per-device batch", ylabel="images/s (2nd epoch, data wait excluded)",
               title=f"s1 one {res['device_kind']}")
        ax.grid(alpha=0.3)

    return [
        report.pipelines_para(entry, rc.doc),
        Para(f"One {res['device_kind']}; per-device batch ×{SCALING_PRESETS.get(rc.preset.get('name'), SCALING_PRESETS['quick']).batch_factor} "
             f"per point; {res['train_images']} training images per run. Time of the **2nd epoch** (the 1st pays "
             f"one-off costs) **without the data wait**: `epoch_s - data_s` = host-to-device copy + forward + "
             f"backward + optimizer update (+ bookkeeping). Each point is a fresh process and model."),
        Table(["per-device batch", "status", "images", "steps", "epoch s", "data wait s", "epoch - data s",
               "images/s (excl. data)", "error"], _s1_rows(res["points"]), csv="s1_batch_scaling"),
        Para(f"Ladder stopped: {res['stop_reason']}. Largest per-device batch that trained: "
             f"**{res['largest_batch']}**."),
        rc.plot("s1_batch_scaling", "s1 throughput vs per-device batch", draw, size=(6, 3.6)),
        report.runs_para(entry),
    ]


def render_s2(entry: dict[str, Any], rc: report.ReportContext) -> list[Any]:
    res = entry["result"]
    pts = sorted(res["points"], key=lambda p: (p["batch"], p["nproc"]))
    rows = [[p["batch"], p["nproc"], p["batch"] * p["nproc"], p["status"], p.get("images", ""), fs(p.get("epoch_s"), 3),
             f"{p['images_per_s']:.1f}" if p.get("images_per_s") else "n/a", fs(p.get("speedup"), 2),
             pct(p.get("efficiency"))] for p in pts]

    def draw(fig: Any) -> None:
        ax = fig.subplots()
        ns = res["counts"]
        for b in sorted({p["batch"] for p in pts}):
            line = [p for p in pts if p["batch"] == b and p.get("speedup")]
            ax.plot([p["nproc"] for p in line], [p["speedup"] for p in line], marker="o", label=f"batch {b}/device")
        ax.plot(ns, ns, linestyle=":", color="grey", label="ideal")
        ax.set(xlabel=f"devices ({res['device_kind']})", ylabel="speedup vs 1 device", title="s2 weak scaling")
        ax.set_xticks(ns)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)

    blocks: list[Any] = [
        report.pipelines_para(entry, rc.doc),
        Para(f"Devices tried: {res['counts']} ({res['devices_available']} {res['device_kind']}(s) available). "
             "Speedup = images/s on N devices ÷ images/s on 1 device at the same per-device batch, **counting "
             "everything** (epoch_s of the 2nd epoch: data wait, copy, compute, gradient all-reduce, update; the "
             "slowest rank). 1 device = an ordinary single-process run; N devices = `cifarlab train --nproc N` "
             "(torchrun + DistributedDataParallel, communication hook timing on)."),
        Table(["per-device batch", "devices", "global batch", "status", "images (all ranks)", "epoch s", "images/s",
               "speedup", "efficiency"], rows, csv="s2_speedup"),
        Note("This is **weak scaling**: the per-device batch is fixed, so the global batch (and the work per step) "
             "grows with N while the per-step all-reduce stays 44.7 MB; efficiency stays high when compute per "
             "step dwarfs the all-reduce. **Strong scaling** would fix the global batch and split it (per-device "
             "batch ÷ N): each device's compute shrinks by N but the all-reduce does not, so efficiency falls "
             "faster, most at small batches."),
    ]
    if res["device_kind"].startswith("CPU"):
        blocks.append(Note("No GPU here: the 'devices' are CPU cores, one single-threaded process each, talking "
                           "over gloo on one machine's memory (shared with other work) — the figures show the "
                           "mechanics, not GPU numbers."))
    blocks += [rc.plot("s2_speedup", "s2 speedup vs devices", draw, size=(6, 3.6)), report.runs_para(entry)]
    return blocks


def render_s3(entry: dict[str, Any], rc: report.ReportContext) -> list[Any]:
    res = entry["result"]
    if res.get("skipped"):
        return [Note(f"Skipped: {res['skipped']}.")]
    rows = [[r["batch"], r["nproc"], fs(r["t1_s"], 3), r["t1_images"], fs(r["tn_s"], 3), r["tn_images"],
             fs(r["compute_est_s"], 3), fs(r["comm_est_s"], 3), fs(r["comm_busy_s"], 3), fs(r["comm_sum_s"], 3),
             r["allreduces"], fs(r["gap_s"], 3)] for r in res["rows"]]

    def draw(fig: Any) -> None:
        ax = fig.subplots()
        labels = [f"b{r['batch']} x{r['nproc']}" for r in res["rows"]]
        xs = range(len(labels))
        ax.bar([x - 0.2 for x in xs], [r["compute_est_s"] for r in res["rows"]], width=0.4, label="compute ≈ T1/N")
        ax.bar([x - 0.2 for x in xs], [max(r["comm_est_s"], 0) for r in res["rows"]], width=0.4,
               bottom=[r["compute_est_s"] for r in res["rows"]], label="comm ≈ T_N - T1/N")
        ax.bar([x + 0.2 for x in xs], [r["comm_busy_s"] or 0 for r in res["rows"]], width=0.4,
               label="all-reduce in flight (measured)")
        ax.set_xticks(list(xs), labels)
        ax.set(ylabel="seconds (2nd epoch, excl. data wait)", title="s3 compute vs communication")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7)

    return [
        Para("Per N-device run of s2, 2nd epoch, data wait excluded on both sides. **Estimate**: compute ≈ T1/N "
             "(the 1-device time for the same number of images, split N ways), communication ≈ T_N − T1/N. "
             "**Measured**: a DDP communication hook that does DDP's default work (divide the gradient bucket by "
             "N, all-reduce it) and records when each bucket's all-reduce was handed over and when it completed; "
             "'in flight' is the union of those intervals on the slowest rank, 'sum' their plain sum."),
        Table(["per-device batch", "devices", "T1 s", "T1 images", "T_N s", "T_N images", "compute ≈ T1/N s",
               "comm ≈ T_N − T1/N s", "all-reduce in flight s", "all-reduce sum s", "all-reduces/rank",
               "estimate − measured s"], rows, csv="s3_compute_vs_comm"),
        Para("How far apart and why: the estimate counts only *exposed* cost (what N devices lose against a "
             "perfect split: non-overlapped all-reduce, waiting for the slowest rank, per-process overheads); the "
             "hook measures the time all-reduces are in flight, much of which overlaps backward compute (DDP "
             "launches a bucket as soon as its gradients are ready). Estimate > measured means overheads beyond "
             "the all-reduce itself (e.g. processes competing for cores/memory bandwidth); estimate < measured "
             "means overlap hid part of the communication."),
        rc.plot("s3_compute_vs_comm", "s3 compute vs communication", draw, size=(7, 3.6)),
    ]


def render_s4(entry: dict[str, Any], rc: report.ReportContext) -> list[Any]:
    res = entry["result"]
    if res.get("skipped"):
        return [Note(f"Skipped: {res['skipped']}.")]
    rows = [[r["world_size"], r["backend"], f"{r['elements']:,}", f"{r['bytes'] / 1e6:.1f}", len(r["times_s"]),
             fs(r["median_s"] * 1e3, 2), fs(r["min_s"] * 1e3, 2), fs(r["algbw_gbps"], 2), fs(r["busbw_gbps"], 2),
             r["device"]] for r in res["rows"]]

    def draw(fig: Any) -> None:
        ax = fig.subplots()
        ax.bar([str(r["world_size"]) for r in res["rows"]], [r["busbw_gbps"] for r in res["rows"]])
        ax.set(xlabel="processes", ylabel="ring bus bandwidth GB/s", title="s4 all-reduce of 44.7 MB")
        ax.grid(axis="y", alpha=0.3)

    return [
        Para("A standalone `dist.all_reduce` of one fp32 tensor the size of ResNet-18's gradients (11,173,962 "
             "elements = 44.7 MB), after warm-up iterations; each timed iteration starts after a barrier, the device "
             "synchronized before and after; the time of an iteration is its slowest rank. Ring all-reduce: each "
             "rank sends (and receives) 2(N−1)/N · S bytes, so **bus bandwidth = 2(N−1)/N · S / time**; algorithm "
             "bandwidth = S / time. GB/s = 10⁹ bytes/s."),
        Table(["processes", "backend", "elements", "MB", "iterations", "median ms", "min ms", "algbw GB/s",
               "busbw GB/s", "device"], rows, csv="s4_allreduce"),
        rc.plot("s4_allreduce", "s4 all-reduce bus bandwidth", draw, size=(5, 3.4)),
    ]


def render_s5(entry: dict[str, Any], rc: report.ReportContext) -> list[Any]:
    res = entry["result"]
    by_label = {r["label"]: r for r in runs_of(entry)}
    rows, curves = [], []
    base_acc = None
    for item in res["runs"]:
        run = by_label.get(item["label"])
        if run is None:
            continue
        s, c = run["summary"], run["config"]
        acc = s.get("final_test_acc")
        if item["role"] == "baseline":
            base_acc = acc
        n = run.get("nproc", 1)
        rows.append([item["role"], f"{c['batch_size']} × {n} = {c['batch_size'] * n}", c["lr"],
                     f"{c.get('warmup_epochs', 0)} (from {c['lr'] * c.get('warmup_start_factor', 1):g})"
                     if c.get("warmup_epochs") else "none", run["status"], s.get("epochs_completed", 0),
                     fs(s.get("final_train_loss"), 4), pct(s.get("final_train_acc")), pct(acc),
                     (f"{100 * (acc - base_acc):+.1f} pts" if acc is not None and base_acc is not None else "")])
        curves.append((item["role"], run))
    blocks: list[Any] = [
        report.pipelines_para(entry, rc.doc),
        Para(f"{res['epochs']} epochs each on {res['train_images']} training images. Large batch: the largest "
             f"per-device batch of s1 ({res['per_device_batch']}) on all {res['nproc']} device(s) = global batch "
             f"{res['global_batch']}, k = {res['global_batch']}/{res['baseline_batch']} = {res['k']:g}. Remedies "
             f"(Goyal et al. 2017): **linear scaling** lr = {res['base_lr']} × k = {res['scaled_lr']:g}; "
             f"**gradual warm-up**: lr rises linearly per step from {res['warmup_start_lr']:g} to "
             f"{res['scaled_lr']:g} over the first {res['warmup_epochs']} epoch(s)."),
        Table(["run", "batch (per device × devices)", "lr", "warm-up epochs", "status", "epochs", "train loss",
               "train top-1", "test top-1", "test top-1 vs baseline"], rows, csv="s5_large_batch"),
    ]
    if res.get("note"):
        blocks.append(Note(res["note"]))
    blocks.append(Para("Why: with the same number of epochs a k-times larger batch takes k-times fewer optimizer "
                       "steps at the same lr, so it trains less per epoch; linear scaling restores the distance "
                       "travelled per epoch, and warm-up avoids the large early steps that make a scaled lr diverge "
                       "or land in a poor region. " + s5_effect(res, by_label)))
    blocks += [rc.plot("s5_large_batch", "s5 loss and top-1 per epoch",
                       lambda fig: report._curves(fig, curves, "s5"), size=(9, 3.6)), report.runs_para(entry)]
    return blocks


def s5_effect(res: dict[str, Any], by_label: dict[str, Any]) -> str:
    """One sentence per remedy, from the measured final test top-1 (train top-1 when not evaluated)."""
    acc: dict[str, float | None] = {}
    status: dict[str, str] = {}
    for item in res["runs"]:
        run = by_label.get(item["label"])
        if run is not None:
            s = run["summary"]
            test = s.get("final_test_acc")
            acc[item["role"]] = test if test is not None else s.get("final_train_acc")
            status[item["role"]] = run["status"]

    def said(a: str, b: str, what: str) -> str:
        if status.get(b) not in (None, "completed"):
            return f"{what}: the run {status[b]}."
        if acc.get(a) is None or acc.get(b) is None:
            return f"{what}: not measured."
        d = 100 * (acc[b] - acc[a])
        return f"{what}: test top-1 {pct(acc[a])} -> {pct(acc[b])} ({d:+.1f} points)."

    return "Measured here: " + " ".join([
        said("baseline", "large", f"batch {res['baseline_batch']} -> {res['global_batch']} at the same lr"),
        said("large", "linear-lr", f"linear lr scaling (lr {res['base_lr']} -> {res['scaled_lr']:g})"),
        said("linear-lr", "linear-lr+warmup", f"adding {res['warmup_epochs']} warm-up epoch(s)"),
    ]) + (" Tiny runs: differences of a few points are noise." if res["train_images"] < 5000 else "")


def render_s6(entry: dict[str, Any], rc: report.ReportContext) -> list[Any]:
    res = entry["result"]
    se = res["set_epoch"]
    ev = res["replicas"]
    params = [e["params_max_abs_diff"] for e in ev]
    no_eval_buffers = [e["buffers_max_abs_diff"] for e in ev if not e["evaluated"]]
    eval_buffers = [e["buffers_max_abs_diff"] for e in ev if e["evaluated"]]
    answers = [
        f"**Why `set_epoch` matters.** DistributedSampler shuffles with a generator seeded by seed + epoch, and "
        f"only `set_epoch` changes the epoch. Measured with a real sampler ({se['n']} images, {se['world']} ranks), "
        f"rank 0's order in epochs 1 and 2: without set_epoch {se['without'][0]} then {se['without'][1]} "
        f"(**{'identical' if se['without_same'] else 'different'}**); with set_epoch {se['with'][0]} then "
        f"{se['with'][1]} ({'identical' if se['with_same'] else 'different'}). Without it every epoch repeats the "
        f"same order and the same split between ranks, which loses the benefit of reshuffling. cifarlab's engine "
        f"calls it before every epoch.",
    ]
    if ev:
        answers.append(
            f"**BatchNorm buffers are broadcast too.** Running mean/var are buffers, not parameters: no gradient "
            f"updates them, each rank updates them from its own batch. DDP therefore broadcasts rank 0's buffers at "
            f"the start of every forward pass (broadcast_buffers=True). Measured after training ({len(ev)} replica "
            f"checks): without a final evaluation the buffers differed across ranks by up to "
            f"{max(no_eval_buffers) if no_eval_buffers else 'n/a'} (the last step's local update, taken after the "
            f"broadcast), after cifarlab's pre-evaluation broadcast by {max(eval_buffers) if eval_buffers else 'n/a'}. "
            f"Option: `--sync-bn` (torch.nn.SyncBatchNorm, CUDA only) computes the batch statistics over the global "
            f"batch, so every rank normalises with the same statistics and updates identical buffers.")
        answers.append(
            f"**Do gradients alone suffice?** For the parameters, yes — provided all replicas start identical (same "
            f"seed, and DDP broadcasts rank 0's parameters at construction) and run the same optimizer: averaged "
            f"gradients then produce bit-identical updates. Measured: the largest parameter difference across ranks "
            f"was **{max(params)}** over {len(ev)} checks. For the model as a whole, no: the BatchNorm buffers above "
            f"are state that no gradient carries, hence the broadcast (or SyncBatchNorm); optimizer state (momentum) "
            f"stays identical only because it is built from the identical averaged gradients.")
    else:
        answers.append("No multi-process run was possible here (one device), so the replica measurements are "
                       "missing; see README 'Multi-GPU / multi-node'.")
    rows = [[e["run"], e["nproc"], e["epoch"], "yes" if e["evaluated"] else "no", e["params_max_abs_diff"],
             e["buffers_max_abs_diff"]] for e in ev]
    blocks: list[Any] = [Bullets(answers)]
    if rows:
        blocks.append(Table(["run", "processes", "epoch", "evaluated (buffers broadcast first)",
                             "max |param diff| across ranks", "max |buffer diff| across ranks"], rows,
                            csv="s6_replicas"))
    return blocks


# ---------------------------------------------------------------------------------------- registry


def _register() -> None:
    from cifarlab.experiments import Experiment, register, register_suite

    for exp in (
        Experiment("s1", "S1 Batch-size scaling on one device", s1_batch_scaling, render_s1,
                   lambda p, cuda: 2 * (6 if cuda else SCALING_PRESETS.get(p.name, SCALING_PRESETS["quick"]).max_points_cpu)),
        Experiment("s2", "S2 Speedup on 1, 2, 4 devices (weak scaling)", s2_speedup, render_s2, lambda p, c: 8),
        Experiment("s3", "S3 Compute vs communication", s3_compute_vs_comm, render_s3, lambda p, c: 0),
        Experiment("s4", "S4 All-reduce bandwidth", s4_allreduce, render_s4, lambda p, c: 0),
        Experiment("s5", "S5 Large-batch accuracy, linear LR scaling and warm-up", s5_large_batch, render_s5,
                   lambda p, c: 4 * SCALING_PRESETS.get(p.name, SCALING_PRESETS["quick"]).large_epochs),
        Experiment("s6", "S6 set_epoch, BatchNorm buffers, gradients", s6_answers, render_s6, lambda p, c: 0),
    ):
        register(exp)
    register_suite(SUITE, ("s1", "s2", "s3", "s4", "s5", "s6"))


_register()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] != "allreduce":
        print("usage: python -m cifarlab.scaling allreduce --elements N --iters K --out FILE (under torchrun)",
              file=sys.stderr)
        return 2
    return _allreduce_main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
