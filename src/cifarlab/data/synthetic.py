"""The synthetic stand-in for CIFAR-10 (offline machines, tests) and the seeded stratified subsets."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cifarlab.config import NUM_CLASSES
from cifarlab.data.cifar import BASE_FOLDER, IMAGE_SHAPE, TEST_FILES, TRAIN_FILES, write_cifar_batch
from cifarlab.data.split import Split


def synthetic_split(n: int, seed: int, split: str) -> Split:
    """Deterministic CIFAR-shaped data a model can learn: one smooth colour template per class
    (4x4 blocks upsampled to 32x32) plus heavy per-image noise, so it is learnable but not trivial,
    and survives random crops and flips. Same seed -> same bytes."""
    rng_templates = np.random.default_rng(1234)  # templates identical for train and test
    templates = rng_templates.uniform(40, 215, size=(NUM_CLASSES, 4, 4, 3))
    templates = templates.repeat(8, axis=1).repeat(8, axis=2)  # (10, 32, 32, 3)
    rng = np.random.default_rng([seed, 0 if split == "train" else 1])
    labels = np.arange(n, dtype=np.int64) % NUM_CLASSES
    rng.shuffle(labels)
    noise = rng.normal(0.0, 48.0, size=(n, *IMAGE_SHAPE)).astype(np.float32)
    images = np.clip(templates[labels] + noise, 0, 255).astype(np.uint8)
    return Split(images=images, labels=labels)


SYNTHETIC_TRAIN = 50_000
SYNTHETIC_TEST = 10_000


# ---------------------------------------------------------------------------------------- subsets


def stratified_indices(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """n indices, classes as balanced as the data allows, chosen by seed, returned in file order."""
    if n >= len(labels):
        return np.arange(len(labels))
    order = np.random.default_rng(seed).permutation(len(labels))
    per_class = [order[labels[order] == c] for c in range(NUM_CLASSES)]
    # Round-robin over classes: the k-th pick of every class before the (k+1)-th of any.
    rank = np.empty(len(labels), dtype=np.int64)
    for members in per_class:
        rank[members] = np.arange(len(members))
    chosen = order[np.argsort(rank[order], kind="stable")[:n]]
    return np.sort(chosen)


def take(split: Split, n: int | None, seed: int) -> Split:
    if n is None or n >= len(split):
        return split
    idx = stratified_indices(split.labels, n, seed)
    return Split(split.images[idx], split.labels[idx])


def write_synthetic_cifar(root: Path, per_train_file: int = 40, n_test: int = 40, seed: int = 0) -> Path:
    """root/cifar-10-batches-py/{data_batch_1..5,test_batch} in CIFAR-10's real on-disk format, holding the
    synthetic stand-in's learnable class-coloured images: what tests and benchmarks read through the real loader
    where CIFAR-10 itself cannot be downloaded."""
    folder = root / BASE_FOLDER
    for i, name in enumerate(TRAIN_FILES):
        split = synthetic_split(per_train_file, seed + i, "train")
        write_cifar_batch(folder / name, split.images, split.labels, batch_label=f"training batch {i + 1} of 5")
    test = synthetic_split(n_test, seed, "test")
    write_cifar_batch(folder / TEST_FILES[0], test.images, test.labels, batch_label="testing batch 1 of 1")
    return root
