"""Resolve --dataset (cifar10 | synthetic | auto) to a DataBundle: read or download CIFAR-10, or make
the synthetic stand-in, then apply --subset/--test-subset and describe the source in one line."""

from __future__ import annotations

from cifarlab.config import TrainConfig
from cifarlab.core.errors import DataError
from cifarlab.data.cifar import cifar_present, download_cifar10, load_cifar10
from cifarlab.data.split import DataBundle
from cifarlab.data.synthetic import SYNTHETIC_TEST, SYNTHETIC_TRAIN, synthetic_split, take


def load_data(cfg: TrainConfig) -> DataBundle:
    """Resolve cfg.dataset (cifar10 | synthetic | auto) to arrays, apply subsets, describe the source."""
    source = cfg.dataset
    note = ""
    if source == "auto":
        if cifar_present(cfg.data_dir):
            source = "cifar10"
        else:
            try:
                download_cifar10(cfg.data_dir)
                source = "cifar10"
            except DataError as e:
                source = "synthetic"
                note = f" -- CIFAR-10 unavailable ({e})"
    if source == "cifar10":
        if not cifar_present(cfg.data_dir):
            download_cifar10(cfg.data_dir)
        train, test, description = load_cifar10(cfg.data_dir)
        available = (len(train), len(test))
    else:
        n_train = min(cfg.subset or SYNTHETIC_TRAIN, SYNTHETIC_TRAIN)
        n_test = min(cfg.test_subset or SYNTHETIC_TEST, SYNTHETIC_TEST)
        train = synthetic_split(n_train, cfg.seed, "train")
        test = synthetic_split(n_test, cfg.seed, "test")
        available = (SYNTHETIC_TRAIN, SYNTHETIC_TEST)  # made only as large as the subsets ask
        description = "SYNTHETIC data (offline stand-in for CIFAR-10; accuracies are not CIFAR-10 accuracies)" + note
    train = take(train, cfg.subset, cfg.seed)
    test = take(test, cfg.test_subset, cfg.seed + 1)
    if cfg.subset or cfg.test_subset:
        description += (f"; {_part('subset', 'train', cfg.subset, available[0], len(train))} / "
                        f"{_part('test-subset', 'test', cfg.test_subset, available[1], len(test))}")
    return DataBundle(train=train, test=test, source=source, description=description)


def _part(flag: str, split: str, asked: int | None, available: int, used: int) -> str:
    """What one split's --subset did: a stratified subset, or all of it (and why, when one was asked)."""
    if asked is not None and used < available:
        return f"stratified subset {used} {split}"
    if asked is not None and asked > available:
        return f"all {used} {split} (--{flag} {asked} asked for more)"
    return f"all {used} {split}"

