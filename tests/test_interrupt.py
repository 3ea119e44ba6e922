"""Ctrl-C and SIGTERM: sent to a real `python -m cifarlab train` process mid-run, they leave the
finished epochs' records, a checkpoint that loads with weights_only=True, status "interrupted" and a
distinct exit code -- and the run resumes from there."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from cifarlab.cli import main
from cifarlab.core.signals import StopOnSignal
from cifarlab.run.checkpoint import CHECKPOINT_NAME

LONG_RUN = ["--dataset", "synthetic", "--subset", "16", "--test-subset", "10", "--batch-size", "8",
            "--max-steps", "1", "--no-evaluate", "--epochs", "500", "--loader", "torch"]


@pytest.fixture
def sigint_default():
    """Python's own SIGINT handler for the test, whatever the test process inherited: a shell starts
    background jobs with SIGINT ignored, and StopOnSignal rightly leaves an ignored signal ignored."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_first_signal_sets_the_flag_second_aborts_and_handlers_come_back(sigint_default):
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with StopOnSignal() as stop:
        assert not stop.should_stop() and stop.exit_code is None
        os.kill(os.getpid(), signal.SIGTERM)  # would kill the test process without the handler
        time.sleep(0.01)
        assert stop.should_stop() and stop.exit_code == 143 and stop.signal_name == "SIGTERM"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_sigint_exit_code_and_an_ignored_signal_stays_ignored(sigint_default):
    with StopOnSignal() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)
    assert stop.exit_code == 130
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # how a shell starts a background job
    try:
        with StopOnSignal() as stop:
            assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


class _CtrlCInsideWorker:
    """Each item first sends SIGINT to the process loading it, as a terminal's Ctrl-C reaches workers."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int) -> int:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        return i


def test_loader_workers_survive_ctrl_c_so_the_main_process_can_stop_cleanly():
    from torch.utils.data import DataLoader

    from cifarlab.data.classic import _seed_worker  # the worker_init_fn the classic loader uses

    loader = DataLoader(_CtrlCInsideWorker(), batch_size=1, num_workers=1, worker_init_fn=_seed_worker)
    assert [int(b) for b in loader] == [0, 1, 2, 3]  # a worker killed by it: "worker exited unexpectedly"


def _start(out: Path, workers: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "cifarlab", "train", *LONG_RUN, "--workers", str(workers), "--out", str(out)]
    return subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=out.parent,
        start_new_session=True,  # its own process group, like a job in a terminal
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # as if started in the foreground
    )


def _wait_for_first_epoch(proc: subprocess.Popen) -> list[str]:
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("epoch 1/"):
            return lines
    raise AssertionError(f"no epoch line; exit {proc.wait()}; stderr: {proc.stderr.read()}")


@pytest.mark.parametrize(
    "sig, to_group, workers, code",
    [
        # Ctrl-C in a terminal reaches the whole process group, DataLoader workers included
        (signal.SIGINT, True, 1, 130),
        # a scheduler or `kill` sends SIGTERM to the main process
        (signal.SIGTERM, False, 0, 143),
    ],
    ids=["SIGINT-to-group", "SIGTERM"],
)
def test_signal_to_a_real_training_process(tmp_path, capsys, sig, to_group, workers, code):
    out = tmp_path / "runs"
    out.mkdir()
    proc = _start(out, workers)
    watchdog = threading.Timer(240, proc.kill)  # never hang the suite
    watchdog.start()
    try:
        lines = _wait_for_first_epoch(proc)
        (os.killpg if to_group else os.kill)(proc.pid, sig)
        stdout_rest, stderr = proc.communicate(timeout=200)
    finally:
        watchdog.cancel()
    assert proc.returncode == code, stderr
    assert "Traceback" not in stderr and "exited unexpectedly" not in stderr
    err_lines = [line for line in stderr.splitlines() if line.strip()]
    assert err_lines[-1].startswith(f"cifarlab: interrupted ({signal.Signals(sig).name})"), stderr
    assert "--resume" in err_lines[-1]
    assert "interrupted:" in "".join(lines) + stdout_rest

    (run_dir,) = list(out.iterdir())
    run = json.loads((run_dir / "run.json").read_text())
    records = json.loads((run_dir / "records.json").read_text())
    finished = [r for r in records if r["status"] == "ok"]
    assert run["status"] == "interrupted"
    assert len(finished) >= 1 and [r["epoch"] for r in finished] == list(range(1, len(finished) + 1))
    assert run["summary"]["epochs_completed"] == len(finished)
    saved = torch.load(run_dir / CHECKPOINT_NAME, map_location="cpu", weights_only=True)
    assert saved["epoch"] == len(finished)  # the last finished epoch, with its records
    assert [r["epoch"] for r in saved["records"]] == [r["epoch"] for r in finished]
    assert not [p for p in os.listdir(run_dir) if p.endswith(".tmp")]

    if sig == signal.SIGTERM:  # and the run continues from there
        target = len(finished) + 1
        assert main(["train", "--resume", str(run_dir), "--epochs", str(target)]) == 0
        capsys.readouterr()
        records = json.loads((run_dir / "records.json").read_text())
        assert [(r["epoch"], r["status"]) for r in records] == [(e, "ok") for e in range(1, target + 1)]
        assert json.loads((run_dir / "run.json").read_text())["status"] == "completed"
        # the new target is the run's config now: resuming again has nothing left to do
        assert json.loads((run_dir / "config.json").read_text())["epochs"] == target
        assert main(["train", "--resume", str(run_dir)]) == 2
        assert "already finished" in capsys.readouterr().err


def _sleep_as_a_loader_worker() -> None:
    from cifarlab.core.signals import ignore_stop_signals_in_worker

    ignore_stop_signals_in_worker()
    time.sleep(60)


def test_a_loader_worker_ignores_ctrl_c_and_ends_a_grace_period_after_sigterm(monkeypatch):
    """Workers must not die of the group's signal at once (the main process would fail instead of stopping
    cleanly), but must not ignore SIGTERM forever either: Python's exit handler terminate()s daemonic children
    and joins them, which hung for 11 minutes when a run ended in an exception with workers left alive."""
    import multiprocessing

    from cifarlab.core import signals as interrupt

    monkeypatch.setattr(interrupt, "WORKER_STOP_GRACE_S", 1)
    worker = multiprocessing.get_context("fork").Process(target=_sleep_as_a_loader_worker, daemon=True)
    worker.start()
    time.sleep(1.0)  # its handlers are installed
    os.kill(worker.pid, signal.SIGINT)
    os.kill(worker.pid, signal.SIGTERM)
    time.sleep(0.3)
    assert worker.is_alive()  # neither signal ends it at once
    worker.join(timeout=20)
    assert not worker.is_alive() and worker.exitcode == -signal.SIGALRM


def test_an_exception_mid_epoch_shuts_the_loader_workers_down(tmp_path, monkeypatch):
    """An exception in a step propagates with a traceback that keeps the epoch's frame -- and its DataLoader
    iterator -- alive; the engine shuts the workers down before it leaves, so none outlives the run."""
    import multiprocessing

    from cifarlab.config import TrainConfig
    from cifarlab.run.runner import run_training
    from cifarlab.step import capture

    def failing_step(self, lr=None):
        raise RuntimeError("injected failure in a training step")

    monkeypatch.setattr(capture.StepRunner, "step", failing_step)
    cfg = TrainConfig(dataset="synthetic", subset=64, test_subset=16, batch_size=8, epochs=1, loader="torch",
                      workers=2, evaluate=False, out_dir=str(tmp_path))
    with pytest.raises(RuntimeError, match="injected failure") as failure:
        run_training(cfg)
    assert failure.value.__traceback__ is not None  # the frames (and the iterator) are still referenced
    assert multiprocessing.active_children() == []
