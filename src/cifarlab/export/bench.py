"""Inference latency of ResNet-18 per batch: eager PyTorch against its exported forms, on CPU and CUDA.

For each device and batch size every variant (eager fp32, eager bf16 autocast on CUDA, TorchScript traced
and scripted, the torch.export program, AOTInductor and ONNX Runtime where present, torch.compile when
asked) is warmed up (TorchScript's profiling executor and torch.compile optimize during the first calls),
then timed call by call, the variants taking turns so a change in machine load hits all of them alike.
A clock read is always preceded by a device synchronization on CUDA. The input batch is already on the
device (no host-to-device copy is timed) and gradients are off. Per row: p50/p95/p99/mean latency in ms
and images/s = batch / mean latency.

`bench(variants, batch_sizes)` works on in-memory callables (the lab calls it); `bench_path` is
`cifarlab infer-bench RUN_DIR_OR_EXPORT_DIR`.
"""

from __future__ import annotations

import contextlib
import copy
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn

from cifarlab.config import INFER_BENCH_BATCH_SIZES, INFER_BENCH_ITERS, INFER_BENCH_WARMUP
from cifarlab.core.errors import UsageError, raise_if_interrupted
from cifarlab.core.fileio import write_atomic, write_csv_atomic, write_json_atomic, write_text_atomic
from cifarlab.core.folders import ensure_writable_dir, utc_now
from cifarlab.core.runtime import environment, usable_cpus
from cifarlab.core.text import one_line
from cifarlab.export import artifacts as ex
from cifarlab.export import trust
from cifarlab.report.plots import pyplot
from cifarlab.run.checkpoint import CHECKPOINT_NAME

BENCH_SCHEMA = "cifarlab.inferbench/1"
DEFAULT_BATCH_SIZES = INFER_BENCH_BATCH_SIZES
DEFAULT_ITERS = INFER_BENCH_ITERS
DEFAULT_WARMUP = INFER_BENCH_WARMUP
DEFAULT_BUDGET_S = 1.0  # per variant and batch size; timing stops early past it (at least MIN_ITERS calls)
MIN_ITERS = 5
MAX_BATCH = 4096
TIMING_NOTE = ("latency of one forward call on a batch already on the device, gradients off; on CUDA the device "
               "is synchronized before each clock read; variants take turns call by call after a warm-up; "
               "images/s = batch / mean latency")


@dataclass
class Variant:
    name: str  # eager, eager-bf16, torchscript-trace, torchscript-script, export, aoti, onnxruntime, compile
    fn: Callable[[torch.Tensor], Any]
    device: torch.device
    precision: str = "fp32"
    note: str = ""
    artifact: str | None = None  # the export folder's file it was loaded from (after exporttrust's checks)


# --------------------------------------------------------------------------------------- variants


def _autocast(fn: Callable[[torch.Tensor], Any], device: torch.device) -> Callable[[torch.Tensor], Any]:
    def run(x: torch.Tensor) -> Any:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return fn(x)
    return run


def make_variants(model: nn.Module, device: torch.device, export_dir: str | Path | None = None, *,
                  compile_mode: str | None = None, allow_code: bool = False,
                  log: Callable[[str], None] | None = None) -> tuple[list[Variant], dict[str, str]]:
    """Eager (plus bf16 autocast on CUDA GPUs that support it), every artifact listed in export_dir's
    export.json that passes exporttrust's policy, loaded onto `device`, and torch.compile(mode=compile_mode)
    when given. Returns the variants and {variant: why it was skipped on this device}; each skip is also one
    `log` line."""
    device = torch.device(device)
    eager = copy.deepcopy(model).eval().to(device)  # one copy per device: the caller's model stays where it is
    variants = [Variant("eager", eager, device)]
    skipped: dict[str, str] = {}

    def skip(name: str, reason: str) -> None:
        skipped[name] = reason
        if log is not None:
            log(f"  {device.type}: {name} not benchmarked: {reason}")

    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            variants.append(Variant("eager-bf16", _autocast(eager, device), device, "bf16 autocast",
                                    "torch.autocast(cuda, bfloat16): convolutions and matmuls in bf16"))
        else:
            skip("eager-bf16", "this GPU has no bf16 support")
    if export_dir is not None:
        export_dir = Path(export_dir)
        info, entries = trust.read_export_json(export_dir, ex.FORMATS, ex.EXPORT_SCHEMA, ex.EXPORT_JSON)
        for entry in entries:
            name = "onnxruntime" if entry.fmt == "onnx" else entry.fmt
            if entry.fmt == "aoti" and info["device"].split(":")[0] != device.type:
                skip(name, f"the package was compiled for {info['device']}")
                continue
            data, path, refused = trust.verified_bytes(export_dir, entry, allow_code)
            if data is None or path is None:
                skip(name, refused)
                continue
            try:
                fn = ex.load_artifact(entry.fmt, path, device, data)
            except Exception as e:  # a format that cannot run on this device is reported, not fatal
                raise_if_interrupted(e)
                skip(name, f"{entry.file!r} failed to load ({type(e).__name__}: {one_line(e, ex.EXCEPTION_CHARS)})")
                continue
            providers = getattr(fn, "providers", None)
            if providers is not None and device.type == "cuda" and "CUDAExecutionProvider" not in providers:
                skip(name, "onnxruntime has no CUDAExecutionProvider here (install onnxruntime-gpu)")
                continue
            variants.append(Variant(name, fn, device, note=f"{entry.file} reloaded from disk, sha256 checked",
                                    artifact=entry.file))
    if compile_mode:
        variants.append(Variant("compile", torch.compile(eager, mode=compile_mode), device,
                                note=f"torch.compile(mode={compile_mode!r}); compilation happens in the warm-up"))
    return variants, skipped


# ----------------------------------------------------------------------------------------- timing


def _timed_call(fn: Callable[[torch.Tensor], Any], x: torch.Tensor, cuda: bool) -> float:
    if cuda:
        torch.cuda.synchronize()  # before the first clock read: earlier work is not ours
    t0 = time.perf_counter()
    fn(x)
    if cuda:
        torch.cuda.synchronize()  # before the second: the kernels this call queued have finished
    return time.perf_counter() - t0


def _stats(latencies_s: list[float], batch: int) -> dict[str, Any]:
    ms = np.asarray(latencies_s) * 1e3
    p50, p95, p99 = np.percentile(ms, [50, 95, 99])
    mean = float(ms.mean())
    return {"iters": len(ms), "p50_ms": float(p50), "p95_ms": float(p95), "p99_ms": float(p99), "mean_ms": mean,
            "min_ms": float(ms.min()), "images_per_s": batch * 1e3 / mean}


def bench(variants: list[Variant], batch_sizes: tuple[int, ...] | list[int] = DEFAULT_BATCH_SIZES, *,
          iters: int = DEFAULT_ITERS, warmup: int = DEFAULT_WARMUP, budget_s: float = DEFAULT_BUDGET_S,
          seed: int = 0, log: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """One row per (device, batch size, variant). A variant that fails (e.g. out of memory) gets a row with
    its status instead of stopping the others."""
    rows: list[dict[str, Any]] = []
    devices = list(dict.fromkeys(v.device for v in variants))
    generator = torch.Generator().manual_seed(seed)
    for device in devices:
        group = [v for v in variants if v.device == device]
        cuda = device.type == "cuda"
        for batch in batch_sizes:
            x = torch.randn(batch, 3, 32, 32, generator=generator).to(device)
            status: dict[str, str] = {}
            first_s: dict[str, float] = {}
            times: dict[str, list[float]] = {}
            with torch.no_grad():
                for v in group:
                    try:
                        first_s[v.name] = _timed_call(v.fn, x, cuda)
                        for _ in range(max(0, warmup - 1)):
                            _timed_call(v.fn, x, cuda)
                        times[v.name] = []
                    except Exception as e:  # noqa: BLE001 -- recorded in the row, the others go on
                        raise_if_interrupted(e)
                        status[v.name] = f"failed: {type(e).__name__}: {one_line(e, ex.EXCEPTION_CHARS)}"
                        if cuda:
                            torch.cuda.empty_cache()
                active = [v for v in group if v.name in times]
                t0 = time.perf_counter()
                for i in range(iters):
                    for v in active:
                        times[v.name].append(_timed_call(v.fn, x, cuda))
                    if i + 1 >= min(MIN_ITERS, iters) and time.perf_counter() - t0 > budget_s * max(1, len(active)):
                        break
            eager_p50 = None
            for v in group:
                row: dict[str, Any] = {"device": str(device), "variant": v.name, "precision": v.precision,
                                       "batch_size": batch, "status": status.get(v.name, "ok"),
                                       "first_call_ms": first_s[v.name] * 1e3 if v.name in first_s else None}
                if v.name in times:
                    row.update(_stats(times[v.name], batch))
                    if v.name == "eager":
                        eager_p50 = row["p50_ms"]
                rows.append(row)
            for row in rows[-len(group):]:
                row["speedup_vs_eager_p50"] = eager_p50 / row["p50_ms"] if eager_p50 and row.get("p50_ms") else None
            if log:
                n = max((len(t) for t in times.values()), default=0)
                log(f"  {device.type} batch {batch}: {len(active)} variant(s) x {n} timed call(s) "
                    f"({time.perf_counter() - t0:.1f} s)")
    return rows


# ---------------------------------------------------------------------------------------- outputs


def format_table(rows: list[dict[str, Any]]) -> str:
    """A markdown table (readable on a console too)."""
    head = "| device | variant | precision | batch | n | p50 ms | p95 ms | p99 ms | images/s | p50 vs eager |"
    lines = [head, "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        if r.get("p50_ms") is None:
            lines.append(f"| {r['device']} | {r['variant']} | {r['precision']} | {r['batch_size']} | | | | | | {r['status']} |")
            continue
        speedup = f"{r['speedup_vs_eager_p50']:.2f}x" if r.get("speedup_vs_eager_p50") else ""
        lines.append(f"| {r['device']} | {r['variant']} | {r['precision']} | {r['batch_size']} | {r['iters']} | "
                     f"{r['p50_ms']:.2f} | {r['p95_ms']:.2f} | {r['p99_ms']:.2f} | {r['images_per_s']:,.0f} | {speedup} |")
    return "\n".join(lines)


def latency_groups(rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[str], dict[str, str]]:
    """The rows that have a latency, their devices in order (["none"] when there are none) and one colour per
    variant, the same on every device."""
    ok = [r for r in rows if r.get("p50_ms") is not None]
    devices = list(dict.fromkeys(r["device"] for r in ok)) or ["none"]
    colour = {name: f"C{i % 10}" for i, name in enumerate(dict.fromkeys(r["variant"] for r in ok))}
    return ok, devices, colour


def variant_bars(ax: Any, rows: list[dict[str, Any]], key: str, colour: dict[str, str], error_to: str | None = None) -> None:
    """One device's rows as grouped bars: batch sizes along x (ticked), one bar per variant in its colour,
    `key` as the height; with error_to, an upward error bar to that key (e.g. p95 above p50)."""
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    batches = list(dict.fromkeys(r["batch_size"] for r in rows))
    width = 0.8 / max(1, len(variants))
    for k, variant in enumerate(variants):
        got = [r for b in batches for r in rows if r["variant"] == variant and r["batch_size"] == b]
        error = {} if error_to is None else {
            "yerr": [[0.0] * len(got), [max(0.0, r[error_to] - r[key]) for r in got]], "capsize": 2}
        ax.bar([batches.index(r["batch_size"]) + k * width for r in got], [r[key] for r in got], width,
               label=variant, color=colour[variant], **error)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(batches))], [f"batch {b}" for b in batches])


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """p50 latency and images/s per variant and batch size, one row of panels per device."""
    plt = pyplot()
    ok, devices, colour = latency_groups(rows)
    fig, axes = plt.subplots(len(devices), 2, figsize=(12, 4 * len(devices)), squeeze=False)
    for axrow, device in zip(axes, devices):
        mine = [r for r in ok if r["device"] == device]
        for ax, key, title in zip(axrow, ("p50_ms", "images_per_s"),
                                  ("p50 latency per batch (ms, log scale)", "images/s (from mean latency)")):
            variant_bars(ax, mine, key, colour)
            ax.set_title(f"{device}: {title}")
        axrow[0].set_yscale("log")
        axrow[1].legend(fontsize=8)
    fig.tight_layout()
    try:
        write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=110))
    finally:
        plt.close(fig)


OUTPUT_NAMES = tuple(f"inferbench.{k}" for k in ("json", "csv", "txt", "png"))


def write_outputs(rows: list[dict[str, Any]], out_dir: Path, meta: dict[str, Any]) -> dict[str, Path]:
    """inferbench.json (rows + meta), .csv, .txt (the table) and .png into out_dir, each atomically."""
    paths = {name.split(".")[1]: out_dir / name for name in OUTPUT_NAMES}
    write_csv_atomic(paths["csv"], rows)
    write_text_atomic(paths["txt"], format_table(rows) + "\n")
    plot(rows, paths["png"])
    write_json_atomic(paths["json"], {"schema": BENCH_SCHEMA, "created_utc": utc_now(), **meta, "rows": rows})
    return paths


# ------------------------------------------------------------------------------ the command's core


def _load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def resolve_devices(name: str) -> list[torch.device]:
    if name == "cpu":
        return [torch.device("cpu")]
    if name == "cuda":
        if not torch.cuda.is_available():
            raise UsageError("--device cuda: no CUDA device is available here; use --device cpu (or auto)")
        return [torch.device("cuda")]
    return [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])


@contextlib.contextmanager
def export_source(path: str | Path, log: Callable[[str], None]) -> Iterator[tuple[nn.Module, dict[str, Any], Path]]:
    """(eager model, source, export folder) for a run folder or an export folder. A run folder without
    export/ is exported into a temporary folder first (default formats, checked like `cifarlab export`)."""
    folder = Path(path)
    if (folder / ex.EXPORT_JSON).is_file():
        info, _ = trust.read_export_json(folder, ex.FORMATS, ex.EXPORT_SCHEMA, ex.EXPORT_JSON)
        if not isinstance(info["source"].get("run_dir"), str):
            raise UsageError(f"{str(folder / ex.EXPORT_JSON)!r}: field source.run_dir is not a path, so the eager "
                             f"model cannot be found; export the run again")
        run_dir = Path(info["source"]["run_dir"])
        if not (run_dir / CHECKPOINT_NAME).is_file() and (folder.parent / CHECKPOINT_NAME).is_file():
            run_dir = folder.parent  # the default layout RUN_DIR/export, moved since
        model, source = ex.load_run_model(run_dir)
        yield model, source, folder
        return
    if not (folder / CHECKPOINT_NAME).is_file() and folder.is_dir() and not (folder / "config.json").is_file():
        raise UsageError(f"{str(path)!r} is neither a run folder nor an export folder (no {ex.EXPORT_JSON}, "
                         f"{CHECKPOINT_NAME} or config.json); pass one of those")
    model, source = ex.load_run_model(folder)
    if (folder / "export" / ex.EXPORT_JSON).is_file():
        yield model, source, folder / "export"
        return
    formats, _ = ex.parse_formats(None)
    with tempfile.TemporaryDirectory(prefix="cifarlab-inferbench-") as tmp:
        log(f"no {folder / 'export'}: exporting {', '.join(formats)} into a temporary folder first")
        x, described = ex.check_batch(source, 16)
        ex.export_model(model, tmp, formats, x, source=source, check_images=described)
        yield model, source, Path(tmp)


def bench_path(path: str | Path, *, out_dir: str | Path | None, device: str = "auto",
               batch_sizes: tuple[int, ...] = DEFAULT_BATCH_SIZES, iters: int = DEFAULT_ITERS,
               warmup: int = DEFAULT_WARMUP, budget_s: float = DEFAULT_BUDGET_S, compile_mode: str | None = None,
               log: Callable[[str], None] = print,
               allow_code: bool = False) -> tuple[list[dict[str, Any]], dict[str, Path]]:
    """`cifarlab infer-bench`: rows and the written files (default folder: <path>/inferbench). Artifacts are
    loaded under exporttrust's policy (allow_code: --allow-code-execution)."""
    devices = resolve_devices(device)
    load_before = _load_average()
    with export_source(path, log) as (model, source, export_dir):
        out, flag = (Path(out_dir), "--out") if out_dir is not None else (Path(path) / "inferbench", "the default --out")
        trust.refuse_foreign_out(out, flag, "infer-bench",
                                 lambda name: trust.recorded_in(out, name, OUTPUT_NAMES[0], BENCH_SCHEMA, OUTPUT_NAMES))
        out = ensure_writable_dir(out, flag)
        variants: list[Variant] = []
        skipped: dict[str, dict[str, str]] = {}
        for d in devices:
            found, skipped[str(d)] = make_variants(model, d, export_dir, compile_mode=compile_mode,
                                                   allow_code=allow_code, log=log)
            variants += found
        if not any(v.artifact for v in variants):
            raise UsageError(f"nothing to benchmark against eager: no artifact listed in "
                             f"{str(export_dir / ex.EXPORT_JSON)!r} passed the checks (see the lines above); "
                             f"export the run again")
        log(f"variants: {', '.join(dict.fromkeys(v.name for v in variants))}; devices: "
            f"{', '.join(str(d) for d in devices)}; batch sizes {', '.join(map(str, batch_sizes))}")
        rows = bench(variants, batch_sizes, iters=iters, warmup=warmup, budget_s=budget_s, log=log)
    load_after = _load_average()
    cores = usable_cpus()
    if max(load_before or 0, load_after or 0) > cores:
        log(f"warning: the machine was busy (1-minute load average {load_before} before, {load_after} after, on "
            f"{cores} usable cores): CPU latencies are inflated by other processes")
    meta = {"source": source, "settings": {"batch_sizes": list(batch_sizes), "iters": iters, "warmup": warmup,
                                           "budget_s_per_variant": budget_s, "min_iters": MIN_ITERS,
                                           "compile_mode": compile_mode, "timing": TIMING_NOTE},
            "variants": [{"device": str(v.device), "name": v.name, "precision": v.precision, "note": v.note}
                         for v in variants],
            "cuda_tf32": {"cudnn_conv": torch.backends.cudnn.allow_tf32, "matmul": torch.backends.cuda.matmul.allow_tf32}
            if any(d.type == "cuda" for d in devices) else None,
            "skipped": skipped, "load_average_1min": {"before": load_before, "after": load_after},
            "environment": {str(d): environment(d) for d in devices}}
    try:
        return rows, write_outputs(rows, out, meta)
    except OSError as e:  # a full or read-only disk: each file is whole or absent (atomic writes)
        raise UsageError(f"cannot write the results into {str(out)!r}: {e.strerror or e}; no file is half-written "
                         f"-- free some space or choose another --out") from None
