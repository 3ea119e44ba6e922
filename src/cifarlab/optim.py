"""Optimizer registry: lab C6's five optimizers, all built from the same lr / weight decay / momentum.

A registry (not an if/elif chain) so an unknown name can never fall through to a default, and the
names match config.OPTIMIZER_NAMES, which the config validates against without loading torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

import torch

from cifarlab.config import OPTIMIZER_NAMES


@dataclass(frozen=True)
class OptimizerSpec:
    torch_class: str  # attribute of torch.optim
    uses_momentum: bool  # the lab's momentum 0.9 applies "where it applies"
    extra: dict[str, Any] = field(default_factory=dict)


OPTIMIZERS: dict[str, OptimizerSpec] = {
    "sgd": OptimizerSpec("SGD", uses_momentum=True),
    "sgd-nesterov": OptimizerSpec("SGD", uses_momentum=True, extra={"nesterov": True}),
    "adagrad": OptimizerSpec("Adagrad", uses_momentum=False),
    "adadelta": OptimizerSpec("Adadelta", uses_momentum=False),
    "adam": OptimizerSpec("Adam", uses_momentum=False),
}
assert tuple(OPTIMIZERS) == OPTIMIZER_NAMES, "config.OPTIMIZER_NAMES and the registry must list the same names"


def build_optimizer(
    name: str, params: Iterable[Any], lr: float, momentum: float, weight_decay: float
) -> torch.optim.Optimizer:
    try:
        spec = OPTIMIZERS[name]
    except KeyError:
        raise ValueError(f"unknown optimizer {name!r}; known: {', '.join(OPTIMIZERS)}") from None
    # foreach: the multi-tensor kernels replace one small kernel per parameter tensor (62 of them)
    # with a few large ones; the default on CUDA, asked for explicitly so CPU runs the same path.
    kwargs: dict[str, Any] = {"lr": lr, "weight_decay": weight_decay, "foreach": True, **spec.extra}
    if spec.uses_momentum:
        kwargs["momentum"] = momentum
    return getattr(torch.optim, spec.torch_class)(params, **kwargs)
