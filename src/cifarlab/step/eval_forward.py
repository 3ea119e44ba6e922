"""Evaluation's forward pass, eager or replayed as a captured CUDA graph (`EvalForward`).

On the fast path on CUDA an eager forward of a test batch is launch-bound (~100 small kernels; on an H200 an
evaluation of 10,000 images took 0.25-0.45 s). Each evaluation therefore warms up on its first batch,
captures `model(x)` in eval mode and replays it for every batch of that shape (the partial last batch runs
eagerly). The graph is replayed in one evaluation only, so it never reads addresses that a later step,
checkpoint load or warm-up could change.

Memory: a graph's private pool is not handed back when the graph is destroyed (public reports: reserved memory
growing ~23 MB per capture with a fresh pool each time), so the run's graphs share one pool handle. A shared
handle whose graphs are all gone trips torch's allocator (`TORCH_INTERNAL_ASSERT(use_count > 0)` when the
next capture increfs it), so the previous evaluation's graph is kept, never replayed, until the next one is
captured: one pool per run, at most two graphs in it, only during a capture.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from cifarlab.core.text import one_line
from cifarlab.step.capture import STEP_EAGER, STEP_GRAPH, autocast_context

EVAL_WARMUP_CALLS = 2  # eager eval forwards on the capture stream before capture (cuDNN picks its kernels)
# A replay's logits against the eager warm-up's on the same batch: the same kernels should give the same
# numbers; anything beyond bf16 rounding of the largest logit means the graph computed something else.
EVAL_CHECK_RTOL = 1e-2


class EvalForward:
    """`model(inputs)` under the run's autocast, for evaluation (eval mode, no_grad: the caller's). With
    capture=True (CUDA): per evaluation (`session()`), the first batch (the full test batch, unless the split
    is smaller) is run eagerly EVAL_WARMUP_CALLS times on a side stream, then captured; every batch of that
    shape is copied into the static input and replayed (its logits are the graph's static output, valid until
    the next call); another shape (the partial last batch) runs eagerly. A failure falls back to eager for the
    rest of the run, with `fallback_reason`; the caller warns."""

    def __init__(self, model: nn.Module, precision: str, device: torch.device, *, capture: bool,
                 note: str | None = None) -> None:
        self.model = model
        self.precision = precision
        self.device = device
        self.capture = capture
        self.note = note  # why evaluation runs eagerly (None: it captures)
        self.fallback_reason: str | None = None
        self.replays = 0  # batches replayed so far (run total): the graph was really used
        self._graph: Any = None
        self._static_x: torch.Tensor | None = None
        self._static_out: torch.Tensor | None = None
        self._tried = False  # this evaluation already tried to capture
        self._pool: Any = None  # the run's graph pool handle (torch.cuda.graph_pool_handle)
        self._previous: Any = None  # the last evaluation's graph: keeps _pool in use until the next capture

    @property
    def mode(self) -> str:
        return STEP_GRAPH if self.capture and self.fallback_reason is None else STEP_EAGER

    @contextlib.contextmanager
    def session(self) -> Any:
        """One evaluation: the graph is captured inside and released at the end."""
        self._tried = False
        try:
            yield self
        finally:
            if self._graph is not None:
                self._previous = self._graph  # not replayed again; released once the next graph is captured
            self._graph = self._static_x = self._static_out = None

    def __call__(self, inputs: torch.Tensor) -> torch.Tensor:
        if self.mode == STEP_GRAPH and self._graph is None and not self._tried:
            self._tried = True
            try:
                return self._capture(inputs)
            except Exception as e:  # eager from here, for the rest of the run
                self.fallback_reason = f"{type(e).__name__}: {one_line(e)}"
                self._graph = self._static_x = self._static_out = self._previous = None
                if self.device.type == "cuda":
                    with contextlib.suppress(Exception):
                        torch.cuda.set_stream(torch.cuda.default_stream(self.device))
                        torch.cuda.synchronize(self.device)
        if self._graph is not None and self._static_x is not None and inputs.shape == self._static_x.shape \
                and inputs.stride() == self._static_x.stride():
            self._static_x.copy_(inputs, non_blocking=True)
            self._graph.replay()
            self.replays += 1
            assert self._static_out is not None
            return self._static_out
        return self._eager(inputs)

    def describe(self) -> dict[str, Any]:
        """For run.json: how evaluation's forward ran and why."""
        return {"step": self.mode, "note": self.note, "fallback_reason": self.fallback_reason,
                "replayed_batches": self.replays}

    def _eager(self, inputs: torch.Tensor) -> torch.Tensor:
        with autocast_context(self.precision, self.device):
            return self.model(inputs)

    def _capture(self, inputs: torch.Tensor) -> torch.Tensor:
        """Warm up and capture on this batch; returns its logits (the eager warm-up's: the reference)."""
        if self.device.type != "cuda":
            raise RuntimeError(f"CUDA graphs need a CUDA device, not {self.device.type}")
        static_x = inputs.clone(memory_format=torch.preserve_format)
        stream = torch.cuda.Stream(device=self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(EVAL_WARMUP_CALLS):
                with autocast_context(self.precision, self.device, cache_enabled=False):
                    reference = self.model(static_x)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        with torch.cuda.graph(graph, pool=self._pool, stream=stream):
            with autocast_context(self.precision, self.device, cache_enabled=False):
                static_out = self.model(static_x)
        self._previous = None  # the new graph holds the pool now
        graph.replay()
        scale = float(reference.detach().abs().max().float().clamp(min=1.0))
        gap = float((static_out.float() - reference.float()).abs().max())  # one host read per evaluation
        if not gap <= EVAL_CHECK_RTOL * scale:
            raise RuntimeError(f"the captured eval forward's logits differ from eager by {gap:.3g} "
                               f"(tolerance {EVAL_CHECK_RTOL * scale:.3g})")
        self._graph, self._static_x, self._static_out = graph, static_x, static_out
        self.replays += 1
        return static_out
