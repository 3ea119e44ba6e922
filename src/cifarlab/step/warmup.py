"""Warm-up that changes nothing: `preserved_training_state` puts every parameter, buffer and optimizer state
tensor back after warm-up steps (cuDNN autotuning, compilation, a CUDA graph's capture), in place, so a graph
captured inside keeps valid addresses and a run starts from the weights it would have started from."""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
from torch import nn

# Optimizer state a warm-up may create, whose all-zero value equals "no state yet" for that optimizer.
ZERO_IS_FRESH = {"step", "momentum_buffer", "exp_avg", "exp_avg_sq", "square_avg", "acc_delta", "sum"}


def optimizer_params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


@contextlib.contextmanager
def preserved_training_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, *, keep_new_state: Callable[[], bool] = lambda: True
) -> Iterator[None]:
    """Run warm-up steps inside; on exit every parameter and buffer (BatchNorm statistics and
    num_batches_tracked included) and the optimizer state are what they were on entry.

    Tensors are restored *in place* (copy_), so a graph captured inside keeps valid addresses. State
    entries the warm-up created are zeroed (fresh-equivalent, `ZERO_IS_FRESH`) while keep_new_state()
    is true (a captured graph holds them), otherwise removed (the eager path then starts from the very
    state it would have had)."""
    tensors = list({id(t): t for t in (*model.parameters(), *model.buffers())}.values())
    saved = [t.detach().clone() for t in tensors]
    state_before = {
        id(p): {k: (v.detach().clone() if torch.is_tensor(v) else v) for k, v in optimizer.state[p].items()}
        for p in optimizer_params(optimizer) if p in optimizer.state
    }
    try:
        yield
    finally:
        with torch.no_grad():
            for t, s in zip(tensors, saved):
                t.copy_(s)
            keep = keep_new_state()
            for p in optimizer_params(optimizer):
                before = state_before.get(id(p), {})
                state = optimizer.state.get(p)
                if state is None:
                    continue
                for key in list(state):
                    value = state[key]
                    if key in before:
                        if torch.is_tensor(value) and keep:
                            value.copy_(before[key])  # in place: the graph may hold this tensor
                        else:
                            state[key] = before[key]
                    elif keep and torch.is_tensor(value) and key in ZERO_IS_FRESH:
                        value.zero_()
                    elif keep:
                        raise RuntimeError(f"warm-up created optimizer state {key!r} with no known fresh value")
                    else:
                        del state[key]
                if not state and not before:
                    del optimizer.state[p]
