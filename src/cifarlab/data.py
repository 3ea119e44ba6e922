"""CIFAR-10 on disk, the synthetic stand-in, subsets, and the lab's classic input pipeline.

Files: the python-pickle release (`cifar-10-batches-py/data_batch_1..5`, `test_batch`). The pickles are
read with a restricted unpickler that only resolves the handful of globals a numpy array needs, so a
crafted file cannot execute code; every array is checked for shape, dtype and label range before use.
Images are kept as one uint8 NHWC array per split (150 MB for the train split), which both the
classic PIL pipeline and the device-resident fast path read from.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from cifarlab.config import CIFAR_MEAN, CIFAR_STD, NUM_CLASSES, TrainConfig
from cifarlab.errors import DataError

BASE_FOLDER = "cifar-10-batches-py"
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILES = ("test_batch",)
ARCHIVE_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
ARCHIVE_NAME = "cifar-10-python.tar.gz"
ARCHIVE_MD5 = "c58f30108f718f92721af3b95e74349a"
IMAGE_SHAPE = (32, 32, 3)
IMAGE_BYTES = 32 * 32 * 3
DOWNLOAD_TIMEOUT_S = 20.0


def official_md5s() -> dict[str, str]:
    """Per-file md5 of the official release, as torchvision records them (not copied here)."""
    from torchvision.datasets import CIFAR10

    return {name: md5 for name, md5 in CIFAR10.train_list + CIFAR10.test_list}


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


# ---------------------------------------------------------------------------------------- reading


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only what a CIFAR-10 batch (a dict of bytes, lists and numpy arrays) needs."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # how Python 3 pickles bytes at protocol 2
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load global '{module}.{name}' (not part of a CIFAR-10 file)")


def _get(d: dict, key: str) -> Any:
    # The official files were written by Python 2: keys load as bytes; accept str keys too.
    if key.encode() in d:
        return d[key.encode()]
    if key in d:
        return d[key]
    raise KeyError(key)


def read_batch(path: Path) -> Split:
    """Read and validate one CIFAR-10 batch file; any problem is a DataError naming the file."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        obj = _RestrictedUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except pickle.UnpicklingError as e:
        raise DataError(f"{path} is not a valid CIFAR-10 batch: {e}; re-download it or delete it") from None
    except Exception as e:  # truncated or garbled: EOFError, ValueError, UnicodeError, ...
        raise DataError(
            f"{path} is truncated or corrupt ({type(e).__name__}: {e}); delete it and re-download the dataset"
        ) from None
    if not isinstance(obj, dict):
        raise DataError(f"{path} does not hold a CIFAR-10 batch (a dict), found {type(obj).__name__}")
    try:
        data, labels = _get(obj, "data"), _get(obj, "labels")
    except KeyError as e:
        raise DataError(f"{path} has no '{e.args[0]}' entry; it is not a CIFAR-10 batch file") from None
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != IMAGE_BYTES:
        shape = getattr(data, "shape", None)
        dtype = getattr(data, "dtype", type(data).__name__)
        raise DataError(f"{path}: 'data' must be a uint8 array of shape (N, 3072), found {dtype} {shape}")
    labels_arr = np.asarray(labels)
    if labels_arr.ndim != 1 or len(labels_arr) != len(data) or not np.issubdtype(labels_arr.dtype, np.integer):
        raise DataError(f"{path}: 'labels' must be {len(data)} integers, found {labels_arr.dtype} {labels_arr.shape}")
    if len(labels_arr) and (labels_arr.min() < 0 or labels_arr.max() >= NUM_CLASSES):
        raise DataError(
            f"{path}: labels must lie in 0..{NUM_CLASSES - 1}, found {labels_arr.min()}..{labels_arr.max()}"
        )
    # channel-major rows (R plane, G plane, B plane) -> HWC images
    images = np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    return Split(images=images, labels=labels_arr.astype(np.int64))


def _concat(splits: list[Split]) -> Split:
    return Split(np.concatenate([s.images for s in splits]), np.concatenate([s.labels for s in splits]))


def cifar_folder(data_dir: str | Path) -> Path:
    return Path(data_dir) / BASE_FOLDER


def cifar_present(data_dir: str | Path) -> bool:
    folder = cifar_folder(data_dir)
    return all((folder / name).is_file() for name in TRAIN_FILES + TEST_FILES)


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_cifar10(data_dir: str | Path) -> tuple[Split, Split, str]:
    """Read train and test splits; returns them with a description that says whether md5s matched."""
    folder = cifar_folder(data_dir)
    missing = [n for n in TRAIN_FILES + TEST_FILES if not (folder / n).is_file()]
    if missing:
        raise DataError(f"CIFAR-10 files missing in {folder}: {', '.join(missing)}")
    train = _concat([read_batch(folder / n) for n in TRAIN_FILES])
    test = _concat([read_batch(folder / n) for n in TEST_FILES])
    for split_name, split, files in (("train", train, TRAIN_FILES), ("test", test, TEST_FILES)):
        if len(split) == 0:  # well-formed but empty: training would "finish" with NaN loss and no steps
            raise DataError(f"{folder}: the {split_name} files ({', '.join(files)}) hold no images")
    known = official_md5s()
    official = all(_md5(folder / n) == known[n] for n in TRAIN_FILES + TEST_FILES)
    origin = "official release, md5 verified" if official else "CIFAR-10-format files, not the official release"
    return train, test, f"cifar10 from {folder} ({origin}; {len(train)} train / {len(test)} test)"


def download_cifar10(data_dir: str | Path) -> None:
    """Fetch and unpack the official archive, checking its md5. Raises DataError when offline."""
    from torchvision.datasets.utils import download_and_extract_archive

    _check_before_download(Path(data_dir))
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)  # an offline machine must fail in seconds, not hang
    created = not Path(data_dir).exists()
    try:
        download_and_extract_archive(ARCHIVE_URL, str(data_dir), filename=ARCHIVE_NAME, md5=ARCHIVE_MD5)
    except Exception as e:
        if created:  # leave no empty (or half-downloaded) folder behind that we made ourselves
            shutil.rmtree(data_dir, ignore_errors=True)
        raise DataError(
            f"CIFAR-10 is not in {cifar_folder(data_dir)} and the download failed ({type(e).__name__}: {e}); "
            f"put {ARCHIVE_NAME} (md5 {ARCHIVE_MD5}) unpacked under {data_dir}, or use --dataset synthetic"
        ) from None
    finally:
        socket.setdefaulttimeout(previous)


def _check_before_download(data_dir: Path) -> None:
    """Name what is wrong on disk instead of blaming the network: a batch 'file' that is a folder
    (extraction cannot replace it), or a local archive whose md5 is wrong (torchvision would silently
    try to re-download it; a matching one is unpacked without any network)."""
    for name in TRAIN_FILES + TEST_FILES:
        path = cifar_folder(data_dir) / name
        if path.exists() and not path.is_file():
            raise DataError(f"{path} is a folder (or other non-file), not a CIFAR-10 batch file; remove it")
    archive = data_dir / ARCHIVE_NAME
    if archive.exists():
        if not archive.is_file():
            raise DataError(f"{archive} is not a file; remove it")
        found = _md5(archive)
        if found != ARCHIVE_MD5:
            raise DataError(f"{archive} is incomplete or corrupt ({archive.stat().st_size} bytes, md5 {found}, "
                            f"expected {ARCHIVE_MD5}); delete it and download it again")


# -------------------------------------------------------------------------------------- synthetic


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
    else:
        n_train = min(cfg.subset or SYNTHETIC_TRAIN, SYNTHETIC_TRAIN)
        n_test = min(cfg.test_subset or SYNTHETIC_TEST, SYNTHETIC_TEST)
        train = synthetic_split(n_train, cfg.seed, "train")
        test = synthetic_split(n_test, cfg.seed, "test")
        description = "SYNTHETIC data (offline stand-in for CIFAR-10; accuracies are not CIFAR-10 accuracies)" + note
    train = take(train, cfg.subset, cfg.seed)
    test = take(test, cfg.test_subset, cfg.seed + 1)
    if cfg.subset or cfg.test_subset:
        description += f"; subset {len(train)} train / {len(test)} test"
    return DataBundle(train=train, test=test, source=source, description=description)


# ------------------------------------------------------------------------------ classic pipeline


def classic_train_transform() -> Callable:
    """The lab's train transform: RandomCrop(32, padding=4) with zero padding, flip, tensor, normalize."""
    from torchvision import transforms as T

    return T.Compose(
        [
            T.RandomCrop(32, padding=4),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(CIFAR_MEAN, CIFAR_STD),
        ]
    )


def classic_test_transform() -> Callable:
    from torchvision import transforms as T

    return T.Compose([T.ToTensor(), T.Normalize(CIFAR_MEAN, CIFAR_STD)])


class ImageDataset:
    """torch-style Dataset over a Split: uint8 HWC -> PIL -> transform, like torchvision's CIFAR10."""

    def __init__(self, split: Split, transform: Callable) -> None:
        self.split = split
        self.transform = transform

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        from PIL import Image

        return self.transform(Image.fromarray(self.split.images[i])), int(self.split.labels[i])


def _seed_worker(worker_id: int) -> None:
    # torch seeds each worker's torch RNG from the loader's generator; numpy/random follow it so any
    # augmentation using them is reproducible too.
    import random

    import torch

    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)
    from cifarlab.interrupt import ignore_stop_signals_in_worker

    ignore_stop_signals_in_worker()  # Ctrl-C stops the main process cleanly; it shuts workers down


def build_torch_loaders(cfg: TrainConfig, data: DataBundle, device: Any) -> tuple[Any, Any]:
    """The lab's classic pipeline: PIL transforms in DataLoader worker processes."""
    import torch
    from torch.utils.data import DataLoader

    pin = cfg.pin_memory if cfg.pin_memory is not None else device.type == "cuda"
    extra: dict[str, Any] = {}
    if cfg.workers > 0:
        extra["persistent_workers"] = cfg.persistent_workers
        extra["worker_init_fn"] = _seed_worker
        if cfg.prefetch_factor is not None:
            extra["prefetch_factor"] = cfg.prefetch_factor
    from cifarlab import distributed

    train_set = ImageDataset(data.train, classic_train_transform() if cfg.augment else classic_test_transform())
    # Under torchrun: DistributedSampler (this rank's share of one permutation per epoch; the engine
    # calls its set_epoch) for training, and a padding-free shard of the test split. Else None.
    train_sampler = distributed.train_sampler(train_set, cfg.seed)
    train = DataLoader(
        train_set,
        batch_size=cfg.batch_size,
        shuffle=train_sampler is None,
        sampler=train_sampler,
        num_workers=cfg.workers,
        pin_memory=pin,
        generator=torch.Generator().manual_seed(cfg.seed),
        **extra,
    )
    test = DataLoader(
        ImageDataset(data.test, classic_test_transform()),
        batch_size=cfg.test_batch_size,
        shuffle=False,
        sampler=distributed.eval_shard(len(data.test)),
        num_workers=cfg.workers,
        pin_memory=pin,
        **extra,
    )
    return train, test


def build_device_loaders(cfg: TrainConfig, data: DataBundle, device: Any) -> tuple[Any, Any]:
    """The fast path: the split resident on the device, batched crop/flip there (devicedata.py)."""
    from cifarlab.devicedata import build_device_loaders as build  # late: keeps `import data` light

    return build(cfg, data, device)


# loader name -> builder(cfg, data, device) -> (train_loader, test_loader).
LOADER_BUILDERS: dict[str, Callable[[TrainConfig, DataBundle, Any], tuple[Any, Any]]] = {
    "torch": build_torch_loaders,
    "device": build_device_loaders,
}


def build_loaders(cfg: TrainConfig, data: DataBundle, device: Any) -> tuple[Any, Any]:
    try:
        builder = LOADER_BUILDERS[cfg.loader]
    except KeyError:
        raise DataError(f"--loader {cfg.loader!r} is not available; choose one of: {', '.join(LOADER_BUILDERS)}")
    return builder(cfg, data, device)


def write_cifar_batch(path: Path, images_hwc: np.ndarray, labels: np.ndarray, batch_label: str = "batch") -> None:
    """Write a batch in the official on-disk format (protocol-2 pickle, bytes keys, channel-major
    rows). Used by tests and by anyone who wants to package their own CIFAR-format data."""
    data = np.ascontiguousarray(images_hwc.transpose(0, 3, 1, 2).reshape(len(images_hwc), -1)).astype(np.uint8)
    obj = {
        b"batch_label": batch_label.encode(),
        b"labels": [int(x) for x in labels],
        b"data": data,
        b"filenames": [f"img_{i}.png".encode() for i in range(len(labels))],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        pickle.dump(obj, f, protocol=2)
    os.replace(tmp, path)
