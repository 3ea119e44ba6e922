"""cifarlab doctor: the classifier on constructed and on really measured cases, the candidates that
cannot run on a CPU are listed with a reason, the budget planner, and that every ranked figure comes
from its own rerun (fresh measurement objects with their own steps and timings)."""

from __future__ import annotations

import io
import json
import statistics
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import cifarlab.doctor.measure as doctor
import cifarlab.doctor.timing as doctor_timing
import cifarlab.train.engine as engine
from cifarlab.config import TrainConfig
from cifarlab.core.runtime import resolve_device
from cifarlab.data import DataBundle, load_data
from cifarlab.doctor.advice import Candidate, Diagnosis, HostFacts, Measurement, choose_repeats, classify, from_epoch_record, plan_round, propose
from cifarlab.doctor.outputs import noise_share, recommendation, summarize, verdict
from cifarlab.step.state import EpochRecord


def _m(**kw) -> Measurement:
    base = dict(label="t", steps=10, images=80, epoch_s=1.0, data_s=0.05, h2d_s=0.01, compute_s=0.9, other_s=0.04)
    base.update(kw)
    return Measurement(**base)


def test_classifier_on_constructed_measurements() -> None:
    assert classify(_m(data_s=0.5, compute_s=0.45)).label == "data-bound"
    assert classify(_m(h2d_s=0.3, compute_s=0.6)).label == "copy-bound"
    assert classify(_m(other_s=0.4, compute_s=0.55)).label == "launch/host-bound"
    # CUDA: compute looks dominant, but the GPU's kernels are busy only 30% of it -> launch-bound
    assert classify(_m(device_type="cuda", gpu_busy_s=0.27)).label == "launch/host-bound"
    assert classify(_m(device_type="cuda", gpu_busy_s=0.85)).label == "compute-bound"
    assert classify(_m(peak_memory_bytes=95, memory_total_bytes=100)).label == "memory-limited"
    assert classify(_m()).label == "compute-bound"
    # many tiny steps: 0.5 ms per step where one trivial op costs 5 us (a step = 100 dispatches); the
    # data wait is 40% of it, but in a step that cheap every part is host overhead
    tiny = dict(steps=1000, images=8000, epoch_s=0.5, data_s=0.2, h2d_s=0.0, compute_s=0.26, other_s=0.04)
    assert classify(_m(**tiny, dispatch_us=5.0)).label == "launch/host-bound"
    assert classify(_m(**tiny, dispatch_us=0.1)).label == "data-bound"
    # a captured CUDA step: 3.7 ms costs only ~700 dispatches of 5.3 us, but its kernels keep the GPU 96%
    # busy -- the GPU sets the pace (measured on an H200, where the dispatch rule alone said host-bound)
    captured = dict(steps=100, images=12800, epoch_s=0.366, data_s=0.05, h2d_s=0.01, compute_s=0.305, other_s=0.001)
    assert classify(_m(**captured, device_type="cuda", dispatch_us=5.3, gpu_busy_s=0.29)).label == "compute-bound"
    assert classify(_m(**captured, device_type="cuda", dispatch_us=5.3)).label == "launch/host-bound"  # busy unknown
    assert classify(_m(dispatch_us=5.0)).label == "compute-bound"  # 100 ms per step: 20,000 dispatches
    # a slow loader outranks everything else
    assert classify(_m(data_s=0.3, other_s=0.3, compute_s=0.39)).label == "data-bound"


def test_a_real_runs_epoch_record_can_be_classified() -> None:
    rec = EpochRecord(epoch=1, status="ok", train_loss=1.0, train_acc=0.5, test_loss=None, test_acc=None, images=512,
                      steps=4, epoch_s=2.0, data_s=1.2, h2d_s=0.0, compute_s=0.7, other_s=0.1, loader_start_s=0.3,
                      eval_s=None, images_per_s=256.0, timing_mode="synchronized")
    m = from_epoch_record("c4-w1", rec, TrainConfig(loader="torch", workers=1), "cpu", 2, 2)
    assert m.workers == 1 and m.step_ms == 500.0 and classify(m).label == "data-bound"


def test_contention_finding_names_the_workers() -> None:
    d = classify(_m(process_cpu_s=0.8, torch_threads=2, usable_cpus=2, loader="torch", workers=4, workers_cpu_s=0.6))
    assert d.label == "compute-bound" and "contention" in d.tags
    text = " ".join(d.findings)
    assert "42%" in text and "0.60 cores" in text  # 0.8 s of CPU / (0.95 s not waiting on workers x 2 threads)
    assert "4 loader workers + 2 training threads on 2" in text


def test_cpu_lists_cuda_only_changes_as_not_applicable_with_reasons() -> None:
    cfg = TrainConfig(loader="torch", workers=4, channels_last=False)
    host = HostFacts(device_type="cpu", usable_cpus=2, precision="fp32", cpu_bf16=False)
    cands = {c.key: c for c in propose(cfg, host, classify(_m(loader="torch", workers=4, torch_threads=2, usable_cpus=2)),
                                       {"cpu": 200.0, "cuda": 60.0, "cuda_graph": 5.0})}
    for key in ("cuda-graph", "pin-memory", "no-sync-timing", "bf16", "fp16"):
        assert cands[key].status == "not applicable here" and cands[key].reason, key
    assert "CUDA" in cands["cuda-graph"].reason
    # workers down to 2, 1, 0 (bounded by the 2 usable cores), the device loader, channels_last, a larger batch
    for key in ("workers-2", "workers-1", "workers-0", "loader-device", "channels-last", "batch-256", "compile"):
        assert cands[key].status == "proposed", key
    assert cands["batch-256"].changes == {"batch_size": 256, "lr": 0.2}
    first = list(cands)[:4]  # contention is the finding: fewer workers / device loader come first
    assert set(first) <= {"workers-2", "workers-1", "workers-0", "loader-device"}


def test_verdict_needs_two_repeats_and_separated_ranges() -> None:
    def runs(*ips: float):
        return summarize([_m(images=ip, epoch_s=1.0) for ip in ips])

    base = runs(100, 104, 102)
    noise, _ = noise_share(base)
    assert noise == pytest.approx(0.04 / 1.02, rel=1e-3)
    assert verdict(runs(130, 128), base, noise) == "helps"
    assert verdict(runs(130), base, noise).startswith("unconfirmed")  # one repeat proves nothing
    assert verdict(runs(150, 101), base, noise) == "within noise"  # median up, but the ranges overlap
    assert verdict(runs(80, 82), base, noise) == "slower"
    assert noise_share(runs(100))[0] == 0.10  # a single baseline run: noise assumed, and said so


def test_budget_planner_cuts_repeats_before_candidates() -> None:
    assert plan_round([10, 10, 10], 10, 100, 3) == [0, 1]  # 3 baseline repeats + 3 x 10 per candidate
    assert plan_round([50, 5], 5, 30, 1) == [1]  # an expensive one is skipped, a cheaper later one still runs
    assert choose_repeats([10, 10, 10], 10, 1000, 3) == 3
    assert choose_repeats([10, 10, 10], 10, 90, 3) == 2
    assert choose_repeats([10, 10, 10], 10, 25, 3) == 1


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3 * 32 * 32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.reshape(x.shape[0], -1))


class _SleepyLoader:
    def __init__(self, loader, sleep_s: float) -> None:
        self.loader, self.sleep_s = loader, sleep_s

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            time.sleep(self.sleep_s)
            yield batch


@pytest.fixture
def tiny(monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> tuple[TrainConfig, DataBundle, torch.device]:
    monkeypatch.setattr(engine, "resnet18", lambda norm="batch": _Tiny())  # build_state's model
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two threads on a tiny model measure OpenMP hand-offs on a shared machine
    request.addfinalizer(lambda: torch.set_num_threads(threads))
    cfg = TrainConfig(dataset="synthetic", subset=128, test_subset=16, batch_size=8, device="cpu", loader="device")
    return cfg, load_data(cfg), resolve_device("cpu")


def test_real_sleeping_loader_is_data_bound_and_tiny_steps_are_host_bound(tiny, monkeypatch) -> None:
    cfg, data, device = tiny
    fast = doctor.measure(cfg, data, device, steps=8, label="tiny")  # 16 steps per epoch, all of them timed
    assert fast.steps == 16 and fast.images == 128 and [w["steps"] for w in fast.windows] == [8, 8]
    assert classify(fast).label == "launch/host-bound", (fast.step_ms, classify(fast).evidence)
    real_build = doctor.build_loaders
    monkeypatch.setattr(doctor, "build_loaders",
                        lambda c, d, dev: (_SleepyLoader(real_build(c, d, dev)[0], 0.02), None))
    slow = doctor.measure(cfg, data, device, steps=5, label="sleepy")  # 5 + 5 steps stand for 16
    assert [w["weight"] for w in slow.windows] == [1.0, 11 / 5] and slow.data_s >= 16 * 0.02 * 0.9
    diag = classify(slow)
    assert diag.label == "data-bound" and "data wait" in diag.evidence[0]


def test_every_ranked_figure_comes_from_its_own_rerun(tiny, monkeypatch, tmp_path: Path) -> None:
    cfg, data, device = tiny
    cfg = cfg.replace(loader="torch", workers=1, out_dir=str(tmp_path))
    calls: list[tuple[str, TrainConfig]] = []
    real_measure = doctor.measure

    def spy(c, d, dev, steps, label, **kw):
        calls.append((label, c))
        return real_measure(c, d, dev, steps, label, **kw)

    monkeypatch.setattr(doctor, "measure", spy)
    console = io.StringIO()
    result = doctor.run_doctor(cfg, 120, tmp_path, console, steps=4, only=["workers", "loader-device", "batch"],
                               repeats=2)
    # the data line names the test split (part of the data description) and says the doctor never evaluates it
    assert console.getvalue().splitlines()[0].endswith("(training steps only: the test split is never evaluated)")

    measured = [c for c in result.candidates if c.status == "measured"]
    assert {c.key for c in measured} == {"workers-0", "loader-device", "batch-16"}
    all_ms = result.baseline + [m for c in measured for m in c.measurements]
    assert len(calls) == len(all_ms) == len({id(m) for m in all_ms})  # one measure() call per figure, no reuse
    for c in measured:
        assert len(c.measurements) == 2
        for m in c.measurements:  # each its own timed windows: 4 start steps + 4 steady ones
            assert m.label.startswith(c.key) and m.images == 128 and m.epoch_s > 0
            assert [w["steps"] for w in m.windows] == [4, 4] and all(w["window_s"] > 0 for w in m.windows)
            assert m.steps == (8 if c.key == "batch-16" else 16)
        summary = summarize(c.measurements)
        assert summary.images_per_s_median == statistics.median(m.images_per_s for m in c.measurements)
    by_label = dict(calls)
    assert by_label["workers-0 r1"].workers == 0 and by_label["loader-device r2"].loader == "device"
    assert by_label["batch-16 r1"].batch_size == 16 and by_label["baseline r2"] == cfg
    assert all(m.workers_cpu_s is not None and m.workers_cpu_s >= 0 for m in result.baseline)  # the 1 worker's CPU
    assert result.recommendation.startswith("recommendation: ")
    saved = json.loads((result.path / "doctor.json").read_text())
    assert saved["schema"] == "cifarlab.doctor/1" and saved["environment"]["cpu_count_usable"] >= 1
    assert len(saved["baseline"]["measurements"]) == 3 and saved["method"]["steps"] == 4  # before, and after each round
    ranked = [c for c in saved["candidates"] if c["status"] == "measured"]
    assert all(len(c["measurements"]) == 2 and c["summary"]["repeats"] == 2 for c in ranked)
    assert any(c["status"] == "not applicable here" and c["reason"] for c in saved["candidates"])
    assert (result.path / "doctor.md").read_text().startswith("# cifarlab doctor")
    assert (result.path / "doctor_step_split.png").read_bytes()[:4] == b"\x89PNG"


def test_recommendation_says_no_change_was_measured_when_the_budget_cut_them_all() -> None:
    def result(cands):
        return doctor.DoctorResult(
            config=TrainConfig(), device="cpu", environment={}, data_description="", budget_s=60.0, steps=2,
            warmup_steps=1, repeats=0, baseline=[_m(images=18, epoch_s=1.0)], diagnosis=Diagnosis("compute-bound", [], []),
            candidates=cands, noise=0.10, noise_note="", ranked=[], best=None, recommendation="")

    cut = Candidate("bf16", ["--precision", "bf16"], {"precision": "bf16"}, "bf16", ("compute",), status="cut")
    na = Candidate("cuda-graph", ["--cuda-graph", "on"], {}, "graph", ("host",), status="not applicable here")
    # on a 60 s budget the CPU baseline took 36 s and every candidate was cut: none was compared with the noise
    text = recommendation(result([cut, na]))
    assert "no change found that helps by more than the noise" not in text
    assert text == ("recommendation: no change was measured (cut by the budget: --precision bf16); keep the current "
                    "flags (18.0 img/s) -- rerun with a larger --budget to try them")
    assert recommendation(result([na])) == ("recommendation: no change was measured (none applies here); keep the "
                                            "current flags (18.0 img/s)")


# ----------------------------------------------------------------------------------------- the budget is kept

class _SlowFor:
    """The real device loader, `sleep_s` before every batch when the config matches `slow(cfg)`."""

    def __init__(self, slow, sleep_s: float) -> None:
        self.slow, self.sleep_s, self.real = slow, sleep_s, doctor.build_loaders

    def __call__(self, cfg, data, device):
        train, test = self.real(cfg, data, device)
        return (_SleepyLoader(train, self.sleep_s) if self.slow(cfg) else train), test


def test_budget_is_kept_a_slow_candidate_stops_over_budget_and_doctor_json_follows(tiny, monkeypatch, tmp_path: Path) -> None:
    cfg, data, device = tiny
    cfg = cfg.replace(out_dir=str(tmp_path))
    monkeypatch.setattr(doctor.shutil, "which", lambda name: f"/usr/bin/{name}")  # a C++ compiler: compile can run
    monkeypatch.setattr(doctor, "build_loaders", _SlowFor(lambda c: c.batch_size == 16, 2.0))  # batch-16: 2 s a batch
    seen: list[tuple[str, int]] = []  # (measurement, measurements in doctor.json when it started)
    real_measure = doctor.measure

    def spy(c, d, dev, steps, label, **kw):
        files = list(tmp_path.glob("*-doctor/doctor.json"))
        saved = json.loads(files[0].read_text()) if files else None
        count = 0 if saved is None else len(saved["baseline"]["measurements"]) + sum(
            len(x["measurements"]) + (x["partial"] is not None) for x in saved["candidates"])
        seen.append((label, count))
        return real_measure(c, d, dev, steps, label, **kw)

    monkeypatch.setattr(doctor, "measure", spy)
    budget_s = 14.0
    t0 = time.perf_counter()
    result = doctor.run_doctor(cfg, budget_s, tmp_path, io.StringIO(), steps=4, only=["batch", "compile"], repeats=2)
    took_s = time.perf_counter() - t0
    assert took_s <= budget_s + 1.0, took_s  # the doctor ends within its budget (1 s for a loaded machine)
    by_key = {c.key: c for c in result.candidates}
    slow = by_key["batch-16"]
    # batch-16 needs 9 steps x 2 s: stopped at its limit (from what was left), not run to the end
    assert slow.status == "over budget" and slow.reason.startswith("over budget: stopped at its ")
    assert slow.partial is not None and slow.partial["elapsed_s"] < budget_s and not slow.measurements
    compile_cand = by_key["compile"]  # estimated (minutes to compile on a CPU) and never started
    assert compile_cand.status == "cut" and "estimated for torch.compile to compile the step on this CPU" in compile_cand.reason
    assert all(label != "compile r1" for label, _ in seen)
    # doctor.json was rewritten after every measurement: each one started with all earlier ones on disk
    assert seen[0] == ("baseline r1", 0) and [n for _, n in seen[1:]] == list(range(1, len(seen)))
    saved = json.loads((result.path / "doctor.json").read_text())
    assert saved["status"] == "complete" and saved["budget"]["elapsed_s"] <= budget_s
    [over] = [c for c in saved["candidates"] if c["status"] == "over budget"]
    assert over["key"] == "batch-16" and over["partial"]["phase"]


def test_a_step_that_never_returns_is_interrupted_at_its_limit(tiny, monkeypatch) -> None:
    """A step longer than the whole limit (a compilation, a stuck loader) is interrupted HARD_GRACE_S after it."""
    cfg, data, device = tiny
    monkeypatch.setattr(doctor, "build_loaders", _SlowFor(lambda c: True, 60.0))
    t0 = time.perf_counter()
    with pytest.raises(doctor.OverBudget) as stopped:
        doctor.measure(cfg, data, device, steps=2, label="stuck", limit_s=0.5)
    assert time.perf_counter() - t0 < 0.5 + doctor_timing.HARD_GRACE_S + 2.0
    assert stopped.value.partial["phase"] == "untimed warm-up step(s)" and stopped.value.partial["timed_steps"] == 0
    assert "no step timed before the stop" in stopped.value.describe()


def test_baseline_over_budget_is_one_line_and_leaves_no_folder(tiny, monkeypatch, tmp_path: Path) -> None:
    cfg, data, device = tiny
    monkeypatch.setattr(doctor, "BASELINE_MIN_LIMIT_S", 2.0)  # the floor a tiny budget gets (60 s) made short
    monkeypatch.setattr(doctor, "build_loaders", _SlowFor(lambda c: True, 1.0))
    with pytest.raises(doctor.UsageError, match=r"--budget 7 s: the baseline measurement alone did not fit; over budget"):
        doctor.run_doctor(cfg.replace(out_dir=str(tmp_path)), 7, tmp_path, None, steps=4)
    assert not list(tmp_path.glob("*-doctor"))
