"""The doctor's verdicts and outputs: repeat statistics, noise and ranking of the measured changes,
then the console table, doctor.json (schema "cifarlab.doctor/1"), doctor.md and the before/after
step-time chart, in a new run-style folder."""

from __future__ import annotations

import io
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cifarlab.config import TrainConfig
from cifarlab.core.fileio import write_bytes_atomic, write_json_atomic, write_text_atomic
from cifarlab.core.folders import create_run_dir, utc_now
from cifarlab.core.signals import Stopped
from cifarlab.doctor.advice import PARTS, THRESHOLDS, Candidate, Diagnosis, Measurement, pct
from cifarlab.model.utilization import Utilization
from cifarlab.report.plots import pyplot

UNKNOWN_NOISE_SHARE = 0.10  # noise assumed when the baseline has a single repeat
MIN_NOISE_SHARE = 0.03  # a gain must beat the baseline's repeat spread, and never less than 3%
DOCTOR_SCHEMA = "cifarlab.doctor/1"
CHART_NAME = "doctor_step_split.png"

MEASUREMENT_NOTES: dict[str, str] = {
    "windows": "the timed windows, each engine.train_epoch itself on a fresh seeded model after untimed warm-up "
               "step(s): 'start' = the first steps of a new epoch (creating the loader's iterator, i.e. starting "
               "its workers, and their first batches included, as in a real epoch), 'steady' = the steps right "
               "after it on the same iterator; weight = how many times a full epoch holds that window",
    "epoch_s": "estimated training epoch: start window + steady window x its weight (exact, weight 1, when the two "
               "windows are the whole epoch); evaluation never inside",
    "data_s": "blocked waiting for the next batch (iterator creation included), excl. the host-to-device copy",
    "h2d_s": "host-to-device copy of the batch (and channels_last re-layout), device synchronized; "
             "null without sync timing",
    "compute_s": "zero_grad + forward + loss + backward + optimizer step, device synchronized; null without sync timing",
    "other_s": "epoch_s minus the parts above: loss/accuracy bookkeeping between steps",
    "step_ms": "epoch_s / steps per epoch; data + h2d + compute + other add up to it",
    "images_per_s": "training images per epoch / epoch_s; candidates are ranked by it",
    "loader_start_s": "creating the loader's iterator at the start window (part of data_s)",
    "process_cpu_s": "CPU time of the training process (all its threads) during the timed windows (timed_s)",
    "workers_cpu_s": "CPU time of the loader worker processes during the timed windows (null: no workers, or unreadable)",
    "peak_memory_bytes": "CUDA: torch.cuda.max_memory_allocated over the timed windows; CPU: the process's peak RSS "
                         "so far (a high-water mark that includes the dataset and earlier measurements)",
    "dispatch_us": "median CPU time (thread time) of one trivial CPU torch op (x.add_(1) on one element), measured "
                   "right after the windows: the host's per-op floor",
    "main_run_s": "the main (training) thread's time on a CPU during the timed windows (/proc schedstat)",
    "main_wait_s": "the main thread's time runnable but waiting for a CPU held by other threads or processes",
    "step_cpu_ms": "process CPU time per timed step per training thread (compared with dispatch_us for launch/host-bound)",
    "gpu_busy_s": "CUDA only: union of GPU kernel/memcpy intervals per torch.profiler over a separate profiled "
                  "window, scaled to the epoch's steps",
}


@dataclass
class Summary:
    repeats: int
    images_per_s_median: float
    images_per_s_min: float
    images_per_s_max: float
    step_ms_median: float
    parts_ms: dict[str, float | None]  # per-step median of each part

    @property
    def spread_share(self) -> float:
        return (self.images_per_s_max - self.images_per_s_min) / self.images_per_s_median

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "spread_share": self.spread_share}


@dataclass
class DoctorResult:
    config: TrainConfig
    device: str
    environment: dict[str, Any]
    data_description: str
    budget_s: float
    steps: int
    warmup_steps: int
    repeats: int
    baseline: list[Measurement]
    diagnosis: Diagnosis
    candidates: list[Candidate]
    noise: float
    noise_note: str
    ranked: list[tuple[Candidate, Summary, float]]
    best: Candidate | None  # the fastest candidate whose gain beats the noise, else None
    recommendation: str
    cuts: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0
    path: Path | None = None
    status: str = "complete"  # running (doctor.json rewritten after every measurement) | complete | stopped
    stopped: Stopped | None = None  # the signal that ended the diagnosis early (the result holds what ran)
    utilization: Utilization | None = None  # FLOPs per image and the peak of the baseline's precision

    @property
    def baseline_summary(self) -> Summary:
        s = summarize(self.baseline)
        assert s is not None
        return s


def summarize(ms: list[Measurement]) -> Summary | None:
    if not ms:
        return None
    ips = [m.images_per_s for m in ms]
    parts: dict[str, float | None] = {}
    for p in PARTS:
        vals = [v for m in ms if (v := m.per_step_ms(p)) is not None]
        parts[p] = statistics.median(vals) if len(vals) == len(ms) else None
    return Summary(len(ms), statistics.median(ips), min(ips), max(ips), statistics.median([m.step_ms for m in ms]), parts)


def noise_share(baseline: Summary) -> tuple[float, str]:
    """The gain a candidate must beat, and how it was defined."""
    if baseline.repeats < 2:
        return UNKNOWN_NOISE_SHARE, f"{pct(UNKNOWN_NOISE_SHARE)} (assumed: the baseline ran once, so its spread is unknown)"
    spread = baseline.spread_share
    used = max(spread, MIN_NOISE_SHARE)
    return used, (f"{pct(used)} (the baseline's min-max spread over {baseline.repeats} repeats, "
                  f"{pct(spread)}, floored at {pct(MIN_NOISE_SHARE)})")


def gain(candidate: Summary, baseline: Summary) -> float:
    return candidate.images_per_s_median / baseline.images_per_s_median - 1.0


def verdict(candidate: Summary, baseline: Summary, noise: float) -> str:
    """helps / slower need two repeats of both and a median gain beyond the noise with min-max ranges
    apart; one repeat can only be 'unconfirmed'."""
    g = gain(candidate, baseline)
    if candidate.repeats < 2 or baseline.repeats < 2:
        return "unconfirmed (1 repeat)" if abs(g) > noise else "within noise (1 repeat)"
    if g > noise and candidate.images_per_s_min > baseline.images_per_s_max:
        return "helps"
    if g < -noise and candidate.images_per_s_max < baseline.images_per_s_min:
        return "slower"
    return "within noise"


def rank(candidates: list[Candidate], baseline: Summary) -> list[tuple[Candidate, Summary, float]]:
    """Measured candidates, fastest first by median images/s."""
    rows = [(c, s, gain(s, baseline)) for c in candidates if c.status == "measured" and (s := summarize(c.measurements))]
    return sorted(rows, key=lambda r: -r[1].images_per_s_median)


def current_setting(result: DoctorResult) -> str:
    c = result.config
    loader = f"--loader torch --workers {c.workers}" if c.loader == "torch" else "--loader device"
    return (f"{loader} --batch-size {c.batch_size} --precision {c.precision} "
            f"--{'' if c.channels_last else 'no-'}channels-last --compile {c.compile}"
            f"{'' if c.sync_timing else ' --no-sync-timing'}")


def _cand_dict(c: Candidate, base: Summary) -> dict[str, Any]:
    s = summarize(c.measurements)
    return {"key": c.key, "flags": c.flags, "changes": c.changes, "why": c.why, "addresses": list(c.addresses),
            "status": c.status, "reason": c.reason, "note": c.note, "partial": c.partial,
            "measurements": [m.to_dict() for m in c.measurements], "summary": s.to_dict() if s else None,
            "gain_share": (s.images_per_s_median / base.images_per_s_median - 1.0) if s else None}


def to_json(result: DoctorResult) -> dict[str, Any]:
    base = result.baseline_summary
    return {
        "schema": DOCTOR_SCHEMA,
        "status": result.status,  # running: written after a measurement, more to come; stopped: ended early
        "created": utc_now(),
        "environment": result.environment,
        "config": result.config.to_dict(),
        "data": result.data_description,
        "budget": {"budget_s": result.budget_s, "elapsed_s": result.elapsed_s, "cuts": result.cuts},
        "method": {"steps": result.steps, "warmup_steps": result.warmup_steps, "repeats": result.repeats,
                   "order": "baseline, then rounds: each candidate the budget allows, then a baseline repeat (re-planned per round); "
                            "each measurement builds a fresh model and loader from the same seed",
                   "includes": MEASUREMENT_NOTES, "thresholds": THRESHOLDS},
        "baseline": {"setting": current_setting(result), "measurements": [m.to_dict() for m in result.baseline],
                     "summary": base.to_dict()},
        "diagnosis": result.diagnosis.to_dict(),
        "utilization": utilization_facts(result),
        "noise": {"share": result.noise, "definition": result.noise_note},
        "candidates": [_cand_dict(c, base) for c in result.candidates],
        "ranking": [c.key for c, _, _ in result.ranked],
        "best": result.best.key if result.best else None,
        "recommendation": result.recommendation,
        "stopped_by": result.stopped.signal_name if result.stopped is not None else None,
    }


def measurement_line(m: Measurement) -> str:
    parts = "  ".join(f"{p} {v:.1f}" for p in PARTS if (v := m.per_step_ms(p)) is not None)
    return f"{m.images_per_s:7.1f} img/s  step {m.step_ms:8.1f} ms  ({parts} ms/step)  [{m.cost_s:.1f} s]"


def utilization_facts(result: DoctorResult) -> dict[str, Any] | None:
    """The baseline's achieved TFLOP/s and MFU over the whole step and over its compute part alone (doctor.json)."""
    util = result.utilization
    if util is None:
        return None
    base = result.baseline_summary
    images_per_step = base.images_per_s_median * base.step_ms_median / 1e3
    tflops = util.flops_per_image * base.images_per_s_median / 1e12
    compute_ms = base.parts_ms.get("compute")
    compute_tflops = util.flops_per_image * images_per_step / (compute_ms / 1e3) / 1e12 if compute_ms else None
    return {**util.describe(), "step_tflops": tflops, "step_mfu": tflops / util.peak.tflops,
            "compute_tflops": compute_tflops, "compute_mfu": compute_tflops / util.peak.tflops if compute_tflops else None}


def utilization_verdict(result: DoctorResult) -> str | None:
    """'compute-bound at 23% of the bf16 peak of the H100 SXM (...)': the diagnosis against the hardware's peak."""
    facts = utilization_facts(result)
    if facts is None or result.utilization is None:
        return None
    peak = result.utilization.peak
    compute = (f"; {pct(facts['compute_mfu'])} over the compute part alone ({facts['compute_tflops']:.3g} TFLOP/s)"
               if facts["compute_mfu"] is not None else "")
    return (f"{result.diagnosis.label} at {pct(facts['step_mfu'])} of the {peak.label()} ({peak.tflops:,.3g} TFLOP/s): "
            f"{facts['step_tflops']:.3g} TFLOP/s achieved over the whole step ({facts['train_flops_per_image'] / 1e9:.3f} "
            f"GFLOP per image x {result.baseline_summary.images_per_s_median:.1f} img/s){compute}")


def recommendation(result: DoctorResult) -> str:
    """One line: the exact flags and the measured gain of the best change beating the noise, or none."""
    base = result.baseline_summary
    if not result.ranked:  # nothing was rerun: no change was compared with the noise at all
        cut = [" ".join(c.flags) for c in result.candidates if c.status == "cut"]
        failed = [" ".join(c.flags) for c in result.candidates if c.status == "failed"]
        over = [" ".join(c.flags) for c in result.candidates if c.status == "over budget"]
        why = "; ".join(f"{what}: {', '.join(flags)}" for what, flags in
                        (("cut by the budget", cut), ("stopped over budget", over), ("failed", failed)) if flags)
        return (f"recommendation: no change was measured ({why or 'none applies here'}); keep the current flags "
                f"({base.images_per_s_median:.1f} img/s)" + (" -- rerun with a larger --budget to try them" if cut or over else ""))
    if result.best is None:
        hint = [f"{' '.join(c.flags)} ({g:+.0%})" for c, s, g in result.ranked
                if g > 0 and verdict(s, base, result.noise).startswith("unconfirmed")]
        more = (f"; unconfirmed with one repeat: {', '.join(hint)} -- rerun with a larger --budget to confirm" if hint else "")
        return (f"recommendation: no change found that helps by more than the noise ({result.noise:.0%}); "
                f"keep the current flags ({base.images_per_s_median:.1f} img/s){more}")
    s = summarize(result.best.measurements)
    assert s is not None
    g = s.images_per_s_median / base.images_per_s_median - 1.0
    note = f"; {result.best.note}" if result.best.note else ""
    return (f"recommendation: add {' '.join(result.best.flags)} -> {s.images_per_s_median:.1f} img/s vs "
            f"{base.images_per_s_median:.1f} (+{g:.0%}, step {s.step_ms_median:.0f} vs {base.step_ms_median:.0f} ms; "
            f"noise {result.noise:.0%}){note}")


def _ms(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.1f}"


def table_rows(result: DoctorResult) -> list[list[str]]:
    base = result.baseline_summary
    head = ["rank", "change", "img/s median", "min-max", "step ms", *(f"{p} ms" for p in PARTS), "gain", "verdict"]
    rows = [head, ["-", f"baseline ({current_setting(result)})", f"{base.images_per_s_median:.1f}",
                   f"{base.images_per_s_min:.1f}-{base.images_per_s_max:.1f}", f"{base.step_ms_median:.1f}",
                   *(_ms(base.parts_ms[p]) for p in PARTS), "", f"{base.repeats} repeat(s)"]]
    for i, (c, s, g) in enumerate(result.ranked, 1):
        says = verdict(s, base, result.noise) + ("; loss diverged" if any(m.status != "ok" for m in c.measurements) else "")
        rows.append([str(i), " ".join(c.flags), f"{s.images_per_s_median:.1f}",
                     f"{s.images_per_s_min:.1f}-{s.images_per_s_max:.1f}", f"{s.step_ms_median:.1f}",
                     *(_ms(s.parts_ms[p]) for p in PARTS), f"{g:+.0%}", says if "repeat" in says else f"{says} ({s.repeats} rep)"])
    return rows


def _listed(result: DoctorResult) -> list[str]:
    return [f"{' '.join(c.flags)}: {c.status}: {c.reason}" for c in result.candidates
            if c.status not in ("measured", "cut")]  # cut ones are in result.cuts


def _measured_facts(result: DoctorResult) -> list[str]:
    m = result.baseline[0]
    windows = ", ".join(f"{w['window']} {w['steps']} step(s) x{w['weight']:.3g}" for w in m.windows)
    out = [f"each measurement: {result.warmup_steps} untimed warm-up step(s), then timed windows {windows} "
           f"= one epoch of {m.steps} steps; starting the loader's iterator took {m.loader_start_s:.2f} s (in data)"]
    out.append(f"step runner: {m.step_mode}" + (f" (one-time setup {m.setup_s:.2f} s, outside every window)" if m.setup_s else ""))
    if m.cpu_share is not None:
        out.append(f"training process CPU: {m.process_cpu_s / m.timed_s:.2f} cores busy of "
                   f"{min(m.torch_threads, m.usable_cpus)} its threads could use ({m.cpu_share:.0%})"
                   + (f"; loader workers: {m.workers_cores:.2f} cores" if m.workers_cores is not None else "")
                   + (f"; load average {m.load_average:.1f}" if m.load_average is not None else ""))
    if m.gpu_busy_share is not None:
        out.append(f"GPU busy: {m.gpu_busy_share:.0%} of the compute segment (kernels per torch.profiler)")
    elif m.device_type == "cuda":
        out.append("GPU busy: not measured (no sync timing, or the profiler returned no kernel events)")
    else:
        out.append("GPU busy fraction: not applicable here (the run trains on the CPU)")
    if m.peak_memory_bytes:
        what = "peak allocated on the GPU" if m.device_type == "cuda" else "process peak RSS (high-water mark)"
        out.append(f"memory: {what} {m.peak_memory_bytes / 2**20:.0f} MiB of {m.memory_total_bytes / 2**20:.0f} MiB")
    return out


def console_text(result: DoctorResult) -> str:
    rows = table_rows(result)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["", "thresholds: " + "; ".join(f"{k}: {v}" for k, v in THRESHOLDS.items()),
             f"diagnosis: {result.diagnosis.label} -- " + "; ".join(result.diagnosis.evidence)]
    if verdict_line := utilization_verdict(result):
        lines.append(f"utilization: {verdict_line}")
    lines += [f"finding: {f}" for f in result.diagnosis.findings]
    lines += _measured_facts(result)
    lines.append(f"noise: {result.noise_note}")
    lines.append("")
    lines += ["  ".join(cell.rjust(w) if j >= 2 else cell.ljust(w) for j, (cell, w) in enumerate(zip(r, widths)))
              for r in rows]
    lines += [f"  {x}" for x in _listed(result)]
    lines += [f"cut: {x}" for x in result.cuts]
    lines.append(result.recommendation)
    lines.append(f"doctor took {result.elapsed_s:.0f} s of a {result.budget_s:.0f} s budget"
                 + (f"; folder {result.path}" if result.path else ""))
    return "\n".join(lines)


def markdown(result: DoctorResult) -> str:
    rows = table_rows(result)
    md = ["# cifarlab doctor", "", f"- data: {result.data_description}",
          f"- device: {result.environment.get('gpu_name') or result.environment.get('cpu_model')} ({result.device}); "
          f"{result.environment.get('cpu_count_usable')} usable CPU cores, torch {result.environment.get('torch')}",
          f"- baseline: `{current_setting(result)}`", "", f"**{result.recommendation}**", "",
          f"## Diagnosis: {result.diagnosis.label}", ""]
    if verdict_line := utilization_verdict(result):
        md += [f"Utilization: {verdict_line}.", ""]
    md += [f"- {e}" for e in result.diagnosis.evidence + result.diagnosis.findings + _measured_facts(result)]
    md += ["", "Thresholds: " + "; ".join(f"{k}: {v}" for k, v in THRESHOLDS.items()) + ".", "",
           "## Every change, rerun", "", f"Noise: {result.noise_note}.", ""]
    md.append("| " + " | ".join(rows[0]) + " |")
    md.append("|" + "---|" * len(rows[0]))
    md += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    md += [""] + [f"- {x}" for x in _listed(result)] + [f"- cut: {x}" for x in result.cuts]
    md += ["", f"![step time split]({CHART_NAME})", "", "What each figure includes:", ""]
    md += [f"- `{k}`: {v}" for k, v in MEASUREMENT_NOTES.items()]
    return "\n".join(md) + "\n"


def chart_png(result: DoctorResult) -> bytes:
    """Stacked per-step split, baseline vs the best change (baseline alone when none helps)."""
    plt = pyplot()
    bars: list[tuple[str, Summary]] = [("baseline", result.baseline_summary)]
    if result.best is not None and (s := summarize(result.best.measurements)) is not None:
        bars.append((" ".join(result.best.flags), s))
    fig, ax = plt.subplots(figsize=(6, 3.5))
    tops = []
    for i, (name, s) in enumerate(bars):
        bottom = 0.0
        known = {p: s.parts_ms[p] for p in PARTS}
        if known["compute"] is None:  # no sync timing: only data and the rest are known
            known = {"data": known["data"], "h2d": None, "compute": None, "start": known["start"],
                     "other": s.step_ms_median - (known["data"] or 0.0) - (known["start"] or 0.0)}
        for p, color in zip(PARTS, ("tab:orange", "tab:purple", "tab:blue", "tab:gray", "tab:red")):
            v = known[p]
            if v:
                ax.bar(i, v, bottom=bottom, color=color, label=p if i == 0 or p not in ax.get_legend_handles_labels()[1] else None)
                bottom += v
        ax.text(i, bottom, f"{s.step_ms_median:.0f} ms\n{s.images_per_s_median:.1f} img/s", ha="center", va="bottom", fontsize=8)
        tops.append(bottom)
    ax.set_xticks(range(len(bars)), [b[0] for b in bars])
    ax.set_ylabel("ms per step (median)")
    ax.set_title("Step time split: baseline vs the best change" if len(bars) > 1
                 else "Step time split: baseline (no change beat the noise)" if result.ranked
                 else "Step time split: baseline (no change measured)")
    ax.set_ylim(0, 1.3 * max(tops + [1e-9]))
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def write_json(result: DoctorResult, path: Path) -> None:
    """doctor.json in the folder `path` (atomically: a stop while writing leaves the previous one)."""
    write_json_atomic(path / "doctor.json", to_json(result))


def write_folder(result: DoctorResult, out_dir: str | Path, path: Path | None = None) -> Path:
    """Every output in `path` (an existing doctor folder), or in a new one under out_dir."""
    path = path if path is not None else create_run_dir(out_dir, "doctor")
    result.path = path
    write_json(result, path)
    write_bytes_atomic(path / CHART_NAME, chart_png(result))
    write_text_atomic(path / "doctor.md", markdown(result))
    return path
