"""One training run from a config to a finished run folder: the call behind `cifarlab train` and every
experiment point. Fresh seed, data loaders, model and optimizer every time."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cifarlab.config import TrainConfig
from cifarlab.data import DataBundle, build_loaders, load_data
from cifarlab.engine import EpochRecord, Hooks, TrainState, build_state, train
from cifarlab.runs import RunWriter, create_run_dir, ensure_writable_dir
from cifarlab.runtime import device_label, environment, resolve_device, seed_everything


@dataclass
class RunResult:
    path: Path
    status: str  # completed | diverged | interrupted
    records: list[EpochRecord]
    config: TrainConfig
    data_description: str
    device_label: str
    precision: str

    @property
    def finished(self) -> list[EpochRecord]:
        return [r for r in self.records if r.status == "ok"]


def prepare(cfg: TrainConfig) -> tuple[torch.device, DataBundle]:
    """Validation and the checks that can fail on user input, before anything is written."""
    cfg.validate()
    ensure_writable_dir(Path(cfg.out_dir))
    device = resolve_device(cfg.device)
    return device, load_data(cfg)


def run_training(
    cfg: TrainConfig,
    hooks: Hooks | None = None,
    data: DataBundle | None = None,
    extra_status: dict[str, Any] | None = None,
) -> RunResult:
    """Train per cfg, writing the run folder as epochs finish. `data` may be passed in so a sweep
    reads the dataset once; the model, optimizer, loaders and RNG state are always new."""
    cfg.validate()
    if data is None:
        device, data = prepare(cfg)
    else:
        ensure_writable_dir(Path(cfg.out_dir))
        device = resolve_device(cfg.device)
    if device.type == "cuda":
        # Let cuDNN pick the fastest convolution algorithms for these fixed shapes.
        torch.backends.cudnn.benchmark = True
    seed_everything(cfg.seed)
    train_loader, test_loader = build_loaders(cfg, data, device)
    state = build_state(cfg, device)
    label = device_label(device)
    writer = RunWriter(
        path=create_run_dir(cfg.out_dir, cfg.name),
        config=cfg,
        environment=environment(device),
        data_description=data.description,
        device_label=label,
        precision=state.precision,
    )
    extra = dict(extra_status or {})
    writer.write_header()
    user_hooks = hooks or Hooks()

    def on_epoch(record: EpochRecord, st: TrainState) -> None:
        writer.write_records(st.records)
        writer.write_status("running", st.records, **extra)
        if user_hooks.on_epoch is not None:
            user_hooks.on_epoch(record, st)

    engine_hooks = Hooks(on_step=user_hooks.on_step, on_epoch=on_epoch, should_stop=user_hooks.should_stop)
    try:
        status = train(cfg, state, train_loader, test_loader if cfg.evaluate else None, engine_hooks)
    except KeyboardInterrupt:
        status = "interrupted"
    except BaseException as e:
        writer.write_records(state.records)
        writer.write_status("failed", state.records, error=f"{type(e).__name__}: {e}", **extra)
        raise
    writer.write_records(state.records)
    writer.write_status(status, state.records, **extra)
    return RunResult(
        path=writer.path,
        status=status,
        records=state.records,
        config=cfg,
        data_description=data.description,
        device_label=label,
        precision=state.precision,
    )
