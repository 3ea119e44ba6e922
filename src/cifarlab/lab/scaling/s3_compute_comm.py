"""S3: compute vs communication, estimated (T1/N) and measured (a DDP communication hook)."""

from __future__ import annotations

from typing import Any

from cifarlab.lab.context import Experiment, LabContext
from cifarlab.lab.scaling.s2_speedup import multi_device_points
from cifarlab.report.blocks import Note, Para, Table, fs
from cifarlab.report.plots import ReportContext


def s3_compute_vs_comm(ctx: LabContext) -> dict[str, Any]:
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


def render_s3(entry: dict[str, Any], rc: ReportContext) -> list[Any]:
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
             "'in flight' is the union of those intervals, 'sum' their plain sum, each on the rank where it is "
             "largest (not necessarily the slowest rank that T_N comes from)."),
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


ITEM = Experiment("s3", "S3 Compute vs communication", s3_compute_vs_comm, render_s3, lambda p, c: 0)
