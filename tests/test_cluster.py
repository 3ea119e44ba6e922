"""Past one machine, on this one: two torchrun agents meeting through c10d (--nnodes 2) against --nproc 2, a
worker SIGKILLed under --max-restarts 1, a SIGUSR1 stop continued with --resume auto (same per-epoch losses as an
uninterrupted run each time), the SLURM variables and hostlists (a fake scontrol on PATH), the sbatch script
against a reviewed golden file, `cifarlab slurm` with a fake sbatch, and every bad input as one line."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cifarlab.cli import main
from cifarlab.cli.rendezvous import Rendezvous, rendezvous_from_flags, without_launch_flags
from cifarlab.cli.slurm import JobSpec, expand_hostlist, hostnames, render_script, slurm_rendezvous, slurm_step
from cifarlab.config import TrainConfig
from cifarlab.core.fileio import write_json_atomic

GOLDEN = Path(__file__).parent / "fixtures" / "slurm" / "job-2nodes-4gpus.sbatch"
# 32 images, 8 per process and step: 2 steps per rank and epoch with 2 processes; deterministic on CPU
TINY = ["--dataset", "synthetic", "--subset", "32", "--test-subset", "16", "--batch-size", "8", "--seed", "5",
        "--lr", "0.02", "--epochs", "4"]
SRC = str(Path(__file__).resolve().parents[1] / "src")


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TORCHELASTIC_"))}
    env["PYTHONPATH"] = SRC + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    return env


def _cifarlab(*args: str) -> list[str]:
    return [sys.executable, "-m", "cifarlab", *args]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _losses(run: Path) -> list[tuple[int, str, float, float]]:
    return [(r["epoch"], r["status"], r["train_loss"], r["test_loss"])
            for r in json.loads((run / "records.json").read_text())]


def _only_run(out: Path) -> Path:
    (run,) = [p for p in out.iterdir() if p.is_dir()]
    return run


def _run(cmd: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env())
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """--nproc 2 on this node, uninterrupted: the losses every other run here must reproduce."""
    out = tmp_path_factory.mktemp("nproc2")
    _run(_cifarlab("train", "--nproc", "2", "--out", str(out), *TINY))
    return _only_run(out)


# ------------------------------------------------------------------------------- real processes


def test_two_agents_through_c10d_train_what_nproc_2_trains(reference, tmp_path):
    out, port = tmp_path / "runs", _free_port()
    cmd = _cifarlab("train", "--nnodes", "2", "--nproc", "1", "--rdzv-endpoint", f"127.0.0.1:{port}",
                    "--rdzv-id", "pytest", "--out", str(out), *TINY)
    agents = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
              for _ in range(2)]
    results = [a.communicate(timeout=600) for a in agents]
    for a, (stdout, stderr) in zip(agents, results):
        assert a.returncode == 0, stdout[-2000:] + stderr[-2000:]
        assert "launch: 2 processes: 1 per node on 2 nodes meeting at 127.0.0.1" in stdout
    assert sum(stdout.count("global batch 16") for stdout, _ in results) == 1  # global rank 0 alone prints
    run = _only_run(out)  # one run folder for both nodes
    d = json.loads((run / "run.json").read_text())["distributed"]
    assert d["world_size"] == 2 and d["global_batch_size"] == 16
    assert all(c["params_max_abs_diff"] == 0.0 for c in d["replica_check"])
    records = json.loads((run / "records.json").read_text())
    assert [r["images"] for r in records] == [32] * 4  # counted once per epoch over both nodes
    assert _losses(run) == _losses(reference)


def test_a_worker_killed_under_max_restarts_is_restarted_and_the_run_ends_with_the_same_losses(reference, tmp_path):
    out = tmp_path / "runs"
    proc = subprocess.Popen(_cifarlab("train", "--nproc", "2", "--max-restarts", "1", "--out", str(out), *TINY),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    try:
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline and not list(out.glob("*/checkpoint.pt")):
            time.sleep(0.1)
        run = _only_run(out)
        mark = json.loads((run / "workers" / "rank-0.attempt-0.json").read_text())
        os.kill(mark["pid"], signal.SIGKILL)  # rank 0, the writer: the harsher case
        stdout, stderr = proc.communicate(timeout=600)
    finally:
        proc.kill()
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
    assert "launch: 2 processes: 2 per node on this node, up to 1 restart(s)" in stdout
    assert "torchrun restart 1 (a worker died): continuing" in stdout
    status = json.loads((run / "run.json").read_text())
    assert status["status"] == "completed"
    (restart,) = status["restarts"]
    assert restart["cause"].startswith("torchrun restart 1") and restart["from_epoch"] >= 1
    assert "killed" in restart["lost"] and restart["workers_killed"] == [f"rank 0 (pid {mark['pid']} on {mark['host']})"]
    assert "no clean end from rank 0" in stdout
    assert _losses(run) == _losses(reference)
    # the same folder on another world size (one process here) is another experiment: one line
    more = _cifarlab("train", *TINY[:-1], "5", "--run-dir", str(run), "--resume", "auto")
    refused = subprocess.run(more, capture_output=True, text=True, timeout=300, env=_env())
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr
    assert "was trained on 2 process(es)" in refused.stderr


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM], ids=["SIGUSR1", "SIGTERM"])
def test_a_signal_stops_the_run_and_resume_auto_finishes_it_with_the_uninterrupted_losses(tmp_path, sig):
    flags = [*TINY, "--loader", "torch", "--workers", "0", "--run-dir"]
    whole = tmp_path / "whole"
    _run(_cifarlab("train", *flags, str(whole), "--resume", "auto"))
    stopped = tmp_path / "stopped"
    cmd = _cifarlab("train", *flags, str(stopped), "--resume", "auto")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    for line in proc.stdout:
        if line.startswith("epoch 1/"):
            proc.send_signal(sig)
            break
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 128 + sig, stderr
    assert f"interrupted ({signal.Signals(sig).name})" in stderr and "Traceback" not in stderr
    assert json.loads((stopped / "run.json").read_text())["status"] == "interrupted"
    res = _run(cmd)  # the same command again, as a requeued job runs it
    assert "started again: continuing" in res.stdout
    assert _losses(stopped)[-4:] == _losses(whole)
    assert json.loads((stopped / "run.json").read_text())["restarts"][0]["lost"].startswith("epoch")
    again = _run(cmd)  # a requeue after the end: nothing to do
    assert "has finished all 4 epochs already" in again.stdout


# -------------------------------------------------------------------------- SLURM, without SLURM


def test_hostlists_expand_as_slurm_does():
    assert expand_hostlist("n[1-3]") == ["n1", "n2", "n3"]
    assert expand_hostlist("a,b") == ["a", "b"]
    assert expand_hostlist("g[01-02,05]") == ["g01", "g02", "g05"]
    assert expand_hostlist("r[1-2]-n[1-2],x") == ["r1-n1", "r1-n2", "r2-n1", "r2-n2", "x"]
    for bad in ("n[1-", "n[a-b]", "n[3-1]", ""):
        with pytest.raises(Exception, match="hostlist"):
            expand_hostlist(bad)


def _fake_tool(folder: Path, name: str, body: str) -> None:
    folder.mkdir(exist_ok=True)
    (folder / name).write_text(f"#!/bin/sh\n{body}\n")
    (folder / name).chmod(0o755)


def test_hostnames_ask_scontrol_when_it_is_on_path(tmp_path, monkeypatch):
    _fake_tool(tmp_path / "bin", "scontrol", 'echo "$@" > "$(dirname "$0")/asked"; printf "head01\\nhead02\\n"')
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    assert hostnames("head[1-2]") == ["head01", "head02"]  # scontrol's answer, not the builtin one
    assert (tmp_path / "bin" / "asked").read_text().split() == ["show", "hostnames", "head[1-2]"]
    _fake_tool(tmp_path / "bin", "scontrol", "echo 'scontrol: error: no slurm.conf' >&2; exit 1")
    assert hostnames("head[1-2]") == ["head1", "head2"]  # a scontrol that cannot answer: the builtin expansion


STEP = {"SLURM_JOB_ID": "4242", "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_NODES": "3", "SLURM_STEP_NUM_TASKS": "3",
        "SLURM_NODEID": "1", "SLURM_STEP_NODELIST": "g[01-02,05]", "SLURM_GPUS_ON_NODE": "4"}


def test_a_multi_node_step_gives_the_rendezvous_from_its_variables():
    step = slurm_step(STEP)
    rdzv = slurm_rendezvous(step, None, 2, 1024, hosts=expand_hostlist)
    assert rdzv == Rendezvous(nnodes=3, nproc=4, endpoint="g01:19242", rdzv_id="4242", max_restarts=2)
    args = rdzv.torchrun_args()
    assert args[args.index("--rdzv_endpoint") + 1] == "g01:19242" and "--standalone" not in args
    assert slurm_step({"SLURM_JOB_ID": "1"}) is None  # the batch script itself, a login node: no step
    assert slurm_rendezvous(slurm_step({**STEP, "SLURM_STEP_NUM_NODES": "1", "SLURM_STEP_NUM_TASKS": "1"}),
                            None, None, 1024) is None  # one node: train as anywhere else


@pytest.mark.parametrize("change, message", [
    ({"SLURM_STEP_NUM_TASKS": "12"}, "SLURM_STEP_NUM_TASKS=12 on SLURM_STEP_NUM_NODES=3"),
    ({"SLURM_STEP_NODELIST": "g[01-02]"}, "names 2 host(s) but the step has 3 node(s)"),
    ({"SLURM_NODEID": "7"}, "SLURM_NODEID=7 is outside"),
    ({"SLURM_STEP_NUM_NODES": "two"}, "SLURM_STEP_NUM_NODES='two' is not a whole number"),
])
def test_inconsistent_slurm_variables_are_one_line_from_cifarlab_train(monkeypatch, capsys, tmp_path, change, message):
    _fake_tool(tmp_path / "bin", "scontrol", 'case "$3" in "g[01-02,05]") printf "g01\\ng02\\ng05\\n";; '
                                             '"g[01-02]") printf "g01\\ng02\\n";; *) exit 1;; esac')
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    for k, v in {**STEP, **change}.items():
        monkeypatch.setenv(k, v)
    assert main(["train", "--dataset", "synthetic", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


def test_the_sbatch_script_matches_the_reviewed_golden_file():
    job = JobSpec(nodes=2, gpus_per_node=4, cpus_per_task=16, time="02:00:00", partition="gpu", account="lab",
                  command=["train", "--epochs", "30", "--batch-size", "128", "--nproc", "4"],
                  run_dir=Path("/scratch/me/runs/20260101-120000-train"), workdir=Path("/scratch/me"),
                  python="/opt/venv/bin/python")
    assert render_script(job) == GOLDEN.read_text()


def test_cifarlab_slurm_writes_the_script_into_the_run_folder_and_submits_it(tmp_path, monkeypatch, capsys):
    _fake_tool(tmp_path / "bin", "sbatch", 'echo "$@" > "$(dirname "$0")/submitted"; echo "77;cluster"')
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "runs"
    assert main(["slurm", "--nodes", "2", "--gpus-per-node", "2", "--time", "1:00:00", "--",
                 "train", "--epochs", "3", "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    run = _only_run(out)
    script = (run / "job.sbatch").read_text()
    assert (tmp_path / "bin" / "submitted").read_text().split() == ["--parsable", str(run / "job.sbatch")]
    assert "submitted job 77" in stdout and f"tail -f {run}/slurm-77.out" in stdout
    assert "#SBATCH --nodes=2" in script and "#SBATCH --gpus-per-node=2" in script and "#SBATCH --requeue" in script
    assert '--nproc 2 --run-dir "$run_dir" --resume auto --nnodes 2' in script
    assert subprocess.run(["bash", "-n", str(run / "job.sbatch")]).returncode == 0  # valid bash
    assert main(["slurm", "--dry-run", "--", "train", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("#!/bin/bash") and "--nnodes" not in printed  # one node: standalone


# ------------------------------------------------------------------------------ bad input, one line


@pytest.mark.parametrize("argv, message", [
    (["train", "--nnodes", "0"], "--nnodes must be between 1 and 4096 (got 0)"),
    (["train", "--nnodes", "2", "--rdzv-endpoint", "node0"], "'node0' has no port; write HOST:PORT"),
    (["train", "--nnodes", "2", "--rdzv-endpoint", "node0:99999"], "port must be a number from 1 to 65535"),
    (["train", "--nproc", "1", "--rdzv-endpoint", "node0:29500"], "--rdzv-endpoint is for --nnodes > 1"),
    (["train", "--nnodes", "2"], "--nnodes 2 needs --rdzv-endpoint HOST:PORT"),
    (["train", "--max-restarts", "-1"], "--max-restarts must be between 0 and 100"),
    (["train", "--resume", "auto"], "--resume auto needs --run-dir DIR"),
    (["slurm", "--nodes", "2"], "cifarlab slurm needs the command after --"),
    (["slurm", "--qos", "high", "--", "train"], "unrecognized arguments: --qos high"),
    (["slurm", "--time", "2h", "--", "train"], "--time '2h' is not a SLURM time"),
    (["slurm", "--", "inspect"], "runs `train ...` or `lab ...` after --, not inspect"),
    (["slurm", "--", "train", "--resume", "x"], "--resume is set by cifarlab slurm"),
    (["slurm", "--", "train", "--lr", "-1"], "--lr must be in"),
])
def test_bad_cluster_input_is_one_line(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for k in [k for k in os.environ if k.startswith("SLURM_")]:
        monkeypatch.delenv(k)
    assert main([*argv, *(["--dataset", "synthetic"] if argv[0] == "train" else [])]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("cifarlab: error: ") and message in err, err
    assert not (tmp_path / "runs").exists() or argv[0] != "slurm"  # a refused job leaves no folder behind


def test_resume_auto_refuses_a_folder_of_another_config_or_world_size(tmp_path, capsys):
    folder = tmp_path / "run"
    folder.mkdir()
    cfg = TrainConfig(dataset="synthetic", lr=0.5, out_dir=str(tmp_path))
    write_json_atomic(folder / "config.json", cfg.to_dict())
    assert main(["train", "--dataset", "synthetic", "--run-dir", str(folder), "--resume", "auto"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds a run of another config (lr 0.5 there, 0.1 here)" in err


def test_launch_flags_never_reach_the_workers():
    argv = ["--nproc", "2", "--nnodes=2", "--rdzv-endpoint", "h:1", "--rdzv-id", "x", "--max-restarts", "1", "--lr", "1"]
    assert without_launch_flags(argv) == ["--lr", "1"]
    assert rendezvous_from_flags(None, 2, None, None, 1, 8).torchrun_args()[3:6] == ["--standalone", "--nnodes", "1"]


def test_the_lab_as_a_job_runs_on_the_first_node_and_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["slurm", "--nodes", "2", "--dry-run", "--", "lab", "--preset", "smoke", "--out", str(tmp_path)]) == 0
    printed, err = capsys.readouterr()
    assert "srun --nodes=1 --ntasks=1" in printed and "cifarlab lab --preset smoke" in printed
    assert "--requeue" not in printed  # a lab does not continue a folder: it is not requeued
    assert "the lab runs on the allocation's first node only" in err
