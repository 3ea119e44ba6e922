"""S4: all-reduce bus bandwidth of the gradient's size on 2, 4 processes (the benchmark itself is
cifarlab.lab.scaling.allreduce_bench, run under torchrun)."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from typing import Any

from cifarlab.lab.context import Experiment, LabContext, LabInterrupted
from cifarlab.lab.scaling.common import child_env, devices_available, is_cuda, process_counts, spreset
from cifarlab.report.blocks import Note, Para, Table, fs
from cifarlab.report.plots import ReportContext


def allreduce_bench(ctx: LabContext, n: int) -> dict[str, Any]:

    sp = spreset(ctx)
    out = ctx.lab_dir / "s4" / f"allreduce-n{n}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc_per_node", str(n),
           "-m", "cifarlab.lab.scaling.allreduce_bench", "allreduce", "--elements", str(sp.allreduce_elements),
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


def s4_allreduce(ctx: LabContext) -> dict[str, Any]:
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


def render_s4(entry: dict[str, Any], rc: ReportContext) -> list[Any]:
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

    cuda = any(str(r.get("device", "")).startswith("cuda") for r in res["rows"])
    sync = ("the device synchronized before and after" if cuda else
            "on the CPU (gloo) the call returns when the reduction is done, so there is no device to synchronize")
    return [
        Para("A standalone `dist.all_reduce` of one fp32 tensor the size of ResNet-18's gradients (11,173,962 "
             f"elements = 44.7 MB), after warm-up iterations; each timed iteration starts after a barrier, {sync}; "
             "the time of an iteration is its slowest rank. Ring all-reduce: each "
             "rank sends (and receives) 2(N−1)/N · S bytes, so **bus bandwidth = 2(N−1)/N · S / time**; algorithm "
             "bandwidth = S / time. GB/s = 10⁹ bytes/s."),
        Table(["processes", "backend", "elements", "MB", "iterations", "median ms", "min ms", "algbw GB/s",
               "busbw GB/s", "device"], rows, csv="s4_allreduce"),
        rc.plot("s4_allreduce", "s4 all-reduce bus bandwidth", draw, size=(5, 3.4)),
    ]


ITEM = Experiment("s4", "S4 All-reduce bandwidth", s4_allreduce, render_s4, lambda p, c: 0)
