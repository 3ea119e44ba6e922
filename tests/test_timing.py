import time

import pytest
import torch

from cifarlab.config import TrainConfig
from cifarlab.core.clock import DeviceClock, SegmentTimer
from cifarlab.step.state import TrainState
from cifarlab.train.engine import train_epoch


class SleepyLoader:
    """Each batch takes `delay_s` to arrive, like a slow data pipeline."""

    def __init__(self, batches: int, delay_s: float, batch_size: int = 8):
        self.batches, self.delay_s, self.batch_size = batches, delay_s, batch_size

    def __len__(self):
        return self.batches

    def __iter__(self):
        for _ in range(self.batches):
            time.sleep(self.delay_s)
            yield torch.randn(self.batch_size, 3, 32, 32), torch.randint(0, 10, (self.batch_size,))


class SlowModel(torch.nn.Module):
    """Known compute cost per forward pass."""

    def __init__(self, delay_s: float):
        super().__init__()
        self.delay_s = delay_s
        self.fc = torch.nn.Linear(3 * 32 * 32, 10)

    def forward(self, x):
        time.sleep(self.delay_s)
        return self.fc(x.flatten(1))


def _state(model):
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    return TrainState(model=model, optimizer=opt, scaler=None, device=torch.device("cpu"), precision="fp32")


def test_data_wait_is_measured_and_parts_add_up_to_the_epoch():
    loader = SleepyLoader(batches=10, delay_s=0.05)
    record = train_epoch(TrainConfig(), _state(SlowModel(0.03)), loader, epoch=1)
    assert record.status == "ok" and record.steps == 10 and record.images == 80
    assert record.data_s == pytest.approx(0.5, rel=0.10)
    assert 0.3 <= record.compute_s < 0.5  # 10 x 30 ms sleeps plus backward and step
    total = record.data_s + record.h2d_s + record.compute_s + record.other_s
    assert total == pytest.approx(record.epoch_s, abs=1e-9)
    assert record.other_s >= 0
    assert record.images_per_s == pytest.approx(80 / record.epoch_s)
    assert record.timing_mode == "synchronized"


def test_max_steps_caps_the_epoch():
    record = train_epoch(TrainConfig(max_steps=3), _state(SlowModel(0.0)), SleepyLoader(10, 0.0), epoch=1)
    assert record.steps == 3 and record.images == 24


def test_non_finite_loss_marks_the_epoch_diverged_at_its_step():
    model = SlowModel(0.0)
    with torch.no_grad():
        model.fc.weight.fill_(float("nan"))
    record = train_epoch(TrainConfig(), _state(model), SleepyLoader(5, 0.0), epoch=1)
    assert record.status == "diverged" and record.diverged_step == 0 and record.steps == 1


def test_segment_timer_splits_back_to_back():
    timer = SegmentTimer(DeviceClock(torch.device("cpu")))
    time.sleep(0.02)
    timer.lap("a")
    time.sleep(0.04)
    timer.lap("b")
    time.sleep(0.01)
    timer.stop()
    parts = timer.breakdown(("a", "b"))
    assert parts["a_s"] == pytest.approx(0.02, abs=0.01)
    assert parts["b_s"] == pytest.approx(0.04, abs=0.01)
    assert parts["other_s"] == pytest.approx(0.01, abs=0.01)
    assert sum(parts.values()) == pytest.approx(timer.wall_s, abs=1e-12)


def test_cpu_clock_never_touches_cuda(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("CUDA API called on a CPU run")

    monkeypatch.setattr(torch.cuda, "synchronize", boom)
    clock = DeviceClock(torch.device("cpu"), sync=True)
    clock.now()
    clock.barrier_now()
