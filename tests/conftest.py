"""Shared fixtures: small datasets in the real CIFAR-10 on-disk format, read by the real code; running the CLI
and checking its one-line errors."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from cifarlab.cli import main
from cifarlab.data import write_synthetic_cifar

# --precision auto on a CPU with native bf16 is decided by timing both precisions (precision.py): the suite keeps
# fp32 on every machine, so its numbers do not depend on the CPU (tests/test_precision.py turns it back on).
os.environ.setdefault("CIFARLAB_PRECISION_CALIBRATION", "off")

# A training run of a few seconds on the classic pipeline without worker processes.
TINY = ["--subset", "16", "--test-subset", "10", "--batch-size", "8", "--loader", "torch", "--workers", "0"]


def run_cli(args, capsys):
    """(exit code, stdout, stderr) of `cifarlab ARGS`."""
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def one_line(err: str) -> str:
    """err, after checking it is one `cifarlab: error:` line and no traceback."""
    assert err.count("\n") == 1 and err.startswith("cifarlab: error: ") and "Traceback" not in err, err
    return err


def make_cifar_dir(root: Path, per_train_file: int = 40, n_test: int = 40, seed: int = 0) -> Path:
    """root/cifar-10-batches-py/{data_batch_1..5,test_batch} holding learnable class-coloured images."""
    return write_synthetic_cifar(root, per_train_file, n_test, seed)


@pytest.fixture
def cifar_root(tmp_path: Path) -> Path:
    return make_cifar_dir(tmp_path / "data")


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


def train_tiny_run(out: Path, subset: int = 16, test_subset: int = 8, batch_size: int = 8) -> Path:
    """One CPU run of one step on synthetic data through the CLI, in a fresh folder below `out`: its run folder."""
    code = main(["train", "--dataset", "synthetic", "--subset", str(subset), "--test-subset", str(test_subset),
                 "--epochs", "1", "--batch-size", str(batch_size), "--max-steps", "1", "--out", str(out), "--device", "cpu"])
    assert code == 0
    (run,) = [p for p in out.iterdir() if p.is_dir()]
    return run
