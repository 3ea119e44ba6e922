"""Command line: argv -> parsed flags -> one command (commands.py). torch is imported only when a command
runs, so `--help` and bad-flag errors are instant.

Flag defaults are *not* set here: options the user did not give are absent from the parsed
namespace (argparse.SUPPRESS), and TrainConfig supplies the default -- one place for defaults.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Callable, Sequence

from cifarlab import __version__
from cifarlab.cli.export_parsers import add_export_parser, add_infer_bench_parser
from cifarlab.cli.rendezvous import add_launch_options
from cifarlab.cli.slurm import add_slurm_parser, cmd_slurm
from cifarlab.config import DATASETS, DEVICES, INSPECT_BATCH_SIZE, LAB_PRESETS
from cifarlab.config.flags import PROG, Parser, add_train_options, config_from_args
from cifarlab.core.errors import UsageError
from cifarlab.core.signals import Stopped

__all__ = ["PROG", "SUBCOMMANDS", "add_train_options", "build_parser", "config_from_args", "main"]


def run_command(name: str) -> Callable[[argparse.Namespace], int]:
    """The parser's func for a subcommand whose code lives in commands.py."""

    def run(args: argparse.Namespace) -> int:
        # Before torch loads: keeps the profiler library's (kineto) start/stop chatter out of the output.
        os.environ.setdefault("KINETO_LOG_LEVEL", "5")
        # Deferred on purpose: commands import torch (seconds); --help and bad flags stay instant.
        from cifarlab.cli.commands import COMMANDS

        return COMMANDS[name](args)

    return run


def _add_inspect(sub: Any) -> None:
    p = sub.add_parser("inspect", help="model facts for lab Q1-Q4, computed from the model")
    p.add_argument("--optimizer", action="append", metavar="NAME", help="optimizer(s) to measure (default sgd and adam)")
    p.add_argument("--no-batchnorm", action="store_true", help="the C7 variant without BatchNorm")
    p.add_argument("--batch-size", type=int, default=INSPECT_BATCH_SIZE,
                   help=f"batch for the real backward pass (default {INSPECT_BATCH_SIZE})")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run_command("inspect"))


def _add_train(sub: Any) -> None:
    p = sub.add_parser("train", help="train ResNet-18 once and record per-epoch timings",
                       argument_default=argparse.SUPPRESS)
    add_train_options(p)
    p.add_argument("--resume", metavar="RUN_DIR",
                   help="continue an interrupted run from its checkpoint (its own config; only --epochs may change); "
                        "auto with --run-dir DIR: continue DIR if it has a checkpoint, else start there")
    p.add_argument("--tensorboard", nargs="?", const="", metavar="DIR",
                   help="write TensorBoard event files to DIR/<run folder name> (default DIR: <--out>/tensorboard); "
                        "needs pip install 'cifarlab[tensorboard]'")
    p.add_argument("--nproc", type=int, metavar="N",
                   help="data-parallel on N processes (one per GPU; on CPU the cores are split): runs torchrun; "
                        "--batch-size is then per process")
    add_launch_options(p)
    p.set_defaults(func=run_command("train"))


def _add_lab(sub: Any) -> None:
    p = sub.add_parser("lab", help="run the lab (C1-C8, Q1-Q4) end to end and write a report",
                       argument_default=argparse.SUPPRESS)
    p.add_argument("--suite", help="which suite of experiments (default lab)")
    p.add_argument("--preset", choices=tuple(LAB_PRESETS),
                   help="smoke (seconds, synthetic), quick (minutes on a CPU), full (the lab as written); "
                        "default: full with a GPU, quick otherwise")
    p.add_argument("--only", metavar="ITEMS", help="comma-separated items to run, e.g. c1,c3,q")
    p.add_argument("--repeats", type=int, metavar="N", help="C3 repeats per worker count (default: the preset's)")
    p.add_argument("--device", choices=DEVICES, help="auto (default), cpu or cuda")
    p.add_argument("--data", dest="data_dir", metavar="DIR", help="folder holding cifar-10-batches-py/ (default ./data)")
    p.add_argument("--dataset", choices=DATASETS,
                   help="auto (default: CIFAR-10 when on disk or downloadable, else synthetic), cifar10, synthetic")
    p.add_argument("--out", dest="out_dir", metavar="DIR", help="where the lab folder is created (default runs/)")
    p.add_argument("--seed", type=int, help="base seed (default 0)")
    p.add_argument("--budget", dest="budget_min", type=float, metavar="MINUTES",
                   help="size C3's and C8's repeats and steps to fit this many minutes (the report says what was cut)")
    p.add_argument("--tensorboard", nargs="?", const="", metavar="DIR",
                   help="TensorBoard event files, one run per training run named <item>/<label> (e.g. c6/adam), under "
                        "DIR/<lab folder name> (default DIR: the lab folder's tensorboard/)")
    p.set_defaults(func=run_command("lab"))


def _add_report(sub: Any) -> None:
    p = sub.add_parser("report", help="rebuild a lab's report (md, html, csv, plots) from its folder")
    p.add_argument("lab_dir", metavar="LAB_DIR", help="a folder written by 'cifarlab lab'")
    p.set_defaults(func=run_command("report"))


def _add_doctor(sub: Any) -> None:
    p = sub.add_parser("doctor", help="measure where a config's step time goes, try the changes that address it, "
                                      "recommend the best measured one", argument_default=argparse.SUPPRESS)
    add_train_options(p)
    p.add_argument("--budget", type=float, metavar="SECONDS",
                   help="time for the whole diagnosis (default about 60 s on a GPU, 180 s on a CPU)")
    p.set_defaults(func=run_command("doctor"))


# name -> function that adds the subcommand's parser
SUBCOMMANDS: dict[str, Callable[[Any], None]] = {
    "train": _add_train, "inspect": _add_inspect, "lab": _add_lab, "report": _add_report, "doctor": _add_doctor,
    "export": lambda sub: add_export_parser(sub, run_command("export")),
    "infer-bench": lambda sub: add_infer_bench_parser(sub, run_command("infer-bench")),
    # no torch: it writes and submits a batch script; the command after -- is checked by this parser
    "slurm": lambda sub: add_slurm_parser(sub, lambda args: cmd_slurm(args, parse)),
}


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog=PROG, description="Train ResNet-18 on CIFAR-10 and measure where the time goes.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True
    for add in SUBCOMMANDS.values():
        add(sub)
    return parser


def parse(words: list[str]) -> argparse.Namespace:
    """argv -> the namespace of one command; anything unknown is one line."""
    parser = build_parser()
    # `slurm OPTIONS -- COMMAND ...`: the command after -- is slurm's to check, not this parse's
    own = words[:words.index("--")] if words[:1] == ["slurm"] and "--" in words else words
    args, extra = parser.parse_known_args(own)
    if extra:  # argparse's own error would point at the top-level help, which lists no subcommand's flags
        parser.prog = f"{PROG} {args.command}"
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.argv = words  # the launcher forwards the user's own train flags to torchrun's processes
    return args


def main(argv: Sequence[str] | None = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parse(words)
        return int(args.func(args) or 0)
    except UsageError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return e.exit_code
    except Stopped as e:  # export, infer-bench, doctor: their staging is removed, what they measured is kept
        print(f"{PROG}: interrupted ({e.signal_name}); {e.kept}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader of stdout went away (`cifarlab inspect | head`): no traceback. Python's documented recipe:
        # point stdout at devnull so the interpreter's own flush at exit cannot raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
