"""The lab's ETA follows the plan's estimates, corrected by how the finished items compared with theirs:
an item without epochs (E's export) must not inflate it the way a per-epoch average did."""

from __future__ import annotations

import io

import pytest

from cifarlab.lab.driver import LabProgress


def _progress() -> LabProgress:
    return LabProgress(planned={"c1": 2, "e": 0, "c6": 8}, out=io.StringIO(), err=io.StringIO())


def test_eta_is_the_remaining_estimate_scaled_by_the_finished_items() -> None:
    p = _progress()
    p.estimates_s = {"c1": 10.0, "e": 5.0, "c6": 40.0}
    p.planned["e"] = 1
    p.start(1, 3, "c1", "C1")
    p.finish("c1", "completed", 20.0)  # took twice its estimate
    assert p.eta_s() == pytest.approx(2 * (5.0 + 40.0))
    p.start(2, 3, "e", "E")
    p.finish("e", "completed", 5.0)  # as estimated: the scale is now (20 + 5) / (10 + 5)
    assert p.eta_s() == pytest.approx(40.0 * 25.0 / 15.0)


def test_items_the_plan_cannot_estimate_are_said_to_be_unknown() -> None:
    p = _progress()
    p.planned["e"] = 1
    p.estimates_s = {"c1": 10.0, "e": None, "c6": 40.0}
    assert p.eta_s() == pytest.approx(50.0)
    assert p.status().endswith("ETA ~50s + ?")
    p.start(1, 3, "c1", "C1")
    p.finish("c1", "completed", 10.0)
    p.start(2, 3, "e", "E")
    p.finish("e", "completed", 300.0)  # no estimate: it does not distort the scale
    assert p.eta_s() == pytest.approx(40.0) and not p.status().endswith("+ ?")
