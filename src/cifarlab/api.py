"""The public Python API, for notebooks and scripts: the same runs, files and errors as the CLI, returned as
objects instead of printed. `from cifarlab import TrainConfig, train_model` (the package root loads these
names lazily, so `import cifarlab` stays light). Bad input raises `UsageError` with the CLI's one-line
message; a run's status (completed, diverged, interrupted) is on the returned RunResult."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from cifarlab.config import LabConfig, TrainConfig
from cifarlab.core.errors import DataError, UsageError
from cifarlab.doctor import DoctorResult, run_doctor
from cifarlab.export import export_run
from cifarlab.lab import run_lab as _run_lab_suite
from cifarlab.model import inspect_model
from cifarlab.run import RunResult, load_run, run_training

__all__ = [
    "DataError", "DoctorResult", "LabConfig", "LabRun", "RunResult", "TrainConfig", "UsageError", "diagnose", "export_run",
    "inspect_model", "load_run", "run_lab", "train_model",
]


@dataclass(frozen=True)
class LabRun:
    """A finished `run_lab`: the lab folder (results.json, report.md, report.html, csv/, plots/) and the exit
    code the CLI would return (0 done, 3 an item failed, 130 interrupted)."""

    path: Path
    exit_code: int


def _config(config: TrainConfig | None, overrides: dict[str, Any]) -> TrainConfig:
    base = config if config is not None else TrainConfig()
    return base.replace(**overrides) if overrides else base


def train_model(config: TrainConfig | None = None, **overrides: Any) -> RunResult:
    """Train as `cifarlab train` does and return the run: its folder (`.path`), `.status`, per-epoch
    `.records` (EpochRecord: losses, accuracies, and the timings that add up to `epoch_s`).

    >>> result = train_model(TrainConfig(dataset="synthetic", epochs=1), subset=64, out_dir="runs")  # doctest: +SKIP
    >>> [round(r.train_loss, 3) for r in result.records]  # doctest: +SKIP

    An out-of-memory run raises UsageError with the CLI's message; a diverged run returns status "diverged"."""
    result = run_training(_config(config, overrides))
    if result.status == "oom":
        raise UsageError(result.error or "out of memory")
    return result


def run_lab(config: LabConfig | None = None, out: TextIO | None = None, **overrides: Any) -> LabRun:
    """Run the lab as `cifarlab lab` does (progress lines to `out`, default stdout) and return its folder.

    >>> lab = run_lab(preset="smoke", only=("c1", "q"), out_dir="labs")  # doctest: +SKIP
    >>> (lab.path / "report.md").read_text()  # doctest: +SKIP"""
    base = config if config is not None else LabConfig()
    lab = LabConfig(**{**base.__dict__, **overrides})
    path, code = _run_lab_suite(lab, out)
    return LabRun(path=path, exit_code=code)


def diagnose(config: TrainConfig | None = None, budget_s: float | None = None, out: TextIO | None = None,
             **overrides: Any) -> DoctorResult:
    """`cifarlab doctor`: measure where a step's time goes and which change helps; writes the doctor folder
    under the config's out_dir and returns the result (`.recommendation`, `.ranked`, `.path`).

    >>> result = diagnose(TrainConfig(dataset="synthetic", device="cpu"), budget_s=120)  # doctest: +SKIP
    >>> print(result.recommendation)  # doctest: +SKIP"""
    cfg = _config(config, overrides)
    return run_doctor(cfg, budget_s, cfg.out_dir, out)
