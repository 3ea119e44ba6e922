"""What `cifarlab export` and `cifarlab infer-bench` do: check the flags, call export.export_run /
inferbench.bench_path, print the results. Reached through commands.COMMANDS (torch is imported here)."""

from __future__ import annotations

import argparse
import sys

from cifarlab.cli.export_parsers import batch_sizes, format_list, positive
from cifarlab.core.errors import UsageError
from cifarlab.core.signals import RaiseOnSignal, Stopped
from cifarlab.export import artifacts as ex
from cifarlab.export import bench as ib
from cifarlab.export.check import verdict


def _human_bytes(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def cmd_export(args: argparse.Namespace) -> int:
    formats_text = format_list(args.format) if args.format is not None else None
    check_images = positive("--check-images", args.check_images, 10_000)
    formats, skipped = ex.parse_formats(formats_text)
    with RaiseOnSignal():  # a signal removes the staging folder (export_model's finally) and ends here
        try:
            report, out = ex.export_run(args.run_dir, formats, out_dir=args.out, device=args.device,
                                        check_images=check_images, skipped=skipped)
        except Stopped as e:
            raise Stopped(e.signum, "nothing was written and no staging folder is left") from None
    src, chk = report["source"], report["check"]
    print(f"export: {src['run_dir']} (epoch {src['epoch']}, norm {src['norm']}) -> {out}")
    print(f"check:  {chk['images']} on {report['device']}; {chk['rule']}")
    width = max(len(f) for f in formats)
    for fmt in formats:
        a = report["artifacts"][fmt]
        c = a["check"]
        print(f"  {fmt:<{width}}  {a['file']:<22} {_human_bytes(a['bytes']):>9}  max|diff| {c['max_abs_logit_diff']:.2e}"
              f"  top-1 {c['top1_agree']}/{c['images']}  batch 1 {'ok' if a['dynamic_batch'] else 'FAILED'}"
              f"  export {a['export_s']:.1f} s  {verdict(c)}")
    for fmt, reason in report["skipped"].items():
        print(f"  {fmt:<{width}}  skipped: {reason}")
    tvs = report.get("tracing_vs_scripting")
    if tvs:
        print(f"  .train() after export changes the logits by: traced {tvs['traced_train_mode_max_abs_logit_change']:.3g}, "
              f"scripted {tvs['scripted_train_mode_max_abs_logit_change']:.3g} (BatchNorm mode frozen by tracing)")
    print(f"wrote {out / ex.EXPORT_JSON} and the graph text files beside the artifacts")
    return 0


def cmd_infer_bench(args: argparse.Namespace) -> int:
    sizes = batch_sizes(args.batch_sizes)
    iters = positive("--iters", args.iters, 100_000)
    if not 1 <= args.warmup <= 10_000:  # bench() always makes the first call untimed (its first_call_ms)
        raise UsageError(f"--warmup {args.warmup} is out of range; use 1..10000 (the first call is never timed; "
                         f"its latency is first_call_ms in inferbench.csv/json)")
    if not args.budget_s > 0:
        raise UsageError(f"--budget-s {args.budget_s} must be > 0 (seconds per variant and batch size)")

    def log(line: str) -> None:
        print(line, flush=True)

    with RaiseOnSignal():  # a temporary export is removed on the way out; results are written only at the end
        try:
            rows, paths = ib.bench_path(args.path, out_dir=args.out, device=args.device, batch_sizes=sizes,
                                        iters=iters, warmup=args.warmup, budget_s=args.budget_s,
                                        compile_mode=args.compile, log=log, allow_code=args.allow_code_execution)
        except Stopped as e:
            raise Stopped(e.signum, "no result file was written and no temporary export is left") from None
    print(ib.format_table(rows))
    print(f"wrote {paths['txt']}, {paths['csv'].name}, {paths['json'].name}, {paths['png'].name}")
    failed = [r for r in rows if r["status"] != "ok"]
    if failed:
        print(f"cifarlab: warning: {len(failed)} variant/batch cell(s) failed; see the table", file=sys.stderr)
    return 0
