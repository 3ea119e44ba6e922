"""Command line of `cifarlab export` and `cifarlab infer-bench`: their parsers and flag checks.

Like cli.py this module imports no torch, so `cifarlab --help` stays instant. What the commands do is in
exportcmds.py; cli.py hands each parser the deferred runner (`run_command`) that reaches it through
commands.COMMANDS, the one place where the command line defers an import.
"""

from __future__ import annotations

import argparse
from typing import Any, Callable

from cifarlab.config import (
    COMPILE_MODES,
    EXPORT_CHECK_IMAGES,
    EXPORT_FORMATS,
    INFER_BENCH_BATCH_SIZES,
    INFER_BENCH_ITERS,
    INFER_BENCH_WARMUP,
    export_format_names,
)
from cifarlab.core.errors import UsageError

COMPILED_MODES = tuple(m for m in COMPILE_MODES if m != "none")  # infer-bench --compile [MODE]


def format_list(text: str) -> str:
    """Check --format names here (before torch is imported) so a typo is reported at once."""
    return ",".join(export_format_names(text))


def positive(flag: str, value: int, high: int) -> int:
    if not 1 <= value <= high:
        raise UsageError(f"{flag} {value} is out of range; use 1..{high}")
    return value


def batch_sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise UsageError(f"--batch-sizes {text!r} is not a comma-separated list of integers; e.g. 1,100,128") from None
    if not sizes:
        raise UsageError(f"--batch-sizes {text!r} names no batch size; e.g. 1,100,128")
    for size in sizes:
        positive("--batch-sizes", size, 4096)
    return tuple(dict.fromkeys(sizes))


# ------------------------------------------------------------------------------------------ export


def add_export_parser(sub: Any, run: Callable[[argparse.Namespace], int]) -> argparse.ArgumentParser:
    p = sub.add_parser("export", help="export a run's model (TorchScript, torch.export, ONNX, AOTInductor) and "
                                      "check each artifact against eager")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run folder holding checkpoint.pt")
    p.add_argument("--format", metavar="F1,F2", default=None,
                   help=f"comma-separated, from: {', '.join(EXPORT_FORMATS)} (default: torchscript-trace,"
                        f"torchscript-script,export, and onnx when the onnx extras are installed; aoti is opt-in: "
                        f"it compiles C++ and takes minutes on a CPU)")
    p.add_argument("--out", metavar="DIR", default=None, help="output folder (default RUN_DIR/export)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="device the artifacts are traced/exported and checked on (default cpu; aoti compiles for it)")
    p.add_argument("--check-images", type=int, metavar="N", default=EXPORT_CHECK_IMAGES,
                   help=f"test images in the fixed check batch (default {EXPORT_CHECK_IMAGES})")
    p.set_defaults(func=run)
    return p


# ------------------------------------------------------------------------------------- infer-bench


def add_infer_bench_parser(sub: Any, run: Callable[[argparse.Namespace], int]) -> argparse.ArgumentParser:
    p = sub.add_parser("infer-bench", help="inference latency (p50/p95/p99, images/s) of eager vs exported models")
    p.add_argument("path", metavar="RUN_DIR_OR_EXPORT_DIR",
                   help="a run folder (its export/ is used, or a temporary export is made) or an export folder")
    sizes = ",".join(str(b) for b in INFER_BENCH_BATCH_SIZES)
    p.add_argument("--batch-sizes", default=sizes, metavar="B1,B2", help=f"batch sizes (default {sizes})")
    p.add_argument("--iters", type=int, default=INFER_BENCH_ITERS, metavar="N",
                   help=f"timed calls per variant and batch size (default {INFER_BENCH_ITERS})")
    p.add_argument("--warmup", type=int, default=INFER_BENCH_WARMUP, metavar="N",
                   help=f"untimed calls first, at least 1 (default {INFER_BENCH_WARMUP}; the first call's "
                   "latency is kept as first_call_ms)")
    p.add_argument("--budget-s", type=float, default=1.0, metavar="S",
                   help="stop timing a batch size once its variants took about S seconds each (after at least 5 "
                        "calls; default 1.0)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto (default): the CPU, and CUDA too when present")
    p.add_argument("--compile", nargs="?", const="default", choices=COMPILED_MODES, default=None, metavar="MODE",
                   help="also time torch.compile(model, mode=MODE) (default mode 'default'; compiling takes a while)")
    p.add_argument("--out", metavar="DIR", default=None, help="output folder (default <path>/inferbench)")
    p.add_argument("--allow-code-execution", action="store_true",
                   help="also load artifacts that run code when loaded (AOTInductor packages, .pt2 files with "
                        "pickled entries); only for export folders you made or trust (sha256 and folder checks "
                        "still apply)")
    p.set_defaults(func=run)
    return p
