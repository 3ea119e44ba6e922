"""Command line: argv -> config -> one call. torch is imported only inside the commands, so `--help`
and bad-flag errors are instant.

Flag defaults are *not* set here: options the user did not give are absent from the parsed
namespace (argparse.SUPPRESS), and TrainConfig supplies the default -- one place for defaults.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from typing import Any, Callable, Sequence

from cifarlab.config import COMPILE_MODES, DATASETS, DEVICES, LOADERS, PRECISIONS, TrainConfig
from cifarlab.errors import UsageError

PROG = "cifarlab"


class _Parser(argparse.ArgumentParser):
    """argparse prints the whole usage block on error; we print one line that names the problem."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # argparse takes "-1e-4" and "-inf" for option names ("--weight-decay: expected one argument");
        # read them as the negative numbers the user meant, so validation can name the value.
        self._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-(inf|infinity|nan)$", re.I)

    def error(self, message: str) -> None:  # type: ignore[override]
        # argparse quotes some values verbatim ("unrecognized arguments: a<newline>b"): keep it one line.
        message = message.replace("\r", "\\r").replace("\n", "\\n")
        raise UsageError(f"{message} (see '{self.prog} --help')")


def add_train_options(p: argparse.ArgumentParser) -> None:
    """Flags that map one-to-one onto TrainConfig fields (dest == field name)."""
    d = p.add_argument_group("data")
    d.add_argument("--data", dest="data_dir", metavar="DIR", help="folder holding cifar-10-batches-py/ (default ./data)")
    d.add_argument("--dataset", choices=DATASETS, help="cifar10 (default), synthetic (offline stand-in), or auto")
    d.add_argument("--subset", type=int, metavar="N", help="train on a stratified subset of N images")
    d.add_argument("--test-subset", type=int, metavar="N", help="evaluate on a stratified subset of N test images")
    d.add_argument("--loader", choices=LOADERS, help="device (default): split resident on the device, batched crop/flip there; "
                   "torch: the classic DataLoader + PIL transforms (C2-C4)")
    d.add_argument("--workers", type=int, metavar="N", help="DataLoader worker processes (default 2; --loader torch only)")
    d.add_argument("--batch-size", type=int, metavar="N", help="training batch size (default 128)")
    d.add_argument("--test-batch-size", type=int, metavar="N", help="evaluation batch size (default 100)")
    d.add_argument("--pin-memory", action=argparse.BooleanOptionalAction, help="page-locked host batches (default: on for CUDA)")
    d.add_argument("--persistent-workers", action=argparse.BooleanOptionalAction, help="keep workers alive across epochs")
    d.add_argument("--prefetch-factor", type=int, metavar="N", help="batches prefetched per worker")
    d.add_argument("--augment", action=argparse.BooleanOptionalAction,
                   help="random crop + flip of training images (default on)")
    m = p.add_argument_group("model and optimizer")
    m.add_argument("--no-batchnorm", dest="norm", action="store_const", const="none", help="remove every BatchNorm (lab C7)")
    m.add_argument("--optimizer", metavar="NAME", help="sgd (default), sgd-nesterov, adagrad, adadelta, adam")
    m.add_argument("--lr", type=float, help="learning rate (default 0.1)")
    m.add_argument("--momentum", type=float, help="momentum where it applies (default 0.9)")
    m.add_argument("--weight-decay", type=float, help="weight decay (default 5e-4)")
    m.add_argument("--warmup-epochs", type=int, metavar="N",
                   help="gradual warm-up: lr rises linearly per step over N epochs (default 0: none)")
    m.add_argument("--warmup-start-factor", type=float, metavar="F",
                   help="warm-up starts at lr * F (default 0.1)")
    t = p.add_argument_group("training")
    t.add_argument("--epochs", type=int, metavar="N", help="epochs (default 5)")
    t.add_argument("--seed", type=int, help="seed for init, shuffling and augmentation (default 0)")
    t.add_argument("--device", choices=DEVICES, help="auto (default: CUDA when present), cpu or cuda")
    t.add_argument("--precision", choices=PRECISIONS, help="fp32, bf16, fp16 (autocast) or auto (default: bf16 on CUDA GPUs that support it, else fp32)")
    t.add_argument("--channels-last", action=argparse.BooleanOptionalAction, help="NHWC memory layout (default on)")
    t.add_argument("--compile", choices=COMPILE_MODES, help="torch.compile mode (default none)")
    t.add_argument("--sync-timing", action=argparse.BooleanOptionalAction,
                   help="synchronize the device at every clock read for an exact data/h2d/compute split")
    t.add_argument("--max-steps", type=int, metavar="N", help="stop each epoch after N steps")
    t.add_argument("--sync-bn", action=argparse.BooleanOptionalAction,
                   help="several processes: SyncBatchNorm across them (CUDA only)")
    t.add_argument("--comm-timing", action=argparse.BooleanOptionalAction,
                   help="several processes: time DDP's gradient all-reduces (run.json 'distributed')")
    t.add_argument("--evaluate", action=argparse.BooleanOptionalAction, help="evaluate on the test set after each epoch")
    o = p.add_argument_group("output")
    o.add_argument("--out", dest="out_dir", metavar="DIR", help="folder for run folders (default runs/)")
    o.add_argument("--name", help="run name, used in the run folder's name (default train)")
    o.add_argument("--checkpoint-every", type=int, metavar="K",
                   help="write checkpoint.pt every K finished epochs and after the last (default 1; 0: never)")


def config_from_args(args: argparse.Namespace, base: TrainConfig | None = None) -> TrainConfig:
    base = base or TrainConfig()
    fields = set(base.to_dict())
    given = {k: v for k, v in vars(args).items() if k in fields}
    return base.replace(**given).validate()


# ------------------------------------------------------------------------------------ commands


EXIT_DIVERGED = 3  # README "Exit codes"; interrupted: 128 + signal (130 SIGINT, 143 SIGTERM); usage: 2


def cmd_train(args: argparse.Namespace) -> int:
    import dataclasses

    from cifarlab.interrupt import StopOnSignal
    from cifarlab.progress import ConsoleProgress
    from cifarlab.runner import prepare, run_training
    from cifarlab.runtime import workers_warning

    resume = getattr(args, "resume", None)
    with StopOnSignal() as stop:
        if resume is not None:
            from cifarlab.checkpoint import resume_config

            given = {k: v for k, v in vars(args).items() if k in TrainConfig.__dataclass_fields__}
            cfg = resume_config(resume, given)
        else:
            cfg = config_from_args(args)
        warning = workers_warning(cfg.workers) if cfg.loader == "torch" else None  # only it has workers
        if warning:
            import warnings

            print(f"{PROG}: warning: {warning}", file=sys.stderr)
            # torch says the same in a multi-line warning at every loader start: once is enough
            warnings.filterwarnings("ignore", message="This DataLoader will create", category=UserWarning)
        device, data = prepare(cfg)
        if stop.should_stop():
            print(f"{PROG}: interrupted ({stop.signal_name}) before training started; nothing written", file=sys.stderr)
            return stop.exit_code or 130
        progress = ConsoleProgress(total_epochs=cfg.epochs)
        progress.banner(cfg, data.description, device)
        hooks = dataclasses.replace(progress.hooks(), should_stop=stop.should_stop)
        result = run_training(cfg, hooks=hooks, data=data, resume=resume)
        progress.finish(result)
    return _train_outcome(result, stop.signal_name, stop.exit_code)


def _train_outcome(result: Any, signal_name: str | None, signal_exit: int | None) -> int:
    """One line on stderr for every ending but success, and the exit code that tells them apart."""
    from cifarlab.checkpoint import CHECKPOINT_NAME

    if result.status == "completed":
        return 0
    if result.status == "oom":
        raise UsageError(result.error)
    done = len(result.finished)
    kept = f"records of {done} finished epoch(s) kept in {result.path}"
    if result.status == "diverged":
        bad = result.records[-1]
        print(f"{PROG}: training diverged: the loss became NaN/inf at epoch {bad.epoch}, step {bad.diverged_step} "
              f"(--lr {result.config.lr}); {kept}; try a smaller --lr", file=sys.stderr)
        return EXIT_DIVERGED
    if result.status == "interrupted":
        has_ckpt = (result.path / CHECKPOINT_NAME).is_file()
        how = f"continue with: {PROG} train --resume {result.path}" if has_ckpt else "no checkpoint yet to resume from"
        print(f"{PROG}: interrupted ({signal_name or 'KeyboardInterrupt'}); {kept}; {how}", file=sys.stderr)
        return signal_exit or 130
    raise RuntimeError(f"unexpected run status {result.status!r}")


def cmd_inspect(args: argparse.Namespace) -> int:
    from cifarlab.modelfacts import explain, inspect_model
    from cifarlab.optim import OPTIMIZERS

    names = tuple(args.optimizer or ["sgd", "adam"])
    for name in names:
        if name not in OPTIMIZERS:
            raise UsageError(f"--optimizer {name!r} is not known; choose one of: {', '.join(OPTIMIZERS)}")
    if args.batch_size < 2:
        raise UsageError(f"--batch-size must be >= 2 for a BatchNorm forward pass (got {args.batch_size})")
    facts = inspect_model(names, norm="none" if args.no_batchnorm else "batch", batch_size=args.batch_size)
    if args.json:
        print(json.dumps(facts, indent=2))
        return 0
    print(f"ResNet-18 (CIFAR variant, norm={facts['norm']})")
    rows = [
        ("conv layers", f"{facts['conv_layers']} ({', '.join(f'{v} x {k}' for k, v in facts['conv_layers_by_kernel'].items())})"),
        ("batch-norm layers", facts["batchnorm_layers"]),
        ("last linear input", facts["last_linear_in_features"]),
        ("trainable parameters", f"{facts['trainable_parameters']:,} in {facts['trainable_parameter_tensors']} tensors"),
        ("forward FLOPs / image", f"{facts['forward_flops_per_image'] / 1e9:.3f} GFLOP ({facts['forward_macs_per_image'] / 1e9:.3f} GMAC)"),
        ("train-step FLOPs / image", f"{facts['train_flops_per_image'] / 1e9:.3f} GFLOP (forward + backward)"),
    ]
    for name, o in facts["optimizers"].items():
        rows.append((f"[{name}] gradient elements", f"{o['gradient_elements']:,} in {o['gradient_tensors']} tensors "
                     f"({o['gradient_nonzero_elements']:,} non-zero on a batch of {o['backward_batch_size']})"))
        rows.append((f"[{name}] optimizer state", f"{o['optimizer_state_elements']:,} elements "
                     f"({o['optimizer_state_per_parameter']:.0f}x params) {o['optimizer_state_by_buffer']}"))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")
    print()
    for q, a in explain(facts):
        print(f"{q}\n  {a}")
    return 0


def _add_inspect(sub: Any) -> None:
    p = sub.add_parser("inspect", help="model facts for lab Q1-Q4, computed from the model")
    p.add_argument("--optimizer", action="append", metavar="NAME", help="optimizer(s) to measure (default sgd and adam)")
    p.add_argument("--no-batchnorm", action="store_true", help="the C7 variant without BatchNorm")
    p.add_argument("--batch-size", type=int, default=32, help="batch for the real backward pass (default 32)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_inspect)


def _add_train(sub: Any) -> None:
    p = sub.add_parser("train", help="train ResNet-18 once and record per-epoch timings",
                       argument_default=argparse.SUPPRESS)
    add_train_options(p)
    p.add_argument("--resume", metavar="RUN_DIR",
                   help="continue an interrupted run from its checkpoint (its own config; only --epochs may change)")
    p.add_argument("--nproc", type=int, metavar="N",
                   help="data-parallel on N processes (one per GPU; on CPU the cores are split): runs torchrun; "
                        "--batch-size is then per process")
    p.set_defaults(func=_train_entry)


def _train_entry(args: argparse.Namespace) -> int:
    # --nproc N launches torchrun; under torchrun the process group wraps cmd_train (distributed.py).
    from cifarlab.distributed import run_train_command

    return run_train_command(args, cmd_train)


# name -> function that adds the subcommand's parser; other modules' commands register here.
SUBCOMMANDS: dict[str, Callable[[Any], None]] = {"train": _add_train, "inspect": _add_inspect}
from cifarlab import lab as _lab  # noqa: E402  (imports no torch)
SUBCOMMANDS.update(lab=_lab.add_parser, report=_lab.add_report_parser)


def build_parser() -> argparse.ArgumentParser:
    from cifarlab import __version__

    parser = _Parser(prog=PROG, description="Train ResNet-18 on CIFAR-10 and measure where the time goes.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for add in SUBCOMMANDS.values():
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return int(args.func(args) or 0)
    except UsageError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
