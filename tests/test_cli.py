"""The CLI as a user meets it: real argv, real files, real exit codes."""

import json
import subprocess
import sys

import pytest
from tests.conftest import run_cli

TINY = ["--epochs", "1", "--subset", "40", "--test-subset", "20", "--batch-size", "20", "--workers", "0"]


@pytest.mark.parametrize(
    "args, needle",
    [
        (["train", "--optimizer", "adamw"], "--optimizer 'adamw' is not known"),
        (["train", "--workers", "-1"], "--workers must be between 0"),
        (["train", "--batch-size", "0"], "--batch-size must be between 1"),
        (["train", "--epochs", "0"], "--epochs must be between 1"),
        (["train", "--lr", "nan"], "--lr must be a finite number"),
        (["train", "--lr", "-0.1"], "--lr must be in"),
        (["train", "--batch-size", "abc"], "invalid int value: 'abc'"),
        (["train", "--device", "tpu"], "invalid choice: 'tpu'"),
        (["train", "--subset", "-5"], "--subset must be between 1"),
        (["train", "--name", "../escape"], "--name '../escape' is not a plain folder name"),
        (["train", "--prefetch-factor", "2", "--workers", "0"], "--prefetch-factor needs --workers >= 1"),
        (["train", "--bogus"], "unrecognized arguments: --bogus"),
        (["inspect", "--optimizer", "lbfgs"], "--optimizer 'lbfgs' is not known"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
    ],
)
def test_bad_input_gives_one_clear_line_and_exit_2(args, needle, capsys):
    code, out, err = run_cli(args, capsys)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("cifarlab: error: ")
    assert needle in err
    assert "Traceback" not in err


def test_missing_dataset_is_a_clear_error(tmp_path, capsys, monkeypatch):
    import cifarlab.data.cifar as data

    monkeypatch.setattr(data, "ARCHIVE_URL", "http://127.0.0.1:9/cifar-10-python.tar.gz")  # refused at once
    code, _, err = run_cli(["train", "--data", tmp_path / "nothing", "--dataset", "cifar10", "--out", tmp_path], capsys)
    assert code == 2 and err.count("\n") == 1
    assert "CIFAR-10 is not in" in err and "--dataset synthetic" in err
    assert not (tmp_path / "nothing").exists()  # nothing left behind


def test_corrupt_dataset_is_a_clear_error(cifar_root, tmp_path, capsys):
    batch = cifar_root / "cifar-10-batches-py" / "data_batch_2"
    batch.write_bytes(batch.read_bytes()[:1000])
    code, _, err = run_cli(["train", "--data", cifar_root, "--out", tmp_path / "runs", *TINY], capsys)
    assert code == 2 and "data_batch_2" in err and err.count("\n") == 1
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_unwritable_out_folder(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    code, _, err = run_cli(["train", "--dataset", "synthetic", "--out", blocker / "runs", *TINY], capsys)
    assert code == 2 and "--out" in err and "not writable" in err


def test_two_epoch_run_on_cifar_format_files_learns_and_records(tmp_path, capsys):
    from tests.conftest import make_cifar_dir

    root = make_cifar_dir(tmp_path / "data", per_train_file=64, n_test=50)
    args = ["train", "--data", root, "--out", tmp_path / "runs", "--epochs", "2", "--batch-size", "32",
            "--workers", "0", "--lr", "0.02", "--seed", "1"]
    code, out, err = run_cli(args, capsys)
    assert code == 0, err
    assert "cifar10 from" in out and out.count("epoch ") >= 2
    (run_dir,) = list((tmp_path / "runs").iterdir())
    for name in ("config.json", "environment.json", "records.json", "records.csv", "run.json"):
        assert (run_dir / name).is_file(), name
    run = json.loads((run_dir / "run.json").read_text())
    assert run["schema"] == "cifarlab.run/1" and run["status"] == "completed"
    config = json.loads((run_dir / "config.json").read_text())
    assert config["lr"] == 0.02 and config["momentum"] == 0.9 and config["batch_size"] == 32
    env = json.loads((run_dir / "environment.json").read_text())
    assert env["cpu_count_usable"] >= 1 and env["torch"]
    records = json.loads((run_dir / "records.json").read_text())
    assert [r["epoch"] for r in records] == [1, 2]
    assert all(r["images"] == 320 and r["steps"] == 10 for r in records)
    assert records[1]["train_loss"] < records[0]["train_loss"]
    for r in records:
        parts = r["data_s"] + r["h2d_s"] + r["compute_s"] + r["other_s"]
        assert parts == pytest.approx(r["epoch_s"], rel=1e-9)
        assert r["eval_s"] > 0 and 0 <= r["test_acc"] <= 1
    header = (run_dir / "records.csv").read_text().splitlines()[0].split(",")
    assert {"epoch", "train_loss", "data_s", "compute_s", "epoch_s", "eval_s"} <= set(header)


def test_runs_never_overwrite_each_other(tmp_path, capsys):
    args = ["train", "--dataset", "synthetic", "--out", tmp_path, "--max-steps", "1", "--no-evaluate", *TINY]
    assert run_cli(args, capsys)[0] == 0
    assert run_cli(args, capsys)[0] == 0
    runs = sorted(p.name for p in tmp_path.iterdir())
    assert len(runs) == 2 and runs[0] != runs[1]


def test_inspect_json(capsys):
    code, out, _ = run_cli(["inspect", "--json", "--optimizer", "sgd", "--batch-size", "2"], capsys)
    facts = json.loads(out)
    assert code == 0 and facts["conv_layers"] == 20 and facts["optimizers"]["sgd"]["gradient_elements"] == 11_173_962


def test_module_entry_point_and_lazy_torch():
    # --help must not import torch (fast, and works even where torch is broken)
    code = "import sys; from cifarlab.cli import main; main(['--version']) if False else None; " \
           "import cifarlab.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
    res = subprocess.run([sys.executable, "-m", "cifarlab", "--version"], capture_output=True, text=True)
    assert res.returncode == 0 and "cifarlab" in res.stdout


def test_a_closed_pipe_is_no_traceback(tmp_path) -> None:
    """`cifarlab inspect | head`: when the reader goes away before the output is written, no BrokenPipeError
    traceback (neither from the command nor from the interpreter's flush at exit)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root / "src")}
    proc = subprocess.Popen([sys.executable, "-m", "cifarlab", "inspect", "--json"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env, cwd=tmp_path)
    proc.stdout.close()  # the reader is gone before anything is written
    err = proc.stderr.read().decode()
    proc.wait(timeout=300)
    assert "Traceback" not in err and "BrokenPipeError" not in err, err
    assert proc.returncode == 1
