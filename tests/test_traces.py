"""C4's Chrome traces laid out as Holistic Trace Analysis reads them: each alone in its run's traces/ folder as
rank0.pt.trace.json with its rank in distributedInfo, and loaded by HTA's own TraceAnalysis (skipped without
the holistictraceanalysis extra)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cifarlab.config import LabConfig
from cifarlab.lab.driver import run_lab
from cifarlab.run.traces import TRACE_DIR, place_trace


def test_place_trace_moves_the_trace_alone_into_its_folder_with_its_rank(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "run.json").write_text("{}")
    exported = tmp_path / ".tmp.pt.trace.json"
    exported.write_text(json.dumps({"traceEvents": [{"name": "x", "ph": "X", "ts": 0, "dur": 1}]}))
    path = place_trace(exported, run_dir)
    assert path == run_dir / TRACE_DIR / "rank0.pt.trace.json" and not exported.exists()
    assert [p.name for p in path.parent.iterdir()] == ["rank0.pt.trace.json"]
    doc = json.loads(path.read_text())
    assert doc["distributedInfo"] == {"backend": "", "rank": 0, "world_size": 1}
    assert doc["traceEvents"][0]["name"] == "x"
    # a trace torch wrote under a process group keeps its own distributedInfo (and its rank names the file)
    exported.write_text(json.dumps({"traceEvents": [], "distributedInfo": {"backend": "nccl", "rank": 3, "world_size": 4}}))
    assert place_trace(exported, run_dir).name == "rank3.pt.trace.json"


@pytest.fixture(scope="module")
def c4_lab(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("c4")
    lab_dir, code = run_lab(LabConfig(preset="smoke", only=("c4",), out_dir=str(out), device="cpu"))
    assert code == 0
    return lab_dir, json.loads((lab_dir / "results.json").read_text())


def test_c4_traces_are_alone_in_their_folders(c4_lab: tuple[Path, dict]) -> None:
    lab_dir, results = c4_lab
    runs = results["experiments"]["c4"]["runs"]
    assert runs
    for run in runs:
        prof = run["profile"]
        folder = lab_dir / prof["trace_dir"]
        assert folder.name == TRACE_DIR and folder.parent == lab_dir / run["path"]
        assert [p.name for p in folder.iterdir()] == ["rank0.pt.trace.json"]  # nothing else for HTA to choke on
        assert json.loads((lab_dir / prof["trace"]).read_text())["distributedInfo"]["rank"] == 0
    report = (lab_dir / "report.md").read_text()
    assert "as Holistic Trace Analysis reads it" in report and runs[0]["profile"]["trace_dir"] in report


def test_hta_loads_c4s_traces(c4_lab: tuple[Path, dict]) -> None:
    pytest.importorskip("hta", reason="the holistictraceanalysis extra is not installed")
    from hta.trace_analysis import TraceAnalysis

    lab_dir, results = c4_lab
    for run in results["experiments"]["c4"]["runs"]:
        analysis = TraceAnalysis(trace_dir=str(lab_dir / run["profile"]["trace_dir"]))
        assert list(analysis.t.traces) == [0]  # rank 0, read from distributedInfo
        assert len(analysis.t.get_trace(0)) > 0  # its events, parsed
