"""Data: CIFAR-10 files and the safe reader (cifar), the synthetic stand-in and subsets (synthetic), the
dataset bundle (split, bundle), the classic DataLoader pipeline (classic), the device-resident fast
loader (device), the seam both give the training loop (epoch: EpochLoader) and the registry that picks
one (loaders). The names most callers need are here."""

from cifarlab.data.bundle import load_data
from cifarlab.data.cifar import (
    ARCHIVE_MD5,
    ARCHIVE_NAME,
    BASE_FOLDER,
    TEST_FILES,
    TRAIN_FILES,
    cifar_present,
    download_cifar10,
    load_cifar10,
    read_batch,
    write_cifar_batch,
)
from cifarlab.data.classic import ClassicLoader, classic_test_transform, classic_train_transform
from cifarlab.data.device import DeviceLoader
from cifarlab.data.epoch import EpochLoader
from cifarlab.data.loaders import LOADER_BUILDERS, build_loaders
from cifarlab.data.split import DataBundle, Split
from cifarlab.data.synthetic import stratified_indices, synthetic_split, take, write_synthetic_cifar

__all__ = [
    "ARCHIVE_MD5", "ARCHIVE_NAME", "BASE_FOLDER", "TEST_FILES", "TRAIN_FILES", "ClassicLoader", "DataBundle", "DeviceLoader", "EpochLoader",
    "LOADER_BUILDERS", "Split", "build_loaders", "cifar_present", "classic_test_transform",
    "classic_train_transform", "download_cifar10", "load_cifar10", "load_data", "read_batch", "stratified_indices", "synthetic_split",
    "take", "write_cifar_batch", "write_synthetic_cifar",
]
