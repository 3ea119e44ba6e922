"""The lab's classic input pipeline (`--loader torch`): PIL transforms (RandomCrop 32 pad 4, flip,
ToTensor, Normalize) in DataLoader worker processes, as the lab's reference code does it."""

from __future__ import annotations

import random
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, DistributedSampler
from torchvision import transforms as T

from cifarlab.config import CIFAR_MEAN, CIFAR_STD, TrainConfig
from cifarlab.core.signals import ignore_stop_signals_in_worker
from cifarlab.data.cifar import IMAGE_SHAPE
from cifarlab.data.split import DataBundle, Split


def classic_train_transform() -> Callable:
    """The lab's train transform: RandomCrop(32, padding=4) with zero padding, flip, tensor, normalize."""
    return T.Compose(
        [
            T.RandomCrop(32, padding=4),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(CIFAR_MEAN, CIFAR_STD),
        ]
    )


def classic_test_transform() -> Callable:
    return T.Compose([T.ToTensor(), T.Normalize(CIFAR_MEAN, CIFAR_STD)])


class ImageDataset:
    """torch-style Dataset over a Split: uint8 HWC -> PIL -> transform, like torchvision's CIFAR10."""

    def __init__(self, split: Split, transform: Callable) -> None:
        self.split = split
        self.transform = transform

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        return self.transform(Image.fromarray(self.split.images[i])), int(self.split.labels[i])


def _seed_worker(worker_id: int) -> None:
    # torch seeds each worker's torch RNG from the loader's generator; numpy/random follow it so any
    # augmentation using them is reproducible too.
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)
    ignore_stop_signals_in_worker()  # Ctrl-C stops the main process cleanly; it shuts workers down


class ClassicLoader(DataLoader):
    """The classic pipeline's training loader: a torch DataLoader that is an epoch.EpochLoader. Reseeding sets its
    shuffling generator (single process) and its DistributedSampler's epoch (torchrun: without set_epoch every
    epoch repeats epoch 0's order)."""

    def reseed(self, epoch: int, epoch_seed: int, augmentation_seed: int) -> None:
        if isinstance(self.generator, torch.Generator):
            self.generator.manual_seed(augmentation_seed)
        if isinstance(self.sampler, DistributedSampler):
            self.sampler.set_epoch(epoch)

    def epoch_batch_sizes(self) -> list[int]:
        size = int(self.batch_size or 1)
        n = 0 if self.drop_last else len(self.dataset)  # type: ignore[arg-type]
        if not n:
            return [size]
        return [n] if n <= size else [size] + ([n % size] if n % size else [])

    def sample_shape(self) -> tuple[int, int, int]:
        height, width, channels = IMAGE_SHAPE
        return channels, height, width


def build_torch_loaders(
    cfg: TrainConfig, data: DataBundle, device: Any, rank: int = 0, world: int | None = None
) -> tuple[Any, Any]:
    """The lab's classic pipeline: PIL transforms in DataLoader worker processes."""
    pin = cfg.pin_memory if cfg.pin_memory is not None else device.type == "cuda"
    extra: dict[str, Any] = {}
    if cfg.workers > 0:
        extra["persistent_workers"] = cfg.persistent_workers
        extra["worker_init_fn"] = _seed_worker
        if cfg.prefetch_factor is not None:
            extra["prefetch_factor"] = cfg.prefetch_factor
    train_set = ImageDataset(data.train, classic_train_transform() if cfg.augment else classic_test_transform())
    # Under torchrun: DistributedSampler (this rank's share of one permutation per epoch; the engine
    # calls its set_epoch) for training, and a padding-free shard of the test split. Else None.
    train_sampler = None
    if world is not None:  # any torchrun world, 1 included: its order is DistributedSampler's
        train_sampler = DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed,
                                           drop_last=False)
    train = ClassicLoader(
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
        sampler=eval_shard(len(data.test), rank, world),
        num_workers=cfg.workers,
        pin_memory=pin,
        **extra,
    )
    return train, test



def eval_shard(n: int, rank: int, world: int | None) -> list[int] | None:
    """Rank r's test indices r, r+N, r+2N, ...: every image exactly once over all ranks, no padding."""
    return None if world is None else list(range(rank, n, world))
