"""FLOPs per training image against a hand count, the peak table's name matching on real CUDA device names, the
precision a peak is taken for, and TFLOP/s / MFU arithmetic on injected timings and in a real run's files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from cifarlab.config import TrainConfig
from cifarlab.model import utilization
from cifarlab.model.facts import flop_facts
from cifarlab.model.peaks import CARDS, match_card, published_peak
from cifarlab.model.resnet import resnet18
from cifarlab.model.utilization import MEASURED, PUBLISHED, Peak, Utilization
from cifarlab.run.console import epoch_line
from cifarlab.run.runner import run_training


def hand_count(norm: str) -> tuple[int, int]:
    """(forward, forward + backward) FLOPs per 32x32 image from each Conv2d's and the Linear's shapes alone:
    a convolution is 2 x Cin x Cout x kh x kw per output position; backward computes the weight gradient (same
    count) and the input gradient (same count) for every layer but the first, whose input needs none."""
    model = resnet18(norm=norm)
    sizes: dict[nn.Module, tuple[int, int]] = {}
    hooks = [m.register_forward_hook(lambda m, i, o: sizes.__setitem__(m, tuple(o.shape[-2:])))
             for m in model.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        model.eval()(torch.zeros(1, 3, 32, 32))  # output sizes only; the arithmetic below is by hand
    for h in hooks:
        h.remove()
    forward = backward = 0
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            h, w = sizes[m]
            flops = 2 * m.in_channels * m.out_channels * m.kernel_size[0] * m.kernel_size[1] * h * w // m.groups
            forward += flops
            backward += flops if m is model.conv1 else 2 * flops
        elif isinstance(m, nn.Linear):
            forward += 2 * m.in_features * m.out_features
            backward += 2 * 2 * m.in_features * m.out_features
    return forward, forward + backward


@pytest.mark.parametrize("norm", ["batch", "none"])
def test_counted_flops_are_within_one_percent_of_a_hand_count(norm: str) -> None:
    forward, train = hand_count(norm)
    counted = utilization.train_flops_per_image(norm)  # on the meta device
    assert abs(counted - train) / train < 0.01
    assert 3.3e9 < counted < 3.36e9  # "about 3.33 GFLOP forward + backward"
    facts = flop_facts(resnet18(norm=norm))  # `cifarlab inspect`: the same counter on real tensors
    assert facts["train_flops_per_image"] == counted
    assert abs(facts["forward_flops_per_image"] - forward) / forward < 0.01


REAL_NAMES = {
    "NVIDIA H200": "H200 SXM",
    "NVIDIA H200 NVL": "H200 NVL",
    "NVIDIA H100 80GB HBM3": "H100 SXM",
    "NVIDIA H100 PCIe": "H100 PCIe",
    "NVIDIA H100 NVL": "H100 NVL",
    "Tesla V100-SXM2-16GB": "V100 SXM2",
    "Tesla V100-SXM2-32GB": "V100 SXM2",
    "Tesla V100-PCIE-32GB": "V100 PCIe",
    "Tesla V100S-PCIE-32GB": "V100S PCIe",
    "NVIDIA A100-SXM4-80GB": "A100",
    "NVIDIA A100-SXM4-40GB": "A100",
    "NVIDIA A100-PCIE-40GB": "A100",
    "NVIDIA A100 80GB PCIe": "A100",
    "Tesla T4": "T4",
    "NVIDIA L4": "L4",
    "NVIDIA L40S": "L40S",
    "NVIDIA L40": "L40",
    "NVIDIA A10": "A10",
}


@pytest.mark.parametrize("name,card", sorted(REAL_NAMES.items()))
def test_device_names_match_the_most_specific_card(name: str, card: str) -> None:
    found = match_card(name)
    assert found is not None and found.name == card


@pytest.mark.parametrize("name", ["NVIDIA GeForce RTX 4090", "NVIDIA A10G", "NVIDIA A40", "AMD Instinct MI300X", ""])
def test_cards_not_in_the_table_match_nothing(name: str) -> None:
    assert match_card(name) is None


def test_table_figures_are_dense_and_sourced() -> None:
    assert published_peak("NVIDIA H100 80GB HBM3", "bf16")[1] == pytest.approx(989.5)  # 1,979 with sparsity
    assert published_peak("NVIDIA H200", "tf32")[1] == pytest.approx(494.5)
    assert published_peak("NVIDIA A100-SXM4-80GB", "tf32")[1] == 156.0  # A100's datasheet prints dense and sparse
    assert published_peak("NVIDIA L4", "fp16")[1] == pytest.approx(121.0)
    assert published_peak("Tesla V100-SXM2-16GB", "fp16")[1] == 125.0
    assert published_peak("Tesla V100-SXM2-16GB", "bf16") is None  # no bf16 tensor cores: measured instead
    assert published_peak("Tesla T4", "tf32") is None
    for card in CARDS:
        assert "http" in card.source and "datasheet" in card.source
        assert card.tflops["fp32"] < min(card.tflops.get(p, math.inf) for p in ("tf32", "bf16", "fp16"))


@pytest.fixture
def fake_cuda(monkeypatch: pytest.MonkeyPatch):
    def install(name: str, capability: tuple[int, int]) -> torch.device:
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        return torch.device("cuda")
    return install


def test_fp32_counts_as_tf32_where_cudnn_uses_tensor_cores(fake_cuda, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    peak = utilization.resolve_peak(fake_cuda("NVIDIA H100 80GB HBM3", (9, 0)), "fp32")
    assert (peak.precision, peak.kind, peak.card, peak.tflops) == ("tf32", PUBLISHED, "H100 SXM", pytest.approx(494.5))
    assert peak.label() == "tf32 peak of the H100 SXM"
    bf16 = utilization.resolve_peak(fake_cuda("NVIDIA H200", (9, 0)), "bf16")
    assert (bf16.precision, bf16.tflops) == ("bf16", pytest.approx(989.5))
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    assert utilization.resolve_peak(fake_cuda("NVIDIA A100-SXM4-80GB", (8, 0)), "fp32").tflops == 19.5
    volta = utilization.resolve_peak(fake_cuda("Tesla V100-SXM2-16GB", (7, 0)), "fp32")
    assert (volta.precision, volta.tflops) == ("fp32", 15.7)


def test_an_unknown_card_gets_a_measured_peak(fake_cuda, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(utilization, "measured_matmul_tflops", lambda device, precision: (4096, 123.0))
    peak = utilization.resolve_peak(fake_cuda("NVIDIA GeForce RTX 4090", (8, 9)), "bf16")
    assert (peak.kind, peak.tflops, peak.card) == (MEASURED, 123.0, None)
    assert peak.label() == "bf16 measured peak"


def test_a_cpu_peak_is_a_real_matmul_measurement() -> None:
    peak = utilization.resolve_peak(torch.device("cpu"), "fp32")
    assert peak.kind == MEASURED and peak.precision == "fp32" and "matmul" in peak.source
    assert 1e-4 < peak.tflops < 100  # a CPU: between 0.1 GFLOP/s and 100 TFLOP/s


def test_tflops_and_mfu_arithmetic_on_injected_timings() -> None:
    peak = Peak(989.5, "bf16", PUBLISHED, "NVIDIA H100 80GB HBM3", "H100 SXM", "datasheet", "autocast")
    one = Utilization(3_329_000_000, peak, devices=1)
    tflops, mfu = one.epoch(images=50_000, epoch_s=10.0)
    assert tflops == pytest.approx(3.329e9 * 50_000 / 10.0 / 1e12)  # 16.645 TFLOP/s
    assert mfu == pytest.approx(16.645 / 989.5)
    two = Utilization(3_329_000_000, peak, devices=2)  # same global images/s on twice the hardware: half the MFU
    assert two.epoch(50_000, 10.0)[1] == pytest.approx(mfu / 2)
    assert one.epoch(50_000, 0.0) == (None, None)
    assert utilization.mfu(None, 989.5) is None and utilization.mfu(1.0, None) is None


def test_a_run_records_tflops_and_mfu_that_follow_from_its_own_numbers(tmp_path: Path) -> None:
    cfg = TrainConfig(dataset="synthetic", subset=32, test_subset=16, batch_size=16, test_batch_size=16, max_steps=2,
                      epochs=1, device="cpu", out_dir=str(tmp_path), checkpoint_every=0)
    result = run_training(cfg)
    run = json.loads((result.path / "run.json").read_text())
    (rec,) = json.loads((result.path / "records.json").read_text())
    util = run["utilization"]
    assert util["train_flops_per_image"] == utilization.train_flops_per_image("batch")
    assert util["peak"]["kind"] == MEASURED and util["devices"] == 1
    assert rec["tflops"] == pytest.approx(util["train_flops_per_image"] * rec["images"] / rec["epoch_s"] / 1e12, rel=1e-12)
    assert rec["mfu"] == pytest.approx(rec["tflops"] / util["peak"]["tflops"], rel=1e-12)
    assert run["summary"]["mean_mfu"] == pytest.approx(rec["mfu"])
    assert "MFU" not in epoch_line(result.records[0], 1)  # CPU: not on the console line
    line = epoch_line(result.records[0], 1, show_utilization=True)
    assert f"{rec['tflops']:.2f} TFLOP/s" in line and f"MFU {100 * rec['mfu']:.1f}%" in line
