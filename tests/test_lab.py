"""`cifarlab lab`: one real smoke lab (shared by the tests here) checked section by section against
its own results.json, the report rebuilt from files, Ctrl-C handling and bad input."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import time
from pathlib import Path

import pytest

from cifarlab.cli import main
from cifarlab.model.optim import OPTIMIZERS
from cifarlab.report.blocks import pct

SECTIONS = ("C1", "C2", "C3", "C4", "C5", "C6", "C7", "C8")
QUESTIONS = ("Q1", "Q2", "Q3", "Q4")
SMOKE_WALL_S: dict[str, float] = {}  # the smoke lab's wall time measured around main()


@pytest.fixture(scope="module")
def smoke_lab(tmp_path_factory: pytest.TempPathFactory) -> tuple[int, Path, str]:
    out = tmp_path_factory.mktemp("labs")
    t0 = time.perf_counter()
    code = main(["lab", "--preset", "smoke", "--out", str(out), "--data", str(out / "no-data")])
    SMOKE_WALL_S["main"] = time.perf_counter() - t0
    (lab,) = out.glob("*-lab-lab-smoke")
    return code, lab, (lab / "report.md").read_text()


def results(lab: Path) -> dict:
    return json.loads((lab / "results.json").read_text())


def section(md: str, name: str) -> str:
    """The text from the heading that starts with `name` to the next heading of that level or above."""
    m = re.search(rf"^(#+) {name} .*?$(.*?)(?=^#{{1,3}} |\Z)", md, flags=re.M | re.S)
    assert m, f"no section {name} in report.md"
    return m.group(2)


def test_smoke_lab_completes_and_records_machine(smoke_lab: tuple[int, Path, str]) -> None:
    code, lab, _ = smoke_lab
    assert code == 0
    doc = results(lab)
    assert doc["schema"] == "cifarlab.lab/1" and doc["status"] == "completed"
    for k in ("cpu_model", "cpu_count_usable", "cpu_count_host", "gpu_name", "torch", "cuda_version", "python"):
        assert k in doc["machine"], k
    assert doc["data"]["source"] == "synthetic" and "SYNTHETIC" in doc["data"]["banner"]
    assert doc["order"] == ["c1", "e", "c2", "c3", "c4", "c5", "c6", "c7", "c8", "q"]  # E (export) right after C1
    for key, entry in doc["experiments"].items():
        assert entry["status"] in ("completed", "skipped"), (key, entry.get("error"))
        for run in entry["runs"]:  # every run is an ordinary run folder inside the lab folder
            run_json = json.loads((lab / run["path"] / "run.json").read_text())
            assert run_json["status"] == run["status"] == "completed"
            assert (lab / run["path"]).resolve().is_relative_to(lab.resolve())


def test_report_has_every_section_with_its_measured_numbers(smoke_lab: tuple[int, Path, str]) -> None:
    _, lab, md = smoke_lab
    doc = results(lab)
    exps = doc["experiments"]
    assert "SYNTHETIC DATA" in md.split("## C1")[0]
    for name in SECTIONS:
        assert re.search(rf"^## {name} ", md, flags=re.M), name
    for name in QUESTIONS:
        assert re.search(rf"^### {name} ", md, flags=re.M), name

    c1 = exps["c1"]["runs"][0]["summary"]
    assert pct(c1["final_train_acc"]) in section(md, "C1")
    assert "65.7%" in section(md, "C1")  # the reference column
    assert f"| train loss after epoch {c1['epochs_completed']} |" in section(md, "C1")
    assert "| 0.960 (epoch 5) |" in section(md, "C1")  # the reference's epoch, as on the top-1 row

    c2 = section(md, "C2")
    for r in exps["c2"]["runs"][0]["records"]:
        parts = r["data_s"] + r["h2d_s"] + r["compute_s"] + r["other_s"]
        assert math.isclose(parts, r["epoch_s"], rel_tol=1e-9, abs_tol=1e-9)
        assert f"| {r['epoch']} | {r['data_s']:.3f} | {r['h2d_s']:.3f} | {r['compute_s']:.3f} |" in c2
    assert "classic pipeline" in c2

    c3 = exps["c3"]["result"]
    assert [p["workers"] for p in c3["points"]] == [0, 4][: len(c3["points"])]
    assert c3["stop_reason"] and f"Best count: {c3['best_workers']} workers" in section(md, "C3")
    assert "Stop rule" in section(md, "C3")
    if c3["usable_cpus"] < 4 and len(c3["points"]) > 1:
        assert "more workers than usable cores" in section(md, "C3")

    c4 = section(md, "C4")
    assert "With 1 worker the training step waited" in c4
    for run in exps["c4"]["runs"]:
        trace = json.loads((lab / run["profile"]["trace"]).read_text())
        assert trace["traceEvents"], "empty Chrome trace"
        assert run["profile"]["top_ops"] and f"{run['summary']['mean_compute_s']:.3f}" in c4

    c5 = section(md, "C5")
    assert "extrapolated" in c5 and f"{exps['c5']['result']['cpu_subset']}-image subset" in c5

    c6_runs = exps["c6"]["runs"]
    assert [r["label"] for r in c6_runs] == list(OPTIMIZERS)
    for r in c6_runs:
        assert math.isfinite(r["summary"]["mean_epoch_s"])
        assert f"| {r['label']} | {r['summary']['mean_epoch_s']:.3f} |" in section(md, "C6")

    for name in ("C1", "C6", "C7"):  # smoke runs see 32 images: one sentence, no "stuck at chance" flags
        assert "Accuracies here cannot mean anything" in section(md, name) and "stuck at chance (" not in section(md, name)
    assert {r["config"]["norm"] for r in exps["c7"]["runs"]} == {"batch", "none"}
    assert "Epoch time without BatchNorm" in section(md, "C7")

    if exps["c8"]["status"] == "skipped":
        assert "Skipped:" in section(md, "C8")
    else:
        assert "steady" in section(md, "C8")

    facts = exps["q"]["result"]["facts"]
    assert facts["conv_layers"] == 20 and "| Conv2d modules | 20 |" in section(md, "Q1")
    assert "| last Linear in_features | 512 |" in section(md, "Q2")
    assert "11,173,962" in section(md, "Q3") and "22,347,924" in section(md, "Q4")  # Adam keeps 2x state
    one = exps["q"]["result"]["one_image"]  # one image, both variants, beside the element counts
    assert f"| without BatchNorm (C7's model) | 11,164,362 | {one['none']['nonzero']:,} |" in section(md, "Q3")
    assert "8,920,240 of 11,164,362" in section(md, "Q3")


def test_header_says_the_fast_path_synchronizes_at_epoch_boundaries_only(smoke_lab: tuple[int, Path, str]) -> None:
    _, _, md = smoke_lab
    assert "read with the device synchronized (on the fast path only at epoch boundaries" in md
    assert "the device synchronized before each clock read" not in md  # not true of the fast path's runs
    assert "The 'reference (past run" in md  # the lab suite has reference columns


def test_time_table_rows_add_up_to_the_lab_wall_time(smoke_lab: tuple[int, Path, str]) -> None:
    """Issue 11: per item and per piece of lab overhead, the rows add up to the wall time (within 5%), the
    plan before the work is stored beside it, and the report's header shows both."""
    _, lab, md = smoke_lab
    doc = results(lab)
    rows = doc["time_table"]
    assert [r["key"] for r in rows if "key" in r] == doc["order"]
    assert any("setup" in r["part"] for r in rows) and any("report" in r["part"] for r in rows)
    total = sum(r["elapsed_s"] for r in rows)
    assert math.isclose(total, doc["elapsed_s"], rel_tol=0.05), (total, doc["elapsed_s"])
    assert math.isclose(total, SMOKE_WALL_S["main"], rel_tol=0.05), (total, SMOKE_WALL_S["main"])
    plan = {i["key"]: i for i in doc["plan"]["items"]}
    assert list(plan) == doc["order"]
    assert plan["c1"]["estimate_s"] > 0 and plan["c1"]["runs"] == 1 and plan["c6"]["runs"] == 4
    assert all(doc["plan"]["calibration"][p]["step_s"] > 0 for p in ("fast", "classic"))
    header = md.split("## C1")[0]
    assert "| part of the lab | status | runs trained | planned s | elapsed s | share of wall time |" in header
    c6 = next(r for r in rows if r.get("key") == "c6")
    assert f"| {c6['part']} | completed | 4 (+1 reused) | {c6['planned_s']:.1f} | {c6['elapsed_s']:.1f} |" in header
    assert (lab / "csv" / "time_table.csv").is_file()
    if doc["device"].startswith("cpu"):  # no GPU run to reuse: the plan must not promise one
        assert "GPU" not in plan["c5"]["note"].replace("no GPU", "") and "the GPU run is C1's" not in md
        # C8 costs nothing here, and its row says why
        assert plan["c8"]["estimate_s"] == 0.0 and plan["c8"]["note"] == "skipped: the smoke preset does not compile on a CPU"


def test_html_plots_and_csvs_are_written(smoke_lab: tuple[int, Path, str]) -> None:
    _, lab, md = smoke_lab
    plots = sorted(p.name for p in (lab / "plots").glob("*.png"))
    expected = ["c1_curves.png", "c2_breakdown.png", "c3_workers.png", "c4_data_vs_compute.png",
                "c5_cpu_gpu.png", "c6_optimizers.png", "c7_batchnorm.png"]
    assert set(expected) <= set(plots)
    for name in plots:
        assert (lab / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"plots/{name}" in md
    page = (lab / "report.html").read_text()
    assert page.count("data:image/png;base64,") == len(plots)
    assert 'src="plots/' not in page  # self-contained
    header = (lab / "csv" / "c2_breakdown.csv").read_text().splitlines()[0]
    assert header.startswith("epoch,data wait s,h2d copy s,compute s,other s,epoch s")


def test_report_command_rebuilds_the_same_report_from_files(smoke_lab: tuple[int, Path, str],
                                                           capsys: pytest.CaptureFixture) -> None:
    _, lab, md = smoke_lab
    for png in (lab / "plots").glob("*.png"):
        png.unlink()
    (lab / "report.md").unlink()
    assert main(["report", str(lab)]) == 0
    assert (lab / "report.md").read_text() == md
    assert (lab / "plots" / "c3_workers.png").is_file()


def test_ctrl_c_keeps_finished_work_and_marks_the_rest_not_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture) -> None:
    from cifarlab.lab import context as experiments
    from cifarlab.lab import registry
    from cifarlab.train.engine import Hooks

    def interrupted_c7(ctx: experiments.LabContext) -> dict:
        def ctrl_c(epoch: int, step: int, steps_total: int) -> None:
            if epoch == 2:
                raise KeyboardInterrupt
        ctx.train("c7", "batchnorm", ctx.fast(ctx.base), hooks=Hooks(on_step=ctrl_c))
        return {}

    monkeypatch.setitem(registry.EXPERIMENTS, "c7",
                        dataclasses.replace(registry.EXPERIMENTS["c7"], run=interrupted_c7))
    code = main(["lab", "--preset", "smoke", "--only", "c7,c8,q", "--out", str(tmp_path)])
    assert code == 130
    (lab,) = tmp_path.glob("*-lab-*")
    doc = results(lab)
    assert doc["status"] == "interrupted"
    c7 = doc["experiments"]["c7"]
    assert c7["status"] == "interrupted" and c7["runs"][0]["status"] == "interrupted"
    assert [r["epoch"] for r in c7["runs"][0]["records"] if r["status"] == "ok"] == [1]  # epoch 1 kept
    assert doc["experiments"]["c8"]["status"] == doc["experiments"]["q"]["status"] == "not run"
    md = (lab / "report.md").read_text()
    assert "stopped_by" not in c7  # a KeyboardInterrupt raised in the process, no signal
    assert "Interrupted (Ctrl-C)" in section(md, "C7") and "Not run" in section(md, "C8")


@pytest.mark.parametrize("argv, needle", [
    (["lab", "--only", "c1,c9"], "'c9'"),
    (["lab", "--preset", "huge"], "'huge'"),
    (["lab", "--suite", "nope"], "'nope'"),
    (["lab", "--repeats", "0"], "--repeats"),
    (["lab", "--only", ","], "--only"),
    (["lab", "--budget", "0"], "--budget"),
    (["lab", "--budget", "-2"], "--budget"),
    (["lab", "--budget", "nan"], "--budget"),
    (["lab", "--budget", "inf"], "--budget"),
    (["lab", "--budget", "five"], "--budget"),
    (["report", "/definitely/not/a/lab"], "not a lab folder"),
])
def test_bad_lab_input_exits_2_with_one_line(argv: list[str], needle: str, tmp_path: Path,
                                             capsys: pytest.CaptureFixture) -> None:
    code = main(argv + (["--out", str(tmp_path)] if argv[0] == "lab" else []))
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and needle in err
    assert not list(tmp_path.iterdir())  # nothing written


def test_a_c8_mode_that_fails_says_so_on_the_console(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture) -> None:
    """A compile mode that raises is a finding (the report lists it) and the next mode goes on -- and the
    console says so at once: on the H200 a mode left no line at all before the next one's compile."""
    from cifarlab.config import LAB_PRESETS
    from cifarlab.lab.context import LabContext

    smoke = dataclasses.replace(LAB_PRESETS["smoke"], compile_on_cpu=True, compile_modes=("none", "default"))
    monkeypatch.setitem(LAB_PRESETS, "smoke", smoke)
    real_train = LabContext.train

    def train(self, key, label, cfg, **kw):
        if cfg.compile != "none":
            raise RuntimeError("no compiler here\nsecond line")
        return real_train(self, key, label, cfg, **kw)

    monkeypatch.setattr(LabContext, "train", train)
    import torch

    resets: list[int] = []  # each compiled mode starts from torch.compiler.reset(), as in a fresh process
    monkeypatch.setattr(torch.compiler, "reset", lambda: resets.append(1))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))  # the plan says whether it is cold
    assert main(["lab", "--preset", "smoke", "--only", "c8", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert resets == [1]  # before default, not before eager
    assert ("compile-default: FAILED, RuntimeError: no compiler here (traceback: c8/compile-default.traceback.txt; "
            "the report lists it") in out
    assert "C8's compilation, not in the total: with cold caches default ~" in out  # the plan names what it leaves out
    assert f"inductor's on-disk cache {tmp_path / 'inductor'} is cold (empty or absent) now" in out
    (lab,) = tmp_path.glob("*-lab-*")
    res = results(lab)["experiments"]["c8"]["result"]
    assert res["failures"] == {"default": "RuntimeError: no compiler here"}
    # The whole traceback is kept for diagnosis (results.json holds one line): the raising frame and every line.
    assert res["tracebacks"] == {"default": "c8/compile-default.traceback.txt"}
    text = (lab / "c8" / "compile-default.traceback.txt").read_text()
    assert "in train" in text and "no compiler here\nsecond line" in text
    assert "traceback in `c8/compile-default.traceback.txt`" in section((lab / "report.md").read_text(), "C8")


def lab_with_c7_replaced(run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[int, Path, dict, dict]:
    """A smoke lab of C7 and Q whose C7 is `run`: (exit code, lab folder, results.json, C7's entry)."""
    from cifarlab.lab import registry

    monkeypatch.setitem(registry.EXPERIMENTS, "c7", dataclasses.replace(registry.EXPERIMENTS["c7"], run=run))
    code = main(["lab", "--preset", "smoke", "--only", "c7,q", "--out", str(tmp_path)])
    (lab,) = tmp_path.glob("*-lab-*")
    doc = results(lab)
    return code, lab, doc, doc["experiments"]["c7"]


def test_a_failed_experiment_keeps_its_traceback_and_the_lab_goes_on(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_item(ctx) -> dict:
        raise ValueError("bad shape in C7")

    code, lab, doc, c7 = lab_with_c7_replaced(broken_item, tmp_path, monkeypatch)
    assert code == 3
    assert c7["status"] == "failed" and c7["error"] == "ValueError: bad shape in C7"
    assert c7["traceback_file"] == "c7/traceback.txt"
    assert "in broken_item" in (lab / "c7" / "traceback.txt").read_text()
    assert doc["experiments"]["q"]["status"] == "completed"
    assert "Traceback: `c7/traceback.txt`" in section((lab / "report.md").read_text(), "C7")


def test_an_error_caused_by_the_stop_signal_is_an_interruption(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A group SIGTERM during torch.compile kills Inductor's compile workers and the compile raises (torch
    2.14: "SubprocPool closed"): the item is recorded as interrupted by SIGTERM, not as a failed experiment."""
    import os
    import signal

    def broken_by_the_signal(ctx) -> dict:
        os.kill(os.getpid(), signal.SIGTERM)  # the lab's handler records it
        time.sleep(0.05)
        raise RuntimeError("SubprocPool closed")

    code, lab, doc, c7 = lab_with_c7_replaced(broken_by_the_signal, tmp_path, monkeypatch)
    assert code == 143
    assert doc["status"] == "interrupted" and doc["stopped_by"] == "SIGTERM"
    assert c7["status"] == "interrupted" and c7["stopped_by"] == "SIGTERM" and "SubprocPool" in c7["error"]
    assert doc["experiments"]["q"]["status"] == "not run"
    assert "Interrupted (SIGTERM)" in section((lab / "report.md").read_text(), "C7")


@pytest.mark.parametrize("signame, exit_code, wording", [("SIGINT", 130, "Interrupted (Ctrl-C)"),
                                                          ("SIGTERM", 143, "Interrupted (SIGTERM)")])
def test_a_signal_to_a_running_lab_stops_it_cleanly(tmp_path: Path, signame: str, exit_code: int, wording: str) -> None:
    """A real Ctrl-C (SIGINT) or SIGTERM to a `cifarlab lab` process: the run in progress keeps its finished
    epoch, nothing new starts, the report says what did not run and names the signal, exit code 128 + signal."""
    import signal
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "cifarlab", "lab", "--preset", "smoke", "--only", "c7,q",
                             "--out", str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            # a CI job started in the background inherits SIGINT ignored; undo that for the child
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        for line in proc.stdout:  # type: ignore[union-attr]
            if "batchnorm: epoch 1/2" in line:
                proc.send_signal(getattr(signal, signame))
                break
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == exit_code, err
    assert "Traceback" not in err
    (lab,) = tmp_path.glob("*-lab-*")
    doc = results(lab)
    assert doc["status"] == "interrupted"
    run = doc["experiments"]["c7"]["runs"][0]
    assert run["status"] == "interrupted" and [r["epoch"] for r in run["records"] if r["status"] == "ok"] == [1]
    assert len(doc["experiments"]["c7"]["runs"]) == 1  # the no-BN run never started
    assert doc["experiments"]["q"]["status"] == "not run"
    md = (lab / "report.md").read_text()
    assert "Not run" in section(md, "Q1-Q4") and wording in section(md, "C7")
    assert doc["stopped_by"] == signame


def test_c3_sized_by_timed_steps_extrapolates_and_states_its_protocol(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 11: with sweep_timed_steps each C3 run times that many steps after the iterator start (start-up
    apart), is extrapolated per epoch and labelled so; a fresh seeded model per run; the stop rule kept."""
    from cifarlab.config import LAB_PRESETS
    from cifarlab.lab.items.c3_workers import overlaps, timed_run

    rec = {"status": "ok", "steps": 2, "loader_start_s": 0.5, "data_s": 0.7, "epoch_s": 1.5}
    t = timed_run([rec], steps_per_epoch=10)
    assert t["startup_s"] == 0.5 and math.isclose(t["wait_per_step_s"], 0.1)
    assert math.isclose(t["epoch_data_s"], 0.5 + 10 * 0.1) and math.isclose(t["epoch_s"], 0.5 + 10 * 0.5)
    assert overlaps([1.0, 2.0], [1.5, 3.0]) and not overlaps([1.0, 1.1], [2.0, 2.2])

    monkeypatch.setitem(LAB_PRESETS, "smoke", dataclasses.replace(LAB_PRESETS["smoke"], sweep_timed_steps=1))
    assert main(["lab", "--preset", "smoke", "--only", "c3", "--repeats", "2", "--out", str(tmp_path)]) == 0
    (lab,) = tmp_path.glob("*-lab-*")
    doc = results(lab)
    c3 = doc["experiments"]["c3"]
    res = c3["result"]
    assert res["steps_per_epoch"] == 2 and "extrapolated" in res["protocol"]
    for point in res["points"]:
        assert 1 <= len(point["runs"]) <= 2 and len(point["timed"]) == len(point["runs"])
        assert all(t["timed_steps"] == 1 for t in point["timed"])
    runs = {r["label"]: r for r in c3["runs"]}
    assert runs["workers-0-r1"]["config"]["seed"] != runs["workers-0-r2"]["config"]["seed"]
    assert all(r["config"]["max_steps"] == 1 and r["config"]["epochs"] == 1 for r in runs.values())
    md = section((lab / "report.md").read_text(), "C3")
    assert "Protocol: each run" in md and "**extrapolated**" in md and "Stop rule" in md


def test_calibration_twice_counts_the_second_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On CUDA the plan's calibration runs each pipeline twice and estimates from the second run (the first
    pays the process's one-time costs, which on an H200 made the plan charge every run ~10 s of warm-up);
    checked on the CPU by asking for two runs there."""
    from cifarlab.lab import plan as timing

    monkeypatch.setitem(timing.CALIBRATION_RUNS, "cpu", 2)
    seen: list[str] = []
    real_run = timing._calibration_run

    def spy(ctx, cfg):
        out = real_run(ctx, cfg)
        seen.append(cfg.name)
        if out is not None and cfg.name.endswith("-1"):
            out["run_s"] += 100.0  # the first run: as if it paid a one-time cost
        return out

    monkeypatch.setattr(timing, "_calibration_run", spy)
    assert main(["lab", "--preset", "smoke", "--only", "c1,c2", "--out", str(tmp_path / "both")]) == 0
    (lab,) = (tmp_path / "both").glob("*-lab-*")
    cal = results(lab)["plan"]["calibration"]
    assert seen == ["calibrate-classic-1", "calibrate-classic-2", "calibrate-fast-1", "calibrate-fast-2"]
    assert cal["runs_per_pipeline"] == 2
    for pipeline in ("classic", "fast"):
        assert cal[pipeline]["run_s"] < 50 < cal[pipeline]["first_run_extra_s"]  # the second run counts
    assert "from 3 timed steps of the fast and the classic pipeline" in (lab / "report.md").read_text()


def test_calibration_runs_only_the_pipelines_the_items_train_on(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """`--only c1` trains on the fast path alone: the classic pipeline is not calibrated (on CUDA each pipeline's
    calibration costs seconds of a lab meant to take minutes); items that train nothing calibrate nothing."""
    assert main(["lab", "--preset", "smoke", "--only", "c1", "--out", str(tmp_path / "fast")]) == 0
    (lab,) = (tmp_path / "fast").glob("*-lab-*")
    cal = results(lab)["plan"]["calibration"]
    assert "fast" in cal and "classic" not in cal
    assert sorted(p.name.split("-calibrate-")[1] for p in (lab / "plan").iterdir()) == ["fast"]
    assert "steps of the fast pipeline, calibrated in" in capsys.readouterr().out
    assert main(["lab", "--preset", "smoke", "--only", "q", "--out", str(tmp_path / "none")]) == 0
    (lab,) = (tmp_path / "none").glob("*-lab-*")
    assert not (lab / "plan").exists() and "fast" not in results(lab)["plan"]["calibration"]


def test_budget_cuts_in_order_and_says_what_it_cut() -> None:
    """Issue 11: --budget takes the cuts one by one (C3's repeats, its timed steps, C8's max-autotune, ...)
    until the estimate fits, and describes them; all of them when nothing fits."""
    from cifarlab.config import LAB_PRESETS
    from cifarlab.lab.budget import describe_cuts, ladder, search

    full = LAB_PRESETS["full"]
    compile_s = {"default": 100, "reduce-overhead": 100, "max-autotune": 500}

    def estimate(p, r: int) -> float:  # C3 per timed step and repeat, C8 compile + per epoch
        return r * (p.sweep_timed_steps or 0) + sum(compile_s.get(m, 0) for m in p.compile_modes) + 10 * p.compile_epochs

    assert estimate(full, 3) == 1100
    (p, r), fits = search((full, 3), ladder(True, True), lambda p, r: estimate(p, r) <= 2000)
    assert fits and (p, r) == (full, 3) and describe_cuts((full, 3), (p, r)) == []
    (p, r), fits = search((full, 3), ladder(True, True), lambda p, r: estimate(p, r) <= 650)
    assert fits and estimate(p, r) == 400
    assert describe_cuts((full, 3), (p, r)) == ["C3: 2 repeats instead of 3", "C3: 50 timed steps per run instead of 100",
                                                "C8: max-autotune not run"]
    (p, r), fits = search((full, 3), ladder(True, True), lambda p, r: estimate(p, r) <= 1)
    assert not fits and p.compile_modes == ("none",) and r == 1 and p.sweep_timed_steps == 25
    assert describe_cuts((full, 3), (p, r)) == [
        "C3: 1 repeat instead of 3", "C3: 25 timed steps per run instead of 100",
        "C3: at most 2 worker counts instead of until the data wait stops improving", "C8: not run (no compile mode fits)"]
    (p, r), _ = search((full, 3), ladder(False, True), lambda p, r: estimate(p, r) <= 1)  # C3 not in the lab: untouched
    assert r == 3 and p.sweep_timed_steps == 100
    (p, r), fits = search((full, 3), ladder(True, True), lambda p, r: estimate(p, r) <= 230)
    assert fits and describe_cuts((full, 3), (p, r)) == [
        "C3: 1 repeat instead of 3", "C3: 25 timed steps per run instead of 100",
        "C8: reduce-overhead, max-autotune not run", "C8: 6 epochs per mode instead of 10 (steady epochs 4-6)"]


def test_a_tiny_budget_cuts_c3_and_the_report_says_so(tmp_path: Path) -> None:
    assert main(["lab", "--preset", "smoke", "--only", "c3", "--repeats", "3", "--budget", "0.01",
                 "--out", str(tmp_path)]) == 0
    (lab,) = tmp_path.glob("*-lab-*")
    doc = results(lab)
    b = doc["budget"]
    assert b["budget_s"] == 0.6 and not b["fits"] and b["cuts"] == ["C3: 1 repeat instead of 3"]
    assert doc["repeats"] == 1 and doc["lab_config"]["budget_min"] == 0.01
    assert b["estimate_s"] < b["estimate_before_s"]
    assert all(len(p["runs"]) == 1 for p in doc["experiments"]["c3"]["result"]["points"])
    header = (lab / "report.md").read_text().split("## C3")[0]
    assert "Cut: C3: 1 repeat instead of 3." in header and "still does not fit" in header


def test_console_time_table_columns_line_up_down_to_the_sum() -> None:
    import io

    from cifarlab.lab.plan import print_time_table

    rows = [{"part": "C1 Training", "status": "completed", "runs": 1, "planned_s": 10.3, "elapsed_s": 10.8, "share": 0.25},
            {"part": "report writing", "status": "", "runs": None, "planned_s": None, "elapsed_s": 32.4, "share": 0.75}]
    out = io.StringIO()
    print_time_table(rows, 43.2, out)
    lines = out.getvalue().strip().splitlines()[1:]
    assert lines[-1].lstrip().startswith("sum of rows") and lines[-1].endswith("100%")
    assert len({len(line) for line in lines}) == 1, lines  # every row ends at the share column's right edge


def test_on_cuda_c5s_cpu_run_gets_a_calibration_of_its_own(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a CUDA machine C5 trains on the CPU, which no GPU pipeline's calibration says anything about (the H200
    plan printed '?' for it): the plan times a few classic-pipeline steps on the CPU, once, and estimates C5 from
    them. Simulated on this CPU with a CUDA-typed context and the calibration runs replaced."""
    from types import SimpleNamespace

    import torch

    from cifarlab.config import TrainConfig
    from cifarlab.lab import plan as timing
    from cifarlab.lab.context import LabContext, PlannedRuns

    seen: list[tuple] = []

    def fake_run(ctx, cfg) -> dict:
        seen.append((cfg.name, cfg.device, cfg.max_steps, cfg.evaluate, cfg.loader))
        return {"step_s": 0.5, "start_s": 0.1, "eval_s": 0.0, "warmup_s": 0.2, "run_overhead_s": 1.0, "run_s": 3.0}

    monkeypatch.setattr(timing, "_calibration_run", fake_run)
    ctx = SimpleNamespace(device=torch.device("cuda"), base=TrainConfig(), lab_dir=tmp_path, classic=LabContext.classic,
                          fast=lambda cfg: cfg.replace(loader="device"), data=SimpleNamespace(train=range(50_000)))
    cal = timing.calibrate(ctx, ("fast", "cpu-classic"))
    assert seen == [("calibrate-fast-1", "auto", 10, True, "device"), ("calibrate-fast-2", "auto", 10, True, "device"),
                    ("calibrate-cpu-classic", "cpu", 3, False, "torch")]  # once, 3 steps, on the CPU
    assert timing.calibrated_pipeline(ctx, "cpu-classic") == "cpu-classic"
    # C5's CPU run: 1 run x (overhead 1.0 + warm-up 0.2 + 2 epochs x (start 0.1 + 10 steps x 0.5 s)) = 11.4 s
    c5 = PlannedRuns("cpu-classic", 1, 2, evaluate=False, images=1280)
    assert timing._group_estimate_s(ctx, c5, cal) == pytest.approx(11.4)
    assert timing._calibrated(cal) == "10 steps of the fast pipeline and 3 of the classic pipeline on the CPU (C5)"


def test_calibration_times_evaluation_on_a_few_batches_and_scales_it() -> None:
    """On a CPU a calibration run evaluates CALIBRATION_TEST_BATCHES test batches, not the whole split (the full
    preset's 10,000 test images took a minute per calibration run, and a SIGTERM waited for it), and scales the
    evaluation time to the whole split; a test split smaller than that is used whole. On CUDA the whole split
    (a captured evaluation's capture would be scaled up), except for C5's CPU run."""
    from types import SimpleNamespace

    import numpy as np
    import torch

    from cifarlab.config import TrainConfig
    from cifarlab.data.split import DataBundle, Split
    from cifarlab.lab import plan as timing

    def split(n: int) -> Split:
        return Split(np.zeros((n, 32, 32, 3), np.uint8), np.arange(n, dtype=np.int64) % 10)

    bundle = DataBundle(train=split(100), test=split(2000), source="synthetic", description="d")
    ctx = SimpleNamespace(data=bundle, base=TrainConfig(), device=torch.device("cpu"))
    data, scale = timing._calibration_data(ctx, TrainConfig(test_batch_size=100))
    assert len(data.test) == timing.CALIBRATION_TEST_BATCHES["cpu"] * 100 == 500 and scale == 4.0
    assert data.train is bundle.train and "calibration: 500 test images" in data.description
    assert timing._calibration_data(ctx, TrainConfig(test_batch_size=1000)) == (bundle, 1.0)
    on_cuda = SimpleNamespace(data=bundle, base=TrainConfig(), device=torch.device("cuda"))  # only its type is read
    assert timing._calibration_data(on_cuda, TrainConfig(test_batch_size=100)) == (bundle, 1.0)
    cpu_side, scale = timing._calibration_data(on_cuda, TrainConfig(test_batch_size=100, device="cpu"))  # C5's
    assert len(cpu_side.test) == 500 and scale == 4.0


def test_lab_runs_keep_their_warning_hook() -> None:
    """A run's warning (e.g. a CUDA graph that fell back) goes through the lab's progress hook, which names the
    run, not to bare stderr: merging the lab's hooks with an item's must keep on_warning."""
    from cifarlab.lab.context import _merge
    from cifarlab.train.engine import Hooks

    seen: list[str] = []
    merged = _merge(Hooks(on_warning=seen.append), Hooks(should_stop=lambda: False))
    assert merged.on_warning is not None and merged.should_stop is not None
    merged.on_warning("capture fell back")
    assert seen == ["capture fell back"]
