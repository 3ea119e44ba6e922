"""E: export C1's trained ResNet-18 for inference and time it. The model is C1's run (its last-epoch
checkpoint; when C1 did not run in this lab, E trains C1's configuration itself and says so). Each format
(TorchScript traced and scripted, torch.export, ONNX when its extras are installed) is written, reloaded
from disk and compared with eager on fixed test images (`export.export_model`); the graphs are quoted; the
latency per batch of eager vs every reloaded artifact is measured on the CPU, and on CUDA when the lab runs
there (`inferbench.bench`). Files: <lab>/e/export/ (artifacts, graph texts, export.json) and
<lab>/e/inferbench/ (rows as json/csv/txt and a plot)."""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass
from typing import Any

import torch

from cifarlab.core.errors import UsageError
from cifarlab.export import artifacts as ex
from cifarlab.export import bench as ib
from cifarlab.export.check import compare, verdict
from cifarlab.lab.context import Experiment, LabContext, LabInterrupted, PlannedRuns, c1_config
from cifarlab.lab.sections import pipelines_para, runs_para
from cifarlab.report.blocks import Block, Code, Note, Para, Table, fs, pct, runs_of
from cifarlab.report.plots import ReportContext
from cifarlab.run.checkpoint import CHECKPOINT_NAME

EXCERPT_LINES = 12
EXCERPT_LINE_CHARS = 160  # torch.export's signature line lists every parameter: thousands of characters
FORMAT_TITLES = {"torchscript-trace": "TorchScript, traced", "torchscript-script": "TorchScript, scripted",
                 "export": "torch.export (ExportedProgram)", "onnx": "ONNX", "aoti": "AOTInductor package"}


@dataclass(frozen=True)
class ESettings:
    """How much E measures per preset (the export itself is the same in every preset)."""

    check_images: int  # test images every reloaded artifact is compared on
    batch_sizes: tuple[int, ...]
    iters: int  # timed calls per variant and batch size (fewer when budget_s runs out, at least 5)
    warmup: int
    budget_s: float
    formats: tuple[str, ...] | None  # None: export's defaults (ONNX only when its extras are installed)


SETTINGS: dict[str, ESettings] = {
    # CI: the three formats that need no extras and no compiler (ONNX and AOTInductor take tens of seconds)
    "smoke": ESettings(8, (1, 8), 3, 1, 0.5, ("torchscript-trace", "torchscript-script", "export")),
    # batch 32, not the test batch of 100: on 2 CPU cores a call at 100 takes ~0.6 s, and 5 variants x 7 calls of
    # it were 21 s of a quick lab that must stay under 3 minutes; the full preset times 1, 100 and 128.
    "quick": ESettings(64, (1, 32), 10, 2, 0.5, None),
    "full": ESettings(ex.CHECK_IMAGES, ib.DEFAULT_BATCH_SIZES, ib.DEFAULT_ITERS, ib.DEFAULT_WARMUP,
                      ib.DEFAULT_BUDGET_S, None),
}


def trained_run(ctx: LabContext) -> tuple[dict[str, Any], str]:
    """(run info, where the model came from): C1's run when it finished in this lab with its checkpoint,
    otherwise a run of C1's configuration trained here (into <lab>/e/)."""
    for info in ctx.runs.get("c1", []):
        if info["status"] == "completed" and (ctx.lab_dir / info["path"] / CHECKPOINT_NAME).is_file():
            return info, "c1"
    why = "C1 did not run in this lab" if "c1" not in ctx.runs else "C1's run left no checkpoint"
    info = ctx.train("e", "c1-config", c1_config(ctx), reuse=False)  # reuse=False: a checkpoint is needed
    return info, f"{why}, so E trained C1's configuration itself"


def _clip(text: str) -> tuple[str, str]:
    """(header comment, the first EXCERPT_LINES lines of the first function) of a graph text file."""
    lines = text.splitlines()
    header = lines.pop(0)[2:] if lines and lines[0].startswith("# ") else ""
    body: list[str] = []
    for line in lines:
        if line.startswith("# ") or len(body) == EXCERPT_LINES:  # "# name": the next function's code
            break
        body.append(line if len(line) <= EXCERPT_LINE_CHARS else line[:EXCERPT_LINE_CHARS] + " ...")
    return header, "\n".join(body)


def _cuda_check(variants: list[ib.Variant], device: torch.device, x: torch.Tensor) -> dict[str, Any]:
    """Each artifact reloaded on the GPU against eager on the GPU (export_model checked them on the CPU)."""
    mine = {v.name: v for v in variants if v.device == device}
    xd = x.to(device)
    with torch.no_grad():
        reference = mine["eager"].fn(xd).float().cpu()
    return {name: compare(v.fn, xd, reference, "cuda") for name, v in mine.items()
            if v.precision == "fp32" and name != "eager"}


def e_export(ctx: LabContext) -> dict[str, Any]:
    s = SETTINGS.get(ctx.preset.name, SETTINGS["full"])
    info, origin = trained_run(ctx)
    base = {"model_from": "c1" if origin == "c1" else "e", "origin": origin, "run_path": info["path"],
            "run_label": info["label"], "final_train_acc": info["summary"].get("final_train_acc"),
            "final_test_acc": info["summary"].get("final_test_acc"), "settings": asdict(s)}
    try:
        model, source = ex.load_run_model(ctx.lab_dir / info["path"])
    except UsageError as e:  # no checkpoint (the run stopped early) or NaN weights (it diverged)
        return {**base, "skipped": True, "reason": str(e)}
    formats, skipped = (list(s.formats), {}) if s.formats else ex.parse_formats(None)
    x, described = ex.check_batch(source, s.check_images)
    out = ctx.lab_dir / "e"
    try:
        report = ex.export_model(model, out / "export", formats, x, device="cpu", source=source,
                                 check_images=described, skipped=skipped, raise_on_mismatch=False)
    except UsageError as e:  # the lab goes on with its other items (a UsageError would stop the lab)
        raise RuntimeError(str(e)) from None
    for fmt, art in report["artifacts"].items():  # one console line per format: E is otherwise silent for its minute
        check = art["check"]
        ctx.note(f"{FORMAT_TITLES.get(fmt, fmt)}: written in {art['export_s']:.2f} s, reloaded and checked in "
                 f"{art['reload_and_check_s']:.2f} s, max |logit diff| {check['max_abs_logit_diff']:.1e} against a "
                 f"per-logit tolerance of {check.get('tolerance_relative', 0):g} * |logit| + {check['tolerance_abs']:g}: "
                 f"{verdict(check)}")
    excerpts = {}
    for fmt in formats:
        if report["artifacts"][fmt]["graph_file"]:
            header, body = _clip(ex.graph_excerpt(out / "export", fmt, 4 * EXCERPT_LINES))
            excerpts[fmt] = {"file": report["artifacts"][fmt]["graph_file"], "header": header, "text": body}
    if ctx.should_stop():  # Ctrl-C during the export: the files are written, the timing is not started
        raise LabInterrupted("e: latency not measured")
    devices = [torch.device("cpu")] + ([torch.device(ctx.device)] if ctx.device.type == "cuda" else [])
    variants: list[ib.Variant] = []
    not_timed: dict[str, dict[str, str]] = {}
    for d in devices:
        found, not_timed[str(d)] = ib.make_variants(model, d, out / "export")
        variants += found
    cuda_check = _cuda_check(variants, devices[-1], x) if len(devices) > 1 else None
    ctx.note(f"latency: {len(variants)} variant(s) on {', '.join(str(d) for d in devices)}, batch "
             f"{', '.join(map(str, s.batch_sizes))}")
    rows = ib.bench(variants, s.batch_sizes, iters=s.iters, warmup=s.warmup, budget_s=s.budget_s, seed=ctx.base.seed)
    for (device, batch), group in itertools.groupby(rows, key=lambda r: (r["device"], r["batch_size"])):
        ctx.note(f"{device} batch {batch}, p50 per call: " + ", ".join(
            f"{r['variant']} {r['p50_ms']:.2f} ms" if r.get("p50_ms") else f"{r['variant']} {r['status']}" for r in group))
    (out / "inferbench").mkdir(parents=True, exist_ok=True)
    ib.write_outputs(rows, out / "inferbench", {
        "source": source, "settings": {**asdict(s), "timing": ib.TIMING_NOTE},
        "variants": [{"device": str(v.device), "name": v.name, "precision": v.precision, "note": v.note} for v in variants],
        "skipped": not_timed})
    keep = ("status", "torch", "device", "formats", "skipped", "input", "check", "artifacts", "tracing_vs_scripting")
    return {**base, "checkpoint_epoch": source["epoch"], "check_images": described,
            "export": {k: report[k] for k in keep if k in report}, "excerpts": excerpts, "cuda_check": cuda_check,
            "latency": {"rows": rows, "not_timed": not_timed, "timing": ib.TIMING_NOTE}}


# ------------------------------------------------------------------------------------------ report


def _diff(x: Any) -> str:
    return f"{x:.2e}" if isinstance(x, (int, float)) else "n/a"


def format_blocks(res: dict[str, Any]) -> list[Block]:
    exp = res["export"]
    n = exp["input"]["example_batch"]
    rows = []
    for fmt in exp["formats"]:
        a = exp["artifacts"][fmt]
        c = a["check"]
        rows.append([FORMAT_TITLES.get(fmt, fmt), f"`{a['file']}`", f"{a['bytes'] / 2**20:.1f}",
                     _diff(c["max_abs_logit_diff"]), _diff(c["batch1_max_abs_logit_diff"]),
                     f"{c['top1_agree']}/{c['images']}", "yes" if a["dynamic_batch"] else "no",
                     fs(a["export_s"], 1), verdict(c)])
    for fmt, why in exp["skipped"].items():
        rows.append([FORMAT_TITLES.get(fmt, fmt), "", "", "", "", "", "", "", f"not exported: {why}"])
    chk = exp["check"]
    blocks: list[Block] = [
        Table(["format", "file", "size MiB", f"max abs logit diff vs eager (batch {n})", "same at batch 1",
               "top-1 agreement", "any batch size", "export s", "check"], rows, csv="e_formats"),
        Para(f"Each file was reloaded from disk and run on {res['check_images']} next to the eager model "
             f"({exp['device']}, torch {exp['torch']}). Rule: {chk['rule']} (here {chk['tolerance_abs']:.2g}). "
             + {"ok": "Every format passed.", "inconclusive": "**Inconclusive**: the eager model's logits are non-finite "
                "or absurdly large (a diverged or barely trained model), so no tolerance can tell a correct export from "
                "a wrong one."}.get(exp["status"], "**At least one format differs from eager beyond the tolerance** "
                                                   "(its files are kept for inspection).")),
    ]
    cuda = res.get("cuda_check")
    if cuda:
        blocks.append(Table(["format (reloaded on the GPU)", "max abs logit diff vs eager on the GPU", "same at batch 1",
                             "top-1 agreement", "tolerance", "check"],
                            [[FORMAT_TITLES.get(name, name), _diff(c["max_abs_logit_diff"]), _diff(c["batch1_max_abs_logit_diff"]),
                              f"{c['top1_agree']}/{c['images']}", f"{c['tolerance_abs']:.2g}", verdict(c)]
                             for name, c in cuda.items()], csv="e_formats_cuda"))
    return blocks


def tracing_blocks(res: dict[str, Any]) -> list[Block]:
    exp = res["export"]
    facts = exp.get("tracing_vs_scripting")
    text = facts["explanation"] if facts else ex.TRACING_VS_SCRIPTING
    blocks: list[Block] = [Para(f"**Tracing vs scripting.** {text}")]
    if facts:
        t, s = facts["traced_train_mode_max_abs_logit_change"], facts["scripted_train_mode_max_abs_logit_change"]
        verdict = ("as expected: tracing froze eval mode, scripting kept the switch" if t == 0 and s > 0
                   else "not what the explanation predicts; see e/export/export.json")
        blocks.append(Para(f"Measured on this model: after `.train()`, the traced module's logits changed by at most "
                           f"{t:.3g} and the scripted module's by {s:.3g} ({verdict})."))
    if "export" in exp["artifacts"]:
        dyn = "kept the batch dimension symbolic (1..4096; it ran at batch 1 too)" if exp["artifacts"]["export"]["dynamic_batch"] \
            else "did not accept batch 1"
        blocks.append(Para(f"`torch.export` captures the graph like tracing (one eval-mode call: BatchNorm becomes an aten "
                           f"op with its training flag fixed, no Python control flow survives) but through TorchDynamo, "
                           f"with shapes checked by guards; here it {dyn}."))
    for fmt, e in res["excerpts"].items():
        blocks += [Para(f"{FORMAT_TITLES.get(fmt, fmt)}: the first lines of `e/export/{e['file']}`"
                        + (f" ({e['header']})" if e["header"] else "") + ":"), Code(e["text"])]
    return blocks


def _draw_latency(fig: Any, rows: list[dict[str, Any]]) -> None:
    ok, devices, colour = ib.latency_groups(rows)
    for ax, device in zip(fig.subplots(1, len(devices), squeeze=False)[0], devices):
        mine = [r for r in ok if r["device"] == device]
        ib.variant_bars(ax, mine, "p50_ms", colour, error_to="p95_ms")
        ax.set(ylabel="ms per batch (p50, bar to p95)", title=f"E latency on {device}", yscale="log" if mine else "linear")
        ax.grid(axis="y", alpha=0.3)
        if mine:
            ax.legend(fontsize=7)


def latency_blocks(res: dict[str, Any], rc: ReportContext) -> list[Block]:
    lat, s = res["latency"], res["settings"]
    rows = []
    for r in lat["rows"]:
        if r.get("p50_ms") is None:
            rows.append([r["device"], r["variant"], r["precision"], r["batch_size"], "", "", "", "", "", "", r["status"]])
            continue
        speedup = r.get("speedup_vs_eager_p50")
        rows.append([r["device"], r["variant"], r["precision"], r["batch_size"], r["iters"], fs(r["first_call_ms"], 1),
                     fs(r["p50_ms"]), fs(r["p95_ms"]), fs(r["p99_ms"]), f"{r['images_per_s']:,.0f}",
                     f"{speedup:.2f}x" if speedup else ""])
    blocks: list[Block] = [
        Para(f"**Latency.** {lat['timing'][0].upper()}{lat['timing'][1:]}. Batch sizes "
             f"{', '.join(map(str, s['batch_sizes']))}; {s['warmup']} warm-up call(s), then up to {s['iters']} timed calls "
             f"per variant (fewer once {s['budget_s']:g} s per variant is used up, at least {min(ib.MIN_ITERS, s['iters'])})."
             + (" Smoke preset: a handful of calls, so these figures mean little." if s["iters"] < ib.MIN_ITERS else "")),
        Table(["device", "variant", "precision", "batch", "calls timed", "first call ms", "p50 ms", "p95 ms", "p99 ms",
               "images/s", "p50 speedup vs eager"], rows, csv="e_latency"),
    ]
    for device, skipped in lat["not_timed"].items():
        if skipped:
            blocks.append(Para(f"Not timed on {device}: " + "; ".join(f"{k} ({v})" for k, v in skipped.items()) + "."))
    ok = [r for r in lat["rows"] if r.get("p50_ms") is not None]
    for device in dict.fromkeys(r["device"] for r in ok):
        biggest = max(r["batch_size"] for r in ok if r["device"] == device)
        best = min((r for r in ok if r["device"] == device and r["batch_size"] == biggest), key=lambda r: r["p50_ms"])
        blocks.append(Para(f"On {device} at batch {biggest} the fastest was {best['variant']} ({fs(best['p50_ms'])} ms p50, "
                           f"{best['images_per_s']:,.0f} images/s, {best.get('speedup_vs_eager_p50') or 0:.2f}x eager's p50)."))
    blocks.append(rc.plot("e_latency", "E inference latency per batch", lambda fig: _draw_latency(fig, lat["rows"]),
                          size=(6 * max(1, len({r['device'] for r in ok})), 3.8)))
    return blocks


def render_e(entry: dict[str, Any], rc: ReportContext) -> list[Block]:
    res = entry["result"]
    model = (f"Model: C1's run `{res['run_path']}`" if res["model_from"] == "c1"
             else f"Model: {res['origin']}: `{res['run_path']}`")
    if res.get("skipped"):
        return [Note(f"Skipped: {res['reason']}"), Para(model + ".")]
    blocks: list[Block] = [Para(f"{model}, its checkpoint after epoch {res['checkpoint_epoch']} (train top-1 "
                                f"{pct(res['final_train_acc'])}, test top-1 {pct(res['final_test_acc'])}), exported in "
                                f"eval mode into `e/export/` (export.json beside the files).")]
    if runs_of(entry):
        blocks.append(pipelines_para(entry, rc.doc))
    blocks += format_blocks(res) + tracing_blocks(res) + latency_blocks(res, rc)
    if runs_of(entry):
        blocks.append(runs_para(entry))
    return blocks


ITEM = Experiment("e", "E Export and inference", e_export, render_e, lambda preset, cuda: 0,
                  plan=lambda ctx: [PlannedRuns("none", 0, 0, evaluate=False,
                                                note="export + latency, not estimated; trains C1's config "
                                                     "first when C1 is not in this lab")])
