"""The report is built from results.json alone: hand-made lab folders exercise the parts a smoke lab
cannot reach (a diverged optimizer, a section contributed by another suite, damaged folders)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from cifarlab.config import LAB_PRESETS, TrainConfig
from cifarlab.core.errors import UsageError
from cifarlab.lab import context as experiments
from cifarlab.lab import registry
from cifarlab.lab.render import build_report
from cifarlab.report import blocks as report
from cifarlab.report.html import to_html
from cifarlab.report.markdown import to_markdown
from cifarlab.report.plots import ReportContext
from cifarlab.run.folder import summarize


def record(epoch: int, loss: float, acc: float, status: str = "ok", step: int | None = None) -> dict:
    return {"epoch": epoch, "status": status, "train_loss": loss, "train_acc": acc, "test_loss": 2.0,
            "test_acc": acc, "images": 64, "steps": 4, "epoch_s": 2.0, "data_s": 0.5, "h2d_s": 0.1,
            "compute_s": 1.3, "other_s": 0.1, "loader_start_s": 0.0, "eval_s": 0.3, "images_per_s": 32.0,
            "timing_mode": "async", "diverged_step": step}


def fake_run(label: str, records: list[dict], status: str = "completed", **config: object) -> dict:
    cfg = TrainConfig(loader="device", sync_timing=False).replace(**config).to_dict()
    # runs.write_json_atomic stores NaN as null: the report must cope with that
    clean = [{k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in r.items()} for r in records]
    return {"label": label, "path": f"x/{label}", "status": status, "config": cfg, "device": "cpu (test)",
            "precision": "fp32", "data": "test", "summary": summarize(clean), "records": clean}


def write_lab(tmp_path: Path, experiments_doc: dict, order: list[str]) -> Path:
    doc = {"schema": "cifarlab.lab/1", "suite": "lab", "preset": LAB_PRESETS["smoke"].to_dict(), "repeats": 1,
           "status": "completed", "started": "t0", "finished": "t1", "elapsed_s": 1.0,
           "machine": {"cpu_model": "test cpu", "usable_cpus": 2}, "device": "cpu (test)",
           "data": {"source": "cifar10", "description": "test data", "banner": "test data", "train_images": 64,
                    "test_images": 64},
           "fast_loader": "device", "timing_notes": {}, "order": order, "experiments": experiments_doc}
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "results.json").write_text(json.dumps(doc))
    return tmp_path


def test_diverged_and_chance_optimizers_are_flagged_not_crashed(tmp_path: Path) -> None:
    runs = [
        fake_run("sgd", [record(1, 1.9, 0.31), record(2, 1.5, 0.45)]),
        fake_run("adam", [record(1, 2.3, 0.10), record(2, float("nan"), float("nan"), "diverged", step=3)],
                 status="diverged", optimizer="adam"),
        fake_run("adagrad", [record(1, 2.3, 0.11), record(2, 2.3, 0.12)], optimizer="adagrad"),
    ]
    lab = write_lab(tmp_path, {"c6": {"title": "C6 Optimizers", "status": "completed", "runs": runs,
                                      "result": {"chance_margin": 0.05}}}, ["c6"])
    build_report(lab)
    md = (lab / "report.md").read_text()
    rows = {line.split("|")[1].strip(): line for line in md.splitlines() if line.startswith("| ") and "epoch 5" in line}
    assert "DIVERGED (NaN/inf loss at epoch 2, step 3)" in rows["adam"]
    assert "stuck at chance" in rows["adagrad"]
    assert "| ok |" in rows["sgd"] and "45.0%" in rows["sgd"]
    assert "Flagged: adam, adagrad" in md
    assert (lab / "plots" / "c6_optimizers.png").is_file()


def test_runs_too_short_to_learn_get_one_sentence_not_a_chance_flag(tmp_path: Path) -> None:
    """Issue 11: a lab whose runs see fewer than SHORT_RUN_IMAGES images says once that its accuracies mean
    nothing (C1, C6, C7) instead of flagging every optimizer; divergence is still flagged."""
    runs = [fake_run("sgd", [record(1, 2.3, 0.11), record(2, 2.3, 0.12)]),
            fake_run("adam", [record(1, 2.3, 0.10), record(2, float("nan"), float("nan"), "diverged", step=3)],
                     status="diverged", optimizer="adam")]
    lab = write_lab(tmp_path, {"c6": {"title": "C6 Optimizers", "status": "completed", "runs": runs,
                                      "result": {"chance_margin": 0.05}}}, ["c6"])
    doc = json.loads((lab / "results.json").read_text())
    doc["run_size"] = {"images_per_run": 512, "steps_per_run": 8}
    (lab / "results.json").write_text(json.dumps(doc))
    build_report(lab)
    md = (lab / "report.md").read_text()
    assert "Accuracies here cannot mean anything" in md and "512 training images (8 optimizer steps)" in md
    assert "stuck at chance (" not in md  # the flag carries the top-1 in brackets; the note only names it
    assert "DIVERGED" in md and "Flagged: adam." in md


def test_other_suites_contribute_sections_and_unknown_ones_fall_back(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    def render_s1(entry: dict, rc: ReportContext) -> list:
        return [report.Para(f"all-reduce bandwidth {entry['result']['gbps']:.1f} GB/s"),
                report.Table(["n", "speed-up"], [[2, 1.9]], csv="s1_speedup")]

    monkeypatch.setitem(registry.EXPERIMENTS, "s1", experiments.Experiment(
        "s1", "S1 scaling", run=lambda ctx: {}, render=render_s1))
    docs = {
        "s1": {"title": "S1 Speed-up", "status": "completed", "runs": [], "result": {"gbps": 12.34}},
        "s9": {"title": "S9 Unknown", "status": "completed", "runs": [fake_run("r", [record(1, 2.0, 0.2)])],
               "result": {}},
        "c2": {"title": "C2 Where an epoch's time goes", "status": "failed", "error": "RuntimeError: boom",
               "runs": []},
    }
    lab = write_lab(tmp_path, docs, ["s1", "s9", "c2"])
    build_report(lab)
    md = (lab / "report.md").read_text()
    assert "## S1 Speed-up\n\nall-reduce bandwidth 12.3 GB/s" in md
    assert (lab / "csv" / "s1_speedup.csv").read_text().splitlines() == ["n,speed-up", "2,1.9"]
    assert "No renderer is installed" in md and "| r | completed | 1 |" in md
    assert "Failed: RuntimeError: boom" in md
    assert "<h2>S1 Speed-up</h2>" in (lab / "report.html").read_text()


def test_markdown_and_html_escape_cell_contents() -> None:
    blocks = [report.Table(["a|b", "c"], [["x|y", "<script>"]]), report.Para("**bold** and `code` <b>")]
    md = to_markdown(blocks)
    assert "| a\\|b | c |" in md and "| x\\|y | <script> |" in md
    page = to_html(blocks, Path("."))
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert "<strong>bold</strong>" in page and "<code>code</code>" in page and "&lt;b&gt;" in page


@pytest.mark.parametrize("content, needle", [
    (None, "no results.json"),
    ("{not json", "cannot be read"),
    (json.dumps({"schema": "cifarlab.lab/99"}), "cifarlab.lab/99"),
])
def test_damaged_lab_folders_are_usage_errors(tmp_path: Path, content: str | None, needle: str) -> None:
    if content is not None:
        (tmp_path / "results.json").write_text(content)
    with pytest.raises(UsageError, match=needle.replace(".", r"\.").replace("/", "/")):
        build_report(tmp_path)


def test_inductor_cache_dir_and_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 11: C8 records where inductor's cache lives and how full it was (files below it)."""
    import tempfile

    from cifarlab.core.runtime import cache_state, inductor_cache_dir
    from cifarlab.lab.items.c8_compile import cache_label

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "ind"))
    assert inductor_cache_dir() == (str(tmp_path / "ind"), "from $TORCHINDUCTOR_CACHE_DIR")
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    path, source = inductor_cache_dir()  # torch's documented default: <tempdir>/torchinductor_<user>
    assert Path(path).parent == Path(tempfile.gettempdir()) and Path(path).name.startswith("torchinductor_")
    assert "default" in source
    # importing torch may set the variable to that very default: still the default, not the user's choice
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", path)
    assert inductor_cache_dir()[0] == path and "default" in inductor_cache_dir()[1]

    assert cache_state(str(tmp_path / "ind")) == {"exists": False, "entries": 0}
    (tmp_path / "ind" / "fxgraph" / "ab").mkdir(parents=True)
    (tmp_path / "ind" / "fxgraph" / "ab" / "entry").write_text("x")
    (tmp_path / "ind" / "triton.so").write_text("x")
    assert cache_state(str(tmp_path / "ind")) == {"exists": True, "entries": 2}
    assert cache_label({"entries_before": 0, "entries_after": 40}) == "cold; +40 written"
    assert cache_label({"entries_before": 1234, "entries_after": 1236}) == "warm (cache had 1,234 entries); +2 written"
    assert cache_label(None) == "-"


def c8_record(epoch: int, epoch_s: float, setup_s: float | None = None, step_mode: str = "cuda-graph") -> dict:
    return {**record(epoch, 1.0, 0.5), "epoch_s": epoch_s, "setup_s": setup_s, "step_mode": step_mode}


def test_c8_reports_one_time_cost_apart_with_spread_and_cache_state(tmp_path: Path) -> None:
    """Issue 11: per mode setup + (epoch 1 - steady mean) as the one-time cost, the steady window's mean and
    min-max over epochs 6-10 of 10, speed-up vs eager, the step mode and the cache state."""
    def run(label: str, mode: str, setup: float, first: float, steady: list[float], step: str) -> dict:
        recs = [c8_record(1, first, setup, step)] + [c8_record(e, 9.0, step_mode=step) for e in range(2, 6)]
        recs += [c8_record(6 + i, s, step_mode=step) for i, s in enumerate(steady)]
        return fake_run(label, recs, compile=mode)

    runs = [run("eager", "none", 2.0, 4.0, [3.0, 3.0, 3.0, 3.0, 3.0], "cuda-graph"),
            run("compile-default", "default", 40.0, 1.6, [1.4, 1.5, 1.5, 1.5, 1.6], "cuda-graph"),
            run("compile-reduce-overhead", "reduce-overhead", 0.5, 50.0, [2.0, 2.0, 2.0, 2.0, 2.0], "eager")]
    result = {"failures": {"max-autotune": "RuntimeError: no triton"}, "epochs": 10, "steady_from": 6,
              "not_run": {"max-autotune": "cut by --budget"},
              "cache_dir": "/tmp/torchinductor_alice", "cache_dir_source": "torch's documented default",
              "fx_graph_cache": True,
              "cache": {"default": {"entries_before": 0, "entries_after": 300, "state": "cold"},
                        "reduce-overhead": {"entries_before": 300, "entries_after": 310, "state": "warm"},
                        "max-autotune": {"entries_before": 310, "entries_after": 310, "state": "warm"}}}
    lab = write_lab(tmp_path, {"c8": {"title": "C8 torch.compile", "status": "completed", "runs": runs,
                                      "result": result}}, ["c8"])
    build_report(lab)
    md = (lab / "report.md").read_text()
    assert ("| mode | step | setup s (before epoch 1) | epoch 1 s | steady s/epoch (mean, epochs 6-10) | "
            "steady spread s (min-max) | one-time cost s (setup + epoch 1 - steady) | steady speed-up vs eager | "
            "compile cache | status |") in md
    assert "| eager | cuda-graph | 2.00 | 4.000 | 3.000 | 3.000-3.000 | 3.00 | 1.00x | - | completed |" in md
    # default: 40 + 1.6 - 1.5 = 40.1 s once; 3.0 / 1.5 = 2.00x
    assert "| compile-default | cuda-graph | 40.00 | 1.600 | 1.500 | 1.400-1.600 | 40.10 | 2.00x | cold; +300 written |" in md
    assert ("| compile-reduce-overhead | eager | 0.50 | 50.000 | 2.000 | 2.000-2.000 | 48.50 | 1.50x | "
            "warm (cache had 300 entries); +10 written |") in md
    assert "failed: RuntimeError: no triton" in md and "/tmp/torchinductor_alice" in md
    assert "| compile-max-autotune |  |  |  |  |  |  |  |  | not run: cut by --budget |" in md
    assert (lab / "csv" / "c8_compile.csv").read_text().startswith("mode,step,setup s")


def test_c8_from_a_lab_without_cache_state_keeps_its_old_table(tmp_path: Path) -> None:
    runs = [fake_run("eager", [record(1, 2.0, 0.2), record(2, 2.0, 0.3)])]
    lab = write_lab(tmp_path, {"c8": {"title": "C8 torch.compile", "status": "completed", "runs": runs,
                                      "result": {"failures": {}, "epochs": 2}}}, ["c8"])
    build_report(lab)
    md = (lab / "report.md").read_text()
    assert "| mode | first epoch s (incl. compilation) | steady s/epoch (epochs 2-2) |" in md
    assert "| eager | 2.000 | 2.000 | 1.00x | completed |" in md and "compile cache" not in md


def test_a_lab_that_recorded_no_end_says_so_in_its_rebuilt_report(tmp_path) -> None:
    """A lab killed without recording its end (on an H200 a SIGTERM during compilation did that) keeps
    results.json with status 'running'; `cifarlab report` rebuilds from it and says it is unfinished."""
    import json
    import shutil
    from pathlib import Path

    from cifarlab.cli import main

    fixture = Path(__file__).parent / "fixtures" / "lab-v1-smoke"
    lab = tmp_path / "lab"
    shutil.copytree(fixture, lab)
    doc = json.loads((lab / "results.json").read_text())
    doc["status"], doc["finished"] = "running", None
    doc["experiments"]["q"]["status"] = "not run"
    (lab / "results.json").write_text(json.dumps(doc))
    assert main(["report", str(lab)]) == 0
    md = (lab / "report.md").read_text()
    assert "**Unfinished lab**" in md and "Completed items: c1," in md and ", q;" not in md
    assert "**Unfinished lab**" not in (fixture / "report.md").read_text()


@pytest.mark.parametrize("nobn_epoch_s, wording", [(1.5, "the cost of the 20 BatchNorm layers"),
                                                   (2.5, "saved no time here")])
def test_c7_calls_the_time_difference_bn_cost_only_when_removing_bn_was_faster(tmp_path: Path, nobn_epoch_s: float,
                                                                               wording: str) -> None:
    """A run without BatchNorm that is slower than the one with it measures noise, not what BN costs."""
    slow = [dict(record(e, 2.0, 0.2), epoch_s=nobn_epoch_s) for e in (1, 2)]
    runs = [fake_run("batchnorm", [record(1, 2.0, 0.2), record(2, 1.9, 0.3)]), fake_run("no-batchnorm", slow, norm="none")]
    lab = write_lab(tmp_path, {"c7": {"title": "C7 Without batch normalization", "status": "completed", "runs": runs,
                                      "result": {}}}, ["c7"])
    build_report(lab)
    line = next(x for x in (lab / "report.md").read_text().splitlines() if x.startswith("Epoch time without BatchNorm"))
    assert wording in line
    assert ("cost of the 20 BatchNorm layers" in line) == (nobn_epoch_s < 2.0)
