"""What a user sees when --data points at the wrong thing, and what the outputs say about the data used
(each test fails without the behaviour it checks)."""

from __future__ import annotations

import pytest
from tests.conftest import TINY, make_cifar_dir, one_line, run_cli

import cifarlab.data.cifar as data_mod
from cifarlab.data import BASE_FOLDER

OFFLINE = "http://127.0.0.1:9/cifar-10-python.tar.gz"  # refused at once: any download attempt fails


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setattr(data_mod, "ARCHIVE_URL", OFFLINE)


def test_data_pointing_at_a_file_is_named_not_blamed_on_the_download(tmp_path, capsys):
    not_a_folder = tmp_path / "data.txt"
    not_a_folder.write_text("x")
    code, _, err = run_cli(["train", "--data", not_a_folder, "--out", tmp_path / "runs", *TINY], capsys)
    assert code == 2 and f"--data {not_a_folder} is a file, not a folder" in one_line(err)
    assert "download failed" not in err and "FileExistsError" not in err


def test_data_pointing_at_the_batches_folder_itself_names_its_parent(tmp_path, capsys):
    root = make_cifar_dir(tmp_path / "data", per_train_file=4, n_test=4)
    inner = root / BASE_FOLDER
    code, _, err = run_cli(["train", "--data", inner, "--out", tmp_path / "runs", *TINY], capsys)
    assert code == 2 and f"use --data {root}" in one_line(err)
    assert "download failed" not in err
    assert not (inner / BASE_FOLDER).exists() and not (inner / data_mod.ARCHIVE_NAME).exists()


def test_batches_folder_that_is_a_file_is_named(tmp_path, capsys):
    root = tmp_path / "data"
    root.mkdir()
    (root / BASE_FOLDER).write_text("x")
    code, _, err = run_cli(["train", "--data", root, "--out", tmp_path / "runs", *TINY], capsys)
    assert code == 2 and f"{root / BASE_FOLDER} is not a folder" in one_line(err)
    assert "download failed" not in err


def test_a_partly_present_dataset_names_the_missing_files(tmp_path, capsys):
    root = make_cifar_dir(tmp_path / "data", per_train_file=4, n_test=4)
    (root / BASE_FOLDER / "data_batch_4").unlink()
    code, _, err = run_cli(["train", "--data", root, "--out", tmp_path / "runs", *TINY], capsys)
    assert code == 2 and f"CIFAR-10 files missing in {root / BASE_FOLDER}: data_batch_4" in one_line(err)
    assert "CIFAR-10 is not in" not in err  # five of the six files are there


def test_the_description_says_which_splits_were_subset_and_when_a_subset_asked_for_too_many(tmp_path):
    from cifarlab.config import TrainConfig
    from cifarlab.data import load_data

    root = make_cifar_dir(tmp_path / "data", per_train_file=10, n_test=20)  # 50 train / 20 test
    bundle = load_data(TrainConfig(data_dir=str(root), subset=30, test_subset=1000))
    assert (len(bundle.train), len(bundle.test)) == (30, 20)
    assert bundle.description.endswith(
        "; stratified subset 30 train / all 20 test (--test-subset 1000 asked for more)")
    bundle = load_data(TrainConfig(data_dir=str(root), subset=500))
    assert bundle.description.endswith(
        "; all 50 train (--subset 500 asked for more) / all 20 test")
    assert "subset 50 train" not in bundle.description  # it used everything: no subset was taken
    synthetic = load_data(TrainConfig(dataset="synthetic", subset=60_000, test_subset=16))
    assert synthetic.description.endswith(
        "; all 50000 train (--subset 60000 asked for more) / stratified subset 16 test")


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_batches_pickled_at_any_protocol_are_read(tmp_path, protocol):
    # Someone packaging their own CIFAR-format data may well use pickle.HIGHEST_PROTOCOL (5), whose
    # numpy arrays rebuild through numpy's _frombuffer; it was refused as 'not a valid CIFAR-10 batch'.
    import pickle

    import numpy as np

    from cifarlab.data import read_batch

    rows = np.random.default_rng(0).integers(0, 256, (6, 3072), dtype=np.uint8)
    labels = np.array([0, 1, 2, 3, 4, 9])
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps({b"data": rows, b"labels": labels}, protocol=protocol))
    split = read_batch(path)
    assert (split.images == rows.reshape(6, 3, 32, 32).transpose(0, 2, 3, 1)).all()
    assert split.labels.tolist() == labels.tolist()


def test_the_smoke_lab_says_its_preset_chose_synthetic_data_not_that_cifar10_was_unavailable(tmp_path, capsys):
    import json

    root = make_cifar_dir(tmp_path / "data", per_train_file=4, n_test=4)
    code, out, _ = run_cli(["lab", "--preset", "smoke", "--only", "q", "--data", root, "--dataset", "cifar10",
                            "--out", tmp_path / "labs"], capsys)
    assert code == 0
    banner = next(line for line in out.splitlines() if line.startswith("!! SYNTHETIC DATA"))
    assert "not available" not in banner  # CIFAR-10 was on disk and asked for
    assert "the smoke preset always runs on" in banner and "--data and --dataset are not used" in banner
    (lab_dir,) = list((tmp_path / "labs").iterdir())
    assert json.loads((lab_dir / "results.json").read_text())["data"]["banner"] == banner[3:]


def test_a_data_path_with_a_tilde_is_the_home_folder_as_for_the_download(tmp_path, monkeypatch, capsys):
    # '--data=~/x' reaches us unexpanded; torchvision's download expands '~', the reader did not, so
    # data in $HOME/x was reported missing (and a download would have landed where it is never read).
    from cifarlab.config import TrainConfig
    from cifarlab.data import load_data

    monkeypatch.setenv("HOME", str(tmp_path))
    make_cifar_dir(tmp_path / "x", per_train_file=4, n_test=4)
    bundle = load_data(TrainConfig(data_dir="~/x", dataset="cifar10"))
    assert len(bundle.train) == 20 and str(tmp_path / "x" / BASE_FOLDER) in bundle.description


def test_a_partly_present_dataset_of_the_users_own_files_is_never_overwritten_by_a_download(tmp_path, capsys,
                                                                                            monkeypatch):
    """Five batch files there (not the official ones), one missing: a download would unpack the archive over the
    five. It is refused before any network access, naming the missing file and what would be overwritten."""
    import torchvision.datasets.utils as tv_utils

    calls: list[str] = []
    monkeypatch.setattr(data_mod, "download_and_extract_archive", lambda *a, **k: calls.append("download"))
    monkeypatch.setattr(tv_utils, "download_and_extract_archive", lambda *a, **k: calls.append("download"))
    root = make_cifar_dir(tmp_path / "data", per_train_file=4, n_test=4)
    (root / BASE_FOLDER / "data_batch_4").unlink()
    before = (root / BASE_FOLDER / "data_batch_1").read_bytes()
    code, _, err = run_cli(["train", "--data", root, "--dataset", "cifar10", "--out", tmp_path / "runs", *TINY], capsys)
    assert code == 2 and calls == []
    assert "downloading would unpack the official archive over data_batch_1" in one_line(err)
    assert (root / BASE_FOLDER / "data_batch_1").read_bytes() == before
