"""The in-memory dataset: a split (uint8 NHWC images + int64 labels) and the bundle of train and test
splits with a one-line description of where they came from. Every loader reads from these arrays."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Split:
    images: np.ndarray  # (N, 32, 32, 3) uint8, HWC like PIL
    labels: np.ndarray  # (N,) int64 in [0, 10)

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class DataBundle:
    train: Split
    test: Split
    source: str  # "cifar10" or "synthetic"
    description: str  # one line for outputs and reports, e.g. "synthetic (offline stand-in) ..."
