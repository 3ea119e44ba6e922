"""Shared fixtures: small datasets in the real CIFAR-10 on-disk format, read by the real code; running the CLI
and checking its one-line errors."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from cifarlab.cli import main
from cifarlab.data import BASE_FOLDER, TEST_FILES, TRAIN_FILES, synthetic_split, write_cifar_batch

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
    folder = root / BASE_FOLDER
    for i, name in enumerate(TRAIN_FILES):
        split = synthetic_split(per_train_file, seed + i, "train")
        write_cifar_batch(folder / name, split.images, split.labels, batch_label=f"training batch {i + 1} of 5")
    test = synthetic_split(n_test, seed, "test")
    write_cifar_batch(folder / TEST_FILES[0], test.images, test.labels, batch_label="testing batch 1 of 1")
    return root


@pytest.fixture
def cifar_root(tmp_path: Path) -> Path:
    return make_cifar_dir(tmp_path / "data")


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)
