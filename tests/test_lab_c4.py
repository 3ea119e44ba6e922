"""C4 uses the doctor's classifier on its own runs and checks the doctor's suggestion against the
best-count run it measured (issue 13: the lab's C4 explanation is measured, not prose alone)."""

from __future__ import annotations

import json
from pathlib import Path

from cifarlab.cli import main
from cifarlab.doctor_advice import CLASS_ORDER


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
