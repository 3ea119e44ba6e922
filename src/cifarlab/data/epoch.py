"""The seam between a training loader and the training loop: what the loop needs of a loader besides its batches.
The classic DataLoader pipeline (classic.ClassicLoader) and the device-resident loader (device.DeviceLoader)
implement it; the engine and the step set-up call it instead of probing a loader's attributes."""

from __future__ import annotations

from typing import Any, Iterator, Protocol, runtime_checkable


@runtime_checkable
class EpochLoader(Protocol):
    """An iterable of (inputs, targets) batches, one epoch per iteration."""

    def __iter__(self) -> Iterator[Any]: ...

    def reseed(self, epoch: int, epoch_seed: int, augmentation_seed: int) -> None:
        """Make this epoch's order and augmentation depend on the seeds alone (engine.seed_epoch): the order from
        epoch_seed (the same on every rank), the augmentation from augmentation_seed (offset per rank)."""

    def epoch_batch_sizes(self) -> list[int]:
        """The batch sizes one epoch yields: the full one and the last, partial one (if any)."""

    def sample_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one input image."""
