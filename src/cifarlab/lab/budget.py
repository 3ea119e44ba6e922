"""`cifarlab lab --budget MINUTES`: size C3's and C8's repeats and steps to fit the budget.

After the plan's calibration the lab knows what its setup and calibration cost and what each item is
estimated to cost (timing.make_plan). When the estimate (plus an assumed compile time per C8 mode, which the
calibration cannot see) exceeds the budget, cuts are taken in a fixed order until it fits: C3 to 2 repeats,
C3's timed steps halved, C8's max-autotune dropped, C8 to 6 epochs, C3 to 1 repeat, C3's timed steps halved
again, C8's reduce-overhead dropped, C3 at most 2 worker counts, C8 to 4 epochs, C8 not run. The cuts are a
smaller LabPreset (dataclasses.replace) and repeat count; results.json "budget" and the report say what was
cut and what the estimate was before and after."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, TextIO

from cifarlab.config import LabPreset
from cifarlab.core.errors import UsageError
from cifarlab.core.runtime import cache_state, inductor_cache_dir
from cifarlab.lab.context import LabContext
from cifarlab.report.blocks import Block, Para, fs

MIN_TIMED_STEPS = 20  # C3's timed steps are never halved below this
REPORT_ALLOWANCE_S = 10.0  # the report at the end (plots, html): kept free in the budget
# Compile seconds per C8 mode assumed by the budget (the plan's calibration does not compile). Measured on an
# H200, torch 2.11, cold caches: default (inside the captured step) 22 s of setup; reduce-overhead 45 s (issue
# 11); max-autotune had autotuned for 110 s and not finished when the lab was stopped. On a CPU compilation
# takes minutes per mode. With entries already in inductor's cache: a quarter of that.
COMPILE_ASSUMED_S = {"cuda": {"default": 30.0, "reduce-overhead": 60.0, "max-autotune": 300.0},
                     "cpu": {"default": 180.0, "reduce-overhead": 180.0, "max-autotune": 400.0}}
WARM_FACTOR = 0.25

State = tuple[LabPreset, int]  # (preset, C3 repeats)


def check_budget(budget_min: Any) -> float | None:
    """--budget in seconds (None: no budget); a value that is not a positive, finite number is a usage error."""
    if budget_min is None:
        return None
    if isinstance(budget_min, bool) or not isinstance(budget_min, (int, float)) or not math.isfinite(budget_min) \
            or budget_min <= 0:
        raise UsageError(f"--budget must be a positive number of minutes (got {budget_min}), e.g. --budget 5")
    if not math.isfinite(float(budget_min) * 60.0):  # 1e308 minutes: no number of seconds, no duration to print
        raise UsageError(f"--budget {budget_min:g} minutes is too large to be a number of seconds; give a positive "
                         f"number of minutes such as --budget 5, or leave --budget out for no budget")
    return float(budget_min) * 60.0


def _c3_repeats(n: int) -> Callable[[LabPreset, int], State]:
    return lambda p, r: (p, min(r, n))


def _c3_halve_steps(p: LabPreset, r: int) -> State:
    if p.sweep_timed_steps is None or p.sweep_timed_steps <= MIN_TIMED_STEPS:
        return p, r
    return dataclasses.replace(p, sweep_timed_steps=max(MIN_TIMED_STEPS, p.sweep_timed_steps // 2)), r


def _c3_points(n: int) -> Callable[[LabPreset, int], State]:
    return lambda p, r: (dataclasses.replace(p, sweep_max_points=min(p.sweep_max_points or n, n)), r)


def _c8_drop(mode: str) -> Callable[[LabPreset, int], State]:
    return lambda p, r: (dataclasses.replace(p, compile_modes=tuple(m for m in p.compile_modes if m != mode)), r)


def _c8_epochs(n: int) -> Callable[[LabPreset, int], State]:
    return lambda p, r: (dataclasses.replace(p, compile_epochs=min(p.compile_epochs, n)), r)


def ladder(c3: bool, c8: bool) -> list[Callable[[LabPreset, int], State]]:
    """The cuts in the order they are taken (only those of items that run)."""
    steps = [("c3", _c3_repeats(2)), ("c3", _c3_halve_steps), ("c8", _c8_drop("max-autotune")), ("c8", _c8_epochs(6)),
             ("c3", _c3_repeats(1)), ("c3", _c3_halve_steps), ("c8", _c8_drop("reduce-overhead")), ("c3", _c3_points(2)),
             ("c8", _c8_epochs(4)), ("c8", _c8_drop("default"))]
    return [f for item, f in steps if (item == "c3" and c3) or (item == "c8" and c8)]


def search(start: State, steps: list[Callable[[LabPreset, int], State]],
           fits: Callable[[LabPreset, int], bool]) -> tuple[State, bool]:
    """Take the cuts one by one (each on top of the last) until `fits`; the last state when none fits."""
    state = start
    if fits(*state):
        return state, True
    for step in steps:
        new = step(*state)
        if new == state:
            continue
        state = new
        if fits(*state):
            return state, True
    return state, False


def describe_cuts(before: State, after: State) -> list[str]:
    """What a sizing cut, in words ('C3: 2 repeats instead of 3', 'C8: max-autotune not run', ...)."""
    (p0, r0), (p1, r1) = before, after
    cuts = []
    if r1 != r0:
        cuts.append(f"C3: {r1} repeat{'s' if r1 != 1 else ''} instead of {r0}")
    if p1.sweep_timed_steps != p0.sweep_timed_steps:
        cuts.append(f"C3: {p1.sweep_timed_steps} timed steps per run instead of {p0.sweep_timed_steps}")
    if p1.sweep_max_points != p0.sweep_max_points:
        was = p0.sweep_max_points or "until the data wait stops improving"
        cuts.append(f"C3: at most {p1.sweep_max_points} worker counts instead of {was}")
    dropped = [m for m in p0.compile_modes if m not in p1.compile_modes]
    if not any(m != "none" for m in p1.compile_modes):
        cuts.append("C8: not run (no compile mode fits)")
    else:
        if dropped:
            cuts.append(f"C8: {', '.join(dropped)} not run")
        if p1.compile_epochs != p0.compile_epochs:
            n = p1.compile_epochs
            cuts.append(f"C8: {n} epochs per mode instead of {p0.compile_epochs} (steady epochs {n // 2 + 1}-{n})")
    return cuts


def _compile_s(p: LabPreset, assumed: dict[str, float]) -> float:
    return sum(assumed.get(m, 0.0) for m in p.compile_modes if m != "none")


def fit_budget(ctx: LabContext, plan: dict[str, Any], budget_s: float, spent_s: float,
               replan: Callable[[LabContext], dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Size ctx.preset and ctx.repeats to fit budget_s (spent_s already gone: setup and calibration).
    `replan(ctx)` re-estimates the items without calibrating again. Returns (results.json "budget", the plan
    after the cuts); ctx is changed in place."""

    runs = {i["key"]: i["runs"] for i in plan["items"]}
    c3, c8 = bool(runs.get("c3")), bool(runs.get("c8"))
    warm = cache_state(inductor_cache_dir()[0])["entries"] > 0
    assumed = {m: s * (WARM_FACTOR if warm else 1.0) for m, s in COMPILE_ASSUMED_S[
        "cuda" if ctx.device.type == "cuda" else "cpu"].items()}
    available_s = budget_s - spent_s - REPORT_ALLOWANCE_S
    estimates: dict[State, float] = {}

    def estimate(p: LabPreset, r: int) -> float:
        if (p, r) not in estimates:
            estimates[(p, r)] = (replan(dataclasses.replace(ctx, preset=p, repeats=r))["estimate_s"]
                                 + (_compile_s(p, assumed) if c8 else 0.0))
        return estimates[(p, r)]

    start = (ctx.preset, ctx.repeats)
    (preset, repeats), fits = search(start, ladder(c3, c8), lambda p, r: estimate(p, r) <= available_s)
    record = {
        "budget_min": budget_s / 60.0, "budget_s": budget_s, "spent_s": spent_s, "report_allowance_s": REPORT_ALLOWANCE_S,
        "available_s": available_s, "estimate_before_s": estimate(*start), "estimate_s": estimate(preset, repeats),
        "fits": fits, "cuts": describe_cuts(start, (preset, repeats)),
        "compile_assumed_s": {m: s for m, s in assumed.items() if m in ctx.preset.compile_modes} if c8 else {},
        "inductor_cache": "warm" if warm else "cold", "not_estimated": plan.get("unestimated", []),
    }
    ctx.preset, ctx.repeats = preset, repeats
    return record, replan(ctx)


def budget_summary(b: dict[str, Any], fmt: Callable[[float], str]) -> str:
    """One paragraph: the budget, what the plan estimated, what was cut, the estimate after."""
    compile_note = ""
    if b.get("compile_assumed_s"):
        compile_note = (" (C8's compilation assumed: " + ", ".join(f"{m} {fmt(s)}" for m, s in b["compile_assumed_s"].items())
                        + f", inductor's cache {b['inductor_cache']})")
    unest = f"; not estimated: {', '.join(b['not_estimated'])}" if b.get("not_estimated") else ""
    head = (f"Budget {fmt(b['budget_s'])} (--budget {b['budget_min']:g}): setup and calibration took {fmt(b['spent_s'])}, "
            f"{fmt(b['report_allowance_s'])} kept for the report, {fmt(max(0.0, b['available_s']))} left for the items, "
            f"estimated at {fmt(b['estimate_before_s'])} as planned{compile_note}{unest}. ")
    if not b["cuts"] and not b["fits"]:
        return head + (f"It does not fit, and nothing could be cut (--budget cuts only C3's repeats, timed steps and "
                       f"worker counts and C8's modes and epochs, and this lab had none of them left to cut): the "
                       f"lab runs as planned, ~{fmt(b['estimate_s'])} estimated, over the budget.")
    if not b["cuts"]:
        return head + "Nothing was cut."
    tail = (f"fits: ~{fmt(b['estimate_s'])} estimated after the cuts." if b["fits"] else
            f"still does not fit after every cut: ~{fmt(b['estimate_s'])} estimated.")
    return head + "Cut: " + "; ".join(b["cuts"]) + ". It " + tail


def print_budget(b: dict[str, Any], out: TextIO, fmt: Callable[[float], str]) -> None:
    print(f"   {budget_summary(b, fmt)}", file=out, flush=True)


def budget_blocks(doc: dict[str, Any]) -> list[Block]:
    """The report header's budget paragraph (nothing for labs run without --budget)."""
    b = doc.get("budget")
    if not b:
        return []
    return [Para(budget_summary(b, lambda s: f"{fs(s, 0)} s"))]
