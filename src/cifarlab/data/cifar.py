"""CIFAR-10 on disk: the python-pickle release (`cifar-10-batches-py/data_batch_1..5`, `test_batch`).

The pickles are read with a restricted unpickler that only resolves the handful of globals a numpy
array needs, so a crafted file cannot execute code; every array is checked for shape, dtype and
label range before use. Images are kept as one uint8 NHWC array per split (150 MB for the train
split). Also the md5-checked download and `write_cifar_batch`, which writes the official format.
"""

from __future__ import annotations

import io
import os
import pickle
import shutil
import socket
from pathlib import Path
from typing import Any

import numpy as np
from torchvision.datasets import CIFAR10
from torchvision.datasets.utils import download_and_extract_archive

from cifarlab.config import NUM_CLASSES
from cifarlab.core.errors import DataError
from cifarlab.core.fileio import file_digest
from cifarlab.data.split import Split

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
    return {name: md5 for name, md5 in CIFAR10.train_list + CIFAR10.test_list}




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
        # protocol 5 (pickle.HIGHEST_PROTOCOL): frombuffer(bytes in the file, dtype).reshape(shape)
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
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
    # '~' expanded as torchvision's download expands it: '--data=~/x' reaches us unexpanded
    return Path(data_dir).expanduser() / BASE_FOLDER


def cifar_present(data_dir: str | Path) -> bool:
    folder = cifar_folder(data_dir)
    return all((folder / name).is_file() for name in TRAIN_FILES + TEST_FILES)


def _md5(path: Path) -> str:
    return file_digest(path, "md5")


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
    data_dir = Path(data_dir).expanduser()
    _check_before_download(data_dir)
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)  # an offline machine must fail in seconds, not hang
    created = not Path(data_dir).exists()
    try:
        download_and_extract_archive(ARCHIVE_URL, str(data_dir), filename=ARCHIVE_NAME, md5=ARCHIVE_MD5)
    except Exception as e:
        if created:  # leave no empty (or half-downloaded) folder behind that we made ourselves
            shutil.rmtree(data_dir, ignore_errors=True)
        folder = cifar_folder(data_dir)
        missing = [n for n in TRAIN_FILES + TEST_FILES if not (folder / n).is_file()]
        absent = (f"CIFAR-10 files missing in {folder}: {', '.join(missing)}"
                  if len(missing) < len(TRAIN_FILES + TEST_FILES) else f"CIFAR-10 is not in {folder}")
        raise DataError(
            f"{absent}, and the download failed ({type(e).__name__}: {e}); "
            f"put {ARCHIVE_NAME} (md5 {ARCHIVE_MD5}) unpacked under {data_dir}, or use --dataset synthetic"
        ) from None
    finally:
        socket.setdefaulttimeout(previous)


def _check_before_download(data_dir: Path) -> None:
    """Name what is wrong on disk instead of blaming the network: a batch 'file' that is a folder
    (extraction cannot replace it), or a local archive whose md5 is wrong (torchvision would silently
    try to re-download it; a matching one is unpacked without any network). Also a --data that is a
    file, or that is the batches folder itself (the download would land inside it)."""
    folder = cifar_folder(data_dir)
    if data_dir.exists() and not data_dir.is_dir():
        raise DataError(f"--data {data_dir} is a file, not a folder; point --data at the folder that holds "
                        f"{BASE_FOLDER}/ (or where it may be downloaded)")
    if any((data_dir / name).is_file() for name in TRAIN_FILES + TEST_FILES):
        raise DataError(f"--data {data_dir} holds the CIFAR-10 batch files itself; --data names the folder above "
                        f"{BASE_FOLDER}/: use --data {data_dir.parent}"
                        + ("" if data_dir.name == BASE_FOLDER else f" after renaming {data_dir.name} to {BASE_FOLDER}"))
    if folder.exists() and not folder.is_dir():
        raise DataError(f"{folder} is not a folder; remove it (CIFAR-10's files belong in a folder of that name)")
    for name in TRAIN_FILES + TEST_FILES:
        path = folder / name
        if path.exists() and not path.is_file():
            raise DataError(f"{path} is a folder (or other non-file), not a CIFAR-10 batch file; remove it")
    # Some files there, some missing: the archive unpacks all six over them. Only where those already there are
    # the official files (same md5: nothing changes) may it; the user's own files are never overwritten.
    present = [n for n in TRAIN_FILES + TEST_FILES if (folder / n).is_file()]
    official = official_md5s()
    changed = [n for n in present if _md5(folder / n) != official.get(n)]
    if changed:
        missing = [n for n in TRAIN_FILES + TEST_FILES if n not in present]
        raise DataError(f"CIFAR-10 files missing in {folder}: {', '.join(missing)}; downloading would unpack the official "
                        f"archive over {', '.join(changed)}, which differ from the official files: restore the missing "
                        f"files, or move {folder} away to download a fresh copy")
    archive = data_dir / ARCHIVE_NAME
    if archive.exists():
        if not archive.is_file():
            raise DataError(f"{archive} is not a file; remove it")
        found = _md5(archive)
        if found != ARCHIVE_MD5:
            raise DataError(f"{archive} is incomplete or corrupt ({archive.stat().st_size} bytes, md5 {found}, "
                            f"expected {ARCHIVE_MD5}); delete it and download it again")


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
