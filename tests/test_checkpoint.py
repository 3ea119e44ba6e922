"""Checkpoints and resume: a run stopped mid-epoch and resumed ends bit-identical to one that never
stopped; checkpoints load with weights_only=True; a failed write keeps the last good checkpoint."""

from __future__ import annotations

import errno
import io
import json
import os
import pickle
import random

import numpy as np
import pytest
import torch
from torch import nn

from cifarlab.config import TrainConfig
from cifarlab.core.errors import UsageError
from cifarlab.run import checkpoint as ckpt_mod
from cifarlab.run.checkpoint import (
    CHECKPOINT_NAME,
    load_checkpoint,
    resume_config,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from cifarlab.run.runner import checkpoint_due, run_training
from cifarlab.step.state import EpochRecord, TrainState
from cifarlab.train.engine import Hooks

METRICS = ("epoch", "status", "train_loss", "train_acc", "test_loss", "test_acc", "images", "steps")


def tiny_cfg(tmp_path, **kw) -> TrainConfig:
    base = dict(dataset="synthetic", subset=16, test_subset=10, batch_size=8, test_batch_size=10, epochs=2,
                loader="torch", workers=0, seed=7, lr=0.05, out_dir=str(tmp_path / "runs"))
    base.update(kw)
    return TrainConfig(**base)


def stop_at(epoch: int, step: int) -> Hooks:
    """Ask the engine to stop after `step` steps of `epoch`, as a Ctrl-C would."""
    seen = {"epoch": 0, "step": 0}

    def on_step(e: int, s: int, total: int) -> None:
        seen.update(epoch=e, step=s)

    return Hooks(on_step=on_step, should_stop=lambda: (seen["epoch"], seen["step"]) == (epoch, step))


def test_resume_after_interruption_equals_uninterrupted_run(tmp_path):
    # 16 of the 24 images per epoch, a different 16 each epoch; the stop comes after step 1 of 2, mid-epoch (a stop
    # during an epoch's last step keeps the finished epoch: tests/test_resume_edges.py)
    cfg = tiny_cfg(tmp_path, subset=24, max_steps=2)
    straight = run_training(cfg)
    assert straight.status == "completed"

    cut = run_training(cfg.replace(name="cut"), hooks=stop_at(epoch=2, step=1))
    assert cut.status == "interrupted"
    assert [(r.epoch, r.status) for r in cut.records] == [(1, "ok"), (2, "interrupted")]
    run = json.loads((cut.path / "run.json").read_text())
    assert run["status"] == "interrupted" and run["summary"]["epochs_completed"] == 1
    saved = torch.load(cut.path / CHECKPOINT_NAME, map_location="cpu", weights_only=True)
    assert saved["epoch"] == 1 and len(saved["records"]) == 1  # the last good one: end of epoch 1

    resumed_cfg = resume_config(cut.path, {})
    resumed = run_training(resumed_cfg, resume=cut.path)
    assert resumed.status == "completed" and resumed.path == cut.path

    a = torch.load(straight.path / CHECKPOINT_NAME, map_location="cpu", weights_only=True)
    b = torch.load(cut.path / CHECKPOINT_NAME, map_location="cpu", weights_only=True)
    assert a["epoch"] == b["epoch"] == 2
    assert a["model"].keys() == b["model"].keys()
    for name in a["model"]:  # weights and BatchNorm buffers, bit for bit
        assert torch.equal(a["model"][name], b["model"][name]), name
    for i, state in a["optimizer"]["state"].items():
        assert torch.equal(state["momentum_buffer"], b["optimizer"]["state"][i]["momentum_buffer"])
    rows = lambda recs: [{k: r[k] if isinstance(r, dict) else getattr(r, k) for k in METRICS} for r in recs]
    assert rows(resumed.records) == rows(straight.records)
    on_disk = json.loads((cut.path / "records.json").read_text())
    assert rows(on_disk) == rows(straight.records)
    run = json.loads((cut.path / "run.json").read_text())
    assert run["status"] == "completed" and run["resumed"][0]["from_epoch"] == 1


def test_checkpoint_holds_everything_and_loads_weights_only(tmp_path):
    cfg = tiny_cfg(tmp_path, epochs=1, max_steps=1, evaluate=False)
    result = run_training(cfg)
    saved = torch.load(result.path / CHECKPOINT_NAME, map_location="cpu", weights_only=True)
    assert set(ckpt_mod.REQUIRED_KEYS) <= set(saved)
    assert saved["config"] == cfg.to_dict() and saved["epoch"] == 1
    assert set(saved["rng"]) == {"torch", "numpy", "python", "cuda"}
    assert isinstance(saved["rng"]["torch"], torch.Tensor)
    assert len(saved["optimizer"]["state"]) == 62  # a momentum buffer per parameter tensor
    assert saved["records"][0]["steps"] == 1
    assert not [p for p in os.listdir(result.path) if p.endswith(".tmp")]


def test_rng_states_round_trip():
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    random.random(), np.random.normal(), torch.rand(1)  # leave a cached gaussian and advanced streams
    state = rng_state()
    first = (random.random(), np.random.normal(), torch.rand(3))
    random.seed(99), np.random.seed(99), torch.manual_seed(99)
    set_rng_state(state)
    again = (random.random(), np.random.normal(), torch.rand(3))
    assert first[:2] == again[:2] and torch.equal(first[2], again[2])


def test_checkpoint_schedule():
    cfg = TrainConfig(epochs=5, checkpoint_every=2)
    assert [e for e in range(1, 6) if checkpoint_due(cfg, e)] == [2, 4, 5]
    assert not any(checkpoint_due(cfg.replace(checkpoint_every=0), e) for e in range(1, 6))
    assert all(checkpoint_due(TrainConfig(epochs=5), e) for e in range(1, 6))


def small_state() -> TrainState:
    model = nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.ones(1, 4)).sum().backward()
    opt.step()
    rec = EpochRecord(epoch=1, status="ok", train_loss=1.0, train_acc=0.5, test_loss=None, test_acc=None, images=1,
                      steps=1, epoch_s=1.0, data_s=0.1, h2d_s=0.1, compute_s=0.7, other_s=0.1, loader_start_s=0.0,
                      eval_s=None, images_per_s=1.0, timing_mode="synchronized")
    return TrainState(model=model, optimizer=opt, scaler=None, device=torch.device("cpu"), precision="fp32",
                      epoch=1, records=[rec])


def test_failed_write_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    state = small_state()
    path = save_checkpoint(tmp_path, TrainConfig(), state)
    good = path.read_bytes()

    class FullDisk(io.FileIO):
        """A file on a disk that fills up after 200 bytes: the OSError arises inside torch's zip
        writer, which reports it as "RuntimeError: unexpected pos" (seen on a real full tmpfs)."""

        def write(self, b):
            if self.tell() + len(b) > 200:
                raise OSError(errno.ENOSPC, "No space left on device")
            return super().write(b)

    monkeypatch.setattr(ckpt_mod.os, "fdopen", lambda fd, mode: FullDisk(fd, mode))
    state.epoch = 2
    with pytest.raises(OSError) as info:
        save_checkpoint(tmp_path, TrainConfig(), state)
    assert info.value.errno == errno.ENOSPC  # the disk error itself, for a one-line message
    assert path.read_bytes() == good
    assert os.listdir(tmp_path) == [CHECKPOINT_NAME]  # no temp file left behind
    assert load_checkpoint(path)["epoch"] == 1


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("kind", ["malicious", "truncated", "garbage", "wrong-format", "missing", "lying-epoch"])
def test_bad_checkpoints_are_refused_in_one_line(tmp_path, kind):
    path = tmp_path / CHECKPOINT_NAME
    marker = tmp_path / "pwned"
    if kind == "malicious":
        with open(path, "wb") as f:
            pickle.dump({"format": ckpt_mod.CHECKPOINT_FORMAT, "model": _Payload(marker)}, f)
    elif kind == "truncated":
        save_checkpoint(tmp_path, TrainConfig(), small_state())
        path.write_bytes(path.read_bytes()[:300])
    elif kind == "garbage":
        path.write_bytes(os.urandom(2048))
    elif kind == "wrong-format":
        torch.save({"state_dict": {}}, path)
    elif kind == "lying-epoch":
        save_checkpoint(tmp_path, TrainConfig(), small_state())
        d = torch.load(path, weights_only=True)
        d["epoch"] = 5
        torch.save(d, path)
    with pytest.raises(UsageError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert "\n" not in message and CHECKPOINT_NAME in message
    assert not marker.exists()  # the payload never ran
