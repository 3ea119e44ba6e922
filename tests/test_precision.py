"""The compute side of the fast path: precision choice, GradScaler, channels_last, compile, optimizer."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tests.conftest import run_cli

from cifarlab.config import TrainConfig
from cifarlab.core import runtime
from cifarlab.data.device import DeviceLoader
from cifarlab.train import engine, precision
from cifarlab.train.engine import build_state, resolve_precision, train_epoch

CPU = torch.device("cpu")
CUDA = torch.device("cuda")  # only the type is looked at: no CUDA call is made for it below


@pytest.mark.parametrize("flags", [set(), {"avx2"}, {"avx512_bf16"}, {"amx_bf16", "avx512_bf16"}])
def test_unmeasured_rule_is_fp32_on_every_cpu(monkeypatch, flags):
    # The rule without measurement: a CPU's flags alone never choose bf16 (precision.choose_precision measures).
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


# ------------------------------------------------------------- --precision auto on a CPU: decided by measurement

def _timer(fp32_s: float, bf16_s: float, calls: list | None = None, sleep_s: float = 0.0):
    """A stand-in for precision.time_precisions: fixed step times (the decision logic without training)."""
    def timer(cfg, device, steps):
        if calls is not None:
            calls.append((cfg.batch_size, steps))
        time.sleep(sleep_s)
        return {"fp32": {"wall_s": [fp32_s * 1.3] + [fp32_s] * (steps - 1), "cpu_s": [2 * fp32_s] * steps},
                "bf16": {"wall_s": [bf16_s] * steps, "cpu_s": [2 * bf16_s] * steps}}
    return timer


def _refuse(cfg, device, steps):
    raise AssertionError("no calibration expected here")


@pytest.fixture
def native_bf16(monkeypatch, tmp_path):
    """A CPU that reports avx512_bf16, calibration on, and a private cache file."""
    monkeypatch.setattr(runtime, "cpu_flags", lambda: {"avx2", "avx512f", "avx512_bf16"})
    monkeypatch.setenv(precision.CALIBRATION_ENV, "on")
    monkeypatch.setenv(precision.CACHE_DIR_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(precision, "_load_now", lambda: 0.5)  # a quiet machine unless a test says otherwise
    monkeypatch.setattr(runtime, "usable_cpus", lambda: 2)
    return tmp_path / "cache" / precision.CACHE_FILE


def test_decision_needs_a_clear_margin():
    assert precision.decide(2.6, 1.0) == ("bf16", 2.6)
    assert precision.decide(1.15, 1.0)[0] == "bf16"  # exactly the margin
    assert precision.decide(1.10, 1.0)[0] == "fp32"  # faster, but within what noise could do
    assert precision.decide(1.0, 3.6)[0] == "fp32"  # bf16 slower (the Xeon measurement of the old docstring)


def test_bf16_runs_where_measured_faster_and_the_verdict_is_cached(native_bf16):
    calls: list = []
    cfg = TrainConfig(device="cpu", batch_size=128)
    choice = precision.choose_precision(cfg, CPU, timer=_timer(2.6, 1.0, calls))
    assert choice.precision == "bf16" and choice.requested == "auto"
    assert choice.reason == "bf16: 2.6x fp32 in a 3-step calibration on this CPU"
    assert calls == [(128, 3)] and choice.calibration["cached"] is False
    assert choice.calibration["fp32_step_s"] == 2.6 and choice.calibration["steps"] == 3  # the fastest step
    saved = json.loads(native_bf16.read_text())
    [entry] = saved["entries"].values()
    assert entry["precision"] == "bf16" and entry["key"]["batch_size"] == 128 and entry["key"]["torch"] == str(torch.__version__)
    # the same machine and config again: the cached verdict, no calibration, no setup seconds
    again = precision.choose_precision(cfg, CPU, timer=_refuse)
    assert again.precision == "bf16" and again.calibration["cached"] is True and again.calibration_s == 0.0
    compiled = precision.choose_precision(cfg.replace(compile="default"), CPU, timer=_refuse)  # the same eager verdict
    assert compiled.precision == "bf16" and compiled.reason.endswith("eager steps timed, --compile default not calibrated")
    assert again.reason.startswith("bf16: 2.6x fp32 in a 3-step calibration on this CPU (cached ")


def test_fp32_when_bf16_is_not_clearly_faster(native_bf16):
    choice = precision.choose_precision(TrainConfig(device="cpu"), CPU, timer=_timer(1.05, 1.0))
    assert choice.precision == "fp32"
    assert choice.reason == "fp32: bf16 was 1.05x fp32 in a 3-step calibration on this CPU (bf16 runs from 1.15x)"


def test_cache_misses_when_machine_software_or_config_change(native_bf16, monkeypatch):
    calls: list = []
    timer = _timer(2.0, 1.0, calls)
    base = TrainConfig(device="cpu", batch_size=64)
    precision.choose_precision(base, CPU, timer=timer)
    precision.choose_precision(base, CPU, timer=timer)
    precision.choose_precision(base.replace(optimizer="adam", lr=0.001), CPU, timer=timer)  # fp32 updates either way
    assert len(calls) == 1
    precision.choose_precision(base.replace(batch_size=32), CPU, timer=timer)  # another config
    precision.choose_precision(base.replace(norm="none"), CPU, timer=timer)
    assert len(calls) == 3
    monkeypatch.setattr(torch, "__version__", "9.9.9")  # another torch
    precision.choose_precision(base, CPU, timer=timer)
    monkeypatch.setattr(runtime, "cpu_model", lambda: "Another CPU")  # another machine
    precision.choose_precision(base, CPU, timer=timer)
    assert len(calls) == 5
    assert len(json.loads(native_bf16.read_text())["entries"]) == 5  # every verdict kept side by side
    monkeypatch.setenv(precision.CALIBRATION_ENV, "refresh")  # the bypass: measure again although cached
    assert precision.choose_precision(base, CPU, timer=_timer(1.0, 1.0, calls)).precision == "fp32"
    assert len(calls) == 6
    monkeypatch.setenv(precision.CALIBRATION_ENV, "on")
    assert precision.choose_precision(base, CPU, timer=_refuse).precision == "fp32"  # the refreshed verdict
    native_bf16.write_text("{not json")  # a damaged cache is a miss, then rewritten whole
    assert precision.choose_precision(base, CPU, timer=timer).precision == "bf16" and len(calls) == 7
    assert len(json.loads(native_bf16.read_text())["entries"]) == 1


def test_no_calibration_where_the_rule_is_fixed(native_bf16, monkeypatch):
    cpu = TrainConfig(device="cpu")
    for requested in ("fp32", "bf16", "fp16"):  # explicit precision always wins
        choice = precision.choose_precision(cpu.replace(precision=requested), CPU, timer=_refuse)
        assert choice.precision == requested and choice.reason == f"{requested}: --precision {requested} asked for"
    classic = precision.choose_precision(cpu.replace(loader="torch"), CPU, timer=_refuse)  # C2-C4, the lab's script
    assert classic.precision == "fp32" and "classic pipeline" in classic.reason
    monkeypatch.setenv(precision.CALIBRATION_ENV, "off")
    assert precision.choose_precision(cpu, CPU, timer=_refuse).precision == "fp32"
    monkeypatch.setenv(precision.CALIBRATION_ENV, "on")
    for name in precision.collectives.TORCHRUN_ENV:  # under torchrun ranks must not decide apart
        monkeypatch.setenv(name, "0")
    ranked = precision.choose_precision(cpu, CPU, timer=_refuse)
    assert ranked.precision == "fp32" and "torchrun" in ranked.reason
    for name in precision.collectives.TORCHRUN_ENV:
        monkeypatch.delenv(name)
    monkeypatch.setattr(runtime, "cpu_flags", lambda: {"avx2"})  # emulated bf16
    plain = precision.choose_precision(cpu, CPU, timer=_refuse)
    assert plain.precision == "fp32" and "no native bf16" in plain.reason
    assert not native_bf16.exists()  # nothing measured, nothing cached


def test_unwritable_cache_is_said_not_fatal(native_bf16, tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv(precision.CACHE_DIR_ENV, str(blocker / "sub"))  # a folder below a plain file
    choice = precision.choose_precision(TrainConfig(device="cpu"), CPU, timer=_timer(2.0, 1.0))
    assert choice.precision == "bf16" and "not cached" in choice.reason and choice.calibration["cache_file"] is None


def test_real_timer_steps_both_precisions_and_leaves_the_rngs_alone(monkeypatch):
    monkeypatch.setattr(precision, "resnet18", lambda norm="batch": TinyNet())
    rng_before = torch.get_rng_state()
    times = precision.time_precisions(TrainConfig(batch_size=4), CPU, 2)
    assert torch.equal(torch.get_rng_state(), rng_before)  # the run's initialisation does not depend on calibrating
    for p in ("fp32", "bf16"):
        assert len(times[p]["wall_s"]) == 2 and all(t > 0 for t in times[p]["wall_s"]) and len(times[p]["cpu_s"]) == 2


def test_train_says_which_precision_ran_and_why(native_bf16, monkeypatch, cifar_root, tmp_path, capsys):
    """`cifarlab train` on real-format files: the calibration runs before the banner, its seconds are setup (in
    run.json, in no epoch), the run trains in the chosen precision; the classic pipeline and an explicit
    --precision never calibrate."""
    monkeypatch.setattr(precision, "time_precisions", _timer(2.6, 1.0, sleep_s=0.3))
    tiny = ["--data", cifar_root, "--subset", "16", "--test-subset", "10", "--batch-size", "8", "--epochs", "1",
            "--device", "cpu", "--out", tmp_path / "runs"]
    code, out, _ = run_cli(["train", *tiny, "--loader", "device", "--name", "auto"], capsys)
    assert code == 0, out
    assert "precision bf16 (auto)" in out
    assert "precision: bf16: 2.6x fp32 in a 3-step calibration on this CPU; 0.3 s of calibration, setup, not in any epoch" in out
    [run] = (tmp_path / "runs").glob("*-auto")
    saved = json.loads((run / "run.json").read_text())
    assert saved["precision"] == "bf16" and saved["precision_choice"]["reason"].startswith("bf16: 2.6x fp32")
    assert saved["precision_choice"]["calibration"]["calibration_s"] >= 0.3
    [record] = json.loads((run / "records.json").read_text())
    assert record["setup_s"] is None or record["setup_s"] < 0.3  # the step runner's setup does not hold it either
    # the same config again: the cached verdict (no calibration line), the same precision
    monkeypatch.setattr(precision, "time_precisions", _refuse)
    code, out, _ = run_cli(["train", *tiny, "--loader", "device", "--name", "again"], capsys)
    assert code == 0 and "timing 3 training steps" not in out and "(cached " in out and "precision bf16 (auto)" in out
    for extra, name, expected in ((["--loader", "torch", "--workers", "0"], "classic", "fp32"),
                                  (["--loader", "device", "--precision", "fp32"], "explicit", "fp32")):
        code, out, _ = run_cli(["train", *tiny, *extra, "--name", name], capsys)
        assert code == 0, out
        [run] = (tmp_path / "runs").glob(f"*-{name}")
        assert json.loads((run / "run.json").read_text())["precision"] == expected


def test_cpu_precision_benchmark_trains_every_contender_on_real_format_files(tmp_path: Path) -> None:
    """benchmarks/cpu_precision.py (the README's fp32/bf16/typical table) runs from the source tree: every contender
    trains from the same weights, one row per (epoch, contender), ratios against typical and fast-fp32."""
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "cpu_precision.json"
    env = {**os.environ, "PYTHONPATH": str(root / "src")}
    proc = subprocess.run([sys.executable, str(root / "benchmarks" / "cpu_precision.py"), "--subset", "10", "--test-subset",
                           "10", "--epochs", "2", "--batch-size", "5", "--json-out", str(out)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    saved = json.loads(out.read_text())
    assert [(r["epoch"], r["contender"], r["precision"]) for r in saved["rows"]] == [
        (e, c, p) for e in (1, 2) for c, p in (("typical", "fp32"), ("fast-fp32", "fp32"), ("fast-bf16", "bf16"))]
    assert "CIFAR-10-format files" in saved["data"] and all(r["images_per_s"] > 0 for r in saved["rows"])
    summary = {s["contender"]: s for s in saved["summary"]}
    assert summary["typical"]["vs_typical"] == 1.0 and summary["fast-fp32"]["vs_fast_fp32"] == 1.0
    assert summary["fast-bf16"]["epochs_in_median"] == 1  # epoch 1 (oneDNN's first calls) left out
    assert "| fast-bf16 |" in proc.stdout


def test_without_measuring_only_a_cached_verdict_counts(native_bf16):
    """The doctor asks this way: what `cifarlab train` would run, never spending its budget on a calibration."""
    cfg = TrainConfig(device="cpu")
    miss = precision.choose_precision(cfg, CPU, timer=_refuse, measure=False)
    assert miss.precision == "fp32" and miss.calibration is None and "not calibrated" in miss.reason
    precision.choose_precision(cfg, CPU, timer=_timer(2.0, 1.0))
    hit = precision.choose_precision(cfg, CPU, timer=_refuse, measure=False)
    assert hit.precision == "bf16" and hit.calibration["cached"] is True


def test_a_verdict_from_a_busy_machine_is_measured_again_when_it_is_quiet(native_bf16, monkeypatch):
    calls: list = []
    cfg = TrainConfig(device="cpu")
    monkeypatch.setattr(precision, "_load_now", lambda: 10.3)  # other processes hold the 2 cores
    busy = precision.choose_precision(cfg, CPU, timer=_timer(1.05, 1.0, calls))
    assert busy.precision == "fp32" and busy.reason.endswith(
        "at load average 10.3 on 2 cores (measured again when the machine is quieter)")
    assert precision.choose_precision(cfg, CPU, timer=_refuse).precision == "fp32"  # still busy: the cached verdict
    monkeypatch.setattr(precision, "_load_now", lambda: 1.0)  # quiet now: measured again, cached without the caveat
    quiet = precision.choose_precision(cfg, CPU, timer=_timer(2.0, 1.0, calls))
    assert quiet.precision == "bf16" and len(calls) == 2 and "load average" not in quiet.reason
    assert precision.choose_precision(cfg, CPU, timer=_refuse, measure=False).precision == "bf16"
