"""The lab: one file per item holding both its run and its report section (items/: c1_training ... q_facts;
scaling/ for the multi-GPU follow-up), the item registry, the context items run in, the plan and time
budget (plan, budget), the driver that runs a suite into a lab folder, and the report built from that
folder's results.json (render)."""

from cifarlab.lab.driver import run_lab
from cifarlab.lab.render import build_report

__all__ = ["build_report", "run_lab"]
