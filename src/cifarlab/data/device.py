"""The fast path's data loader (`--loader device`): the whole split resident on the training device.

The split is moved to the device once, as a uint8 NHWC tensor (CIFAR-10 train: 150 MB; on CPU it
shares the numpy array's memory, no copy at all). Each epoch draws from one `torch.Generator` that
lives on the same device:

- a permutation of the split (every image exactly once per epoch, like DataLoader(shuffle=True)),
- per image a crop offset (row, col), each uniform in 0..8 of the 40x40 zero-padded image (a shift
  of -4..4), and a flip bit with p=0.5 -- the distribution torchvision's RandomCrop(32, padding=4)
  and RandomHorizontalFlip() draw for each image.

Per chunk of the epoch's order: one gather of the images, zero padding, crop and flip as one batched
index op on uint8 (so padding is zeros *before* normalizing, as RandomCrop pads the PIL image), then
ToTensor's /255 and Normalize's (x - mean) / std in the same order as torchvision, output in
channels_last; the chunk's batches are then slices of it (views: no work per batch). On CUDA a chunk is
8,192 images (`CUDA_CHUNK_IMAGES`): ~20 ops per chunk instead of per batch, 144 an epoch instead of 7,824 at
batch 128 (`benchmarks/loader_ops.py`), so ~140 kernel launches instead of ~8,000, with ~200 MB of transient
device memory. On a CPU there is no launch to save and a batch's working set stays in cache: on the idle
2-core EPYC an epoch's loader work took 0.38-0.47 s batch by batch against 0.70-0.78 s in chunks of 8,192 (three runs), so a
CPU chunk is one batch. Every op works image by image, so the pixels are the same bit for bit whatever the
chunk. No Python loop over images, no host->device copy, no host-device synchronization inside the loop.
The chunk's work lands in the data wait of its first batch.

Data parallel (torchrun; the runner passes rank and world): every rank draws the same permutation and augmentation and keeps positions
rank, rank+world, ...; the train split is padded (wrapped) to a multiple of world like
DistributedSampler, the test split is not (each test image exactly once over all ranks).

Reproducibility: engine.seed_epoch reseeds `.generator` before every epoch, so epoch k depends only
on (seed, k). Without it, successive epochs continue the generator's stream, as DataLoader does.
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np
import torch

from cifarlab.config import CIFAR_MEAN, CIFAR_STD, TrainConfig
from cifarlab.data.split import DataBundle

PAD = 4  # RandomCrop(32, padding=4)
FLIP_P = 0.5  # RandomHorizontalFlip()
CUDA_CHUNK_IMAGES = 8192  # images prepared per pass on CUDA; one batch on a CPU (see the module docstring)


def draw_augmentation(n: int, generator: torch.Generator, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image crop offsets (n, 2) in 0..2*PAD (row, col of the crop's corner in the padded image)
    and flip flags (n,), drawn on `device` from `generator`."""
    offsets = torch.randint(0, 2 * PAD + 1, (n, 2), generator=generator, device=device)
    flips = torch.rand(n, generator=generator, device=device) < FLIP_P
    return offsets, flips


def crop_flip(images: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, C) -> (B, H, W, C): zero-pad by PAD on every side, take the HxW window whose
    top-left corner is offsets[b] in the padded image, mirror it left-right where flips[b]."""
    b, h, w, c = images.shape
    ph, pw = h + 2 * PAD, w + 2 * PAD
    padded = images.new_zeros((b, ph, pw, c))
    padded[:, PAD : PAD + h, PAD : PAD + w] = images
    row = torch.arange(h, device=images.device)
    col = torch.arange(w, device=images.device)
    rows = offsets[:, :1] + row  # (B, H)
    # A flip reads the crop's columns right to left: column x of the output is crop column w-1-x.
    cols = offsets[:, 1:] + torch.where(flips[:, None], col.flip(0), col)  # (B, W)
    # One index_select of whole pixels (C bytes each) from the flattened padded batch: several times
    # faster on CPU than three-tensor advanced indexing, and the same single gather kernel on a GPU.
    pixel = torch.arange(b, device=images.device)[:, None, None] * (ph * pw) + rows[:, :, None] * pw + cols[:, None, :]
    return padded.view(b * ph * pw, c).index_select(0, pixel.view(-1)).view(b, h, w, c)


def normalize(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """uint8 NHWC -> float32 NCHW, (x / 255 - mean) / std in torchvision's order of operations.
    mean/std are (1, C, 1, 1) tensors on the images' device."""
    x = images.permute(0, 3, 1, 2)  # NCHW view whose strides are already channels_last: no copy
    x = x.float().div_(255).sub_(mean).div_(std)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    return x.contiguous(memory_format=layout)


class DeviceLoader:
    """Iterable of (inputs, targets) batches from a split held on `device`. len() = number of batches;
    the last, partial batch is kept (DataLoader's drop_last=False)."""

    def __init__(
        self,
        images: np.ndarray | torch.Tensor,
        labels: np.ndarray | torch.Tensor,
        batch_size: int,
        device: torch.device | str,
        *,
        augment: bool,
        shuffle: bool,
        channels_last: bool = True,
        seed: int = 0,
        rank: int = 0,
        world: int = 1,
        pad: bool = True,
        mean: tuple[float, ...] = CIFAR_MEAN,
        std: tuple[float, ...] = CIFAR_STD,
        chunk_images: int | None = None,
    ) -> None:
        self.device = torch.device(device)
        images_t = torch.as_tensor(images)
        labels_t = torch.as_tensor(labels)
        if images_t.dtype != torch.uint8 or images_t.ndim != 4 or images_t.shape[3] != len(mean):
            raise ValueError(f"images must be uint8 (N, H, W, {len(mean)}), got {images_t.dtype} {tuple(images_t.shape)}")
        if labels_t.shape != images_t.shape[:1]:
            raise ValueError(f"labels must have shape ({images_t.shape[0]},), got {tuple(labels_t.shape)}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world:
            raise ValueError(f"rank must be in 0..world-1, got rank {rank} of world {world}")
        # The one host->device copy of the split (a no-op on CPU).
        self.images = images_t.to(self.device)
        self.labels = labels_t.to(self.device, dtype=torch.int64)
        self.batch_size = batch_size
        # Images prepared per pass (None: CUDA_CHUNK_IMAGES on CUDA, one batch elsewhere), rounded up to a
        # whole number of batches so that batch boundaries do not depend on it.
        default = CUDA_CHUNK_IMAGES if self.device.type == "cuda" else 1
        chunk = default if chunk_images is None else chunk_images
        if chunk < 1:
            raise ValueError(f"chunk_images must be >= 1, got {chunk}")
        self.chunk_images = -(-chunk // batch_size) * batch_size
        self.augment = augment
        self.shuffle = shuffle
        self.channels_last = channels_last
        self._mean = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self._std = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed)
        # Data parallel (distributed.py): every rank draws the same permutation and augmentation and
        # keeps positions rank, rank+world, ... (pad: wrapped up to a multiple of world, so all ranks
        # run the same number of steps, like DistributedSampler; the test split is not padded).
        self.rank, self.world, self.pad = rank, world, pad
        self.rank_sharded = world > 1  # engine.seed_epoch: seed the generator identically on all ranks

    def reseed(self, epoch: int, epoch_seed: int, augmentation_seed: int) -> None:
        """epoch.EpochLoader: one generator draws the permutation and the augmentation; sharded across ranks it
        must draw the same permutation everywhere, so it takes the epoch's seed there (augmentation then
        matches across ranks too, on different images)."""
        self.generator.manual_seed(epoch_seed if self.rank_sharded else augmentation_seed)

    def epoch_batch_sizes(self) -> list[int]:
        """epoch.EpochLoader: from the whole split in one process; sharded, the full batch alone."""
        n = len(self.labels) if self.world == 1 else 0
        if not n:
            return [self.batch_size]
        if n <= self.batch_size:
            return [n]
        return [self.batch_size] + ([n % self.batch_size] if n % self.batch_size else [])

    def sample_shape(self) -> tuple[int, int, int]:
        """epoch.EpochLoader: (C, H, W) of the resident uint8 NHWC split."""
        return int(self.images.shape[3]), int(self.images.shape[1]), int(self.images.shape[2])

    def _padded_total(self, n: int) -> int:
        return -(-n // self.world) * self.world if self.pad else n

    def _positions(self, n: int) -> torch.Tensor | None:
        """This rank's positions in the epoch's order (None: single process, all of them)."""
        if self.world == 1:
            return None
        return torch.arange(self.rank, self._padded_total(n), self.world, device=self.device) % n

    def __len__(self) -> int:
        n = len(self.labels)
        local = n if self.world == 1 else len(range(self.rank, self._padded_total(n), self.world))
        return -(-local // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.labels)
        # All of the epoch's random draws happen here, in three device ops, before the first batch.
        order = torch.randperm(n, generator=self.generator, device=self.device) if self.shuffle else None
        offsets, flips = draw_augmentation(n, self.generator, self.device) if self.augment else (None, None)
        positions = self._positions(n)
        if positions is not None:
            order = positions if order is None else order[positions]
            if offsets is not None and flips is not None:
                offsets, flips = offsets[positions], flips[positions]
            n = len(positions)
        for start in range(0, n, self.chunk_images):
            end = min(start + self.chunk_images, n)
            index: Any = order[start:end] if order is not None else slice(start, end)
            x = self.images[index]
            if offsets is not None and flips is not None:
                x = crop_flip(x, offsets[start:end], flips[start:end])
            inputs, targets = normalize(x, self._mean, self._std, self.channels_last), self.labels[index]
            for b in range(0, end - start, self.batch_size):
                yield inputs[b : b + self.batch_size], targets[b : b + self.batch_size]


def build_device_loaders(
    cfg: TrainConfig, data: DataBundle, device: torch.device, rank: int = 0, world: int | None = None
) -> tuple[DeviceLoader, DeviceLoader]:
    """LOADER_BUILDERS["device"]: augmented, shuffled train batches; the test split plain, in order,
    at the test batch size. --workers, --pin-memory and friends do not apply."""
    shard = {"rank": rank, "world": world or 1}  # 0, 1 unless under torchrun
    train = DeviceLoader(
        data.train.images, data.train.labels, cfg.batch_size, device,
        augment=cfg.augment, shuffle=True, channels_last=cfg.channels_last, seed=cfg.seed, **shard,
    )
    test = DeviceLoader(
        data.test.images, data.test.labels, cfg.test_batch_size, device,
        augment=False, shuffle=False, channels_last=cfg.channels_last, seed=cfg.seed, pad=False, **shard,
    )
    return train, test
