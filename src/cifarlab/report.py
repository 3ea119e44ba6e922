"""The lab report, built from a lab folder's files alone (results.json), never from live objects.

Each experiment's section is a list of blocks (headings, paragraphs, tables, images) returned by its
render function; the same blocks become report.md, a self-contained report.html (plots embedded as
base64 PNGs) and one CSV per table. Plots use matplotlib's Agg backend (no display needed).
`build_report(lab_dir)` is what both `cifarlab lab` and `cifarlab report LAB_DIR` call, so a rebuilt
report is the same report.
"""

from __future__ import annotations

import base64
import html
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from cifarlab.errors import UsageError
from cifarlab.runs import read_json, write_bytes_atomic, write_csv_atomic, write_text_atomic

SUPPORTED_SCHEMAS = ("cifarlab.lab/1",)
REF = "reference (past run, unknown hardware, known timing mistakes)"
# The seed report's figures (issue 3), shown beside ours, never used as targets.
REFERENCE = {
    "c1_train_acc": 0.657, "c1_train_loss": 0.960,
    "c2": "per-epoch total 10.4-10.6 s; 'training' 0.012 s (clock read without synchronizing the GPU)",
    "c3_data_s": {0: 19.4, 4: 5.4, 8: 3.96, 12: 3.25, 16: 3.29},
    "c5_gpu_s": 6.40, "c5_cpu_s": 426.3,
    "c6_acc": {"sgd": 0.758, "sgd-nesterov": 0.723, "adagrad": 0.615, "adadelta": 0.826, "adam": 0.262},
    "c7_acc": 0.638,
    "q3_params": 11_164_362, "q3_nonzero_grads": 8_920_240, "q4_nonzero_grads": 8_896_249,
    "c8": "L4 GPU (public write-up): eager 8.3 s/epoch; reduce-overhead 18.1 s first epoch, 3.4 s steady",
}


# ------------------------------------------------------------------------------------------ blocks


@dataclass
class Heading:
    text: str
    level: int = 2


@dataclass
class Para:
    text: str


@dataclass
class Note:
    text: str  # a call-out (blockquote): banners, skips, warnings


@dataclass
class Bullets:
    items: list[str]


@dataclass
class Table:
    columns: list[str]
    rows: list[list[Any]]
    csv: str | None = None  # written as csv/<name>.csv


@dataclass
class Image:
    file: str  # relative to the lab folder
    alt: str


@dataclass
class Code:
    text: str


Block = Heading | Para | Note | Bullets | Table | Image | Code


@dataclass
class ReportContext:
    lab_dir: Path
    doc: dict[str, Any]
    plots: list[str] = field(default_factory=list)

    @property
    def preset(self) -> dict[str, Any]:
        return self.doc.get("preset", {})

    def plot(self, name: str, alt: str, draw: Callable[[Any], None], size: tuple[float, float] = (8, 3.6)) -> Image:
        """Draw into a new figure with draw(fig) and save plots/<name>.png."""
        import io

        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot as plt

        fig = plt.figure(figsize=size, dpi=100)
        try:
            draw(fig)
            fig.tight_layout()
            buf = io.BytesIO()
            fig.savefig(buf, format="png", metadata={"Software": None})
        finally:
            plt.close(fig)
        (self.lab_dir / "plots").mkdir(exist_ok=True)
        write_bytes_atomic(self.lab_dir / "plots" / f"{name}.png", buf.getvalue())
        self.plots.append(f"plots/{name}.png")
        return Image(f"plots/{name}.png", alt)


# ------------------------------------------------------------------------------------- formatting


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def fs(x: Any, digits: int = 2) -> str:
    """Seconds (or any float) or 'n/a'."""
    return f"{x:.{digits}f}" if _finite(x) else "n/a"


def pct(x: Any) -> str:
    return f"{100 * x:.1f}%" if _finite(x) else "n/a"


def num(x: Any) -> str:
    return f"{x:,}" if isinstance(x, int) else "n/a"


def runs_of(entry: dict[str, Any]) -> list[dict[str, Any]]:
    return entry.get("runs", [])


def run_named(entry: dict[str, Any], label: str) -> dict[str, Any] | None:
    return next((r for r in runs_of(entry) if r["label"] == label), None)


def ok_records(run: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for r in run.get("records", []) if r.get("status") == "ok"]


def mean(values: list[Any]) -> float | None:
    vals = [v for v in values if _finite(v)]
    return sum(vals) / len(vals) if vals else None


def pipeline_label(run: dict[str, Any]) -> str:
    c = run["config"]
    if c["loader"] == "device":
        data = "fast path: data resident on the device, batched crop/flip there"
    else:
        data = f"classic pipeline: DataLoader + PIL transforms, {c['workers']} worker(s)"
    recs = run.get("records") or [{}]
    mode = recs[0].get("timing_mode") or ("synchronized" if c.get("sync_timing") else "async")
    parts = [data, "channels_last" if c.get("channels_last") else "contiguous NCHW", run.get("precision", "?"),
             f"{mode} timing"]
    if c.get("compile", "none") != "none":
        parts.append(f"torch.compile mode={c['compile']}")
    return "; ".join(parts)


def pipelines_para(entry: dict[str, Any], doc: dict[str, Any]) -> Para:
    seen: dict[str, list[str]] = {}
    for r in runs_of(entry):
        seen.setdefault(pipeline_label(r), []).append(r["label"])
    if not seen:
        return Para("Pipeline: no runs finished.")
    text = "; ".join(f"`{', '.join(labels)}`: {p}" for p, labels in seen.items()) if len(seen) > 1 else next(iter(seen))
    extra = ""
    if doc.get("fast_loader") == "torch" and any(r["config"].get("sync_timing") is False for r in runs_of(entry)):
        extra = " (the device-resident loader is not installed in this build, so the classic loader stood in)"
    return Para(f"Pipeline: {text}{extra}. Device: {runs_of(entry)[0].get('device', '?')}.")


def runs_para(entry: dict[str, Any]) -> Para:
    items = []
    for r in runs_of(entry):
        note = " (same config as an earlier run in this lab: reused)" if r.get("reused") else ""
        items.append(f"`{r['path']}` ({r['status']}){note}")
    return Para("Run folders: " + ", ".join(items) + "." if items else "Run folders: none.")


# ------------------------------------------------------------------------------------ plot helpers


def _curves(fig: Any, runs: list[tuple[str, dict[str, Any]]], title: str = "") -> None:
    ax_loss, ax_acc = fig.subplots(1, 2)
    for label, run in runs:
        recs = ok_records(run) or [r for r in run.get("records", [])]
        ep = [r["epoch"] for r in recs]
        loss = [r["train_loss"] if _finite(r.get("train_loss")) else float("nan") for r in recs]
        ax_loss.plot(ep, loss, marker="o", label=label)
        line = ax_acc.plot(ep, [100 * (r.get("train_acc") or float("nan")) for r in recs], marker="o",
                           label=f"{label} train")[0]
        test = [100 * r["test_acc"] if _finite(r.get("test_acc")) else float("nan") for r in recs]
        if any(math.isfinite(t) for t in test):
            ax_acc.plot(ep, test, marker="x", linestyle="--", color=line.get_color(), label=f"{label} test")
    ax_loss.set(xlabel="epoch", ylabel="train loss", title=f"{title} loss".strip())
    ax_acc.set(xlabel="epoch", ylabel="top-1 (%)", title=f"{title} top-1".strip())
    ax_acc.axhline(10, color="grey", linewidth=0.8, linestyle=":")
    from matplotlib.ticker import MaxNLocator

    for ax in (ax_loss, ax_acc):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)


def _stacked(ax: Any, labels: list[str], parts: dict[str, list[float]], title: str = "") -> None:
    ax.set_title(title)
    bottom = [0.0] * len(labels)
    for name, values in parts.items():
        vals = [v if _finite(v) else 0.0 for v in values]
        ax.bar(labels, vals, bottom=bottom, label=name)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set_ylabel("seconds")
    ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3)


# ---------------------------------------------------------------------------------- the sections


def render_c1(entry: dict[str, Any], rc: ReportContext) -> list[Block]:
    run = runs_of(entry)[0]
    recs = ok_records(run)
    rows = [[r["epoch"], fs(r["train_loss"], 4), pct(r["train_acc"]), fs(r.get("test_loss"), 4), pct(r.get("test_acc")),
             fs(r["epoch_s"]), fs(r.get("eval_s")), f"{r['images_per_s']:.1f}" if _finite(r.get("images_per_s")) else "n/a"]
            for r in recs]
    s = run["summary"]
    n = s.get("epochs_completed", 0)
    return [
        pipelines_para(entry, rc.doc),
        Table(["epoch", "train loss", "train top-1", "test loss", "test top-1", "epoch s", "eval s (separate)",
               "images/s"], rows, csv="c1_epochs"),
        Table(["metric", "ours", REF],
              [[f"train top-1 after epoch {n}", pct(s.get("final_train_acc")), f"{pct(REFERENCE['c1_train_acc'])} (epoch 5)"],
               [f"train loss after epoch {n}", fs(s.get("final_train_loss"), 3), fs(REFERENCE["c1_train_loss"], 3)],
               [f"test top-1 after epoch {n}", pct(s.get("final_test_acc")), "not given"]], csv="c1_summary"),
        rc.plot("c1_curves", "C1 loss and top-1 per epoch", lambda fig: _curves(fig, [("SGD", run)], "C1")),
        runs_para(entry),
    ]


def render_c2(entry: dict[str, Any], rc: ReportContext) -> list[Block]:
    run = runs_of(entry)[0]
    recs = ok_records(run)
    keys = ("data_s", "h2d_s", "compute_s", "other_s")
    rows, gaps = [], []
    for r in recs:
        parts = [r.get(k) for k in keys]
        total = sum(p for p in parts if _finite(p))
        gaps.append(abs(total - r["epoch_s"]))
        rows.append([r["epoch"], *(fs(p, 3) for p in parts), fs(r["epoch_s"], 3), fs(total, 3), fs(r.get("eval_s"), 3)])
    means = [mean([r.get(k) for r in recs]) for k in keys]
    rows.append(["mean", *(fs(m, 3) for m in means), fs(mean([r["epoch_s"] for r in recs]), 3), "", ""])
    notes = rc.doc.get("timing_notes", {})
    return [
        pipelines_para(entry, rc.doc),
        Table(["epoch", "data wait s", "h2d copy s", "compute s", "other s", "epoch s", "sum of parts s",
               "eval s (not in epoch)"], rows, csv="c2_breakdown"),
        Para(f"The four parts add up to the epoch time by construction (largest gap over {len(recs)} epoch(s): "
             f"{max(gaps, default=0.0):.2e} s). {REF}: {REFERENCE['c2']}; an unsynchronized clock measures only "
             f"the time to enqueue GPU work, which is why that 'training' figure is tiny."),
        Bullets([f"**{k}**: {v}" for k, v in notes.items()]),
        rc.plot("c2_breakdown", "C2 per-epoch time split", lambda fig: _stacked(
            fig.subplots(), [f"epoch {r['epoch']}" for r in recs],
            {k.removesuffix("_s"): [r.get(k) for r in recs] for k in keys}, "C2 per-epoch time split"),
            size=(6, 3.6)),
        runs_para(entry),
    ]


def c3_points(entry: dict[str, Any]) -> list[dict[str, Any]]:
    """Per worker count: median and spread of data wait and epoch time over the repeats."""
    import statistics

    res = entry.get("result", {})
    out = []
    for p in res.get("points", []):
        runs = [run_named(entry, label) for label in p["runs"]]
        runs = [r for r in runs if r is not None]
        data = [r["summary"].get("mean_data_s") for r in runs]
        epoch = [r["summary"].get("mean_epoch_s") for r in runs]
        data = [d for d in data if _finite(d)]
        epoch = [e for e in epoch if _finite(e)]
        out.append({
            "workers": p["workers"], "repeats": len(runs),
            "data_s": statistics.median(data) if data else None, "data_min": min(data, default=None),
            "data_max": max(data, default=None), "data_std": statistics.stdev(data) if len(data) > 1 else None,
            "epoch_s": statistics.median(epoch) if epoch else None, "epoch_min": min(epoch, default=None),
            "epoch_max": max(epoch, default=None),
        })
    return out


def render_c3(entry: dict[str, Any], rc: ReportContext) -> list[Block]:
    res = entry["result"]
    cores = res["usable_cpus"]
    pts = c3_points(entry)

    def spread(lo: Any, hi: Any, n: int) -> str:
        return f"{fs(lo, 3)}-{fs(hi, 3)}" if n > 1 else "n/a (1 repeat)"

    rows = [[p["workers"], p["repeats"], fs(p["data_s"], 3), spread(p["data_min"], p["data_max"], p["repeats"]),
             fs(p["epoch_s"], 3), spread(p["epoch_min"], p["epoch_max"], p["repeats"]),
             fs(REFERENCE["c3_data_s"].get(p["workers"]), 2) if p["workers"] in REFERENCE["c3_data_s"] else "",
             "more workers than usable cores" if p["workers"] > cores else ""] for p in pts]
    over = [p["workers"] for p in pts if p["workers"] > cores]
    blocks: list[Block] = [
        pipelines_para(entry, rc.doc),
        Para(f"Usable CPU cores (sched_getaffinity): **{cores}**. Every point trains a fresh, freshly seeded model "
             f"(repeat r uses seed base+r at every worker count, so points do identical work); "
             f"{rc.doc.get('repeats')} repeat(s) per point. Data wait and epoch time "
             f"are means per epoch of each run, then the median over repeats; spread is min-max over repeats."),
        Table(["workers", "repeats", "data wait s/epoch", "spread", "epoch s", "spread", f"{REF}: data-loading s",
               "warning"], rows, csv="c3_workers"),
        Para(f"Stop rule: {res['stop_rule']}. Stopped because {res['stop_reason']}. "
             f"**Best count: {res['best_workers']} workers** (used by C4 and C5)."),
    ]
    if over:
        blocks.append(Note(f"Warning: {', '.join(map(str, over))} worker(s) exceed the {cores} usable CPU core(s); "
                           f"those workers compete with the training process for the same cores, so the sweep "
                           f"measures contention, not loader parallelism."))
    blocks.append(Para("Why more workers stop helping: each worker is a process that needs a core to decode and "
                       "augment images; once workers + the training process exceed the cores, they time-share; "
                       "every worker also pays start-up (fork, import) at each epoch and batches travel through "
                       "shared memory (IPC). The reference ran on unknown hardware, probably with more cores."))

    def draw(fig: Any) -> None:
        ax = fig.subplots()
        xs = [p["workers"] for p in pts]
        for key, label in (("data", "data wait"), ("epoch", "epoch")):
            ys = [p[f"{key}_s"] if _finite(p[f"{key}_s"]) else float("nan") for p in pts]
            lo = [y - (p[f"{key}_min"] if _finite(p[f"{key}_min"]) else y) for y, p in zip(ys, pts)]
            hi = [(p[f"{key}_max"] if _finite(p[f"{key}_max"]) else y) - y for y, p in zip(ys, pts)]
            ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=3, label=f"{label} s/epoch (ours)")
        ax.axvline(cores, color="grey", linestyle=":", label=f"{cores} usable cores")
        ax.set(xlabel="DataLoader workers", ylabel="seconds per epoch", title="C3 worker sweep")
        ax.set_xticks(xs)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)

    blocks += [rc.plot("c3_workers", "C3 data wait and epoch time vs workers", draw, size=(6, 3.6)), runs_para(entry)]
    return blocks


def render_c4(entry: dict[str, Any], rc: ReportContext) -> list[Block]:
    res = entry["result"]
    runs = runs_of(entry)
    rows = []
    for r in runs:
        s = r["summary"]
        prof = r.get("profile", {})
        rows.append([r["label"], r["config"]["workers"], fs(s.get("mean_data_s"), 3), fs(s.get("mean_h2d_s"), 3),
                     fs(s.get("mean_compute_s"), 3), fs(s.get("mean_other_s"), 3), fs(s.get("mean_epoch_s"), 3),
                     prof.get("steps_recorded", "n/a"), f"`{prof.get('trace')}`" if prof.get("trace") else "none"])
    blocks: list[Block] = [
        pipelines_para(entry, rc.doc),
        Para(f"'Best' = {res['best_workers']} workers ({res['best_from']}). torch.profiler recorded one warm-up "
             f"step then the steps listed, in the training process only (loader workers are other processes: "
             f"their work shows up here only as the wait on `DataLoader.__next__`). Each trace is a Chrome trace "
             f"(open in chrome://tracing or Perfetto; TensorBoard's profiler plugin reads `*.pt.trace.json`)."),
        Table(["run", "workers", "data s/epoch", "h2d s", "compute s", "other s (incl. profiler)", "epoch s",
               "profiled steps", "trace"], rows, csv="c4_data_vs_compute"),
        Para(c4_explanation(runs, rc.doc.get("machine", {}).get("usable_cpus"))),
    ]
    for r in runs:
        ops = r.get("profile", {}).get("top_ops", [])
        blocks.append(Para(f"Top operators by self time, run `{r['label']}`:"))
        blocks.append(Table(["operator", "calls", "self CPU ms", "CPU total ms", "self device ms"],
                            [[f"`{o['name'][:60]}`", o["calls"], fs(o["self_cpu_ms"], 1), fs(o["cpu_total_ms"], 1),
                              fs(o["self_device_ms"], 1)] for o in ops], csv=f"c4_top_ops_{r['label']}"))

    def draw(fig: Any) -> None:
        keys = ("mean_data_s", "mean_h2d_s", "mean_compute_s", "mean_other_s")
        _stacked(fig.subplots(), [f"{r['config']['workers']} worker(s)" for r in runs],
                 {k[5:-2]: [r["summary"].get(k) for r in runs] for k in keys})
        fig.axes[0].set_title("C4 data vs compute per epoch")

    blocks += [rc.plot("c4_data_vs_compute", "C4 data vs compute per epoch", draw, size=(5, 3.6)), runs_para(entry)]
    return blocks


def c4_explanation(runs: list[dict[str, Any]], cores: Any) -> str:
    """One paragraph from the measured numbers: 1 worker vs the best count."""
    if not runs:
        return "No profiled run finished."
    one, best = runs[0], runs[-1]

    def part(r: dict[str, Any]) -> tuple[Any, Any, Any]:
        return tuple(r["summary"].get(k) for k in ("mean_data_s", "mean_compute_s", "mean_epoch_s"))  # type: ignore

    def share(d: Any, e: Any) -> str:
        return pct(d / e) if _finite(d) and _finite(e) and e else "n/a"

    d1, c1, e1 = part(one)
    text = (f"With 1 worker the training step waited {fs(d1, 3)} s per epoch on the loader ({share(d1, e1)} of "
            f"the epoch) and computed for {fs(c1, 3)} s.")
    if best is one:
        return text + " The best count is 1, so there is no second configuration to compare."
    d2, c2, e2 = part(best)
    n = best["config"]["workers"]
    text += f" With {n} workers (the best) it waited {fs(d2, 3)} s ({share(d2, e2)}) and computed for {fs(c2, 3)} s."
    if _finite(d1) and _finite(d2):
        text += (f" Going from 1 to {n} workers the wait {'fell' if d2 < d1 else 'rose'} by {abs(d2 - d1):.3f} s "
                 f"per epoch; epoch time {fs(e1, 3)} -> {fs(e2, 3)} s.")
    if _finite(c1) and _finite(c2) and c1 > 0:
        change = (c2 - c1) / c1
        if abs(change) < 0.10:
            text += (f" Compute is the same within 10% ({change:+.1%}, treated as run-to-run noise): the worker "
                     f"count changed the wait, not the work.")
        else:
            text += (f" Compute itself changed by {change:+.1%}: loader processes (and anything else running on "
                     f"the machine) compete with the training process for the {cores or '?'} usable core(s), so "
                     f"on this machine the worker count moves compute time, not only the wait.")
    return text


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
                     if _finite(gpu_s) and imgs else "n/a", fs(REFERENCE["c5_gpu_s"], 2)])
    else:
        rows.append(["GPU", "-", "-", "not measured", "not measured", fs(REFERENCE["c5_gpu_s"], 2)])
    blocks: list[Block] = [
        Table(["device", "pipeline", "measured on", "measured s/epoch", f"full {full:,}-image epoch s", REF],
              rows, csv="c5_cpu_gpu"),
        Para(f"The CPU full-epoch time is **extrapolated**: seconds per image over the steady epochs of a "
             f"{res['cpu_subset']}-image subset times {full:,} (loader workers: {res['cpu_workers']}, "
             f"{res['cpu_workers_from']}); it assumes a full epoch runs at the same per-image speed."),
    ]
    if res.get("gpu_note"):
        blocks.append(Note(f"No GPU: {res['gpu_note']}. GPU figures are not measured here."))
    elif _finite(gpu_s) and cpu_full:
        blocks.append(Para(f"GPU vs CPU (full epoch): {cpu_full / (gpu_s * full / max(1, ok_records(gpu)[0]['images'])):.1f}x."))

    def draw(fig: Any) -> None:
        ax = fig.subplots()
        labels = ["CPU (ours, extrap.)", "CPU (reference)", "GPU (reference)"]
        vals = [cpu_full or 0.0, REFERENCE["c5_cpu_s"], REFERENCE["c5_gpu_s"]]
        if gpu and _finite(gpu_s):
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


def c6_flag(run: dict[str, Any], chance_margin: float) -> str:
    """'diverged at ...', 'stuck at chance' or '' -- computed from the records, never assumed."""
    recs = run.get("records", [])
    bad = next((r for r in recs if r.get("status") == "diverged"), None)
    if run.get("status") == "diverged" or bad is not None:
        where = f" at epoch {bad['epoch']}, step {bad.get('diverged_step')}" if bad else ""
        return f"DIVERGED (NaN/inf loss{where})"
    acc = run.get("summary", {}).get("final_train_acc")
    if _finite(acc) and acc < 0.10 + chance_margin:
        return f"stuck at chance (train top-1 {pct(acc)} < {pct(0.10 + chance_margin)})"
    return ""


def render_c6(entry: dict[str, Any], rc: ReportContext) -> list[Block]:
    margin = entry.get("result", {}).get("chance_margin", rc.preset.get("chance_margin", 0.05))
    rows, flagged = [], []
    for r in runs_of(entry):
        s = r["summary"]
        flag = c6_flag(r, margin)
        if flag:
            flagged.append(r["label"])
        ref = REFERENCE["c6_acc"].get(r["label"])
        rows.append([r["label"], fs(s.get("mean_epoch_s"), 3), fs(s.get("final_train_loss"), 4), pct(s.get("final_train_acc")),
                     pct(s.get("final_test_acc")), flag or "ok", f"{pct(ref)} (epoch 5)" if ref is not None else ""])
    blocks: list[Block] = [
        pipelines_para(entry, rc.doc),
        Para("All five with lr 0.1 and weight decay 5e-4; momentum 0.9 for SGD and SGD-nesterov (the others "
             "take none). 'Final' is the last finished epoch."),
        Table(["optimizer", "mean epoch s", "final train loss", "final train top-1", "final test top-1", "flag", REF],
              rows, csv="c6_optimizers"),
    ]
    if flagged:
        blocks.append(Note(f"Flagged: {', '.join(flagged)}. A NaN/inf loss stops that run and marks it diverged; "
                           f"'stuck at chance' means the final train top-1 stayed below chance + "
                           f"{margin:.0%}. At lr 0.1 Adam stuck near 25-30% is the expected finding, not a bug; "
                           f"in the short presets most runs are too short to leave chance."))
    blocks += [
        rc.plot("c6_optimizers", "C6 loss and top-1 per optimizer",
                lambda fig: _curves(fig, [(r["label"], r) for r in runs_of(entry)], "C6"), size=(10, 4)),
        runs_para(entry),
    ]
    return blocks


def render_c7(entry: dict[str, Any], rc: ReportContext) -> list[Block]:
    bn, nobn = run_named(entry, "batchnorm"), run_named(entry, "no-batchnorm")
    rows = []
    for label, r, ref in (("with BatchNorm", bn, None), ("without BatchNorm", nobn, REFERENCE["c7_acc"])):
        if r is None:
            continue
        s = r["summary"]
        rows.append([label, fs(s.get("mean_epoch_s"), 3), fs(s.get("final_train_loss"), 4), pct(s.get("final_train_acc")),
                     pct(s.get("final_test_acc")), c6_flag(r, rc.preset.get("chance_margin", 0.05)) or "ok",
                     f"{pct(ref)} train (epoch 5)" if ref else ""])
    blocks: list[Block] = [
        pipelines_para(entry, rc.doc),
        Table(["model", "mean epoch s", "final train loss", "final train top-1", "final test top-1", "flag", REF],
              rows, csv="c7_batchnorm"),
    ]
    if bn and nobn:
        a, b = bn["summary"].get("mean_epoch_s"), nobn["summary"].get("mean_epoch_s")
        if _finite(a) and _finite(b) and a:
            blocks.append(Para(f"Epoch time without BatchNorm: {fs(b, 3)} s vs {fs(a, 3)} s with it "
                               f"({(b - a) / a:+.1%}), one run each: the cost of the 20 BatchNorm layers on this machine, "
                               f"plus run-to-run noise (other load on the machine shows up here too)."))

    def draw(fig: Any) -> None:
        _curves(fig, [(lab, r) for lab, r in (("BN", bn), ("no BN", nobn)) if r], "C7")

    blocks += [rc.plot("c7_batchnorm", "C7 with and without BatchNorm", draw, size=(10, 4)), runs_para(entry)]
    return blocks


def render_c8(entry: dict[str, Any], rc: ReportContext) -> list[Block]:
    res = entry.get("result", {})
    if res.get("skipped"):
        return [Note(f"Skipped: {res['skipped']}."), Para(f"{REF}: {REFERENCE['c8']}.")]
    runs = runs_of(entry)
    eager = run_named(entry, "eager")
    n = res.get("epochs", 0)
    first_steady = n // 2 + 1  # the lab: epochs 6-10 of 10

    def steady(r: dict[str, Any]) -> float | None:
        return mean([x["epoch_s"] for x in ok_records(r) if x["epoch"] >= first_steady])

    base = steady(eager) if eager else None
    rows = []
    for r in runs:
        recs = ok_records(r)
        st = steady(r)
        rows.append([r["label"], fs(recs[0]["epoch_s"], 3) if recs else "n/a", fs(st, 3),
                     f"{base / st:.2f}x" if _finite(base) and _finite(st) and st else "n/a", r["status"]])
    for mode, err in res.get("failures", {}).items():
        rows.append([f"compile-{mode}", "n/a", "n/a", "n/a", f"failed: {err}"])
    blocks: list[Block] = [
        pipelines_para(entry, rc.doc),
        Table(["mode", "first epoch s (incl. compilation)", f"steady s/epoch (epochs {first_steady}-{n})",
               "steady speed-up vs eager", "status"], rows, csv="c8_compile"),
        Para(f"{REF}: {REFERENCE['c8']}. The first epoch pays tracing and code generation (and, for "
             f"reduce-overhead, CUDA-graph capture); steady epochs run the fused kernels."),
    ]
    if res.get("failures"):
        blocks.append(Note("Compile failed for: " + "; ".join(f"{m} ({e})" for m, e in res["failures"].items())))

    def draw(fig: Any) -> None:
        ax = fig.subplots()
        labels = [r["label"] for r in runs]
        firsts = [ok_records(r)[0]["epoch_s"] if ok_records(r) else 0.0 for r in runs]
        steadies = [steady(r) or 0.0 for r in runs]
        xs = range(len(labels))
        ax.bar([x - 0.2 for x in xs], firsts, width=0.4, label="first epoch")
        ax.bar([x + 0.2 for x in xs], steadies, width=0.4, label="steady epoch")
        ax.set_xticks(list(xs), labels, fontsize=7)
        ax.set(ylabel="seconds", title="C8 torch.compile")
        ax.legend(fontsize=7)

    if runs:
        blocks.append(rc.plot("c8_compile", "C8 first vs steady epoch per compile mode", draw, size=(6, 3.6)))
    blocks.append(runs_para(entry))
    return blocks


def render_q(entry: dict[str, Any], rc: ReportContext) -> list[Block]:
    res = entry["result"]
    f, nb = res["facts"], res["facts_no_bn"]
    answers = {q.split()[0]: a for q, a in res["answers"]}
    by_kernel = ", ".join(f"{v} x {k}" for k, v in f["conv_layers_by_kernel"].items())
    sgd, adam = f["optimizers"]["sgd"], f["optimizers"]["adam"]

    def grad_rows(o: dict[str, Any], ref_nonzero: int) -> list[list[Any]]:
        return [
            ["trainable parameters", num(o["trainable_parameters"]), f"{num(REFERENCE['q3_params'])} (= our count without BN)"],
            ["gradient elements (after a real backward)", num(o["gradient_elements"]), ""],
            ["gradient tensors", num(o["gradient_tensors"]), ""],
            [f"non-zero gradient elements (batch of {o['backward_batch_size']})", num(o["gradient_nonzero_elements"]),
             num(ref_nonzero)],
            ["optimizer state elements", f"{num(o['optimizer_state_elements'])} ({o['optimizer_state_per_parameter']:.0f}x parameters)", ""],
        ]

    return [
        Heading("Q1 Convolutional layers", 3),
        Table(["fact", "ours"], [["Conv2d modules", f["conv_layers"]], ["by kernel", by_kernel],
                                 ["BatchNorm2d layers", f["batchnorm_layers"]]], csv="q1_convs"),
        Para(answers.get("Q1", "")),
        Heading("Q2 Input size of the last linear layer", 3),
        Table(["fact", "ours"], [["last Linear in_features", f["last_linear_in_features"]],
                                 ["last Linear out_features", f["last_linear_out_features"]]], csv="q2_linear"),
        Para(answers.get("Q2", "")),
        Heading("Q3 Parameters and gradients with SGD", 3),
        Table(["fact", "ours", REF], grad_rows(sgd, REFERENCE["q3_nonzero_grads"]), csv="q3_sgd"),
        Para(answers.get("Q3", "") + f" Without BatchNorm (C7's model): {num(nb['trainable_parameters'])} "
             f"parameters (so as many gradient elements), which is the reference's "
             f"parameter count. Forward cost: {f['forward_flops_per_image'] / 1e9:.3f} GFLOP per image."),
        Heading("Q4 Parameters and gradients with Adam", 3),
        Table(["fact", "ours", REF], grad_rows(adam, REFERENCE["q4_nonzero_grads"]), csv="q4_adam"),
        Para(answers.get("Q4", "") + " The reference's 8,920,240 vs 8,896,249 are counts of non-zero entries, which "
             "depend on the batch (dead ReLUs), not on the optimizer; the number of gradient elements is the "
             "number of parameters for every optimizer."),
    ]


# ----------------------------------------------------------------------------------- the document


def generic_blocks(entry: dict[str, Any]) -> list[Block]:
    """Sections that did not complete (not run, interrupted, failed) or whose renderer is missing."""
    status = entry.get("status", "not run")
    blocks: list[Block] = []
    if status == "not run":
        blocks.append(Note("Not run: the lab stopped before this experiment (or it was not selected)."))
    elif status == "interrupted":
        blocks.append(Note("Interrupted (Ctrl-C): the runs that finished are listed; the rest did not run."))
    elif status == "failed":
        blocks.append(Note(f"Failed: {entry.get('error')}. The other experiments went on."))
    else:
        blocks.append(Note("No renderer is installed for this section; its results are in results.json."))
    rows = [[r["label"], r["status"], r["summary"].get("epochs_completed", 0), fs(r["summary"].get("mean_epoch_s"), 3),
             pct(r["summary"].get("final_train_acc"))] for r in runs_of(entry)]
    if rows:
        blocks.append(Table(["run", "status", "epochs", "mean epoch s", "final train top-1"], rows))
    return blocks


def header_blocks(doc: dict[str, Any]) -> list[Block]:
    m = doc.get("machine", {})
    p = doc.get("preset", {})
    blocks: list[Block] = [Heading(f"cifarlab {doc.get('suite', 'lab')} report", 1)]
    if doc.get("data", {}).get("source") == "synthetic":
        blocks.append(Note(f"**{doc['data']['banner']}**"))
    blocks += [
        Table(["", ""], [
            ["status", f"{doc.get('status')} (started {doc.get('started')}, finished {doc.get('finished')}, "
                       f"{fs(doc.get('elapsed_s'), 0)} s)"],
            ["preset", f"{p.get('name')}: {p.get('about')}"],
            ["runs", f"{p.get('epochs')} epoch(s), batch {p.get('batch_size')}, "
                     f"{doc.get('data', {}).get('train_images')} train / {doc.get('data', {}).get('test_images')} test images"
                     + (f", at most {p['max_steps']} steps per epoch" if p.get("max_steps") else "")],
            ["data", doc.get("data", {}).get("description", "?")],
            ["device", doc.get("device", "?")],
            ["CPU", f"{m.get('cpu_model')}; {m.get('usable_cpus', m.get('cpu_count_usable'))} usable of "
                    f"{m.get('cpu_count_host')} cores; {m.get('torch_threads')} torch threads"],
            ["GPU", f"{m.get('gpu_name')} (x{m.get('gpu_count')})" if m.get("gpu_name") else "none"],
            ["software", f"torch {m.get('torch')} (CUDA {m.get('cuda_version')}), torchvision {m.get('torchvision')}, "
                         f"Python {m.get('python')}, {m.get('platform')}"],
            ["fast path", "device-resident loader" if doc.get("fast_loader") == "device"
             else "not installed: classic loader used where the fast path was meant"],
        ]),
        Para(f"Timings are seconds of wall-clock time, the device synchronized before each clock read; evaluation "
             f"is never inside an epoch. The '{REF}' column holds a seed report's figures for orientation only."),
    ]
    return blocks


def build_blocks(lab_dir: Path, doc: dict[str, Any]) -> tuple[list[Block], ReportContext]:
    from cifarlab.experiments import EXPERIMENTS, load_plugins

    load_plugins()
    rc = ReportContext(lab_dir=lab_dir, doc=doc)
    blocks = header_blocks(doc)
    for key in doc.get("order", []):
        entry = doc["experiments"].get(key, {"status": "not run"})
        exp = EXPERIMENTS.get(key)
        blocks.append(Heading(entry.get("title", key.upper())))
        if exp is not None and entry.get("status") in ("completed", "skipped"):
            blocks += exp.render(entry, rc)
        else:
            blocks += generic_blocks(entry)
    return blocks, rc


def load_results(lab_dir: Path) -> dict[str, Any]:
    path = Path(lab_dir) / "results.json"
    if not path.is_file():
        raise UsageError(f"{str(lab_dir)!r} is not a lab folder (no results.json); give a folder made by 'cifarlab lab'")
    try:
        doc = read_json(path)
    except (OSError, ValueError) as e:
        raise UsageError(f"{path} cannot be read ({e}); the lab folder is damaged") from None
    if not isinstance(doc, dict) or doc.get("schema") not in SUPPORTED_SCHEMAS:
        raise UsageError(f"{path} has schema {doc.get('schema') if isinstance(doc, dict) else None!r}; "
                         f"this cifarlab reads {', '.join(SUPPORTED_SCHEMAS)}")
    return doc


def build_report(lab_dir: Path) -> dict[str, Path]:
    """results.json -> report.md, report.html, csv/*.csv, plots/*.png. Returns the written paths."""
    lab_dir = Path(lab_dir)
    doc = load_results(lab_dir)
    blocks, rc = build_blocks(lab_dir, doc)
    (lab_dir / "csv").mkdir(exist_ok=True)
    for b in blocks:
        if isinstance(b, Table) and b.csv:
            write_csv_atomic(lab_dir / "csv" / f"{b.csv}.csv",
                             [dict(zip(b.columns, (_plain(c) for c in row))) for row in b.rows])
    write_text_atomic(lab_dir / "report.md", to_markdown(blocks))
    write_text_atomic(lab_dir / "report.html", to_html(blocks, lab_dir))
    return {"md": lab_dir / "report.md", "html": lab_dir / "report.html"}


# ------------------------------------------------------------------------------------- md / html


def _plain(value: Any) -> Any:
    return value.replace("`", "").replace("**", "") if isinstance(value, str) else value


def _md_cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def to_markdown(blocks: list[Block]) -> str:
    out: list[str] = []
    for b in blocks:
        if isinstance(b, Heading):
            out.append(f"{'#' * b.level} {b.text}")
        elif isinstance(b, Para):
            out.append(b.text)
        elif isinstance(b, Note):
            out.append(f"> {b.text}")
        elif isinstance(b, Bullets):
            out.append("\n".join(f"- {i}" for i in b.items))
        elif isinstance(b, Table):
            lines = ["| " + " | ".join(_md_cell(c) for c in b.columns) + " |",
                     "|" + "|".join(" --- " for _ in b.columns) + "|"]
            lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in b.rows]
            out.append("\n".join(lines))
        elif isinstance(b, Image):
            out.append(f"![{b.alt}]({b.file})")
        elif isinstance(b, Code):
            out.append(f"```\n{b.text}\n```")
    return "\n\n".join(out) + "\n"


def _inline(text: str) -> str:
    t = html.escape(str(text))
    t = re.sub(r"`([^`]+)`", r"<code>\1</code>", t)
    return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", t)


CSS = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;line-height:1.45}"
       "table{border-collapse:collapse;margin:.8em 0;font-size:.9em}td,th{border:1px solid #ccc;padding:3px 8px;"
       "text-align:left}th{background:#f3f3f3}blockquote{border-left:4px solid #d80;background:#fff7e6;margin:1em 0;"
       "padding:.5em 1em}img{max-width:100%}code{background:#f4f4f4;padding:0 3px}")


def to_html(blocks: list[Block], lab_dir: Path) -> str:
    body: list[str] = []
    for b in blocks:
        if isinstance(b, Heading):
            body.append(f"<h{b.level}>{_inline(b.text)}</h{b.level}>")
        elif isinstance(b, Para):
            body.append(f"<p>{_inline(b.text)}</p>")
        elif isinstance(b, Note):
            body.append(f"<blockquote>{_inline(b.text)}</blockquote>")
        elif isinstance(b, Bullets):
            body.append("<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in b.items) + "</ul>")
        elif isinstance(b, Table):
            head = "".join(f"<th>{_inline(c)}</th>" for c in b.columns)
            rows = "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in row) + "</tr>" for row in b.rows)
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        elif isinstance(b, Image):
            data = base64.b64encode((lab_dir / b.file).read_bytes()).decode("ascii")
            body.append(f'<p><img alt="{html.escape(b.alt)}" src="data:image/png;base64,{data}"></p>')
        elif isinstance(b, Code):
            body.append(f"<pre>{html.escape(b.text)}</pre>")
    title = next((b.text for b in blocks if isinstance(b, Heading)), "cifarlab report")
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")
