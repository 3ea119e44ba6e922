"""S5: large-batch accuracy: the largest batch on all devices vs the baseline, linear LR scaling, warm-up."""

from __future__ import annotations

from typing import Any

from cifarlab.config import SCALING_PRESETS, LabPreset
from cifarlab.lab.context import Experiment, LabContext
from cifarlab.lab.scaling.common import process_counts, run_train, spreset
from cifarlab.lab.scaling.s1_batch import s1_points
from cifarlab.lab.sections import pipelines_para, runs_para
from cifarlab.report.blocks import Note, Para, Table, fs, pct, runs_of
from cifarlab.report.plots import ReportContext
from cifarlab.report.plots import curves as plot_curves


def s5_large_batch(ctx: LabContext) -> dict[str, Any]:
    sp = spreset(ctx)
    s1 = s1_points(ctx, "s5")
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
    # whole epochs (max_steps=None): a per-epoch step cap inherited from the lab preset would give every run the
    # same steps, so the large batch would see k times the images instead of taking k times fewer steps
    cfg = ctx.fast(ctx.base).replace(dataset=ctx.data.source, subset=images, epochs=sp.large_epochs, evaluate=True,
                                     checkpoint_every=0, sync_timing=False, max_steps=None)
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
        run_train(ctx, "s5", label, c, nproc=procs)
        runs.append({"role": role, "label": label})
    return {"runs": runs, "nproc": n, "per_device_batch": batch, "global_batch": global_batch,
            "baseline_batch": sp.baseline_batch, "k": k, "base_lr": base_lr, "scaled_lr": base_lr * k,
            "warmup_epochs": sp.warmup_epochs, "warmup_start_lr": base_lr * k * min(1.0, 1 / k),
            "epochs": sp.large_epochs, "train_images": n_train, "note": note}


def render_s5(entry: dict[str, Any], rc: ReportContext) -> list[Any]:
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
        pipelines_para(entry, rc.doc),
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
                       lambda fig: plot_curves(fig, curves, "s5"), size=(9, 3.6)), runs_para(entry)]
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


def planned_epochs(p: LabPreset, cuda: bool) -> int:
    return 4 * SCALING_PRESETS.get(p.name, SCALING_PRESETS["quick"]).large_epochs


ITEM = Experiment("s5", "S5 Large-batch accuracy, linear LR scaling and warm-up", s5_large_batch, render_s5, planned_epochs)
