"""Lab Q1-Q4: facts about the model and optimizer, computed from live modules, never hard-coded.

Gradient elements are counted after a real forward + backward pass; optimizer state after a real
step. The number of *non-zero* gradient entries is reported too, because some published answers
counted those (or gradient tensors) and it explains why their figures differ.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from cifarlab.config import CIFAR_MEAN, CIFAR_STD, INSPECT_BATCH_SIZE
from cifarlab.data import synthetic_split
from cifarlab.model.optim import build_optimizer
from cifarlab.model.resnet import resnet18
from cifarlab.model.utilization import count_flops

FACTS_SCHEMA = "cifarlab.facts/1"


def _input_batch(batch_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    split = synthetic_split(batch_size, seed, "train")
    x = torch.from_numpy(split.images).permute(0, 3, 1, 2).float().div(255)
    mean = torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR_STD).view(1, 3, 1, 1)
    return (x - mean) / std, torch.from_numpy(split.labels)


def structure_facts(model: nn.Module) -> dict[str, Any]:
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    by_kernel: dict[str, int] = {}
    for m in convs:
        key = "x".join(str(k) for k in m.kernel_size)
        by_kernel[key] = by_kernel.get(key, 0) + 1
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    params = [p for p in model.parameters() if p.requires_grad]
    return {
        "conv_layers": len(convs),
        "conv_layers_by_kernel": by_kernel,
        "batchnorm_layers": sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()),
        "last_linear_in_features": linears[-1].in_features if linears else None,
        "last_linear_out_features": linears[-1].out_features if linears else None,
        "trainable_parameters": sum(p.numel() for p in params),
        "trainable_parameter_tensors": len(params),
    }


def flop_facts(model: nn.Module) -> dict[str, Any]:
    """FLOPs per image (torch.utils.flop_counter counts a multiply-add as 2 FLOPs)."""
    forward, train = count_flops(model, *_input_batch(2, seed=0))  # training step on a batch of 2
    return {
        "forward_flops_per_image": forward,
        "forward_macs_per_image": forward // 2,
        "train_flops_per_image": train,  # forward + backward
    }


def optimizer_facts(optimizer_name: str, norm: str, batch_size: int, seed: int) -> dict[str, Any]:
    """Gradient and optimizer-state sizes after one real forward/backward/step."""
    torch.manual_seed(seed)
    model = resnet18(norm=norm)
    model.train()
    opt = build_optimizer(optimizer_name, model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    x, y = _input_batch(batch_size, seed)
    opt.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(x), y).backward()
    params = [p for p in model.parameters() if p.requires_grad]
    grads = [p.grad for p in params if p.grad is not None]
    grad_elements = sum(g.numel() for g in grads)
    grad_nonzero = sum(int((g != 0).sum()) for g in grads)
    opt.step()
    buffer_elements = 0  # per-parameter state tensors (momentum, exp_avg, exp_avg_sq, ...)
    scalar_elements = 0  # per-parameter scalars such as Adam's step counter
    buffers_by_name: dict[str, int] = {}
    for p in params:
        for key, value in opt.state.get(p, {}).items():
            if not torch.is_tensor(value):
                continue
            if value.shape == p.shape:
                buffer_elements += value.numel()
                buffers_by_name[key] = buffers_by_name.get(key, 0) + value.numel()
            else:
                scalar_elements += value.numel()
    n_params = sum(p.numel() for p in params)
    return {
        "optimizer": optimizer_name,
        "backward_batch_size": batch_size,
        "trainable_parameters": n_params,
        "gradient_elements": grad_elements,
        "gradient_tensors": len(grads),
        "gradient_nonzero_elements": grad_nonzero,
        "optimizer_state_elements": buffer_elements,
        "optimizer_state_by_buffer": buffers_by_name,
        "optimizer_state_scalars": scalar_elements,
        "optimizer_state_per_parameter": buffer_elements / n_params if n_params else 0.0,
        "optimizer_state_bytes_fp32": 4 * (buffer_elements + scalar_elements),
    }


def inspect_model(
    optimizers: tuple[str, ...] = ("sgd", "adam"), norm: str = "batch", batch_size: int = INSPECT_BATCH_SIZE, seed: int = 0
) -> dict[str, Any]:
    model = resnet18(norm=norm)
    facts: dict[str, Any] = {"schema": FACTS_SCHEMA, "norm": norm, **structure_facts(model)}
    facts.update(flop_facts(model))
    facts["optimizers"] = {name: optimizer_facts(name, norm, batch_size, seed) for name in optimizers}
    return facts


def one_image_gradients(seed: int = 0) -> dict[str, dict[str, int]]:
    """Gradient elements and non-zero gradient entries after a backward pass on ONE image, with BatchNorm
    ("batch") and without ("none"): the kind of figure a seed report counts (8,920,240 of 11,164,362 is
    the no-BatchNorm model's parameter count, so its counts came from that model)."""
    out: dict[str, dict[str, int]] = {}
    for norm in ("batch", "none"):
        o = optimizer_facts("sgd", norm, 1, seed)
        out[norm] = {"parameters": o["trainable_parameters"], "gradient_elements": o["gradient_elements"],
                     "nonzero": o["gradient_nonzero_elements"]}
    return out


def explain(facts: dict[str, Any]) -> list[tuple[str, str]]:
    """(question, answer) pairs in the lab's words, built from the measured facts."""
    k = facts["conv_layers_by_kernel"]
    n3, n1 = k.get("3x3", 0), k.get("1x1", 0)
    answers = [
        (
            "Q1 How many convolutional layers?",
            f"{facts['conv_layers']} Conv2d modules: {n3} 3x3 convolutions (the stem plus two per BasicBlock "
            f"x 8 blocks) and {n1} 1x1 shortcut projections where the stage width changes. Answering "
            f"'{n3}' counts only the 3x3 'main path' layers; '{facts['conv_layers']}' counts every Conv2d.",
        ),
        (
            "Q2 Input dimension of the last linear layer?",
            f"{facts['last_linear_in_features']}: the 512-channel 4x4 map of layer4, averaged to 1x1.",
        ),
    ]
    for name, o in facts["optimizers"].items():
        q = "Q3" if name == "sgd" else "Q4" if name == "adam" else "Q3/Q4"
        answers.append(
            (
                f"{q} Trainable parameters and gradients with {name}?",
                f"{o['trainable_parameters']:,} trainable parameters in {facts['trainable_parameter_tensors']} "
                f"tensors; after a real backward pass {o['gradient_elements']:,} gradient elements in "
                f"{o['gradient_tensors']} tensors -- one per parameter, for any optimizer. "
                f"{o['gradient_nonzero_elements']:,} of them were non-zero for that batch of "
                f"{o['backward_batch_size']} (dead ReLUs give exact zeros), which is what counting 'non-zero "
                f"gradients' measures. The optimizer keeps {o['optimizer_state_elements']:,} state elements "
                f"({o['optimizer_state_per_parameter']:.0f}x the parameters: {o['optimizer_state_by_buffer']}).",
            )
        )
    return answers
