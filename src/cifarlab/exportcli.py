"""Command line of `cifarlab export` and `cifarlab infer-bench`: parsers, flag checks and console output.

Like cli.py this module imports no torch: the commands import cifarlab.export / cifarlab.inferbench (and
with them torch) only when they run, so `cifarlab --help` stays instant.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from cifarlab.errors import UsageError

FORMAT_NAMES = ("torchscript-trace", "torchscript-script", "export", "onnx", "aoti")  # == export.FORMATS
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")


def _human_bytes(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def _format_list(text: str) -> str:
    """Check --format names here (before torch is imported) so a typo is reported at once."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise UsageError(f"--format {text!r} names no format; choose from: {', '.join(FORMAT_NAMES)}")
    for name in names:
        if name not in FORMAT_NAMES:
            raise UsageError(f"--format {name!r} is not known; choose from: {', '.join(FORMAT_NAMES)} (comma-separated)")
    return ",".join(names)


def _positive(flag: str, value: int, high: int) -> int:
    if not 1 <= value <= high:
        raise UsageError(f"{flag} {value} is out of range; use 1..{high}")
    return value


def _batch_sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise UsageError(f"--batch-sizes {text!r} is not a comma-separated list of integers; e.g. 1,100,128") from None
    if not sizes:
        raise UsageError(f"--batch-sizes {text!r} names no batch size; e.g. 1,100,128")
    for size in sizes:
        _positive("--batch-sizes", size, 4096)
    return tuple(dict.fromkeys(sizes))


# ------------------------------------------------------------------------------------------ export


def cmd_export(args: argparse.Namespace) -> int:
    formats_text = _format_list(args.format) if args.format is not None else None
    check_images = _positive("--check-images", args.check_images, 10_000)
    from cifarlab import export as ex

    formats, skipped = ex.parse_formats(formats_text)
    report, out = ex.export_run(args.run_dir, formats, out_dir=args.out, device=args.device,
                                check_images=check_images, skipped=skipped)
    src, chk = report["source"], report["check"]
    print(f"export: {src['run_dir']} (epoch {src['epoch']}, norm {src['norm']}) -> {out}")
    print(f"check:  {chk['images']} on {report['device']}; {chk['rule']} (tolerance {chk['tolerance_abs']:.3g})")
    width = max(len(f) for f in formats)
    for fmt in formats:
        a = report["artifacts"][fmt]
        c = a["check"]
        print(f"  {fmt:<{width}}  {a['file']:<22} {_human_bytes(a['bytes']):>9}  max|diff| {c['max_abs_logit_diff']:.2e}"
              f"  top-1 {c['top1_agree']}/{c['images']}  batch 1 {'ok' if a['dynamic_batch'] else 'FAILED'}"
              f"  export {a['export_s']:.1f} s  {'ok' if c['ok'] else 'MISMATCH'}")
    for fmt, reason in report["skipped"].items():
        print(f"  {fmt:<{width}}  skipped: {reason}")
    tvs = report.get("tracing_vs_scripting")
    if tvs:
        print(f"  .train() after export changes the logits by: traced {tvs['traced_train_mode_max_abs_logit_change']:.3g}, "
              f"scripted {tvs['scripted_train_mode_max_abs_logit_change']:.3g} (BatchNorm mode frozen by tracing)")
    print(f"wrote {out / ex.EXPORT_JSON} and the graph text files beside the artifacts")
    return 0


def add_export_parser(sub: Any) -> None:
    p = sub.add_parser("export", help="export a run's model (TorchScript, torch.export, ONNX, AOTInductor) and "
                                      "check each artifact against eager")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run folder holding checkpoint.pt")
    p.add_argument("--format", metavar="F1,F2", default=None,
                   help=f"comma-separated, from: {', '.join(FORMAT_NAMES)} (default: torchscript-trace,"
                        f"torchscript-script,export, and onnx when the onnx extras are installed; aoti is opt-in: "
                        f"it compiles C++ and takes minutes on a CPU)")
    p.add_argument("--out", metavar="DIR", default=None, help="output folder (default RUN_DIR/export)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="device the artifacts are traced/exported and checked on (default cpu; aoti compiles for it)")
    p.add_argument("--check-images", type=int, metavar="N", default=64,
                   help="test images in the fixed check batch (default 64)")
    p.set_defaults(func=cmd_export)


# ------------------------------------------------------------------------------------- infer-bench


def cmd_infer_bench(args: argparse.Namespace) -> int:
    sizes = _batch_sizes(args.batch_sizes)
    iters = _positive("--iters", args.iters, 100_000)
    if not 0 <= args.warmup <= 10_000:
        raise UsageError(f"--warmup {args.warmup} is out of range; use 0..10000")
    if not args.budget_s > 0:
        raise UsageError(f"--budget-s {args.budget_s} must be > 0 (seconds per variant and batch size)")
    from cifarlab import inferbench as ib

    def log(line: str) -> None:
        print(line, flush=True)

    rows, paths = ib.bench_path(args.path, out_dir=args.out, device=args.device, batch_sizes=sizes, iters=iters,
                                warmup=args.warmup, budget_s=args.budget_s, compile_mode=args.compile, log=log)
    print(ib.format_table(rows))
    print(f"wrote {paths['txt']}, {paths['csv'].name}, {paths['json'].name}, {paths['png'].name}")
    failed = [r for r in rows if r["status"] != "ok"]
    if failed:
        print(f"cifarlab: warning: {len(failed)} variant/batch cell(s) failed; see the table", file=sys.stderr)
    return 0


def add_infer_bench_parser(sub: Any) -> None:
    p = sub.add_parser("infer-bench", help="inference latency (p50/p95/p99, images/s) of eager vs exported models")
    p.add_argument("path", metavar="RUN_DIR_OR_EXPORT_DIR",
                   help="a run folder (its export/ is used, or a temporary export is made) or an export folder")
    p.add_argument("--batch-sizes", default="1,100,128", metavar="B1,B2", help="batch sizes (default 1,100,128)")
    p.add_argument("--iters", type=int, default=20, metavar="N", help="timed calls per variant and batch size (default 20)")
    p.add_argument("--warmup", type=int, default=2, metavar="N", help="untimed calls first (default 2)")
    p.add_argument("--budget-s", type=float, default=1.0, metavar="S",
                   help="stop timing a batch size once its variants took about S seconds each (after at least 5 "
                        "calls; default 1.0)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto (default): the CPU, and CUDA too when present")
    p.add_argument("--compile", nargs="?", const="default", choices=COMPILE_MODES, default=None, metavar="MODE",
                   help="also time torch.compile(model, mode=MODE) (default mode 'default'; compiling takes a while)")
    p.add_argument("--out", metavar="DIR", default=None, help="output folder (default <path>/inferbench)")
    p.set_defaults(func=cmd_infer_bench)
