"""Resume edge cases of checkpoints, resume and run folders: each test fails without the behaviour it
checks. Run folders are built by hand (a checkpoint of a tiny config) unless a test trains."""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

import pytest
import torch

from cifarlab.cli import main
from cifarlab.config import TrainConfig
from cifarlab.core.errors import UsageError
from cifarlab.run.checkpoint import CHECKPOINT_NAME, resume_config, save_checkpoint
from cifarlab.run.runner import run_training
from cifarlab.step.state import EpochRecord
from cifarlab.train.engine import Hooks, build_state

CFG = TrainConfig(dataset="synthetic", subset=16, test_subset=10, batch_size=8, epochs=2, loader="torch", workers=0,
                  device="cpu")


def _record(epoch: int) -> EpochRecord:
    return EpochRecord(epoch=epoch, status="ok", train_loss=2.0, train_acc=0.1, test_loss=None, test_acc=None,
                       images=16, steps=2, epoch_s=1.0, data_s=0.1, h2d_s=0.0, compute_s=0.9, other_s=0.0,
                       loader_start_s=0.0, eval_s=None, images_per_s=16.0, timing_mode="synchronized")


def resumable(root: Path, name: str = "run", cfg: TrainConfig = CFG, **ckpt_cfg) -> Path:
    """A run folder interrupted after epoch 1 of 2: config.json, run.json and checkpoint.pt."""
    path = root / name
    path.mkdir(parents=True)
    cfg = cfg.replace(out_dir=str(root))
    (path / "config.json").write_text(json.dumps(cfg.to_dict()))
    (path / "run.json").write_text(json.dumps({"status": "interrupted", "started": "2026-01-01T00:00:00+00:00"}))
    state = build_state(cfg, torch.device("cpu"))
    state.epoch, state.records = 1, [_record(1)]
    save_checkpoint(path, cfg.replace(**ckpt_cfg), state)
    return path


def one_line_usage_error(capsys, argv: list[str]) -> str:
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert "\n" not in err and "Traceback" not in err, err
    return err


def test_a_folder_another_resume_is_training_is_refused(tmp_path, capsys):
    """Two `train --resume R` started together both passed the live-run check (run.json names the process only
    after its data and model are ready) and trained into the same folder, overwriting each other's files."""
    run = resumable(tmp_path)
    fd = os.open(run, os.O_RDONLY)  # what the other resuming process holds
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        err = one_line_usage_error(capsys, ["train", "--resume", str(run)])
        assert f"--resume {str(run)!r} is being resumed by another process right now" in err
    finally:
        os.close(fd)


def test_a_run_saved_before_a_config_key_existed_resumes(tmp_path):
    """cuda_graph was added to TrainConfig after checkpoints were: a run saved before it has the key neither in
    config.json nor in its checkpoint. config.json is read with the default filled in, the checkpoint's config was
    compared raw, so resume refused: 'config.json and checkpoint.pt disagree on cuda_graph; the folder was edited'."""
    run = resumable(tmp_path)
    config = json.loads((run / "config.json").read_text())
    del config["cuda_graph"]
    (run / "config.json").write_text(json.dumps(config))
    ckpt = torch.load(run / CHECKPOINT_NAME, weights_only=True)
    del ckpt["config"]["cuda_graph"]
    torch.save(ckpt, run / CHECKPOINT_NAME)
    cfg = resume_config(run, {})
    assert cfg.cuda_graph == TrainConfig().cuda_graph and cfg.epochs == 2
    # an edit is still an edit
    ckpt["config"]["lr"] = 0.5
    torch.save(ckpt, run / CHECKPOINT_NAME)
    with pytest.raises(UsageError, match="disagree on lr"):
        resume_config(run, {})


@pytest.mark.parametrize("text", ['{"status": "interr', "[1, 2]", "\xff\xfe"])
def test_a_broken_run_json_is_one_line_not_a_traceback(tmp_path, capsys, text):
    """run.json cut short (or not an object) passed the live-run check, which ignores what it cannot read; the
    runner then read it again for the start time after loading data and building the model: JSONDecodeError
    (or AttributeError) traceback. Now one line before any data is loaded, naming the file and the way out."""
    run = resumable(tmp_path)
    (run / "run.json").write_bytes(text.encode("latin-1"))
    err = one_line_usage_error(capsys, ["train", "--resume", str(run)])
    assert f"{run / 'run.json'} is unreadable or not a JSON object" in err and "delete it to resume" in err
    if text != "[1, 2]":
        return
    (run / "run.json").unlink()  # the way out the message names
    assert main(["train", "--resume", str(run), "--epochs", "2"]) == 0
    assert json.loads((run / "run.json").read_text())["status"] == "completed"


@pytest.mark.parametrize("change", [{"precision": "bf16"}, {"device": "cuda"}, {"processes": 2}])
def test_a_run_resumed_on_another_device_precision_or_process_count_is_refused(tmp_path, capsys, change):
    """--device/--precision auto resolve per machine and --nproc is not in the config: a run started on a GPU
    (bf16) or on 2 processes resumed on a CPU box (fp32) or as 1 process went on silently as a different
    experiment, and run.json then named only the new device and precision for every epoch."""
    run = resumable(tmp_path)
    ckpt = torch.load(run / CHECKPOINT_NAME, weights_only=True)
    assert ckpt["run"] == {"device": "cpu", "precision": "fp32", "processes": 1}
    ckpt["run"].update(change)
    torch.save(ckpt, run / CHECKPOINT_NAME)
    err = one_line_usage_error(capsys, ["train", "--resume", str(run)])
    assert f"{run / CHECKPOINT_NAME}: its 1 epoch(s) ran on " in err and "a different experiment" in err
    assert "this run would go on on cpu, fp32, 1 process(es)" in err
    assert json.loads((run / "run.json").read_text())["status"] == "interrupted"  # nothing was written


@pytest.mark.parametrize("evaluate", [True, False])
def test_a_stop_during_an_epochs_last_step_keeps_the_finished_epoch(tmp_path, evaluate):
    """A Ctrl-C that lands during an epoch's last step marked the whole, finished epoch 'interrupted': its
    training was thrown away (no checkpoint, 'records of 0 finished epoch(s) kept') and a resume trained it
    again. Seen twice in two tries on a 4-step subset run. The epoch is now kept and checkpointed; the stop
    takes effect at its evaluation (or, without one, before the next epoch), and the resumed run matches one
    that never stopped."""
    cfg = TrainConfig(dataset="synthetic", subset=16, test_subset=10, batch_size=8, test_batch_size=10, epochs=2,
                      loader="torch", workers=0, seed=7, lr=0.05, evaluate=evaluate, out_dir=str(tmp_path / "runs"))
    seen = {"at": (0, 0)}

    def on_step(epoch: int, step: int, total: int) -> None:
        seen["at"] = (epoch, step)

    cut = run_training(cfg, hooks=Hooks(on_step=on_step, should_stop=lambda: seen["at"] >= (1, 2)))  # 2 steps/epoch
    assert cut.status == "interrupted"
    assert [(r.epoch, r.status, r.steps) for r in cut.records] == [(1, "ok", 2)]
    assert torch.load(cut.path / CHECKPOINT_NAME, weights_only=True)["epoch"] == 1
    resumed = run_training(resume_config(cut.path, {}), resume=cut.path)
    straight = run_training(cfg.replace(name="straight"))
    metrics = lambda rs: [(r.epoch, r.status, r.train_loss, r.train_acc) for r in rs]  # noqa: E731
    assert metrics(resumed.records) == metrics(straight.records)


def test_a_read_only_run_folder_is_refused_before_loading_naming_the_way_out(tmp_path, capsys, monkeypatch):
    """Resuming a run on a read-only mount failed only after the data was loaded and the model built, saying
    '... make it writable or choose another --out' -- and --resume refuses --out."""
    import errno
    import tempfile

    run = resumable(tmp_path)

    def read_only(*a, **kw):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    err = one_line_usage_error(capsys, ["train", "--resume", str(run)])
    assert err.endswith(f"--resume {str(run)!r} is not writable (Read-only file system); make it writable, or copy "
                        f"the folder somewhere writable and resume the copy")


def test_a_resumed_runs_elapsed_time_adds_the_earlier_processes(tmp_path, capsys):
    """run.json's elapsed_s is the time spent running, all processes together: a resume adds its own seconds to
    the earlier ones (it counted only the last process while `started` kept the first start), and the resume
    entry records what came before."""
    run = resumable(tmp_path)
    doc = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**doc, "elapsed_s": 1000.0}))
    assert main(["train", "--resume", str(run)]) == 0, capsys.readouterr().err
    after = json.loads((run / "run.json").read_text())
    assert after["status"] == "completed" and after["started"] == doc["started"]
    assert after["resumed"][-1]["elapsed_before_s"] == 1000.0
    assert 1000.0 < after["elapsed_s"] < 1000.0 + 300.0  # one more tiny epoch, not a second start from zero


def test_a_resumed_runs_summary_counts_every_processs_setup_and_no_first_epoch_as_steady():
    """Records of a run resumed once: epochs 1 and 3 each open a process (setup_s set). The summary's setup_s
    is both processes' and the steady mean leaves out both first epochs (it counted epoch 3, which pays the
    second process's start-up, and only the first setup)."""
    from dataclasses import replace

    from cifarlab.run.folder import summarize

    rows = [replace(_record(1), epoch_s=5.0, setup_s=2.0), _record(2), replace(_record(3), epoch_s=4.0, setup_s=1.5),
            _record(4)]
    summary = summarize([r.to_dict() for r in rows])
    assert summary["setup_s"] == 3.5
    assert summary["mean_epoch_s_after_first"] == 1.0 and summary["first_epoch_s"] == 5.0
    single = summarize([r.to_dict() for r in rows[:2]])  # one process: as before
    assert single["setup_s"] == 2.0 and single["mean_epoch_s_after_first"] == 1.0
