"""TensorBoard event files for training runs (`--tensorboard [DIR]` of `cifarlab train` and `cifarlab lab`).

One TensorBoard run (folder of event files) per training run: `<DIR>/<run folder name>` for `train`, `<DIR>/<item>/
<label>` (e.g. `c6/adam`) for the lab. Each finished epoch adds one point to every scalar in SCALARS, with
the value of the epoch's record (records.json's number, rounded to float32 as TensorBoard stores scalars) at global step =
optimizer steps so far (the sum of the finished epochs' steps: monotonic across resumes, and across a resume
with another number of processes). Only the process that writes the run folder writes events (rank 0 under
torchrun). A resumed run appends to its own folder (run.json "tensorboard") with purge_step = the steps of the
checkpoint + 1, so the epochs trained after the checkpoint by the interrupted process are dropped by
TensorBoard's reader, not shown twice. Events are flushed at every epoch end and when training stops, however
it stops.

TensorBoard is an optional extra (`pip install 'cifarlab[tensorboard]'`); `require()` turns its absence into
one line for the user. torch.utils.tensorboard is imported only when a log is opened: it imports TensorBoard,
which is neither installed everywhere nor cheap to import.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from cifarlab.core.errors import UsageError
from cifarlab.step.state import EpochRecord

INSTALL_HINT = "pip install 'cifarlab[tensorboard]'"
DEFAULT_FOLDER = "tensorboard"  # --tensorboard without DIR: <--out>/tensorboard (train), <lab folder>/tensorboard (lab)

# TensorBoard tag -> EpochRecord field. top1 is a fraction in [0, 1], as in records.json.
SCALARS: tuple[tuple[str, str], ...] = (
    ("train/loss", "train_loss"), ("train/top1", "train_acc"), ("test/loss", "test_loss"), ("test/top1", "test_acc"),
    ("lr", "lr"), ("perf/images_per_s", "images_per_s"), ("perf/tflops", "tflops"), ("perf/mfu", "mfu"),
    ("time/data_s", "data_s"), ("time/h2d_s", "h2d_s"), ("time/compute_s", "compute_s"), ("time/other_s", "other_s"),
    ("time/epoch_s", "epoch_s"), ("time/eval_s", "eval_s"),
)


def available() -> bool:
    return importlib.util.find_spec("tensorboard") is not None


def require(flag: str = "--tensorboard") -> None:
    """One line and exit 2 (UsageError) when TensorBoard is not installed."""
    if not available():
        raise UsageError(f"{flag} needs TensorBoard, which is not installed in this Python; install it with: {INSTALL_HINT}")


@dataclass(frozen=True)
class TensorBoardTarget:
    """Where a run's events go: root/name, name defaulting to the run folder's name."""

    root: Path
    name: str | None = None

    def folder(self, run_dir: Path) -> Path:
        """A folder no other run wrote to: a second run under the same name gets '-2', '-3', ... (TensorBoard would
        draw two runs in one folder as one zig-zag curve)."""
        base = self.root / (self.name or run_dir.name)
        path, k = base, 1
        while path.exists() and any(path.iterdir()):
            k += 1
            path = base.with_name(f"{base.name}-{k}")
        return path


def target_for(flag_value: str | None, default_root: Path, name: str | None = None) -> TensorBoardTarget | None:
    """--tensorboard's value (None: not given; "": given without DIR) -> the target, default_root when no DIR."""
    if flag_value is None:
        return None
    return TensorBoardTarget(Path(flag_value) if flag_value else default_root, name)


def global_steps(records: Iterable[EpochRecord | dict[str, Any]]) -> list[tuple[int, EpochRecord | dict[str, Any]]]:
    """(optimizer steps after the epoch, record) of every finished epoch, in order."""
    out, steps = [], 0
    for r in records:
        row = r.to_dict() if isinstance(r, EpochRecord) else r
        if row.get("status") == "ok":
            steps += int(row["steps"])
            out.append((steps, r))
    return out


class TensorBoardLog:
    """One run's event files (torch.utils.tensorboard.SummaryWriter)."""

    def __init__(self, folder: Path, purge_step: int | None = 0) -> None:
        require()
        from torch.utils.tensorboard import SummaryWriter  # the optional extra: imported only when a log is opened

        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.purge_step = purge_step
        # flush_secs: a day; flush() at every epoch end and close() decide when events reach the disk
        self._writer = SummaryWriter(log_dir=str(folder), purge_step=purge_step, flush_secs=86_400)

    def add_epoch(self, step: int, record: EpochRecord | dict[str, Any]) -> None:
        row = record.to_dict() if isinstance(record, EpochRecord) else record
        for tag, key in SCALARS:
            value = row.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                # the classic float32 scalar: every reader shows it (TensorBoard's default Rust loader shows no float64
                # tensor scalars) and purges it on a restart; records.json keeps the float64
                self._writer.add_scalar(tag, float(value), step)
        self._writer.flush()

    def after_epoch(self, record: EpochRecord, records: list[EpochRecord]) -> None:
        """Add `record` (the last of `records`) if it finished, at the global step after it."""
        for step, r in global_steps(records):
            if r is record:
                self.add_epoch(step, r)

    def add_all(self, records: Iterable[EpochRecord | dict[str, Any]]) -> None:
        for step, r in global_steps(records):
            self.add_epoch(step, r)

    def describe(self) -> dict[str, Any]:
        """run.json's "tensorboard" section (a resume appends to this folder)."""
        return {"dir": str(self.folder), "purge_step": self.purge_step,
                "global_step": "optimizer steps so far (sum of the finished epochs' steps)",
                "scalars": {tag: key for tag, key in SCALARS}}

    def close(self) -> None:
        self._writer.close()  # flushes


def open_for_run(target: TensorBoardTarget | None, run_dir: Path, recorded: dict[str, Any] | None,
                 records: list[EpochRecord]) -> TensorBoardLog | None:
    """The log of a run starting or resuming in run_dir. A resumed run that wrote events before continues in
    its own folder (`recorded`: the previous run.json's section) whatever the target; `records` are the
    checkpoint's epochs, whose steps give the purge step."""
    if recorded and recorded.get("dir"):
        folder = Path(recorded["dir"])
    elif target is not None:
        folder = target.folder(run_dir).resolve()
    else:
        return None
    done = global_steps(records)
    # A fresh run starts its session at step 0 too: TensorBoard's server takes a folder's first session start
    # for the run's beginning and purges only at later ones, so the first resume must not be the first start.
    return TensorBoardLog(folder, purge_step=done[-1][0] + 1 if done else 0)
