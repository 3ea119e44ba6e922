"""The compute side of the fast path: precision choice, GradScaler, channels_last, compile, optimizer."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cifarlab.config import TrainConfig
from cifarlab.core import runtime
from cifarlab.data.device import DeviceLoader
from cifarlab.train import engine
from cifarlab.train.engine import build_state, resolve_precision, train_epoch

CPU = torch.device("cpu")
CUDA = torch.device("cuda")  # only the type is looked at: no CUDA call is made for it below


@pytest.mark.parametrize("flags", [set(), {"avx2"}, {"avx512_bf16"}, {"amx_bf16", "avx512_bf16"}])
def test_auto_is_fp32_on_every_cpu(monkeypatch, flags):
    # Measured: even with native bf16 flags, bf16 autocast trains ResNet-18 slower than fp32 on CPU
    # (engine.resolve_precision's docstring); the flags are reported, not acted on.
    monkeypatch.setattr(runtime, "cpu_flags", lambda: flags)
    assert runtime.cpu_has_native_bf16() == bool(flags & {"avx512_bf16", "amx_bf16"})
    assert resolve_precision("auto", CPU) == "fp32"


@pytest.mark.parametrize("supported, expected", [(True, "bf16"), (False, "fp32")])
def test_auto_on_cuda_follows_bf16_support(monkeypatch, supported, expected):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: supported)
    assert resolve_precision("auto", CUDA) == expected


@pytest.mark.parametrize("requested", ["fp32", "bf16", "fp16"])
def test_explicit_precision_is_kept(requested):
    assert resolve_precision(requested, CPU) == requested


def test_defaults_are_the_fast_path():
    cfg = TrainConfig()
    assert (cfg.loader, cfg.channels_last, cfg.precision, cfg.sync_timing) == ("device", True, "auto", True)


def test_build_state_layout_scaler_and_optimizer():
    state = build_state(TrainConfig(precision="fp16", channels_last=True), CPU)
    assert state.precision == "fp16" and isinstance(state.scaler, torch.amp.GradScaler)
    conv = state.model.conv1.weight if hasattr(state.model, "conv1") else next(state.model.parameters())
    assert conv.is_contiguous(memory_format=torch.channels_last)
    assert all(g["foreach"] for g in state.optimizer.param_groups)
    plain = build_state(TrainConfig(precision="auto", channels_last=False), CPU)
    assert plain.precision == "fp32" and plain.scaler is None and plain.train_module is None


def test_compile_mode_is_passed_to_torch_compile(monkeypatch):
    seen = {}

    def fake_compile(model, mode=None, **kw):
        seen["mode"] = mode
        return model

    monkeypatch.setattr(torch, "compile", fake_compile)
    state = build_state(TrainConfig(compile="reduce-overhead"), CPU)
    assert seen == {"mode": "reduce-overhead"} and state.train_module is not None


class TinyNet(torch.nn.Module):
    """A conv + BN + linear stand-in for ResNet-18: the engine's precision paths in milliseconds."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = torch.nn.BatchNorm2d(8)
        self.fc = torch.nn.Linear(8, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).mean(dim=(2, 3)))


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_steps_train_and_zero_grads_to_none(precision, monkeypatch):
    images = torch.randint(0, 256, (8, 32, 32, 3), dtype=torch.uint8)
    loader = DeviceLoader(images, torch.arange(8) % 10, 4, CPU, augment=True, shuffle=True)
    cfg = TrainConfig(precision=precision)
    model = TinyNet().to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, foreach=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8) if precision == "fp16" else None
    state = engine.TrainState(model=model, optimizer=optimizer, scaler=scaler, device=CPU, precision=precision)
    before = [p.detach().clone() for p in model.parameters()]
    zero_calls = []
    original = optimizer.zero_grad
    monkeypatch.setattr(optimizer, "zero_grad", lambda *a, **k: (zero_calls.append((a, k)), original(*a, **k)))
    record = train_epoch(cfg, state, loader, epoch=1)
    assert record.status == "ok" and record.steps == 2 and record.images == 8
    assert zero_calls == [((), {"set_to_none": True})] * 2  # explicitly, not relying on the default
    assert all(not torch.equal(a, b.detach()) for a, b in zip(before, model.parameters()))  # every step applied
    assert all(p.dtype == torch.float32 for p in model.parameters())  # autocast keeps fp32 master weights
    if scaler is not None:
        assert scaler.get_scale() == 2.0**8  # no overflow, no skipped step


def test_cpu_step_benchmark_measures_every_layout_and_precision(tmp_path: Path) -> None:
    """benchmarks/cpu_step.py (the README's CPU layout/precision table) runs from the source tree and writes one
    row per (layout, precision) with its ratio to channels_last fp32."""
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "cpu_step.json"
    env = {**os.environ, "PYTHONPATH": str(root / "src")}
    proc = subprocess.run([sys.executable, str(root / "benchmarks" / "cpu_step.py"), "--batch", "2", "--steps", "1",
                           "--warmup", "0", "--rounds", "1", "--json-out", str(out)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(out.read_text())["rows"]
    assert [(r["layout"], r["precision"]) for r in rows] == [("channels_last", "fp32"), ("channels_last", "bf16"),
                                                            ("contiguous", "fp32"), ("contiguous", "bf16")]
    assert rows[0]["speedup_vs_baseline"] == 1.0 and all(r["s_per_step"] > 0 for r in rows)
    assert "| channels_last | bf16 |" in proc.stdout
