"""The loader registry: --loader name -> builder(cfg, data, device, rank, world) -> (train, test).

world is None for a run that is not distributed, else the torchrun world size (1 included: a world of
one shuffles like a larger one, with DistributedSampler, so 1 process and N processes are comparable)."""

from __future__ import annotations

from typing import Any, Callable

from cifarlab.config import TrainConfig
from cifarlab.core.errors import DataError
from cifarlab.data.classic import build_torch_loaders
from cifarlab.data.device import build_device_loaders
from cifarlab.data.split import DataBundle

LoaderBuilder = Callable[..., tuple[Any, Any]]

# loader name -> builder(cfg, data, device, rank=0, world=None) -> (train_loader, test_loader).
LOADER_BUILDERS: dict[str, LoaderBuilder] = {
    "torch": build_torch_loaders,
    "device": build_device_loaders,
}


def build_loaders(
    cfg: TrainConfig, data: DataBundle, device: Any, rank: int = 0, world: int | None = None
) -> tuple[Any, Any]:
    """Train and test loaders for this process; under torchrun pass its rank and the world size."""
    try:
        builder = LOADER_BUILDERS[cfg.loader]
    except KeyError:
        raise DataError(f"--loader {cfg.loader!r} is not available; choose one of: {', '.join(LOADER_BUILDERS)}")
    return builder(cfg, data, device, rank=rank, world=world)
