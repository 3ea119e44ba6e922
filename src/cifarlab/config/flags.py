"""The train flags both ways: their argparse definitions (`add_train_options`, shared by `cifarlab train`
and every command that describes a run) and argv -> TrainConfig (`config_from_args`), and TrainConfig ->
the `cifarlab train` flags that reproduce it (`train_flags`, used by the lab's scaling items to start
each point as its own process). tests/test_cli.py checks that the two directions agree.

Flag defaults are *not* set here: options the user did not give are absent from the parsed namespace
(argparse.SUPPRESS), and TrainConfig supplies the default -- one place for defaults.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
from typing import Any

from cifarlab.config import CUDA_GRAPH_MODES, DATASETS, DEVICES, LOADERS, PRECISIONS, TRAIN_COMPILE_MODES, TrainConfig
from cifarlab.core.errors import UsageError

PROG = "cifarlab"


class Parser(argparse.ArgumentParser):
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
    t.add_argument("--precision", choices=PRECISIONS,
                   help="fp32, bf16, fp16 (autocast) or auto (default: bf16 on CUDA GPUs that support it; on a CPU "
                        "with native bf16 the faster of fp32 and bf16, measured once and cached; else fp32)")
    t.add_argument("--channels-last", action=argparse.BooleanOptionalAction, help="NHWC memory layout (default on)")
    t.add_argument("--compile", choices=TRAIN_COMPILE_MODES, help="torch.compile mode (default none)")
    t.add_argument("--cuda-graph", choices=CUDA_GRAPH_MODES,
                   help="auto (default): capture the whole training step as one CUDA graph on the fast path on CUDA; "
                        "on: also for --loader torch (a usage error on a CPU); off: eager")
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


# Fields whose flag is not --<field with '-' for '_'>.
FLAG_NAMES = {"data_dir": "--data", "out_dir": "--out"}
# Fields no train flag sets.
NOT_FLAGS = ("tags",)


def train_flags(cfg: TrainConfig) -> list[str]:
    defaults = TrainConfig()
    flags: list[str] = []
    for f in dataclasses.fields(TrainConfig):
        value, default = getattr(cfg, f.name), getattr(defaults, f.name)
        if value == default:
            continue
        if f.name in NOT_FLAGS:
            raise UsageError(f"cannot pass {f.name}={value!r} to a train process (no train flag); run it yourself")
        if f.name == "norm":
            if value != "none":
                raise UsageError(f"--norm {value!r} has no train flag")
            flags.append("--no-batchnorm")
            continue
        name = FLAG_NAMES.get(f.name, "--" + f.name.replace("_", "-"))
        if isinstance(value, bool):
            flags.append(name if value else "--no-" + name[2:])
        elif value is None:
            raise UsageError(f"cannot pass {f.name}=None to a train process (its default is {default!r})")
        else:
            flags += [name, str(value)]
    return flags
