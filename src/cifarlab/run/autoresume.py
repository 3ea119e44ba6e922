"""`--run-dir DIR --resume auto`: one run folder that every attempt of a run continues -- a SLURM job requeued
after preemption or its time limit, torchrun's workers restarted after one died (--max-restarts), the same
command typed again. The folder's checkpoint (written atomically at the end of every finished epoch, so it is
complete or absent) is continued with checkpoint.resume_config's checks; no checkpoint is a fresh start there.
Each start after the first is recorded in run.json's "restarts" (when, by what, from which epoch, what was
lost) and said on the console."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from cifarlab.config import TrainConfig
from cifarlab.core.errors import UsageError
from cifarlab.core.fileio import write_json_atomic
from cifarlab.core.folders import utc_now
from cifarlab.run.checkpoint import CHECKPOINT_NAME, load_checkpoint, resume_config

AUTO = "auto"
WORKERS_FOLDER = "workers"  # one small file per rank and torchrun attempt: which worker ended without a word


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


def _attempt() -> int:
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


@contextlib.contextmanager
def worker_mark(run_dir: str | Path | None, rank: int) -> Iterator[None]:
    """Under torchrun with a --run-dir: workers/rank-R.attempt-A.json says this worker started, and, when it
    ends through Python (success, an error, a signal), that it ended. A worker killed outright (SIGKILL, the
    OOM killer) leaves no end: the next attempt names it in run.json's "restarts"."""
    if run_dir is None:
        yield
        return
    path = Path(run_dir) / WORKERS_FOLDER / f"rank-{rank}.attempt-{_attempt()}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    mark = {"rank": rank, "attempt": _attempt(), "host": socket.gethostname(), "pid": os.getpid(), "started": utc_now()}
    write_json_atomic(path, mark)
    how = "ended"
    try:
        yield
    except BaseException as e:
        how = f"{type(e).__name__}: {str(e)[:200]}"
        raise
    finally:
        with contextlib.suppress(OSError):
            write_json_atomic(path, {**mark, "ended": utc_now(), "how": how})


def _silent_workers(folder: Path, attempt: int) -> list[str]:
    """The workers of `attempt` that never said they ended (killed), as 'rank R (pid P on HOST)'."""
    found = []
    for path in sorted((folder / WORKERS_FOLDER).glob(f"rank-*.attempt-{attempt}.json")):
        mark = _read_json(path)
        if isinstance(mark, dict) and "ended" not in mark:
            found.append(f"rank {mark.get('rank')} (pid {mark.get('pid')} on {mark.get('host')})")
    return found


def _restart_cause() -> str:
    if _attempt() > 0:
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
    killed = _silent_workers(folder, _attempt() - 1) if _attempt() > 0 else []
    died = {"workers_killed": killed} if killed else {}
    if not (folder / CHECKPOINT_NAME).is_file():
        if run:
            history["restarts"].append({"at": utc_now(), "cause": _restart_cause(), "from_epoch": 0,
                                        "lost": _lost(run, 0), **died})
        message = f"{_restart_cause()}: no checkpoint in {folder} yet; training starts from epoch 1" if run else ""
        return RunPlan(fresh, folder, None, history=history, message=message)
    done = (run.get("summary") or {}).get("epochs_completed", 0)
    if run.get("status") == "completed" and isinstance(done, int) and done >= given.epochs:
        return RunPlan(fresh, folder, None, finished=True,
                       message=f"{folder} has finished all {done} epochs already; nothing to do")
    cfg = resume_config(folder, {"epochs": given.epochs}, claim=claim, processes=processes)
    # the checkpoint's own epoch: run.json names it only after the epoch's status write, which a kill can precede
    from_epoch = int(load_checkpoint(folder / CHECKPOINT_NAME)["epoch"])
    history["restarts"].append({"at": utc_now(), "cause": _restart_cause(), "from_epoch": from_epoch,
                                "lost": _lost(run, from_epoch), **died})
    who = f"; no clean end from {', '.join(killed)}" if killed else ""
    return RunPlan(cfg, folder, folder, history=history,
                   message=f"{_restart_cause()}: continuing {folder} from epoch {from_epoch}'s checkpoint "
                           f"({history['restarts'][-1]['lost']}){who}")


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
