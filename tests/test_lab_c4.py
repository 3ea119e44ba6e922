"""C4 uses the doctor's classifier on its own runs and checks the doctor's suggestion against the
best-count run it measured (issue 13: the lab's C4 explanation is measured, not prose alone)."""

from __future__ import annotations

import json
from pathlib import Path

from cifarlab.cli import main
from cifarlab.doctor.advice import CLASS_ORDER


def test_c4_classifies_each_run_and_checks_the_suggestion(tmp_path: Path) -> None:
    assert main(["lab", "--preset", "smoke", "--only", "c4", "--out", str(tmp_path)]) == 0
    (lab,) = tmp_path.glob("*-lab-*")
    doc = json.loads((lab / "results.json").read_text())
    entry = doc["experiments"]["c4"]
    diagnoses = entry["result"]["doctor"]
    assert set(diagnoses) == {r["label"] for r in entry["runs"]}  # every profiled run judged
    for d in diagnoses.values():
        assert d["label"] in CLASS_ORDER and d["evidence"]
    md = (lab / "report.md").read_text()
    section = md.split("## C4", 1)[1].split("\n## ", 1)[0]
    assert "The doctor's classifier" in section
    first = entry["runs"][0]["label"]
    assert f"`{first}` (epoch " in section and f"**{diagnoses[first]['label']}**" in section
    assert "took the epoch from" in section  # the suggestion against the measured best-count run
    # smoke: 2 steps per epoch, so the profiler's window (1 warm-up + 2 recorded steps) and its trace export
    # fall in epoch 2, the one the doctor judges: its host time is the profiler's, and the report says so
    for run in entry["runs"]:
        assert run["profile"]["steps_recorded"] + 1 > run["records"][0]["steps"]
        assert f"`{run['label']}` (epoch 2): **{diagnoses[run['label']]['label']}** -- " in section
    assert section.count("this epoch ran profiled steps") == len(entry["runs"])
    if entry["runs"][0]["device"].startswith("cpu"):  # CPU-only profile: no device column of zeros
        assert "| operator | calls | self CPU ms | CPU total ms |\n" in section and "self device ms" not in section


def test_c4_sized_runs_profile_epoch_one_and_extrapolate_the_clean_epoch_two(tmp_path: Path, monkeypatch) -> None:
    """Issue 11: with profile_timed_steps each C4 run is 2 short epochs -- the profiler's window in epoch 1,
    epoch 2 without it -- and the report's per-epoch figures are epoch 2 extrapolated to a whole epoch
    (start-up apart), labelled so; the doctor's comparison uses the same figures."""
    import dataclasses
    import math

    from cifarlab.config import LAB_PRESETS
    from cifarlab.report.blocks import fs

    smoke = dataclasses.replace(LAB_PRESETS["smoke"], max_steps=None, profile_steps=1, profile_timed_steps=2)
    monkeypatch.setitem(LAB_PRESETS, "smoke", smoke)  # 32 images / batch 8 = 4 steps per epoch
    assert main(["lab", "--preset", "smoke", "--only", "c4", "--out", str(tmp_path)]) == 0
    (lab,) = tmp_path.glob("*-lab-*")
    entry = json.loads((lab / "results.json").read_text())["experiments"]["c4"]
    res = entry["result"]
    assert res["steps_per_epoch"] == 4 and "**extrapolated**" in res["protocol"]
    assert set(res["timed"]) == {r["label"] for r in entry["runs"]}
    section = (lab / "report.md").read_text().split("## C4", 1)[1].split("\n## ", 1)[0]
    assert "Protocol: each run" in section and "data s/epoch (extrapolated)" in section
    for run in entry["runs"]:
        assert run["config"]["epochs"] == 2 and run["config"]["max_steps"] == 2
        assert run["profile"]["steps_recorded"] == 1
        (epoch2,) = [r for r in run["records"] if r["epoch"] == 2]
        t = res["timed"][run["label"]]
        assert t["timed_steps"] == 2  # epoch 2 only: the profiled epoch 1 is not in the figures
        start = epoch2["loader_start_s"]
        assert math.isclose(t["epoch_data_s"], start + (epoch2["data_s"] - start) / 2 * 4)
        assert math.isclose(t["epoch_s"], start + (epoch2["epoch_s"] - start) / 2 * 4)
        assert math.isclose(t["epoch_data_s"] + t["epoch_h2d_s"] + t["epoch_compute_s"] + t["epoch_other_s"], t["epoch_s"])
        assert f"| {fs(t['epoch_s'], 3)} |" in section  # the table shows the extrapolated epoch
    assert "this epoch ran profiled steps" not in section  # the doctor judged the clean epoch 2
