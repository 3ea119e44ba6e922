"""C5: CPU vs GPU epoch time (the CPU on a subset, extrapolated to a full epoch)."""

from __future__ import annotations

import dataclasses
from typing import Any

from cifarlab.data import DataBundle, take
from cifarlab.lab.context import FULL_EPOCH_IMAGES, Experiment, LabContext, PlannedRuns
from cifarlab.lab.mfu import has_mfu, mean_of, mfu_cell, peaks_para, tflops_cell
from cifarlab.lab.sections import REF, REFERENCE, pipeline_label, runs_para
from cifarlab.report.blocks import Block, Note, Para, Table, finite, fs, mean, ok_records, run_named
from cifarlab.report.plots import ReportContext


def c5_cpu_gpu(ctx: LabContext) -> dict[str, Any]:
    """CPU on a subset, extrapolated to a full epoch; GPU (fast path) when there is one."""

    p = ctx.preset
    workers, source = ctx.best_workers()
    train = take(ctx.data.train, p.cpu_subset, ctx.base.seed)
    cpu_data = DataBundle(train=train, test=ctx.data.test, source=ctx.data.source,
                          description=f"{ctx.data.description}; C5 CPU subset {len(train)} train images")
    ctx.train("c5", "cpu", ctx.classic(ctx.base).replace(device="cpu", workers=workers, subset=len(train),
                                                         epochs=p.cpu_epochs, evaluate=False), data=cpu_data)
    gpu = ctx.device.type == "cuda"
    if gpu:
        ctx.train("c5", "gpu", ctx.fast(ctx.base))
    return {"cpu_subset": len(train), "cpu_workers": workers, "cpu_workers_from": source,
            "full_epoch_images": FULL_EPOCH_IMAGES,
            "gpu_note": None if gpu else f"no GPU used (device {ctx.device.type}): CPU alone is reported"}


def render_c5(entry: dict[str, Any], rc: ReportContext) -> list[Block]:
    res = entry["result"]
    cpu = run_named(entry, "cpu")
    gpu = run_named(entry, "gpu")
    full = res["full_epoch_images"]
    recs = ok_records(cpu) if cpu else []
    steady = recs[1:] or recs
    per_image = mean([r["epoch_s"] / r["images"] for r in steady if r.get("images")])
    cpu_full = per_image * full if per_image else None
    measured = mean([r["epoch_s"] for r in steady])
    rows = [["CPU", pipeline_label(cpu) if cpu else "n/a",
             f"{res['cpu_subset']}-image subset, epoch(s) {', '.join(str(r['epoch']) for r in steady)} "
             f"({'after the first' if len(recs) > 1 else 'only one epoch'})",
             fs(measured, 3), f"{fs(cpu_full, 1)} (extrapolated)", fs(REFERENCE["c5_cpu_s"], 1)]]
    gpu_s = None
    if gpu:
        gpu_s = gpu["summary"].get("mean_epoch_s")
        imgs = ok_records(gpu)[0]["images"] if ok_records(gpu) else 0
        rows.append(["GPU", pipeline_label(gpu), f"{imgs} images per epoch, all epochs", fs(gpu_s, 3),
                     fs(gpu_s * full / imgs, 2) + (" (measured)" if imgs == full else " (extrapolated)")
                     if finite(gpu_s) and imgs else "n/a", fs(REFERENCE["c5_gpu_s"], 2)])
    else:
        rows.append(["GPU", "-", "-", "not measured", "not measured", fs(REFERENCE["c5_gpu_s"], 2)])
    utilization = has_mfu([cpu, gpu])  # lab folders from before runs recorded it: the table as it was
    if utilization:
        rows[0] += [tflops_cell(mean_of(cpu, "tflops", 2 if len(recs) > 1 else 1)),
                    mfu_cell(mean_of(cpu, "mfu", 2 if len(recs) > 1 else 1))]
        rows[1] += [tflops_cell(mean_of(gpu, "tflops")), mfu_cell(mean_of(gpu, "mfu"))] if gpu else ["-", "-"]
    blocks: list[Block] = [
        Table(["device", "pipeline", "measured on", "measured s/epoch", f"full {full:,}-image epoch s", REF,
               *(["TFLOP/s (same epochs)", "MFU"] if utilization else [])], rows, csv="c5_cpu_gpu"),
        *(peaks_para([cpu, gpu]) if utilization else []),
        Para(f"The CPU full-epoch time is **extrapolated**: seconds per image over the steady epochs of a "
             f"{res['cpu_subset']}-image subset times {full:,} (loader workers: {res['cpu_workers']}, "
             f"{res['cpu_workers_from']}); it assumes a full epoch runs at the same per-image speed."),
    ]
    if res.get("gpu_note"):
        blocks.append(Note(f"No GPU: {res['gpu_note']}. GPU figures are not measured here."))
    elif finite(gpu_s) and cpu_full:
        blocks.append(Para(f"GPU vs CPU (full epoch): {cpu_full / (gpu_s * full / max(1, ok_records(gpu)[0]['images'])):.1f}x."))

    def draw(fig: Any) -> None:
        ax = fig.subplots()
        labels = ["CPU (ours, extrap.)", "CPU (reference)", "GPU (reference)"]
        vals = [cpu_full or 0.0, REFERENCE["c5_cpu_s"], REFERENCE["c5_gpu_s"]]
        if gpu and finite(gpu_s):
            labels.insert(1, "GPU (ours)")
            vals.insert(1, gpu_s * full / max(1, ok_records(gpu)[0]["images"]))
        bars = ax.bar(labels, vals, color=["C0", "C1", "C7", "C7"][: len(vals)])
        ax.bar_label(bars, labels=[f"{v:,.1f} s" for v in vals], fontsize=7)
        ax.set(ylabel=f"seconds per {full:,}-image epoch", title="C5 CPU vs GPU")
        ax.set_yscale("log")
        ax.tick_params(axis="x", labelsize=7)
        ax.grid(axis="y", alpha=0.3)

    blocks += [rc.plot("c5_cpu_gpu", "C5 epoch time per device", draw, size=(6, 3.6)), runs_para(entry)]
    return blocks


def plan_c5(ctx: LabContext) -> list[PlannedRuns]:
    cpu = PlannedRuns("cpu-classic", 1, ctx.preset.cpu_epochs, evaluate=False, images=ctx.preset.cpu_subset,
                      note="no GPU: the CPU run only")
    if ctx.device.type != "cuda":
        return [cpu]
    reused = ctx.fast_base_run_before("c5")  # the GPU run is C1's configuration
    if reused:
        return [dataclasses.replace(cpu, note=f"the GPU run is {reused}, reused")]
    return [dataclasses.replace(cpu, note=""), PlannedRuns("fast", 1, ctx.preset.epochs)]


ITEM = Experiment("c5", "C5 CPU vs GPU epoch time", c5_cpu_gpu, render_c5, lambda p, cuda: p.cpu_epochs + (p.epochs if cuda else 0),
                  plan=plan_c5)
