import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from cifarlab.config import TrainConfig
from cifarlab.core.errors import DataError
from cifarlab.data import (
    BASE_FOLDER,
    build_loaders,
    load_cifar10,
    load_data,
    read_batch,
    stratified_indices,
    synthetic_split,
    write_cifar_batch,
)


def test_reads_the_real_on_disk_format(cifar_root):
    train, test, description = load_cifar10(cifar_root)
    assert train.images.shape == (200, 32, 32, 3) and train.images.dtype == np.uint8
    assert test.images.shape == (40, 32, 32, 3)
    assert train.labels.dtype == np.int64 and set(train.labels) <= set(range(10))
    assert "not the official release" in description


def test_channel_major_rows_become_hwc_images(tmp_path):
    img = np.zeros((1, 32, 32, 3), dtype=np.uint8)
    img[0, 1, 2] = (10, 20, 30)  # pixel at row 1, column 2
    write_cifar_batch(tmp_path / "b", img, np.array([3]))
    with open(tmp_path / "b", "rb") as f:
        raw = pickle.load(f, encoding="bytes")
    assert raw[b"data"].shape == (1, 3072)
    # the official layout: 1024 red values, then green, then blue, each row-major
    assert raw[b"data"][0, 1 * 32 + 2] == 10 and raw[b"data"][0, 1024 + 34] == 20 and raw[b"data"][0, 2048 + 34] == 30
    back = read_batch(tmp_path / "b")
    assert np.array_equal(back.images, img) and back.labels.tolist() == [3]


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch /tmp/cifarlab-pwned",))


def test_code_executing_pickle_is_rejected(tmp_path):
    path = tmp_path / "data_batch_1"
    with open(path, "wb") as f:
        pickle.dump({b"data": _Exploit(), b"labels": [0]}, f, protocol=2)
    with pytest.raises(DataError, match="refusing to load global"):
        read_batch(path)
    assert not Path("/tmp/cifarlab-pwned").exists()


def test_truncated_file_is_rejected_with_its_name(tmp_path):
    split = synthetic_split(10, 0, "train")
    path = tmp_path / "data_batch_1"
    write_cifar_batch(path, split.images, split.labels)
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(DataError, match="data_batch_1.*(truncated|corrupt)"):
        read_batch(path)


@pytest.mark.parametrize(
    "obj, message",
    [
        ({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, "shape"),
        ({b"data": np.zeros((2, 3072), np.float32), b"labels": [0, 1]}, "uint8"),
        ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}, "labels"),
        ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}, "0..9"),
        ({b"labels": [0]}, "no 'data'"),
        ([1, 2, 3], "dict"),
    ],
)
def test_wrong_contents_are_rejected(tmp_path, obj, message):
    path = tmp_path / "data_batch_1"
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)
    with pytest.raises(DataError, match=message):
        read_batch(path)


def test_missing_files_are_named(tmp_path, cifar_root):
    (cifar_root / BASE_FOLDER / "data_batch_3").unlink()
    with pytest.raises(DataError, match="data_batch_3"):
        load_cifar10(cifar_root)


def test_stratified_subset_is_balanced_seeded_and_ordered():
    labels = np.repeat(np.arange(10), 100)
    idx = stratified_indices(labels, 50, seed=1)
    assert len(idx) == 50 and np.all(np.diff(idx) > 0)
    assert np.bincount(labels[idx], minlength=10).tolist() == [5] * 10
    assert np.array_equal(idx, stratified_indices(labels, 50, seed=1))
    assert not np.array_equal(idx, stratified_indices(labels, 50, seed=2))


def test_synthetic_is_deterministic_and_class_dependent():
    a, b = synthetic_split(200, 0, "train"), synthetic_split(200, 0, "train")
    assert np.array_equal(a.images, b.images) and np.array_equal(a.labels, b.labels)
    means = np.stack([a.images[a.labels == c].mean(axis=0) for c in range(10)])
    # class means differ by far more than the per-class noise averages out to
    assert np.abs(means[0] - means[1]).mean() > 10


def test_load_data_applies_subsets_and_says_synthetic():
    cfg = TrainConfig(dataset="synthetic", subset=100, test_subset=30)
    data = load_data(cfg)
    assert len(data.train) == 100 and len(data.test) == 30
    assert data.source == "synthetic" and "SYNTHETIC" in data.description


def test_classic_loader_yields_normalized_augmented_batches(cifar_root):
    cfg = TrainConfig(data_dir=str(cifar_root), loader="torch", workers=0, batch_size=16)
    data = load_data(cfg)
    train, test = build_loaders(cfg, data, torch.device("cpu"))
    x, y = next(iter(train))
    assert x.shape == (16, 3, 32, 32) and x.dtype == torch.float32 and y.shape == (16,)
    assert -3 < x.mean() < 3 and x.min() < 0  # normalized, not raw [0, 1]
    assert len(test) == 1  # 40 test images, test batch 100
