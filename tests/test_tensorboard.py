"""`--tensorboard`: event files read back with TensorBoard's own reader (EventAccumulator) and served by a real
`tensorboard` on localhost, every scalar equal to the run's records.json / run.json; global step = optimizer
steps across a resume (purge_step drops what the interrupted process wrote after its checkpoint); the missing
extra is one line and exit 2."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("tensorboard")

import numpy as np  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

from cifarlab.config import TrainConfig  # noqa: E402
from cifarlab.run.runner import run_training  # noqa: E402
from cifarlab.run.tensorboard_log import SCALARS, TensorBoardTarget  # noqa: E402
from cifarlab.train.engine import Hooks  # noqa: E402

SMALL = ["--dataset", "synthetic", "--subset", "48", "--test-subset", "16", "--batch-size", "16", "--test-batch-size", "16",
         "--max-steps", "2"]


def read_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] as TensorBoard's EventAccumulator reads the folder (restart purges applied)."""
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def expected(records: list[dict[str, Any]]) -> dict[str, list[tuple[int, float]]]:
    out: dict[str, list[tuple[int, float]]] = {}
    step = 0
    for r in records:
        if r["status"] != "ok":
            continue
        step += r["steps"]
        for tag, key in SCALARS:
            if r.get(key) is not None:  # TensorBoard stores a scalar as float32: records.json's value rounded so
                out.setdefault(tag, []).append((step, float(np.float32(r[key]))))
    return out


def test_train_writes_every_scalar_equal_to_the_run_files(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "cifarlab", "train", *SMALL, "--epochs", "2", "--out", str(tmp_path / "runs"),
                           "--tensorboard", str(tmp_path / "tb")], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    (run_dir,) = [p for p in (tmp_path / "runs").iterdir()]
    records = json.loads((run_dir / "records.json").read_text())
    run = json.loads((run_dir / "run.json").read_text())
    folder = tmp_path / "tb" / run_dir.name
    assert run["tensorboard"]["dir"] == str(folder.resolve())
    scalars = read_scalars(folder)
    want = expected(records)
    assert set(want) == {tag for tag, _ in SCALARS}  # every scalar the issue names (and eval_s) has values here
    assert scalars == want  # exactly records.json's values (as float32)
    assert [s for s, _ in scalars["train/loss"]] == [2, 4]  # global step = optimizer steps
    s = run["summary"]
    f32 = lambda x: float(np.float32(x))  # noqa: E731
    assert scalars["train/loss"][-1][1] == f32(s["final_train_loss"]) and scalars["test/top1"][-1][1] == f32(s["final_test_acc"])
    assert scalars["perf/mfu"][-1][1] == f32(records[-1]["tflops"] / run["utilization"]["peak"]["tflops"])
    assert f"tensorboard --logdir {tmp_path / 'tb'}" in proc.stdout


def test_a_resumed_run_continues_its_curve_without_duplicates(tmp_path: Path) -> None:
    cfg = TrainConfig(dataset="synthetic", subset=48, test_subset=16, batch_size=16, test_batch_size=16, max_steps=2,
                      epochs=4, checkpoint_every=2, out_dir=str(tmp_path / "runs"), device="cpu")
    done: list[int] = []
    # stop once epoch 3 is whole: epochs 1-3 are kept and logged, the checkpoint holds epochs 1-2
    hooks = Hooks(on_epoch=lambda r, st: done.append(r.epoch), should_stop=lambda: 3 in done)
    first = run_training(cfg, hooks=hooks, tensorboard=TensorBoardTarget(tmp_path / "tb"))
    assert first.status == "interrupted" and [r.epoch for r in first.finished] == [1, 2, 3]
    folder = tmp_path / "tb" / first.path.name
    assert [s for s, _ in read_scalars(folder)["train/loss"]] == [2, 4, 6]
    stale = read_scalars(folder)["train/loss"][2][1]

    second = run_training(cfg, resume=first.path)  # no target: the run's own folder, from its run.json
    assert second.status == "completed"
    run = json.loads((first.path / "run.json").read_text())
    assert run["tensorboard"]["purge_step"] == 5  # epoch 2's 4 steps + 1: the first process's epoch 3 is dropped
    records = json.loads((first.path / "records.json").read_text())
    scalars = read_scalars(folder)
    assert [s for s, _ in scalars["train/loss"]] == [2, 4, 6, 8]  # monotonic, no step twice
    assert scalars == expected(records)
    assert len(list(folder.glob("events.out.tfevents.*"))) == 2  # one file per process, read as one run
    assert stale == scalars["train/loss"][2][1]  # epoch 3 replays exactly (seeded per epoch): same value, once


def test_tensorboard_without_the_extra_is_one_line_exit_2(tmp_path: Path) -> None:
    # None in sys.modules makes `import tensorboard` fail, as on a machine without the package
    code = ("import sys; sys.modules['tensorboard'] = None; from cifarlab.cli import main; "
            "sys.exit(main(sys.argv[1:]))")
    for argv in (["train", *SMALL, "--out", str(tmp_path), "--tensorboard"], ["lab", "--preset", "smoke", "--out", str(tmp_path),
                 "--tensorboard", str(tmp_path / "tb")]):
        proc = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
        assert "pip install 'cifarlab[tensorboard]'" in proc.stderr
    assert not any(tmp_path.iterdir())  # nothing written


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get_json(url: str, timeout_s: float = 120.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=10) as resp:
                return json.loads(resp.read())
        except (OSError, ValueError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def test_lab_runs_open_in_tensorboard_over_http(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "cifarlab", "lab", "--preset", "smoke", "--only", "c1,c7", "--out",
                           str(tmp_path), "--tensorboard"], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (lab_dir,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    results = json.loads((lab_dir / "results.json").read_text())
    logdir = lab_dir / "tensorboard"
    assert results["tensorboard"]["dir"] == str(logdir)
    runs = {f"{key}/{run['label']}": run for key in ("c1", "c7") for run in results["experiments"][key]["runs"]}
    assert set(runs) == {"c1/sgd", "c7/batchnorm", "c7/no-batchnorm"}  # c7/batchnorm reuses C1's run: its curves too
    assert runs["c7/batchnorm"].get("reused")
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--host", "127.0.0.1",
                               "--port", str(port), "--reload_interval", "1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        base = f"http://127.0.0.1:{port}/data/plugin/scalars"
        deadline = time.monotonic() + 120
        while set(_get_json(f"{base}/tags")) != set(runs):
            assert time.monotonic() < deadline, "tensorboard never listed every run"
            time.sleep(1)
        for name, run in runs.items():
            want = expected(run["records"])
            for tag in ("train/loss", "test/top1", "perf/mfu", "time/epoch_s", "lr"):
                query = urllib.parse.urlencode({"run": name, "tag": tag})
                points = _get_json(f"{base}/scalars?{query}")  # [[wall_time, step, value], ...]
                assert [(step, value) for _, step, value in points] == want[tag], (name, tag)
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_data_parallel_run_logs_once_from_rank_0_at_optimizer_steps(tmp_path: Path) -> None:
    # 2 processes on the CPU (gloo): 64 images, 16 per process per step = 2 optimizer steps per epoch
    proc = subprocess.run([sys.executable, "-m", "cifarlab", "train", "--nproc", "2", "--device", "cpu", "--dataset",
                           "synthetic", "--subset", "64", "--test-subset", "16", "--batch-size", "16", "--epochs", "2",
                           "--out", str(tmp_path / "runs"), "--tensorboard", str(tmp_path / "tb")],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (run_dir,) = list((tmp_path / "runs").iterdir())
    (folder,) = list((tmp_path / "tb").iterdir())  # one TensorBoard run, written by rank 0 alone
    assert folder.name == run_dir.name and len(list(folder.iterdir())) == 1
    records = json.loads((run_dir / "records.json").read_text())
    scalars = read_scalars(folder)
    assert [s for s, _ in scalars["train/loss"]] == [2, 4]  # optimizer steps, not images or steps x processes
    assert scalars == expected(records)
    assert json.loads((run_dir / "run.json").read_text())["utilization"]["devices"] == 2
