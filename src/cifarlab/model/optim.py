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
    torch_class: str  # a class of OPTIMIZER_CLASSES, else an attribute of torch.optim
    uses_momentum: bool  # the lab's momentum 0.9 applies "where it applies"
    extra: dict[str, Any] = field(default_factory=dict)


OPTIMIZERS: dict[str, OptimizerSpec] = {
    "sgd": OptimizerSpec("SGD", uses_momentum=True),
    "sgd-nesterov": OptimizerSpec("SGD", uses_momentum=True, extra={"nesterov": True}),
    "adagrad": OptimizerSpec("CapturableAdagrad", uses_momentum=False),
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
    optimizer_class = OPTIMIZER_CLASSES.get(spec.torch_class) or getattr(torch.optim, spec.torch_class)
    return optimizer_class(params, **kwargs)


class CapturableAdagrad(torch.optim.Adagrad):
    """torch.optim.Adagrad with one more path: where a group has capturable=True (capture.prepare_optimizer
    sets it), a step a CUDA graph can hold. torch's own foreach Adagrad reads every step counter and a tensor
    lr back to the host (`.item()`, which a capture forbids) and its fused kernel is CPU-only in torch 2.11:
    this path keeps the counters on the device and multiplies by the lr tensor on the device. Same state
    ("sum", "step"), same math and the same operation order as torch's foreach path with lr_decay=0 (the lab's
    setting); every other group steps through torch's code unchanged."""

    def __init__(self, params: Iterable[Any], **kwargs: Any) -> None:
        super().__init__(params, **kwargs)
        self.defaults["capturable"] = False
        for group in self.param_groups:
            group.setdefault("capturable", False)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        if not any(group.get("capturable") for group in self.param_groups):
            return super().step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if not group.get("capturable"):
                raise RuntimeError("CapturableAdagrad: set capturable on every param group or on none")
            if group["lr_decay"] != 0 or group["maximize"]:
                raise RuntimeError("capturable Adagrad supports lr_decay=0 and maximize=False only")
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            if any(p.grad.is_sparse for p in params):
                raise RuntimeError("capturable Adagrad does not take sparse gradients")
            grads = [p.grad for p in params]
            sums = [self._state_for(p, group)["sum"] for p in params]
            steps = [self.state[p]["step"] for p in params]
            torch._foreach_add_(steps, 1)  # device counters: no host read
            if group["weight_decay"] != 0:
                grads = list(torch._foreach_add(grads, params, alpha=group["weight_decay"]))
            torch._foreach_addcmul_(sums, grads, grads, value=1)
            std = torch._foreach_sqrt(sums)
            torch._foreach_add_(std, group["eps"])
            # torch's order: numerator = grad * -lr, then param += numerator / std (lr a tensor or a float)
            numerator = torch._foreach_mul(grads, group["lr"])
            torch._foreach_neg_(numerator)
            torch._foreach_addcdiv_(params, numerator, std)
        return loss

    def _state_for(self, p: torch.Tensor, group: dict[str, Any]) -> dict[str, Any]:
        """The parameter's state, created as torch's Adagrad creates it, with the counter on p's device."""
        state = self.state[p]
        if "sum" not in state:
            state["sum"] = torch.full_like(p, group["initial_accumulator_value"], memory_format=torch.preserve_format)
        step = state.get("step")
        if not torch.is_tensor(step) or step.device != p.device:
            state["step"] = torch.tensor(float(step or 0.0), dtype=torch.float32, device=p.device)
        return state


# Classes of this module the registry names (everything else is torch.optim's).
OPTIMIZER_CLASSES: dict[str, type[torch.optim.Optimizer]] = {"CapturableAdagrad": CapturableAdagrad}
