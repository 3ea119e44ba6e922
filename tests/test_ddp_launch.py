"""Data-parallel training as a user meets it: `cifarlab train --nproc N` stopped by a signal, and bad input
refused in one line before torchrun starts N processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tests.conftest import one_line, run_cli

TINY = ["--dataset", "synthetic", "--subset", "32", "--test-subset", "16", "--batch-size", "8", "--no-evaluate"]


def _processes_naming(text: str) -> list[int]:
    """Live processes whose command line contains text (the run's --out folder names them all)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if text in cmdline and state != "Z":
            pids.append(int(entry.name))
    return pids


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc to find the run's processes")
def test_sigterm_to_the_launcher_alone_stops_every_process_before_it_exits(tmp_path):
    # A supervisor's `kill PID` reaches the launcher only (no terminal, no process group). It used to die at
    # once, leaving torchrun and both workers training the whole run to its end, orphaned.
    out = tmp_path / "sigterm-run"
    cmd = [sys.executable, "-m", "cifarlab", "train", "--nproc", "2", *TINY, "--epochs", "500", "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        deadline = time.monotonic() + 120
        for line in proc.stdout:  # type: ignore[union-attr]
            if line.startswith("epoch 1/") or time.monotonic() > deadline:
                break
        os.kill(proc.pid, signal.SIGTERM)
        code = proc.wait(timeout=90)
        left = _processes_naming(str(out))
    finally:
        for pid in _processes_naming(str(out)):  # never leave a run behind, fix or no fix
            os.kill(pid, signal.SIGKILL)
        proc.kill()
    assert code == 143, code  # README: 143 = interrupted by SIGTERM (it was -15: killed, not stopped)
    assert left == [], f"still running after the launcher exited: {left}"
    (run,) = [p for p in out.iterdir() if p.is_dir()]
    status = json.loads((run / "run.json").read_text())
    assert status["status"] == "interrupted" and status["summary"]["epochs_completed"] >= 1
    assert (run / "checkpoint.pt").is_file()


def test_sync_bn_on_cpu_is_refused_before_torchrun_starts(tmp_path, capsys):
    # It was refused by every worker: the error twice, torchrun's ChildFailedError traceback, exit 1.
    code, _, err = run_cli(["train", "--nproc", "2", "--sync-bn", *TINY, "--out", tmp_path], capsys)
    assert code == 2 and "--sync-bn needs CUDA" in one_line(err)
    assert list(tmp_path.iterdir()) == []


def test_resume_with_another_process_count_or_no_folder_is_one_line_before_torchrun(tmp_path, capsys):
    # Both were refused by every worker after loading the data: the error N times, torchrun's traceback, exit 1.
    code, _, _ = run_cli(["train", *TINY, "--epochs", "1", "--out", tmp_path], capsys)
    assert code == 0
    (run,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    code, out, err = run_cli(["train", "--resume", run, "--epochs", "2", "--nproc", "2"], capsys)
    assert code == 2 and out == ""
    assert "trained on 1 process(es)" in one_line(err) and "resume it without --nproc" in err
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before  # nothing written, nothing lost
    code, _, err = run_cli(["train", "--resume", tmp_path / "nowhere", "--nproc", "2"], capsys)
    assert code == 2 and "is not a folder" in one_line(err)


def test_more_processes_than_cpu_cores_is_one_line(tmp_path, capsys):
    from cifarlab.core.runtime import usable_cpus

    n = usable_cpus() + 1  # it used to start them all (with --nproc 64 on 2 cores, nothing ended within 2 min)
    code, _, err = run_cli(["train", "--nproc", n, *TINY, "--epochs", "1", "--device", "cpu", "--out", tmp_path],
                           capsys)
    assert code == 2 and f"--nproc {n} but only {n - 1} usable CPU core(s)" in one_line(err)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("torchrun", [False, True])
def test_the_compile_banner_says_where_compilation_lands(torchrun, monkeypatch):
    """A single process compiles in the setup warm-up (setup_s); under torchrun the runs keep no warm-up, so
    compilation lands in epoch 1 (41 s of it on this CPU), and the banner must not claim setup_s there."""
    import io

    import torch

    from cifarlab.config import TrainConfig
    from cifarlab.run.console import ConsoleProgress

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        if torchrun:
            monkeypatch.setenv(key, "0" if key != "WORLD_SIZE" else "2")
        else:
            monkeypatch.delenv(key, raising=False)
    out = io.StringIO()
    cache = {"dir": "/tmp/x", "source": "test", "entries_before": 0}
    ConsoleProgress(1, out=out).banner(TrainConfig(compile="default"), "data", torch.device("cpu"), cache)
    line = next(line for line in out.getvalue().splitlines() if line.startswith("compile:"))
    assert ("in epoch 1" in line) == torchrun and ("setup_s, apart from the epochs" in line) == (not torchrun)
