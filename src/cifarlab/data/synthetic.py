"""The synthetic stand-in for CIFAR-10 (offline machines, tests) and the seeded stratified subsets."""

from __future__ import annotations

import numpy as np

from cifarlab.config import NUM_CLASSES
from cifarlab.data.cifar import IMAGE_SHAPE
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

