"""The lab's composition (`--only`), its plan and `--budget`, checked as a user would read them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cifarlab.cli import main
from cifarlab.config import LAB_PRESETS
from cifarlab.lab.context import LabContext
from cifarlab.lab.registry import EXPERIMENTS


def _ctx(keys: tuple[str, ...], device: str = "cpu") -> LabContext:
    return LabContext(base=None, preset=LAB_PRESETS["smoke"], data=None, device=torch.device(device),  # type: ignore[arg-type]
                      lab_dir=Path("."), fast_loader="device", repeats=1, progress_hooks=None, keys=keys)  # type: ignore[arg-type]


def _plan(key: str, ctx: LabContext) -> list[tuple[str, int, str]]:
    return [(g.pipeline, g.runs, g.note) for g in EXPERIMENTS[key].plan(ctx)]  # type: ignore[misc]


def test_the_plan_counts_a_run_as_reused_only_when_an_earlier_item_of_this_lab_trains_it() -> None:
    """`--only c6` trains all five optimizers and `--only c7` both models: the plan said 4 and 1 runs, 'SGD is
    C1's run, reused', with no C1 in the lab. With E, C6 or C5's GPU run first, the plan names that run."""
    assert _plan("c6", _ctx(("c6",))) == [("fast", 5, "")]
    assert _plan("c7", _ctx(("c7",))) == [("fast", 2, "")]
    assert _plan("c6", _ctx(("c1", "c6", "c7"))) == [("fast", 4, "SGD is C1's run, reused")]
    assert _plan("c7", _ctx(("c1", "c6", "c7"))) == [("fast", 1, "the BatchNorm run is C1's run, reused")]
    assert _plan("c6", _ctx(("e", "c6"))) == [("fast", 4, "SGD is E's run of C1's configuration, reused")]
    assert _plan("c7", _ctx(("c6", "c7"))) == [("fast", 1, "the BatchNorm run is C6's SGD run, reused")]
    assert _plan("c7", _ctx(("c5", "c7"))) == [("fast", 2, "")]  # on a CPU C5 trains no fast-path run
    # On CUDA C5's GPU run is C1's configuration: planned when nothing before it trains it, reused otherwise.
    assert [(p, n) for p, n, _ in _plan("c5", _ctx(("c5",), "cuda"))] == [("cpu-classic", 1), ("fast", 1)]
    assert _plan("c5", _ctx(("c1", "c5"), "cuda"))[0][2] == "the GPU run is C1's run, reused"
    assert _plan("c7", _ctx(("c5", "c7"), "cuda")) == [
        ("fast", 1, "the BatchNorm run is C5's GPU run, reused; one more in fp32 if the no-BatchNorm run diverges in bf16")]
    assert _plan("c5", _ctx(("c5",))) == [("cpu-classic", 1, "no GPU: the CPU run only")]


def test_a_budget_nothing_can_be_cut_for_says_it_does_not_fit(tmp_path: Path) -> None:
    """`--budget 0.1` on a lab with nothing to cut (C3 already at 1 repeat and 2 worker counts, C8 skipped on a
    CPU) said 'Nothing was cut.' -- as if the lab fitted -- and then ran four times over the budget."""
    from cifarlab.lab.budget import budget_summary

    b = {"budget_min": 0.1, "budget_s": 6.0, "spent_s": 2.0, "report_allowance_s": 10.0, "available_s": -6.0,
         "estimate_before_s": 13.0, "estimate_s": 13.0, "fits": False, "cuts": [], "not_estimated": ["e", "q"]}
    text = budget_summary(b, lambda s: f"{s:.0f}s")
    assert "Nothing was cut" not in text
    assert "does not fit, and nothing could be cut" in text and "~13s estimated, over the budget" in text
    assert budget_summary({**b, "available_s": 20.0, "fits": True}, lambda s: f"{s:.0f}s").endswith("Nothing was cut.")


def test_a_budget_too_large_for_seconds_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """`--budget 1e308` passed the check (finite minutes) and crashed with an OverflowError traceback when the
    plan printed its infinite seconds, after creating the lab folder."""
    assert main(["lab", "--preset", "smoke", "--only", "q", "--budget", "1e308", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--budget 1e+308" in err and "--budget 5" in err
    assert "Traceback" not in err and not list(tmp_path.iterdir())


def test_the_time_table_says_its_wall_time_leaves_out_python_start() -> None:
    """The report said the wall time ran 'from the start of `cifarlab lab`', but its clock starts once Python and
    torch are loaded: `time cifarlab lab --preset smoke` measured 28.8 s for a report's 24.8 s."""
    from cifarlab.lab.plan import time_table_blocks

    rows = [{"part": "C1", "status": "completed", "runs": 1, "planned_s": 1.0, "elapsed_s": 2.0, "share": 1.0}]
    text = time_table_blocks({"time_table": rows, "elapsed_s": 2.0, "plan": {}})[0].text  # type: ignore[attr-defined]
    assert "from the start of `cifarlab lab`" not in text
    assert "once Python and torch are loaded" in text and "`time cifarlab lab` also counts" in text
