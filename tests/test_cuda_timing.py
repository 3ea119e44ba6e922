"""On CUDA, the synchronized timing mode's compute seconds agree with CUDA events around the same steps (within 5%).

The engine reads a host clock after synchronizing the device around each step; CUDA events recorded on the stream
just before and after the same `runner.step()` calls measure the device's own span. Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch

from cifarlab.config import TrainConfig
from cifarlab.data.device import DeviceLoader
from cifarlab.model.optim import build_optimizer
from cifarlab.model.resnet import resnet18
from cifarlab.step import CapturedStep, StepRunner, TrainState
from cifarlab.train import engine

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("cuda_graph", ["on", "off"])
def test_cuda_synchronized_compute_agrees_with_cuda_events(cuda_graph: str, monkeypatch: pytest.MonkeyPatch) -> None:
    device = torch.device("cuda")
    torch.backends.cudnn.benchmark = True
    spans: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
    for cls in (StepRunner, CapturedStep):
        original = cls.__dict__["step"]

        def timed_step(self, lr=None, _original=original):  # type: ignore[no-untyped-def]
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            _original(self, lr)
            end.record()
            spans.append((start, end))

        monkeypatch.setattr(cls, "step", timed_step)

    g = torch.Generator().manual_seed(0)
    n = 128 * 60
    images = torch.randint(0, 256, (n, 32, 32, 3), dtype=torch.uint8, generator=g)
    loader = DeviceLoader(images, torch.arange(n) % 10, 128, device, augment=True, shuffle=True)
    cfg = TrainConfig(batch_size=128, epochs=3, evaluate=False, sync_timing=True, cuda_graph=cuda_graph)
    torch.manual_seed(0)
    model = resnet18().to(device).to(memory_format=torch.channels_last)
    state = TrainState(model=model, optimizer=build_optimizer("sgd", model.parameters(), 0.1, 0.9, 5e-4),
                              scaler=None, device=device, precision="bf16")
    assert engine.train(cfg, state, loader, None) == "completed"
    torch.cuda.synchronize()
    records = state.records
    assert all(r.timing_mode == "synchronized" for r in records)
    assert {r.step_mode for r in records} == {"cuda-graph" if cuda_graph == "on" else "eager"}
    steps = sum(r.steps for r in records)
    epoch_spans = spans[-steps:]  # set-up's warm-up steps (if any went through step()) came first
    events_s = sum(start.elapsed_time(end) for start, end in epoch_spans) / 1e3
    compute_s = sum(r.compute_s for r in records)
    assert abs(compute_s - events_s) <= 0.05 * events_s, (compute_s, events_s, cuda_graph)
    print(f"cuda-graph {cuda_graph}: compute {compute_s:.4f} s (synchronized host clock) vs CUDA events "
          f"{events_s:.4f} s over {steps} steps ({compute_s / events_s - 1:+.2%})")
