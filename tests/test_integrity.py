"""Faults a long run meets, and what the user sees: a diverging loss, out of memory, a full or
read-only disk, and dataset files that are empty, folders, corrupt archives or code-executing pickles.
(tests/test_data.py covers the reader's own checks: malicious pickle, truncation, wrong shapes.)"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from tests.conftest import TINY, make_cifar_dir, one_line, run_cli

import cifarlab.data.cifar as data_mod
import cifarlab.run.runner as runner_mod
from cifarlab.config import TrainConfig
from cifarlab.core.errors import DataError
from cifarlab.data import ARCHIVE_NAME, BASE_FOLDER, TEST_FILES, TRAIN_FILES, load_data

# ------------------------------------------------------------------------------------ divergence


def test_nan_loss_is_reported_as_diverged_with_epoch_and_step(tmp_path, capsys):
    # lr 1000 without BatchNorm: finite but huge after epoch 1, NaN at the first step of epoch 2
    args = ["train", "--dataset", "synthetic", *TINY, "--lr", "1000", "--no-batchnorm", "--epochs", "4",
            "--no-evaluate", "--out", tmp_path]
    code, out, err = run_cli(args, capsys)
    assert code == 3 and "Traceback" not in err
    assert err.count("\n") == 1 and err.startswith("cifarlab: training diverged: the loss became NaN/inf at epoch ")
    (run_dir,) = list(tmp_path.iterdir())
    run = json.loads((run_dir / "run.json").read_text())
    records = json.loads((run_dir / "records.json").read_text())
    assert run["status"] == "diverged"
    bad = records[-1]
    assert bad["status"] == "diverged" and bad["diverged_step"] is not None
    assert run["diverged"] == {"epoch": bad["epoch"], "step": bad["diverged_step"]}
    assert f"epoch {bad['epoch']}, step {bad['diverged_step']}" in err and "--lr 1000.0" in err
    assert "DIVERGED" in out
    assert all(r["status"] == "ok" for r in records[:-1])  # epochs before it are kept as they were


# --------------------------------------------------------------------------------- out of memory


def _oom_above(x: torch.Tensor, limit: int) -> None:
    """Stands in for a GPU that holds `limit` images: raises what torch raises when it runs out."""
    if x.shape[0] > limit:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (simulated)")


@pytest.fixture
def memory_limit(monkeypatch):
    """Simulated OOM (no GPU here): every model built by the runner fails on batches above the limit."""
    real = runner_mod.build_state

    def build(cfg, device, *args, **kwargs):
        state = real(cfg, device, *args, **kwargs)
        plain_forward = state.model.forward

        def forward(x):  # the model itself: training and evaluation (which runs the plain model) both use it
            return _oom_above(x, 8) or plain_forward(x)

        state.model.forward = forward
        return state

    monkeypatch.setattr(runner_mod, "build_state", build)


def test_out_of_memory_names_the_batch_size_and_records_oom(tmp_path, capsys, memory_limit):
    args = ["train", "--dataset", "synthetic", *TINY, "--batch-size", "16", "--epochs", "2", "--out", tmp_path]
    code, _, err = run_cli(args, capsys)
    assert code == 2
    one_line(err)
    assert "out of memory" in err and "--batch-size 16 (training)" in err and "e.g. 8" in err
    (run_dir,) = list(tmp_path.iterdir())
    run = json.loads((run_dir / "run.json").read_text())
    assert run["status"] == "oom" and "--batch-size 16" in run["error"]


def test_a_sweep_gets_oom_as_a_status_and_the_next_point_runs(tmp_path, memory_limit):
    cfg = TrainConfig(dataset="synthetic", subset=16, test_subset=10, loader="torch", workers=0, epochs=1,
                      max_steps=1, evaluate=False, checkpoint_every=0, out_dir=str(tmp_path))
    results = {b: runner_mod.run_training(cfg.replace(batch_size=b, name=f"b{b}")) for b in (16, 8)}
    assert results[16].status == "oom" and "--batch-size 16" in results[16].error
    assert results[8].status == "completed"


def test_out_of_memory_in_evaluation_names_the_test_batch_size(tmp_path, capsys, memory_limit):
    args = ["train", "--dataset", "synthetic", *TINY, "--test-batch-size", "10", "--epochs", "1",
            "--max-steps", "1", "--out", tmp_path]
    code, _, err = run_cli(args, capsys)
    assert code == 2 and "--test-batch-size 10 (evaluation)" in one_line(err)


# ----------------------------------------------------------------------------- full / read-only disk


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("err_no, call", [(errno.ENOSPC, "fsync"), (errno.EROFS, "replace")])
def test_disk_failure_mid_run_is_one_line_and_earlier_runs_stay_intact(tmp_path, capsys, monkeypatch, err_no, call):
    common = ["train", "--dataset", "synthetic", *TINY, "--max-steps", "1", "--no-evaluate", "--out", tmp_path]
    assert run_cli([*common, "--epochs", "1", "--name", "earlier"], capsys)[0] == 0
    before = _snapshot(tmp_path)

    real = getattr(os, call)
    calls = {"n": 0}

    def failing(*a, **kw):
        calls["n"] += 1
        if calls["n"] > 4:  # the new run's header is written; the disk fills (or turns read-only) after it
            raise OSError(err_no, os.strerror(err_no))
        return real(*a, **kw)

    monkeypatch.setattr(os, call, failing)
    code, _, err = run_cli([*common, "--epochs", "3", "--name", "later"], capsys)
    monkeypatch.setattr(os, call, real)
    assert code == 2
    one_line(err)
    assert errno.errorcode[err_no] in err and "earlier runs are untouched" in err and str(tmp_path) in err
    after = _snapshot(tmp_path)
    assert {k: v for k, v in after.items() if "earlier" in k} == before  # byte for byte
    assert not [k for k in after if k.endswith(".tmp")]  # no half-written files left behind


def test_a_run_that_fails_keeps_its_full_traceback(tmp_path, monkeypatch):
    """run.json's error is one line; the run folder keeps the whole traceback (a failure on a lent GPU is
    diagnosed afterwards from the files alone)."""

    def broken_engine(*args, **kwargs):
        raise RuntimeError("kernel launch failed\ndetail on the second line")

    monkeypatch.setattr(runner_mod, "train", broken_engine)
    cfg = TrainConfig(dataset="synthetic", subset=16, test_subset=10, batch_size=8, loader="torch", workers=0,
                      epochs=1, out_dir=str(tmp_path), name="broken")
    with pytest.raises(RuntimeError, match="kernel launch failed"):
        runner_mod.run_training(cfg)
    (run,) = tmp_path.glob("*-broken")
    doc = json.loads((run / "run.json").read_text())
    assert doc["status"] == "failed" and doc["traceback_file"] == "traceback.txt"
    text = (run / "traceback.txt").read_text()
    assert text.startswith("Traceback") and "in broken_engine" in text and "detail on the second line" in text

    # A disk too full for the traceback still gets run.json's "failed" (and names no file).
    def no_space(self, e):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(runner_mod.RunWriter, "write_traceback", no_space)
    with pytest.raises(RuntimeError, match="kernel launch failed"):
        runner_mod.run_training(cfg.replace(name="full"))
    (run,) = tmp_path.glob("*-full")
    doc = json.loads((run / "run.json").read_text())
    assert doc["status"] == "failed" and "traceback_file" not in doc and not (run / "traceback.txt").exists()


# ---------------------------------------------------------------------------------- dataset files


def test_malicious_pickle_never_runs_through_the_cli(tmp_path, capsys):
    root = make_cifar_dir(tmp_path / "data", per_train_file=4, n_test=4)
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    with open(root / BASE_FOLDER / "data_batch_4", "wb") as f:
        pickle.dump({b"data": Exploit(), b"labels": [0]}, f, protocol=2)
    code, _, err = run_cli(["train", "--data", root, "--out", tmp_path / "runs", *TINY], capsys)
    assert code == 2 and "data_batch_4" in one_line(err) and "refusing to load global" in err
    assert not marker.exists()
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_empty_batch_file_is_named(tmp_path, capsys):
    root = make_cifar_dir(tmp_path / "data", per_train_file=4, n_test=4)
    (root / BASE_FOLDER / "test_batch").write_bytes(b"")
    code, _, err = run_cli(["train", "--data", root, "--out", tmp_path / "runs", *TINY], capsys)
    assert code == 2 and "test_batch is truncated or corrupt" in one_line(err)


def test_batch_files_without_images_are_rejected(tmp_path):
    root = make_cifar_dir(tmp_path / "data", per_train_file=4, n_test=4)
    for name in TRAIN_FILES:  # well-formed batches of zero images
        with open(root / BASE_FOLDER / name, "wb") as f:
            pickle.dump({b"data": np.zeros((0, 3072), np.uint8), b"labels": np.zeros(0, np.int64)}, f, protocol=4)
    with pytest.raises(DataError, match="train files .* hold no images"):
        load_data(TrainConfig(data_dir=str(root)))


def test_a_batch_file_that_is_a_folder_is_named_not_blamed_on_the_network(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(data_mod, "ARCHIVE_URL", "http://127.0.0.1:9/cifar-10-python.tar.gz")
    root = make_cifar_dir(tmp_path / "data", per_train_file=4, n_test=4)
    (root / BASE_FOLDER / "data_batch_2").unlink()
    (root / BASE_FOLDER / "data_batch_2").mkdir()
    code, _, err = run_cli(["train", "--data", root, "--out", tmp_path / "runs", *TINY], capsys)
    assert code == 2 and "data_batch_2 is a folder" in one_line(err)


def test_corrupt_archive_is_named_with_its_md5(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(data_mod, "ARCHIVE_URL", "http://127.0.0.1:9/cifar-10-python.tar.gz")
    root = tmp_path / "data"
    root.mkdir()
    (root / ARCHIVE_NAME).write_bytes(b"\x1f\x8b" + os.urandom(1000))  # a download cut short
    code, _, err = run_cli(["train", "--data", root, "--dataset", "cifar10", "--out", tmp_path / "runs", *TINY], capsys)
    assert code == 2 and ARCHIVE_NAME in one_line(err) and "incomplete or corrupt" in err
    assert data_mod.ARCHIVE_MD5 in err
    assert (root / ARCHIVE_NAME).exists()  # the user's file is not deleted behind their back


def test_archive_with_the_expected_md5_is_unpacked_without_network(tmp_path, monkeypatch):
    source = make_cifar_dir(tmp_path / "src", per_train_file=4, n_test=4)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(source / BASE_FOLDER, arcname=BASE_FOLDER)
    root = tmp_path / "data"
    root.mkdir()
    (root / ARCHIVE_NAME).write_bytes(buf.getvalue())
    # Our archive plays the official one: its md5 is the expected one; any network use would fail.
    monkeypatch.setattr(data_mod, "ARCHIVE_MD5", hashlib.md5(buf.getvalue()).hexdigest())
    monkeypatch.setattr(data_mod, "ARCHIVE_URL", "http://127.0.0.1:9/cifar-10-python.tar.gz")
    bundle = load_data(TrainConfig(data_dir=str(root), dataset="cifar10"))
    assert len(bundle.train) == 20 and len(bundle.test) == 4
    assert all((root / BASE_FOLDER / n).is_file() for n in TRAIN_FILES + TEST_FILES)
