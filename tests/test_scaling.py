"""The scaling suite: formulas, the set_epoch measurement, and `cifarlab lab --suite scaling --preset smoke`
on real CPU processes (gloo)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from cifarlab.cli import main
from cifarlab.config import LAB_PRESETS, TrainConfig
from cifarlab.lab.scaling import s3_compute_comm, s4_allreduce, s5_large_batch, s6_answers


def test_ring_bus_bandwidth_formula():
    # 2(N-1)/N * S / t: 2 ranks move S bytes each way; 4 ranks 1.5 S
    assert s4_allreduce.ring_bus_gbps(2, 44_695_848, 0.044695848) == pytest.approx(1.0)
    assert s4_allreduce.ring_bus_gbps(4, 44_695_848, 0.044695848) == pytest.approx(1.5)


def test_set_epoch_changes_the_order_and_its_absence_repeats_it():
    demo = s6_answers.set_epoch_demo(n=16, world=2)
    assert demo["without_same"] is True and demo["with_same"] is False
    assert len(demo["with"][0]) == 8  # rank 0's half of the 16 indices


def test_scaling_suite_smoke_on_two_cpu_processes(tmp_path, capsys):
    # s2 runs the one-device ladder itself when s1 is not selected; s3 and s6 reuse s2's runs.
    # (s1 and s5 use the same run machinery; the whole smoke suite takes ~3 min here, too long for CI.)
    code = main(["lab", "--suite", "scaling", "--preset", "smoke", "--only", "s2,s3,s4,s6", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0, out
    (lab,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    doc = json.loads((lab / "results.json").read_text())
    exps = doc["experiments"]
    assert all(exps[k]["status"] == "completed" for k in ("s2", "s3", "s4", "s6")), exps
    s2 = exps["s2"]["result"]
    assert s2["counts"][:2] == [1, 2]
    two = [p for p in s2["points"] if p["nproc"] == 2]
    assert two and all(p["status"] == "completed" and p["speedup"] > 0 for p in two)
    # weak scaling: 2 processes at the same per-device batch process twice the images per epoch
    ones = {p["batch"]: p for p in s2["points"] if p["nproc"] == 1}
    assert all(p["images"] == 2 * ones[p["batch"]]["images"] for p in two)
    rows = exps["s3"]["result"]["rows"]
    assert rows and all(r["comm_busy_s"] > 0 and r["allreduces"] > 0 for r in rows)
    s4 = exps["s4"]["result"]["rows"][0]
    assert s4["world_size"] == 2 and s4["bytes"] == 11_173_962 * 4 and s4["busbw_gbps"] > 0
    replicas = exps["s6"]["result"]["replicas"]
    assert replicas and all(r["params_max_abs_diff"] == 0.0 for r in replicas)
    md = (lab / "report.md").read_text()
    for title in ("S2 Speedup", "weak scaling", "S3 Compute vs communication", "S4 All-reduce bandwidth",
                  "2(N−1)/N", "Why `set_epoch` matters", "gradients alone suffice"):
        assert title in md, title
    # gloo on the CPU has no device to synchronize: S4 says so instead of claiming a device synchronization
    assert "on the CPU (gloo) the call returns when the reduction is done" in md
    assert "the device synchronized before and after" not in md
    assert "column holds a seed report's figures" not in md  # the scaling report has no reference column
    for name in ("s2_speedup", "s3_compute_vs_comm", "s4_allreduce"):
        assert (lab / "plots" / f"{name}.png").is_file() and (lab / "csv" / f"{name}.csv").is_file()


def test_large_batch_runs_train_whole_epochs_not_the_presets_step_cap(monkeypatch):
    # The smoke lab preset caps epochs at 2 steps; s5 must not inherit it, or the baseline (batch 8) and the
    # large batch (32) take the same 2 steps per epoch and the large one sees 4x the images: the report's
    # "N epochs each on M training images" and "k-times fewer optimizer steps" would both be false.
    seen = []
    monkeypatch.setattr(s5_large_batch, "run_train", lambda ctx, key, label, cfg, nproc=None: seen.append(cfg))
    monkeypatch.setattr(s5_large_batch, "s1_points", lambda ctx, key: {"largest_batch": 16})
    monkeypatch.setattr(s5_large_batch, "process_counts", lambda ctx: [1, 2])
    preset = LAB_PRESETS["smoke"]
    ctx = SimpleNamespace(preset=preset, base=TrainConfig().replace(max_steps=preset.max_steps),
                          data=SimpleNamespace(source="synthetic", train=range(32)), fast=lambda cfg: cfg)
    res = s5_large_batch.s5_large_batch(ctx)
    assert len(seen) == 4 and all(c.max_steps is None for c in seen)
    assert res["train_images"] == 128 and all(c.subset == 128 for c in seen)


def test_s3_does_not_call_the_largest_in_flight_time_the_slowest_ranks():
    # comm_busy_s is the max over ranks of the in-flight time (common.point); the rank that waits longest in
    # all-reduces is usually the fastest one, not the slowest rank whose T_N the estimate uses.
    row = {"batch": 4, "nproc": 2, "t1_s": 0.4, "t1_images": 8, "tn_s": 0.8, "tn_images": 16, "compute_est_s": 0.4,
           "comm_est_s": 0.4, "comm_busy_s": 0.36, "comm_busy_min_s": 0.14, "comm_sum_s": 0.37, "allreduces": 6,
           "gap_s": 0.04}
    rc = SimpleNamespace(plot=lambda *a, **k: None)
    text = " ".join(b.text for b in s3_compute_comm.render_s3({"result": {"rows": [row], "skipped": None}}, rc)
                    if hasattr(b, "text"))
    assert "on the slowest rank" not in text and "rank where it is largest" in text
