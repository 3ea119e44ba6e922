"""Export a trained ResNet-18 for inference and prove each artifact computes what eager PyTorch does.

Formats: TorchScript by tracing (`.pt`) and by scripting (`.pt`), `torch.export` (`.pt2`), ONNX (`.onnx`,
only with the optional `onnx` extras) and an AOTInductor package (`.pt2`, opt-in: compiling is slow on a
CPU). Each artifact is written into a hidden staging folder, saved, *reloaded from disk* and run on a fixed
batch of test images next to the eager model: the largest absolute logit difference and the top-1
agreement are recorded in `export.json`. Only when every requested format passes are the files renamed
into the output folder (export.json last), so a failed or interrupted export leaves no half-written file.

`export_model(model, out_dir, formats, example_batch)` works on any in-memory model (the lab calls it);
`export_run(run_dir, ...)` loads a run folder's checkpoint first (`cifarlab export`).
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import io
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from cifarlab.config import CIFAR_MEAN, CIFAR_STD, EXPORT_CHECK_IMAGES, EXPORT_FORMATS, NORMS, export_format_names
from cifarlab.core.errors import UsageError, raise_if_interrupted
from cifarlab.core.fileio import file_digest, os_error_in_chain, write_json_atomic, write_serialized_atomic, write_text_atomic
from cifarlab.core.folders import ensure_writable_dir, utc_now
from cifarlab.core.runtime import environment
from cifarlab.core.signals import signals_deferred
from cifarlab.core.text import one_line
from cifarlab.data import cifar_present, load_cifar10, synthetic_split
from cifarlab.export.check import LOGIT_LIMIT, compare, rule, tolerances
from cifarlab.export.trust import recorded_in, refuse_foreign_out
from cifarlab.model.resnet import resnet18
from cifarlab.run.checkpoint import CHECKPOINT_NAME, load_checkpoint

EXPORT_SCHEMA = "cifarlab.export/1"
EXPORT_JSON = "export.json"
FORMATS = EXPORT_FORMATS
DEFAULT_FORMATS = ("torchscript-trace", "torchscript-script", "export", "onnx")  # onnx: when installed
ARTIFACTS = {
    "torchscript-trace": "resnet18.traced.pt",
    "torchscript-script": "resnet18.scripted.pt",
    "export": "resnet18.exported.pt2",
    "onnx": "resnet18.onnx",
    "aoti": "resnet18.aoti.pt2",
}
GRAPH_FILES = {
    "torchscript-trace": "resnet18.traced.graph.txt",
    "torchscript-script": "resnet18.scripted.code.txt",
    "export": "resnet18.exported.graph.txt",
}
ONNX_PACKAGES = ("onnx", "onnxscript", "onnxruntime")
CHECK_IMAGES = EXPORT_CHECK_IMAGES
EXCEPTION_CHARS = 200  # of an exception's first line quoted in export's and infer-bench's messages
MAX_DYNAMIC_BATCH = 4096
TRACING_VS_SCRIPTING = (
    "Tracing runs the model once on an example batch and records the aten ops that ran: control flow and "
    "module state are frozen into constants (BatchNorm's `training` flag is baked in as False because the model "
    "was traced in eval mode, so `.train()` on the traced module changes nothing). Scripting compiles the Python "
    "source of every forward: BatchNorm keeps its `if self.training` branch, so the scripted module still "
    "switches between running statistics and batch statistics. ResNet-18 has no data-dependent control flow and "
    "no shape-dependent Python code, so both give the same eval-mode logits and both accept any batch size."
)


class ExportMismatch(UsageError):
    """A reloaded artifact differs from eager beyond the tolerance (exit 2); .report: the unwritten export.json."""

    def __init__(self, message: str, report: dict[str, Any]) -> None:
        super().__init__(message)
        self.report = report


# ------------------------------------------------------------------------------------- the source


def _installed(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a broken or blocked package
        return False


def onnx_missing() -> str | None:
    """Why the ONNX format cannot run here, or None. find_spec only looks, it imports nothing."""
    missing = [name for name in ONNX_PACKAGES if not _installed(name)]
    if not missing:
        return None
    return f"needs {', '.join(missing)}: pip install 'cifarlab[onnx]'"


def parse_formats(text: str | None) -> tuple[list[str], dict[str, str]]:
    """'a,b' -> (formats to run, {format: why skipped}). None: the defaults, ONNX only when installed."""
    if text is None:
        skipped = {"onnx": reason} if (reason := onnx_missing()) else {}
        return [f for f in DEFAULT_FORMATS if f not in skipped], skipped
    names = export_format_names(text)
    if "onnx" in names and (reason := onnx_missing()):
        raise UsageError(f"--format onnx {reason}, or drop onnx from --format")
    return names, {}


def load_run_model(run_dir: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """The run's ResNet-18 with its checkpoint's weights, in eval mode on the CPU, and a description of
    the source. Every problem is one UsageError line (the checkpoint is read with weights_only=True)."""
    folder = Path(run_dir)
    if not folder.is_dir():
        raise UsageError(f"{str(run_dir)!r} is not a folder; pass a run folder such as runs/20260101-120000-train")
    path = folder / CHECKPOINT_NAME
    if not path.is_file():
        raise UsageError(f"{str(folder)!r} has no {CHECKPOINT_NAME} (the run stopped before its first checkpoint or ran "
                         f"with --checkpoint-every 0); train it with checkpoints, then export")
    ckpt = load_checkpoint(path)
    config = ckpt["config"] if isinstance(ckpt["config"], dict) else {}
    norm = config.get("norm", "batch")
    if norm not in NORMS:
        raise UsageError(f"{str(path)!r}: its config has norm {norm!r}, not one of {', '.join(NORMS)}; it is not a cifarlab run")
    model = resnet18(norm=norm)
    try:
        model.load_state_dict(ckpt["model"], strict=True)
    except (RuntimeError, KeyError, TypeError, ValueError, AttributeError) as e:
        raise UsageError(f"{str(path)!r} does not hold cifarlab's ResNet-18 (norm={norm}) weights "
                         f"({type(e).__name__}: {one_line(e, EXCEPTION_CHARS)}); export only checkpoints written by cifarlab train") from None
    bad = [name for name, t in model.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise UsageError(f"{str(path)!r}: weights hold NaN/inf (first: {bad[0]}); the run diverged -- export an earlier run")
    source = {"run_dir": str(folder), "checkpoint": str(path), "epoch": int(ckpt["epoch"]), "norm": norm,
              "dataset": config.get("dataset"), "seed": config.get("seed", 0), "data_dir": config.get("data_dir")}
    return model.eval(), source


def normalize(images_hwc: np.ndarray) -> torch.Tensor:
    """uint8 NHWC images -> float32 NCHW normalized like the lab's test transform."""
    x = torch.from_numpy(np.ascontiguousarray(images_hwc)).permute(0, 3, 1, 2).float().div(255)
    mean = torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR_STD).view(1, 3, 1, 1)
    return ((x - mean) / std).contiguous()


def check_batch(source: dict[str, Any], n: int = CHECK_IMAGES) -> tuple[torch.Tensor, str]:
    """A fixed batch of n test images: the first n of CIFAR-10's test split when the run used CIFAR-10 and it
    is on disk (never downloaded here), else the synthetic test images of the run's seed."""
    data_dir = source.get("data_dir") or "./data"
    if source.get("dataset") != "synthetic" and cifar_present(data_dir):
        _, test, _ = load_cifar10(data_dir)
        return normalize(test.images[:n]), f"first {n} CIFAR-10 test images"
    seed = int(source.get("seed") or 0)
    return normalize(synthetic_split(n, seed, "test").images), f"{n} synthetic test images (seed {seed})"


# ------------------------------------------------------------------------- exporters and loaders


def _quiet() -> contextlib.ExitStack:
    """Silence the deprecation warnings torch.jit prints on every call, and torch.onnx's progress lines."""
    stack = contextlib.ExitStack()
    stack.enter_context(warnings.catch_warnings())
    warnings.simplefilter("ignore")
    stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
    stack.enter_context(torch.no_grad())
    return stack


def _batch_dim() -> dict[str, Any]:
    return {"x": {0: torch.export.Dim("batch", min=1, max=MAX_DYNAMIC_BATCH)}}


def _export_trace(model: nn.Module, x: torch.Tensor, path: Path) -> str:
    with _quiet():
        traced = torch.jit.trace(model, x, check_trace=False)  # our own check below is stricter
        write_serialized_atomic(path, lambda f: torch.jit.save(traced, f))
    return f"# torch.jit.trace(model, batch of {x.shape[0]}): inlined graph (every recorded aten op)\n{traced.inlined_graph}"


def _export_script(model: nn.Module, x: torch.Tensor, path: Path) -> str:
    with _quiet():
        scripted = torch.jit.script(model)
        write_serialized_atomic(path, lambda f: torch.jit.save(scripted, f))
    parts = [("ResNet.forward", scripted), ("layer1[0] (BasicBlock).forward", getattr(scripted.layer1, "0")),
             (f"bn1 ({type(model.bn1).__name__}).forward", scripted.bn1)]
    return "\n".join(f"# {name}\n{module.code}" for name, module in parts)


def _exported_program(model: nn.Module, x: torch.Tensor) -> Any:
    with _quiet():
        return torch.export.export(model, (x,), dynamic_shapes=_batch_dim())


def _export_export(model: nn.Module, x: torch.Tensor, path: Path) -> str:
    program = _exported_program(model, x)
    write_serialized_atomic(path, lambda f: torch.export.save(program, f))
    return f"# torch.export.export(model, (x,), batch dimension dynamic 1..{MAX_DYNAMIC_BATCH})\n{program}"


def _export_onnx(model: nn.Module, x: torch.Tensor, path: Path) -> str:
    with _quiet():
        program = torch.onnx.export(model, (x,), dynamo=True, dynamic_shapes=_batch_dim(), input_names=["x"],
                                    output_names=["logits"])
        program.save(str(path))
    return ""


def _export_aoti(model: nn.Module, x: torch.Tensor, path: Path) -> str:
    program = _exported_program(model, x)
    with _quiet():
        torch._inductor.aoti_compile_and_package(program, package_path=str(path))
    return ""


EXPORTERS: dict[str, Callable[[nn.Module, torch.Tensor, Path], str]] = {
    "torchscript-trace": _export_trace, "torchscript-script": _export_script, "export": _export_export,
    "onnx": _export_onnx, "aoti": _export_aoti,
}


def load_onnx(path: Path | bytes, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    """An ONNX Runtime session as a tensor -> tensor function."""
    import onnxruntime as ort  # an optional extra: imported only when an ONNX file is loaded (see onnx_missing)

    providers = ["CPUExecutionProvider"]
    if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only
    # As many threads as torch uses, and no spin-waiting after a run: in a benchmark where runtimes take
    # turns, spinning threads would steal the cores of the next runtime's call.
    options.intra_op_num_threads = torch.get_num_threads()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    model = path if isinstance(path, bytes) else str(path)
    session = ort.InferenceSession(model, sess_options=options, providers=providers)
    name = session.get_inputs()[0].name

    def run(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {name: x.detach().cpu().numpy()})[0])

    run.providers = session.get_providers()  # type: ignore[attr-defined]
    return run


def load_artifact(fmt: str, path: Path, device: torch.device,
                  data: bytes | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """Read an artifact back from disk as a callable on `device` (what a deployment would do). data: the
    file's bytes, already read and checked (exporttrust), loaded instead of reading path again."""
    source: Any = io.BytesIO(data) if data is not None else str(path)
    with _quiet():
        if fmt in ("torchscript-trace", "torchscript-script"):
            return torch.jit.load(source, map_location=device).eval()
        if fmt == "export":
            return torch.export.load(source).module().to(device)
        if fmt == "aoti":
            return torch._inductor.aoti_load_package(str(path))  # a package loads from its path only
    if fmt == "onnx":
        return load_onnx(data if data is not None else path, device)
    raise UsageError(f"format {fmt!r} is not known; choose from: {', '.join(FORMATS)}")


# ------------------------------------------------------------------------------------- checking


def mode_switch_facts(model: nn.Module, x: torch.Tensor) -> dict[str, Any]:
    """Measured, not asserted: does `.train()` change the output of the traced / scripted module?"""
    facts: dict[str, Any] = {"explanation": TRACING_VS_SCRIPTING}
    with _quiet():
        ref = model(x)
        for name, convert in (("traced", lambda m: torch.jit.trace(m, x, check_trace=False)),
                              ("scripted", torch.jit.script)):
            module = convert(model).train()
            facts[f"{name}_train_mode_max_abs_logit_change"] = float((module(x) - ref).abs().max())
    model.eval()
    return facts


def sha256_file(path: Path) -> str:
    return file_digest(path, "sha256")


# --------------------------------------------------------------------------------------- export


def export_model(model: nn.Module, out_dir: str | Path, formats: list[str] | tuple[str, ...],
                 example_batch: torch.Tensor, *, device: str | torch.device = "cpu",
                 source: dict[str, Any] | None = None, check_images: str = "given batch",
                 skipped: dict[str, str] | None = None, raise_on_mismatch: bool = True,
                 out_flag: str = "--out") -> dict[str, Any]:
    """Export `model` (eval mode) in every format, reload each file, compare with eager on example_batch
    (N x 3 x 32 x 32, normalized), then move the files and export.json into out_dir. Returns export.json's
    content. A mismatch raises ExportMismatch and writes nothing, unless raise_on_mismatch=False (then the
    files are kept and each format's check says ok: false)."""
    device = torch.device(device)
    formats = list(formats)
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise UsageError(f"format {unknown[0]!r} is not known; choose from: {', '.join(FORMATS)}")
    created = not Path(out_dir).exists()
    refuse_foreign_out(Path(out_dir), out_flag, "export", lambda name: recorded_in(
        Path(out_dir), name, EXPORT_JSON, EXPORT_SCHEMA, tuple(GRAPH_FILES.values())))
    out = ensure_writable_dir(Path(out_dir), out_flag)
    model = copy.deepcopy(model).eval().to(device)  # the caller's model keeps its device and mode
    x = example_batch.to(device)
    with torch.no_grad():
        reference = model(x).float().cpu()
    tolerance_rel, tolerance_abs = tolerances(device.type)
    staging = Path(tempfile.mkdtemp(prefix=".export-staging-", dir=out))
    try:
        artifacts: dict[str, Any] = {}
        for fmt in formats:
            path = staging / ARTIFACTS[fmt]
            t0 = time.perf_counter()
            graph_text = EXPORTERS[fmt](model, x, path)
            export_s = time.perf_counter() - t0
            if graph_text:
                write_text_atomic(staging / GRAPH_FILES[fmt], graph_text + "\n")
            t0 = time.perf_counter()
            loaded = load_artifact(fmt, path, device)
            check = compare(loaded, x, reference, device.type)
            artifacts[fmt] = {
                "file": ARTIFACTS[fmt], "bytes": path.stat().st_size, "sha256": sha256_file(path),
                "graph_file": GRAPH_FILES[fmt] if graph_text else None,
                "dynamic_batch": check["batch1_ok"],
                "export_s": round(export_s, 3), "reload_and_check_s": round(time.perf_counter() - t0, 3),
                "check": check,
            }
            if fmt == "torchscript-trace":
                artifacts[fmt]["note"] = ("traced at one batch size; the batch dimension is not fixed because no "
                                          "op depends on it (dynamic_batch is measured at batch 1)")
        report = {
            "schema": EXPORT_SCHEMA, "created_utc": utc_now(), "source": source or {"in_memory": True},
            "torch": str(torch.__version__), "device": str(device), "formats": formats, "skipped": skipped or {},
            "input": {"shape": ["batch", 3, 32, 32], "dtype": "float32", "layout": "NCHW contiguous",
                      "normalization": {"mean": list(CIFAR_MEAN), "std": list(CIFAR_STD)},
                      "dynamic_batch_range": [1, MAX_DYNAMIC_BATCH], "example_batch": int(x.shape[0])},
            "check": {"images": check_images, "tolerance_relative": tolerance_rel, "tolerance_abs": tolerance_abs,
                      "logit_limit": LOGIT_LIMIT, "rule": rule(device.type)},
            "artifacts": artifacts,
            "environment": environment(device),
        }
        if getattr(model, "norm", "batch") == "batch" and {"torchscript-trace", "torchscript-script"} <= set(formats):
            report["tracing_vs_scripting"] = mode_switch_facts(model, x)
        failed = [f for f in formats if not artifacts[f]["check"]["ok"]]
        inconclusive = any(artifacts[f]["check"]["status"] == "inconclusive" for f in failed)
        report["status"] = ("inconclusive" if inconclusive else "mismatch") if failed else "ok"
        if failed and raise_on_mismatch:
            c = artifacts[failed[0]]["check"]
            if inconclusive:
                raise ExportMismatch(
                    f"the check is inconclusive: the model's eager logits reach {c['max_abs_eager_logit']:.3g} (limit "
                    f"{LOGIT_LIMIT:g}), so no tolerance can tell a correct export from a wrong one; nothing was "
                    f"written to {str(out)!r} -- export a run that trained properly", report)
            raise ExportMismatch(
                f"{failed[0]} does not match eager: max |logit diff| {c['max_abs_logit_diff']:.3g} (batch 1: "
                f"{c['batch1_max_abs_logit_diff']:.3g}), {c['worst_diff_over_tolerance']:.3g}x the per-logit tolerance "
                f"({tolerance_rel:g} * |logit| + {tolerance_abs:g}), top-1 {c['top1_agree']}/{c['images']}; nothing "
                f"was written to {str(out)!r}", report)
        write_json_atomic(staging / EXPORT_JSON, report)
        for name in sorted(os.listdir(staging)):  # on disk before any rename makes it visible
            with open(staging / name, "rb") as f:
                os.fsync(f.fileno())
        with signals_deferred():  # a Ctrl-C now cannot leave half of the files renamed
            for name in sorted(os.listdir(staging), key=lambda n: n == EXPORT_JSON):  # export.json last
                os.replace(staging / name, out / name)
    except (OSError, RuntimeError) as e:  # torch wraps an OSError of its writer in a RuntimeError
        raise_if_interrupted(e)  # ... and a Ctrl-C that landed in Python code torch called
        os_error = os_error_in_chain(e)
        if os_error is None:
            raise
        raise UsageError(f"{out_flag} {str(out)!r}: writing the export failed ({os_error.strerror or os_error}); "
                         f"nothing was left half-written -- free space or choose another folder") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if created and not any(out.iterdir()):
            out.rmdir()  # a failed export into a folder it created leaves no trace
    return report


def export_run(run_dir: str | Path, formats: list[str], *, out_dir: str | Path | None = None,
               device: str = "cpu", check_images: int = CHECK_IMAGES,
               skipped: dict[str, str] | None = None) -> tuple[dict[str, Any], Path]:
    """`cifarlab export`: the run's checkpoint -> artifacts in out_dir (default RUN_DIR/export)."""
    if device == "cuda" and not torch.cuda.is_available():  # export's --device has no 'auto' to suggest
        raise UsageError("--device cuda: no CUDA device is available here; use --device cpu")
    model, source = load_run_model(run_dir)
    out = Path(out_dir) if out_dir is not None else Path(run_dir) / "export"
    x, described = check_batch(source, check_images)
    report = export_model(model, out, formats, x, device=device, source=source, check_images=described,
                          skipped=skipped, out_flag="--out" if out_dir is not None else "the default --out")
    return report, out


def graph_excerpt(out_dir: str | Path, fmt: str, lines: int = 12) -> str:
    """The first lines of a format's graph text file (for reports)."""
    path = Path(out_dir) / GRAPH_FILES[fmt]
    with open(path, encoding="utf-8") as f:
        return "".join(line for _, line in zip(range(lines), f))
