"""Run folders: one per training run, never overwritten, every file written atomically.

A run folder holds
- config.json       the resolved TrainConfig (every default spelled out)
- environment.json  machine and software (CPU model, usable cores, threads, GPU, versions)
- records.json/.csv per-epoch records (engine.EpochRecord), rewritten after every epoch
- run.json          schema version, status (running/completed/diverged/interrupted/failed),
                    data source, device, timing notes and a summary
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from cifarlab.config import TrainConfig
from cifarlab.core.errors import UsageError
from cifarlab.core.fileio import read_json, write_csv_atomic, write_json_atomic, write_traceback
from cifarlab.core.folders import utc_now

RUN_SCHEMA = "cifarlab.run/1"
TRACEBACK_FILE = "traceback.txt"  # a failed run's full traceback

TIMING_NOTES = {
    "data_s": "blocked waiting for the next batch (incl. iterator/worker start-up), excl. host->device copy",
    "h2d_s": "host->device copy of inputs and labels, device synchronized",
    "compute_s": "zero_grad + forward + loss + backward + optimizer step, device synchronized",
    "other_s": "epoch_s minus the three parts above (bookkeeping, hooks, progress output)",
    "epoch_s": "wall time of the training epoch; evaluation excluded",
    "eval_s": "test-set evaluation after the epoch, timed separately",
}


# ---------------------------------------------------------------------------------- run folders


@dataclass
class RunWriter:
    """Writes one run folder's files; every write replaces a whole file atomically."""

    path: Path
    config: TrainConfig
    environment: dict[str, Any]
    data_description: str
    device_label: str
    precision: str = "fp32"
    started: str = ""
    # Seconds the run's earlier processes ran (a resumed run): elapsed_s is the time spent running, all
    # processes together, not `updated - started`, which would count the pause before the resume.
    elapsed_before_s: float = 0.0

    def __post_init__(self) -> None:
        self.started = self.started or utc_now()
        self._t0 = time.perf_counter()

    def write_header(self) -> None:
        write_json_atomic(self.path / "config.json", self.config.to_dict())
        write_json_atomic(self.path / "environment.json", self.environment)
        self.write_status("running", [])

    def write_records(self, records: list[Any]) -> None:
        rows = [r.to_dict() if hasattr(r, "to_dict") else dict(r) for r in records]
        write_json_atomic(self.path / "records.json", rows)
        write_csv_atomic(self.path / "records.csv", rows)

    def write_traceback(self, e: BaseException) -> str:
        """traceback.txt in the run folder (run.json's error holds one line); returns its name."""
        write_traceback(self.path / TRACEBACK_FILE, e)
        return TRACEBACK_FILE

    def write_status(self, status: str, records: list[Any], error: str | None = None, **extra: Any) -> None:
        rows = [r.to_dict() if hasattr(r, "to_dict") else dict(r) for r in records]
        doc = {
            "schema": RUN_SCHEMA,
            "status": status,
            "name": self.config.name,
            "started": self.started,
            "updated": utc_now(),
            "elapsed_s": self.elapsed_before_s + time.perf_counter() - self._t0,
            "data": self.data_description,
            "device": self.device_label,
            "precision": self.precision,
            "timing_notes": TIMING_NOTES,
            "summary": summarize(rows),
            "error": error,
            **extra,
        }
        write_json_atomic(self.path / "run.json", doc)


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Final-epoch metrics and mean timings over finished epochs (the first epoch, which pays
    one-off costs such as worker start-up, cudnn autotuning or compilation, is also given alone)."""
    done = [r for r in rows if r.get("status") == "ok"]
    if not done:
        return {"epochs_completed": 0}
    last = done[-1]

    def mean(key: str, rs: list[dict[str, Any]]) -> float | None:
        vals = [r[key] for r in rs if r.get(key) is not None]
        return sum(vals) / len(vals) if vals else None

    # Each process's first epoch carries its setup_s (a resumed run has several): each pays that process's
    # one-time costs again (worker start-up, allocator warm-up), so none of them counts as steady.
    steady = [r for r in done[1:] if r.get("setup_s") is None] or done
    setups = [r["setup_s"] for r in done if r.get("setup_s") is not None]
    return {
        "epochs_completed": len(done),
        "final_train_loss": last["train_loss"],
        "final_train_acc": last["train_acc"],
        "final_test_loss": last.get("test_loss"),
        "final_test_acc": last.get("test_acc"),
        "setup_s": sum(setups) if setups else None,  # one-time setup (autotuning, capture) of every process, in no epoch
        "step_mode": last.get("step_mode"),
        "first_epoch_s": done[0]["epoch_s"],
        "mean_epoch_s": mean("epoch_s", done),
        "mean_epoch_s_after_first": mean("epoch_s", steady),
        "mean_data_s": mean("data_s", done),
        "mean_h2d_s": mean("h2d_s", done),
        "mean_compute_s": mean("compute_s", done),
        "mean_other_s": mean("other_s", done),
        "mean_eval_s": mean("eval_s", done),
        "mean_images_per_s": mean("images_per_s", done),
        "mean_tflops": mean("tflops", done),  # achieved, whole epochs (run.json "utilization")
        "mean_mfu": mean("mfu", done),
    }


def load_run(path: str | Path) -> dict[str, Any]:
    """Everything a report needs from a run folder (files only, no live objects)."""
    path = Path(path)
    if not (path / "run.json").is_file():
        raise UsageError(f"{str(path)!r} is not a cifarlab run folder (no run.json)")
    run = read_json(path / "run.json")
    run["config"] = read_json(path / "config.json") if (path / "config.json").is_file() else {}
    run["environment"] = read_json(path / "environment.json") if (path / "environment.json").is_file() else {}
    run["records"] = read_json(path / "records.json") if (path / "records.json").is_file() else []
    run["path"] = str(path)
    return run


ProgressFn = Callable[[str], None]
