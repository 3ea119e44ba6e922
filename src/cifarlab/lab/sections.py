"""Report pieces every lab section shares: the seed report's reference figures, the pipeline sentence
and the run-folder list of a section."""

from __future__ import annotations

from typing import Any

from cifarlab.report.blocks import Block, Note, Para, Table, finite, pct, runs_of
from cifarlab.report.plots import ReportContext

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


# A run that sees fewer training images than this (a fifth of one CIFAR-10 epoch, ~80 steps of batch 128)
# is too short for its accuracy to mean anything: the report says so once instead of flagging every run.
SHORT_RUN_IMAGES = 10_000


def short_runs(doc: dict[str, Any]) -> bool:
    """True for labs whose runs are too short to learn (decided from the run size stored in results.json;
    labs written before it was stored: False, their report unchanged)."""
    size = doc.get("run_size") or {}
    return size.get("images_per_run") is not None and size["images_per_run"] < SHORT_RUN_IMAGES


def short_run_note(doc: dict[str, Any]) -> list[Block]:
    if not short_runs(doc):
        return []
    size = doc["run_size"]
    return [Note(f"**Accuracies here cannot mean anything.** Each run sees {size['images_per_run']:,} training "
                 f"images ({size['steps_per_run']} optimizer steps) in the {doc.get('preset', {}).get('name')} "
                 f"preset, below the {SHORT_RUN_IMAGES:,} images (a fifth of one CIFAR-10 epoch) this report "
                 f"requires: ResNet-18 from a random start stays near chance (10%) for far more steps than that, "
                 f"so a top-1 near 10% says nothing about the optimizer or the model, and no run is flagged "
                 f"'stuck at chance'. Losses, divergence (NaN/inf) and the timings are still real.")]


def c6_flag(run: dict[str, Any], chance_margin: float, short: bool = False) -> str:
    """'diverged at ...', 'stuck at chance' (not for runs too short to learn) or '' -- computed from the
    records, never assumed."""
    recs = run.get("records", [])
    bad = next((r for r in recs if r.get("status") == "diverged"), None)
    if run.get("status") == "diverged" or bad is not None:
        where = f" at epoch {bad['epoch']}, step {bad.get('diverged_step')}" if bad else ""
        return f"DIVERGED (NaN/inf loss{where})"
    acc = run.get("summary", {}).get("final_train_acc")
    if not short and finite(acc) and acc < 0.10 + chance_margin:
        return f"stuck at chance (train top-1 {pct(acc)} < {pct(0.10 + chance_margin)})"
    return ""


def measured_table(entry: dict[str, Any], rc: ReportContext, about: str, columns: list[str], rows: list[list[Any]],
                   csv: str) -> list[Block]:
    """A section's opening: the pipeline sentence, what was measured and how, then the measured table."""
    return [pipelines_para(entry, rc.doc), Para(about), Table(columns, rows, csv=csv)]
