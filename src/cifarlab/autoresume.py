"""`--run-dir DIR --resume auto`: one run folder that every attempt of a run continues -- a SLURM job requeued
after preemption or its time limit, torchrun's workers restarted after one died (--max-restarts), the same
command typed again. The folder's checkpoint (written atomically at the end of every finished epoch, so it is
complete or absent) is continued with checkpoint.resume_config's checks; no checkpoint is a fresh start there.
Each start after the first is recorded in run.json's "restarts" (when, by what, from which epoch, what was
lost) and said on the console."""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cifarlab.checkpoint import CHECKPOINT_NAME, resume_config
from cifarlab.config import TrainConfig
from cifarlab.errors import UsageError
from cifarlab.runs import utc_now

AUTO = "auto"


@dataclass
class RunPlan:
    """Where a `--run-dir` run trains and how it starts."""

    config: TrainConfig
    run_dir: Path
    resume: Path | None  # run_dir when its checkpoint is continued; None: a fresh start in run_dir
    finished: bool = False  # every epoch is already trained: nothing to do (a requeued job that had finished)
    history: dict[str, Any] = field(default_factory=dict)  # run.json entries carried over ("restarts")
    message: str = ""  # one line for the console when this start continues an earlier one


def _read_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise UsageError(f"{path} is unreadable or not JSON ({type(e).__name__}); restore it or choose another "
                         f"--run-dir") from None


def _restart_cause() -> str:
    if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) > 0:
        return f"torchrun restart {os.environ['TORCHELASTIC_RESTART_COUNT']} (a worker died)"
    if int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) > 0:
        return f"SLURM requeue {os.environ['SLURM_RESTART_COUNT']} of job {os.environ.get('SLURM_JOB_ID', '?')}"
    return "started again"


def plan_run(args: argparse.Namespace, given: TrainConfig, processes: int, claim: bool = True) -> RunPlan:
    """The plan for `--run-dir DIR [--resume auto]` with the train flags `given` (validated) on `processes`
    processes. A folder holding another config, or trained on another number of processes, is one line."""
    folder = Path(args.run_dir)
    auto = getattr(args, "resume", None) == AUTO
    flag = f"--run-dir {str(folder)!r}"
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"{flag} is a file, not a folder; choose a folder path")
    saved = _read_json(folder / "config.json")
    if saved is not None and not auto:
        raise UsageError(f"{flag} already holds a run; add --resume auto to continue it, or choose another --run-dir")
    fresh = given.replace(out_dir=str(folder.resolve().parent))
    if isinstance(saved, dict):
        now = fresh.to_dict()
        differ = sorted(k for k in set(saved) | set(now) if k not in ("epochs", "out_dir") and saved.get(k) != now.get(k))
        if differ:
            pairs = ", ".join(f"{k} {saved.get(k)!r} there, {now.get(k)!r} here" for k in differ[:3])
            raise UsageError(f"--resume auto: {flag} holds a run of another config ({pairs}); give the flags it was "
                             f"started with, or choose another --run-dir")
    run = _read_json(folder / "run.json")
    run = run if isinstance(run, dict) else {}
    history = {"restarts": list(run.get("restarts", []))}
    if not (folder / CHECKPOINT_NAME).is_file():
        if run:
            history["restarts"].append({"at": utc_now(), "cause": _restart_cause(), "from_epoch": 0,
                                        "lost": _lost(run, 0)})
        message = f"{_restart_cause()}: no checkpoint in {folder} yet; training starts from epoch 1" if run else ""
        return RunPlan(fresh, folder, None, history=history, message=message)
    done = (run.get("summary") or {}).get("epochs_completed", 0)
    if run.get("status") == "completed" and isinstance(done, int) and done >= given.epochs:
        return RunPlan(fresh, folder, None, finished=True,
                       message=f"{folder} has finished all {done} epochs already; nothing to do")
    cfg = resume_config(folder, {"epochs": given.epochs}, claim=claim, processes=processes)
    checkpoint = run.get("checkpoint")  # the epoch of the last checkpoint (runner writes it after each one)
    from_epoch = checkpoint.get("epoch", 0) if isinstance(checkpoint, dict) else 0
    history["restarts"].append({"at": utc_now(), "cause": _restart_cause(), "from_epoch": from_epoch,
                                "lost": _lost(run, from_epoch)})
    return RunPlan(cfg, folder, folder, history=history,
                   message=f"{_restart_cause()}: continuing {folder} from epoch {from_epoch}'s checkpoint "
                           f"({history['restarts'][-1]['lost']})")


def _lost(run: dict[str, Any], from_epoch: int) -> str:
    """What the earlier start did that this one redoes (at most the epoch it was in)."""
    status, done = run.get("status"), (run.get("summary") or {}).get("epochs_completed", 0)
    if isinstance(done, int) and done > from_epoch:
        return f"epochs {from_epoch + 1}-{done} (finished after the last checkpoint) and the partial epoch after them"
    if status == "interrupted":
        return f"epoch {from_epoch + 1}'s partial steps (stopped cleanly by a signal)"
    if status == "running":
        return f"epoch {from_epoch + 1}'s partial steps (the process was killed)"
    return f"nothing finished after epoch {from_epoch} (status {status!r})"
