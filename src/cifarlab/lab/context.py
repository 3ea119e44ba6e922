"""What a lab item may use while it runs: the base config, the data loaded once per lab, the device, and
`LabContext.train`, the only way an item trains (an ordinary run folder inside the lab folder, a config
already run in this lab reused). Also the item record (`Experiment`) every item file exports as ITEM."""

from __future__ import annotations

import os
import statistics
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from cifarlab.config import LabPreset, TrainConfig
from cifarlab.core.fileio import read_json, write_traceback
from cifarlab.data import DataBundle
from cifarlab.report.plots import ReportContext
from cifarlab.run.folder import summarize
from cifarlab.run.runner import run_training
from cifarlab.run.tensorboard_log import TensorBoardLog, TensorBoardTarget
from cifarlab.train.engine import Hooks

FULL_EPOCH_IMAGES = 50_000  # one CIFAR-10 training epoch (C5 extrapolates to it)
# The items that train C1's configuration (fast path, base config), as the plan names that run: the first of
# them in a lab trains it, the later ones reuse it (C5 only on CUDA, where its GPU run is that configuration).
FAST_BASE_RUNS = {"c1": "C1's run", "e": "E's run of C1's configuration", "c5": "C5's GPU run",
                  "c6": "C6's SGD run", "c7": "C7's BatchNorm run"}


class LabInterrupted(KeyboardInterrupt):
    """A run inside the lab stopped on Ctrl-C: stop the lab after recording what finished."""


@dataclass(frozen=True)
class PlannedRuns:
    """Part of an item's plan, for the lab's estimate before the work: `runs` runs of `epochs` epochs on
    one pipeline ("fast", "classic", "cpu-classic": the classic pipeline on the CPU, or "none": no
    training, not estimated)."""

    pipeline: str
    runs: int
    epochs: int
    evaluate: bool = True
    images: int | None = None  # training images per epoch when not the preset's subset (C5's CPU subset)
    note: str = ""  # what the estimate leaves out (compilation, the stop rule)


@dataclass(frozen=True)
class Experiment:
    key: str  # "c1" ... used by --only and as the folder name
    title: str
    run: Callable[[LabContext], dict[str, Any]]
    render: Callable[[dict[str, Any], "ReportContext"], list[Any]]
    planned_epochs: Callable[[LabPreset, bool], int] = lambda preset, cuda: preset.epochs  # for the lab's ETA
    plan: Callable[[LabContext], list[PlannedRuns]] | None = None  # for the plan's estimate (None: not estimated)


@dataclass
class LabContext:
    """What an experiment may use: the base config, the data (loaded once per lab), the device."""

    base: TrainConfig  # the preset applied to TrainConfig defaults; classic pipeline
    preset: LabPreset
    data: DataBundle
    device: Any  # torch.device
    lab_dir: Path
    fast_loader: str  # "device" when the fast path is installed, else "torch"
    repeats: int
    progress_hooks: Callable[[str, str, TrainConfig], Hooks]
    should_stop: Callable[[], bool] = lambda: False  # Ctrl-C / SIGTERM seen: start no new run
    note: Callable[[str], None] = lambda message: None  # one console line (e.g. a C8 mode that failed)
    shared: dict[str, Any] = field(default_factory=dict)  # e.g. C3's best worker count, for C4/C5
    keys: tuple[str, ...] = ()  # the items this lab runs, in order (the plan: which runs will be reused)
    runs: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # key -> finished run infos
    tensorboard: Path | None = None  # --tensorboard: each run's events in <this>/<key>/<label>
    _done: dict[TrainConfig, dict[str, Any]] = field(default_factory=dict)

    def fast(self, cfg: TrainConfig) -> TrainConfig:
        """The fast path (device-resident data when available, channels_last, auto precision,
        synchronization only at epoch boundaries)."""
        return cfg.replace(loader=self.fast_loader, channels_last=True, precision="auto", sync_timing=False)

    @staticmethod
    def classic(cfg: TrainConfig) -> TrainConfig:
        """The lab's classic pipeline as written (DataLoader + PIL transforms, fp32, contiguous NCHW) with
        the exact synchronized data/h2d/compute split."""
        return cfg.replace(loader="torch", sync_timing=True, channels_last=False, precision="fp32")

    def train(
        self, key: str, label: str, cfg: TrainConfig, data: DataBundle | None = None,
        hooks: Hooks | None = None, reuse: bool = True,
    ) -> dict[str, Any]:
        """One run through runner.run_training into <lab>/<key>/<time>-<label>. A config already run in
        this lab (e.g. C6's SGD = C1) is reused, not trained twice, unless reuse=False."""

        if self.should_stop():
            raise LabInterrupted(f"{key}/{label} not started")
        # checkpoint_every changes what the run keeps, not what it trains (C1 keeps its last epoch for E)
        identity = cfg.replace(name="run", out_dir="", tags=(), checkpoint_every=0)
        target = TensorBoardTarget(self.tensorboard, f"{key}/{label}") if self.tensorboard is not None else None
        if reuse and data is None and identity in self._done:
            info = {**self._done[identity], "label": label, "reused": True}
            self.runs.setdefault(key, []).append(info)
            if target is not None:  # the reused run's curves under this item's name too
                log = TensorBoardLog(target.folder(self.lab_dir))
                log.add_all(info["records"])
                log.close()
            return info
        cfg = cfg.replace(out_dir=str(self.lab_dir / key), name=label)
        with warnings.catch_warnings():
            # torch's multi-line "excessive worker creation" warning; the report states it per point
            warnings.filterwarnings("ignore", message="This DataLoader will create")
            result = run_training(cfg, hooks=_merge(self.progress_hooks(key, label, cfg), hooks),
                                  data=data or self.data, tensorboard=target)
        rows = [r.to_dict() for r in result.records]
        info = {
            "label": label,
            "path": os.path.relpath(result.path, self.lab_dir),
            "status": result.status,
            "config": cfg.to_dict(),
            "device": result.device_label,
            "precision": result.precision,
            "data": result.data_description,
            "summary": summarize(rows),
            "records": rows,
        }
        run_doc = read_json(result.path / "run.json")
        if run_doc.get("utilization"):  # FLOPs per image and the peak behind the records' MFU (lab/mfu.py)
            info["utilization"] = run_doc["utilization"]
        self.runs.setdefault(key, []).append(info)
        if data is None:
            self._done[identity] = info
        if result.status == "interrupted":
            raise LabInterrupted(f"{key}/{label}")
        return info

    def fast_base_run_before(self, key: str) -> str | None:
        """Which earlier item of this lab trains C1's configuration (the fast path, base config) before `key`
        does, so that `key`'s run of it is reused: for the plan's run counts and notes. None: none does, so
        `key` trains it itself."""
        for k in self.keys[: self.keys.index(key)] if key in self.keys else ():
            if k in FAST_BASE_RUNS and (k != "c5" or self.device.type == "cuda"):
                return FAST_BASE_RUNS[k]
        return None

    def best_workers(self) -> tuple[int, str]:
        if "best_workers" in self.shared:
            return self.shared["best_workers"], "C3's best count"
        return self.base.workers, f"C3 not run in this lab; the default {self.base.workers} workers"


def save_traceback(lab_dir: Path, key: str, name: str, e: BaseException) -> str | None:
    """<lab>/<key>/<name> holding e's full traceback (results.json keeps one line); returns its path
    relative to the lab folder, or None when it cannot be written (a full disk must not hide the failure)."""
    try:
        (lab_dir / key).mkdir(exist_ok=True)
        write_traceback(lab_dir / key / name, e)
    except OSError:
        return None
    return f"{key}/{name}"


def _merge(a: Hooks, b: Hooks | None) -> Hooks:

    if b is None:
        return a

    def both(f: Any, g: Any) -> Any:
        if f is None or g is None:
            return f or g
        return lambda *args: (f(*args), g(*args))[-1]

    stop = None
    if a.should_stop or b.should_stop:
        stop = lambda: bool((a.should_stop and a.should_stop()) or (b.should_stop and b.should_stop()))  # noqa: E731
    return Hooks(on_step=both(a.on_step, b.on_step), on_epoch=both(a.on_epoch, b.on_epoch), should_stop=stop,
                 on_warning=a.on_warning or b.on_warning)


def median_of(values: list[float | None]) -> float:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else float("inf")


def epoch_steps(ctx: LabContext, cfg: TrainConfig) -> int:
    """Steps in one of `cfg`'s epochs over the lab's training split (max_steps applied)."""
    steps = -(-len(ctx.data.train) // cfg.batch_size)
    return min(steps, cfg.max_steps) if cfg.max_steps else steps


def timed_run(records: list[dict[str, Any]], steps_per_epoch: int) -> dict[str, Any]:
    """Epochs of a few timed steps (C3's sweep points, C4's clean epoch) -> worker start-up (iterator
    creation), data wait and time per step after it, and each extrapolated to a whole epoch (start-up + per
    step x steps per epoch); copy (h2d) and compute likewise where the run measured them (synchronized)."""
    recs = [r for r in records if r.get("status") == "ok" and r.get("steps")]
    steps = sum(r["steps"] for r in recs)
    keys = ("startup_s", "wait_per_step_s", "epoch_data_s", "epoch_s", "epoch_h2d_s", "epoch_compute_s", "epoch_other_s")
    if not steps:
        return {"timed_steps": 0, **dict.fromkeys(keys)}
    startup = sum(r["loader_start_s"] for r in recs) / len(recs)
    wait = sum(r["data_s"] - r["loader_start_s"] for r in recs) / steps
    step = sum(r["epoch_s"] - r["loader_start_s"] for r in recs) / steps
    out = {"timed_steps": steps, "startup_s": startup, "wait_per_step_s": wait,
           "epoch_data_s": startup + wait * steps_per_epoch, "epoch_s": startup + step * steps_per_epoch}
    for part in ("h2d", "compute"):
        values = [r.get(f"{part}_s") for r in recs]
        out[f"epoch_{part}_s"] = (sum(values) / steps * steps_per_epoch
                                  if all(isinstance(v, (int, float)) for v in values) else None)
    known = [out[k] for k in ("epoch_data_s", "epoch_h2d_s", "epoch_compute_s")]
    out["epoch_other_s"] = out["epoch_s"] - sum(known) if all(v is not None for v in known) else None
    return out


def c1_config(ctx: LabContext) -> TrainConfig:
    """C1's run: the fast path, with one checkpoint after the last epoch (the lab's runs keep none) so E can
    export the trained model. The lab reuses runs by what they train, so C5/C6/C7 still reuse this one."""
    return ctx.fast(ctx.base).replace(checkpoint_every=ctx.base.epochs)
